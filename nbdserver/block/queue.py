"""The per-export request queue, shared by every connection of the export.

Like the kernel's plugging: requests that arrive within one event-loop tick
(from any connection), or within one batch a connection marks with
:meth:`RequestQueue.start_plug` and :meth:`RequestQueue.finish_plug` (the
requests it cut from one receive), are held in a plug; at the end of the tick
or batch (or when the plug is full) they pass the hazard check, are sorted, and adjacent
ones of the same kind are merged into one :class:`Submission` each.  A request
that overlaps an earlier one still in flight waits for it; everything else
goes straight to the engine.  Each request leaves through its ``on_done``
callback once its submission completes or fails.

Two shortcuts keep random I/O cheap: a batch that arrives while nothing is in
flight, and whose requests do not overlap, skips the hazard lookups; and
while batches keep merging into nothing, most skip the sort.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from bisect import bisect_left
from collections.abc import Callable
from functools import partial
from time import monotonic
from typing import Final

from ..backing import Engine, Extent
from ..backing.file import Backoff, segments_extents
from ..protocol.constants import (
    CMD_BLOCK_STATUS,
    CMD_CACHE,
    CMD_FLUSH,
    CMD_READ,
    CMD_TRIM,
    CMD_WRITE,
    CMD_WRITE_ZEROES,
    FLAG_FAST_ZERO,
    FLAG_NO_HOLE,
)
from .buffers import BufferPool
from .hazards import HazardTracker, ordered
from .ledger import Account
from .merge import MergeLimits, Submission, build_submissions, could_merge, split_extents
from .request import Request
from .stats import SEGMENT_BUCKETS, SIZE_BUCKETS, QueueStats

log = logging.getLogger(__name__)
_WRITES: Final = frozenset({CMD_WRITE, CMD_WRITE_ZEROES})

MAX_PLUG_REQUESTS = 1024
MAX_PLUG_BYTES = 16 * 1024 * 1024
MERGE_SKIP_MAX = 64  # batches issued unsorted after merging kept finding nothing (random I/O)


class RequestQueue:
    def __init__(
        self,
        engine: Engine,
        *,
        merge: bool = True,
        limits: MergeLimits | None = None,
        pool: BufferPool | None = None,
        hazard_granule: int = 1,
        written: Account | None = None,
    ) -> None:
        """``written``: the backing file's count of bytes written since its last flush, shared with
        the other processes writing it (ledger.py); a count of this queue's alone if None."""
        self.engine = engine
        self.merge = merge
        self.limits = limits or MergeLimits()
        self.pool = pool or BufferPool()  # where READ buffers come from
        self.stats = QueueStats()
        self._plug: list[Request] = []
        self._plug_bytes = 0
        self._unplug_scheduled = False
        self._plug_holders = 0  # callers between start_plug() and finish_plug()
        self.submitters = 0  # connections submitting here, counted by them
        self._hazards = HazardTracker(hazard_granule)
        self._merging = Backoff(MERGE_SKIP_MAX)
        self._seq = 0
        self._in_flight = 0
        self.written = written or Account.private()  # writes not FUA: what a flush may write back
        self._depth_since = monotonic()  # when the queue depth last changed
        self._tasks: set[asyncio.Task[None]] = set()
        self._idle: asyncio.Future[None] | None = None  # what drain() waits on
        self._loop: asyncio.AbstractEventLoop | None = None
        self._held: list[Request] | None = None  # submitted while held (a snapshot is made)
        # Takes the requests that must wait for something outside the queue (True), while a
        # snapshot's file is cloned (serving/cloning.py); None nearly always.
        self.gate: Callable[[Request], bool] | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The running loop, asked once: get_running_loop() costs a getpid() system call."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    @property
    def in_flight(self) -> int:
        """Requests received and not yet completed: the queue depth."""
        return self._in_flight

    def submit(self, request: Request) -> None:
        """Queue a request; its ``arrival`` may be set already (one clock reading for many requests)."""
        held = self._held
        if held is not None:
            held.append(request)
            return
        gate = self.gate
        if gate is not None and gate(request):
            return
        request.seq = self._seq
        self._seq += 1
        now = request.arrival
        if not now:
            request.arrival = now = monotonic()
        if now > self._depth_since:  # _depth_changes(), inline: this runs for every request
            if self._in_flight:
                elapsed, stats = now - self._depth_since, self.stats
                stats.io_time += elapsed
                stats.io_time_weighted += elapsed * self._in_flight
            self._depth_since = now
        self._in_flight += 1
        self.stats.requests[request.command] += 1
        if not self.merge or (self._in_flight == 1 and not self._plug and not self._plug_holders):
            # An idle queue has nothing to merge with yet: a lone request goes at once.
            self._admit([request])
            return
        if not could_merge(request, self.limits):
            self.unplug()  # what arrived earlier is admitted first: hazards follow arrival order
            self._admit([request])
            return
        self._plug.append(request)
        self._plug_bytes += request.length
        if len(self._plug) >= MAX_PLUG_REQUESTS or self._plug_bytes >= MAX_PLUG_BYTES:
            self.unplug()
        elif not self._unplug_scheduled and not self._plug_holders:
            self._unplug_scheduled = True
            self.loop.call_soon(self.unplug)

    def start_plug(self) -> None:
        """Hold what is submitted from now until :meth:`finish_plug`: a batch the caller knows
        about merges without waiting for the end of the tick (the kernel's ``blk_start_plug``)."""
        self._plug_holders += 1

    def finish_plug(self) -> None:
        """Send the batch on its way: at once if one connection submits here, else at the end
        of the tick, so that what the other connections receive in this tick may join it."""
        self._plug_holders -= 1
        if self._plug_holders or not self._plug:
            return
        if self.submitters <= 1:
            self.unplug()
        elif not self._unplug_scheduled:
            self._unplug_scheduled = True
            self.loop.call_soon(self.unplug)

    def unplug(self) -> None:
        """Send everything plugged on its way."""
        self._unplug_scheduled = False
        batch, self._plug, self._plug_bytes = self._plug, [], 0
        if batch:
            self._admit(batch)

    async def drain(self) -> None:
        """Wait until every submitted request has completed."""
        self.unplug()
        while self._in_flight:  # a completing submission issues the requests that waited for it
            if self._idle is None or self._idle.done():
                self._idle = self.loop.create_future()
            await asyncio.shield(self._idle)

    async def hold(self) -> None:
        """Take no request to the backing until :meth:`release`, and wait until those taken before
        have completed: the backing is then as every answered request left it (a request boundary,
        for a snapshot).  Requests submitted meanwhile wait, their arrival time kept."""
        if self._held is None:
            self._held = []
        await self.drain()

    def release(self) -> list[Request]:
        """Stop holding; returns the requests held, for the caller to :meth:`submit` again."""
        held, self._held = self._held or [], None
        return held

    @property
    def holding(self) -> bool:
        return self._held is not None

    # Admission: hazards, then merging ------------------------------------------------

    def _admit(self, batch: list[Request]) -> None:
        hazards = self._hazards
        if not hazards.count and hazards.disjoint(batch):
            # Nothing earlier is in flight and no two of these overlap: none waits.  Only those
            # that do not complete at once are tracked (as they start), for later ones to find.
            self._issue(batch, untracked=True)
            return
        ready = []
        for request in batch:
            if ordered(request):
                blockers = hazards.blockers(request)
                hazards.add(request)
                if blockers:
                    self.stats.waits += 1
                    request.blocked_by = len(blockers)
                    for blocker in blockers:
                        if blocker.waiters is None:
                            blocker.waiters = []
                        blocker.waiters.append(request)
                    continue
            ready.append(request)
        self._issue(ready)

    def _issue(self, ready: list[Request], untracked: bool = False) -> None:
        """Start the submissions of ``ready``; those done at once may unblock more, started in turn
        (a loop, not recursion: a long chain of overlapping writes must not exhaust the stack).

        ``untracked``: ``ready`` is a batch :meth:`_admit` did not track; what of it does not
        complete at once is tracked before it starts.
        """
        loop, hazards = self.loop, self._hazards
        while ready:
            submissions = self._build(ready)
            ready = []
            for submission in submissions:
                if self._done_now(submission):
                    ready += self._complete(submission)
                    continue
                if untracked:
                    for request in submission.requests:
                        if ordered(request):
                            hazards.add(request)
                if self._start(submission):
                    continue
                task = loop.create_task(self._execute(submission))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            untracked = False  # requests unblocked by those done at once were tracked on arrival

    def _build(self, ready: list[Request]) -> list[Submission]:
        """Merge ``ready`` into submissions.  While batches keep merging into nothing (random I/O),
        most of them skip the sort and go as they came: merging them finds nothing anyway."""
        if not self.merge or (len(ready) > 1 and self._merging.skip()):
            return [Submission(r) for r in ready]
        submissions = build_submissions(ready, self.limits)
        if len(ready) > 1:
            if len(submissions) == len(ready):
                self._merging.failed()
            else:
                self._merging.worked()
        return submissions

    # Execution -------------------------------------------------------------------------

    def _done_now(self, submission: Submission) -> bool:
        """Carry out a READ, WRITE or FLUSH at once if the engine can without waiting (no task then)."""
        command = submission.command
        try:
            if command == CMD_WRITE:
                return self.engine.writev_now(submission.offset, submission.segments, submission.dsync)
            if command == CMD_FLUSH:
                written = self.written
                total = written.total()
                if not self.engine.flush_now(written.unflushed(total)):
                    return False
                written.flushed(total)
                return True
            if command != CMD_READ:
                return False
            self._take_buffers(submission)
            if not submission.requests[0].sparse:
                return self.engine.readv_now(submission.offset, submission.segments)
            extents = self.engine.read_sparse_now(submission.offset, submission.segments)
            if extents is None:
                return False
            self._give_extents(submission, extents)
        except Exception as exc:
            _fail(submission, exc)
        return True

    def _start(self, submission: Submission) -> bool:
        """Hand a READ or WRITE to the engine, to complete through :meth:`_finished` (no task)."""
        command, engine = submission.command, self.engine
        done = partial(self._finished, submission)
        try:
            if command == CMD_WRITE:
                engine.start_writev(submission.offset, submission.segments, submission.dsync, done)
            elif command == CMD_READ:  # read_sparse_now() has ruled out a hole already
                engine.start_readv(submission.offset, submission.segments, done)
            else:
                return False
        except Exception as exc:
            self.loop.call_soon(done, None, exc)  # as the engine would: never from within _issue
        return True

    def _finished(self, submission: Submission, result: object, exc: BaseException | None) -> None:
        if exc is None and submission.requests[0].sparse and submission.command == CMD_READ:
            try:
                self._give_extents(submission, segments_extents(submission.segments))
            except Exception as error:
                exc = error
        if exc is not None:
            _fail(submission, exc)
        unblocked = self._complete(submission)
        if unblocked:
            self._issue(unblocked)

    async def _execute(self, submission: Submission) -> None:
        try:
            if submission.length or submission.command == CMD_FLUSH:
                await self._dispatch(submission)
        except Exception as exc:
            _fail(submission, exc)
        unblocked = self._complete(submission)
        if unblocked:
            self._issue(unblocked)

    def _complete(self, submission: Submission) -> list[Request]:
        """Account for a finished submission and complete its requests; returns those it unblocked."""
        stats, command, requests = self.stats, submission.command, submission.requests
        if command in _WRITES and not submission.dsync:  # counted done: an unfinished write is no flush's
            self.written.wrote(submission.length)
        stats.submissions[command] += 1
        stats.merged[command] += len(requests) - 1
        stats.bytes[command] += submission.length
        stats.segments[command] += len(requests)
        stats.submission_bytes[command].counts[bisect_left(SIZE_BUCKETS, submission.length)] += 1
        segments = len(requests)
        stats.submission_segments[command].counts[bisect_left(SEGMENT_BUCKETS, segments) if segments > 1 else 0] += 1
        now = monotonic()
        if self._in_flight:  # _depth_changes(), inline
            elapsed = now - self._depth_since
            stats.io_time += elapsed
            stats.io_time_weighted += elapsed * self._in_flight
        self._depth_since = now
        self._in_flight -= len(requests)
        if not self._in_flight and self._idle is not None and not self._idle.done():
            self._idle.set_result(None)
        latency = stats.latency[command]
        counts, bounds, waited = latency.counts, latency.bounds, 0.0
        arrival, bucket = -1.0, 0
        unblocked = []
        for request in requests:
            if request.arrival != arrival:  # merged requests mostly arrived together: one lookup
                arrival = request.arrival
                bucket = bisect_left(bounds, now - arrival)
            counts[bucket] += 1
            waited += now - arrival
            if request.errno:
                stats.errors[request.errno] += 1
            if request.tracked:
                self._hazards.remove(request)
            if request.waiters:
                for waiter in request.waiters:
                    waiter.blocked_by -= 1
                    if not waiter.blocked_by:
                        unblocked.append(waiter)
                request.waiters = None
            request.on_done(request)
        stats.time[command] += waited
        return unblocked

    async def _dispatch(self, submission: Submission) -> None:
        engine, command = self.engine, submission.command
        offset, length, flags = submission.offset, submission.length, submission.flags
        if command == CMD_FLUSH:
            total = self.written.total()  # what this flush writes back (later writes: the next one)
            await engine.flush()
            self.written.flushed(total)  # not before: a flush meanwhile must not think it has little to do
        elif command == CMD_TRIM:
            await engine.discard(offset, length, dsync=submission.dsync)
        elif command == CMD_WRITE_ZEROES:
            await engine.write_zeroes(
                offset,
                length,
                may_trim=not flags & FLAG_NO_HOLE,
                fast_only=bool(flags & FLAG_FAST_ZERO),
                dsync=submission.dsync,
            )
        elif command == CMD_CACHE:
            await engine.cache(offset, length)
        elif command == CMD_BLOCK_STATUS:
            (request,) = submission.requests
            request.extents = await engine.extents(offset, length)
        else:
            raise OSError(errno.EINVAL, f"command {command} is not an I/O command")

    def _take_buffers(self, submission: Submission) -> None:
        """Give each READ request of the submission a pooled buffer to read into (once)."""
        pool = self.pool  # (its method called, not taken as a value: that would build a bound method)
        for request in submission.requests:
            if request.block is None:
                request.block = pool.take(request.length)
                request.buffer = request.block[: request.length]

    @staticmethod
    def _give_extents(submission: Submission, extents: list[Extent]) -> None:
        requests = submission.requests
        if len(requests) == 1:
            requests[0].extents = extents
            return
        for request, part in zip(requests, split_extents(extents, [r.length for r in requests]), strict=True):
            request.extents = part


def _fail(submission: Submission, exc: BaseException) -> None:
    """Fail every request of a submission: with the errno of an OSError, else as an internal error."""
    if isinstance(exc, OSError):
        for request in submission.requests:
            request.fail(exc.errno or errno.EIO, exc.strerror or str(exc))
        return
    log.error("submission %r failed", submission, exc_info=exc)  # a bug must cost these requests, not the server
    for request in submission.requests:
        request.fail(errno.EIO, f"internal error: {exc}")
