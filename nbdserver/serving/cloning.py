"""A snapshot made while the export is served: its content is fixed at one request boundary, its
file is cloned afterwards, range by range.

A reflink costs time per extent, and the kernel locks the file's I/O while it clones: a whole
file fragmented by random writes takes a second, which no export should stop for.  So at the
boundary (every process holds the export's requests for a moment, snapshots.py) each process puts
a :class:`Gate` in front of its request queue, and the primary starts a :class:`Cloner`.  The
file is cut into granules (GRANULE bytes); a request that would change a granule not yet cloned
waits at its gate, which asks the cloner for it; every other request goes on.  The cloner clones
in a thread: first the granules asked for, then the rest in order, in runs sized to take a few
milliseconds each (the lock is let go between them); after each run every gate hears which
granules are done.  No granule is cloned twice, so no write lands in the snapshot.  Reads never
wait.  A write waits for the clone of its own granules, behind those asked for before it.

Requests waiting at a gate are let through in arrival order among those that overlap, as the
request queue's hazard tracking would order them.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Callable
from time import monotonic

from ..backing.reflink import Target
from ..block import Request
from ..protocol import Command

log = logging.getLogger(__name__)

GRANULE = 256 * 1024  # bytes: what a waiting write waits for at most (times the extents in it)
MAX_RUN = 16  # granules cloned in one call at most (4 MiB): a fragmented run stops every I/O meanwhile
FAST, SLOW = 0.002, 0.008  # seconds per call: runs grow below FAST, shrink above SLOW
_MODIFIES = (Command.WRITE, Command.WRITE_ZEROES, Command.TRIM)

Ask = Callable[[int, int], None]  # granules first..last are wanted
Report = Callable[[int, list[int]], None]  # every granule below the first number is cloned, and those listed


def granules(size: int, granule: int = GRANULE) -> int:
    return (size + granule - 1) // granule


class Gate:
    """One process's view of a clone under way: holds the requests that must wait for it."""

    def __init__(self, count: int, ask: Ask, submit: Callable[[Request], None], granule: int = GRANULE) -> None:
        """``ask``: tell the cloner which granules a waiting request needs; ``submit``: pass a
        request on to the request queue once it may go."""
        self.count, self.granule = count, granule
        self._ask, self._submit = ask, submit
        self.frontier = 0  # every granule below is cloned
        self._beyond: set[int] = set()  # granules cloned at or above the frontier
        self._waiting: list[tuple[Request, int, int]] = []  # request, its first and last granule
        self._passing: Request | None = None  # let through now: not stopped again on its way
        self.waited = 0  # requests that waited here

    def admit(self, request: Request) -> bool:
        """True if the request waits here (it changes a granule not yet cloned, or overlaps one that
        waits); it is submitted once it may go."""
        if request.command not in _MODIFIES or request.length <= 0 or request is self._passing:
            return False
        first = request.offset // self.granule
        last = min((request.offset + request.length - 1) // self.granule, self.count - 1)
        if first >= self.count:  # beyond the end: the backing refuses it, nothing to clone
            return False
        missing = self._missing(first, last)
        if missing is None and not self._overlaps(first, last, self._waiting):
            return False
        self._waiting.append((request, first, last))
        self.waited += 1
        if missing is not None:
            self._ask(missing, last)
        return True

    def cloned(self, frontier: int, beyond: list[int]) -> None:
        """The cloner's news: let through what may go now."""
        self.frontier = max(self.frontier, frontier)
        self._beyond.update(g for g in beyond if g >= self.frontier)
        self._beyond = {g for g in self._beyond if g >= self.frontier}
        self._let_through()

    def open(self) -> None:
        """The clone is over (done, or given up): everything waiting goes on."""
        self.frontier = self.count
        self._let_through()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def _missing(self, first: int, last: int) -> int | None:
        """The first granule of first..last not cloned yet, if any."""
        if last < self.frontier:
            return None
        for g in range(max(first, self.frontier), last + 1):
            if g not in self._beyond:
                return g
        return None

    @staticmethod
    def _overlaps(first: int, last: int, waiting: list[tuple[Request, int, int]]) -> bool:
        return any(start <= last and first <= end for _, start, end in waiting)

    def _let_through(self) -> None:
        still: list[tuple[Request, int, int]] = []
        ready: list[Request] = []
        for entry in self._waiting:
            _, first, last = entry
            if self._missing(first, last) is None and not self._overlaps(first, last, still):
                ready.append(entry[0])
            else:
                still.append(entry)
        self._waiting = still
        try:
            for request in ready:
                self._passing = request
                self._submit(request)
        finally:
            self._passing = None


class Cloner:
    """Clones a Target in a thread: granules asked for first, then the rest in order."""

    def __init__(self, target: Target, report: Report, granule: int = GRANULE) -> None:
        """``report`` is called on the event loop after clones, with what is done."""
        self.target, self.granule = target, granule
        self.count = granules(target.size, granule)
        self._report = report
        self._done = bytearray(self.count)
        self._frontier = 0
        self._asked: deque[tuple[int, int]] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._news: list[int] = []  # done beyond the frontier, not yet reported
        self._reporting = False
        self._loop = asyncio.get_running_loop()
        self.calls = 0
        self.longest = 0.0  # seconds of the longest clone call
        self.seconds = 0.0  # the whole clone's

    def ask(self, first: int, last: int) -> None:
        """Clone first..last next (from any thread)."""
        with self._lock:
            self._asked.append((max(0, first), min(last, self.count - 1)))
        self._wake.set()

    async def run(self) -> None:
        """Clone everything; ReflinkError if a clone fails (the copy is then useless)."""
        started = monotonic()
        try:
            await self._loop.run_in_executor(None, self._clone_all)
        finally:
            self.seconds = monotonic() - started
        self._flush()

    def _clone_all(self) -> None:
        run = 1
        while True:
            picked = self._next_asked()
            if picked is None:
                with self._lock:
                    frontier = self._advance()
                if frontier >= self.count:
                    return
                picked = (frontier, frontier + run - 1)
            took = self._clone_run(*picked)
            if took < FAST:
                run = min(run * 2, MAX_RUN)
            elif took > SLOW:
                run = max(run // 2, 1)

    def _next_asked(self) -> tuple[int, int] | None:
        """The first granule asked for and not done, and how far its run goes (within MAX_RUN)."""
        with self._lock:
            while self._asked:
                first, last = self._asked[0]
                while first <= last and self._done[first]:
                    first += 1
                if first > last:
                    self._asked.popleft()
                    continue
                self._asked[0] = (first, last)
                return first, min(last, first + MAX_RUN - 1)
        return None

    def _clone_run(self, first: int, last: int) -> float:
        """Clone the granules from ``first`` that are not done, up to ``last``; returns the seconds."""
        end = first
        while end <= last and end < self.count and not self._done[end]:
            end += 1
        offset = first * self.granule
        length = min(end * self.granule, self.target.size) - offset
        started = monotonic()
        self.target.clone(offset, length)
        took = monotonic() - started
        self.calls += 1
        self.longest = max(self.longest, took)
        with self._lock:
            self._done[first:end] = b"\x01" * (end - first)
            self._news.extend(range(first, end))
            if not self._reporting:
                self._reporting = True
                self._loop.call_soon_threadsafe(self._flush)
        return took

    def _advance(self) -> int:
        """The frontier moved past what is done (with the lock held)."""
        while self._frontier < self.count and self._done[self._frontier]:
            self._frontier += 1
        return self._frontier

    def _flush(self) -> None:
        with self._lock:
            self._reporting = False
            frontier = self._advance()
            news, self._news = [g for g in self._news if g >= frontier], []
        self._report(frontier, news)
