"""Request buffers: page-aligned memory, reused, and a budget of bytes in flight.

O_DIRECT needs buffers aligned in memory, and a fresh 1 MiB buffer costs 256
page faults on first use.  The pool hands out page-aligned blocks in
power-of-two size classes and keeps freed ones for the next request, up to a
bound on idle memory.  A request's buffer is a slice of its block.

A worker process's pool carves its blocks from an ``Arena``: memory its primary shares and keeps
when the worker dies, so that a replacement can read the payloads of the requests the worker had
taken, and the data of the replies it had not sent (serving/journal.py).
"""

from __future__ import annotations

import asyncio
import mmap
import os
from collections.abc import Callable
from typing import Final

from ..backing.file import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, address, fallocate

PAGE_SIZE = mmap.PAGESIZE
MIN_BLOCK: Final = 4096
DEFAULT_MAX_IDLE_BYTES = 64 * 1024 * 1024
ARENA_SIZE = 64 << 30  # address space only: the memory is a sparse file, and pages are used as touched


def aligned_buffer(size: int) -> memoryview:
    """``size`` writable bytes starting on a page boundary."""
    raw = bytearray(size + PAGE_SIZE)
    start = -address(raw) % PAGE_SIZE
    return memoryview(raw)[start : start + size]


def block_size(length: int) -> int:
    """The size class that holds ``length`` bytes."""
    if length <= MIN_BLOCK:  # most requests
        return MIN_BLOCK
    return 1 << (length - 1).bit_length()


def arena_memory(size: int = ARENA_SIZE) -> int:
    """A sparse memory file for an arena: the primary makes it and passes it to a worker."""
    fd = os.memfd_create("nbd-arena", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
    except BaseException:
        os.close(fd)
        raise
    return fd


class Arena:
    """A memory file mapped whole, carved into page-aligned blocks that are never moved: a block's
    offset names it to any process that maps the same file."""

    def __init__(self, fd: int, size: int = ARENA_SIZE) -> None:
        self.fd = fd
        self.size = size
        self.memory = mmap.mmap(fd, size)
        self.view = memoryview(self.memory)
        self._base = address(self.view)
        self._next = 0
        self._offsets: dict[int, int] = {}  # id(block) -> its offset, for every block carved here

    def carve(self, size: int) -> memoryview | None:
        """A new block of ``size`` bytes (a multiple of the page size); None once the arena is used up."""
        offset = self._next
        if offset + size > self.size:
            return None
        self._next = offset + size
        block = self.view[offset : offset + size]
        self._offsets[id(block)] = offset
        return block

    def offset_of(self, block: memoryview) -> int:
        """The offset of a block carved here; -1 for any other buffer."""
        return self._offsets.get(id(block), -1)

    def offset_within(self, view: memoryview) -> int:
        """The offset of any slice of the arena (slower: its address is asked); -1 outside it."""
        offset = address(view) - self._base
        return offset if 0 <= offset and offset + len(view) <= self.size else -1

    def release(self, block: memoryview) -> None:
        """Give a block's memory back to the system (its address stays the arena's, to carve again)."""
        offset = self.offset_of(block)
        if offset >= 0:
            fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, len(block))


class BufferPool:
    def __init__(self, max_idle_bytes: int = DEFAULT_MAX_IDLE_BYTES, arena: Arena | None = None) -> None:
        self.max_idle_bytes = max_idle_bytes
        self.idle_bytes = 0
        self.created = 0  # blocks allocated because none was free
        self.arena = arena  # where blocks are carved; None: private memory
        self._free: dict[int, list[memoryview]] = {}
        self._released: dict[int, list[memoryview]] = {}  # the arena's blocks whose memory was given back

    def take(self, length: int) -> memoryview:
        """A block of at least ``length`` bytes (slice it to ``length``)."""
        size = block_size(length)
        free = self._free.get(size)
        if free:
            self.idle_bytes -= size
            return free.pop()
        released = self._released.get(size)
        if released:
            return released.pop()
        self.created += 1
        if self.arena is not None:
            block = self.arena.carve(size)
            if block is not None:
                return block
        return aligned_buffer(size)

    def give(self, block: memoryview) -> None:
        """Return a block nobody uses any more; beyond the idle bound it is freed."""
        size = len(block)
        if self.idle_bytes + size > self.max_idle_bytes:
            arena = self.arena
            if arena is not None and arena.offset_of(block) >= 0:
                arena.release(block)
                self._released.setdefault(size, []).append(block)
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
