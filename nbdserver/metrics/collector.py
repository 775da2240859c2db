"""Prometheus metrics, read from the server's own counters when scraped.

Names follow node_exporter's diskstats collector (``node_disk_reads_completed_total``
becomes ``nbdserver_reads_completed_total{export=...}``), so that the queries and
dashboards an admin has for disks carry over.  Nothing here runs per request.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

from .. import __version__, build
from ..block.stats import Histogram
from ..protocol import Command
from ..stats import ExportSnapshot, Snapshot

PREFIX = "nbdserver"

# node_exporter's words for each kind of I/O: (requests, time stem, bytes stem, bytes help, command).
_DISKSTATS = [
    ("reads", "read", "read_bytes", "Bytes read", Command.READ),
    ("writes", "write", "written_bytes", "Bytes written", Command.WRITE),
    ("discards", "discard", "discarded_bytes", "Bytes discarded (TRIM)", Command.TRIM),
]
# Histograms of submissions: only commands that move or cover data.
_SUBMITTED = (Command.READ, Command.WRITE, Command.TRIM, Command.WRITE_ZEROES)
_OPS: dict[Command, str] = {command: command.name.lower() for command in Command if command != Command.DISC}


class ServerCollector(Collector):
    """Renders the snapshot ``source`` gives at each scrape (one process's, or summed over workers)."""

    def __init__(self, source: Callable[[], Snapshot]) -> None:
        self.source = source

    def collect(self) -> Iterator:
        snapshot = self.source()
        exports = sorted(snapshot.exports.items())
        yield from _diskstats(exports)
        yield from _histograms(exports)
        yield from _server_metrics(snapshot, exports)


def _server_metrics(snapshot: Snapshot, exports: list[tuple[str, ExportSnapshot]]) -> Iterator:
    stats = snapshot.server
    connections = GaugeMetricFamily(f"{PREFIX}_connections", "Client connections open, by export", labels=["export"])
    for name, export in exports:
        connections.add_metric([name], export.connections)
    yield connections
    yield _gauge("connections_negotiating", "Connections still in the handshake", snapshot.negotiating)
    yield _counter("connections_total", "Client connections accepted", stats.connections)
    violations = CounterMetricFamily(
        f"{PREFIX}_protocol_errors", "Clients disconnected for breaking the protocol, by rule", labels=["kind"]
    )
    for kind, count in sorted(stats.protocol_errors.items()):
        violations.add_metric([kind], count)
    yield violations
    turned_away = CounterMetricFamily(
        f"{PREFIX}_connections_turned_away",
        "Connections closed by the server without a protocol violation, by reason",
        labels=["reason"],
    )
    for reason, count in sorted(stats.turned_away.items()):
        turned_away.add_metric([reason], count)
    yield turned_away
    if stats.handover_pause is not None:
        yield _gauge(
            "handover_pause_seconds",
            "How long requests waited while this process took over from its predecessor",
            stats.handover_pause,
        )
    yield _counter(
        "recoveries_total",
        "Serving processes that died (a crash, SIGKILL, a hang) and were replaced with their connections",
        stats.recoveries,
    )
    recovered = CounterMetricFamily(
        f"{PREFIX}_recovered_connections",
        "Connections of serving processes that died: resumed by the replacement, or closed",
        labels=["outcome"],
    )
    for outcome, count in sorted(stats.recovered.items()):
        recovered.add_metric([outcome], count)
    yield recovered
    yield _counter(
        "recovery_pause_seconds_total",
        "Time from each serving process's death to its replacement's going on with its connections, summed",
        stats.recovery_pause_total,
    )
    if stats.recovery_pause is not None:
        yield _gauge(
            "recovery_pause_seconds",
            "Time from the last serving process's death to its replacement's going on with its connections",
            stats.recovery_pause,
        )
    yield _counter(
        "busy_poll_windows_total",
        "Windows the event loops polled for after a request instead of sleeping",
        stats.busy_poll_windows,
    )
    yield _counter(
        "busy_poll_empty_windows_total",
        "Busy-poll windows in which no client answered a reply",
        stats.busy_poll_empty_windows,
    )
    yield _counter("busy_poll_seconds_total", "Time the event loops spent polling", stats.busy_poll_seconds)
    yield _counter(
        "gather_waits_total",
        "Times a connection let a deep queue's requests gather in its socket before receiving them",
        stats.gather_waits,
    )
    yield _counter("gather_late_total", "Gathering waits that ended on the clock, short of the mark", stats.gather_late)
    yield _counter("gather_probes_total", "Measurements of a busy client's queue depth", stats.gather_probes)
    refused = CounterMetricFamily(
        f"{PREFIX}_refused_requests", "Requests refused before any I/O, by NBD error", labels=["export", "error"]
    )
    for (name, error), count in sorted(stats.refused.items()):
        refused.add_metric([name, error], count)
    yield refused
    io_errors = CounterMetricFamily(
        f"{PREFIX}_io_errors", "Requests failed by the backing, by errno", labels=["export", "errno"]
    )
    inflight = GaugeMetricFamily(
        f"{PREFIX}_inflight_bytes", "READ and WRITE bytes received and not yet answered", labels=["export"]
    )
    size = GaugeMetricFamily(f"{PREFIX}_export_size_bytes", "Size of the export", labels=["export"])
    served = InfoMetricFamily(f"{PREFIX}_export", "What each export serves, and the engine that does its I/O")
    for name, export in exports:
        served.add_metric([], {"export": name, "engine": export.engine, "backing": export.backing})
        for code, count in sorted(export.queue.errors.items()):
            io_errors.add_metric([name, errno.errorcode.get(code, str(code))], count)
        inflight.add_metric([name], export.inflight_bytes)
        size.add_metric([name], export.size)
    yield io_errors
    yield inflight
    yield size
    yield served
    info = InfoMetricFamily(f"{PREFIX}_build", "nbdserver version, build (mypyc or pure) and interpreter")
    info.add_metric([], {"version": __version__, "build": build.kind(), "python": build.interpreter()})
    yield info


def _diskstats(exports: list[tuple[str, ExportSnapshot]]) -> Iterator:
    """The counters of /proc/diskstats, per export."""
    families = []
    for stem, verb, bytes_stem, bytes_help, command in _DISKSTATS:
        done = _labelled_counter(f"{stem}_completed", f"{stem.capitalize()} completed (submissions, after merging)")
        merged = _labelled_counter(f"{stem}_merged", f"{stem.capitalize()} merged into another's submission")
        moved = _labelled_counter(bytes_stem, bytes_help)
        seconds = _labelled_counter(f"{verb}_time_seconds", f"Seconds spent by {stem}, from arrival to completion")
        for name, export in exports:
            stats, label = export.queue, [name]
            done.add_metric(label, stats.submissions[command])
            merged.add_metric(label, stats.merged[command])
            moved.add_metric(label, stats.bytes[command])
            seconds.add_metric(label, stats.time[command])
        families += [done, merged, moved, seconds]
    flushes = _labelled_counter("flush_requests", "Flushes completed")
    flush_time = _labelled_counter("flush_requests_time_seconds", "Seconds spent by flushes")
    requests = CounterMetricFamily(
        f"{PREFIX}_requests", "Requests received from clients, by operation", labels=["export", "op"]
    )
    io_now = GaugeMetricFamily(
        f"{PREFIX}_io_now", "Requests received and not yet completed (queue depth)", labels=["export"]
    )
    io_time = _labelled_counter("io_time_seconds", "Seconds with at least one request in flight")
    weighted = _labelled_counter("io_time_weighted_seconds", "Queue depth integrated over time, in seconds")
    for name, export in exports:
        stats, label = export.queue, [name]
        flushes.add_metric(label, stats.submissions[Command.FLUSH])
        flush_time.add_metric(label, stats.time[Command.FLUSH])
        for command, op in _OPS.items():
            requests.add_metric([name, op], stats.requests[command])
        io_now.add_metric(label, export.io_now)
        io_time.add_metric(label, stats.io_time)
        weighted.add_metric(label, stats.io_time_weighted)
    yield from families
    yield from (flushes, flush_time, requests, io_now, io_time, weighted)


def _histograms(exports: list[tuple[str, ExportSnapshot]]) -> Iterator:
    latency = HistogramMetricFamily(
        f"{PREFIX}_request_duration_seconds",
        "Time from a request's arrival to its completion, by operation",
        labels=["export", "op"],
    )
    sizes = HistogramMetricFamily(
        f"{PREFIX}_submission_bytes", "Bytes per submission to the backing, by operation", labels=["export", "op"]
    )
    segments = HistogramMetricFamily(
        f"{PREFIX}_submission_segments", "Requests per submission to the backing, by operation", labels=["export", "op"]
    )
    for name, export in exports:
        stats = export.queue
        for command, op in _OPS.items():
            if stats.requests[command]:
                _add(latency, [name, op], stats.latency[command], stats.time[command])
        for submitted in _SUBMITTED:
            if stats.submissions[submitted]:
                op = _OPS[submitted]
                _add(sizes, [name, op], stats.submission_bytes[submitted], stats.bytes[submitted])
                _add(segments, [name, op], stats.submission_segments[submitted], stats.segments[submitted])
    yield from (latency, sizes, segments)


def _add(family: HistogramMetricFamily, labels: list[str], histogram: Histogram, total: float) -> None:
    buckets, seen = [], 0
    for bound, count in zip((*histogram.bounds, float("inf")), histogram.counts, strict=True):
        seen += count
        buckets.append(("+Inf" if bound == float("inf") else repr(float(bound)), seen))
    family.add_metric(labels, buckets, total)


def _labelled_counter(stem: str, doc: str) -> CounterMetricFamily:
    return CounterMetricFamily(f"{PREFIX}_{stem}", doc, labels=["export"])


def _counter(stem: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(f"{PREFIX}_{stem}", doc, value=value)


def _gauge(stem: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"{PREFIX}_{stem}", doc, value=value)
