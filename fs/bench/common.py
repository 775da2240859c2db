"""What the runners in fs/bench/ share: start and stop a server, run fio, summarise repeats."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

LISTENING = re.compile(r"listening on [\d.]+:(\d+)")


class ServerError(RuntimeError):
    """The server exited or never became ready; the message ends with the tail of its log."""


@dataclass
class Server:
    proc: subprocess.Popen[str]
    port: int
    lines: list[str]  # its stdout and stderr, appended by `reader`
    reader: threading.Thread
    pid: int = 0  # the server's own process, where `proc` only supervises it (a forking server)

    def __post_init__(self) -> None:
        self.pid = self.pid or self.proc.pid

    def log(self) -> str:
        return "".join(self.lines)

    def stop(self, timeout: float = 60) -> str:
        """SIGTERM (a clean shutdown, so nbdserver logs its counters); returns the whole log."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.reader.join()
        return self.log()


# Metrics on a port of their own: the default one may belong to a server that is running for real.
OWN_METRICS_PORT = ("--metrics", "127.0.0.1:0")


def nbdserver_command(image: Path | str, extra: Sequence[str] = (), python: str = sys.executable) -> list[str]:
    """The server on a port the kernel picks; `start_server` reads it from the log.  As a user runs it:
    the build on ``PYTHONPATH`` (or installed), never the working directory's (``-P``), as its
    worker processes and successors run it."""
    return [python, "-P", "-m", "nbdserver", "serve", str(image), "--listen", "127.0.0.1:0", *extra]


def start_server(
    argv: Sequence[str],
    port: int | None = None,
    timeout: float = 30,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> Server:
    """Start `argv` and wait until it serves.

    Without `port` the server must log `listening on HOST:PORT` and then `ready:` (nbdserver);
    with it, ready means the port accepts a connection (servers that do not say).
    """
    proc = subprocess.Popen(
        list(argv),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        env={**os.environ, **env} if env else None,
        cwd=cwd,
    )
    lines: list[str] = []
    # Drained all the time: a server blocked on a full pipe would stall the benchmark.
    reader = threading.Thread(target=_drain, args=(proc.stdout, lines), daemon=True)
    reader.start()
    server = Server(proc, port or 0, lines, reader)
    deadline = time.monotonic() + timeout
    try:
        while True:
            if proc.poll() is not None:
                reader.join(5)
                raise ServerError(f"exited with status {proc.returncode}: {tail(server.log())}")
            if port is None:
                found = [m for line in list(lines) if (m := LISTENING.search(line))]
                if found and any("ready:" in line for line in list(lines)):
                    server.port = int(found[0].group(1))
                    return server
            elif _accepts(port):
                return server
            if time.monotonic() > deadline:
                raise ServerError(f"not ready after {timeout:.0f} s: {tail(server.log())}")
            time.sleep(0.02)
    except BaseException:
        server.stop(timeout=5)
        raise


def _drain(stream: IO[str], lines: list[str]) -> None:
    for line in stream:
        lines.append(line)


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def free_port() -> int:
    """A port nothing listens on right now (another process may still take it before the server does)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tail(text: str, lines: int = 3, width: int = 400) -> str:
    """The last lines of a log on one line, for tables and error messages."""
    kept = [line.strip() for line in text.splitlines() if line.strip()][-lines:]
    return " / ".join(kept)[-width:] or "(no output)"


@dataclass(frozen=True)
class FioResult:
    mibs: float  # reads and writes together
    iops: float
    p99_us: float  # completion latency of the slower direction
    client_us: float = 0.0  # fio's own CPU (user and system) per request: where the client is the limit
    requests: int = 0  # completed, every job and direction
    max_ms: float = 0.0  # the longest completion


def run_fio(args: Sequence[str], timeout: float, env: Mapping[str, str] | None = None) -> FioResult:
    """Run fio with `--output-format=json` added; sums every job and direction that moved data."""
    cmd = ["fio", "--output-format=json", *args]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}, check=False
    )
    if proc.returncode:
        # Its errors go to stderr; stdout ends with the JSON report.
        raise RuntimeError(f"fio exited with status {proc.returncode}: {tail(proc.stderr or proc.stdout)}")
    out = proc.stdout
    # The nbd engine prints "connected to NBD server" before the JSON.
    report = json.loads(out[out.index("{") :])
    mibs = iops = p99 = client_s = longest = 0.0
    requests = 0
    for job in report["jobs"]:
        if job.get("error"):
            raise RuntimeError(f"fio job {job['jobname']} failed with error {job['error']}")
        client_s += (job["usr_cpu"] + job["sys_cpu"]) / 100 * job["job_runtime"] / 1000
        for side in (job["read"], job["write"]):
            if side["io_bytes"]:
                mibs += side["bw"] / 1024
                iops += side["iops"]
                requests += side["total_ios"]
                p99 = max(p99, side["clat_ns"]["percentile"]["99.000000"] / 1000)
                longest = max(longest, side["clat_ns"]["max"] / 1e6)
    if not mibs:
        raise RuntimeError("fio moved no data")
    return FioResult(mibs, iops, p99, client_s / requests * 1e6 if requests else 0.0, requests, longest)


def cpu_seconds(pid: int) -> tuple[float, float]:
    """User and system (kernel) time of a process, its threads and its child processes (worker
    processes) so far, and of the children it waited for."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except FileNotFoundError:
        return 0.0, 0.0  # it exited meanwhile
    tick = os.sysconf("SC_CLK_TCK")
    user, system = (int(fields[11]) + int(fields[13])) / tick, (int(fields[12]) + int(fields[14])) / tick
    for child in children:
        child_user, child_system = cpu_seconds(int(child))
        user, system = user + child_user, system + child_system
    return user, system


def spread(values: Sequence[float], fmt: str) -> str:
    """`median (min-max)`."""
    return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"


def fill(path: Path, length: int) -> None:
    """Create `path` with `length` bytes of data (not zeros, so nothing can skip them)."""
    chunk = bytes(range(256)) * 4096
    with open(path, "wb") as f:
        for _ in range(length // len(chunk)):
            f.write(chunk)
        f.write(chunk[: length % len(chunk)])


def publish(report: str, out: Path | None) -> None:
    """Print a report, and write it to ``out`` too when given."""
    print(report)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(report)
