"""Live handover: a running server passes its sockets to its successor, and clients see only a pause.

On ``SIGUSR2`` the server starts its successor from its own command line,
with one end of a socket pair in ``NBDSERVER_HANDOVER_FD``.  The two talk in
frames (a JSON head, raw bytes, and file descriptors riding along):

    successor                         predecessor
    hello {versions, takes}    ──▶    (went on serving while the successor started)
                                      stops accepting; every connection in the transmission
                                      phase stops taking requests, answers those it took, and
                                      its replies leave the process ("quiesced")
                               ◀──    listener {name, path} + fd            (each listening socket)
                               ◀──    listener {name, path, extra} + fd     (the control socket, if it takes it)
                               ◀──    connection {terms} + fd + raw bytes   (each quiesced connection)
                               ◀──    end {quiesced_at}
    taken                      ──▶
                               ◀──    go           (the predecessor lets go of its copies and exits)
    accepts, resumes each connection with the bytes it had received but not taken

Until ``go`` the successor reads nothing from any socket, so the predecessor
can still take everything back: if the successor cannot start, says another
state version, or answers nothing in time, the predecessor sends ``abort``
and goes on serving.  End of file instead of ``go`` means the predecessor is
gone, its copies closed: the successor goes on.

Connections still in the handshake, and TLS connections (their session keys
cannot leave the process), are finished and closed as at a stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from functools import partial
from time import monotonic
from typing import Any, Protocol

from .. import build
from ..config import CONTROL_FD_NAME
from ..protocol import Negotiated, TransmissionFlag
from ..protocol.handshake import ExportInfo
from ..serving.connection import Connection
from ..serving.server import Server
from .frames import FrameError, receive_frame, send_frame
from .workers import WorkerError, pool_of, wait_or_kill

log = logging.getLogger(__name__)

STATE_VERSION = 1  # of what the frames carry; a successor that does not know it takes nothing
ENV_FD = "NBDSERVER_HANDOVER_FD"
START_TIMEOUT = 60.0  # for the successor to start and open its exports (the predecessor serves meanwhile)
QUIESCE_TIMEOUT = 10.0  # for a connection's replies to leave; a client that reads none is closed after it
ANSWER_TIMEOUT = 30.0  # for each answer once the sockets are on their way


class HandoverError(Exception):
    """The handover cannot go on; the message says why."""


@dataclass
class ConnectionTerms:
    """What a connection in the transmission phase negotiated, as the client knows it."""

    export: str
    size: int
    flags: int  # TransmissionFlag as sent to the client
    structured_replies: bool
    meta_contexts: dict[int, str]
    peer: str
    extended_headers: bool = False  # absent from a predecessor that had no extended headers
    holder: str = ""  # who held the export's lock in the process that served it (Export.holder)

    @classmethod
    def of(cls, negotiated: Negotiated, peer: str) -> ConnectionTerms:
        e = negotiated.export
        contexts = dict(negotiated.meta_contexts)
        structured, extended = negotiated.structured_replies, negotiated.extended_headers
        return cls(e.name, e.size, int(negotiated.flags), structured, contexts, peer, extended)

    def negotiated(self, info: ExportInfo) -> Negotiated:
        """The terms again, over the successor's export (which must be the same size)."""
        if info.size != self.size:
            raise HandoverError(f"export {self.export!r} is {info.size} bytes now, {self.size} before")
        flags, contexts = TransmissionFlag(self.flags), dict(self.meta_contexts)
        return Negotiated(info, flags, self.structured_replies, contexts, self.extended_headers)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ConnectionTerms:
        known = {f.name for f in fields(cls)}
        data = {k: v for k, v in data.items() if k in known}  # a later version may say more
        data["meta_contexts"] = {int(k): v for k, v in data["meta_contexts"].items()}
        return cls(**data)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        if not self.holder:  # as a version before it wrote them: one that knows no holder takes these
            del data["holder"]
        return data


# The successor as a process ------------------------------------------------------------


def successor_command() -> list[str]:
    """This process's own command line, run again: a newly installed version takes over."""
    args = sys.orig_argv[1:]
    while args[:1] == ["-P"]:  # this process's own, as a successor: child_command adds it once
        args = args[1:]
    return build.child_command(*args)


