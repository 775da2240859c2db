"""Dirty bitmaps: which granules of an export were written since a bitmap was made or cleared.

Each bitmap is a file in the state directory, mapped MAP_SHARED by every process serving its
export, so that a mark one worker makes is seen by all and survives a crash of any process (the
page cache keeps it).  A mark is one byte per granule, not one bit: a byte is stored whole, so two
processes marking neighbouring granules at once cannot undo each other's mark, which a
read-modify-write of a shared bit could (Python has no atomic OR).  A write touching one granule
costs a load and at most two stores.

The header says whether the marks can be trusted.  Marks reach the disk when the page cache
writes them back, data when it writes the data back: in either order.  So a bitmap left open (not
closed cleanly) by a process of an earlier boot, a machine that crashed, may lack marks of data
that is on the disk: it is not trusted, and reports everything dirty until it is cleared.  (Syncing
the marks at each FLUSH would not change that: data written without a FLUSH reaches the disk too.)
A process that crashed while the machine stayed up loses nothing: its marks are in the page cache,
which the next process maps.

Which processes have a bitmap open is known from their shared flock() on the file, which the
kernel drops when a process dies: the last one to close it (it alone can take the lock
exclusively) marks it clean.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import mmap
import os
import re
import struct
import uuid
from pathlib import Path

from ..backing.file import fsync_directory
from ..config import ConfigError

log = logging.getLogger(__name__)

MAGIC = b"NBDDIRTY"
VERSION = 1
HEADER = 4096  # the marks start on their own page
_HEAD = struct.Struct("<8sIIQQ16s")  # magic, version, reserved, granularity, export size, boot id
# Flags, one byte each at fixed places, so that each is stored whole.
_SIZE, _BOOT = 24, 32  # where the export size and the boot id are in the header
_CLEAN = 64  # 1: closed by the last process that had it open
_UNTRUSTED = 65  # 1: marks may have been lost (a machine crash): everything reads dirty until cleared
# 66: no longer used (was: marked since the last sync)
_CHECKPOINT = 67  # 1: tracks the export's writes since the checkpoint it is named after
_FROZEN = 68  # 1: a checkpoint's record of what changed before it: never marked again
MIN_GRANULARITY = 4096
MAX_GRANULARITY = 64 * 1024 * 1024
DEFAULT_GRANULARITY = 64 * 1024
SUFFIX = ".bitmap"
DIRTY = 1  # the qemu:dirty-bitmap context's flag
MAX_DESCRIPTORS = 1 << 16  # per BLOCK_STATUS reply; the client asks again from where it ends
_NAME = re.compile(r"[A-Za-z0-9_+-][A-Za-z0-9._+-]{0,127}")
_RUNS = re.compile(rb"\x00+|[^\x00]+")
_FILL = b"\x01" * (1 << 20)
BOOT_ID_PATH = Path("/proc/sys/kernel/random/boot_id")
NO_STATE_DIR = "dirty bitmaps are kept in the state directory: start the server with --state-dir"


class BitmapError(ConfigError):
    """A bitmap cannot be made, found or opened; the message says why, for the operator (at start,
    like a configuration that cannot be served)."""


def boot_id() -> bytes:
    """This boot of the machine, as the kernel names it (16 bytes; zeroes where it does not say)."""
    try:
        return uuid.UUID(BOOT_ID_PATH.read_text().strip()).bytes
    except (OSError, ValueError):
        return bytes(16)


def check_name(name: str) -> None:
    if not _NAME.fullmatch(name):
        raise BitmapError(f"bad bitmap name {name!r}: 1 to 128 of A-Z a-z 0-9 . _ + - (not starting with .)")


def check_granularity(granularity: int) -> None:
    if granularity & (granularity - 1) or not MIN_GRANULARITY <= granularity <= MAX_GRANULARITY:
        raise BitmapError(f"bad granularity {granularity}: a power of two from 4 KiB to 64 MiB")


def directory(state_dir: Path, export: str) -> Path:
    """Where an export's bitmaps are kept (any export name makes a file name: hex)."""
    return state_dir / "bitmaps" / ("e" + export.encode().hex())


def _file_size(granules: int) -> int:
    return HEADER + (granules + mmap.PAGESIZE - 1) // mmap.PAGESIZE * mmap.PAGESIZE


