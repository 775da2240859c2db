"""``--rbd-exclusive``: an RBD image's exclusive lock taken for good by the process that serves it.

By default librbd passes an image's exclusive lock to whichever client writes (the owner lets go
when asked), so two servers on one image would both work, slowly, each write bouncing the lock.
Taken explicitly (``rbd_lock_acquire``), the lock is not given up when asked: another client's
writes fail with EROFS, and another server refuses to start, naming the owner.

The process that serves the export takes it when it starts serving (:meth:`ExclusiveLock.take`),
and I/O waits for it meanwhile.  Taking it is retried until the export's timeout, because at an
upgrade the predecessor holds it until it lets go of its connections (it releases it then), and
after a crash the replacement first breaks the dead process's lock (``RbdImage.fence``).
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import json
import logging
import os
import socket
from collections.abc import Callable
from functools import partial
from pathlib import Path
from time import monotonic
from typing import Any

from .librbd import RBD_LOCK_MODE_EXCLUSIVE, RbdError, RbdImage, Watcher

log = logging.getLogger(__name__)

RETRY = 0.1  # seconds between attempts while another process holds the lock


HOLDER_KEY = "nbdserver.holder"  # image metadata: who took the lock, to tell later if it died
_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def refuse_if_held(image: RbdImage) -> None:
    """At a server's first start: RbdError (EBUSY) naming the owner if a live client holds the
    lock; a dead one's lock is broken (see :func:`break_if_dead`)."""
    owners = [owner for owner in image.owners() if not break_if_dead(image, owner)]
    if owners:
        raise RbdError(
            errno.EBUSY,
            f"{image.path}: its exclusive lock is held by {', '.join(owners)} (another server or client; "
            f"`rbd lock ls` and `rbd status` say which): --rbd-exclusive does not share it",
        )


def break_if_dead(image: RbdImage, owner: str) -> bool:
    """Break ``owner``'s lock if it is dead (blocking); True if it was.

    A lock outlives its holder: the cluster breaks it for nobody.  The holder is dead when it was
    one of ours on this machine since its last boot whose process is gone (the image's metadata
    says who took the lock: :func:`record_holder`), or, for any other, when it no longer watches
    the image (the cluster drops a dead client's watch some 30 s after its death).
    """
    recorded = _recorded_holder(image)
    if recorded.get("address") == owner and recorded.get("boot") == _boot_id():
        alive = _running(int(recorded.get("pid", 0)))
    else:
        alive = owner in _watchers(image)
    return not alive and image.fence(owner)


def record_holder(image: RbdImage) -> None:
    """Say in the image's metadata that this process holds the lock (blocking)."""
    holder = {"address": image.holder, "pid": os.getpid(), "boot": _boot_id(), "host": socket.gethostname()}
    result = image.lib.rbd.rbd_metadata_set(image.image, HOLDER_KEY.encode(), json.dumps(holder).encode())
    if result < 0:
        log.warning("%s: cannot record the lock's holder: %s", image.path, os.strerror(-result))


def _recorded_holder(image: RbdImage) -> dict[str, Any]:
    size = ctypes.c_size_t(1024)
    value = ctypes.create_string_buffer(size.value)
    if image.lib.rbd.rbd_metadata_get(image.image, HOLDER_KEY.encode(), value, ctypes.byref(size)) < 0:
        return {}
    try:
        found = json.loads(value.value)
    except ValueError:
        return {}
    return found if isinstance(found, dict) else {}


def _watchers(image: RbdImage) -> list[str]:
    count = ctypes.c_size_t(64)
    watchers = (Watcher * count.value)()
    if image.lib.rbd.rbd_watchers_list(image.image, watchers, ctypes.byref(count)) < 0:
        return []  # cannot tell: taken as none, so a dead holder is not kept for ever
    found = [(watchers[i].addr or b"").decode() for i in range(count.value)]
    image.lib.rbd.rbd_watchers_list_cleanup(watchers, count)
    return found


def _boot_id() -> str:
    try:
        return _BOOT_ID.read_text().strip()
    except OSError:
        return ""


def _running(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's: it runs
    return True


class ExclusiveLock:
    """The lock of one image, in the process that serves it: taken once, held until released."""

    def __init__(self, image: RbdImage) -> None:
        self.image = image
        self.held = False
        self.released = False  # let go for a successor: never taken here again
        self._taking: asyncio.Task[None] | None = None
        self._waiting: list[tuple[Callable[[], None], Callable[[OSError], None]]] = []

    def take(self) -> None:
        """Start taking the lock, in the background (nothing if held or under way)."""
        if not self.held and not self.released and (self._taking is None or self._taking.done()):
            self._taking = asyncio.get_running_loop().create_task(self._take())

    def after(self, start: Callable[[], None], fail: Callable[[OSError], None]) -> None:
        """Run ``start`` once the lock is held (at once if it is); ``fail`` if it cannot be taken."""
        if self.held:
            start()
            return
        if self.released:
            fail(RbdError(errno.EIO, f"{self.image.path}: handed over to a successor, which holds the lock"))
            return
        self._waiting.append((start, fail))
        self.take()

    async def _take(self) -> None:
        image, loop = self.image, asyncio.get_running_loop()
        acquire = partial(image.lib.rbd.rbd_lock_acquire, image.image, RBD_LOCK_MODE_EXCLUSIVE)
        deadline = monotonic() + image.timeout
        while True:
            # A dead owner first: librbd would ask it for the lock and wait long for no answer.
            await loop.run_in_executor(None, _break_dead_owners, image)
            result = await loop.run_in_executor(None, acquire)
            if result >= 0:
                self.held = True
                await loop.run_in_executor(None, record_holder, image)
                log.info("%s: exclusive lock taken (--rbd-exclusive)", image.path)
                self._go_on(None)
                return
            if result not in (-errno.EROFS, -errno.EBUSY) or monotonic() > deadline:
                owners = await loop.run_in_executor(None, _owners, image)
                why = f"cannot take its exclusive lock within {image.timeout:g} s (held by {owners or 'nobody'})"
                log.error("%s: %s: %s", image.path, why, os.strerror(-result))
                self._go_on(RbdError(errno.EIO, f"{image.path}: {why}"))
                return
            await asyncio.sleep(RETRY)

    def _go_on(self, error: OSError | None) -> None:
        waiting, self._waiting = self._waiting, []
        for start, fail in waiting:
            if error is not None:
                fail(error)
                continue
            try:
                start()
            except OSError as exc:
                fail(exc)

    def release(self) -> None:
        """Let the lock go (blocking), for good: a successor takes it now.  Nothing is cached here
        to write back first (librbd's cache is off); I/O here fails from now on."""
        self.released = True
        self.cancel()
        if self.held:
            self.held = False
            result = self.image.lib.rbd.rbd_lock_release(self.image.image)
            if result < 0:
                log.error("%s: releasing its exclusive lock: %s", self.image.path, os.strerror(-result))
            else:
                log.info("%s: exclusive lock released for the successor", self.image.path)

    def cancel(self) -> None:
        if self._taking is not None:
            self._taking.cancel()


def _break_dead_owners(image: RbdImage) -> bool:
    try:
        return any([break_if_dead(image, owner) for owner in image.owners()])
    except OSError as exc:
        log.warning("%s: %s", image.path, exc)
        return False


def _owners(image: RbdImage) -> str:
    try:
        return ", ".join(image.owners())
    except OSError:
        return "?"
