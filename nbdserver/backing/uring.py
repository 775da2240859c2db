"""An io_uring engine: reads, writes and flushes go through one kernel ring.

The ring is driven directly with three system calls (``io_uring_setup``,
``io_uring_enter``, ``io_uring_register``) and its shared memory, through
``ctypes`` and ``mmap``: no third-party binding.  Submission entries queued
during one event-loop tick are submitted with one ``io_uring_enter``;
completions wake the loop through a registered eventfd.  Operations without a
ring opcode worth using here (hole punching, zeroing, SEEK_DATA, fadvise) run on
a small :class:`ThreadPoolEngine`.

The ring is shared memory read and written from Python without explicit
barriers, which is sound only under x86-64's ordering (loads are not reordered
with loads, nor stores with stores); other machines get a clear error.

Submitted I/O is never cancelled: every buffer it uses stays referenced until
its completion arrives, even if the waiting task has gone.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import logging
import mmap
import os
import platform
import struct
from collections import deque
from collections.abc import Sequence
from functools import partial
from typing import Any

from .engine import Done, InPlace, ThreadPoolEngine, resolve
from .file import Backing, Extent, Segment, _advance, _batches, address

_SYS_SETUP, _SYS_ENTER, _SYS_REGISTER = 425, 426, 427
_OFF_SQ_RING, _OFF_SQES = 0, 0x10000000
_FEAT_SINGLE_MMAP, _FEAT_NODROP = 1, 2
_ENTER_GETEVENTS = 1
_SQ_CQ_OVERFLOW, _SQ_TASKRUN = 2, 4
POLL_INTERVAL = 0.5  # while operations are out, look for held-back completions this often
_REGISTER_EVENTFD = 4
_OP_NOP, _OP_READV, _OP_WRITEV, _OP_FSYNC, _OP_READ, _OP_WRITE = 0, 1, 2, 3, 22, 23
_FSYNC_DATASYNC = 1

_PARAMS = struct.Struct("=10I 8IQ 8IQ")  # struct io_uring_params
_SQE = struct.Struct("=BBHiQQIIQHHiQQ")  # struct io_uring_sqe, 64 bytes
_CQE = struct.Struct("=QiI")  # struct io_uring_cqe, 16 bytes
_U32 = struct.Struct("=I")

DEFAULT_ENTRIES = 256
HELPER_WORKERS = 4
COLD_READ_SKIP_MAX = 64  # reads sent straight to the ring after in-place attempts kept missing

log = logging.getLogger(__name__)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _syscall(number: int, *args: object) -> int:
    result = _libc.syscall(number, *args)
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, f"io_uring: {os.strerror(code)}")
    return result


class _Ring:
    """The kernel's submission and completion queues, mapped into this process."""

    def __init__(self, entries: int) -> None:
        params = bytearray(_PARAMS.size)
        self.fd = _syscall(_SYS_SETUP, entries, (ctypes.c_char * len(params)).from_buffer(params))
        fields = _PARAMS.unpack(params)
        self.sq_entries, self.cq_entries, features = fields[0], fields[1], fields[5]
        sq_head, sq_tail, sq_mask, _, sq_flags, _, sq_array = fields[10:17]
        cq_head, cq_tail, cq_mask, _, _, cqes = fields[19:25]
        if not features & _FEAT_SINGLE_MMAP or not features & _FEAT_NODROP:
            os.close(self.fd)
            raise OSError(errno.ENOSYS, "io_uring: this kernel is too old (needs 5.5 or later)")
        size = max(sq_array + 4 * self.sq_entries, cqes + _CQE.size * self.cq_entries)
        self.ring = mmap.mmap(self.fd, size, offset=_OFF_SQ_RING)
        self.sqes = mmap.mmap(self.fd, _SQE.size * self.sq_entries, offset=_OFF_SQES)
        self.sq_head, self.sq_tail, self.cq_head, self.cq_tail, self.cqes = sq_head, sq_tail, cq_head, cq_tail, cqes
        self.sq_flags = sq_flags
        self.sq_mask = _U32.unpack_from(self.ring, sq_mask)[0]
        self.cq_mask = _U32.unpack_from(self.ring, cq_mask)[0]
        for i in range(self.sq_entries):  # entry i always sits in slot i: the array never changes again
            _U32.pack_into(self.ring, sq_array + 4 * i, i)
        self.tail = _U32.unpack_from(self.ring, sq_tail)[0]
        self.queued = 0  # entries written since the last enter

    def push(self, opcode: int, fd: int, offset: int, address: int, length: int, flags: int, user_data: int) -> None:
        slot = self.tail & self.sq_mask
        _SQE.pack_into(
            self.sqes, slot * _SQE.size, opcode, 0, 0, fd, offset, address, length, flags, user_data, 0, 0, 0, 0, 0
        )
        self.tail = (self.tail + 1) & 0xFFFFFFFF
        _U32.pack_into(self.ring, self.sq_tail, self.tail)  # after the entry: x86 keeps store order
        self.queued += 1

    def enter(self, wait: int = 0, get_events: bool = False) -> None:
        """Submit what was pushed; with ``wait``, also wait for that many completions."""
        submit, self.queued = self.queued, 0
        flags = _ENTER_GETEVENTS if wait or get_events else 0
        while True:
            try:
                _syscall(_SYS_ENTER, self.fd, submit, wait, flags, None, 0)
                return
            except InterruptedError:
                continue

    @property
    def held_back(self) -> bool:
        """Has the kernel completions it posts only when asked (overflow, or work to run in this task)?"""
        return bool(_U32.unpack_from(self.ring, self.sq_flags)[0] & (_SQ_CQ_OVERFLOW | _SQ_TASKRUN))

    def completions(self) -> list[tuple[int, int]]:
        """Take every (user_data, result) the kernel has posted."""
        ring, head = self.ring, _U32.unpack_from(self.ring, self.cq_head)[0]
        tail = _U32.unpack_from(ring, self.cq_tail)[0]
        done = []
        while head != tail:
            user_data, result, _ = _CQE.unpack_from(ring, self.cqes + (head & self.cq_mask) * _CQE.size)
            done.append((user_data, result))
            head = (head + 1) & 0xFFFFFFFF
        _U32.pack_into(ring, self.cq_head, head)  # after reading the entries: the kernel may reuse them
        return done

    def close(self) -> None:
        self.sqes.close()
        self.ring.close()
        os.close(self.fd)


