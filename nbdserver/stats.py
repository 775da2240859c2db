"""The server's own counters (the exports' are in block/stats.py), kept by its connections, and
the snapshot of everything /metrics shows: of one process, or summed over worker processes."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from .block.stats import QueueStats
from .protocol.errors import VIOLATION_KINDS

# Why connections are closed by the server without a protocol violation.
TURNED_AWAY = ("max_connections", "not_allowed", "handshake_timeout", "idle_timeout", "handover_timeout")
# What became of the connections of a serving process that died.
RECOVERY_OUTCOMES = ("resumed", "closed")


@dataclass
class ServerStats:
    """Counters of the server as a whole, kept by the connections."""

    connections: int = 0  # accepted
    # Disconnects by the rule broken, and (export, NBD error) of refused requests: counted from zero.
    protocol_errors: Counter[str] = field(default_factory=lambda: Counter(dict.fromkeys(VIOLATION_KINDS, 0)))
    refused: Counter[tuple[str, str]] = field(default_factory=Counter)
    # Connections closed on arrival or in the handshake, by reason: counted from zero.
    turned_away: Counter[str] = field(default_factory=lambda: Counter(dict.fromkeys(TURNED_AWAY, 0)))
    handover_pause: float | None = None  # seconds requests waited while this server took over, if it did
    # The event loops' polling after requests (polling.py): windows, those that received nothing, time.
    busy_poll_windows: int = 0
    busy_poll_empty_windows: int = 0
    busy_poll_seconds: float = 0.0
    # Deep queues' requests gathered before a receive (serving/gathering.py): waits, those that
    # ended on the clock, and measurements of clients' depths.
    gather_waits: int = 0
    gather_late: int = 0
    gather_probes: int = 0
    # Serving processes that died and whose connections a replacement took over (process/recovery.py):
    # how many, their connections by outcome (resumed, closed), and the pause from the death to the
    # replacement's going on (the last, and the sum over all).
    recoveries: int = 0
    recovered: Counter[str] = field(default_factory=lambda: Counter(dict.fromkeys(RECOVERY_OUTCOMES, 0)))
    recovery_pause: float | None = None
    recovery_pause_total: float = 0.0

    def add(self, other: ServerStats) -> None:
        self.connections += other.connections
        self.protocol_errors.update(other.protocol_errors)
        self.refused.update(other.refused)
        self.turned_away.update(other.turned_away)
        if self.handover_pause is None:
            self.handover_pause = other.handover_pause
        self.busy_poll_windows += other.busy_poll_windows
        self.busy_poll_empty_windows += other.busy_poll_empty_windows
        self.busy_poll_seconds += other.busy_poll_seconds
        self.gather_waits += other.gather_waits
        self.gather_late += other.gather_late
        self.gather_probes += other.gather_probes
        self.recoveries += other.recoveries
        self.recovered.update(other.recovered)
        if other.recovery_pause is not None:
            self.recovery_pause = other.recovery_pause
        self.recovery_pause_total += other.recovery_pause_total

    def to_json(self) -> dict[str, Any]:
        return {
            "connections": self.connections,
            "protocol_errors": self.protocol_errors,
            "refused": [[export, error, count] for (export, error), count in self.refused.items()],
            "turned_away": self.turned_away,
            "handover_pause": self.handover_pause,
            "busy_poll": [self.busy_poll_windows, self.busy_poll_empty_windows, self.busy_poll_seconds],
            "recovery": [self.recoveries, self.recovered, self.recovery_pause, self.recovery_pause_total],
            "gather": [self.gather_waits, self.gather_late, self.gather_probes],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ServerStats:
        stats = cls(
            data["connections"],
            Counter(data["protocol_errors"]),
            Counter({(export, error): count for export, error, count in data["refused"]}),
            Counter(data["turned_away"]),
            data["handover_pause"],
            *data["busy_poll"],
        )
        if "recovery" in data:  # absent from a process of the version before recoveries
            stats.recoveries, recovered, stats.recovery_pause, stats.recovery_pause_total = data["recovery"]
            stats.recovered.update(recovered)
        if "gather" in data:  # absent from a process of the version before gathering
            stats.gather_waits, stats.gather_late, stats.gather_probes = data["gather"]
        return stats


@dataclass
class ExportSnapshot:
    """One export as /metrics shows it."""

    size: int
    queue: QueueStats
    io_now: int = 0  # requests in flight: the queue depth
    inflight_bytes: int = 0
    connections: int = 0  # in the transmission phase
    engine: str = ""  # what carries out its I/O: io_uring, threads, rbd
    backing: str = ""  # what it serves: a file's path, rbd:POOL/IMAGE

    def add(self, other: ExportSnapshot) -> None:
        self.engine, self.backing = self.engine or other.engine, self.backing or other.backing
        self.queue.add(other.queue)
        self.io_now += other.io_now
        self.inflight_bytes += other.inflight_bytes
        self.connections += other.connections

    def to_json(self) -> dict[str, Any]:
        return {**self.__dict__, "queue": self.queue.to_json()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ExportSnapshot:
        return cls(**{**data, "queue": QueueStats.from_json(data["queue"])})


@dataclass
class Snapshot:
    """Everything /metrics shows, at one moment."""

    server: ServerStats
    exports: dict[str, ExportSnapshot]
    negotiating: int = 0  # connections still in the handshake
    # Each connection: {"peer", "export" (None in the handshake), "in_flight"}; for the control
    # socket's status, which names them (/metrics counts them only).
    clients: list[dict[str, Any]] = field(default_factory=list)

    def add(self, other: Snapshot) -> None:
        """Count ``other`` in (another process's): exports it has and this one has not are added
        (a copy: a snapshot kept to be added to stays as it was)."""
        self.server.add(other.server)
        self.negotiating += other.negotiating
        self.clients = [*self.clients, *other.clients]
        for name, export in other.exports.items():
            if name in self.exports:
                self.exports[name].add(export)
            else:
                self.exports[name] = ExportSnapshot.from_json(export.to_json())

    def to_json(self) -> dict[str, Any]:
        return {
            "server": self.server.to_json(),
            "exports": {name: e.to_json() for name, e in self.exports.items()},
            "negotiating": self.negotiating,
            "clients": self.clients,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Snapshot:
        exports = {name: ExportSnapshot.from_json(e) for name, e in data["exports"].items()}
        # (no clients: from a worker of the version before them)
        return cls(ServerStats.from_json(data["server"]), exports, data["negotiating"], list(data.get("clients", [])))