def start_successor(env_extra: dict[str, str]) -> tuple[subprocess.Popen[bytes], socket.socket]:
    """Start the successor with one end of a socket pair; returns it and our end."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        env = {**os.environ, **env_extra, ENV_FD: str(theirs.fileno())}
        proc = subprocess.Popen(successor_command(), env=env, pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL)
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    return proc, ours


def inherited_channel(environ: dict[str, str] | os._Environ[str] = os.environ) -> socket.socket | None:
    """The predecessor's end of the handover, if this process was started as a successor."""
    fd = environ.pop(ENV_FD, "")
    if not fd:
        return None
    sock = socket.socket(fileno=int(fd))
    os.set_inheritable(sock.fileno(), False)
    return sock


# The predecessor --------------------------------------------------------------------------


class Handed(Protocol):
    """A listening socket of a layer above the server's (the control socket), handed over beside
    the server's own to a successor that says it takes it (``takes`` in its hello)."""

    name: str

    def stop_accepting(self) -> tuple[str, socket.socket]:
        """Accept no more; (its path, a copy of the listening socket)."""
        ...

    async def take_back(self, sock: socket.socket) -> None:
        """The handover failed: accept again (on the copy)."""
        ...

    def let_go(self) -> None:
        """The successor has it: leave its file at shutdown."""
        ...


@dataclass
class Package:
    """Everything a successor takes: frames (head, raw bytes, socket) and the last one."""

    listeners: list[tuple[str, str, socket.socket]]  # copies: (name, our Unix path, socket)
    moving: list[Connection]
    frames: list[tuple[dict[str, Any], bytes, Any]]
    end: dict[str, Any]
    extras: list[tuple[Handed, socket.socket]] = field(default_factory=list)  # and our copies

    @property
    def connections(self) -> int:
        """How many connections go: this process's and the worker processes'."""
        return sum(head["type"] == "connection" for head, _, _ in self.frames)

    def let_go(self, server: Server) -> None:
        """The successor has it all: close our copies, without a word to the clients."""
        for _, _, sock in self.listeners:
            sock.close()
        for handed, sock in self.extras:
            handed.let_go()
            sock.close()
        server.disown_sockets()
        for connection in self.moving:
            connection.let_go()
        for export in server.exports.values():
            export.release_lock()  # the successor serves it now (--rbd-exclusive)
        workers = pool_of(server)
        if workers is not None:
            self._close_workers_copies()
            workers.let_go()

    async def take_back(self, server: Server) -> None:
        """Undo: listen again and take requests again."""
        if self.listeners:
            await server.start([(name, sock) for name, _, sock in self.listeners])
        for handed, sock in self.extras:
            await handed.take_back(sock)
        for connection in self.moving:
            connection.resume()
        workers = pool_of(server)
        if workers is not None:
            self._close_workers_copies()
            workers.take_back()

    def _close_workers_copies(self) -> None:
        """Our copies of the sockets of the workers' connections (the workers keep theirs)."""
        for head, _, sock in self.frames:
            if head.get("worker"):
                sock.close()


async def package(server: Server, listeners: bool = True, extras: Sequence[Handed] = ()) -> Package:
    """Stop accepting (if ``listeners``, and on ``extras``), quiesce the connections, and describe
    what is to go."""
    quiesced_at = monotonic()
    copies = server.stop_listening() if listeners else []
    handed = [(extra, *extra.stop_accepting()) for extra in extras]
    moving, closed_slow = await _quiesce(server)
    frames: list[tuple[dict[str, Any], bytes, Any]] = [
        ({"type": "listener", "name": name, "path": path}, b"", sock) for name, path, sock in copies
    ]
    frames += [({"type": "listener", "name": h.name, "path": p, "extra": True}, b"", sock) for h, p, sock in handed]
    extra_copies = [(h, sock) for h, _, sock in handed]
    for connection in moving:
        assert connection.negotiated is not None
        terms = ConnectionTerms.of(connection.negotiated, connection.peer)
        frames.append(
            ({"type": "connection", "terms": terms.to_json()}, connection.pending(), connection.transport_socket)
        )
    workers = pool_of(server)
    if workers is not None:
        try:
            theirs, their_slow = await workers.package()
        except WorkerError as exc:
            await Package(copies, moving, frames, {}, extra_copies).take_back(server)  # the workers' too
            raise HandoverError(f"the worker processes could not hand over: {exc}") from None
        frames += [({**head, "worker": True}, raw, sock) for head, raw, sock in theirs]
        closed_slow += their_slow
    end = {"type": "end", "version": STATE_VERSION, "quiesced_at": quiesced_at, "closed_slow": closed_slow}
    return Package(copies, moving, frames, end, extra_copies)


