"""Worker processes: several event loops, each serving whole connections.

With ``processes`` above 1, the process that was started (the primary) binds or
inherits the listening sockets, accepts, and passes each client's socket to the
worker process that has the fewest connections.  A worker is this package run
again (``python -m nbdserver.process.worker FD LEDGER_FD``, see worker.py): it opens every export
itself, with its own request queue and engine and an equal share of the
server's and the exports' in-flight budgets, and serves the connections it is
given from the handshake to the end.  The primary keeps the listeners, the
service manager's notifications, /metrics (the workers' counters summed), and
the upgrade: every worker's connections are handed over together.

Requests are merged within a worker: those of connections served by different
workers are not merged with each other.  FLUSH and FUA keep their meaning
across workers, since every worker writes the same file and fdatasync acts on
the file, not on the descriptor.

The primary and a worker talk over a socket pair in frames (frames.py), through a
Channel (channel.py) on each side, so that neither ever waits on the other:

    primary                                   worker
    config + pickled (config, index, count) ──▶
                                            ◀──  ready | failed {why}
    connection {id} + fd                    ──▶  a new client: handshake and all
    resume {id, terms} + fd + bytes         ──▶  a client taken over from a predecessor
                                            ◀──  count {connections, taken}   when it changed (once a turn of its loop)
                                            ◀──  journaled {id, terms, record}   in transmission, with a journal
                                            ◀──  ended {id}                      the primary may close its copy
    arena + fd, recover {id, was, terms, record} + fd ..., recovered
                                            ──▶  a dead worker's connections, to a replacement (recovery.py)
                                            ◀──  resuming {id, requests, resent}   for each, before it goes on
                                            ◀──  recovered {resumed, closed}
    snapshot                                ──▶
                                            ◀──  snapshot {data}       what /metrics sums
    export_hold {name} | export_release {gate}  ──▶  a request boundary, for a snapshot (serving/snapshots.py)
                                            ◀──  export_held {refused} | export_released
                                            ◀──  clone_ask {export, first, last}   a write waits for these granules
    cloned {export, frontier, beyond}       ──▶  granules of the snapshot's file cloned (serving/cloning.py)
    clone_end {export}                      ──▶  the gate opens
    reload + pickled config                 ──▶  applied as SIGHUP applies it
    package                                 ──▶  quiesces its connections for an upgrade
                                            ◀──  connection {terms} + fd + bytes ..., end {closed_slow}
    let_go | take_back                      ──▶
    ping                                    ──▶
                                            ◀──  pong
    stop, or end of file                    ──▶  finishes what is in flight, flushes, exits

The primary passes at most MAX_ON_THE_WAY connections to a worker ahead of
what the worker says it has taken; beyond that it stops accepting for a while,
so that a busy worker holds up the listening socket's backlog, never the
primary itself.

The primary keeps a copy of every connection it passes, and each worker's arena (the memory of its
request buffers and journals), until the worker says the connection ended.  A worker that dies
(a crash, SIGKILL, the OOM killer) is replaced at once, and the replacement takes over every
connection the worker had journaled, from the exact byte where it stopped (recovery.py); the
others (handshakes, TLS, Unix sockets) are closed.  Its counters are kept, so that the sums never
go back.  So is a worker whose event loop is stuck: the primary pings every worker a few times per
``worker_timeout`` and kills one it has heard nothing from for that long (the service manager's
watchdog sees the primary only).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import pickle
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

from .. import build
from ..block.buffers import arena_memory
from ..block.ledger import shared_memory
from ..config import ServerConfig
from ..serving import counts
from ..serving.server import Server
from ..stats import ServerStats, Snapshot
from .channel import Channel
from .frames import FrameError, receive_frame, send_frame
from .keeper import Keeper, KeptArena

log = logging.getLogger(__name__)

START_TIMEOUT = 60.0  # for a worker to open its exports
ANSWER_TIMEOUT = 30.0  # for a snapshot, or the connections of a package
STOP_TIMEOUT = 60.0  # for a worker to finish its requests and exit
MAX_ON_THE_WAY = 64  # connections passed to a worker and not yet taken; then accepting waits
RESTART_DELAY = 1.0  # before a worker that died on start is replaced: one that dies at once must not spin
ON_START = 1.0  # seconds: a worker that dies sooner after its start is replaced after RESTART_DELAY
STRIKES = 3  # replacements in a row that died on a connection before answering what it took again
DIED, STARTED = "it died", "this process started"  # the recovery pause is counted from

Frame = tuple[dict[str, Any], bytes, list[int]]


class WorkerError(Exception):
    """A worker could not start, or went away while asked something."""


def share(config: ServerConfig, count: int) -> ServerConfig:
    """One worker's configuration: the server's and the exports' in-flight budgets and the buffer
    pool divided evenly, so that together the workers keep within the limits configured."""
    exports = [
        replace(e, max_inflight_bytes=max(1, e.max_inflight_bytes // count) if e.max_inflight_bytes else None)
        for e in config.exports
    ]
    return replace(
        config,
        exports=exports,
        max_export_inflight_bytes=max(1, config.max_export_inflight_bytes // count),
        max_server_inflight_bytes=max(1, config.max_server_inflight_bytes // count),
        buffer_pool_bytes=config.buffer_pool_bytes // count,
        processes=1,  # a worker serves its connections itself
    )


@dataclass
class _Held:
    """The primary's copy of a connection a worker serves, and what a replacement needs of it."""

    sock: socket.socket
    terms: dict[str, Any] | None = None  # once it is journaled
    record: int = -1  # where its journal is in the worker's arena
    # Replacements in a row that died on it before writing anything past what they sent again: a
    # request that kills every worker that carries it out again must not do so for ever.
    strikes: int = 0
    written: int = -1  # the bytes written to it when it was last handed to a replacement,
    requests: int = 1  # the requests that replacement took again (until it says, assume some),
    resent: int = 0  # and the bytes of replies it sent again

    def stuck(self, written: int | None) -> bool:
        """Did the replacement it was last handed to die on it: having taken requests again, it
        wrote nothing (``written``: the bytes written to it now) past the replies it sent again?"""
        return written is not None and self.written >= 0 and self.requests > 0 and written <= self.written + self.resent

    def close(self) -> None:
        """Let go of the copy: with the worker's gone (or passed on in an upgrade), the last one."""
        self.sock.close()


