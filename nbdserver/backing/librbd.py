"""Ceph RBD images as exports: librados and librbd through their C API, and an engine on them.

An export whose path is ``rbd:POOL/IMAGE`` (or ``rbd:POOL/NAMESPACE/IMAGE``) serves an image of
a Ceph cluster: :class:`RbdImage` stands where a :class:`~nbdserver.backing.file.Backing` stands
(its size, whether it is read-only), and :class:`RbdEngine` carries out the block layer's
submissions with librbd's asynchronous calls, as the io_uring engine does with the kernel's ring:

- READ and WRITE go out as ``rbd_aio_readv`` / ``rbd_aio_writev`` on the segments' own buffers
  (an iovec array pointing into them: no copy here), which stay referenced until the operation
  completes; librbd sends a write's buffers as they are, without a copy of its own
  (``rbd_disable_zero_copy_writes`` off), and completes it only once it holds no reference.
  A FUA write of one segment is one ``rbd_aio_write2`` with the FUA op flag; one of several
  segments is a write followed by a flush.
- Completions are made without a callback, so no Python ever runs on librbd's threads: librbd
  queues each finished one on the image and bumps an eventfd (``rbd_set_image_notification``),
  which the event loop watches; ``rbd_poll_io_events`` then takes them on the loop's thread,
  where each calls its :data:`~nbdserver.backing.engine.Done`.
- FLUSH is ``rbd_aio_flush``.  librbd's cache is off: a write is answered once the cluster has
  it, so a crash of this process loses nothing it answered.  (With the cache on, writes would be
  answered from this process's memory once a first flush was seen; a crash would lose them, and
  the takeover that hides the crash from the client would hide the loss too.)
- TRIM is ``rbd_aio_discard``, which leaves alone the pieces smaller than the image's discard
  granularity: it is advisory, and nothing is promised about what the range reads afterwards.
- WRITE_ZEROES is ``rbd_aio_write_zeroes``: may it punch holes, librbd deallocates what it can
  and zeroes the rest; NO_HOLE asks for the range thick-provisioned (written).
- BLOCK_STATUS comes from ``rbd_diff_iterate2`` from the image's creation (parent included),
  on a thread of the loop's executor: what it reports as existing is data, the rest reads as
  zeroes (holes).

Nothing waits forever on the cluster: ``client_mount_timeout``, ``rados_mon_op_timeout`` and
``rados_osd_op_timeout`` are set to the configured timeout, so a connection, an open, or a
request to a cluster that does not answer fails with ETIMEDOUT after it.

The libraries (``librados.so.2``, ``librbd.so.1``, Debian's librados2 and librbd1) are loaded on
first use: a server without RBD exports does not need them.  In the compiled build, the two calls
every READ and WRITE makes (starting it, reaping completions) are C (``_rbd.c``), through the
functions ctypes found: through ctypes they cost the serving thread some 10 µs a request.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import logging
import os
import struct
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .engine import Done, resolve
from .file import IOV_MAX, MAX_EXTENTS, Extent, Segment, address, segments_length

if TYPE_CHECKING:
    from .rbdlock import ExclusiveLock

log = logging.getLogger(__name__)

PREFIX = "rbd:"
DEFAULT_TIMEOUT = 30.0  # seconds: for connecting, opening, and every request to the cluster
DEFAULT_CLIENT = "admin"  # cephx user, as ``rbd --id`` names it

# <rbd/librbd.h>, <rbd/features.h>, <rados/librados.h>
EVENT_TYPE_EVENTFD = 2
RBD_WRITE_ZEROES_FLAG_THICK_PROVISION = 1
RBD_FEATURE_EXCLUSIVE_LOCK = 1 << 2
RBD_LOCK_MODE_EXCLUSIVE = 0
LIBRADOS_OP_FLAG_FADVISE_FUA = 0x80

POLL_BATCH = 64  # completions taken per rbd_poll_io_events call
# What _rbd.c starts (it checks these are its own).
KIND_READ, KIND_WRITE, KIND_WRITE_FUA = 0, 1, 2


class RbdError(OSError):
    """Opening or using an image failed: ``errno`` as librados/librbd said, and a message that
    names the image (``str()`` is the message alone)."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


