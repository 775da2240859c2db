"""A minimal file-backed plugin for nbdkit's Python plugin: the usual way to serve NBD from Python.

    nbdkit python fs/bench/nbdkit_file_plugin.py file=disk.img

It keeps to what the file plugin offers that matters to the benchmarks: parallel requests,
FUA through fdatasync, flush, trim and zero by fallocate.
"""

import ctypes
import errno
import os

import nbdkit

API_VERSION = 2
_path = None
_libc = ctypes.CDLL(None, use_errno=True)


def thread_model():
    return nbdkit.THREAD_MODEL_PARALLEL


def config(key, value):
    global _path
    if key != "file":
        raise RuntimeError(f"unknown parameter {key}")
    _path = os.path.abspath(value)


def config_complete():
    if _path is None:
        raise RuntimeError("file= is required")


def open(readonly):
    return os.open(_path, os.O_RDONLY if readonly else os.O_RDWR)


def close(fd):
    os.close(fd)


def get_size(fd):
    return os.fstat(fd).st_size


def can_multi_conn(fd):
    return True


def can_fua(fd):
    return nbdkit.FUA_NATIVE


def pread(fd, buf, offset, flags):
    view = memoryview(buf)
    while view:
        n = os.preadv(fd, [view], offset)
        if n == 0:
            view[:] = bytes(len(view))
            return
        view, offset = view[n:], offset + n


def pwrite(fd, buf, offset, flags):
    view = memoryview(buf)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n
    if flags & nbdkit.FLAG_FUA:
        os.fdatasync(fd)


def flush(fd, flags):
    os.fdatasync(fd)


def _fallocate(fd, mode, offset, count):
    if _libc.fallocate(fd, mode, ctypes.c_longlong(offset), ctypes.c_longlong(count)) != 0:
        code = ctypes.get_errno()
        if code in (errno.EOPNOTSUPP, errno.ENOSYS):
            return False
        raise OSError(code, os.strerror(code))
    return True


def trim(fd, count, offset, flags):
    _fallocate(fd, 0x01 | 0x02, offset, count)  # KEEP_SIZE | PUNCH_HOLE


def zero(fd, count, offset, flags):
    if not _fallocate(fd, 0x01 | 0x10, offset, count):  # KEEP_SIZE | ZERO_RANGE
        pwrite(fd, bytearray(count), offset, flags)
