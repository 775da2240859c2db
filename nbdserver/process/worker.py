"""A worker process: serves the connections the primary passes it (see workers.py).

    python -m nbdserver.process.worker FD LEDGER_FD ARENA_FD

FD is its end of the socket pair to the primary, whose first frame is the
configuration; ARENA_FD the memory its request buffers and journals are kept in, which the
primary keeps should this process die (recovery.py).  It answers to the primary alone: the service manager's
signals go to the primary, which tells its workers what to do (a stop, a
reload, an upgrade), so a worker ignores them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import pickle
import signal
import socket
import sys
from functools import partial
from typing import Any

from .. import build
from ..block.buffers import Arena
from ..block.ledger import Ledger
from ..config import ConfigError, ServerConfig
from ..serving.connection import Connection
from ..serving.server import Server
from . import eventloop
from .channel import Channel
from .frames import receive_frame, send_frame
from .handover import ConnectionTerms, Package, adopt, package
from .recovery import Recovery
from .systemd import configure_logging, set_log_level
from .workers import share

log = logging.getLogger("nbdserver")

HOLD_LIMIT = 60.0  # seconds an export is held for a snapshot at most, should the primary not release it


class Worker:
    """One worker's side of the socket pair: a frame from the primary at a time."""

    def __init__(self, server: Server, sock: socket.socket, kept: bool = False) -> None:
        self.server = server
        self._kept = kept  # the service manager keeps our connections should the primary die
        self.done = asyncio.Event()
        self._packed: Package | None = None
        self._loop = asyncio.get_running_loop()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._adopting: set[asyncio.Task[Any]] = set()  # connections being set up
        self._taken = 0  # connections received from the primary
        self._counting = False  # a count is due at the end of this turn of the loop
        self._recoveries: dict[int, Recovery] = {}  # dead workers' arenas, their connections being taken over
        self._fencing: dict[str, asyncio.Task[None]] = {}  # dead processes' locks, taken from them
        self._reloading = asyncio.Lock()  # one reload at a time: each may wait on a cluster
        self._holds: dict[str, asyncio.TimerHandle] = {}  # exports held for a snapshot: their deadline
        server.on_change = self._report_count
        server.on_journaled = self._journaled
        server.on_lost = self._ended
        self.channel = Channel(sock, self.receive, self._lost)

    def _lost(self) -> None:
        if self._kept:
            # It died (a stop says so first): its successor takes our connections from the service
            # manager's store and our journals from the arena, which must stay as they are now.
            log.warning("the primary is gone: exiting, the connections are kept for its successor")
            os._exit(0)
        log.debug("the primary is gone")
        self.done.set()  # finish as at a stop

    def _report_count(self) -> None:
        """Say how many connections are open, once for all the changes of this turn of the loop
        (a flood of clients would otherwise be a flood of counts)."""
        if not self._counting:
            self._counting = True
            self._loop.call_soon(self._send_count)

    def _send_count(self) -> None:
        self._counting = False
        self._send({"type": "count", "connections": len(self.server.connections), "taken": self._taken})

    def _send(self, head: dict[str, Any], raw: bytes = b"", fds: list[int] | None = None) -> None:
        self.channel.send(head, raw, fds)  # if the primary is gone, _lost says so

    def receive(self, head: dict[str, Any], raw: bytes, fds: list[int]) -> None:
        kind = head.get("type")
        if kind in ("connection", "resume"):
            self._taken += 1
        if kind == "connection":
            self._adopt(self._take(socket.socket(fileno=fds[0]), head.get("id", -1)))
        elif kind == "resume":
            terms = ConnectionTerms.from_json(head["terms"])
            resumed = adopt(self.server, terms, socket.socket(fileno=fds[0]), raw, head.get("id", -1))
            if resumed is not None:
                self._adopt(resumed)
            else:
                self._send({"type": "ended", "id": head.get("id", -1)})
        elif kind == "arena":
            self._recoveries[head.get("key", 0)] = Recovery(fds[0])
        elif kind == "recover" and head.get("key", 0) in self._recoveries:
            terms = ConnectionTerms.from_json(head["terms"])
            sock = socket.socket(fileno=fds[0])
            self._adopt(self._take_over(self._recoveries[head.get("key", 0)], terms, head, sock))
        elif kind == "recovered" and head.get("key", 0) in self._recoveries:
            self._run(self._recovered(head.get("key", 0), self._recoveries.pop(head.get("key", 0))))
        elif kind == "snapshot":
            self._run(self._snapshot())
        elif kind == "reload":
            self._run(self._reload(pickle.loads(raw), bool(head.get("answer"))))
        elif kind == "export_hide":
            connections = self.server.hide_export(head["name"], head["hidden"])
            self._send({"type": "export_hidden", "connections": connections})
        elif kind == "bitmaps_load":
            self._send({"type": "bitmaps_loaded", "refused": self._load_bitmaps(head["export"])})
        elif kind == "export_hold":
            self._run(self._hold(head["name"], head["timeout"]))
        elif kind == "export_release":
            self._release(head["name"], head.get("gate", 0))
            self._send({"type": "export_released"})
        elif kind == "cloned" and head["export"] in self.server.exports:
            self.server.exports[head["export"]].gate_progress(head["frontier"], head["beyond"])
        elif kind == "clone_end" and head["export"] in self.server.exports:
            self.server.exports[head["export"]].open_gate()
        elif kind == "export_drop":
            self._run(self._drop_export(head["name"]))
        elif kind == "package":
            self._run(self._package())
        elif kind in ("let_go", "take_back"):
            # None: nothing was packed here (this worker's or another's package failed).
            packed, self._packed = self._packed, None
            if packed is not None and kind == "let_go":
                packed.let_go(self.server)
            elif packed is not None:
                self._run(packed.take_back(self.server))
        elif kind == "ping":
            self._send({"type": "pong"})  # its loop turns: the primary's watch is answered
        elif kind == "stop":
            self.done.set()
        else:
            log.warning("unexpected %r from the primary", kind)
            for fd in fds:
                socket.socket(fileno=fd).close()

    def _run(self, coroutine: Any, tasks: set[asyncio.Task[Any]] | None = None) -> None:
        task = self._loop.create_task(coroutine)
        held = self._tasks if tasks is None else tasks
        held.add(task)
        task.add_done_callback(held.discard)

    def _adopt(self, coroutine: Any) -> None:
        """Start serving a connection (what the primary asks next sees it served), then say so."""
        self._run(self._then_report(coroutine), self._adopting)

    async def _then_report(self, coroutine: Any) -> None:
        try:
            await coroutine
        finally:
            self._report_count()

    async def _snapshot(self) -> None:
        if self._adopting:
            await asyncio.wait(list(self._adopting))
        self._send({"type": "snapshot", "data": self.server.snapshot().to_json()})

    async def _take(self, sock: socket.socket, tag: int) -> None:
        sock.setblocking(False)
        try:
            await self._loop.connect_accepted_socket(partial(Connection, self.server, tag=tag), sock)
        except OSError as exc:  # the client left already
            log.debug("connection lost on arrival: %s", exc)
            sock.close()
            self._send({"type": "ended", "id": tag})

    def _journaled(self, connection: Connection) -> None:
        """Tell the primary what it needs to have this connection taken over, should this process die."""
        journal = connection.journal
        if connection.tag >= 0 and journal is not None and connection.negotiated is not None:
            terms = ConnectionTerms.of(connection.negotiated, connection.peer).to_json()
            export = self.server.exports.get(connection.negotiated.export.name)
            if export is not None and export.holder:  # a lock to break should we die (RBD)
                terms["holder"] = export.holder
            # In the journal too: a successor of a primary that died with us reads them there.
            described = journal.describe(json.dumps(terms).encode())
            head = {"type": "journaled", "id": connection.tag, "terms": terms, "record": journal.record}
            self._send({**head, "described": described})

    def _ended(self, connection: Connection) -> None:
        """The primary may let go of its copy of the connection's socket."""
        if connection.tag >= 0:
            self._send({"type": "ended", "id": connection.tag})

    async def _take_over(
        self, recovery: Recovery, terms: ConnectionTerms, head: dict[str, Any], sock: socket.socket
    ) -> None:
        recovered = recovery.read(terms, head["record"], head["was"], sock)
        if recovered is not None and terms.holder:
            await self._fence(terms.export, terms.holder)
        if recovered is not None:
            # Before the requests are carried out again: should one of them kill this process too,
            # the primary knows it was not the client's silence (see workers.py, strikes).
            resuming = {"requests": recovered.requests, "resent": len(recovered.resend)}
            self._send({"type": "resuming", "id": head["id"], **resuming})
            if await recovery.resume(self.server, terms, sock, head["id"], recovered):
                return
        self._send({"type": "ended", "id": head["id"]})

    async def _fence(self, export_name: str, holder: str) -> None:
        """Take the export's lock from the dead process, once for all its connections; should that
        fail, the cluster gives it to us once it notices the death, and requests wait till then."""
        task = self._fencing.get(holder)
        export = self.server.exports.get(export_name)
        if task is None and export is not None:
            task = self._fencing[holder] = self._loop.create_task(export.fence(holder))
        if task is not None:
            try:
                await asyncio.shield(task)
            except OSError as exc:
                log.warning("export %r: %s", export_name, exc)

    async def _recovered(self, key: int, recovery: Recovery) -> None:
        """Every connection of the dead worker was taken over, or closed: its arena is let go."""
        if self._adopting:
            await asyncio.wait(list(self._adopting))
        recovery.close()
        self._send({"type": "recovered", "key": key, "resumed": recovery.resumed, "closed": recovery.closed})

    async def _package(self) -> None:
        self._packed = packed = await package(self.server, listeners=False)
        for head, raw, sock in packed.frames:
            self._send(head, raw, [sock.fileno()])
        self._send(packed.end)

    async def _reload(self, config: ServerConfig, answer: bool = False) -> None:
        """As SIGHUP says; ``answer``: say when done, and which exports could not be opened (an
        export added through the control socket must be open in every worker before it is offered)."""
        changed: list[str] = []
        refused: list[str] = []
        try:
            set_log_level(config.log_level)
            async with self._reloading:
                changed, refused = await self.server.reload(config)  # what could not change, the primary logs
        except ConfigError as exc:
            log.debug("reload: %s", exc)
            refused = [str(exc)]
        else:
            log.debug("reloaded: %s", "; ".join(changed))
        if answer:
            missing = [e.name for e in config.exports if e.name not in self.server.exports]
            self._send({"type": "reloaded", "missing": missing, "refused": refused})

    def _load_bitmaps(self, export: str) -> list[str]:
        try:
            self.server.load_bitmaps(export)
        except ConfigError as exc:
            log.error("export %r: %s", export, exc)
            return [str(exc)]
        return []

    async def _hold(self, name: str, timeout: float) -> None:
        """Hold the export's requests until the primary releases them, or for HOLD_LIMIT at most
        (should the release never come, the clients must not wait for ever)."""
        export = self.server.exports.get(name)
        refused = ""
        if export is not None:
            self._holds[name] = self._loop.call_later(HOLD_LIMIT, self._release, name)
            try:
                await asyncio.wait_for(export.hold(), timeout)
            except TimeoutError:
                self._release(name)
                refused = f"the requests in flight did not complete in {timeout:.0f} s"
        self._send({"type": "export_held", "refused": refused})

    def _release(self, name: str, gate: int = 0) -> None:
        """Let the held requests go on; with ``gate``, the writes among them and those after wait for
        the clone of a snapshot's file (that many granules), asked of the primary."""
        timer = self._holds.pop(name, None)
        if timer is not None:
            timer.cancel()
        export = self.server.exports.get(name)
        if export is not None:
            if gate:
                export.start_gate(gate, partial(self._ask_clone, name))
            export.release()

    def _ask_clone(self, export: str, first: int, last: int) -> None:
        self._send({"type": "clone_ask", "export": export, "first": first, "last": last})

    async def _drop_export(self, name: str) -> None:
        closed = await self.server.drop_export(name)
        self._send({"type": "export_dropped", "closed": closed})