async def hand_over(
    server: Server, env_extra: dict[str, str], before_go: Callable[[int], None], extras: Sequence[Handed] = ()
) -> bool:
    """Start a successor and hand it every listening socket (``extras`` too, those it takes) and
    every connection it can take.

    True once the successor has them (this server then has only handshakes and TLS connections
    left to finish); False, with everything as before, if it could not be done.  ``before_go`` is
    called with the successor's PID just before it is let go (to tell the service manager).
    """
    loop = asyncio.get_running_loop()
    started = monotonic()
    try:
        proc, channel = start_successor(env_extra)
    except OSError as exc:
        log.error("upgrade failed, serving on: cannot start %s: %s", successor_command()[:3], exc)
        return False
    log.info("upgrade: successor started, pid %d", proc.pid)
    packed: Package | None = None
    try:
        channel.settimeout(START_TIMEOUT)
        hello, _, _ = await loop.run_in_executor(None, receive_frame, channel)
        if hello.get("type") != "hello" or STATE_VERSION not in hello.get("versions", ()):
            raise HandoverError(f"the successor does not take state version {STATE_VERSION}: {hello}")
        takes = hello.get("takes", [])  # a successor of the version before them takes none
        packed = await package(server, extras=[extra for extra in extras if extra.name in takes])
        channel.settimeout(ANSWER_TIMEOUT)
        await loop.run_in_executor(None, _send_state, channel, packed)
    except (OSError, EOFError, ValueError, HandoverError) as exc:
        why = _why(exc, proc)
        log.error("upgrade failed, serving on: %s", why)
        with contextlib.suppress(OSError):
            send_frame(channel, {"type": "abort", "why": why})
        channel.close()
        loop.run_in_executor(None, wait_or_kill, proc, ANSWER_TIMEOUT)
        if packed is not None:
            await packed.take_back(server)
        return False
    before_go(proc.pid)
    with contextlib.suppress(OSError):
        send_frame(channel, {"type": "go"})
    channel.close()
    packed.let_go(server)
    log.info(
        "upgrade: %d connection(s) and %d listener(s) handed to pid %d in %.3f s (%d closed: replies not read)",
        packed.connections,
        len(packed.listeners),
        proc.pid,
        monotonic() - started,
        packed.end["closed_slow"],
    )
    return True


async def _quiesce(server: Server) -> tuple[list[Connection], int]:
    """Quiesce every connection that can be handed over; close those that do not get quiet in time."""
    movable = [c for c in server.connections if c.negotiated is not None]
    for connection in movable:
        connection.quiesce()
    deadline = monotonic() + QUIESCE_TIMEOUT
    while monotonic() < deadline and not all(c.quiet() or c.closed.is_set() for c in movable):
        await asyncio.sleep(0.001)
    moving, slow = [], 0
    for connection in movable:
        if connection.closed.is_set():
            continue  # the client left meanwhile
        if connection.quiet():
            moving.append(connection)
        else:
            log.warning("%s: replies not read within %.0f s: closed for the upgrade", connection.peer, QUIESCE_TIMEOUT)
            server.turn_away(connection, "handover_timeout", "its replies were not read during an upgrade")
            connection.shutdown()
            slow += 1
    return moving, slow


def _send_state(channel: socket.socket, packed: Package) -> None:
    for head, raw, sock in packed.frames:
        send_frame(channel, head, raw, [sock.fileno()])
    send_frame(channel, packed.end)
    answer, _, _ = receive_frame(channel)
    if answer.get("type") != "taken":
        raise HandoverError(f"the successor did not take over: {answer.get('why', answer)}")


def _why(exc: BaseException, proc: subprocess.Popen[bytes]) -> str:
    if isinstance(exc, EOFError | ConnectionError):
        try:
            status = proc.wait(5)
        except subprocess.TimeoutExpired:
            return f"the successor closed the handover ({exc})"
        return f"the successor exited with status {status} (its log says why)"
    if isinstance(exc, TimeoutError):
        return "the successor did not answer in time"
    return str(exc)


# The successor -------------------------------------------------------------------------------


