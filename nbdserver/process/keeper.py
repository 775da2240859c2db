"""A crash of the whole service costs its clients a pause: connections kept in systemd's fd store.

The primary outlives its workers' crashes by holding a copy of every connection and each worker's
arena (workers.py, recovery.py).  Under a service manager that keeps a file descriptor store for
the service (``$FDSTORE``, see fdstore.py), the store outlives the primary too: while a worker's
connection is in the transmission phase with a journal that describes its terms, the primary
keeps a copy of it there, and of the arena its journal is in:

    FDSTORE=1  FDNAME=nbd-a<pid>.<arena>                        FDPOLL=0   a worker's arena
    FDSTORE=1  FDNAME=nbd-c<pid>.<connection>.<arena>.<record>             a connection, and where
                                                                           its journal is
    FDSTOREREMOVE=1  FDNAME=...                                 when the connection ends, or the
                                                                arena is let go

``<pid>`` is the primary's, so that names never meet those of its predecessor.  When the
primary dies (SIGKILL, a segfault, the watchdog's abort), its workers exit at once without
touching their journals (worker.py), the manager restarts the service, and the next primary finds
the connections and arenas in ``LISTEN_FDS``: it reads each connection's terms from its journal,
drops the names from the store (our copies now; a journal is never read twice), and passes each
arena's connections to a worker as it passes a dead worker's (``WorkerPool.recover_kept``).

Not kept: connections still in the handshake, TLS and Unix socket connections (no journal),
connections of a server without worker processes (``processes = 1``), and connections beyond
what the store holds (``FileDescriptorStoreMax=``); those end with the primary, as before.
"""

from __future__ import annotations

import contextlib
import json
import logging
import mmap
import os
import socket
from dataclasses import dataclass, field
from typing import Any

from ..block.buffers import ARENA_SIZE
from ..serving.journal import JournalError, terms_at
from .systemd import Notifier

log = logging.getLogger(__name__)

ARENA = "nbd-a"
CONNECTION = "nbd-c"


@dataclass
class KeptConnection:
    """A connection the dead primary kept: what its worker called it, and its journal."""

    tag: int
    record: int
    sock: socket.socket
    terms: dict[str, Any] = field(default_factory=dict)


@dataclass
class KeptArena:
    """A dead worker's arena, and the connections whose journals are in it."""

    fd: int
    connections: list[KeptConnection] = field(default_factory=list)


class Keeper:
    """The primary's side of the store: what it has put there, by name."""

    def __init__(self, notifier: Notifier) -> None:
        self._notifier = notifier
        self._pid = os.getpid()
        self._arenas: set[int] = set()  # arenas in the store, by the pool's key
        self._connections: dict[int, str] = {}  # connection id -> its name in the store
        self._refused = False  # the store refused once: said once
        self._done = False  # a successor serves the connections: keep nothing more

    def keep(self, id_: int, arena: int, arena_fd: int, record: int, sock: socket.socket) -> None:
        """Put a journaled connection (and, the first time, its arena) into the store."""
        if self._done:
            return
        if arena not in self._arenas:
            name = f"{ARENA}{self._pid}.{arena}"
            if not self._store([f"FDNAME={name}", "FDPOLL=0"], arena_fd):
                return
            self._arenas.add(arena)
        name = f"{CONNECTION}{self._pid}.{id_}.{arena}.{record}"
        if self._store([f"FDNAME={name}"], sock.fileno()):
            self._connections[id_] = name

    def drop(self, id_: int) -> None:
        """The connection ended, or another process serves it now: out of the store, at once (it must
        never come back with a journal that no longer tells its state, and our close must reach
        its client)."""
        name = self._connections.pop(id_, None)
        if name is not None:
            self._notifier.notify("FDSTOREREMOVE=1", f"FDNAME={name}")

    def drop_arena(self, arena: int) -> None:
        if arena in self._arenas:
            self._arenas.discard(arena)
            self._notifier.notify("FDSTOREREMOVE=1", f"FDNAME={ARENA}{self._pid}.{arena}")

    def drop_all(self) -> None:
        """Everything out, and nothing more in: a successor serves the connections now (an upgrade;
        what stays here, handshakes, ends here)."""
        self._done = True
        for id_ in list(self._connections):
            self.drop(id_)
        for arena in list(self._arenas):
            self.drop_arena(arena)

    def _store(self, fields: list[str], fd: int) -> bool:
        if self._notifier.notify_fds(["FDSTORE=1", *fields], [fd]):
            return True
        if not self._refused:
            self._refused = True
            log.warning("the service manager does not keep descriptors: a crash of this process ends connections")
        return False


def split(stored: list[tuple[str, int]]) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(what a dead primary kept for a crash, the rest: a restart's state, fdstore.py)."""
    kept = [(name, fd) for name, fd in stored if name.startswith((ARENA, CONNECTION))]
    return kept, [(name, fd) for name, fd in stored if not name.startswith((ARENA, CONNECTION))]


def inherit(kept: list[tuple[str, int]]) -> list[KeptArena]:
    """The arenas and connections a dead primary kept, each connection with its terms read from its
    journal; a connection that cannot be taken over (no arena, no terms) is closed here."""
    arenas: dict[str, KeptArena] = {}
    connections: list[tuple[str, int, int, socket.socket]] = []
    for name, fd in kept:
        if name.startswith(ARENA):
            arenas[name[len(ARENA) :]] = KeptArena(fd)
            continue
        sock = socket.socket(fileno=fd)
        try:
            pid, id_, arena, record = name[len(CONNECTION) :].split(".")
            where = (f"{pid}.{arena}", int(id_), int(record))
        except ValueError:
            log.warning("the fd store holds %r, not a connection of ours: closed", name)
            close(sock)
            continue
        connections.append((*where, sock))
    for arena_name, tag, at, sock in connections:
        kept_arena = arenas.get(arena_name)
        if kept_arena is None:
            log.warning("a kept connection without its arena: closed")
            close(sock)
        else:
            kept_arena.connections.append(KeptConnection(tag, at, sock))
    out = []
    for kept_arena in arenas.values():
        _read_terms(kept_arena)
        if kept_arena.connections:
            out.append(kept_arena)
        else:
            os.close(kept_arena.fd)
    return out


def _read_terms(arena: KeptArena) -> None:
    """Each connection's terms from its journal; a connection whose journal keeps none is closed."""
    try:
        memory = mmap.mmap(arena.fd, ARENA_SIZE, prot=mmap.PROT_READ)
    except OSError as exc:
        log.warning("cannot map a kept arena: %s: its %d connection(s) closed", exc, len(arena.connections))
        for connection in arena.connections:
            close(connection.sock)
        arena.connections.clear()
        return
    with memory, memoryview(memory) as view:
        readable = []
        for connection in arena.connections:
            try:
                connection.terms = json.loads(terms_at(view, connection.record, connection.tag))
            except (JournalError, ValueError) as exc:
                log.warning("a kept connection cannot be taken over, closed: %s", exc)
                close(connection.sock)
                continue
            readable.append(connection)
        arena.connections[:] = readable


def close(sock: socket.socket) -> None:
    """Close for good, whichever other copies there are: the client must not wait on it."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()
