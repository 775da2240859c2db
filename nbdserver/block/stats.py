"""What one export's queue counts, the way the kernel counts /proc/diskstats.

Plain integers and lists, updated on the event loop's thread as requests
arrive and submissions complete: no locks, no labels looked up, nothing
allocated per request beyond the numbers themselves.  The metrics layer reads
them when it is scraped.

As in diskstats, a *completed* read or write is one submission (requests
merged into it are not counted again) and a *merged* one is a request that
joined another's submission: client requests = completed + merged.
"""

from __future__ import annotations

import errno
from collections import Counter
from typing import Any, Final

from ..protocol import Command

LATENCY_BUCKETS = (
    50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 500e-3, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
SIZE_BUCKETS: Final = tuple(4096 << i for i in range(14))  # 4 KiB .. 32 MiB
SEGMENT_BUCKETS: Final = tuple(1 << i for i in range(11))  # 1 .. 1024
COMMANDS = max(Command) + 1  # lists are indexed by command number


class Histogram:
    """Counts per bucket: ``value <= bound``, the last one unbounded.

    Its sum is kept with the other counters (``time``, ``bytes``, ``segments``),
    where it is added anyway: the hot path indexes a bucket and nothing more.
    """

    __slots__ = ("bounds", "counts")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)


def _per_command(bounds: tuple[float, ...]) -> list[Histogram]:
    return [Histogram(bounds) for _ in range(COMMANDS)]


# QueueStats' lists indexed by command, and its lists of histograms.
_PER_COMMAND = ("requests", "merged", "submissions", "bytes", "segments", "time")
_HISTOGRAMS = ("latency", "submission_bytes", "submission_segments")


class QueueStats:
    """Counters per command (indexed by its number) and of the queue as a whole."""

    def __init__(self) -> None:
        self.requests = [0] * COMMANDS  # received
        self.merged = [0] * COMMANDS  # joined another request's submission
        self.submissions = [0] * COMMANDS  # completed, after merging
        self.bytes = [0] * COMMANDS  # of completed submissions
        self.segments = [0] * COMMANDS
        self.time = [0.0] * COMMANDS  # seconds from arrival to completion, summed over requests
        self.latency = _per_command(LATENCY_BUCKETS)  # of each request; its sum is in ``time``
        # Of each submission: their sums are ``bytes`` and ``segments``, and their counts ``submissions``.
        self.submission_bytes = _per_command(SIZE_BUCKETS)
        self.submission_segments = _per_command(SEGMENT_BUCKETS)
        self.errors: Counter[int] = Counter({errno.EIO: 0, errno.ENOSPC: 0})  # failed requests by errno
        self.waits = 0  # requests that waited for an overlapping earlier one
        self.io_time = 0.0  # seconds with at least one request in flight
        self.io_time_weighted = 0.0  # the integral of the queue depth over time

    def add(self, other: QueueStats) -> None:
        """Count ``other``'s as well (another process's queue for the same export)."""
        for name in _PER_COMMAND:
            mine, theirs = getattr(self, name), getattr(other, name)
            for i in range(COMMANDS):
                mine[i] += theirs[i]
        for name in _HISTOGRAMS:
            for mine, theirs in zip(getattr(self, name), getattr(other, name), strict=True):
                for i, count in enumerate(theirs.counts):
                    mine.counts[i] += count
        self.errors.update(other.errors)
        self.waits += other.waits
        # Busy time as a disk counts it (at most the time passed): the busiest queue's, since the
        # union of several queues' busy intervals is not kept.  The queue depth's integral adds up.
        self.io_time = max(self.io_time, other.io_time)
        self.io_time_weighted += other.io_time_weighted

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {name: getattr(self, name) for name in _PER_COMMAND}
        for name in _HISTOGRAMS:
            data[name] = [h.counts for h in getattr(self, name)]
        data["errors"] = {str(code): count for code, count in self.errors.items()}
        data.update(waits=self.waits, io_time=self.io_time, io_time_weighted=self.io_time_weighted)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> QueueStats:
        stats = cls()
        for name in _PER_COMMAND:
            setattr(stats, name, list(data[name]))
        for name in _HISTOGRAMS:
            for histogram, counts in zip(getattr(stats, name), data[name], strict=True):
                histogram.counts = list(counts)
        stats.errors = Counter({int(code): count for code, count in data["errors"].items()})
        stats.waits, stats.io_time, stats.io_time_weighted = data["waits"], data["io_time"], data["io_time_weighted"]
        return stats

    def summary(self) -> str:
        """One line per-command counters, e.g. ``WRITE 4096 requests in 160 submissions (25.6 per submission)``."""
        parts = []
        for command in Command:
            requests, submissions = self.requests[command], self.submissions[command]
            if requests:
                ratio = requests / submissions if submissions else 0.0
                parts.append(
                    f"{command.name} {requests} requests in {submissions} submissions ({ratio:.1f} per submission)"
                )
        parts.append(f"{self.waits} waited on overlaps")
        return "; ".join(parts)
