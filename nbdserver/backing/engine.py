"""Engines: asynchronous I/O on a :class:`~nbdserver.backing.file.Backing`.

The block layer first offers a transfer to the engine's ``*_now`` methods,
which do it on the event loop's thread if it needs no waiting (a page-cache
hit, a memory-backed file): that costs a copy, where a hand-off costs a task,
a future and two thread switches.  Otherwise it awaits the engine, which
decides how the blocking work is done.  :class:`ThreadPoolEngine` runs it on a pool of threads (``os.preadv`` and
``os.pwritev`` release the GIL), which works on any kernel and filesystem; a
read the page cache can answer at once (``RWF_NOWAIT``) is done in place.

Submitted I/O is never cancelled: the kernel cannot cancel regular-file I/O,
and the segments must stay alive until it ends.  Callers shield it.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable, Sequence
from typing import Protocol

from .file import SPARSE_CHECK_MIN, Backing, Extent, Segment, segments_extents

DEFAULT_WORKERS = 16


class Engine(Protocol):
    backing: Backing

    def readv_now(self, offset: int, segments: Sequence[Segment]) -> bool: ...
    def read_sparse_now(self, offset: int, segments: Sequence[Segment]) -> list[Extent] | None: ...
    def writev_now(self, offset: int, segments: Sequence[Segment], dsync: bool = False) -> bool: ...
    async def readv(self, offset: int, segments: Sequence[Segment]) -> None: ...
    async def read_sparse(self, offset: int, segments: Sequence[Segment]) -> list[Extent]: ...
    async def writev(self, offset: int, segments: Sequence[Segment], dsync: bool = False) -> None: ...
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
        # A long read may fall in a hole: one SEEK_DATA (it waits for the inode lock at most as long
        # as a write holds it) spares reading it, which would fill the page cache with zeroes.
        length = sum(map(len, segments))
        if length >= SPARSE_CHECK_MIN and self.backing.is_hole(offset, length):
            return [(length, True)]
        if self.backing.read_now(offset, segments):
            return segments_extents(segments)
        return None

    def writev_now(self, offset: int, segments: Sequence[Segment], dsync: bool = False) -> bool:
        return self.backing.write_now(offset, segments, dsync)


class ThreadPoolEngine(InPlace):
    """Blocking calls on a private pool of worker threads.

    Lighter than ``loop.run_in_executor``: jobs go through one C ``SimpleQueue``,
    and completions come back in batches, so a busy engine wakes the event loop
    once for many finished operations rather than once for each.
    """

    def __init__(self, backing: Backing, workers: int = DEFAULT_WORKERS) -> None:
        self.backing = backing
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._done: list[tuple[asyncio.Future, object, BaseException | None]] = []
        self._done_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._threads = [threading.Thread(target=self._work, name=f"nbd-io-{i}", daemon=True) for i in range(workers)]
        for thread in self._threads:
            thread.start()

    def call(self, fn: Callable[..., object], *args: object) -> asyncio.Future:
        """Run ``fn(*args)`` on a worker; the future has its result."""
        loop = self._loop
        if loop is None:  # asked once: get_running_loop() costs a getpid() system call
            loop = self._loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._jobs.put((future, fn, args))
        return future

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            future, fn, args = job
            try:
                outcome = (future, fn(*args), None)
            except BaseException as exc:
                outcome = (future, None, exc)
            with self._done_lock:
                self._done.append(outcome)
                first = len(self._done) == 1
            if first:  # the loop has no delivery pending: schedule one
                assert self._loop is not None
                self._loop.call_soon_threadsafe(self._deliver)
            # An idle worker must not keep its last job's buffers alive.
            del job, future, fn, args, outcome

    def _deliver(self) -> None:
        with self._done_lock:
            done, self._done = self._done, []
        for future, result, exc in done:
            if future.cancelled():
                continue
            if exc is None:
                future.set_result(result)
            else:
                future.set_exception(exc)

    async def readv(self, offset: int, segments: Sequence[Segment]) -> None:
        await self.call(self.backing.readv, offset, segments)

    async def read_sparse(self, offset: int, segments: Sequence[Segment]) -> list[Extent]:
        return await self.call(self.backing.read_sparse, offset, segments)

    async def writev(self, offset: int, segments: Sequence[Segment], dsync: bool = False) -> None:
        await self.call(self.backing.writev, offset, segments, dsync)

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


ENGINES = ("threads", "uring")


def open_engine(name: str, backing: Backing, workers: int = DEFAULT_WORKERS) -> Engine:
    """The engine called ``name`` (one of ENGINES) on ``backing``."""
    if name == "threads":
        return ThreadPoolEngine(backing, workers)
    if name == "uring":
        from .uring import UringEngine  # its ctypes set-up is only wanted when chosen

        return UringEngine(backing)
    raise ValueError(f"unknown engine {name!r}")