class _Transfer:
    """One read or write of a list of buffers, continued after short transfers."""

    __slots__ = ("done", "dsync", "fd", "iovecs", "offset", "views", "write")

    def __init__(self, done: Done, write: bool, fd: int, offset: int, views: list[memoryview], dsync: bool):
        self.done, self.write, self.fd, self.offset, self.views, self.dsync = done, write, fd, offset, views, dsync
        self.iovecs: bytes | None = None  # the iovec array the kernel reads, kept alive with the op


class UringEngine(InPlace):
    """Reads, writes and flushes through io_uring; the rest on a few threads."""

    name = "uring"

    def __init__(self, backing: Backing, entries: int = DEFAULT_ENTRIES, helper_workers: int = HELPER_WORKERS) -> None:
        if platform.machine() != "x86_64":
            raise OSError(errno.ENOSYS, "the io_uring engine runs on x86-64 only")
        self.backing = backing
        # The ring tries the page cache itself before it waits, so a read that keeps missing
        # (cold data) need not be tried in place first; hits start the in-place attempts again.
        backing.cache_reads.limit = COLD_READ_SKIP_MAX
        self._ring = _Ring(entries)
        self._event_fd = -1
        self._helpers: ThreadPoolEngine | None = None
        try:
            self._event_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            efd = ctypes.c_int(self._event_fd)
            _syscall(_SYS_REGISTER, self._ring.fd, _REGISTER_EVENTFD, ctypes.byref(efd), 1)
            self._self_test()
            self._helpers = ThreadPoolEngine(backing, helper_workers)
        except BaseException:
            self._close_ring()
            raise
        self._ops: dict[int, _Transfer | Done] = {}  # user_data -> what completes it, until it does
        self._next_id = 1
        self._backlog: deque[tuple[int, ...]] = deque()  # entries waiting for room in the ring
        self._loop: asyncio.AbstractEventLoop | None = None
        self._enter_scheduled = False
        self._poll: asyncio.TimerHandle | None = None

    def _self_test(self) -> None:
        """A NOP and a read of the first block, synchronously: io_uring may be disabled or filtered."""
        page = mmap.mmap(-1, mmap.PAGESIZE)
        probe = memoryview(page)
        ring = self._ring
        ring.push(_OP_NOP, -1, 0, 0, 0, 0, 1)
        ring.push(_OP_READ, self.backing.descriptor(0, [probe]), 0, address(probe), len(probe), 0, 2)
        ring.enter(wait=2)
        results = dict(ring.completions())
        # Released only now that the kernel is done with it: compiled code drops a local after
        # its last use, which would unmap the page under the read.
        probe.release()
        page.close()
        if results.get(1) != 0 or results.get(2, -1) < 0:
            code = -results.get(2, -errno.EIO) if results.get(1) == 0 else -results.get(1, -errno.EIO)
            raise OSError(code, f"io_uring self-test failed: {os.strerror(code)}")
        _clear(self._event_fd)

    # Submission ------------------------------------------------------------------------

    def _start(
        self, key: _Transfer | Done, opcode: int, fd: int, offset: int, address: int, length: int, flags: int
    ) -> None:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._loop.add_reader(self._event_fd, self._reap)
        user_data = self._next_id
        self._next_id += 1
        if self._poll is None:
            self._poll = self._loop.call_later(POLL_INTERVAL, self._watch)
        self._ops[user_data] = key
        entry = (opcode, fd, offset, address, length, flags, user_data)
        if len(self._ops) - len(self._backlog) > self._ring.sq_entries:  # keep completions within the CQ ring
            self._backlog.append(entry)
            return
        self._ring.push(*entry)
        if not self._enter_scheduled:
            self._enter_scheduled = True
            self._loop.call_soon(self._enter)

    def _watch(self) -> None:
        """A safety net under the eventfd: reap now and then while anything is out."""
        self._poll = None
        self._reap()
        if self._ops and self._loop is not None:
            self._poll = self._loop.call_later(POLL_INTERVAL, self._watch)

    def _enter(self) -> None:
        self._enter_scheduled = False
        if self._ring.queued:
            self._ring.enter()

    def _submit_transfer(self, transfer: _Transfer) -> None:
        views = transfer.views
        flags = os.RWF_DSYNC if transfer.dsync else 0
        if len(views) == 1:
            (view,) = views
            opcode = _OP_WRITE if transfer.write else _OP_READ
            self._start(transfer, opcode, transfer.fd, transfer.offset, address(view), len(view), flags)
            return
        iovecs: list[int] = []
        for view in views:
            iovecs += (address(view), len(view))
        transfer.iovecs = packed = struct.pack(f"={len(iovecs)}Q", *iovecs)
        iovecs_at = ctypes.cast(ctypes.c_char_p(packed), ctypes.c_void_p).value or 0
        opcode = _OP_WRITEV if transfer.write else _OP_READV
        self._start(transfer, opcode, transfer.fd, transfer.offset, iovecs_at, len(views), flags)

    # Completion ------------------------------------------------------------------------

    def _reap(self) -> None:
        _clear(self._event_fd)  # before taking completions, so that a later one wakes us again
        ring = self._ring
        if ring.held_back:
            ring.enter(get_events=True)  # have the kernel post them
        for user_data, result in ring.completions():
            key = self._ops.pop(user_data)
            try:
                if isinstance(key, _Transfer):
                    self._transfer_done(key, result)
                else:
                    _settle(key, result)
            except Exception:  # one caller's bug must not cost the completions after it
                log.exception("completion %r failed", key)
        while self._backlog and len(self._ops) - len(self._backlog) < ring.sq_entries:
            ring.push(*self._backlog.popleft())
        if ring.queued:
            ring.enter()

    def _transfer_done(self, transfer: _Transfer, result: int) -> None:
        try:
            result = self._continue(transfer, result)
        except Exception as exc:  # the rest of a transfer could not be submitted
            transfer.done(None, exc)
            return
        if result <= 0:
            _settle(transfer.done, result)

    def _continue(self, transfer: _Transfer, result: int) -> int:
        """Submit what is left of a transfer after ``result``: 1 if something was, else the final result."""
        if result == 0 and transfer.write:
            return -errno.EIO  # no progress: never retry forever
        if result < 0:
            if result == -errno.EINVAL and transfer.fd == self.backing.direct_fd:
                transfer.fd = self.backing.fd  # an alignment O_DIRECT refused: the page cache takes it
                self._submit_transfer(transfer)
                return 1
            return result
        if result == 0:  # a read at the end of the file: the file shrank under us
            for view in transfer.views:
                view[:] = bytes(len(view))
            return 0
        transfer.views = _advance(transfer.views, result)
        if not transfer.views:
            return 0
        transfer.offset += result
        transfer.fd = self.backing.fd  # the rest of a short transfer is no longer aligned
        self._submit_transfer(transfer)
        return 1

    # The engine interface ------------------------------------------------------------------

    def _start_transfers(self, write: bool, offset: int, segments: Sequence[Segment], dsync: bool, done: Done) -> None:
        """One transfer per batch of at most IOV_MAX segments; ``done`` once all have ended."""
        transfers = []
        for batch_offset, batch in _batches(offset, segments):
            views = [memoryview(s).cast("B") for s in batch if len(s)]
            if views:
                fd = self.backing.descriptor(batch_offset, views)
                transfers.append(_Transfer(done, write, fd, batch_offset, views, dsync))
        if not transfers:
            (self._loop or asyncio.get_running_loop()).call_soon(done, None, None)
            return
        if len(transfers) > 1:
            joined = _Joined(done, len(transfers))
            for transfer in transfers:
                transfer.done = joined
        for transfer in transfers:
            self._submit_transfer(transfer)

    def start_readv(self, offset: int, segments: Sequence[Segment], done: Done) -> None:
        self._start_transfers(False, offset, segments, False, done)

    def start_writev(self, offset: int, segments: Sequence[Segment], dsync: bool, done: Done) -> None:
        self._start_transfers(True, offset, segments, dsync, done)

    async def flush(self) -> None:
        future = asyncio.get_running_loop().create_future()
        self._start(partial(resolve, future), _OP_FSYNC, self.backing.fd, 0, 0, 0, _FSYNC_DATASYNC)
        await future

    async def discard(self, offset: int, length: int, dsync: bool = False) -> None:
        assert self._helpers is not None
        await self._helpers.discard(offset, length, dsync)

    async def write_zeroes(
        self, offset: int, length: int, *, may_trim: bool, fast_only: bool, dsync: bool = False
    ) -> None:
        assert self._helpers is not None
        await self._helpers.write_zeroes(offset, length, may_trim=may_trim, fast_only=fast_only, dsync=dsync)

    async def extents(self, offset: int, length: int) -> list[Extent]:
        assert self._helpers is not None
        return await self._helpers.extents(offset, length)

    async def cache(self, offset: int, length: int) -> None:
        assert self._helpers is not None
        await self._helpers.cache(offset, length)

    def _close_ring(self) -> None:
        if self._event_fd >= 0:
            os.close(self._event_fd)
            self._event_fd = -1
        self._ring.close()

    def close(self) -> None:
        """Release the ring; every operation must have completed (the block layer drains first)."""
        while self._ops:  # should not happen; never free buffers the kernel may still write
            self._ring.enter(wait=1)
            self._reap()
        if self._loop is not None:
            loop: Any = self._loop  # uvloop returns None here, not the bool compiled code would check
            loop.remove_reader(self._event_fd)
        if self._poll is not None:
            self._poll.cancel()
        self._close_ring()
        assert self._helpers is not None
        self._helpers.close()  # closes the backing


def _settle(done: Done, result: int) -> None:
    """Complete an operation with the result the kernel posted for it."""
    if result < 0:
        done(None, OSError(-result, os.strerror(-result)))
    else:
        done(result, None)


class _Joined:
    """A :data:`Done` for several transfers: calls ``done`` once, after the last (with the first error)."""

    __slots__ = ("done", "error", "left")

    def __init__(self, done: Done, count: int) -> None:
        self.done, self.left = done, count
        self.error: BaseException | None = None

    def __call__(self, result: object, exc: BaseException | None) -> None:
        self.left -= 1
        self.error = self.error or exc
        if not self.left:
            self.done(None, self.error)


def _clear(event_fd: int) -> None:
    try:
        os.eventfd_read(event_fd)
    except BlockingIOError:
        pass
