"""Point-in-time copies of a backing file that share its blocks: reflinks (FICLONERANGE).

XFS (made with reflink=1, mkfs.xfs's default since xfsprogs 5.1) and btrfs clone a range of a
file by pointing the copy at the same extents: it costs no space until either file is written,
and time per extent, not per byte (some 14 µs per extent on both, measured; the kernel locks the
file's I/O meanwhile, so a file fragmented by random writes is cloned in ranges, see
serving/cloning.py).  ext4, tmpfs and block devices cannot: there a snapshot is refused with the
reason, rather than made by copying every byte.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct
from pathlib import Path
from time import monotonic

from .file import fsync_directory

FICLONERANGE = 0x4020940D  # _IOW(0x94, 13, struct file_clone_range), linux/fs.h
_RANGE = struct.Struct("qQQQ")  # source fd, source offset, length, target offset
_CANNOT = (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL, errno.ENOSYS)
NEEDS = "snapshots need a filesystem that shares blocks between files: XFS (reflink=1) or btrfs"


WRITE_BACK_PASSES = 4
WRITTEN_BACK = 0.02  # seconds: a write-back this short leaves little for the clone's own


class ReflinkError(OSError):
    """The copy cannot be made; the message says why, for the operator."""


class Target:
    """A snapshot's file while it is made: a temporary file beside ``path``, of the source's size,
    into which ranges of the source are cloned (:meth:`clone`), then given its name
    (:meth:`publish`) or deleted (:meth:`discard`).  ReflinkError if it cannot be made: the
    filesystem cannot clone (tried on the first block), no room, a name in use."""

    def __init__(self, source_fd: int, source: Path, path: Path) -> None:
        mode = os.fstat(source_fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a block device" if stat.S_ISBLK(mode) else "not a regular file"
            raise ReflinkError(errno.EOPNOTSUPP, f"{source} is {kind}: {NEEDS}")
        if path.exists():
            raise ReflinkError(errno.EEXIST, f"{path} exists already")
        self.source_fd, self.source, self.path = source_fd, source, path
        self.size = os.fstat(source_fd).st_size
        self.temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            self.fd = os.open(self.temporary, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise ReflinkError(exc.errno, f"cannot create {self.temporary}: {exc.strerror}") from None
        try:
            os.ftruncate(self.fd, self.size)
            block = max(os.fstat(source_fd).st_blksize, 4096)
            self.clone(0, min(self.size, block))  # can this filesystem clone at all? (cloned again later)
        except BaseException:
            self.discard()
            raise

    def clone(self, offset: int, length: int) -> None:
        """Share the source's blocks of ``length`` bytes from ``offset`` (block-aligned, or reaching
        the end of the file) at the same place in the target; what it had there is replaced."""
        if length <= 0:
            return
        request = _RANGE.pack(self.source_fd, offset, length, offset)
        try:
            fcntl.ioctl(self.fd, FICLONERANGE, request)
        except OSError as exc:
            raise ReflinkError(exc.errno, _why(exc, self.source)) from None

    def publish(self) -> None:
        """Durable, under its name (never replacing a file of that name)."""
        os.fsync(self.fd)
        try:
            os.link(self.temporary, self.path)
        except FileExistsError:
            raise ReflinkError(errno.EEXIST, f"{self.path} exists already") from None
        except OSError as exc:
            raise ReflinkError(exc.errno, f"cannot create {self.path}: {exc.strerror}") from None
        finally:
            self.discard()
        fsync_directory(self.path.parent)

    def discard(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.temporary.unlink(missing_ok=True)


def write_back(fd: int) -> None:
    """Write the file's dirty pages to disk ahead of a clone.  The clone writes back what is dirty
    first, while the export's requests are held for it: done before the hold, under a writer it
    is what was written since (repeated while each pass still takes long)."""
    for _ in range(WRITE_BACK_PASSES):
        started = monotonic()
        os.fdatasync(fd)
        if monotonic() - started < WRITTEN_BACK:
            return


def _why(exc: OSError, source: Path) -> str:
    if exc.errno in _CANNOT:
        return f"the filesystem of {source} cannot share blocks between files ({exc.strerror}): {NEEDS}"
    if exc.errno == errno.EXDEV:
        return f"the snapshot is not on the filesystem of {source}"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left beside {source} for the snapshot's extent map"
    return f"cannot clone {source}: {exc.strerror}"