@dataclass(frozen=True)
class RbdName:
    """An image as an export names it: ``rbd:POOL/IMAGE`` or ``rbd:POOL/NAMESPACE/IMAGE``."""

    pool: str
    image: str
    namespace: str = ""

    def __str__(self) -> str:
        namespace = f"{self.namespace}/" if self.namespace else ""
        return f"{PREFIX}{self.pool}/{namespace}{self.image}"


def rbd_name(text: str) -> RbdName | None:
    """The image ``text`` names, or None if it names no image (no ``rbd:`` in front): a file.
    ValueError if it starts with ``rbd:`` but is not POOL/IMAGE or POOL/NAMESPACE/IMAGE."""
    if not text.startswith(PREFIX):
        return None
    parts = text[len(PREFIX) :].split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise ValueError(f"{text!r}: an RBD image is named rbd:POOL/IMAGE or rbd:POOL/NAMESPACE/IMAGE")
    if "@" in parts[-1]:
        raise ValueError(f"{text!r}: snapshots (IMAGE@SNAP) are not served")
    if len(parts) == 2:
        return RbdName(parts[0], parts[1])
    return RbdName(parts[0], parts[2], parts[1])


def client_name(client_id: str | None) -> str:
    """The cephx entity of a user as ``--rbd-id`` gives it (``admin`` or ``client.admin``)."""
    user = client_id or DEFAULT_CLIENT
    return user if user.startswith("client.") else f"client.{user}"


# The libraries ------------------------------------------------------------------------------

_P = ctypes.c_void_p
_PP = ctypes.POINTER(ctypes.c_void_p)
_DIFF_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_uint64, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p)


class Watcher(ctypes.Structure):
    """rbd_image_watcher_t: a client watching the image (any client that has it open)."""

    _fields_ = [("addr", ctypes.c_char_p), ("id", ctypes.c_int64), ("cookie", ctypes.c_uint64)]


class Libraries:
    """librados and librbd with the signatures of the calls used here (64-bit offsets and
    ``ssize_t`` results would be cut to ``int`` without them)."""

    def __init__(self) -> None:
        try:
            self.rados = rados = ctypes.CDLL("librados.so.2")
            self.rbd = rbd = ctypes.CDLL("librbd.so.1")
        except OSError as exc:
            raise RbdError(
                errno.ENOENT, f"RBD exports need librbd and librados (Debian: librbd1, librados2): {exc}"
            ) from None
        c_int, c_char_p, u64, size_t = ctypes.c_int, ctypes.c_char_p, ctypes.c_uint64, ctypes.c_size_t
        _declare(rados.rados_create2, [_PP, c_char_p, c_char_p, u64])
        _declare(rados.rados_conf_read_file, [_P, c_char_p])
        _declare(rados.rados_conf_parse_env, [_P, c_char_p])
        _declare(rados.rados_conf_set, [_P, c_char_p, c_char_p])
        _declare(rados.rados_connect, [_P])
        _declare(rados.rados_shutdown, [_P], None)
        _declare(rados.rados_ioctx_create, [_P, c_char_p, _PP])
        _declare(rados.rados_ioctx_destroy, [_P], None)
        _declare(rados.rados_ioctx_set_namespace, [_P, c_char_p], None)
        _declare(rados.rados_getaddrs, [_P, _PP])
        _declare(rados.rados_buffer_free, [_P], None)
        _declare(rbd.rbd_open, [_P, c_char_p, _PP, c_char_p])
        _declare(rbd.rbd_open_read_only, [_P, c_char_p, _PP, c_char_p])
        _declare(rbd.rbd_close, [_P])
        _declare(rbd.rbd_get_size, [_P, ctypes.POINTER(u64)])
        _declare(rbd.rbd_get_features, [_P, ctypes.POINTER(u64)])
        _declare(rbd.rbd_set_image_notification, [_P, c_int, c_int])
        _declare(rbd.rbd_poll_io_events, [_P, _PP, c_int])
        _declare(rbd.rbd_aio_create_completion, [_P, _P, _PP])
        _declare(rbd.rbd_aio_get_return_value, [_P], ctypes.c_ssize_t)
        _declare(rbd.rbd_aio_get_arg, [_P], _P)
        _declare(rbd.rbd_aio_wait_for_complete, [_P])
        _declare(rbd.rbd_aio_release, [_P], None)
        # The iovec array as bytes (pairs of 64-bit address and length): passed without a copy.
        _declare(rbd.rbd_aio_readv, [_P, c_char_p, c_int, u64, _P])
        _declare(rbd.rbd_aio_writev, [_P, c_char_p, c_int, u64, _P])
        _declare(rbd.rbd_aio_write2, [_P, u64, size_t, _P, _P, c_int])
        _declare(rbd.rbd_aio_discard, [_P, u64, u64, _P])
        _declare(rbd.rbd_aio_write_zeroes, [_P, u64, size_t, _P, c_int, c_int])
        _declare(rbd.rbd_aio_flush, [_P, _P])
        _declare(rbd.rbd_lock_acquire, [_P, c_int])
        _declare(rbd.rbd_lock_get_owners, [_P, ctypes.POINTER(c_int), ctypes.POINTER(c_char_p), ctypes.POINTER(size_t)])
        _declare(rbd.rbd_lock_get_owners_cleanup, [ctypes.POINTER(c_char_p), size_t], None)
        _declare(rbd.rbd_lock_break, [_P, c_int, c_char_p])
        _declare(rbd.rbd_lock_release, [_P])
        _declare(rbd.rbd_watchers_list, [_P, ctypes.POINTER(Watcher), ctypes.POINTER(size_t)])
        _declare(rbd.rbd_watchers_list_cleanup, [ctypes.POINTER(Watcher), size_t], None)
        _declare(rbd.rbd_metadata_get, [_P, c_char_p, c_char_p, ctypes.POINTER(size_t)])
        _declare(rbd.rbd_metadata_set, [_P, c_char_p, c_char_p])
        _declare(rbd.rbd_diff_iterate2, [_P, c_char_p, u64, u64, ctypes.c_uint8, ctypes.c_uint8, _DIFF_CALLBACK, _P])


