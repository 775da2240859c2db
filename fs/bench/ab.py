#!/usr/bin/env python3
"""Two revisions of nbdserver side by side in one run, through fio's nbd engine.

Each revision is checked out in a temporary git worktree (the working tree
itself stands for ``--head`` unless given) and served with
``PYTHONPATH=<tree> python -m nbdserver serve``.  For every workload the two
alternate, each cell is repeated, and the table gives the median (min-max)
MiB/s, IOPS and the head/base ratio, and the server's CPU time (all its
processes, user and system) per request, which drifts less with the machine.  ``--scrape`` fetches the head server's
/metrics once a second while fio runs, so that the cost of being scraped is
in the figures too.  ``--base-python`` and ``--head-python`` run the sides on
other interpreters (each needs the server's dependencies, e.g. a venv's
python), so that one revision can be compared with itself across builds of
Python.  ``--build mypyc`` serves each side's compiled build (builds.py) instead of its sources.

    fs/bench/ab.py --base HEAD~1 [--head REV] [--build mypyc] [--only 4k] [--repeat 3] [--runtime 5] [--scrape]
                   [--base-args '...'] [--head-args '...'] [--base-python PY] [--head-python PY]
                   [--dir /dev/shm] [--out results/ab.md]
"""

from __future__ import annotations

import argparse
import contextlib
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from builds import compiled_tree
from common import FioResult, cpu_seconds, fill, nbdserver_command, publish, run_fio, spread, start_server
from merge_ab import IMAGE_SIZE, WORKLOADS, Workload, workload_args

ROOT = Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def checkout(revision: str | None) -> Iterator[Path]:
    """A tree holding ``revision`` (the working tree for None), removed afterwards."""
    if revision is None:
        yield ROOT
        return
    with tempfile.TemporaryDirectory(prefix="nbdserver-ab-") as tmp:
        tree = Path(tmp) / "tree"
        subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", "-q", tree, revision], check=True)
        try:
            yield tree
        finally:
            subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", tree], check=False)


def scrape_while(url: str, stop: threading.Event) -> None:
    while not stop.wait(1.0):
        with contextlib.suppress(OSError):
            urllib.request.urlopen(url, timeout=5).read()


def run_cell(
    tree: Path, python: str, image: Path, workload: Workload, extra: list[str], runtime: int, scrape: bool
) -> tuple[FioResult, float]:
    """fio's result, and the server's CPU (its processes', user and system) in µs per request."""
    # From inside the tree: "python -m" puts the working directory first on sys.path.
    server = start_server(nbdserver_command(image, extra, python), env={"PYTHONPATH": str(tree)}, cwd=tree)
    stop = threading.Event()
    scraper = None
    if scrape:
        found = [line.split("metrics on ", 1)[1].strip() for line in server.lines if "metrics on " in line]
        if found:
            scraper = threading.Thread(target=scrape_while, args=(found[0], stop), daemon=True)
            scraper.start()
    try:
        before = sum(cpu_seconds(server.pid))
        result = run_fio(workload_args(server.port, workload, runtime), runtime + 120)
        return result, (sum(cpu_seconds(server.pid)) - before) / max(1, result.requests) * 1e6
    finally:
        stop.set()
        if scraper is not None:
            scraper.join()
        server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="git revision to compare against")
    parser.add_argument("--head", help="git revision to measure (default: the working tree)")
    parser.add_argument("--base-args", default="", help="extra server arguments for the base")
    parser.add_argument("--head-args", default="", help="extra server arguments for the head")
    parser.add_argument("--base-python", default=sys.executable, help="the base's interpreter (default this one)")
    parser.add_argument("--head-python", default=sys.executable, help="the head's interpreter (default this one)")
    parser.add_argument(
        "--build", choices=("pure", "mypyc"), default="pure", help="serve each side's pure or compiled build"
    )
    parser.add_argument("--scrape", action="store_true", help="scrape the head's /metrics every second")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--runtime", type=int, default=5, help="seconds per fio run")
    parser.add_argument("--dir", default="/dev/shm", help="where the backing file lives (default tmpfs)")
    parser.add_argument("--only", help="run the workloads whose name contains this")
    parser.add_argument("--out", type=Path, help="also write the Markdown table here")
    args = parser.parse_args()

    workloads = [w for w in WORKLOADS if not args.only or args.only in w.name]
    sides = {"base": shlex.split(args.base_args), "head": shlex.split(args.head_args)}
    runs: dict[tuple[str, str], list[FioResult]] = {(w.name, side): [] for w in workloads for side in sides}
    cpu: dict[tuple[str, str], list[float]] = {key: [] for key in runs}
    with checkout(args.base) as base, checkout(args.head) as head, tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        pythons = {"base": args.base_python, "head": args.head_python}
        trees = {"base": base, "head": head}
        if args.build == "mypyc":
            trees = {side: compiled_tree(pythons[side], tree) for side, tree in trees.items()}
        image = Path(tmp) / "bench.img"
        fill(image, IMAGE_SIZE)
        total, n = len(workloads) * len(sides) * args.repeat, 0
        for workload in workloads:
            for _ in range(args.repeat):
                for side, extra in sides.items():
                    n += 1
                    result, us = run_cell(
                        trees[side], pythons[side], image, workload, extra, args.runtime, args.scrape and side == "head"
                    )
                    runs[(workload.name, side)].append(result)
                    cpu[(workload.name, side)].append(us)
                    progress = (
                        f"[{n}/{total}] {workload.name}, {side}: {result.mibs:.0f} MiB/s, {us:.1f} µs CPU/request"
                    )
                    print(progress, file=sys.stderr, flush=True)
    table = render(workloads, runs, cpu, args)
    publish(table, args.out)
    return 0


def render(
    workloads: list[Workload], runs: dict[tuple[str, str], list[FioResult]], cpu: dict, args: argparse.Namespace
) -> str:
    head = args.head or "working tree"
    lines = [
        f"{head} (head) against {args.base} (base), {args.build} builds: fio nbd engine, backing file in {args.dir}, "
        f"base on {interpreter(args.base_python)}, head on {interpreter(args.head_python)}, "
        f"{args.runtime} s runs, median (min-max) of {args.repeat}, {time.strftime('%Y-%m-%d')}"
        + (", head scraped every second" if args.scrape else ""),
        "",
        "| workload | MiB/s base | MiB/s head | head/base | IOPS base | IOPS head "
        "| server CPU µs/request base | head | head/base |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for w in workloads:
        base, head_runs = runs[(w.name, "base")], runs[(w.name, "head")]
        ratio = statistics.median(r.mibs for r in head_runs) / statistics.median(r.mibs for r in base)
        base_cpu, head_cpu = cpu[(w.name, "base")], cpu[(w.name, "head")]
        cpu_ratio = statistics.median(head_cpu) / statistics.median(base_cpu)
        lines.append(
            f"| {w.name} | {spread([r.mibs for r in base], '.0f')} | {spread([r.mibs for r in head_runs], '.0f')} "
            f"| {ratio:.2f}x | {spread([r.iops for r in base], '.0f')} | {spread([r.iops for r in head_runs], '.0f')} "
            f"| {spread(base_cpu, '.1f')} | {spread(head_cpu, '.1f')} | {cpu_ratio:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def interpreter(python: str) -> str:
    """Which Python a path runs, e.g. '/usr/bin/python3 (CPython 3.11.2)'."""
    version = subprocess.run(
        [python, "-c", "import platform; print(platform.python_implementation(), platform.python_version())"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    return f"{python} ({version})"


if __name__ == "__main__":
    sys.exit(main())
