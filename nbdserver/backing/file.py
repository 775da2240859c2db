"""The backing store of an export: a regular file or a block device.

Every method here is blocking and meant to run in an engine's worker thread, but
for ``read_now`` and ``write_now``, which do a transfer on the caller's thread
only when it should need no waiting.  Nothing here knows about NBD; errors are
plain ``OSError``s.

With ``direct=True`` (cache mode "direct") data goes through a second
descriptor opened with ``O_DIRECT``, bypassing the page cache, whenever the
transfer meets the alignment rules of the file (``statx`` tells them).  A
transfer that does not (a client's 512-byte write on a 4096-byte device, the
unaligned tail of a file) goes through the page cache instead, which does the
read-modify-write with the kernel's own locking; the kernel keeps the two
paths coherent per page, and the block layer orders requests that share a
page (see :mod:`nbdserver.block.hazards`).  Segments given to a direct backing
must start on a page boundary (they come from :mod:`nbdserver.block.buffers`).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import mmap
import os
import stat
import struct
from collections.abc import Sequence
from pathlib import Path
from time import monotonic
from typing import Final

log = logging.getLogger(__name__)

Segment = bytearray | memoryview
# (length, is_hole); holes read as zeroes.
Extent = tuple[int, bool]

IOV_MAX: Final = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024
MAX_EXTENTS = 1 << 16  # per query; callers ask again for the rest

# <linux/falloc.h>
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
# <linux/fs.h>
BLKSSZGET = 0x1268
BLKDISCARD = 0x1277
BLKZEROOUT = 0x127F
BLKGETSIZE64 = 0x80081272
# <linux/stat.h>
AT_EMPTY_PATH = 0x1000
STATX_DIOALIGN = 0x2000
_STATX_SIZE = 256
_STATFS_SIZE = 256  # struct statfs is 120 bytes on 64-bit Linux; room to spare
_STATX_DIO_OFFSETS = 152  # stx_dio_mem_align, stx_dio_offset_align: two u32
DEFAULT_DIRECT_ALIGN = 4096  # where statx cannot tell: safe for every device
# <linux/magic.h>: filesystems whose files live in memory
MEMORY_FILESYSTEMS = frozenset({0x01021994, 0x858458F6})  # TMPFS_MAGIC, RAMFS_MAGIC
# The longest transfer done on the event loop's thread when it needs no waiting: up to a whole
# merged submission (1 MiB by default), a copy to or from memory that costs less than handing
# it to the engine and back.  Longer ones go to the engine, where they do not hold up other
# connections; so do writes for a while after one the kernel made wait (``slow_write``).
INLINE_MAX: Final = 1024 * 1024
SLOW_WRITE = 0.002  # seconds: a buffered write this slow had to wait for the kernel
# After a slow one, writes (or flushes) go to workers for INLINE_BACKOFF seconds, or for
# BACKOFF_FACTOR times as long as it took: work that keeps being slow in place (a flush that
# writes back what another process dirtied, say) holds up the loop at most 1/51 of the time.
INLINE_BACKOFF = 1.0
BACKOFF_FACTOR = 50
# A flush is done on the event loop's thread too when at most this much was written since the
# last one: then it is an fdatasync of a few hundred microseconds, and handing it to a worker and
# back would add a third to it.
INLINE_FLUSH_MAX = 4 * 1024 * 1024
HOLE_SKIP_MAX = 64  # page-cache misses that may skip the hole check after it kept finding data

# Zeroes for the zero-writing fallback, page-aligned (an anonymous mapping) so that O_DIRECT takes them.
_ZERO_CHUNK = memoryview(mmap.mmap(-1, 1024 * 1024))
ZERO_BLOCK = 4096  # granularity of zero detection in reads
_ZERO_SCAN_MIN: Final = 64 * 1024  # shorter buffers are reported whole: all zero or data
SPARSE_CHECK_MIN = 64 * 1024  # sparse reads this long first ask whether they fall in a hole
_ZERO_WORD = bytes(8)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
_libc.memcmp.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]


def address(buffer: Segment) -> int:
    """Where a writable buffer's bytes are; it must stay referenced while the address is used."""
    return ctypes.addressof(ctypes.c_char.from_buffer(buffer))


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def _unsupported(exc: OSError) -> bool:
    return exc.errno in (errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL)