def _declare(function: Any, argtypes: list[Any], restype: Any = ctypes.c_int) -> None:
    function.argtypes, function.restype = argtypes, restype


_libraries: Libraries | None = None


def libraries() -> Libraries:
    """The libraries, loaded on first use; RbdError (ENOENT) where they are not installed."""
    global _libraries
    if _libraries is None:
        _libraries = Libraries()
    return _libraries


def native_calls(lib: Libraries) -> Any:
    """The compiled build's C calls for starting READs and WRITEs and reaping completions
    (``_rbd.c``), bound to ``lib``'s librbd; None in the pure build, where ctypes makes them."""
    try:
        from . import _rbd
    except ImportError:  # the pure build
        return None
    if (_rbd.KIND_READ, _rbd.KIND_WRITE, _rbd.KIND_WRITE_FUA) != (KIND_READ, KIND_WRITE, KIND_WRITE_FUA):
        log.warning("the RBD engine's C calls were built for another version: making them through ctypes")
        return None
    rbd = lib.rbd
    functions = (
        rbd.rbd_aio_create_completion,
        rbd.rbd_aio_readv,
        rbd.rbd_aio_writev,
        rbd.rbd_aio_write2,
        rbd.rbd_poll_io_events,
        rbd.rbd_aio_get_return_value,
        rbd.rbd_aio_get_arg,
        rbd.rbd_aio_release,
    )
    _rbd.bind(*(ctypes.cast(function, ctypes.c_void_p).value or 0 for function in functions))
    return _rbd


def _check(result: int, message: Callable[[int], str]) -> int:
    """``result`` of a librados/librbd call; RbdError with ``message(errno)`` if it is an error."""
    if result < 0:
        raise RbdError(-result, message(-result))
    return result


# The image ----------------------------------------------------------------------------------