@dataclass
class _Recovering:
    """A dead process's arena while a worker takes over its connections."""

    died: float  # when it died (time.monotonic())
    arena: int
    closed: int  # its connections closed here, not passed on
    worker: int  # the index of the worker taking them over
    since: str  # what ``died`` is: DIED, or STARTED (a dead primary's, kept by the service manager)


@dataclass
class _Worker:
    index: int
    proc: subprocess.Popen[bytes]
    arena: int  # the memory of its request buffers and journals (kept when it dies)
    arena_key: int  # the arena's name here (and in the service manager's store)
    started: float = field(default_factory=time.monotonic)
    held: dict[int, _Held] = field(default_factory=dict)  # its connections, by id
    channel: Channel = field(init=False)
    open: int = 0  # its connections, as it last said
    given: int = 0  # connections passed to it
    taken: int = 0  # of those, how many it had taken when it last said
    last: Snapshot | None = None  # its counters, as last asked
    replies: asyncio.Queue[Frame | None] = field(default_factory=asyncio.Queue)  # None: it is gone
    asking: asyncio.Lock = field(default_factory=asyncio.Lock)  # one question at a time
    alive: bool = True
    heard: float = field(default_factory=time.monotonic)  # when it last sent anything
    hung: bool = False  # killed for not answering: its end is on the way

    @property
    def on_the_way(self) -> int:
        """Connections passed to it and not yet taken: sockets (and their descriptors) in flight."""
        return self.given - self.taken

    @property
    def connections(self) -> int:
        return self.open + self.on_the_way