class DirtyBitmap:
    """One bitmap, as one process maps it."""

    def __init__(self, name: str, path: Path, fd: int) -> None:
        """Use :meth:`create` or :meth:`open`."""
        self.name, self.path, self._fd = name, path, fd
        self._map = mmap.mmap(fd, os.fstat(fd).st_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        magic, version, _, self.granularity, self.size, _ = _HEAD.unpack_from(self._map)
        if magic != MAGIC or version != VERSION:
            self._map.close()
            raise BitmapError(f"{path}: not a dirty bitmap of version {VERSION}")
        self._shift = self.granularity.bit_length() - 1
        self.granules = (self.size + self.granularity - 1) >> self._shift

    # Making and finding ---------------------------------------------------------------------

    @classmethod
    def create(cls, where: Path, name: str, granularity: int, size: int, checkpoint: bool = False) -> DirtyBitmap:
        """A new, clean bitmap: BitmapError if one of that name exists or there is no room (then no
        file is left behind).  Its blocks are allocated now: a mark must never find the disk full.
        ``checkpoint``: it tracks the writes since the checkpoint of its name."""
        check_name(name)
        check_granularity(granularity)
        where.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = where / (name + SUFFIX)
        temporary = where / f".{name}.{os.getpid()}.tmp"
        granules = (size + granularity - 1) // granularity
        fd = os.open(temporary, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.posix_fallocate(fd, 0, _file_size(granules))
            os.pwrite(fd, _HEAD.pack(MAGIC, VERSION, 0, granularity, size, boot_id()), 0)
            if checkpoint:
                os.pwrite(fd, b"\x01", _CHECKPOINT)
            os.fsync(fd)
            os.link(temporary, path)  # never replaces: another process may have made it meanwhile
        except FileExistsError:
            raise BitmapError(f"a bitmap {name!r} exists already") from None
        except OSError as exc:
            why = "no space left for it" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else exc.strerror
            raise BitmapError(f"bitmap {name!r} not made in {where}: {why}") from None
        finally:
            os.close(fd)
            temporary.unlink(missing_ok=True)
        fsync_directory(where)
        return cls.open(path, size)

    @classmethod
    def open(cls, path: Path, size: int) -> DirtyBitmap:
        """A bitmap kept in ``path``, for an export of ``size`` bytes: taken into use by this
        process (not clean until the last user closes it).  BitmapError if it is no bitmap."""
        name = path.name[: -len(SUFFIX)]
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise BitmapError(f"{path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)  # waits while a last user marks it clean
            if os.fstat(fd).st_size < HEADER:
                raise BitmapError(f"{path}: not a dirty bitmap (too short)")
            bitmap = cls(name, path, fd)
        except BaseException:
            os.close(fd)
            raise
        try:
            bitmap._take_into_use(size)
        except BaseException:
            bitmap.close(keep=False)
            raise
        return bitmap

    def _take_into_use(self, size: int) -> None:
        """Decide whether the marks are trusted, then say the file is open (not clean), and since
        which boot."""
        current, mapped = boot_id(), self._map
        kept_by = bytes(mapped[_BOOT : _BOOT + 16])
        if not mapped[_CLEAN] and kept_by != current and not mapped[_UNTRUSTED] and not mapped[_FROZEN]:
            mapped[_UNTRUSTED] = 1
            log.warning(
                "dirty bitmap %s was left open when the machine stopped: marks may be lost, so it reports "
                "everything dirty until it is cleared",
                self.path,
            )
        if size != self.size:
            self._resize(size)
            mapped = self._map
        mapped[_BOOT : _BOOT + 16] = current
        mapped[_CLEAN] = 0
        mapped.flush(0, mmap.PAGESIZE)  # that it is in use must be on disk before any mark matters

    def _resize(self, size: int) -> None:
        """The export changed size: its marks no longer match its blocks."""
        log.warning(
            "dirty bitmap %s was kept for %d bytes, the export has %d: reports everything dirty until cleared",
            self.path,
            self.size,
            size,
        )
        granules = (size + self.granularity - 1) >> self._shift
        try:
            os.posix_fallocate(self._fd, 0, _file_size(granules))
        except OSError as exc:
            raise BitmapError(f"{self.path}: cannot grow it for the export's size: {exc.strerror}") from None
        self._map.close()
        self._map = mmap.mmap(self._fd, _file_size(granules), mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        struct.pack_into("<Q", self._map, _SIZE, size)
        self._map[_UNTRUSTED] = 1
        self.size, self.granules = size, granules

    # Use ------------------------------------------------------------------------------------

    def mark(self, offset: int, length: int) -> None:
        """The bytes from ``offset`` on are being written: mark their granules (before the write is
        acknowledged)."""
        if length <= 0:
            return
        first = HEADER + (offset >> self._shift)
        last = HEADER + min((offset + length - 1) >> self._shift, self.granules - 1)
        mapped = self._map
        if first == last:
            if not mapped[first]:
                mapped[first] = 1
        else:
            while first <= last:
                count = min(last + 1 - first, len(_FILL))
                mapped[first : first + count] = _FILL[:count]
                first += count

    @property
    def trusted(self) -> bool:
        return not self._map[_UNTRUSTED]

    def distrust(self) -> None:
        """Marks may be missing (a process could not open it): report everything dirty until cleared."""
        self._map[_UNTRUSTED] = 1
        self._map.flush(0, mmap.PAGESIZE)

    @property
    def checkpoint(self) -> bool:
        """It tracks the writes since the checkpoint of its name."""
        return bool(self._map[_CHECKPOINT])

    @property
    def frozen(self) -> bool:
        return bool(self._map[_FROZEN])

    def freeze(self) -> None:
        """No more marks: from now on it records what changed up to a checkpoint.  Durable on return."""
        mapped = self._map
        mapped[_CHECKPOINT] = 0
        mapped[_FROZEN] = 1
        mapped.flush()

    def clear(self) -> None:
        """Every granule clean, and trusted again."""
        mapped = self._map
        start, end = HEADER, HEADER + self.granules
        while start < end:
            count = min(end - start, len(_FILL))
            mapped[start : start + count] = bytes(count)
            start += count
        mapped[_UNTRUSTED] = 0
        mapped.flush()

    def dirty_bytes(self) -> int:
        """How much of the export is marked (whole granules; everything if untrusted)."""
        if not self.trusted:
            return self.size
        marked = self.granules - self._map[HEADER : HEADER + self.granules].count(0)
        return min(marked << self._shift, self.size)

    def extents(self, offset: int, length: int, limit: int = MAX_DESCRIPTORS) -> list[tuple[int, int]]:
        """(length, flags) descriptors of ``length`` bytes from ``offset`` (fewer if more than
        ``limit`` are needed): DIRTY where marked."""
        end = min(offset + length, self.size)
        if end <= offset:
            return [(length, DIRTY)]
        if not self.trusted:
            return [(end - offset, DIRTY)]
        first = offset >> self._shift
        marks = self._map[HEADER + first : HEADER + ((end - 1) >> self._shift) + 1]
        out: list[tuple[int, int]] = []
        pos = offset
        for run in _RUNS.finditer(marks):
            stop = min((first + run.end()) << self._shift, end)
            out.append((stop - pos, DIRTY if marks[run.start()] else 0))
            pos = stop
            if len(out) >= limit:
                break
        return out

    def close(self, keep: bool = True) -> None:
        """This process is done with it.  If no other has it open, it is clean: said on disk after
        every mark.  ``keep`` False: the bitmap was removed, nothing to say."""
        try:
            if keep and self._last_user():
                self._map.flush()
                self._map[_CLEAN] = 1
                self._map.flush(0, mmap.PAGESIZE)
        finally:
            self._map.close()
            os.close(self._fd)

    def _last_user(self) -> bool:
        """No other process has it open.  Our own shared lock goes first: two processes closing at
        once would otherwise each find the other's, and neither mark it clean."""
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True


class ExportBitmaps:
    """The bitmaps of one export in one process."""

    def __init__(self, where: Path | None, size: int, unavailable: str = NO_STATE_DIR) -> None:
        """``where``: the export's directory of bitmaps (None: no bitmaps, for the reason
        ``unavailable`` says)."""
        self.where, self.size = where, size
        self.unavailable = "" if where is not None else unavailable
        self.by_name: dict[str, DirtyBitmap] = {}
        self.active = False  # any bitmap to mark: the one test a write pays without bitmaps

    def load(self, wanted: tuple[str, ...] = ()) -> None:
        """Open every bitmap kept for the export (and make those ``wanted`` that are missing); close
        those removed meanwhile.  BitmapError if one cannot be made or opened."""
        if self.where is None:
            if wanted:
                raise BitmapError(self.unavailable)
            return
        for name in wanted:
            if name not in self.by_name and not (self.where / (name + SUFFIX)).exists():
                self._adopt(DirtyBitmap.create(self.where, name, DEFAULT_GRANULARITY, self.size))
        kept = {p.name[: -len(SUFFIX)]: p for p in self.where.glob("*" + SUFFIX)} if self.where.is_dir() else {}
        for name in [n for n in self.by_name if n not in kept]:
            self.by_name.pop(name).close(keep=False)
        for name, path in sorted(kept.items()):
            if name not in self.by_name:
                self._adopt(DirtyBitmap.open(path, self.size))
        self.active = bool(self.by_name)

    def _adopt(self, bitmap: DirtyBitmap) -> None:
        self.by_name[bitmap.name] = bitmap
        self.active = True

    def add(self, name: str, granularity: int) -> DirtyBitmap:
        if self.where is None:
            raise BitmapError(self.unavailable)
        check_name(name)
        if name in self.by_name:
            raise BitmapError(f"a bitmap {name!r} exists already")
        bitmap = DirtyBitmap.create(self.where, name, granularity, self.size)
        self._adopt(bitmap)
        return bitmap

    def remove(self, name: str) -> None:
        """Forget it here, and its file (the other processes close theirs on :meth:`load`)."""
        bitmap = self.get(name)
        del self.by_name[name]
        self.active = bool(self.by_name)
        bitmap.path.unlink(missing_ok=True)
        bitmap.close(keep=False)

    # Checkpoints (serving/snapshots.py): called while the export's requests are held ----------

    def tracking(self) -> DirtyBitmap | None:
        """The bitmap that tracks the writes since the export's last checkpoint, if any."""
        return next((b for b in self.by_name.values() if b.checkpoint), None)

    def freeze_tracking(self, into: Path, name: str) -> None:
        """What changed since the last checkpoint, as bitmap ``name`` in ``into`` (a snapshot's
        directory), frozen: the tracking bitmap itself, moved there; or, if there is none (a first
        checkpoint, or its bitmap was removed), one with everything dirty.  BitmapError if it
        cannot be made (nothing has changed then)."""
        check_name(name)
        into.mkdir(mode=0o700, parents=True, exist_ok=True)
        target = into / (name + SUFFIX)
        if target.exists():
            raise BitmapError(f"{target} exists already")
        tracking = self.tracking()
        if tracking is None:
            frozen = DirtyBitmap.create(into, name, DEFAULT_GRANULARITY, self.size)
            frozen.mark(0, self.size)
            frozen.freeze()
            frozen.close()
            return
        tracking.freeze()
        try:
            os.rename(tracking.path, target)  # within the state directory: one filesystem
        except OSError as exc:
            raise BitmapError(f"bitmap {tracking.name!r} not moved to {into}: {exc.strerror}") from None
        fsync_directory(into)
        fsync_directory(tracking.path.parent)
        del self.by_name[tracking.name]
        self.active = bool(self.by_name)
        tracking.close(keep=False)

    def start_tracking(self, name: str, granularity: int) -> DirtyBitmap:
        """A new bitmap ``name`` that tracks the writes from the checkpoint of that name on."""
        if self.where is None:
            raise BitmapError(self.unavailable)
        check_name(name)
        if name in self.by_name:
            raise BitmapError(f"a bitmap {name!r} exists already")
        bitmap = DirtyBitmap.create(self.where, name, granularity, self.size, checkpoint=True)
        self._adopt(bitmap)
        return bitmap

    def get(self, name: str) -> DirtyBitmap:
        bitmap = self.by_name.get(name)
        if bitmap is None:
            raise BitmapError(f"no bitmap {name!r}")
        return bitmap

    def mark(self, offset: int, length: int) -> None:
        for bitmap in self.by_name.values():
            bitmap.mark(offset, length)

    def close(self) -> None:
        for bitmap in self.by_name.values():
            bitmap.close()
        self.by_name.clear()
        self.active = False
