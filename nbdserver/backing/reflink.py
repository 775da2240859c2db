"""Point-in-time copies of a backing file that share its blocks: reflinks (the FICLONE ioctl).

XFS (made with reflink=1, mkfs.xfs's default since xfsprogs 5.1) and btrfs clone a file by
pointing the copy at the same extents, so a snapshot of a 100 GiB image costs the time to copy
its extent map and no space until either file is written.  ext4, tmpfs and block devices cannot:
there a snapshot is refused with the reason, rather than made by copying every byte while the
export's writes wait.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from pathlib import Path
from time import monotonic

from .file import fsync_directory

FICLONE = 0x40049409  # _IOW(0x94, 9, int), linux/fs.h
_CANNOT = (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL, errno.ENOSYS)
NEEDS = "snapshots need a filesystem that shares blocks between files: XFS (reflink=1) or btrfs"


WRITE_BACK_PASSES = 4
WRITTEN_BACK = 0.02  # seconds: a write-back this short leaves little for the clone's own


class ReflinkError(OSError):
    """The copy cannot be made; the message says why, for the operator."""


def clone(source_fd: int, source: Path, target: Path) -> None:
    """Make ``target`` (a new file, mode 0600, beside nothing it may replace) a copy of the file open
    as ``source_fd`` that shares its blocks, durable on return.  ReflinkError if it cannot be
    made; no file is left behind then."""
    mode = os.fstat(source_fd).st_mode
    if not stat.S_ISREG(mode):
        kind = "a block device" if stat.S_ISBLK(mode) else "not a regular file"
        raise ReflinkError(errno.EOPNOTSUPP, f"{source} is {kind}: {NEEDS}")
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise ReflinkError(exc.errno, f"cannot create {temporary}: {exc.strerror}") from None
    try:
        try:
            fcntl.ioctl(fd, FICLONE, source_fd)
        except OSError as exc:
            raise ReflinkError(exc.errno, _why(exc, source)) from None
        os.fsync(fd)
        try:
            os.link(temporary, target)  # never replaces a file of that name
        except FileExistsError:
            raise ReflinkError(errno.EEXIST, f"{target} exists already") from None
        except OSError as exc:
            raise ReflinkError(exc.errno, f"cannot create {target}: {exc.strerror}") from None
    finally:
        os.close(fd)
        temporary.unlink(missing_ok=True)
    fsync_directory(target.parent)


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