class WorkerPool:
    def __init__(self, config: ServerConfig, count: int) -> None:
        self.config = config
        self.count = count
        self._ledger = shared_memory(count)  # the workers' counts of what each flush may write back
        self._workers: list[_Worker] = []
        self._retired: list[Snapshot] = []  # the last counters of workers that died
        self._stopping = False
        self.lost = 0  # workers that died so far (a snapshot made meanwhile is not to be trusted)
        self._changes = 0  # changes asked of every worker (exports, bitmaps): a worker starting misses them
        self.on_clone_ask: Callable[[str, int, int], None] = lambda export, first, last: None
        self.on_change: Callable[[], None] = lambda: None  # a worker's number of connections changed
        self.on_room: list[Callable[[], None]] = []  # called when has_room() may have become true
        self._watching: asyncio.TimerHandle | None = None
        self._watched = 0.0  # when the last watch ran
        self._ids = itertools.count()  # of the connections passed to workers
        self._arena_keys = itertools.count()
        # Arena key -> when the process that served from it died, the arena, its connections closed
        # here, and the index of the worker taking the rest over.
        self._recovering: dict[int, _Recovering] = {}
        self.recovery = ServerStats()  # what /metrics shows of recoveries (the rest of it stays zero)
        self.keeper: Keeper | None = None  # the service manager's store, should this process die

    # Life -----------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start every worker and wait until each has opened the exports; WorkerError if one cannot."""
        # Together: a start after a crash waits for them before taking the connections over.
        started = await asyncio.gather(*(self._start(i) for i in range(self.count)), return_exceptions=True)
        self._workers = [w for w in started if isinstance(w, _Worker)]
        failed = [exc for exc in started if isinstance(exc, BaseException)]
        if failed:
            await self.stop()
            raise failed[0]
        log.info("%d worker processes: pids %s", self.count, ", ".join(str(w.proc.pid) for w in self._workers))
        if self.config.worker_timeout:
            self._watched = time.monotonic()
            self._watching = asyncio.get_running_loop().call_later(self._watch_interval, self._watch)

    async def _start(self, index: int) -> _Worker:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            arena = arena_memory()
        except OSError as exc:
            ours.close()
            theirs.close()
            raise WorkerError(f"cannot make worker {index}'s memory: {exc}") from None
        try:
            args = [str(theirs.fileno()), str(self._ledger), str(arena)]
            proc = subprocess.Popen(
                build.child_command("-m", "nbdserver.process.worker", *args),
                pass_fds=[theirs.fileno(), self._ledger, arena],
                stdin=subprocess.DEVNULL,
            )
        except OSError as exc:
            ours.close()
            os.close(arena)
            raise WorkerError(f"cannot start worker {index}: {exc}") from None
        finally:
            theirs.close()
        ours.settimeout(START_TIMEOUT)
        loop = asyncio.get_running_loop()
        try:
            kept = self.keeper is not None
            send_frame(ours, {"type": "config", "kept": kept}, pickle.dumps((self.config, index, self.count)))
            answer, _, _ = await loop.run_in_executor(None, receive_frame, ours)
        except (OSError, EOFError, FrameError) as exc:
            _kill(proc, ours)
            os.close(arena)
            raise WorkerError(f"worker {index} did not start: {exc}") from None
        if answer.get("type") != "ready":
            _kill(proc, ours)
            os.close(arena)
            raise WorkerError(f"worker {index}: {answer.get('why', answer)}")
        worker = _Worker(index, proc, arena, next(self._arena_keys))
        worker.channel = Channel(ours, partial(self._receive, worker), partial(self._lost, worker))
        return worker

    async def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Ask every worker to finish what is in flight and exit; kill those that do not in time."""
        self._stopping = True
        if self._watching is not None:
            self._watching.cancel()
        for worker in self._workers:
            self._tell(worker, {"type": "stop"})
        loop = asyncio.get_running_loop()
        waits = [loop.run_in_executor(None, wait_or_kill, w.proc, timeout) for w in self._workers]
        for worker, exited in zip(self._workers, await asyncio.gather(*waits), strict=True):
            if not exited:
                log.warning(
                    "worker %d (pid %d) did not stop within %.0f s: killed", worker.index, worker.proc.pid, timeout
                )
            self._forget(worker)
            self._close_held(worker)
        for key, recovering in self._recovering.items():
            self._close_arena(key, recovering.arena)
        self._recovering.clear()
        if self._ledger >= 0:
            os.close(self._ledger)
            self._ledger = -1

    def _forget(self, worker: _Worker) -> None:
        if worker.alive:
            worker.alive = False
            worker.channel.close()
            worker.replies.put_nowait(None)

    def _close_held(self, worker: _Worker, keep: bool = False) -> None:
        """Close the copies of a worker's connections (``keep``: those a replacement can take over)
        and, unless kept for a replacement, its arena."""
        for id_, held in list(worker.held.items()):
            if not (keep and held.terms is not None):
                del worker.held[id_]
                self._let_go(id_, held)
        if not keep and worker.arena >= 0:
            self._close_arena(worker.arena_key, worker.arena)
            worker.arena = -1

    def _let_go(self, id_: int, held: _Held) -> None:
        if self.keeper is not None:
            self.keeper.drop(id_)
        held.close()

    def _close_arena(self, key: int, fd: int) -> None:
        if self.keeper is not None:
            self.keeper.drop_arena(key)
        os.close(fd)

    def _lost(self, worker: _Worker) -> None:
        """Its channel closed: it died.  Another takes its place, and its journaled connections."""
        died = time.monotonic()
        self._forget(worker)
        if self._stopping:
            return
        self.lost += 1
        if worker.last is not None:
            self._retired.append(worker.last)
        worker.open = worker.given = worker.taken = 0
        closed = sum(held.terms is None for held in worker.held.values())
        for key, recovering in list(self._recovering.items()):
            if recovering.worker == worker.index:  # it died taking over: what it had not journaled is lost
                del self._recovering[key]
                self.recovery.recovered["closed"] += recovering.closed
                self._close_arena(key, recovering.arena)
        self._close_held(worker, keep=True)
        self.on_change()
        asyncio.get_running_loop().create_task(self._replace(worker, died, closed))

    async def _replace(self, old: _Worker, died: float, closed: int) -> None:
        loop = asyncio.get_running_loop()
        status = await loop.run_in_executor(None, old.proc.wait)
        log.error(
            "worker %d (pid %d) exited with status %d: %d connection(s) to take over",
            old.index,
            old.proc.pid,
            status,
            len(old.held),
        )
        quick = died - old.started < ON_START
        while not self._stopping:
            if quick:
                await asyncio.sleep(RESTART_DELAY)
            quick = True  # a start that fails is not tried again at once
            if self._stopping:  # meanwhile: the ledger's descriptor is closed
                break
            try:
                seen = self._changes
                new = await self._start(old.index)  # with the configuration of now
            except WorkerError as exc:
                log.error("%s: trying again", exc)
                continue
            self._workers[self._workers.index(old)] = new
            if self._stopping:
                self._tell(new, {"type": "stop"})
                break
            self._hand_over(old.arena_key, old.arena, old.held, new, died, closed, DIED)
            old.arena = -1
            await self._catch_up(new, seen)
            log.info("worker %d started again: pid %d", new.index, new.proc.pid)
            return
        self.recovery.recovered["closed"] += closed + len(old.held)
        self._close_held(old)

    async def _catch_up(self, worker: _Worker, seen: int) -> None:
        """Make in a worker started with the configuration of change ``seen`` the changes asked of
        the others while it started: exports added or dropped (a checkpoint's), bitmaps made or
        removed.  (It is asked with the others from its start on.)"""
        while seen != self._changes and worker.alive:
            seen = self._changes
            raw = pickle.dumps(share(self.config, self.count))
            try:
                await self._ask(worker, {"type": "reload", "answer": True}, "reloaded", raw)
                for export in self.config.exports:
                    await self._ask(worker, {"type": "bitmaps_load", "export": export.name}, "bitmaps_loaded")
            except WorkerError as exc:  # it died: its replacement starts from the configuration of then
                log.warning("worker %d: the changes made while it started: %s", worker.index, exc)
                return

    def _hand_over(
        self, key: int, arena: int, held_there: dict[int, _Held], new: _Worker, died: float, closed: int, since: str
    ) -> None:
        """Pass a dead process's arena and journaled connections to a worker (recovery.py);
        ``closed``: its connections closed already (handshakes, TLS, Unix sockets); ``since``: what
        ``died`` was, for the log."""
        if not held_there:
            self.recovery.recovered["closed"] += closed
            self._close_arena(key, arena)
            return
        self._tell(new, {"type": "arena", "key": key}, fds=[arena])
        for old_id, held in held_there.items():
            if self.keeper is not None and since == DIED:  # (a dead primary's were dropped before)
                self.keeper.drop(old_id)  # kept again once journaled anew: its journal here is history
            try:
                written = counts.bytes_written(held.sock)
            except OSError:  # the client is gone: taking it over fails, and says so
                written = None
            strikes = held.strikes + 1 if held.stuck(written) else 0
            if strikes >= STRIKES:
                peer = held.terms.get("peer", "?") if held.terms else "?"
                log.error("%s: closed: %d replacements in a row died on it without a reply", peer, strikes)
                held.close()
                closed += 1
                continue
            id_ = next(self._ids)
            head = {"type": "recover", "key": key, "id": id_, "was": old_id, "terms": held.terms, "record": held.record}
            if self._tell(new, head, fds=[held.sock.fileno()]):
                # Journaled again once the replacement has it.
                new.held[id_] = _Held(held.sock, strikes=strikes, written=-1 if written is None else written)
                new.given += 1
            else:
                held.close()
                closed += 1
        held_there.clear()
        self._tell(new, {"type": "recovered", "key": key})
        self._recovering[key] = _Recovering(died, arena, closed, new.index, since)  # the arena: closed once read
        self.recovery.recoveries += 1

    def recover_kept(self, kept: list[KeptArena], started: float) -> None:
        """Pass the connections a dead primary kept in the service manager's store (keeper.py) to
        the workers, one arena each in turn, as a dead worker's are passed to its replacement;
        ``started``: when this process started (time.monotonic())."""
        alive = [w for w in self._workers if w.alive]
        for i, arena in enumerate(kept):
            held = {c.tag: _Held(c.sock, c.terms, c.record) for c in arena.connections}
            self._hand_over(next(self._arena_keys), arena.fd, held, alive[i % len(alive)], started, 0, STARTED)

    def _recovered(self, worker: _Worker, head: dict[str, Any]) -> None:
        key = head.get("key", -1)
        recovering = self._recovering.pop(key, None)
        if recovering is None:
            return
        self._close_arena(key, recovering.arena)
        pause = time.monotonic() - recovering.died
        closed = recovering.closed + head["closed"]
        stats = self.recovery
        stats.recovered["resumed"] += head["resumed"]
        stats.recovered["closed"] += closed
        stats.recovery_pause = pause
        stats.recovery_pause_total += pause
        log.warning(
            "worker %d (pid %d) took over %d connection(s) of its predecessor %.3f s after %s (%d closed)",
            worker.index,
            worker.proc.pid,
            head["resumed"],
            pause,
            recovering.since,
            closed,
        )

    @property
    def _watch_interval(self) -> float:
        return self.config.worker_timeout / 3

    def _watch(self) -> None:
        """Ping every worker; kill one not heard from within the worker timeout (_lost replaces it)."""
        now, timeout = time.monotonic(), self.config.worker_timeout
        if now - self._watched > 2 * self._watch_interval:
            # This loop was held up itself (the machine suspended, say): nobody was watching.
            for worker in self._workers:
                worker.heard = now
        self._watched = now
        for worker in self._workers:
            if not worker.alive or worker.hung:
                continue
            if now - worker.heard > timeout:
                log.error(
                    "worker %d (pid %d) has not answered for %.0f s: killed, and its connections with it",
                    worker.index,
                    worker.proc.pid,
                    now - worker.heard,
                )
                worker.hung = True
                with contextlib.suppress(ProcessLookupError):
                    worker.proc.kill()
            else:
                self._tell(worker, {"type": "ping"})
        self._watching = asyncio.get_running_loop().call_later(self._watch_interval, self._watch)

    # Talking --------------------------------------------------------------------------------

    def _receive(self, worker: _Worker, head: dict[str, Any], raw: bytes, fds: list[int]) -> None:
        worker.heard = time.monotonic()
        kind = head.get("type")
        if kind == "pong":
            return
        if kind == "journaled":
            held = worker.held.get(head["id"])
            if held is not None:
                held.terms, held.record = head["terms"], head["record"]
                if self.keeper is not None and head.get("described"):
                    self.keeper.keep(head["id"], worker.arena_key, worker.arena, held.record, held.sock)
            return
        if kind == "ended":
            held = worker.held.pop(head["id"], None)
            if held is not None:
                self._let_go(head["id"], held)
            return
        if kind == "resuming":
            held = worker.held.get(head["id"])
            if held is not None:
                held.requests, held.resent = head["requests"], head["resent"]
            return
        if kind == "recovered":
            self._recovered(worker, head)
            return
        if kind == "clone_ask":
            self.on_clone_ask(head["export"], head["first"], head["last"])
            return
        if head.get("type") == "count":
            worker.open, worker.taken = head["connections"], head["taken"]
            self.on_change()
            if worker.on_the_way < MAX_ON_THE_WAY:
                for wake in self.on_room:
                    wake()
        else:
            worker.replies.put_nowait((head, raw, fds))

    def _tell(self, worker: _Worker, head: dict[str, Any], raw: bytes = b"", fds: list[int] | None = None) -> bool:
        return worker.alive and worker.channel.send(head, raw, fds)

    def _tell_all(self, head: dict[str, Any], raw: bytes = b"") -> None:
        for worker in self._workers:
            self._tell(worker, head, raw)

    async def _ask(self, worker: _Worker, head: dict[str, Any], last: str, raw: bytes = b"") -> list[Frame]:
        """Send ``head`` and collect the answers up to one of type ``last``."""
        async with worker.asking:
            if not self._tell(worker, head, raw):
                raise WorkerError(f"worker {worker.index} is gone")
            answers = []
            while True:
                try:
                    frame = await asyncio.wait_for(worker.replies.get(), ANSWER_TIMEOUT)
                except TimeoutError:
                    raise WorkerError(f"worker {worker.index} did not answer {head['type']}") from None
                if frame is None:
                    raise WorkerError(f"worker {worker.index} went away")
                answers.append(frame)
                if frame[0].get("type") == last:
                    return answers

    # What the server asks of its workers -----------------------------------------------------

    @property
    def connections(self) -> int:
        return sum(w.connections for w in self._workers if w.alive)

    def has_room(self) -> bool:
        """May another client be accepted now?  Not while every worker has MAX_ON_THE_WAY still
        to take: the sockets wait in the listening socket's backlog meanwhile, rather than in
        the frames queued here for a busy worker."""
        return any(w.alive and w.on_the_way < MAX_ON_THE_WAY for w in self._workers)

    def take(self, sock: socket.socket) -> bool:
        """Pass a new client to the worker with the fewest connections; False if none took it."""
        return self._pass(sock, {"type": "connection"})

    def resume(self, terms: dict[str, Any], pending: bytes, sock: socket.socket) -> bool:
        """Pass a connection taken over from a predecessor to a worker; False if none took it."""
        return self._pass(sock, {"type": "resume", "terms": terms}, pending)

    def _pass(self, sock: socket.socket, head: dict[str, Any], raw: bytes = b"") -> bool:
        """Pass a connection to the worker with the fewest; this process keeps a copy (see _Held)."""
        for worker in sorted((w for w in self._workers if w.alive), key=lambda w: w.connections):
            id_ = next(self._ids)
            if self._tell(worker, {**head, "id": id_}, raw, [sock.fileno()]):
                worker.given += 1
                worker.held[id_] = _Held(sock)
                return True
        sock.close()
        return False

    async def refresh(self) -> None:
        """Ask every worker for its counters (a worker that does not answer keeps its last ones)."""

        async def ask(worker: _Worker) -> None:
            try:
                (head, _, _), *_ = await self._ask(worker, {"type": "snapshot"}, "snapshot")
            except WorkerError as exc:
                log.warning("metrics: %s", exc)
                return
            worker.last = Snapshot.from_json(head["data"])

        await asyncio.gather(*(ask(w) for w in self._workers if w.alive))

    def add_to(self, snapshot: Snapshot) -> Snapshot:
        """``snapshot`` (the primary's own, left as it is) plus every worker's last counters."""
        total = Snapshot.from_json(snapshot.to_json())
        total.server.add(self.recovery)
        for part in [*self._retired, *(w.last for w in self._workers if w.last is not None)]:
            total.add(part)
        # The connections open now: not those of the dead workers' last counters.
        live = [c for w in self._workers if w.alive and w.last is not None for c in w.last.clients]
        total.clients = [*snapshot.clients, *live]
        return total

    def reload(self, config: ServerConfig) -> None:
        self.config = config
        self._changes += 1
        self._tell_all({"type": "reload"}, pickle.dumps(share(config, self.count)))

    async def apply(self, config: ServerConfig) -> list[str]:
        """Reload every worker with ``config`` as SIGHUP does, and wait until each has: what any
        could not open (a worker that dies meanwhile is replaced with ``config``)."""
        self.config = config
        self._changes += 1
        raw = pickle.dumps(share(config, self.count))
        answers = await self._ask_all({"type": "reload", "answer": True}, "reloaded", raw)
        return [f"worker {index}: {'; '.join(head['refused'])}" for index, head in answers if head.get("missing")]

    async def hide_export(self, name: str, hidden: bool) -> int:
        """Offer an export to new clients or not, in every worker; returns its clients there."""
        answers = await self._ask_all({"type": "export_hide", "name": name, "hidden": hidden}, "export_hidden")
        return sum(head.get("connections", 0) for _, head in answers)

    async def drop_export(self, name: str, config: ServerConfig) -> int:
        """Disconnect an export's clients in every worker and close it there; ``config`` is without it
        (for the workers started from now on).  Returns the clients disconnected."""
        self.config = config
        self._changes += 1
        answers = await self._ask_all({"type": "export_drop", "name": name}, "export_dropped")
        return sum(head.get("closed", 0) for _, head in answers)

    async def load_bitmaps(self, export: str) -> list[str]:
        """Every worker opens the export's bitmaps the primary made, and closes those it removed;
        returns what any could not do."""
        self._changes += 1
        answers = await self._ask_all({"type": "bitmaps_load", "export": export}, "bitmaps_loaded")
        return [f"worker {index}: {'; '.join(head['refused'])}" for index, head in answers if head.get("refused")]

    async def hold_export(self, name: str, timeout: float) -> list[str]:
        """Every worker holds the export's new requests and waits for those it took to complete (a
        snapshot is made); returns what any could not do."""
        asked = {w.index for w in self._workers if w.alive}
        answers = await self._ask_all({"type": "export_hold", "name": name, "timeout": timeout}, "export_held")
        problems = [f"worker {index}: {head['refused']}" for index, head in answers if head.get("refused")]
        silent = asked - {index for index, _ in answers}
        return problems + [f"worker {index} did not answer" for index in sorted(silent)]

    async def release_export(self, name: str, gate: int) -> None:
        """Every worker lets the held requests go on; with ``gate``, the number of granules of a
        snapshot's file cloned from now on, behind a gate (serving/cloning.py)."""
        await self._ask_all({"type": "export_release", "name": name, "gate": gate}, "export_released")

    def clone_progress(self, name: str, frontier: int, beyond: list[int]) -> None:
        self._tell_all({"type": "cloned", "export": name, "frontier": frontier, "beyond": beyond})

    def clone_end(self, name: str) -> None:
        self._tell_all({"type": "clone_end", "export": name})

    async def _ask_all(self, head: dict[str, Any], last: str, raw: bytes = b"") -> list[tuple[int, dict[str, Any]]]:
        """Ask every worker at once: (its index, its last answer) of each that answered.  One that
        did not is logged: a dead one's replacement starts from self.config."""

        async def ask(worker: _Worker) -> tuple[int, dict[str, Any]] | None:
            try:
                answers = await self._ask(worker, head, last, raw)
            except WorkerError as exc:
                log.warning("%s: %s", head["type"], exc)
                return None
            return worker.index, answers[-1][0]

        answered = await asyncio.gather(*(ask(w) for w in self._workers if w.alive))
        return [answer for answer in answered if answer is not None]

    async def package(self) -> tuple[list[tuple[dict[str, Any], bytes, socket.socket]], int]:
        """Every worker quiesces its connections and passes them here, for an upgrade: (frames as
        handover.py sends them, connections closed because their replies were not read).  WorkerError
        if one cannot: the caller then takes everything back (``take_back``)."""
        frames: list[tuple[dict[str, Any], bytes, socket.socket]] = []
        closed_slow = 0
        answers = await asyncio.gather(
            *(self._ask(w, {"type": "package"}, "end") for w in self._workers if w.alive), return_exceptions=True
        )
        for answer in answers:
            if isinstance(answer, BaseException):  # the caller takes everything back
                for _, _, sock in frames:
                    sock.close()
                raise WorkerError(str(answer))
            for head, raw, fds in answer:
                if head["type"] == "end":
                    closed_slow += head["closed_slow"]
                else:
                    frames.append((head, raw, socket.socket(fileno=fds[0])))
        return frames, closed_slow

    def let_go(self) -> None:
        self._tell_all({"type": "let_go"})

    def take_back(self) -> None:
        self._tell_all({"type": "take_back"})


def pool_of(server: Server) -> WorkerPool | None:
    """The worker processes of a server, if it has any (the serving layer knows them only as
    ``Workers``)."""
    workers = server.workers
    return workers if isinstance(workers, WorkerPool) else None


def _kill(proc: subprocess.Popen[bytes], channel: socket.socket) -> None:
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    proc.wait()
    channel.close()


def wait_or_kill(proc: subprocess.Popen[bytes], timeout: float) -> bool:
    """Wait for a child to exit; kill it if it has not within ``timeout``.  Did it exit by itself?"""
    try:
        proc.wait(timeout)
        return True
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return False
