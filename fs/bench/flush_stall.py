#!/usr/bin/env python3
"""A flush on one worker after another worker wrote much: does the flushing worker's event loop
stop for it?  Two revisions side by side, alternating.

The server runs with two worker processes on FILE (on a real filesystem: on tmpfs a flush has
nothing to write back).  Connections 0 and 2 go to one worker, 1 and 3 to the other.  Each
round, connection 0 writes 64 MiB (buffered, no flush), then connection 1 flushes while
connection 3, on the flushing worker, reads 4k blocks one after another; the round's figure is
the longest of those reads.  A flush done on the event loop's thread holds every read of its
worker for as long as it writes back; one handed to the engine holds none of them.  Rounds are
4 s apart, past any back-off a slow flush in place starts.

    fs/bench/flush_stall.py --base REV [--head REV] --file /mnt/ext4/disk.img [--rounds 5] [--repeat 2]
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import threading
import time
from pathlib import Path

import nbd
from ab import checkout
from common import nbdserver_command, spread, start_server

WRITTEN = 64  # MiB connection 0 writes before each flush
ROUND = 4.0  # seconds from one round's writes to the next's


def round_(handles: list[nbd.NBD], chunk: bytes) -> tuple[float, float]:
    """One round: the flush's time and the longest 4k read beside it."""
    writer, flusher, reader = handles[0], handles[1], handles[3]
    for i in range(WRITTEN):
        writer.pwrite(chunk, i * len(chunk))
    longest, stop = [0.0], threading.Event()

    def read() -> None:
        while not stop.is_set():
            started = time.monotonic()
            reader.pread(4096, 2 * WRITTEN * len(chunk))
            longest[0] = max(longest[0], time.monotonic() - started)

    thread = threading.Thread(target=read)
    thread.start()
    time.sleep(0.05)
    started = time.monotonic()
    flusher.flush()
    took = time.monotonic() - started
    time.sleep(0.05)
    stop.set()
    thread.join()
    return took, longest[0]


def measure(tree: Path, image: str, rounds: int) -> list[tuple[float, float]]:
    argv = nbdserver_command(image, ["--processes", "2", "--metrics", "127.0.0.1:0"])
    server = start_server(argv, env={"PYTHONPATH": str(tree)}, cwd=tree)
    handles: list[nbd.NBD] = []
    try:
        for _ in range(4):
            handles.append(nbd.NBD())
            handles[-1].connect_tcp("127.0.0.1", str(server.port))
            time.sleep(0.2)  # the worker tells the primary of it, so the next one goes to the other
        workers = re.findall(r"(worker \d): \S+: connected", server.log())
        if workers[0] == workers[1] or workers[1] != workers[3]:
            raise SystemExit(f"connections went to {workers}, not alternately")
        chunk = os.urandom(1 << 20)
        results = []
        for _ in range(rounds):
            began = time.monotonic()
            results.append(round_(handles, chunk))
            time.sleep(max(0.0, ROUND - (time.monotonic() - began)))
        return results
    finally:
        for h in handles:
            h.shutdown()
        server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True)
    parser.add_argument("--head", help="a revision (default: the working tree)")
    parser.add_argument("--file", required=True, help="the backing file, at least 256 MiB, on a real filesystem")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    args.file = os.path.abspath(args.file)  # the servers run in the revisions' trees
    if os.path.getsize(args.file) < 4 * WRITTEN << 20:
        parser.error(f"{args.file}: smaller than {4 * WRITTEN} MiB")
    results: dict[str, list[tuple[float, float]]] = {"base": [], "head": []}
    with checkout(args.base) as base, checkout(args.head) as head:
        for _ in range(args.repeat):
            for side, tree in (("base", base), ("head", head)):
                results[side] += measure(tree, args.file, args.rounds)
                print(f"{side}: {len(results[side])} rounds", file=sys.stderr)
    print(f"{args.head or 'working tree'} (head) against {args.base} (base), {args.file}, median (min-max) ms:\n")
    print("| side | flush | longest 4k read on the flushing worker |\n|---|---|---|")
    for side, runs in results.items():
        flushes, reads = [1e3 * f for f, _ in runs], [1e3 * r for _, r in runs]
        print(f"| {side} | {spread(flushes, '.1f')} | {spread(reads, '.1f')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
