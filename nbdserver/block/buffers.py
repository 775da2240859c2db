"""Request buffers: page-aligned memory, reused, and a budget of bytes in flight.

O_DIRECT needs buffers aligned in memory, and a fresh 1 MiB buffer costs 256
page faults on first use.  The pool hands out page-aligned blocks in
power-of-two size classes and keeps freed ones for the next request, up to a
bound on idle memory.  A request's buffer is a slice of its block.
"""

from __future__ import annotations

import asyncio
import mmap
from collections.abc import Callable

from ..backing.file import address

PAGE_SIZE = mmap.PAGESIZE
MIN_BLOCK = 4096
DEFAULT_MAX_IDLE_BYTES = 64 * 1024 * 1024


def aligned_buffer(size: int) -> memoryview:
    """``size`` writable bytes starting on a page boundary."""
    raw = bytearray(size + PAGE_SIZE)
    start = -address(raw) % PAGE_SIZE
    return memoryview(raw)[start : start + size]


def block_size(length: int) -> int:
    """The size class that holds ``length`` bytes."""
    return max(MIN_BLOCK, 1 << (length - 1).bit_length())


class BufferPool:
    def __init__(self, max_idle_bytes: int = DEFAULT_MAX_IDLE_BYTES) -> None:
        self.max_idle_bytes = max_idle_bytes
        self.idle_bytes = 0
        self.created = 0  # blocks allocated because none was free
        self._free: dict[int, list[memoryview]] = {}

    def take(self, length: int) -> memoryview:
        """A block of at least ``length`` bytes (slice it to ``length``)."""
        size = block_size(length)
        free = self._free.get(size)
        if free:
            self.idle_bytes -= size
            return free.pop()
        self.created += 1
        return aligned_buffer(size)

    def give(self, block: memoryview) -> None:
        """Return a block nobody uses any more; beyond the idle bound it is freed."""
        size = len(block)
        if self.idle_bytes + size > self.max_idle_bytes:
            return
        self.idle_bytes += size
        self._free.setdefault(size, []).append(block)


class ByteBudget:
    """Bytes in flight across connections: over the limit, readers pause until it frees.

    Wake-ups are deferred to the next loop tick so that a connection resuming
    (and submitting what it had staged) never runs inside another one's completion.
    """

    def __init__(self, limit: int, parent: ByteBudget | None = None) -> None:
        self.limit = limit
        self.used = 0
        self.parent = parent  # a wider budget (the server's) charged with the same bytes
        self._waiters: set[Callable[[], None]] = set()

    @property
    def exhausted(self) -> bool:
        return self.used > self.limit or (self.parent is not None and self.parent.exhausted)

    def charge(self, nbytes: int) -> None:
        self.used += nbytes
        if self.parent is not None:
            self.parent.charge(nbytes)

    def release(self, nbytes: int) -> None:
        self.used -= nbytes
        if self.parent is not None:
            self.parent.release(nbytes)
        if self._waiters and self.used <= self.limit:
            waiters, self._waiters = self._waiters, set()
            loop = asyncio.get_running_loop()
            for wake in waiters:
                loop.call_soon(wake)

    def wait(self, wake: Callable[[], None]) -> None:
        """Call ``wake`` once the budget is no longer exhausted (it may then wait again, on the parent)."""
        if self.used <= self.limit and self.parent is not None:
            self.parent.wait(wake)
        else:
            self._waiters.add(wake)
