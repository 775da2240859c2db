"""Engines: asynchronous I/O on a :class:`~nbdserver.backing.file.Backing`.

The block layer awaits an engine; the engine decides how the blocking work is
done.  :class:`ThreadPoolEngine` runs it on a pool of threads (``os.preadv`` and
``os.pwritev`` release the GIL), which works on any kernel and filesystem.

Submitted I/O is never cancelled: the kernel cannot cancel regular-file I/O,
and the segments must stay alive until it ends.  Callers shield it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Sequence
from typing import Protocol

from .file import Backing, Extent, Segment

DEFAULT_WORKERS = 16


class Engine(Protocol):
    backing: Backing

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


class ThreadPoolEngine:
    """Blocking calls on a private thread pool."""

    def __init__(self, backing: Backing, workers: int = DEFAULT_WORKERS) -> None:
        self.backing = backing
        self._pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="nbd-io")

    def _run(self, fn, *args):
        return asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def readv(self, offset: int, segments: Sequence[Segment]) -> None:
        await self._run(self.backing.readv, offset, segments)

    async def read_sparse(self, offset: int, segments: Sequence[Segment]) -> list[Extent]:
        return await self._run(self.backing.read_sparse, offset, segments)

    async def writev(self, offset: int, segments: Sequence[Segment], dsync: bool = False) -> None:
        await self._run(self.backing.writev, offset, segments, dsync)

    async def flush(self) -> None:
        await self._run(self.backing.flush)

    async def discard(self, offset: int, length: int, dsync: bool = False) -> None:
        def trim() -> None:
            self.backing.discard(offset, length)
            if dsync:
                self.backing.flush()

        await self._run(trim)

    async def write_zeroes(
        self, offset: int, length: int, *, may_trim: bool, fast_only: bool, dsync: bool = False
    ) -> None:
        def zero() -> None:
            self.backing.write_zeroes(offset, length, may_trim=may_trim, fast_only=fast_only)
            if dsync:
                self.backing.flush()

        await self._run(zero)

    async def extents(self, offset: int, length: int) -> list[Extent]:
        return await self._run(self.backing.extents, offset, length)

    async def cache(self, offset: int, length: int) -> None:
        await self._run(self.backing.cache, offset, length)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.backing.close()
