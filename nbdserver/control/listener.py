"""The control socket: a Unix socket, mode 0600, on which the primary takes commands.

Each client's requests are taken one at a time: reading pauses while a command runs, so a client
that sends a flood holds at most one line (protocol.MAX_LINE) and a read's worth here.  A command
runs to its end even if its client goes away meanwhile (half an export added would help nobody);
the reply is then dropped.  Every command that changes the server is logged with who asked: the
uid and pid the kernel gives for the peer (SO_PEERCRED).

An upgrade hands the listening socket to the successor (process/handover.py), so the socket's
file never goes away: a client that connects meanwhile waits in its backlog.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
import sys
from pathlib import Path
from typing import Any, cast

from ..config import CONTROL_FD_NAME
from ..serving.server import remove_socket, remove_stale_socket
from . import protocol, state
from .commands import CHANGES, COMMANDS, CommandError, Context, describe

log = logging.getLogger(__name__)

MODE = 0o600  # the server's own user (and root) only: commands change what is served
STOP_TIMEOUT = 30.0  # for the commands under way at shutdown
DRAIN_LIMIT = 4 * 1024 * 1024  # bytes read and dropped after an over-long request, before closing anyway


class ControlServer:
    """The control socket of one process, and its commands' context."""

    name = CONTROL_FD_NAME  # as handed over

    def __init__(self, path: Path, context: Context) -> None:
        self.path = path
        self.context = context
        self.changing = asyncio.Lock()  # one change at a time; an upgrade holds it too
        self._sock: socket.socket | None = None
        self._server: asyncio.AbstractServer | None = None
        self._owned = False  # its file is ours to remove at shutdown
        self._handed_over = False  # the successor takes the commands now
        self._clients: set[_Client] = set()
        self._commands: set[asyncio.Task[None]] = set()

    # The socket ----------------------------------------------------------------------------

    def bind(self) -> None:
        """Make the socket: a stale one of a dead server is replaced, a live one is an error (OSError)."""
        path = str(self.path)
        remove_stale_socket(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # created 0600: no moment in which others may connect
        try:
            sock.bind(path)
        except OSError:
            sock.close()
            raise
        finally:
            os.umask(old)
        os.chmod(path, MODE)
        sock.listen(socket.SOMAXCONN)
        self._sock, self._owned = sock, True

    def adopt(self, path: str, sock: socket.socket) -> None:
        """The socket a predecessor handed over (listening, its file in place)."""
        self._sock, self._owned = sock, True
        self.path = Path(path)

    async def serve(self) -> None:
        assert self._sock is not None
        loop = asyncio.get_running_loop()
        self._sock.setblocking(False)
        if sys.version_info >= (3, 13):  # asyncio would remove the file when it closes: see serving/server.py
            self._server = await loop.create_unix_server(self._client, sock=self._sock, cleanup_socket=False)
        else:
            self._server = await loop.create_unix_server(self._client, sock=self._sock)
        log.info("control socket on %s", self.path)

    def _client(self) -> _Client:
        return _Client(self)

    # An upgrade (process/handover.py's Handed) ----------------------------------------------

    def stop_accepting(self) -> tuple[str, socket.socket]:
        assert self._sock is not None
        copy = socket.socket(fileno=os.dup(self._sock.fileno()))
        if self._server is not None:
            self._server.close()
            self._server = None
        return str(self.path), copy

    async def take_back(self, sock: socket.socket) -> None:
        self._sock = sock
        await self.serve()

    def let_go(self) -> None:
        self._owned = False
        self._handed_over = True

    def successor_env(self) -> dict[str, str]:
        return state.for_successor(self.context.changes)

    # Life -------------------------------------------------------------------------------------

    async def close(self) -> None:
        """Take no more commands, let those under way finish, close the clients; the file goes
        unless a successor has it."""
        if self._server is not None:
            self._server.close()
            self._server = None
        if self._commands:
            await asyncio.wait(list(self._commands), timeout=STOP_TIMEOUT)
        for client in list(self._clients):
            client.close()
        if self._sock is not None:
            self._sock.close()
        if self._owned:
            remove_socket(str(self.path))
            self._owned = False

    # Commands ---------------------------------------------------------------------------------

    def run(self, client: _Client, request: protocol.Request) -> None:
        task = asyncio.get_running_loop().create_task(self._answer(client, request))
        self._commands.add(task)
        task.add_done_callback(self._commands.discard)

    async def _answer(self, client: _Client, request: protocol.Request) -> None:
        reply = await self.execute(request, client.who)
        client.send(reply)
        client.answered()

    async def execute(self, request: protocol.Request, who: str) -> bytes:
        """The reply to ``request``; never raises (a command that fails unexpectedly is logged)."""
        command = COMMANDS.get(request.command)
        if command is None:
            return protocol.error(f"unknown command {request.command!r} (known: {', '.join(COMMANDS)})")
        change = request.command in CHANGES
        what = describe(request.command, request.args)
        try:
            if not change:
                return protocol.ok(**await command(self.context, request.args))
            async with self.changing:
                if self._handed_over:
                    raise CommandError("the server was upgraded meanwhile: ask again")
                log.info("control: %s asks: %s", who, what)
                result = await command(self.context, request.args)
            log.info("control: %s: %s", who, result.get("message", "done"))
            return protocol.ok(**result)
        except CommandError as exc:
            if change:
                log.warning("control: %s: %s refused: %s", who, request.command, exc)
            return protocol.error(str(exc))
        except Exception as exc:  # a bug must cost this command only, never the server
            log.exception("control: %s: %s failed", who, what)
            return protocol.error(f"internal error: {exc!r}")


class _Client(asyncio.Protocol):
    """One control client: requests in, one at a time, replies out."""

    def __init__(self, control: ControlServer) -> None:
        self._control = control
        self._decoder = protocol.Decoder()
        self._transport: asyncio.Transport | None = None
        self._busy = False  # a command of this client's is under way
        self._full = False  # its replies are not read: nothing more is taken until they are
        self._dropping = -1  # after an over-long request: bytes read and dropped since (-1: none)
        self.who = "?"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # (uvloop's are not asyncio's classes)
        self._control._clients.add(self)
        self.who = _peer_credentials(self._transport.get_extra_info("socket"))

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._control._clients.discard(self)

    def data_received(self, data: bytes) -> None:
        if self._dropping >= 0:
            self._drop(len(data))
            return
        self._decoder.feed(data)
        self._next()

    def eof_received(self) -> bool:
        return self._dropping < 0  # keep the connection open for the reply under way, unless over-long

    def _drop(self, count: int) -> None:
        """After an over-long request: the error reply and the end of file are on their way; what
        the client still sends is read and dropped (closing with unread bytes would reset the
        connection, and the client might never read the reply), up to DRAIN_LIMIT."""
        self._dropping += count
        if self._dropping > DRAIN_LIMIT:
            self.close()

    def pause_writing(self) -> None:
        self._full = True
        self._reading()

    def resume_writing(self) -> None:
        self._full = False
        self._reading()
        self._next()

    def _reading(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            if self._busy or self._full:
                self._transport.pause_reading()
            else:
                self._transport.resume_reading()

    def _next(self) -> None:
        """Take the next whole request, unless one is under way or the replies are not read."""
        while not self._busy and not self._full and self._transport is not None:
            try:
                request = self._decoder.next()
            except protocol.BadRequest as exc:
                self.send(protocol.error(f"bad request: {exc}"))
                continue
            except protocol.TooLong as exc:
                log.warning("control: %s: %s: disconnected", self.who, exc)
                self.send(protocol.error(f"bad request: {exc}"))
                self._transport.write_eof()
                self._dropping = 0
                return
            if request is None:
                return
            self._busy = True
            self._reading()
            self._control.run(self, request)
        self._reading()

    def answered(self) -> None:
        self._busy = False
        self._reading()
        self._next()

    def send(self, reply: bytes) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(reply)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


def _peer_credentials(sock: Any) -> str:
    """``uid U pid P`` of the process at the other end, as the kernel saw it connect."""
    try:
        pid, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    except (OSError, AttributeError, struct.error):
        return "unknown peer"
    return f"uid {uid} pid {pid}"
