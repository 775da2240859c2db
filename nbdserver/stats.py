"""The server's own counters (the exports' are in block/stats.py), kept by its connections."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from .protocol.errors import VIOLATION_KINDS

# Why connections are closed by the server without a protocol violation.
TURNED_AWAY = ("max_connections", "not_allowed", "handshake_timeout", "idle_timeout", "handover_timeout")


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