async def serve(
    config: ServerConfig, channel: socket.socket, ledger: Ledger, arena: Arena | None, kept: bool = False
) -> int:
    try:
        server = Server(config, ledger, arena=arena, worker=True)
        server.open_exports()
    except (ConfigError, OSError) as exc:
        send_frame(channel, {"type": "failed", "why": str(exc)})
        return 1
    send_frame(channel, {"type": "ready"})
    for export in server.exports.values():
        export.take_lock()  # with --rbd-exclusive; a predecessor or a dead worker may hold it a while
    worker = Worker(server, channel, kept)
    await worker.done.wait()
    await server.shutdown()
    worker.channel.close()
    return 0


def main(argv: list[str]) -> int:
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR2):
        signal.signal(signum, signal.SIG_IGN)  # the primary's to act on
    channel = socket.socket(fileno=int(argv[1]))
    head, raw, _ = receive_frame(channel)
    if head.get("type") != "config":
        return 2
    config, index, count = pickle.loads(raw)
    configure_logging(config.log_level, prefix=f"worker {index}: ")
    log.info("%s", build.describe())  # what this worker runs, as the primary says what it runs
    # A primary of the version before the ledger (restarting a worker after an upgrade was
    # installed, before it hands over) passes none: count this worker's writes alone.
    ledger = Ledger(count, index, int(argv[2])) if len(argv) > 2 else Ledger()
    arena = Arena(int(argv[3])) if len(argv) > 3 else None  # likewise: without one, nothing is journaled
    return eventloop.run(serve(share(config, count), channel, ledger, arena, bool(head.get("kept"))))


if __name__ == "__main__":
    sys.exit(main(sys.argv))
