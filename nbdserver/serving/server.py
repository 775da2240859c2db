"""The server: opens the exports, listens, keeps track of connections, shuts down cleanly."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import stat
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Protocol

from prometheus_client import CollectorRegistry

from ..backing.librbd import RbdImage
from ..block.buffers import Arena, BufferPool, ByteBudget
from ..block.dirty import DirtyBitmap, ExportBitmaps
from ..block.ledger import Ledger
from ..config import METRICS_FD_NAME, ConfigError, ExportConfig, Listener, ServerConfig
from ..metrics import MetricsEndpoint, ServerCollector
from ..protocol import Error, ExportCatalog, TlsMode
from ..stats import ServerStats, Snapshot
from .acceptor import Acceptor
from .cloning import Cloner
from .connection import Connection
from .export import Export, open_image
from .polling import BusyPoll
from .tls import tls_context

log = logging.getLogger(__name__)

# Not asyncio's 100: a burst of connections overflowing the queue has the kernel drop their SYNs,
# and those clients wait 1 s, then 3 s, to try again.  The kernel caps it at net.core.somaxconn.
LISTEN_BACKLOG = socket.SOMAXCONN


class LogThrottle:
    """At most ``burst`` lines every ``period`` seconds for one kind of event (a flood of clients
    must not become a flood of log lines); the lines not logged are counted for the next one."""

    def __init__(self, burst: int = 10, period: float = 10.0) -> None:
        self.burst, self.period = burst, period
        self._since = -period
        self._logged = self._skipped = 0

    def allow(self) -> str | None:
        """None: leave this one out.  Otherwise a suffix for the line, naming those left out before."""
        now = time.monotonic()
        if now - self._since >= self.period:
            self._since, self._logged = now, 0
        if self._logged >= self.burst:
            self._skipped += 1
            return None
        self._logged += 1
        skipped, self._skipped = self._skipped, 0
        return f" ({skipped} more since the last such line were not logged)" if skipped else ""


class Workers(Protocol):
    """The worker processes a primary passes its clients to (process/workers.py's ``WorkerPool``),
    as the server sees them: the process layer above owns them, this layer only uses them."""

    count: int
    lost: int  # workers that died (and were replaced) so far
    on_clone_ask: Callable[[str, int, int], None]  # a worker's gate wants these granules of an export
    on_change: Callable[[], None]  # a worker's number of connections changed
    on_room: list[Callable[[], None]]  # called when has_room() may have become true

    @property
    def connections(self) -> int: ...
    def has_room(self) -> bool: ...
    def take(self, sock: socket.socket) -> bool: ...
    async def start(self) -> None: ...
    async def refresh(self) -> None: ...
    def add_to(self, snapshot: Snapshot) -> Snapshot: ...
    def reload(self, config: ServerConfig) -> None: ...
    async def apply(self, config: ServerConfig) -> list[str]: ...
    async def hide_export(self, name: str, hidden: bool) -> int: ...
    async def drop_export(self, name: str, config: ServerConfig) -> int: ...
    async def load_bitmaps(self, export: str) -> list[str]: ...
    async def hold_export(self, name: str, timeout: float) -> list[str]: ...
    async def release_export(self, name: str, gate: int) -> None: ...
    def clone_progress(self, name: str, frontier: int, beyond: list[int]) -> None: ...
    def clone_end(self, name: str) -> None: ...
    async def stop(self, timeout: float) -> None: ...


class Server:
    def __init__(
        self,
        config: ServerConfig,
        ledger: Ledger | None = None,
        workers: Workers | None = None,
        arena: Arena | None = None,
        worker: bool = False,
    ) -> None:
        """``ledger``: shared with the other processes serving the same exports (a worker's).
        ``workers``: the worker processes that serve this server's clients (the primary's).
        ``arena``: memory that outlives this process, for the request buffers and the connections'
        journals (a worker's: its primary keeps the arena, see journal.py).  ``worker``: this is a
        worker process, which opens the dirty bitmaps its primary makes and removes."""
        config.validate()
        self.config = config
        self.exports: dict[str, Export] = {}
        self.connections: set[Connection] = set()
        self._listeners: list[asyncio.Server | Acceptor] = []
        self.addresses: list[str] = []
        self.catalog = ExportCatalog([], None)
        self.pool = BufferPool(config.buffer_pool_bytes, arena)  # request buffers, shared by every export
        self.budget = ByteBudget(config.max_server_inflight_bytes)  # in flight across every export
        self.ledger = ledger or Ledger()  # bytes written since each backing file's last flush
        self.stats = ServerStats()
        self.busy_poll = BusyPoll(config.busy_poll_us, self.stats)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(ServerCollector(self.snapshot))
        self._metrics: MetricsEndpoint | None = None
        self.metrics_addresses: list[str] = []
        self._unix_paths: list[str] = []  # sockets we created, removed at shutdown
        self.on_change: Callable[[], None] = lambda: None  # connections came or went
        self.on_journaled: Callable[[Connection], None] = lambda connection: None  # see journaled()
        self.on_lost: Callable[[Connection], None] = lambda connection: None  # a connection ended
        self.tls_mode = TlsMode(config.tls)
        self.tls_context = tls_context(config)  # None when TLS is off
        self._turned_away_log = LogThrottle()
        self.workers = workers
        self._hidden: set[str] = set()  # exports offered to no new client while their removal is decided
        self._worker = worker
        self.cloners: dict[str, Cloner] = {}  # snapshots' files being cloned, by export (snapshots.py)

    def open_exports(self) -> None:
        """Open every backing file; raises OSError naming the one that failed."""
        try:
            for export_config in self.config.exports:
                self._open_export(export_config)
        except BaseException:
            for export in self.exports.values():
                export.engine.close()
            raise
        self._update_catalog()

    async def _open_export_off_loop(self, config: ExportConfig) -> None:
        store = None
        if config.rbd is not None:
            store = await asyncio.get_running_loop().run_in_executor(None, open_image, config, self.config)
        self._open_export(config, store)

    def _open_export(self, config: ExportConfig, store: RbdImage | None = None) -> None:
        export = Export(config, self.config, self.pool, self.ledger, self.budget, store, not self._worker)
        self.exports[export.name] = export
        for error in (Error.EINVAL, Error.EPERM, Error.ENOSPC, Error.EOVERFLOW):
            self.stats.refused[export.name, error.name] += 0  # shown from zero
        log.info(
            "export %r: %s, %d bytes, cache %s, engine %s%s",
            export.name,
            config.path,
            export.info.size,
            config.cache,
            export.engine.name,
            ", read-only" if config.read_only else "",
        )

    def _update_catalog(self) -> None:
        """What handshakes from now on offer."""
        self.catalog = ExportCatalog([e.info for e in self._offered()], self.config.default_export)

    def _offered(self) -> list[Export]:
        return [e for e in self.exports.values() if e.name not in self._hidden]

    def catalog_for(self, address: str | None) -> ExportCatalog:
        """The exports a client at ``address`` (None: a Unix socket) may see and use."""
        if self.config.allow is None and all(e.config.allow is None for e in self.exports.values()):
            return self.catalog
        infos = [e.info for e in self._offered() if e.config.allows(self.config, address)]
        default = self.catalog.default if any(i.name == self.catalog.default for i in infos) else ""
        return ExportCatalog(infos, default)

    async def start_workers(self) -> None:
        """Start the worker processes, if any; WorkerError if one cannot start."""
        if self.workers is not None:
            self.workers.on_change = lambda: self.on_change()
            self.workers.on_clone_ask = self.clone_asked
            await self.workers.start()

    async def start(self, inherited: Sequence[tuple[str, socket.socket]] = (), owned: Sequence[str] = ()) -> None:
        """Listen on the inherited sockets (socket activation, a handover) if any, else on every configured
        address.

        An inherited socket named ``metrics`` serves /metrics.  ``owned``: Unix socket paths among the
        inherited ones that are ours to remove at shutdown (a predecessor made them).  Raises OSError
        (e.g. address in use).
        """
        self._unix_paths.extend(owned)
        metrics_socket = None
        for name, sock in inherited:
            if name == METRICS_FD_NAME:
                metrics_socket = sock
                continue
            await self._serve(sock)
        if not self._listeners:
            for listener in self.config.listeners:
                await self._listen(listener)
        for address in self.addresses:
            log.info("listening on %s", address)
        if metrics_socket is not None or self.config.metrics is not None:
            self._metrics = MetricsEndpoint(self.registry, self.workers.refresh if self.workers is not None else None)
            if metrics_socket is not None:
                bound = await self._metrics.start(sock=metrics_socket)
            else:
                assert self.config.metrics is not None
                bound = await self._metrics.start(self.config.metrics.host, self.config.metrics.port)
            self.metrics_addresses = [str(Listener(host, port)) for host, port in bound]
            for address in self.metrics_addresses:
                log.info("metrics on http://%s/metrics", address)
        log.info("ready: %s", self.status())

    async def _listen(self, listener: Listener) -> None:
        """Bind ``listener``'s address(es) and serve them."""
        loop = asyncio.get_running_loop()
        serving = self.workers is None  # else bound only, for _serve to take over
        if listener.is_unix:
            remove_stale_socket(listener.path)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(listener.path)
            self._unix_paths.append(listener.path)
            os.chmod(listener.path, self.config.unix_socket_mode)
            await self._serve(sock)
            return
        srv = await loop.create_server(
            lambda: Connection(self),
            listener.host,
            listener.port,
            reuse_address=True,
            backlog=LISTEN_BACKLOG,
            start_serving=serving,
        )
        if serving:
            self._listeners.append(srv)
            self.addresses.extend(describe_socket(sock) for sock in srv.sockets)
            return
        bound = [socket.socket(fileno=os.dup(sock.fileno())) for sock in srv.sockets]
        srv.close()
        for sock in bound:
            await self._serve(sock)

    async def _serve(self, sock: socket.socket) -> None:
        """Accept on a bound socket: the clients are served here, or passed on to the workers."""
        loop = asyncio.get_running_loop()
        listener: asyncio.Server | Acceptor
        if self.workers is not None:
            sock.listen(LISTEN_BACKLOG)
            listener = Acceptor(sock, self._take, self.workers.has_room)
            self.workers.on_room.append(listener.resume)
        elif sock.family == socket.AF_UNIX:
            listener = await _unix_server(loop, lambda: Connection(self), sock)
        else:
            listener = await loop.create_server(lambda: Connection(self), sock=sock, backlog=LISTEN_BACKLOG)
        self._listeners.append(listener)
        self.addresses.append(describe_socket(sock))

    def _take(self, sock: socket.socket) -> None:
        """A new client, for a worker process."""
        assert self.workers is not None
        if self.workers.connections >= self.config.max_connections:
            why = f"{self.workers.connections} connections are open already"
            self._turned_away(_peer(sock), "max_connections", why)
            sock.close()
        elif not self.workers.take(sock):
            log.error("no worker process took a new connection: closed")

    def stop_listening(self) -> list[tuple[str, str, socket.socket]]:
        """Stop accepting; returns a copy of every listening socket, to hand over or listen on again:
        (name as ``start`` takes it, the path if it is a Unix socket of ours, the socket)."""
        copies = []
        for srv in self._listeners:
            for listening in srv.sockets:
                copy = socket.socket(fileno=os.dup(listening.fileno()))
                address = describe_socket(copy)
                path = address.removeprefix("unix:")
                copies.append(("", path if address.startswith("unix:") and path in self._unix_paths else "", copy))
            srv.close()
        if self._metrics is not None:
            for listening in self._metrics.sockets:
                copies.append((METRICS_FD_NAME, "", socket.socket(fileno=os.dup(listening.fileno()))))
            self._metrics.close()
        self._listeners, self._metrics = [], None
        self.addresses, self.metrics_addresses = [], []
        if self.workers is not None:
            self.workers.on_room.clear()
        return copies

    def disown_sockets(self) -> None:
        """Our Unix sockets belong to a successor now: leave their files at shutdown."""
        self._unix_paths = []

    def snapshot(self) -> Snapshot:
        """What /metrics shows of this process (the exports' counters themselves, not copies)."""
        exports = {name: e.snapshot() for name, e in self.exports.items()}
        negotiating = 0
        for connection in self.connections:
            if connection.export is None:
                negotiating += 1
            elif connection.export.name in exports:  # (not one being disconnected from a removed export)
                exports[connection.export.name].connections += 1
        clients = [
            {"peer": c.peer, "export": c.export.name if c.export is not None else None, "in_flight": c.in_flight}
            for c in self.connections
        ]
        own = Snapshot(self.stats, exports, negotiating, clients)
        return self.workers.add_to(own) if self.workers is not None else own

    def status(self) -> str:
        """One line for STATUS= and the log."""
        connections = len(self.connections) + (self.workers.connections if self.workers is not None else 0)
        workers = f", {self.workers.count} worker processes" if self.workers is not None else ""
        return (
            f"{len(self.exports)} export(s) on {len(self.addresses)} address(es), {connections} connection(s){workers}"
        )

    async def reload(self, new: ServerConfig) -> tuple[list[str], list[str]]:
        """Apply what can change while serving: new exports, read-only flags, descriptions, the default export.

        Returns (what changed, what could not change without a restart); nothing is torn down.  An
        RBD image is opened on a thread: the cluster may take up to its timeout to answer, and
        the clients of the other exports are served meanwhile.
        """
        new.validate()
        changed: list[str] = []
        refused: list[str] = []
        old = {e.name: e for e in self.config.exports}
        if self.workers is not None and self.workers.count > 1:
            # Each worker would open it and write it: one process alone writes an RBD image.
            added = [e for e in new.exports if e.rbd is not None and e.name not in old]
            for config in added:
                refused.append(
                    f"export {config.name!r} not added: an RBD image is served by one process, "
                    f"and {self.workers.count} serve here (a restart serves it with one)"
                )
            new = replace(new, exports=[e for e in new.exports if e not in added])
        for config in new.exports:
            if config.name not in old:
                try:
                    await self._open_export_off_loop(config)
                except OSError as exc:
                    refused.append(f"export {config.name!r} not added: {exc}")
                    continue
                self.config.exports.append(config)
                changed.append(f"export {config.name!r} added")
                continue
            changed += self._reload_export(self.exports[config.name], config, refused)
        for name in old.keys() - {e.name for e in new.exports}:
            refused.append(f"export {name!r} is no longer configured: still served until a restart")
        if new.default_export != self.config.default_export:
            self.config.default_export = new.default_export
            changed.append(f"default export {new.default_export!r}")
        for name in _RESTART_FIELDS:
            if getattr(new, name) != getattr(self.config, name):
                refused.append(f"{name.replace('_', ' ')} changed: needs a restart")
        self._update_catalog()
        if self.workers is not None:
            self.workers.reload(new)
        return changed, refused

    async def add_export(self, config: ExportConfig) -> None:
        """Open a new export here and in every worker process (as a reload adds one), then offer it
        to new clients.  ConfigError or OSError if it cannot be: nothing has changed then."""
        if config.name in self.exports:
            raise ConfigError(f"export {config.name!r} exists already")
        replace(self.config, exports=[*self.config.exports, config]).validate()
        if config.rbd is not None and self.workers is not None and self.workers.count > 1:
            raise ConfigError(
                f"export {config.name!r}: an RBD image is served by one process, and {self.workers.count} serve here"
            )
        await self._open_export_off_loop(config)
        self.config.exports.append(config)
        if self.workers is not None:
            problems = await self.workers.apply(self.config)
            if problems:
                await self._remove(config.name)
                raise ConfigError(f"export {config.name!r} not added: {'; '.join(problems)}")
        self._update_catalog()

    async def remove_export(self, name: str, force: bool) -> int:
        """Stop serving an export, here and in every worker process; returns the clients disconnected.

        ConfigError if there is no such export, or it has clients and not ``force``
        (then nothing has changed).  New clients are not offered it while that is decided; those
        connected are disconnected as at a stop: their requests in flight answered, then closed."""
        if name not in self.exports:
            raise ConfigError(f"no export {name!r}")
        connected = self.hide_export(name, True)
        if self.workers is not None:
            connected += await self.workers.hide_export(name, True)
        if connected and not force:
            self.hide_export(name, False)
            if self.workers is not None:
                await self.workers.hide_export(name, False)
            raise ConfigError(f"export {name!r} has {connected} client(s) connected (--force disconnects them)")
        return await self._remove(name)

    async def _remove(self, name: str) -> int:
        self.config.exports = [e for e in self.config.exports if e.name != name]
        if self.config.default_export == name:
            self.config.default_export = None  # the empty name picks as if none were named
        closed = 0
        if self.workers is not None:  # (a worker started from now on opens it no more)
            closed += await self.workers.drop_export(name, self.config)
        return closed + await self.drop_export(name)

    # Dirty bitmaps: made and removed here, opened by every worker before the change is answered ---

    async def add_bitmap(self, export_name: str, name: str, granularity: int) -> DirtyBitmap:
        """A new bitmap, marked by every write from now on, in every process.  ConfigError (a
        BitmapError) if it cannot be: nothing is left of it then."""
        export = self._bitmapped(export_name)
        if export.config.read_only:
            raise ConfigError(f"export {export_name!r} is read-only: it has no writes to track")
        loop = asyncio.get_running_loop()
        bitmap = await loop.run_in_executor(None, export.bitmaps.add, name, granularity)
        try:
            await self.bitmaps_changed(export)
        except ConfigError:
            export.bitmaps.remove(name)  # a bitmap some worker does not mark would miss writes
            await self.bitmaps_changed(export)
            raise
        return bitmap

    async def remove_bitmap(self, export_name: str, name: str) -> None:
        export = self._bitmapped(export_name)
        export.bitmaps.remove(name)
        await self.bitmaps_changed(export)

    def bitmaps_of(self, export_name: str) -> ExportBitmaps:
        return self._bitmapped(export_name).bitmaps

    def load_bitmaps(self, export_name: str) -> None:
        """The primary made or removed one of the export's bitmaps: open or close it here too."""
        export = self.exports.get(export_name)
        if export is not None:
            export.load_bitmaps()
            self._update_catalog()

    def _bitmapped(self, export_name: str) -> Export:
        export = self.exports.get(export_name)
        if export is None:
            raise ConfigError(f"no export {export_name!r}")
        if export.bitmaps.unavailable:
            raise ConfigError(f"export {export_name!r}: {export.bitmaps.unavailable}")
        return export

    async def bitmaps_changed(self, export: Export) -> None:
        """One of the export's bitmaps was made or removed here: offer it, and have every worker
        open or close it.  ConfigError if one could not."""
        export.bitmaps_changed()
        self._update_catalog()
        if self.workers is not None:
            problems = await self.workers.load_bitmaps(export.name)
            if problems:
                raise ConfigError(f"export {export.name!r}: bitmaps not opened: {'; '.join(problems)}")

    # A snapshot's file cloned while serving (cloning.py): the primary's cloner, every process's gate --

    def clone_asked(self, export_name: str, first: int, last: int) -> None:
        cloner = self.cloners.get(export_name)
        if cloner is not None:
            cloner.ask(first, last)

    def clone_progress(self, export_name: str, frontier: int, beyond: list[int]) -> None:
        export = self.exports.get(export_name)
        if export is not None:
            export.gate_progress(frontier, beyond)
        if self.workers is not None:
            self.workers.clone_progress(export_name, frontier, beyond)

    def end_clone(self, export_name: str) -> None:
        export = self.exports.get(export_name)
        if export is not None:
            export.open_gate()
        if self.workers is not None:
            self.workers.clone_end(export_name)

    def hide_export(self, name: str, hidden: bool) -> int:
        """Offer ``name`` to new clients of this process or not; returns its clients here."""
        if hidden:
            self._hidden.add(name)
        else:
            self._hidden.discard(name)
        self._update_catalog()
        return sum(c.export is not None and c.export.name == name for c in self.connections)

    async def drop_export(self, name: str, timeout: float = 10.0) -> int:
        """Disconnect an export's clients in this process (each once its requests in flight are
        answered), then close it; returns how many were disconnected."""
        export = self.exports.get(name)
        if export is None:
            return 0
        clients = [c for c in self.connections if c.export is export]
        for connection in clients:
            connection.shutdown()
        await _all_closed(clients, timeout)
        del self.exports[name]
        self._hidden.discard(name)
        self.config.exports = [e for e in self.config.exports if e.name != name]
        if self.config.default_export == name:
            self.config.default_export = None
        self._update_catalog()
        await export.close()
        return len(clients)

    def _reload_export(self, export: Export, config: ExportConfig, refused: list[str]) -> list[str]:
        changed = []
        current = export.config
        if config.read_only != current.read_only:
            try:
                export.set_read_only(config.read_only)
            except ConfigError as exc:
                refused.append(str(exc))
            else:
                if config.read_only:
                    for connection in self.connections:
                        if connection.export is export:
                            connection.refuse_writes()
                changed.append(f"export {export.name!r} {'read-only' if config.read_only else 'writable'}")
        if config.description != current.description:
            current.description = config.description
            export.info = replace(export.info, description=config.description)
            changed.append(f"export {export.name!r} description")
        for name in _EXPORT_RESTART_FIELDS:
            if getattr(config, name) != getattr(current, name):
                refused.append(f"export {export.name!r}: {name.replace('_', ' ')} changed: needs a restart")
        return changed

    def admit(self, connection: Connection) -> bool:
        """Take a new connection, unless the server is full: then it is counted and should be closed."""
        if len(self.connections) >= self.config.max_connections:
            self.turn_away(connection, "max_connections", f"{len(self.connections)} connections are open already")
            return False
        self.connection_made(connection)
        return True

    def turn_away(self, connection: Connection, reason: str, why: str) -> None:
        self._turned_away(connection.peer, reason, why)

    def _turned_away(self, peer: str, reason: str, why: str) -> None:
        self.stats.turned_away[reason] += 1  # every one, logged or not
        suffix = self._turned_away_log.allow()
        if suffix is not None:
            log.warning("%s: turned away (%s): %s%s", peer, reason.replace("_", " "), why, suffix)

    def connection_made(self, connection: Connection, how: str = "connected") -> None:
        self.connections.add(connection)
        self.stats.connections += 1
        log.info("%s: %s", connection.peer, how)
        self.on_change()

    def journaled(self, connection: Connection) -> None:
        self.on_journaled(connection)

    def connection_lost(self, connection: Connection) -> None:
        self.on_lost(connection)
        if connection not in self.connections:
            return  # turned away on arrival
        self.connections.discard(connection)
        export = f"export {connection.export.name!r}" if connection.export is not None else "in the handshake"
        log.info("%s: %s (%s)", connection.peer, "handed over" if connection.handed_over else "disconnected", export)
        self.on_change()

    async def shutdown(self, timeout: float = 30.0) -> None:
        """Stop accepting, answer what is in flight, flush every export, close."""
        for srv in self._listeners:
            srv.close()
        if self._metrics is not None:
            self._metrics.close()
        for connection in list(self.connections):
            connection.shutdown()
        await _all_closed(list(self.connections), timeout)
        if self.workers is not None:
            await self.workers.stop(timeout)
        for export in self.exports.values():
            await export.close()
        log.info("buffer pool: %d blocks allocated, %d bytes idle", self.pool.created, self.pool.idle_bytes)
        for path in self._unix_paths:  # ours only: an inherited socket's file belongs to the service manager
            remove_socket(path)


async def _all_closed(connections: list[Connection], timeout: float) -> None:
    """Wait until each of ``connections`` has closed; log those that did not within ``timeout``."""
    waits = [asyncio.ensure_future(c.closed.wait()) for c in connections]
    if waits:
        _, pending = await asyncio.wait(waits, timeout=timeout)
        for task in pending:
            task.cancel()
        if pending:
            log.warning("%d connection(s) did not finish within %.0f s", len(pending), timeout)


def _peer(sock: socket.socket) -> str:
    try:
        return str(Listener(*sock.getpeername()[:2])) if sock.family != socket.AF_UNIX else "unix"
    except OSError:
        return "?"


def describe_socket(sock: socket.socket) -> str:
    """``HOST:PORT``, ``[HOST]:PORT`` or ``unix:PATH`` of a bound socket."""
    name = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        if isinstance(name, bytes):  # abstract
            name = "@" + name[1:].decode(errors="replace")
        return f"unix:{name}"
    return str(Listener(*name[:2]))


# What a reload cannot change under running connections.
_RESTART_FIELDS = (
    "listeners",
    "metrics",
    "engine",
    "workers",
    "processes",
    "merge",
    "max_submission_bytes",
    "max_segments",
    "max_inflight_bytes",
    "max_export_inflight_bytes",
    "buffer_pool_bytes",
    "tls",
    "tls_certificate",
    "tls_key",
    "tls_ca",
    "allow",
    "unix_socket_mode",
    "max_connections",
    "max_server_inflight_bytes",
    "handshake_timeout",
    "idle_timeout",
    "busy_poll_us",
    "worker_timeout",
    "rbd_conf",
    "rbd_id",
    "rbd_timeout",
    "control",
    "state_dir",
)
_EXPORT_RESTART_FIELDS = (
    "path",
    "cache",
    "create_size",
    "max_inflight_bytes",
    "tls",
    "allow",
    "rbd_conf",
    "rbd_id",
    "dirty_bitmaps",
)


async def _unix_server(
    loop: asyncio.AbstractEventLoop, factory: Callable[[], Connection], sock: socket.socket
) -> asyncio.Server:
    """Serve a bound Unix socket.  From Python 3.13, asyncio (and uvloop there) removes the socket's
    file when the server closes unless told not to: the file is removed at shutdown by the server
    that made it (_unix_paths), and by no one in a handover or when inherited, as the successor or
    the service manager still listens on it."""
    if sys.version_info >= (3, 13):
        return await loop.create_unix_server(factory, sock=sock, backlog=LISTEN_BACKLOG, cleanup_socket=False)
    return await loop.create_unix_server(factory, sock=sock, backlog=LISTEN_BACKLOG)


def remove_stale_socket(path: str) -> None:
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


def remove_socket(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
