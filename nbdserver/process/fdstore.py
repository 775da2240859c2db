"""``systemctl restart`` without disconnecting: connections wait in systemd's file descriptor store.

On SIGTERM under a service manager that keeps a store for the service
(``$FDSTORE`` gives its size: systemd sets it from version 254 on, and the
packaged unit sets it beside ``FileDescriptorStoreMax=`` for older ones), the
server packs what a SIGUSR2 successor would be handed (handover.py) into the
store instead: each socket as ``FDSTORE=1`` with ``FDNAME=nbd-N``, and the
frames that describe them in a memfd named ``nbd-state``.

The next start finds them in ``LISTEN_FDS``/``LISTEN_FDNAMES``, resumes the
connections, and removes each name from the store (``FDSTOREREMOVE=1``):
while the store holds a copy, our close of a connection would not reach its
client.  On ``systemctl stop`` systemd closes what the store holds, so the
clients see the end, as at any stop, once every request they sent was
answered.
"""

from __future__ import annotations

import logging
import os
from collections.abc import MutableMapping

from ..serving.server import Server
from .frames import decode_frames, encode_frame
from .handover import HandoverError, Inheritance, package
from .systemd import Notifier

log = logging.getLogger(__name__)

PREFIX = "nbd-"  # names of our descriptors in the store; the socket units' names are other
STATE = "nbd-state"


def capacity(environ: MutableMapping[str, str] = os.environ) -> int:
    """How many descriptors the service manager keeps for us (0: no store)."""
    try:
        return int(environ.get("FDSTORE", "0"))
    except ValueError:
        return 0


def split(named: list[tuple[str, int]]) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(what our store kept, the rest: socket activation's listeners)."""
    ours = [(name, fd) for name, fd in named if name.startswith(PREFIX)]
    return ours, [(name, fd) for name, fd in named if not name.startswith(PREFIX)]


async def store(server: Server, notifier: Notifier, listeners: bool) -> bool:
    """Quiesce and put every connection (and, unless the manager owns them, the listening sockets)
    into the store; True if the store took them all."""
    packed = await package(server, listeners)
    if len(packed.frames) + 1 > capacity():
        log.warning(
            "the fd store keeps %d descriptors, %d are needed: stopping as usual", capacity(), 1 + len(packed.frames)
        )
        await packed.take_back(server)
        return False
    state = bytearray()
    for i, (head, raw, sock) in enumerate(packed.frames):
        name = f"{PREFIX}{i}"
        if not notifier.notify_fds(["FDSTORE=1", f"FDNAME={name}"], [sock.fileno()]):
            await packed.take_back(server)
            return False
        state += encode_frame({**head, "fdname": name}, raw)
    state += encode_frame(packed.end)
    memfd = os.memfd_create(STATE, os.MFD_CLOEXEC)
    try:
        view = memoryview(state)
        while view:
            view = view[os.write(memfd, view) :]
        stored = notifier.notify_fds(["FDSTORE=1", f"FDNAME={STATE}", "FDPOLL=0"], [memfd])
    finally:
        os.close(memfd)
    if not stored:
        await packed.take_back(server)
        return False
    packed.let_go(server)
    log.info("%d connection(s) and %d listener(s) kept in the fd store", packed.connections, len(packed.listeners))
    return True


def unpack(stored: list[tuple[str, int]]) -> Inheritance:
    """What the store kept, as a successor takes it; HandoverError (every descriptor closed) if it
    cannot be understood."""
    fds = dict(stored)
    inherited = Inheritance()
    try:
        if STATE not in fds:
            raise HandoverError("the fd store holds connections but no state")
        data = _read_all(fds.pop(STATE))
        for head, raw in decode_frames(data):
            if inherited.add(head, raw, fds.pop(head["fdname"]) if "fdname" in head else None):
                break
        else:
            raise HandoverError("the state in the fd store has no end")
    except (HandoverError, KeyError, ValueError) as exc:
        inherited.close()
        for fd in fds.values():
            os.close(fd)
        raise HandoverError(f"cannot take what the fd store kept: {exc!r}") from None
    for fd in fds.values():  # named like ours, described nowhere
        os.close(fd)
    return inherited


def forget(notifier: Notifier, stored: list[tuple[str, int]]) -> None:
    """Remove our descriptors from the store: we hold them now, and our close must reach the clients."""
    for name, _ in stored:
        notifier.notify("FDSTOREREMOVE=1", f"FDNAME={name}")


def _read_all(fd: int) -> bytes:
    try:
        size = os.fstat(fd).st_size
        return os.pread(fd, size, 0)
    finally:
        os.close(fd)
