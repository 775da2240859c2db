"""The server: opens the exports, listens, keeps track of connections, shuts down cleanly."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import stat
from collections import Counter
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry

from .block.buffers import BufferPool
from .config import Listener, ServerConfig
from .connection import Connection
from .export import Export
from .metrics import MetricsEndpoint, ServerCollector
from .protocol import Error, ExportCatalog
from .protocol.errors import VIOLATION_KINDS

log = logging.getLogger(__name__)


@dataclass
class ServerStats:
    """Counters of the server as a whole, kept by the connections."""

    connections: int = 0  # accepted
    # Disconnects by the rule broken, and (export, NBD error) of refused requests: counted from zero.
    protocol_errors: Counter[str] = field(default_factory=lambda: Counter(dict.fromkeys(VIOLATION_KINDS, 0)))
    refused: Counter[tuple[str, str]] = field(default_factory=Counter)


class Server:
    def __init__(self, config: ServerConfig) -> None:
        config.validate()
        self.config = config
        self.exports: dict[str, Export] = {}
        self.connections: set[Connection] = set()
        self._listeners: list[asyncio.Server] = []
        self.addresses: list[str] = []
        self.catalog = ExportCatalog([], None)
        self.pool = BufferPool(config.buffer_pool_bytes)  # request buffers, shared by every export
        self.stats = ServerStats()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(ServerCollector(self))
        self._metrics: MetricsEndpoint | None = None
        self.metrics_addresses: list[str] = []

    def open_exports(self) -> None:
        """Open every backing file; raises OSError naming the one that failed."""
        try:
            for export_config in self.config.exports:
                export = Export(export_config, self.config, self.pool)
                self.exports[export.name] = export
                log.info(
                    "export %r: %s, %d bytes, cache %s%s",
                    export.name,
                    export_config.path,
                    export.info.size,
                    export_config.cache,
                    ", read-only" if export_config.read_only else "",
                )
        except BaseException:
            for export in self.exports.values():
                export.engine.close()
            raise
        self.catalog = ExportCatalog([e.info for e in self.exports.values()], self.config.default_export)
        for name in self.exports:
            for error in (Error.EINVAL, Error.EPERM, Error.ENOSPC, Error.EOVERFLOW):
                self.stats.refused[name, error.name] += 0

    async def start(self) -> None:
        """Listen on every configured address; raises OSError (e.g. address in use)."""
        loop = asyncio.get_running_loop()
        for listener in self.config.listeners:
            if listener.is_unix:
                _remove_stale_socket(listener.path)
                srv = await loop.create_unix_server(lambda: Connection(self), listener.path)
            else:
                srv = await loop.create_server(
                    lambda: Connection(self), listener.host, listener.port, reuse_address=True
                )
            self._listeners.append(srv)
            for sock in srv.sockets:
                self.addresses.append(_describe(sock, listener))
        for address in self.addresses:
            log.info("listening on %s", address)
        if self.config.metrics is not None:
            self._metrics = MetricsEndpoint(self.registry)
            bound = await self._metrics.start(self.config.metrics.host, self.config.metrics.port)
            self.metrics_addresses = [f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in bound]
            for address in self.metrics_addresses:
                log.info("metrics on http://%s/metrics", address)
        log.info("ready: %d export(s) on %d address(es)", len(self.exports), len(self.addresses))

    def connection_made(self, connection: Connection) -> None:
        self.connections.add(connection)
        self.stats.connections += 1
        log.info("%s: connected", connection.peer)

    def connection_lost(self, connection: Connection) -> None:
        self.connections.discard(connection)
        log.info("%s: disconnected", connection.peer)

    async def shutdown(self, timeout: float = 30.0) -> None:
        """Stop accepting, answer what is in flight, flush every export, close."""
        for srv in self._listeners:
            srv.close()
        if self._metrics is not None:
            self._metrics.close()
        for connection in list(self.connections):
            connection.shutdown()
        waits = [c.closed.wait() for c in list(self.connections)]
        if waits:
            _, pending = await asyncio.wait([asyncio.ensure_future(w) for w in waits], timeout=timeout)
            for task in pending:
                task.cancel()
            if pending:
                log.warning("%d connection(s) did not finish within %.0f s", len(pending), timeout)
        for export in self.exports.values():
            await export.close()
        log.info("buffer pool: %d blocks allocated, %d bytes idle", self.pool.created, self.pool.idle_bytes)
        for listener in self.config.listeners[: len(self._listeners)]:
            if listener.is_unix:
                _remove_socket(listener.path)


def _describe(sock: socket.socket, listener: Listener) -> str:
    if listener.is_unix:
        return f"unix:{listener.path}"
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _remove_stale_socket(path: str) -> None:
    """Remove a Unix socket left by a server that is gone; refuse to take a live one."""
    try:
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            return  # binding will fail with a clear EADDRINUSE
    except FileNotFoundError:
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)
        return
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, "another server is listening on this socket", path)


def _remove_socket(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
