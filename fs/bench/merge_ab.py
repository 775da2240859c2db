#!/usr/bin/env python3
"""Merging on vs off, side by side in one run, through fio's nbd engine.

For each workload the two server settings alternate, each cell is repeated,
and the table reports the median (min-max) MiB/s, p99 latency, and the requests
per submission taken from the server's own counters (logged at shutdown).

    fs/bench/merge_ab.py [--repeat 3] [--runtime 5] [--dir /dev/shm] [--out results/merge.md]
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from common import OWN_METRICS_PORT, Server, fill, nbdserver_command, publish, run_fio, spread, start_server

IMAGE_SIZE = 1 << 30


@dataclass(frozen=True)
class Workload:
    name: str
    fio: tuple[str, ...]


WORKLOADS = [
    Workload("4k seq write QD32", ("--rw=write", "--bs=4k", "--iodepth=32")),
    Workload(
        "4k seq write 4 conns x QD8",
        ("--rw=write", "--bs=4k", "--iodepth=8", "--numjobs=4", "--offset_increment=256m", "--size=256m"),
    ),
    Workload("4k rand write QD32", ("--rw=randwrite", "--bs=4k", "--iodepth=32")),
    Workload("4k seq read QD32", ("--rw=read", "--bs=4k", "--iodepth=32")),
    Workload("4k rand read QD32", ("--rw=randread", "--bs=4k", "--iodepth=32")),
    Workload("4k rand write QD1", ("--rw=randwrite", "--bs=4k", "--iodepth=1")),
    Workload("4k rand read QD1", ("--rw=randread", "--bs=4k", "--iodepth=1")),
    Workload("1M seq write QD4", ("--rw=write", "--bs=1m", "--iodepth=4")),
    Workload("1M seq read QD4", ("--rw=read", "--bs=1m", "--iodepth=4")),
]
MODES = {"merge on": [], "merge off": ["--no-merge"]}


@dataclass
class Cell:
    mibs: list[float] = field(default_factory=list)
    p99_us: list[float] = field(default_factory=list)
    per_submission: list[float] = field(default_factory=list)


def stop_server(server: Server) -> float:
    """SIGTERM; returns the requests per submission of the busiest command, from the shutdown log."""
    best = (0, 0.0)
    for requests, ratio in re.findall(r"(\d+) requests in \d+ submissions \(([\d.]+) per submission\)", server.stop()):
        best = max(best, (int(requests), float(ratio)))
    return best[1]


def workload_args(port: int, workload: Workload, runtime: int) -> list[str]:
    """fio's arguments for ``workload`` against the default export on ``port``."""
    args = ["--name=bench", "--ioengine=nbd", f"--uri=nbd://127.0.0.1:{port}/", "--size=1g"]
    return [*args, "--time_based", f"--runtime={runtime}", "--group_reporting", *workload.fio]


def run_workload(port: int, workload: Workload, runtime: int) -> tuple[float, float]:
    result = run_fio(workload_args(port, workload, runtime), timeout=runtime + 120)
    return result.mibs, result.p99_us


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--runtime", type=int, default=5, help="seconds per fio run")
    parser.add_argument("--dir", default="/dev/shm", help="where the backing file lives (default tmpfs)")
    parser.add_argument("--out", type=Path, help="also write the Markdown table here")
    parser.add_argument("--only", help="run the workloads whose name contains this")
    args = parser.parse_args()

    workloads = [w for w in WORKLOADS if not args.only or args.only in w.name]
    cells = {(w.name, m): Cell() for w in workloads for m in MODES}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        image = Path(tmp) / "bench.img"
        fill(image, IMAGE_SIZE)  # reads must read data, not holes
        total, n = len(workloads) * len(MODES) * args.repeat, 0
        for workload in workloads:
            for _ in range(args.repeat):
                for mode, extra in MODES.items():
                    n += 1
                    print(f"[{n}/{total}] {workload.name}, {mode}", file=sys.stderr, flush=True)
                    server = start_server(nbdserver_command(image, [*extra, *OWN_METRICS_PORT]))
                    try:
                        mibs, p99 = run_workload(server.port, workload, args.runtime)
                    finally:
                        ratio = stop_server(server)
                    cell = cells[(workload.name, mode)]
                    cell.mibs.append(mibs)
                    cell.p99_us.append(p99)
                    cell.per_submission.append(ratio)
    table = render(workloads, cells, args)
    publish(table, args.out)
    return 0


def render(workloads: list[Workload], cells: dict, args: argparse.Namespace) -> str:
    lines = [
        f"Merging on vs off: fio nbd engine, backing file in {args.dir}, {args.runtime} s runs, "
        f"median (min-max) of {args.repeat}, {time.strftime('%Y-%m-%d')}",
        "",
        "| workload | MiB/s on | MiB/s off | on/off | p99 µs on | p99 µs off | requests/submission on |",
        "|---|---|---|---|---|---|---|",
    ]
    for w in workloads:
        on, off = cells[(w.name, "merge on")], cells[(w.name, "merge off")]
        ratio = statistics.median(on.mibs) / statistics.median(off.mibs)
        lines.append(
            f"| {w.name} | {spread(on.mibs, '.0f')} | {spread(off.mibs, '.0f')} | {ratio:.2f}x "
            f"| {spread(on.p99_us, '.0f')} | {spread(off.p99_us, '.0f')} | {statistics.median(on.per_submission):.1f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