class RbdImage:
    """An open RBD image, and the cluster connection it was opened through.

    What an export needs of what it serves (:class:`~nbdserver.backing.engine.Store`): its
    size, whether it is read-only, and ``close``.  Opening blocks, at most about ``timeout``
    seconds for each step (connecting, finding the pool, opening the image); any failure is an
    RbdError naming the image and saying why.
    """

    direct = False  # no O_DIRECT alignment rules: the block layer orders nothing on page granules
    offset_align = 1

    def __init__(
        self,
        name: RbdName,
        *,
        read_only: bool = False,
        conf: Path | None = None,
        client_id: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        """``conf``: the ceph.conf to read (None: where librados looks, ``$CEPH_CONF`` then
        ``/etc/ceph/ceph.conf``); ``client_id``: the cephx user."""
        self.name = name
        self.path = str(name)  # for messages, as a file's path is shown
        self.read_only = read_only
        self.timeout = timeout
        self.lib = lib = libraries()
        self.cluster = ctypes.c_void_p()
        self.ioctx = ctypes.c_void_p()
        self.image = ctypes.c_void_p()
        self._fencing = threading.Lock()
        user = client_name(client_id)
        spec = self.path
        _check(
            lib.rados.rados_create2(ctypes.byref(self.cluster), b"ceph", user.encode(), 0),
            lambda code: f"{spec}: cannot make a cluster handle for {user}: {os.strerror(code)}",
        )
        try:
            self._connect(user, conf, timeout)
            self._open()
            size = ctypes.c_uint64()
            _check(lib.rbd.rbd_get_size(self.image, ctypes.byref(size)), self._says("cannot read its size"))
            self.size = size.value
            features = ctypes.c_uint64()
            _check(lib.rbd.rbd_get_features(self.image, ctypes.byref(features)), self._says("cannot read its features"))
            self.features = features.value
        except BaseException:
            self.close()
            raise
        if not read_only and not self.features & RBD_FEATURE_EXCLUSIVE_LOCK:
            log.warning(
                "%s: the image has no exclusive-lock feature: nothing keeps another client from writing it "
                "at the same time (rbd feature enable %s/%s exclusive-lock)",
                spec,
                name.pool,
                name.image,
            )

    def _says(self, what: str) -> Callable[[int], str]:
        return lambda code: f"{self.path}: {what}: {os.strerror(code)}"

    @property
    def holder(self) -> str:
        """This process as the cluster names the owner of the image's exclusive lock: the address
        of its cluster connection (``127.0.0.1:0/NONCE``)."""
        text = ctypes.c_void_p()
        _check(self.lib.rados.rados_getaddrs(self.cluster, ctypes.byref(text)), self._says("no cluster address"))
        try:
            return ctypes.string_at(text.value).decode() if text.value else ""
        finally:
            self.lib.rados.rados_buffer_free(text)

    def owners(self) -> list[str]:
        """Who holds the image's exclusive lock now (blocking): nobody, or one client."""
        mode, count = ctypes.c_int(), ctypes.c_size_t(4)
        names = (ctypes.c_char_p * count.value)()
        result = self.lib.rbd.rbd_lock_get_owners(self.image, ctypes.byref(mode), names, ctypes.byref(count))
        if result == -errno.ENOENT:
            return []
        _check(result, self._says("cannot list the lock's owners"))
        found = [(names[i] or b"").decode() for i in range(count.value)]
        self.lib.rbd.rbd_lock_get_owners_cleanup(names, count)
        return found

    def fence(self, holder: str) -> bool:
        """``holder`` is a process of this server that died (blocking): if it still holds the
        image's lock, break it, which also blocklists it in the cluster, rather than wait the half
        minute the cluster takes to notice that it is gone.  True if a lock was broken."""
        with self._fencing:  # one thread at a time: the takeover's and --rbd-exclusive's may meet
            if holder == self.holder or holder not in self.owners():
                return False
            self._break(holder)
        return True

    def _break(self, holder: str) -> None:
        _check(
            self.lib.rbd.rbd_lock_break(self.image, RBD_LOCK_MODE_EXCLUSIVE, holder.encode()),
            self._says(f"cannot break the lock of {holder}"),
        )
        log.warning("%s: the lock of %s, which died, broken (and the dead client blocklisted)", self.path, holder)

    def _connect(self, user: str, conf: Path | None, timeout: float) -> None:
        rados, cluster, spec = self.lib.rados, self.cluster, self.path
        where = str(conf) if conf is not None else "$CEPH_CONF or /etc/ceph/ceph.conf"
        read = rados.rados_conf_read_file(cluster, str(conf).encode() if conf is not None else None)
        if read < 0 and conf is not None:
            raise RbdError(-read, f"{spec}: cannot read the Ceph configuration {conf}: {os.strerror(-read)}")
        found = read >= 0  # without a file, CEPH_ARGS may still say where the monitors are
        _check(rados.rados_conf_parse_env(cluster, None), self._says("bad CEPH_ARGS"))
        settings = {
            "client_mount_timeout": f"{timeout:g}",
            "rados_mon_op_timeout": f"{timeout:g}",
            "rados_osd_op_timeout": f"{timeout:g}",
            "rbd_cache": "false",  # see the module's docstring: answered means in the cluster
            # librbd sends a write's own buffer rather than a copy of it: ours stay untouched
            # until the write completes, which librbd holds back until the last reference is gone.
            "rbd_disable_zero_copy_writes": "false",
        }
        for option, value in settings.items():
            _check(rados.rados_conf_set(cluster, option.encode(), value.encode()), self._says(f"cannot set {option}"))
        result = rados.rados_connect(cluster)
        if result >= 0:
            return
        code = -result
        if code == errno.ETIMEDOUT:
            why = f"the cluster did not answer within {timeout:g} s (its monitors as {where} says)"
        elif code in (errno.EACCES, errno.EPERM):
            why = f"the cluster refused the credentials of {user} (check its key in the keyring {where} names)"
        elif code == errno.ENOENT and not found:
            why = f"no Ceph configuration found ({where}): give --rbd-conf"
        elif code == errno.ENOENT:
            why = f"no key for {user}, or no monitor address, in {where} and the keyrings it names"
        else:
            why = f"cannot connect to the cluster ({where}) as {user}: {os.strerror(code)}"
        raise RbdError(code, f"{spec}: {why}")

    def _open(self) -> None:
        lib, name, spec = self.lib, self.name, self.path
        result = lib.rados.rados_ioctx_create(self.cluster, name.pool.encode(), ctypes.byref(self.ioctx))
        if result < 0:
            code = -result
            why = f"no such pool {name.pool!r}" if code == errno.ENOENT else f"cannot use pool {name.pool!r}"
            raise RbdError(code, f"{spec}: {why}: {os.strerror(code)}" if code != errno.ENOENT else f"{spec}: {why}")
        if name.namespace:
            lib.rados.rados_ioctx_set_namespace(self.ioctx, name.namespace.encode())
        opener = lib.rbd.rbd_open_read_only if self.read_only else lib.rbd.rbd_open
        result = opener(self.ioctx, name.image.encode(), ctypes.byref(self.image), None)
        if result < 0:
            self.image = ctypes.c_void_p()
            code = -result
            if code == errno.ENOENT:
                where = f" in namespace {name.namespace!r}" if name.namespace else ""
                raise RbdError(code, f"{spec}: no such image{where} (pool {name.pool!r})")
            if code in (errno.EACCES, errno.EPERM):
                raise RbdError(code, f"{spec}: not allowed to open the image (the user's caps?): {os.strerror(code)}")
            if code == errno.ETIMEDOUT:
                raise RbdError(code, f"{spec}: the cluster did not answer within {self.timeout:g} s")
            raise RbdError(code, f"{spec}: cannot open the image: {os.strerror(code)}")

    def close(self) -> None:
        """Close the image (releasing its lock) and the cluster connection; once."""
        lib = self.lib
        if self.image:
            result = lib.rbd.rbd_close(self.image)
            self.image = ctypes.c_void_p()
            if result < 0:
                log.error("%s: closing the image: %s", self.path, os.strerror(-result))
        if self.ioctx:
            lib.rados.rados_ioctx_destroy(self.ioctx)
            self.ioctx = ctypes.c_void_p()
        if self.cluster:
            lib.rados.rados_shutdown(self.cluster)
            self.cluster = ctypes.c_void_p()

    def extents(self, offset: int, length: int) -> list[Extent]:
        """Data and hole extents covering [offset, offset+length): blocking (run it on a thread).

        ``rbd_diff_iterate2`` from the image's creation, its parent's data included, reports the
        ranges that exist; between them the image reads as zeroes.
        """
        if length == 0:
            return []
        found: list[tuple[int, int]] = []

        def report(start: int, size: int, exists: int, arg: object) -> int:
            if exists:
                found.append((start, size))
            return 0

        callback = _DIFF_CALLBACK(report)  # referenced until the call returns
        _check(
            self.lib.rbd.rbd_diff_iterate2(self.image, None, offset, length, 1, 0, callback, None),
            self._says("cannot read its allocation"),
        )
        return allocation_extents(offset, length, found)


def allocation_extents(offset: int, length: int, allocated: list[tuple[int, int]]) -> list[Extent]:
    """Extents (length, is_hole) covering [offset, offset+length) from the ranges (start, length)
    that hold data, in any order, overlapping or not; at most MAX_EXTENTS (the last covers the rest)."""
    end = offset + length
    out: list[Extent] = []
    pos = offset
    for start, size in sorted(allocated):
        start, stop = max(start, pos), min(start + size, end)
        if stop <= start:
            continue
        if len(out) >= MAX_EXTENTS - 2:
            break
        if start > pos:
            _extend(out, start - pos, True)
        _extend(out, stop - start, False)
        pos = stop
    if pos < end:
        # The rest: a hole, unless the list was cut short (then data: always safe to say).
        _extend(out, end - pos, len(out) < MAX_EXTENTS - 2)
    return out


def _extend(extents: list[Extent], length: int, hole: bool) -> None:
    if extents and extents[-1][1] == hole:
        extents[-1] = (extents[-1][0] + length, hole)
    else:
        extents.append((length, hole))


# The engine ---------------------------------------------------------------------------------


class _Operation:
    """One librbd request in flight: what completes it, and what librbd reads or writes, kept
    alive until it does."""

    __slots__ = ("done", "expected", "flush_after", "keep")

    def __init__(self, done: Done, keep: object = None, expected: int = -1, flush_after: bool = False) -> None:
        self.done = done
        self.keep = keep  # buffers and the iovec array: librbd uses them until the completion
        self.expected = expected  # a read's length; -1 for the rest, which return 0
        self.flush_after = flush_after  # a FUA write of several segments: a flush follows


class RbdEngine:
    """The engine of an RBD export: everything through librbd's asynchronous calls."""

    name = "rbd"

    def __init__(self, image: RbdImage) -> None:
        self.backing = image
        self._lib = image.lib.rbd
        self._native = native_calls(image.lib)  # None: every call through ctypes
        self._ops: dict[int, _Operation] = {}  # completion -> its operation, until it completes
        self._polled = (ctypes.c_void_p * POLL_BATCH)()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.lock: ExclusiveLock | None = None  # with --rbd-exclusive: I/O waits until it is held
        self._event_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        result = self._lib.rbd_set_image_notification(image.image, self._event_fd, EVENT_TYPE_EVENTFD)
        if result < 0:
            os.close(self._event_fd)
            raise RbdError(-result, f"{image.path}: cannot have completions notified: {os.strerror(-result)}")

    # Nothing is done in place: every request goes to the cluster.

    def readv_now(self, offset: int, segments: Sequence[Segment]) -> bool:
        return False

    def read_sparse_now(self, offset: int, segments: Sequence[Segment]) -> list[Extent] | None:
        return None

    def writev_now(self, offset: int, segments: Sequence[Segment], dsync: bool = False) -> bool:
        return False

    def flush_now(self, unflushed: int) -> bool:
        return False

    # Submission ------------------------------------------------------------------------------

    def _watch(self) -> asyncio.AbstractEventLoop:
        """The loop, watching the eventfd from the first request on."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._loop.add_reader(self._event_fd, self._reap)
        return self._loop

    def _completion(self, op: _Operation) -> int:
        """A completion without a callback for ``op``: it comes back through the eventfd."""
        self._watch()
        completion = ctypes.c_void_p()
        _check(
            self._lib.rbd_aio_create_completion(None, None, ctypes.byref(completion)),
            lambda code: f"{self.backing.path}: cannot make a completion: {os.strerror(code)}",
        )
        assert completion.value is not None
        self._ops[completion.value] = op
        return completion.value

    def _submit(self, what: str, op: _Operation, call: Callable[..., int], *args: object) -> None:
        """Start one librbd request, ``call(*args, completion)``; RbdError if librbd refuses it
        (then nothing will complete).  With an exclusive lock not held yet, once it is."""
        if self.lock is not None and not self.lock.held:
            self.lock.after(partial(self._submit_now, what, op, call, *args), partial(_fail, op))
            return
        self._submit_now(what, op, call, *args)

    def _submit_now(self, what: str, op: _Operation, call: Callable[..., int], *args: object) -> None:
        completion = self._completion(op)
        result = call(*args, completion)
        if result < 0:
            del self._ops[completion]
            self._lib.rbd_aio_release(completion)
            raise self._refused(what, -result)

    def _vectored(self, write: bool, offset: int, segments: Sequence[Segment], dsync: bool, done: Done) -> None:
        if self._native is not None and (self.lock is None or self.lock.held):
            self._start_native(write, offset, segments, dsync, done)
            return
        views = [view for view in (memoryview(s).cast("B") for s in segments) if len(view)]
        length = sum(len(view) for view in views)
        if not views:
            (self._loop or asyncio.get_running_loop()).call_soon(done, None, None)
            return
        if len(views) > IOV_MAX:  # the block layer's max_segments is at most IOV_MAX
            raise RbdError(errno.EINVAL, f"{self.backing.path}: {len(views)} segments in one request")
        image = self.backing.image
        if write and dsync and len(views) == 1:
            (view,) = views
            op = _Operation(done, view)
            self._submit(
                "write", op, partial(_fua_write2, self._lib.rbd_aio_write2), image, offset, length, address(view)
            )
            return
        flat: list[int] = []
        for view in views:
            flat += (address(view), len(view))
        iovecs = struct.pack(f"={len(flat)}Q", *flat)
        if write:
            op = _Operation(done, (views, iovecs), flush_after=dsync)
            self._submit("write", op, self._lib.rbd_aio_writev, image, iovecs, len(views), offset)
        else:
            op = _Operation(done, (views, iovecs), expected=length)
            self._submit("read", op, self._lib.rbd_aio_readv, image, iovecs, len(views), offset)

    def _start_native(self, write: bool, offset: int, segments: Sequence[Segment], dsync: bool, done: Done) -> None:
        """``_vectored`` by _rbd.c's calls: the segments' addresses gathered, the completion made
        and the request started in one call."""
        loop = self._loop or self._watch()
        kind = KIND_READ
        if write:
            kind = KIND_WRITE_FUA if dsync and len(segments) == 1 else KIND_WRITE
        completion = self._native.start(self.backing.image.value or 0, kind, offset, segments)
        if completion > 0:
            expected = -1 if write else segments_length(segments)
            self._ops[completion] = _Operation(done, segments, expected, dsync and kind == KIND_WRITE)
        elif completion == 0:  # no byte to move
            loop.call_soon(done, None, None)
        else:
            raise self._refused("write" if write else "read", -completion)

    def _refused(self, what: str, code: int) -> RbdError:
        """librbd would not start a request (then nothing will complete)."""
        return RbdError(code, f"{self.backing.path}: {what} refused: {os.strerror(code)}")

    def start_readv(self, offset: int, segments: Sequence[Segment], done: Done) -> None:
        self._vectored(False, offset, segments, False, done)

    def start_writev(self, offset: int, segments: Sequence[Segment], dsync: bool, done: Done) -> None:
        self._vectored(True, offset, segments, dsync, done)

    def _start_flush(self, done: Done) -> None:
        self._submit("flush", _Operation(done), self._lib.rbd_aio_flush, self.backing.image)

    async def _call(self, start: Callable[[Done], None], dsync: bool = False) -> None:
        """Start an operation and wait for it (then for a flush, with ``dsync``)."""
        loop = self._loop or asyncio.get_running_loop()
        future = loop.create_future()
        start(partial(resolve, future))
        await future
        if dsync:
            await self.flush()

    async def flush(self) -> None:
        if self.lock is not None and self.lock.released:
            return  # handed over: nothing of ours is cached (librbd's cache is off)
        await self._call(self._start_flush)

    async def discard(self, offset: int, length: int, dsync: bool = False) -> None:
        image = self.backing.image

        def start(done: Done) -> None:
            self._submit("discard", _Operation(done), self._lib.rbd_aio_discard, image, offset, length)

        await self._call(start, dsync)

    async def write_zeroes(
        self, offset: int, length: int, *, may_trim: bool, fast_only: bool, dsync: bool = False
    ) -> None:
        # Both ways are done in the cluster, without sending the zeroes: fast either way.
        image, flags = self.backing.image, 0 if may_trim else RBD_WRITE_ZEROES_FLAG_THICK_PROVISION

        def start(done: Done) -> None:
            call = partial(_write_zeroes, self._lib.rbd_aio_write_zeroes, flags)
            self._submit("write zeroes", _Operation(done), call, image, offset, length)

        await self._call(start, dsync)

    async def extents(self, offset: int, length: int) -> list[Extent]:
        loop = self._loop or asyncio.get_running_loop()
        return await loop.run_in_executor(None, self.backing.extents, offset, length)

    async def cache(self, offset: int, length: int) -> None:
        """Advisory, and librbd has no call to prefetch a range: nothing to do."""

    # Completion ------------------------------------------------------------------------------

    def _reap(self) -> None:
        """The eventfd is readable: take every finished completion, on the loop's thread."""
        try:
            if self._native is not None:
                finished = self._native.reap(self.backing.image.value or 0, self._event_fd)
            else:
                finished = self._poll()
        except OSError as exc:
            log.error("%s: polling completions: %s", self.backing.path, exc.strerror)
            return
        # Every operation is taken out before any is finished: the completions are released
        # already, and finishing one may start another (a flush after a FUA write, a request it
        # unblocked), whose new completion may get the address of a released one still listed.
        ops = [(self._ops.pop(completion, None), result) for completion, result in finished]
        for op, result in ops:
            if op is None:
                log.error("%s: a completion nobody waits for", self.backing.path)
                continue
            try:
                self._finish(op, result)
            except Exception:  # one caller's bug must not cost the completions after it
                log.exception("completion %r failed", op.done)

    def _poll(self) -> list[tuple[int, int]]:
        """Every finished completion and its result, released, through ctypes (the pure build)."""
        try:
            os.eventfd_read(self._event_fd)  # before polling: a later completion wakes us again
        except BlockingIOError:
            pass
        lib, image, polled = self._lib, self.backing.image, self._polled
        finished: list[tuple[int, int]] = []
        while True:
            count = lib.rbd_poll_io_events(image, polled, POLL_BATCH)
            if count < 0:
                if finished:
                    return finished  # these first: the error comes again at the next poll
                raise OSError(-count, os.strerror(-count))
            for i in range(count):
                completion: int = polled[i] or 0
                finished.append((completion, lib.rbd_aio_get_return_value(completion)))
                lib.rbd_aio_release(completion)
            if count < POLL_BATCH:
                return finished

    def _finish(self, op: _Operation, result: int) -> None:
        if result < 0:
            op.done(None, RbdError(-result, os.strerror(-result)))
        elif op.expected >= 0 and result != op.expected:
            # The protocol layer keeps requests within the image: a short read is an error here.
            log.error("%s: a read of %d bytes returned %d", self.backing.path, op.expected, result)
            op.done(None, RbdError(errno.EIO, f"short read: {result} of {op.expected} bytes"))
        elif op.flush_after:
            try:
                self._start_flush(op.done)
            except OSError as exc:
                op.done(None, exc)
        else:
            op.done(result, None)

    def close(self) -> None:
        """Release the image and the connection; every operation must have completed (the block
        layer drains first), but should one still be out, it is waited for: librbd may still
        write into its buffers."""
        if self.lock is not None:
            self.lock.cancel()
        for completion in list(self._ops):
            self._lib.rbd_aio_wait_for_complete(completion)
        if self._ops and self._loop is not None:
            self._reap()
        if self._loop is not None:
            loop: Any = self._loop
            loop.remove_reader(self._event_fd)
        self.backing.close()  # before the eventfd: librbd must not write into a reused descriptor
        os.close(self._event_fd)


def _fail(op: _Operation, error: OSError) -> None:
    op.done(None, error)


def _fua_write2(call: Any, image: object, offset: int, length: int, buffer: int, completion: int) -> int:
    return call(image, offset, length, buffer, completion, LIBRADOS_OP_FLAG_FADVISE_FUA)


def _write_zeroes(call: Any, flags: int, image: object, offset: int, length: int, completion: int) -> int:
    return call(image, offset, length, completion, flags, 0)
