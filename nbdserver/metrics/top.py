"""``nbdserver top``: the columns of ``iostat -x``, per export, from a server's /metrics.

Two samples of the counters, ``interval`` apart, give the rates:

    r/s w/s        reads and writes completed per second (submissions, after merging)
    rMB/s wMB/s    MiB read and written per second
    rrqm/s wrqm/s  requests merged into another's submission per second
    %rrqm %wrqm    the share of requests that were merged
    r_await w_await  mean milliseconds from a request's arrival to its completion
    aqu-sz         mean queue depth
    %util          share of the time with at least one request in flight
"""

from __future__ import annotations

import sys
import time
import urllib.request
from collections import defaultdict
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from ..config import ConfigError, parse_listener

COLUMNS = (
    "r/s", "w/s", "rMB/s", "wMB/s", "rrqm/s", "wrqm/s", "%rrqm", "%wrqm", "r_await", "w_await", "aqu-sz", "%util",
)  # fmt: skip
_COUNTERS = (
    "reads_completed", "writes_completed", "read_bytes", "written_bytes", "reads_merged", "writes_merged",
    "read_time_seconds", "write_time_seconds", "io_time_seconds", "io_time_weighted_seconds",
)  # fmt: skip
MiB = 1024 * 1024


@dataclass
class Sample:
    at: float  # time.monotonic() when taken
    exports: dict[str, dict[str, float]]  # export -> counter stem -> value
    engines: dict[str, str] = field(default_factory=dict)  # export -> the engine doing its I/O


def metrics_url(target: str) -> str:
    """A URL as given, or the page of a ``serve --metrics`` address (``HOST:PORT``, ``[IPV6]:PORT``)."""
    if "://" in target:
        return target
    try:
        listener = parse_listener(target)
    except ConfigError:
        listener = None
    if listener is None or listener.is_unix:
        raise ConfigError(f"bad metrics address {target!r}: expected HOST:PORT, [IPV6]:PORT or a URL")
    return f"http://{listener}/metrics"


def fetch(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read().decode()


def parse(text: str, at: float) -> Sample:
    """The diskstats counters of every export in a /metrics page."""
    exports: dict[str, dict[str, float]] = defaultdict(dict)
    engines: dict[str, str] = {}
    wanted = {f"nbdserver_{stem}_total": stem for stem in _COUNTERS}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            stem = wanted.get(sample.name)
            if stem is not None and "export" in sample.labels:
                exports[sample.labels["export"]][stem] = sample.value
            elif sample.name == "nbdserver_export_info" and "export" in sample.labels:
                engines[sample.labels["export"]] = sample.labels.get("engine", "")
    return Sample(at, dict(exports), engines)


def rows(before: Sample, after: Sample) -> dict[str, dict[str, float]]:
    """``iostat -x`` columns per export over the time between two samples."""
    seconds = after.at - before.at
    table = {}
    for export, now in sorted(after.exports.items()):
        then = before.exports.get(export, {})

        def delta(stem: str, now: dict[str, float] = now, then: dict[str, float] = then) -> float:
            return now.get(stem, 0.0) - then.get(stem, 0.0)

        reads, writes = delta("reads_completed"), delta("writes_completed")
        rmerged, wmerged = delta("reads_merged"), delta("writes_merged")
        table[export] = {
            "r/s": reads / seconds,
            "w/s": writes / seconds,
            "rMB/s": delta("read_bytes") / MiB / seconds,
            "wMB/s": delta("written_bytes") / MiB / seconds,
            "rrqm/s": rmerged / seconds,
            "wrqm/s": wmerged / seconds,
            "%rrqm": _share(rmerged, reads + rmerged),
            "%wrqm": _share(wmerged, writes + wmerged),
            # Time is summed over client requests, merged or not: the mean is per client request.
            "r_await": _ratio(delta("read_time_seconds") * 1000, reads + rmerged),
            "w_await": _ratio(delta("write_time_seconds") * 1000, writes + wmerged),
            "aqu-sz": delta("io_time_weighted_seconds") / seconds,
            "%util": min(100.0, delta("io_time_seconds") / seconds * 100),
        }
    return table


def render(table: dict[str, dict[str, float]], engines: dict[str, str] | None = None) -> str:
    """The table, an export a line; with ``engines``, a column naming each one's engine."""
    names = {export: export or '""' for export in table}  # the default export's name is empty
    width = max([len("Export"), *map(len, names.values())])
    kinds = {export: (engines or {}).get(export, "") or "-" for export in table}
    engine = max([len("Engine"), *map(len, kinds.values())]) if engines is not None else 0

    def first(name: str, kind: str) -> str:
        return f"{name:<{width}} " + (f"{kind:<{engine}} " if engine else "")

    lines = [first("Export", "Engine") + " ".join(f"{c:>8}" for c in COLUMNS)]
    for export, values in table.items():
        lines.append(first(names[export], kinds[export]) + " ".join(f"{values[c]:8.2f}" for c in COLUMNS))
    return "\n".join(lines)


def run(url: str, interval: float = 1.0, once: bool = False, count: int | None = None) -> int:
    """Print a report every ``interval`` seconds (``once``: a single one) until interrupted."""
    try:
        before = parse(fetch(url), time.monotonic())
        shown = 0
        while count is None or shown < count:
            time.sleep(interval)
            after = parse(fetch(url), time.monotonic())
            report = render(rows(before, after), after.engines)
            if once:
                print(report)
                return 0
            print(f"\x1b[H\x1b[2J{time.strftime('%Y-%m-%d %H:%M:%S')}  {url}\n\n{report}", flush=True)
            before, shown = after, shown + 1
    except KeyboardInterrupt:
        return 0
    except OSError as exc:
        print(f"nbdserver top: cannot read {url}: {exc}", file=sys.stderr)
        return 1
    return 0


def _ratio(part: float, whole: float) -> float:
    return part / whole if whole else 0.0


def _share(part: float, whole: float) -> float:
    return 100 * _ratio(part, whole)
