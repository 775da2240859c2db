"""Engines: asynchronous I/O on a :class:`~nbdserver.backing.file.Backing`.

The block layer first offers a transfer (or a flush) to the engine's ``*_now`` methods,
which do it on the event loop's thread if it needs no waiting (a page-cache
hit, a memory-backed file): that costs a copy, where a hand-off costs two
thread switches or a trip through the kernel's ring.  Otherwise it starts the
transfer with one of the ``start_*`` methods, whose callback runs on the
loop's thread when the transfer ends: no task or future per transfer, as
every READ and WRITE passes here.  The rarer operations (flush, trim, zeroing,
extents) are awaited.

:class:`ThreadPoolEngine` runs the blocking calls on a pool of threads
(``os.preadv`` and ``os.pwritev`` release the GIL), which works on any kernel
and filesystem; :class:`~nbdserver.backing.uring.UringEngine` puts reads,
writes and flushes through io_uring.  ``auto`` takes io_uring where it passes
its self-test and the thread pool elsewhere.

Submitted I/O is never cancelled: the kernel cannot cancel regular-file I/O,
and the segments must stay alive until it ends.  Callers shield it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
from collections.abc import Callable, Sequence
from functools import partial
from typing import Protocol

from .file import SPARSE_CHECK_MIN, Backing, Extent, Segment, segments_extents, segments_length

log = logging.getLogger(__name__)

DEFAULT_WORKERS = 16

# An operation's completion: called on the event loop's thread, never from within the call that
# started the operation, with (result, None) on success and (None, exception) on failure.
Done = Callable[[object, BaseException | None], None]


class Store(Protocol):
    """What an export serves, as the export sees it: a file or block device
    (:class:`~nbdserver.backing.file.Backing`) or an RBD image
    (:class:`~nbdserver.backing.librbd.RbdImage`)."""

    size: int
    read_only: bool
    offset_align: int  # direct transfers must start and end on multiples of this (1: any)

    @property
    def path(self) -> str | os.PathLike[str]: ...  # what it is, as messages and /metrics name it
    @property
    def direct(self) -> bool: ...  # O_DIRECT beside the page cache: requests sharing a page are ordered
    def close(self) -> None: ...


class Engine(Protocol):
    name: str  # as ENGINES spells it, or "rbd"

    @property
    def backing(self) -> Store: ...

    def readv_now(self, offset: int, segments: Sequence[Segment]) -> bool: ...
    def read_sparse_now(self, offset: int, segments: Sequence[Segment]) -> list[Extent] | None: ...
    def writev_now(self, offset: int, segments: Sequence[Segment], dsync: bool = False) -> bool: ...
    def flush_now(self, unflushed: int) -> bool: ...
    def start_readv(self, offset: int, segments: Sequence[Segment], done: Done) -> None: ...
    def start_writev(self, offset: int, segments: Sequence[Segment], dsync: bool, done: Done) -> None: ...
    async def flush(self) -> None: ...
    async def discard(self, offset: int, length: int, dsync: bool = False) -> None: ...
    async def write_zeroes(
        self, offset: int, length: int, *, may_trim: bool, fast_only: bool, dsync: bool = False
    ) -> None: ...
    async def extents(self, offset: int, length: int) -> list[Extent]: ...
    async def cache(self, offset: int, length: int) -> None: ...
    def close(self) -> None: ...


class InPlace:
    """The transfers an engine does at once, on the caller's thread, when they need no waiting.

    Each returns False (or None) when it would wait; nothing is done then.
    """

    backing: Backing

    def readv_now(self, offset: int, segments: Sequence[Segment]) -> bool:
        return self.backing.read_now(offset, segments)

    def read_sparse_now(self, offset: int, segments: Sequence[Segment]) -> list[Extent] | None:
        """As :meth:`readv_now`, with the extents that read as zeroes (a reply may send them without
        their bytes); or None, the read not done.  A range that is one hole is not read at all: the
        segments are left as they were, and must not be sent.

        A long read may fall in a hole: one SEEK_DATA (it waits for the inode lock at most as long as
        a write holds it) spares reading it, which would fill the page cache with zeroes; it is asked
        here, once, whether the read is then done in place or by the engine.  Other zeroes are found in
        the data read (:func:`segments_extents`), not with SEEK_HOLE: in a well-filled file SEEK_HOLE
        may walk every page up to its end (tmpfs does), which made each read cost O(file size).
        """
        length = segments_length(segments)
        if length >= SPARSE_CHECK_MIN and self.backing.is_hole(offset, length):
            return [(length, True)]
        if self.backing.read_now(offset, segments):
            return segments_extents(segments)
        return None

    def writev_now(self, offset: int, segments: Sequence[Segment], dsync: bool = False) -> bool:
        return self.backing.write_now(offset, segments, dsync)

    def flush_now(self, unflushed: int) -> bool:
        return self.backing.flush_now(unflushed)


def resolve(future: asyncio.Future, result: object, exc: BaseException | None) -> None:
    """A :data:`Done` that settles ``future`` (bound with functools.partial)."""
    if future.cancelled():
        return
    if exc is None:
        future.set_result(result)
    else:
        future.set_exception(exc)


class ThreadPoolEngine(InPlace):
    """Blocking calls on a private pool of worker threads.

    Lighter than ``loop.run_in_executor``: jobs go through one C ``SimpleQueue``,
    and completions come back in batches, so a busy engine wakes the event loop
    once for many finished operations rather than once for each.
    """

    name = "threads"

    def __init__(self, backing: Backing, workers: int = DEFAULT_WORKERS) -> None:
        self.backing = backing
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._done: list[tuple[Done, object, BaseException | None]] = []
        self._done_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._threads = [threading.Thread(target=self._work, name=f"nbd-io-{i}", daemon=True) for i in range(workers)]
        for thread in self._threads:
            thread.start()

    def call_then(self, done: Done, fn: Callable[..., object], *args: object) -> None:
        """Run ``fn(*args)`` on a worker; ``done`` gets its outcome on the loop's thread."""
        if self._loop is None:  # asked once: get_running_loop() costs a getpid() system call
            self._loop = asyncio.get_running_loop()
        self._jobs.put((done, fn, args))

    def call(self, fn: Callable[..., object], *args: object) -> asyncio.Future:
        """Run ``fn(*args)`` on a worker; the future has its result."""
        future = (self._loop or asyncio.get_running_loop()).create_future()
        self.call_then(partial(resolve, future), fn, *args)
        return future

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            done, fn, args = job
            outcome: tuple[Done, object, BaseException | None]
            try:
                outcome = (done, fn(*args), None)
            except BaseException as exc:
                outcome = (done, None, exc)
            with self._done_lock:
                self._done.append(outcome)
                first = len(self._done) == 1
            if first:  # the loop has no delivery pending: schedule one
                assert self._loop is not None
                self._loop.call_soon_threadsafe(self._deliver)
            # An idle worker must not keep its last job's buffers alive.
            del job, done, fn, args, outcome

    def _deliver(self) -> None:
        with self._done_lock:
            batch, self._done = self._done, []
        for done, result, exc in batch:
            try:
                done(result, exc)
            except Exception:  # one caller's bug must not cost the completions after it
                log.exception("completion %r failed", done)

    def start_readv(self, offset: int, segments: Sequence[Segment], done: Done) -> None:
        self.call_then(done, self.backing.readv, offset, segments)

    def start_writev(self, offset: int, segments: Sequence[Segment], dsync: bool, done: Done) -> None:
        self.call_then(done, self.backing.writev, offset, segments, dsync)

    async def flush(self) -> None:
        await self.call(self.backing.flush)

    async def discard(self, offset: int, length: int, dsync: bool = False) -> None:
        def trim() -> None:
            self.backing.discard(offset, length)
            if dsync:
                self.backing.flush()

        await self.call(trim)

    async def write_zeroes(
        self, offset: int, length: int, *, may_trim: bool, fast_only: bool, dsync: bool = False
    ) -> None:
        def zero() -> None:
            self.backing.write_zeroes(offset, length, may_trim=may_trim, fast_only=fast_only)
            if dsync:
                self.backing.flush()

        await self.call(zero)

    async def extents(self, offset: int, length: int) -> list[Extent]:
        return await self.call(self.backing.extents, offset, length)

    async def cache(self, offset: int, length: int) -> None:
        await self.call(self.backing.cache, offset, length)

    def close(self) -> None:
        for _ in self._threads:
            self._jobs.put(None)
        for thread in self._threads:
            thread.join()
        self.backing.close()