@dataclass
class Inheritance:
    """What a successor took over: sockets to listen on, connections to resume."""

    listeners: list[tuple[str, socket.socket]] = field(default_factory=list)
    owned_paths: list[str] = field(default_factory=list)
    extras: dict[str, tuple[str, socket.socket]] = field(default_factory=dict)  # name: (path, socket)
    connections: list[tuple[ConnectionTerms, socket.socket, bytes]] = field(default_factory=list)
    quiesced_at: float = 0.0
    closed_slow: int = 0

    def add(self, head: dict[str, Any], raw: bytes, fd: int | None) -> bool:
        """Take one frame; True once it was the last."""
        kind = head.get("type")
        if kind == "listener" and fd is not None and head.get("extra"):
            self.extras[head["name"]] = (head["path"], socket.socket(fileno=fd))
        elif kind == "listener" and fd is not None:
            self.listeners.append((head["name"], socket.socket(fileno=fd)))
            if head["path"]:
                self.owned_paths.append(head["path"])
        elif kind == "connection" and fd is not None:
            self.connections.append((ConnectionTerms.from_json(head["terms"]), socket.socket(fileno=fd), raw))
        elif kind == "end":
            if head.get("version") != STATE_VERSION:
                raise HandoverError(f"state version {head.get('version')} is not {STATE_VERSION}")
            self.quiesced_at, self.closed_slow = head["quiesced_at"], head["closed_slow"]
            return True
        else:
            raise HandoverError(f"unexpected {kind!r} from the predecessor: {head.get('why', '')}")
        return False

    def close(self) -> None:
        for _, sock in [*self.listeners, *self.extras.values()]:
            sock.close()
        for _, sock, _ in self.connections:
            sock.close()


async def take_over(channel: socket.socket) -> Inheritance:
    """Say hello, receive the predecessor's sockets, and wait for its go; HandoverError if it aborts."""
    loop = asyncio.get_running_loop()
    try:
        return await loop.run_in_executor(None, _receive_state, channel)
    except FrameError as exc:
        raise HandoverError(f"the predecessor sent {exc}") from None


def _receive_state(channel: socket.socket) -> Inheritance:
    inherited = Inheritance()
    channel.settimeout(ANSWER_TIMEOUT + QUIESCE_TIMEOUT + START_TIMEOUT)
    hello = {"type": "hello", "versions": [STATE_VERSION], "pid": os.getpid(), "takes": [CONTROL_FD_NAME]}
    send_frame(channel, hello)
    try:
        while True:
            head, raw, fds = receive_frame(channel)
            if inherited.add(head, raw, fds[0] if fds else None):
                break
        send_frame(channel, {"type": "taken"})
        try:
            answer, _, _ = receive_frame(channel)
        except EOFError:
            answer = {"type": "go"}  # the predecessor is gone, and its copies with it
        if answer.get("type") != "go":
            raise HandoverError(f"the predecessor took everything back: {answer.get('why', answer)}")
    except BaseException:
        inherited.close()  # nothing was read from these: the predecessor still holds them and serves on
        raise
    finally:
        channel.close()
    return inherited


async def resume(server: Server, inherited: Inheritance) -> int:
    """Serve the connections taken over (here, or in the worker processes); returns how many
    resumed (the others are closed)."""
    workers = pool_of(server)
    if workers is not None:
        resumed = sum(workers.resume(t.to_json(), p, s) for t, s, p in inherited.connections)
        server.stats.turned_away["handover_timeout"] += inherited.closed_slow
        return resumed
    transports = []
    for terms, sock, pending in inherited.connections:
        coroutine = adopt(server, terms, sock, pending)
        if coroutine is not None:
            transports.append(coroutine)
    await asyncio.gather(*transports)
    server.stats.turned_away["handover_timeout"] += inherited.closed_slow
    return len(transports)


def adopt(
    server: Server, terms: ConnectionTerms, sock: socket.socket, pending: bytes, tag: int = -1, resend: bytes = b""
) -> Awaitable[Any] | None:
    """Serve a connection in the transmission phase here, on the terms it negotiated elsewhere, with
    the bytes received there and not taken (and what of its replies the client is still to receive:
    see recovery.py); None, the socket closed, if it cannot be served here."""
    export = server.exports.get(terms.export)
    try:
        if export is None:
            raise HandoverError(f"export {terms.export!r} is not configured here")
        negotiated = terms.negotiated(export.info)
    except HandoverError as exc:
        log.warning("%s: not taken over, closed: %s", terms.peer, exc)
        sock.close()
        return None
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    return loop.connect_accepted_socket(partial(Connection, server, (negotiated, pending), resend, tag), sock)