class Backoff:
    """An attempt that may fail, skipped after failures: after each, a doubling number of calls
    (up to ``limit``; 0 never skips) skip it; a success starts over."""

    __slots__ = ("left", "limit", "skips")

    def __init__(self, limit: int) -> None:
        self.limit, self.skips, self.left = limit, 0, 0

    def skip(self) -> bool:
        if not self.left:
            return False
        self.left -= 1
        return True

    def failed(self) -> None:
        self.skips = self.left = min(2 * self.skips or 1, self.limit)

    def worked(self) -> None:
        self.skips = 0


class Backing:
    """An open backing file or block device and the blocking operations on it."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        read_only: bool = False,
        create_size: int | None = None,
        direct: bool = False,
    ) -> None:
        self.path = Path(path)
        self.read_only = read_only
        if create_size is not None and not self.path.exists():
            if read_only:
                raise FileNotFoundError(errno.ENOENT, "cannot create a read-only export", str(self.path))
            _create_sparse(self.path, create_size)
        open_flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        self.fd = os.open(self.path, open_flags)
        self.direct_fd = -1
        # O_DIRECT alignment of memory and of file offsets/lengths; 1 when not direct.
        self.mem_align = self.offset_align = 1
        try:
            st = os.fstat(self.fd)
            self.is_block_device = stat.S_ISBLK(st.st_mode)
            if not self.is_block_device and not stat.S_ISREG(st.st_mode):
                raise OSError(errno.EINVAL, "not a regular file or block device", str(self.path))
            if self.is_block_device:
                self.size = _ioctl_u64(self.fd, BLKGETSIZE64)
                self.logical_block_size = _ioctl_int(self.fd, BLKSSZGET)
            else:
                self.size = st.st_size
                self.logical_block_size = 1
            if direct:
                self._open_direct(open_flags)
        except BaseException:
            self.close()
            raise
        # Learned at run time: the first "not supported" turns a feature off for good.
        self._unsupported_modes: set[int] = set()
        self._can_seek_holes = not self.is_block_device
        self._can_read_nowait = not self.direct  # O_DIRECT reads wait for the device even with RWF_NOWAIT
        # tmpfs and ramfs: every transfer is a copy to or from memory and never waits for a device.
        self.in_memory = not self.is_block_device and _filesystem_type(self.fd) in MEMORY_FILESYSTEMS
        self.slow_write = SLOW_WRITE
        self._inline_writes_from = 0.0  # monotonic time before which write_now() declines
        self._inline_flushes_from = 0.0  # the same for flush_now()
        # read_now()'s attempts that keep failing are skipped for a while (see Backoff).
        self.hole_checks = Backoff(HOLE_SKIP_MAX)  # SEEK_DATA after a miss, where misses keep finding data
        self.cache_reads = Backoff(0)  # RWF_NOWAIT: never skipped unless an engine has better to do

    @property
    def direct(self) -> bool:
        return self.direct_fd >= 0

    def _open_direct(self, open_flags: int) -> None:
        unsupported = OSError(
            errno.EINVAL, "the filesystem does not support O_DIRECT (cache mode direct)", str(self.path)
        )
        try:
            self.direct_fd = os.open(self.path, open_flags | os.O_DIRECT)
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                raise unsupported from None
            raise
        alignment = _dio_alignment(self.direct_fd)
        if alignment is None:
            size = max(DEFAULT_DIRECT_ALIGN, self.logical_block_size)
            alignment = (size, size)
        elif alignment[1] == 0:
            raise unsupported
        # Direct transfers cover whole pages.  One that covers part of a page would collide with a
        # write of another part through the page cache in another process (a worker): the kernel
        # cannot drop the page after the direct write and reports EIO.  Through the page cache, the
        # kernel orders the two.
        self.mem_align, self.offset_align = alignment[0], max(alignment[1], mmap.PAGESIZE)

    def close(self) -> None:
        for name in ("fd", "direct_fd"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)

    def descriptor(self, offset: int, segments: Sequence[Segment]) -> int:
        """The direct descriptor if this transfer meets its alignment rules, else the buffered one."""
        if self.direct_fd < 0 or offset % self.offset_align:
            return self.fd
        mem_align, total = self.mem_align, 0
        for segment in segments:
            length = len(segment)
            if length % mem_align:
                return self.fd
            total += length
        return self.fd if total % self.offset_align else self.direct_fd

    # Data ------------------------------------------------------------------------

    def readv(self, offset: int, segments: Sequence[Segment]) -> None:
        """Fill ``segments`` from ``offset``; bytes past the end of the file read as zeroes."""
        for batch_offset, batch in _batches(offset, segments):
            fd = self.descriptor(batch_offset, batch)
            views = [memoryview(s).cast("B") for s in batch]
            while views:
                done = self._transfer(os.preadv, fd, views, batch_offset)
                if done == 0:  # end of file: the file shrank under us
                    for view in views:
                        view[:] = bytes(len(view))
                    break
                batch_offset += done
                views = _advance(views, done)
                fd = self.fd  # the rest of a short transfer is no longer aligned

    def read_now(self, offset: int, segments: Sequence[Segment]) -> bool:
        """Read only if it needs no waiting; False if it would wait (then use :meth:`readv`).

        Meant for the event loop's thread: a read that needs no waiting costs a
        copy there, where handing it to a worker costs two thread switches and
        the GIL.  A memory-backed file never waits; elsewhere the page cache
        must have it all (``RWF_NOWAIT``).
        """
        if len(segments) > IOV_MAX:
            return False
        if self.in_memory:
            length = segments_length(segments)
            if length > INLINE_MAX:
                return False
            # One preadv, as readv() would do it, without its bookkeeping; a short read (the end
            # of the file) is read again by readv(), which fills what lies past the end with zeroes.
            if os.preadv(self.fd, segments, offset) != length:
                self.readv(offset, segments)
            return True
        if not self._can_read_nowait or self.cache_reads.skip():
            return False
        views = [memoryview(s).cast("B") for s in segments]
        try:
            done = os.preadv(self.fd, views, offset, os.RWF_NOWAIT)
        except BlockingIOError:
            self.cache_reads.failed()
            return self._read_hole_now(offset, views)
        except OSError as exc:
            if not _unsupported(exc):
                raise
            self._can_read_nowait = False
            return False
        self.cache_reads.worked()
        return done == sum(len(v) for v in views)  # a short read (end of file) is left to readv

    def _read_hole_now(self, offset: int, views: list[memoryview]) -> bool:
        """Not in the page cache: if the range is a hole (one SEEK_DATA), it reads as zeroes.

        Where the checks keep finding data (cold reads of a written file), some are
        skipped: a hole missed that way is read by the engine, which costs a
        hand-off, not a wrong answer.
        """
        length = sum(len(v) for v in views)
        if length > INLINE_MAX or offset + length > self.size or self.hole_checks.skip():
            return False
        if not self.is_hole(offset, length):
            self.hole_checks.failed()
            return False
        self.hole_checks.worked()
        for view in views:
            view[:] = _ZERO_CHUNK[: len(view)]
        return True

    def write_now(self, offset: int, segments: Sequence[Segment], dsync: bool = False) -> bool:
        """Write at once if that should need no waiting; False to leave it to :meth:`writev`.

        A memory-backed file never waits.  A buffered write elsewhere is a copy
        into the page cache, microseconds, unless the kernel makes it wait
        (dirty-page throttling, the journal, a page under writeback).  No Linux
        filesystem here takes ``RWF_NOWAIT`` on buffered writes, so the wait is
        noticed after the fact: a write slower than ``slow_write`` seconds sends
        writes to the workers for a while (``INLINE_BACKOFF``).  Writes that must
        reach the device (FUA, O_DIRECT) always wait, so never come here.
        """
        length = segments_length(segments)
        if len(segments) > IOV_MAX or length > INLINE_MAX:
            return False
        if self.in_memory:  # one pwritev; should it write less, writev() writes it all again
            if os.pwritev(self.fd, segments, offset, os.RWF_DSYNC if dsync else 0) != length:
                self.writev(offset, segments, dsync)
            return True
        if dsync or self.direct:
            return False
        started = monotonic()
        if started < self._inline_writes_from:
            return False
        self.writev(offset, segments)
        self._inline_writes_from = self._in_place_again(started, "write")
        return True

    def _in_place_again(self, started: float, what: str) -> float:
        """After a ``what`` done in place since ``started``: from when on such work may be done in
        place again: at once, unless it took longer than ``slow_write``."""
        took = monotonic() - started
        if took <= self.slow_write:
            return 0.0
        backoff = max(INLINE_BACKOFF, BACKOFF_FACTOR * took)
        log.debug("%s: a %s took %.1f ms; the next %.1f s go to the engine", self.path, what, took * 1000, backoff)
        return started + took + backoff

    def is_hole(self, offset: int, length: int) -> bool:
        """Is [offset, offset+length) unallocated?  False where the filesystem cannot tell."""
        if not self._can_seek_holes:
            return False
        end = offset + length
        try:
            return _seek(self.fd, offset, os.SEEK_DATA, end) >= end
        except OSError as exc:
            if not _unsupported(exc):
                raise
            self._can_seek_holes = False
            return False

    def writev(self, offset: int, segments: Sequence[Segment], dsync: bool = False) -> None:
        """Write all of ``segments`` at ``offset``; with ``dsync`` durable before returning."""
        flags = os.RWF_DSYNC if dsync else 0
        for batch_offset, batch in _batches(offset, segments):
            fd = self.descriptor(batch_offset, batch)
            views = [memoryview(s).cast("B") for s in batch]
            while views:
                done = self._transfer(os.pwritev, fd, views, batch_offset, flags)
                batch_offset += done
                views = _advance(views, done)
                fd = self.fd  # the rest of a short transfer is no longer aligned

    def _transfer(self, call, fd: int, views: list[memoryview], offset: int, *flags: int) -> int:
        """One preadv/pwritev; an alignment the direct descriptor refuses is retried through the page cache."""
        try:
            return call(fd, views, offset, *flags)
        except OSError as exc:
            if exc.errno != errno.EINVAL or fd != self.direct_fd:
                raise
            log.debug("%s: O_DIRECT refused a transfer at %d; using the page cache", self.path, offset)
            return call(self.fd, views, offset, *flags)

    def flush(self) -> None:
        os.fdatasync(self.fd)

    def flush_now(self, unflushed: int) -> bool:
        """Flush at once if that should need little waiting; False to leave it to :meth:`flush`.
        ``unflushed``: the bytes written (by every process, see block/ledger.py) since the
        start of the last flush that is done.

        A memory-backed file has nothing to write back: its flush is done as it is
        asked, where handing it to a worker would cost two thread switches.  Elsewhere
        a flush after at most ``INLINE_FLUSH_MAX`` bytes is done here too.  One
        slower than ``slow_write`` (a slow device, a busy journal, another program
        writing the file) sends flushes to the workers for a while, as for writes.
        """
        if self.in_memory:
            return True
        started = monotonic()
        if unflushed > INLINE_FLUSH_MAX or started < self._inline_flushes_from:
            return False
        self.flush()
        self._inline_flushes_from = self._in_place_again(started, "flush")
        return True

    # Allocation ------------------------------------------------------------------

    def discard(self, offset: int, length: int) -> None:
        """Deallocate a range if the store can; a no-op where it cannot (TRIM is advisory)."""
        if self.is_block_device:
            start, end = _align_inward(offset, length, self.logical_block_size)
            if end > start:
                try:
                    fcntl.ioctl(self.fd, BLKDISCARD, struct.pack("=QQ", start, end - start))
                except OSError as exc:
                    if not _unsupported(exc):
                        raise
            return
        self._try_fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)

    def write_zeroes(self, offset: int, length: int, *, may_trim: bool, fast_only: bool) -> None:
        """Make a range read as zeroes.

        ``may_trim`` allows deallocating it; ``fast_only`` refuses with ENOTSUP
        instead of falling back to writing zeroes.
        """
        if self.is_block_device:
            if fast_only:
                raise OSError(errno.ENOTSUP, "no fast zeroing on block devices")
            fcntl.ioctl(self.fd, BLKZEROOUT, struct.pack("=QQ", offset, length))
            return
        if may_trim and self._try_fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length):
            return
        if self._try_fallocate(FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length):
            return
        if fast_only:
            raise OSError(errno.ENOTSUP, "zeroing this range would not be faster than writing")
        end = offset + length
        while offset < end:
            chunk = min(len(_ZERO_CHUNK), end - offset)
            self.writev(offset, [_ZERO_CHUNK[:chunk]])
            offset += chunk

    def _try_fallocate(self, mode: int, offset: int, length: int) -> bool:
        """fallocate(2) with ``mode``; False where the filesystem does not support it."""
        if mode in self._unsupported_modes:
            return False
        try:
            fallocate(self.fd, mode, offset, length)
        except OSError as exc:
            if not _unsupported(exc):
                raise
            self._unsupported_modes.add(mode)
            return False
        return True

    def extents(self, offset: int, length: int) -> list[Extent]:
        """Data and hole extents covering [offset, offset+length), possibly fewer."""
        end = offset + length
        if not self._can_seek_holes or length == 0:
            return [(length, False)]
        out: list[Extent] = []
        pos = offset
        try:
            while pos < end and len(out) < MAX_EXTENTS:
                data = _seek(self.fd, pos, os.SEEK_DATA, end)
                if data > pos:
                    out.append((min(data, end) - pos, True))
                    pos = min(data, end)
                    continue
                hole = _seek(self.fd, pos, os.SEEK_HOLE, end)
                if hole <= pos:
                    # Punched between the two seeks: calling the rest data is always safe.
                    out.append((end - pos, False))
                    break
                out.append((min(hole, end) - pos, False))
                pos = min(hole, end)
        except OSError as exc:
            if not _unsupported(exc):
                raise
            self._can_seek_holes = False
            return [(length, False)]
        return out

    def cache(self, offset: int, length: int) -> None:
        if not self.direct:  # direct reads would not use the page cache
            os.posix_fadvise(self.fd, offset, length, os.POSIX_FADV_WILLNEED)


def segments_length(segments: Sequence[Segment]) -> int:
    """Bytes in ``segments``.  (A loop: compiled, ``sum(map(len, segments))`` costs some 90 ns
    more, per request.)"""
    length = 0
    for segment in segments:
        length += len(segment)
    return length


def segments_extents(segments: Sequence[Segment]) -> list[Extent]:
    """The data and all-zero extents of a list of buffers read one after the other."""
    if len(segments) == 1:  # most reads: the one segment's extents as they are
        return zero_extents(segments[0])
    extents: list[Extent] = []
    for segment in segments:
        for length, zero in zero_extents(segment):
            _append_extent(extents, length, zero)
    return extents


def zero_extents(data: Segment) -> list[Extent]:
    """Split a buffer into runs of data and of all-zero ``ZERO_BLOCK``-sized blocks."""
    if isinstance(data, memoryview) and data.itemsize == 1:  # a block's slice: data at an end says it all
        length = len(data)
        if 0 < length < _ZERO_SCAN_MIN and (data[0] or data[-1]):
            return [(length, False)]
    view = memoryview(data).cast("B")
    length = len(view)
    if _all_zero(view):
        return [(length, True)]
    if length < _ZERO_SCAN_MIN or _ZERO_WORD not in view[: length & ~7].cast("Q")[:: ZERO_BLOCK // 8].tobytes():
        return [(length, False)]  # short, or no block starts with eight zero bytes
    extents: list[Extent] = []
    for start in range(0, length, ZERO_BLOCK):
        block = view[start : start + ZERO_BLOCK]
        _append_extent(extents, len(block), not block[0] and _all_zero(block))
    return extents


def _all_zero(view: memoryview) -> bool:
    """Every byte zero?  One memcmp of the buffer against itself shifted by one byte, with the
    GIL released; on data it stops at the first difference, so data costs next to nothing."""
    if not view:
        return True
    if view[0] or view[-1]:  # data nearly always shows at one end: no call into C for it
        return False
    if view.readonly:  # no address to take: compare a copy
        return view.tobytes() == bytes(len(view))
    start = address(view)
    return _libc.memcmp(start, start + 1, len(view) - 1) == 0


def _append_extent(extents: list[Extent], length: int, hole: bool) -> None:
    """Add an extent, growing the last one when it is of the same kind."""
    if extents and extents[-1][1] == hole:
        extents[-1] = (extents[-1][0] + length, hole)
    else:
        extents.append((length, hole))


def fsync_directory(path: Path) -> None:
    """Make the names in a directory durable (a file created, linked or renamed there)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _create_sparse(path: Path, size: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)
    log.info("created sparse image %s of %d bytes", path, size)


