#!/usr/bin/env python3
"""What incremental backup costs a busy export: a dirty bitmap's cost to writes, and how long a
checkpoint holds the export's requests.

One server, one 1 GiB export on XFS (reflinks) on a loop device over tmpfs, fio's nbd engine.
The bitmap's cost: each workload runs without a bitmap and with one (added and removed through
the control socket between runs, the same server throughout), the two alternating and the order
swapped each repeat; the table gives median (min-max) IOPS and the ratio.  The checkpoint's pause:
fio runs the first workload while a checkpoint is taken and removed every second; the pauses the
server reports (``paused_ms``), and fio's longest completion in those runs against runs without.

    fs/bench/backup.py [--build mypyc] [--repeat 5] [--runtime 5] [--checkpoints 20] [--out FILE.md]

Needs root (mount).  Serves the installed build, or with ``--build mypyc`` the compiled build of
the working tree (builds.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from builds import compiled_tree
from common import fill, nbdserver_command, publish, run_fio, spread, start_server

ROOT = Path(__file__).resolve().parents[2]
SIZE = 1 << 30
WORKLOADS = {
    "4k rand write QD32": ["--rw=randwrite", "--bs=4k", "--iodepth=32"],
    "4k rand write QD1": ["--rw=randwrite", "--bs=4k", "--iodepth=1"],
    "1M seq write QD4": ["--rw=write", "--bs=1m", "--iodepth=4"],
}


@contextlib.contextmanager
def xfs_on_tmpfs() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(dir="/dev/shm") as shm, tempfile.TemporaryDirectory(prefix="bk-") as tmp:
        image, mount = Path(shm) / "xfs.img", Path(tmp) / "fs"
        mount.mkdir()
        with open(image, "wb") as f:
            f.truncate(SIZE + (512 << 20))
        subprocess.run(["mkfs.xfs", "-q", "-m", "reflink=1", str(image)], check=True)
        subprocess.run(["mount", "-o", "loop", str(image), str(mount)], check=True)
        try:
            yield Path(tmp)
        finally:
            subprocess.run(["umount", str(mount)], check=False)


def ctl(control: Path, *args: str) -> dict:
    command = [sys.executable, "-P", "-m", "nbdserver", "ctl", "--control", str(control), "--json", *args]
    out = subprocess.run(command, capture_output=True, text=True, check=True, env=os.environ).stdout
    reply = json.loads(out)
    if not reply["ok"]:
        raise RuntimeError(reply.get("error"))
    return reply


def fio(port: int, workload: str, runtime: int) -> tuple[float, float]:
    """IOPS and the longest completion (ms)."""
    args = ["--name=bench", "--ioengine=nbd", f"--uri=nbd://127.0.0.1:{port}/disk", "--size=1g", "--time_based"]
    result = run_fio([*args, f"--runtime={runtime}", "--group_reporting", *WORKLOADS[workload]], runtime + 120)
    return result.iops, result.max_ms


def checkpoints_while(control: Path, stop: threading.Event, replies: list[dict]) -> None:
    n = 0
    while not stop.wait(1.0):
        n += 1
        replies.append(ctl(control, "checkpoint", "disk", f"c{n}"))
        ctl(control, "snapshot", "remove", "disk", f"c{n}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--build", choices=["installed", "mypyc"], default="installed")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--runtime", type=int, default=5, help="seconds per fio run")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--pause-only", action="store_true", help="measure the checkpoints' pause only")
    args = parser.parse_args()
    if shutil.which("mkfs.xfs") is None or os.geteuid():
        print("backup.py: needs root and mkfs.xfs", file=sys.stderr)
        return 2
    env = {"PYTHONPATH": str(compiled_tree())} if args.build == "mypyc" else {}
    os.environ.update(env)
    with xfs_on_tmpfs() as where:
        image = where / "fs" / "disk.img"
        fill(image, SIZE)
        control = where / "control"
        extra = ["--state-dir", str(where / "state"), "--control", str(control), "--no-metrics"]
        command = nbdserver_command(image, extra)
        command[command.index(str(image))] = f"--export=name=disk,path={image}"
        server = start_server(command, env=env)
        try:
            report = measure(server.port, control, args)
        finally:
            server.stop()
    publish(report, args.out)
    return 0


def measure(port: int, control: Path, args: argparse.Namespace) -> str:
    iops: dict[tuple[str, bool], list[float]] = {(w, b): [] for w in WORKLOADS for b in (False, True)}
    for repeat in range(0 if args.pause_only else args.repeat):
        for workload in WORKLOADS:
            for bitmap in (False, True) if repeat % 2 == 0 else (True, False):
                if bitmap:
                    ctl(control, "bitmap", "add", "disk", "cost")
                result = fio(port, workload, args.runtime)[0]
                if bitmap:
                    ctl(control, "bitmap", "remove", "disk", "cost")
                iops[(workload, bitmap)].append(result)
                print(f"{workload}, bitmap {bitmap}: {result:.0f} IOPS", file=sys.stderr, flush=True)
    first = next(iter(WORKLOADS))
    quiet_max: list[float] = []
    busy_max: list[float] = []
    replies: list[dict] = []
    for _ in range(args.repeat):
        quiet_max.append(fio(port, first, args.runtime)[1])
        stop = threading.Event()
        taker = threading.Thread(target=checkpoints_while, args=(control, stop, replies))
        taker.start()
        try:
            busy_max.append(fio(port, first, args.runtime)[1])
        finally:
            stop.set()
            taker.join()
        for bitmap in ctl(control, "bitmap", "list", "disk")["bitmaps"]:  # the one tracking since the last
            ctl(control, "bitmap", "remove", "disk", bitmap["name"])
    lines = [
        f"fs/bench/backup.py --build {args.build}: 1 GiB export on XFS on a loop device over tmpfs, fio nbd engine, "
        f"{args.runtime} s runs, median (min-max) of {args.repeat}, {time.strftime('%Y-%m-%d')}",
        "",
        "| workload | IOPS without a bitmap | IOPS with one (64K) | with/without |",
        "|---|---|---|---|",
    ]
    for workload in [] if args.pause_only else WORKLOADS:
        without, with_ = iops[(workload, False)], iops[(workload, True)]
        ratio = statistics.median(with_) / statistics.median(without)
        lines.append(f"| {workload} | {spread(without, '.0f')} | {spread(with_, '.0f')} | {ratio:.3f}x |")
    pauses = [r["paused_ms"] for r in replies]
    cloned = [r["cloned_ms"] for r in replies]
    longest = [r["longest_clone_ms"] for r in replies]
    lines += [
        "",
        f"Checkpoints under {first}, one a second ({len(pauses)} taken): requests held at the boundary "
        f"{spread(pauses, '.2f')} ms; file cloned while served in {spread(cloned, '.0f')} ms, its longest "
        f"clone call {spread(longest, '.1f')} ms; fio's longest completion {spread(busy_max, '.1f')} ms with "
        f"them, {spread(quiet_max, '.1f')} ms without.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
