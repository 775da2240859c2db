"""Accepting for another process: a listening socket whose clients are passed on, not served here
(the primary of a server with worker processes, see process/workers.py)."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable

log = logging.getLogger(__name__)

ACCEPT_BURST = 64  # clients accepted at once before the loop runs other work
ACCEPT_RETRY = 1.0  # seconds, after accept() failed (out of descriptors)


class Acceptor:
    """A listening socket whose clients go to ``take`` (for a worker) rather than to a connection
    here.  Like an ``asyncio.Server``, it has ``sockets`` and ``close()``."""

    def __init__(
        self, sock: socket.socket, take: Callable[[socket.socket], None], ready: Callable[[], bool] = lambda: True
    ) -> None:
        """``ready``: may another client be taken now?  If not, accepting waits for ``resume()``."""
        self._sock, self._take, self._ready = sock, take, ready
        self._loop = asyncio.get_running_loop()
        self._waiting = False
        sock.setblocking(False)
        self._loop.add_reader(sock.fileno(), self._accept)

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return (self._sock,) if self._sock.fileno() >= 0 else ()

    def close(self) -> None:
        if self._sock.fileno() >= 0:
            self._loop.remove_reader(self._sock.fileno())
            self._sock.close()

    def _accept(self) -> None:
        for _ in range(ACCEPT_BURST):
            if not self._ready():
                self._loop.remove_reader(self._sock.fileno())
                self._waiting = True
                return
            try:
                client, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of descriptors, say: try again later rather than spin
                log.error("cannot accept: %s; trying again in %.0f s", exc, ACCEPT_RETRY)
                self._loop.remove_reader(self._sock.fileno())
                self._waiting = True
                self._loop.call_later(ACCEPT_RETRY, self.resume)
                return
            self._take(client)

    def resume(self) -> None:
        """Accept again, if accepting waits."""
        if self._waiting and self._sock.fileno() >= 0:
            self._waiting = False
            self._loop.add_reader(self._sock.fileno(), self._accept)