def _seek(fd: int, pos: int, whence: int, end: int) -> int:
    try:
        return os.lseek(fd, pos, whence)
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # past the last data (SEEK_DATA) or the end of file
            return end
        raise


_libc.statx.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint, ctypes.c_void_p]


def _dio_alignment(fd: int) -> tuple[int, int] | None:
    """(memory, offset) alignment of O_DIRECT on ``fd`` from statx; None where the kernel cannot tell."""
    buf = ctypes.create_string_buffer(_STATX_SIZE)
    if _libc.statx(fd, b"", AT_EMPTY_PATH, STATX_DIOALIGN, buf) != 0:
        return None
    mask = struct.unpack_from("=I", buf, 0)[0]
    if not mask & STATX_DIOALIGN:
        return None
    return struct.unpack_from("=II", buf, _STATX_DIO_OFFSETS)


_libc.fstatfs.argtypes = [ctypes.c_int, ctypes.c_void_p]


def _filesystem_type(fd: int) -> int:
    """``f_type`` of fstatfs(2), the first word of ``struct statfs``; 0 where it fails."""
    buf = ctypes.create_string_buffer(_STATFS_SIZE)
    if _libc.fstatfs(fd, buf) != 0:
        return 0
    return ctypes.c_long.from_buffer(buf).value


def _ioctl_u64(fd: int, request: int) -> int:
    return struct.unpack("=Q", fcntl.ioctl(fd, request, bytes(8)))[0]


def _ioctl_int(fd: int, request: int) -> int:
    return struct.unpack("=i", fcntl.ioctl(fd, request, bytes(4)))[0]


def _align_inward(offset: int, length: int, block: int) -> tuple[int, int]:
    start = -(-offset // block) * block
    end = (offset + length) // block * block
    return start, end


def _batches(offset: int, segments: Sequence[Segment]):
    """Split a segment list at IOV_MAX entries, with the file offset of each batch."""
    if len(segments) <= IOV_MAX:
        yield offset, segments
        return
    for i in range(0, len(segments), IOV_MAX):
        batch = segments[i : i + IOV_MAX]
        yield offset, batch
        offset += sum(len(memoryview(s).cast("B")) for s in batch)


def _advance(views: list[memoryview], done: int) -> list[memoryview]:
    """Drop the first ``done`` bytes from a list of views (after a short transfer)."""
    while views and done >= len(views[0]):
        done -= len(views[0])
        views = views[1:]
    if views and done:
        views = [views[0][done:], *views[1:]]
    return views
