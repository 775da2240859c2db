#!/usr/bin/env python3
"""Soak: several clients on one server for a set time; throughput, RSS and errors over time.

    fs/bench/soak.py [--duration 600] [--interval 10] [--size 1G] [--dir /var/tmp] [--out results/soak]

The load, all at once on one export:
  - fio, 4k random 70/30 read/write at QD16;
  - fio, 1M sequential writes at QD4 with a flush every 16;
  - fio, 64k random reads at QD8 over 2 connections;
  - a libnbd client that writes a pattern, reads it back and compares, again and again
    (FUA on every other write): a data error is counted, not ignored.

Every interval the server's /metrics (bytes moved, I/O and protocol errors) and its RSS are
sampled. The report gives a row per interval, then the verdict: RSS must stay flat (the last
quarter's mean within 10 % or 16 MiB of the second quarter's) and errors must be zero.
Exit status 1 if either fails.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OWN_METRICS_PORT, nbdserver_command, publish, start_server

METRICS_URL = re.compile(r"metrics on (http://\S+/metrics)")
MiB = 1024 * 1024


def fio_jobs(uri: str, duration: float) -> list[list[str]]:
    common = ["fio", "--ioengine=nbd", f"--uri={uri}", "--time_based", f"--runtime={duration:.0f}", "--size=256m"]
    return [
        [*common, "--name=mixed", "--rw=randrw", "--rwmixread=70", "--bs=4k", "--iodepth=16"],
        [*common, "--name=stream", "--rw=write", "--bs=1M", "--iodepth=4", "--fsync=16", "--offset=256m"],
        [*common, "--name=reads", "--rw=randread", "--bs=64k", "--iodepth=8", "--numjobs=2", "--offset=512m"],
    ]


class Verifier(threading.Thread):
    """Write, read back, compare: the client that notices wrong data."""

    def __init__(self, uri: str, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.uri, self.stop, self.rounds, self.errors = uri, stop, 0, []

    def run(self) -> None:
        import nbd  # Debian's python3-libnbd

        h = nbd.NBD()
        h.connect_uri(self.uri)
        region = 768 * MiB
        while not self.stop.is_set():
            offset = region + (self.rounds % 256) * MiB
            data = os.urandom(MiB)
            try:
                h.pwrite(data, offset, nbd.CMD_FLAG_FUA if self.rounds % 2 else 0)
                if h.pread(MiB, offset) != data:
                    self.errors.append(f"round {self.rounds}: data read back differs at {offset}")
            except nbd.Error as exc:
                self.errors.append(f"round {self.rounds}: {exc}")
                return
            self.rounds += 1
        h.shutdown()


def scrape(url: str) -> dict[str, float]:
    """Sums of the samples of each metric family (labels folded)."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    totals: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            family = name.split("{", 1)[0]
            totals[family] = totals.get(family, 0.0) + float(value)
    return totals


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=600, help="seconds of load (default 600)")
    parser.add_argument("--interval", type=float, default=10, help="seconds between samples (default 10)")
    parser.add_argument("--size", default="1G", help="of the export (default 1G; at least 1G)")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()), help="where the image lives")
    parser.add_argument("--out", type=Path, help="report folder (default: print only)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=args.dir, prefix="soak-") as tmp:
        image = Path(tmp) / "soak.img"
        server = start_server(nbdserver_command(image, ["--size", args.size, *OWN_METRICS_PORT]))
        try:
            return soak(server, args)
        finally:
            server.stop()


def soak(server, args: argparse.Namespace) -> int:
    url = next(m.group(1) for line in server.lines if (m := METRICS_URL.search(line)))
    uri = f"nbd://127.0.0.1:{server.port}/"
    stop = threading.Event()
    verifier = Verifier(uri, stop)
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    fios = [subprocess.Popen(job, **quiet) for job in fio_jobs(uri, args.duration)]
    verifier.start()
    rows, samples = [], []
    last = scrape(url)
    arriving = time.monotonic() + 30
    while last["nbdserver_written_bytes_total"] == 0 and time.monotonic() < arriving:
        time.sleep(0.05)  # the clock starts once the clients are writing, however slowly they start
        last = scrape(url)
    started = last_time = time.monotonic()
    try:
        while time.monotonic() - started < args.duration:
            time.sleep(min(args.interval, max(0.0, args.duration - (time.monotonic() - started))))
            now, current = time.monotonic(), scrape(url)
            span = now - last_time
            read = (current["nbdserver_read_bytes_total"] - last["nbdserver_read_bytes_total"]) / span / MiB
            written = (current["nbdserver_written_bytes_total"] - last["nbdserver_written_bytes_total"]) / span / MiB
            errors = current["nbdserver_io_errors_total"] + current["nbdserver_protocol_errors_total"]
            rss = rss_mib(server.pid)
            samples.append(rss)
            cells = [f"{now - started:.0f}", f"{read:.1f}", f"{written:.1f}", f"{rss:.1f}", f"{errors:.0f}"]
            row = "| " + " | ".join([*cells, str(len(verifier.errors))]) + " |"
            rows.append(row)
            print(row, flush=True)
            last, last_time = current, now
    finally:
        stop.set()
        for fio in fios:
            try:
                fio.wait(timeout=args.interval + 30)
            except subprocess.TimeoutExpired:
                fio.kill()
        verifier.join(30)
    fio_failures = [f"fio {' '.join(f.args[6:])} exited {f.returncode}" for f in fios if f.returncode]
    quarter = max(1, len(samples) // 4)
    early, late = samples[quarter : 2 * quarter] or samples[:1], samples[-quarter:]
    early_mean, late_mean = sum(early) / len(early), sum(late) / len(late)
    flat = late_mean - early_mean <= max(0.10 * early_mean, 16)
    errors = (
        (last["nbdserver_io_errors_total"] + last["nbdserver_protocol_errors_total"] if last else 0)
        + len(verifier.errors)
        + len(fio_failures)
    )
    verdict = [
        f"RSS: {early_mean:.1f} MiB (second quarter) -> {late_mean:.1f} MiB (last quarter), max {max(samples):.1f}:"
        f" {'flat' if flat else 'GROWING'}",
        f"errors: {errors:.0f} ({len(verifier.errors)} data, {len(fio_failures)} fio)",
        f"verifier: {verifier.rounds} MiB written with FUA every other time, read back and compared",
        *verifier.errors[:5],
        *fio_failures,
    ]
    report = "\n".join(
        [
            f"# Soak, {args.duration:.0f} s, {time.strftime('%Y-%m-%d %H:%M')}",
            "",
            "| t (s) | read MiB/s | write MiB/s | RSS MiB | server errors | data errors |",
            "|---|---|---|---|---|---|",
            *rows,
            "",
            *[f"- {line}" for line in verdict],
            "",
        ]
    )
    publish(report, args.out / "soak.md" if args.out else None)
    return 0 if flat and not errors else 1


if __name__ == "__main__":
    sys.exit(main())
