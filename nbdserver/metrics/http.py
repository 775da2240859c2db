"""The /metrics endpoint: a few lines of HTTP on the event loop.

Served on the loop itself, a scrape reads every counter at one moment, with
no thread racing the code that updates them.  It answers ``GET /metrics``
(and ``/``) and nothing else; a slow or silent client is dropped after a few
seconds.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest

log = logging.getLogger(__name__)

# The classic text format, which every Prometheus reads (newer clients announce 1.0.0, which 2.x does not know).
CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
REQUEST_TIMEOUT = 5.0
MAX_REQUEST_HEAD = 16 * 1024


class MetricsEndpoint:
    def __init__(self, registry: CollectorRegistry, refresh: Callable[[], Awaitable[None]] | None = None) -> None:
        """``refresh``: brings the counters up to date before each scrape (asks the worker processes)."""
        self.registry = registry
        self._refresh = refresh
        self._server: asyncio.Server | None = None

    async def start(
        self, host: str | None = None, port: int | None = None, sock: socket.socket | None = None
    ) -> list[tuple[str, int]]:
        """Listen on ``host:port`` or on a listening ``sock``; returns the addresses bound (port 0 picks one)."""
        self._server = await asyncio.start_server(
            self._serve, host, port, sock=sock, reuse_address=None if sock else True, limit=MAX_REQUEST_HEAD
        )
        return [sock.getsockname()[:2] for sock in self._server.sockets]

    @property
    def sockets(self) -> tuple:
        return tuple(self._server.sockets) if self._server is not None else ()

    def close(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT)
            if self._refresh is not None:
                await self._refresh()
            writer.write(self._respond(head))
            await asyncio.wait_for(writer.drain(), REQUEST_TIMEOUT)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError):
            pass  # the client went away or sent no request: nothing to answer
        finally:
            writer.close()

    def _respond(self, head: bytes) -> bytes:
        method, _, rest = head.partition(b" ")
        path = rest.split(b" ", 1)[0].split(b"?", 1)[0]
        if method not in (b"GET", b"HEAD"):
            return _response(405, b"only GET\n", extra=b"Allow: GET, HEAD\r\n")
        if path not in (b"/metrics", b"/"):
            return _response(404, b"try /metrics\n")
        body = generate_latest(self.registry)
        return _response(200, body, CONTENT_TYPE, head_only=method == b"HEAD")


def _response(
    status: int, body: bytes, content_type: bytes = b"text/plain", extra: bytes = b"", head_only: bool = False
) -> bytes:
    reason = {200: b"OK", 404: b"Not Found", 405: b"Method Not Allowed"}[status]
    head = b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nConnection: close\r\n%s\r\n" % (
        status,
        reason,
        content_type,
        len(body),
        extra,
    )
    return head if head_only else head + body
