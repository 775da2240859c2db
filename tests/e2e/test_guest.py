"""ext4 on an export through the kernel's nbd-client, in a QEMU guest (fs/guest, fs/scenarios).

One boot runs every scenario against one server; the host side answers the guest's requests
(kill, restart or upgrade the server, kill one of its workers, snapshot its counters at marks) and
checks what the server saw.  Crash recovery has a boot of its own, against a server with two
worker processes, whatever ``pytest --processes`` asks of the others.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import MiB, ServerProcess, Upgradable, free_port, make_image, running, scrape, value

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "fs" / "guest"))
import guest

SCENARIOS = ["ext4", "multiconn", "discard", "upgrade", "crash", "restart"]
DISK_SIZE = 512 * MiB
RECOVERY_DISK_SIZE = 256 * MiB
RECOVERY_PAUSE_LIMIT = 5.0  # seconds from a worker's death to its replacement's going on (about 0.1-1.2 s)
TOOK_OVER = re.compile(
    r"worker \d+ \(pid (\d+)\) took over (\d+) connection\(s\) of its predecessor ([\d.]+) s after it died"
    r" \((\d+) closed\)"
)


@dataclass
class Kill:
    """A worker process SIGKILLed under the guest, and its replacement as the primary logged it."""

    pid: int  # the worker killed
    held: int  # the guest's connections it served, as /proc showed them
    serving: int  # the guest's connections every worker served, together
    replacement: int  # the worker that took them over
    resumed: int  # connections it took over
    closed: int  # connections it closed instead
    pause: float  # seconds from the death to the replacement's going on


@dataclass
class Run:
    result: guest.Result
    marks: dict[str, dict] = field(default_factory=dict)  # mark -> the server's metrics at that moment
    requests: list[str] = field(default_factory=list)  # what the guest asked the host, in order
    logs: list[str] = field(default_factory=list)  # every server's log, in order
    final: dict = field(default_factory=dict)  # the last server's metrics at the end
    pauses: list[float] = field(default_factory=list)  # each upgrade's pause, as the successor logged it
    kills: list[Kill] = field(default_factory=list)  # each worker killed


def worker_pids(primary: int) -> list[int]:
    """The primary's worker processes alive now, from its children (one killed and not yet reaped is not)."""
    with open(f"/proc/{primary}/task/{primary}/children") as f:
        return [pid for pid in map(int, f.read().split()) if running(pid)]


def served_connections(port: int) -> set[int]:
    """The socket inodes of the established TCP connections whose server side is ``port``."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(table) as f:
            for line in list(f)[1:]:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "01":  # ESTABLISHED
                    inodes.add(int(fields[9]))
    return inodes


def connections_held(pid: int, connections: set[int]) -> int:
    """How many of ``connections`` (socket inodes) process ``pid`` holds a descriptor of."""
    held = set()
    with contextlib.suppress(FileNotFoundError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(FileNotFoundError):
                match = re.fullmatch(r"socket:\[(\d+)\]", os.readlink(f"/proc/{pid}/fd/{fd}"))
                if match and int(match.group(1)) in connections:
                    held.add(int(match.group(1)))
    return len(held)


def kill_worker(upgradable: Upgradable, rng: random.Random, timeout: float = 30.0) -> Kill:
    """SIGKILL a worker of the server's current primary (the last successor), chosen at random among
    those serving the guest, and wait until the primary logs that its replacement took the
    connections over."""
    server = upgradable.server
    connections = served_connections(server.port)
    held = {pid: connections_held(pid, connections) for pid in worker_pids(upgradable.pids[-1])}
    serving = [pid for pid, count in held.items() if count]
    if not serving:  # the guest lost its connections at an earlier kill: nothing to kill (the test fails)
        print(f"kill-worker: no worker serves the guest any more: {held}", flush=True)
        return Kill(0, 0, 0, 0, 0, 0, 0.0)
    victim = rng.choice(serving)
    before = sum("of its predecessor" in line for line in list(server.log))
    os.kill(victim, signal.SIGKILL)
    assert server.logged("of its predecessor", count=before + 1, timeout=timeout), (
        f"no replacement took over from worker pid {victim} in {timeout:.0f} s\n" + server.log_text()[-3000:]
    )
    took = [m for line in list(server.log) if (m := TOOK_OVER.search(line))][before]
    replacement, resumed, pause, closed = int(took[1]), int(took[2]), float(took[3]), int(took[4])
    kill = Kill(victim, held[victim], sum(held.values()), replacement, resumed, closed, pause)
    print(f"kill-worker: {kill}", flush=True)
    return kill


def server_problems(logs: list[str]) -> list[str]:
    """Lines of the servers' logs that tell of a connection a replacement could not take over, or of
    an exception (a connection left hanging)."""
    return [line for log in logs for line in log.splitlines() if "not taken over" in line or "Traceback" in line]


def boot(
    tmp_path_factory: pytest.TempPathFactory,
    scenarios: list[str],
    server_args: tuple[str, ...] = (),
    disk_size: int = DISK_SIZE,
    timeout: float = 900,
    export: str | None = None,
) -> Run:
    """One boot running ``scenarios`` against a server on a fresh sparse image (or on ``export``, an
    RBD image say), with the host acting on the guest's requests; every server it started is stopped
    before it returns, the guest too."""
    missing = guest.missing_tools()
    if missing:
        pytest.skip(f"the guest needs {', '.join(missing)} (tests/bootstrap installs them)")
    image = guest.build(log=lambda line: print(line, flush=True))
    disk = export or make_image(tmp_path_factory.mktemp("guest") / "disk.img", disk_size)
    port = free_port()
    seed = int(os.environ.get("NBDSERVER_GUEST_SEED", random.randrange(1 << 32)))
    print(f"guest run of {' '.join(scenarios)}: NBDSERVER_GUEST_SEED={seed} chooses the same workers to kill")
    rng = random.Random(seed)

    def start() -> Upgradable:
        args = [str(disk), "--listen", f"127.0.0.1:{port}", "--metrics", "127.0.0.1:0", *server_args]
        return Upgradable(ServerProcess(args).wait_ready())

    servers = [start()]
    outcome = Run(guest.Result({}, [], 0.0, ""))

    def on_request(request: str) -> None:
        outcome.requests.append(request)
        verb, *rest = request.split()
        if verb == "mark":
            outcome.marks[rest[0]] = scrape(servers[-1].server.metrics_url)
        elif verb == "upgrade":
            outcome.pauses.append(servers[-1].upgrade())
        elif verb == "kill-worker":
            outcome.kills.append(kill_worker(servers[-1], rng))
        elif verb in ("kill", "restart"):
            servers[-1].stop(signal.SIGKILL if verb == "kill" else signal.SIGTERM)
            servers.append(start())

    try:
        outcome.result = guest.run(
            image, port, scenarios, on_request=on_request, timeout=timeout, echo=lambda line: print(line)
        )
        outcome.final = scrape(servers[-1].server.metrics_url)
    finally:
        for server in servers:
            server.stop()
            outcome.logs.append(server.server.log_text())
    print(f"boot to first scenario: {outcome.result.boot_seconds:.1f} s ({outcome.result.accelerator})")
    for log in outcome.logs:  # what the kernel client sent, as each server counted it at shutdown
        print(*(line for line in log.splitlines() if "requests in" in line), sep="\n")
    print(*server_problems(outcome.logs), sep="\n")
    return outcome


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    return boot(tmp_path_factory, SCENARIOS)


@pytest.fixture(scope="module")
def recovery_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """The recovery scenario, against a server with two worker processes.  It takes about a minute
    (most of it the replacements' pauses); a request the server never answers hangs the guest, which
    is stopped at the timeout."""
    return boot(tmp_path_factory, ["recovery"], ("--processes", "2"), RECOVERY_DISK_SIZE, timeout=300)


# Counted for the server, with no export label.
SERVER_WIDE = ("nbdserver_connections_total", "nbdserver_recoveries_total", "nbdserver_recovered_connections_total")


def counter(samples: dict, name: str, **labels: str) -> float:
    """A sample of the default export (named ""), or of the server for SERVER_WIDE metrics."""
    if name not in SERVER_WIDE:
        labels = {"export": "", **labels}
    return value(samples, name, **labels)


def delta(run: Run, start: str, end: str, name: str, **labels: str) -> float:
    return counter(run.marks[end], name, **labels) - counter(run.marks[start], name, **labels)


def passed(run: Run, scenario: str) -> bool:
    return run.result.passed.get(scenario, False)


def console_tail(run: Run, lines: int = 60) -> str:
    return "\n".join(run.result.console[-lines:])


def test_guest_booted(run):
    assert run.result.lines("@@ BOOTED"), console_tail(run)


def traffic(run: Run, scenario: str) -> str:
    """What the kernel client sent during a scenario, as the server counted it."""
    start, end = f"start-{scenario}", f"end-{scenario}"
    parts = []
    for op in ("read", "write", "flush", "trim"):
        requests = delta(run, start, end, "nbdserver_requests_total", op=op)
        if op in ("read", "write"):
            merged = delta(run, start, end, f"nbdserver_{op}s_merged_total")
            submissions = delta(run, start, end, f"nbdserver_{op}s_completed_total")
            moved = delta(run, start, end, f"nbdserver_{'read' if op == 'read' else 'written'}_bytes_total")
            parts.append(
                f"{op} {requests:.0f} ({merged:.0f} merged into {submissions:.0f} submissions, {moved / MiB:.1f} MiB)"
            )
        else:
            parts.append(f"{op} {requests:.0f}")
    return f"{scenario}: " + ", ".join(parts)


def test_ext4_one_connection(run):
    assert passed(run, "ext4"), console_tail(run)
    assert run.result.lines("@@ DIRECT-WRITE 16 MiB")
    for scenario in ("ext4", "multiconn", "discard"):
        print(traffic(run, scenario))
    assert delta(run, "start-ext4", "end-ext4", "nbdserver_requests_total", op="flush") >= 1, "sync sent no FLUSH"


def test_ext4_four_connections(run):
    assert passed(run, "multiconn"), console_tail(run)
    opened = delta(run, "multiconn-start", "multiconn-end", "nbdserver_connections_total")
    print(f"nbd-client -C 4 opened {opened:.0f} connection(s)")
    assert opened >= 2, f"nbd-client -C 4 opened {opened} connection(s)"


def test_trim_reaches_the_server(run):
    assert passed(run, "discard"), console_tail(run)
    trims = "nbdserver_requests_total"
    mkfs = delta(run, "discard-mkfs", "discard-mkfs-done", "nbdserver_discarded_bytes_total")
    assert mkfs >= DISK_SIZE * 0.9, f"mkfs discarded {mkfs} bytes of {DISK_SIZE}"
    assert delta(run, "discard-mkfs-done", "discard-fstrim-done", trims, op="trim") >= 1, "fstrim sent no TRIM"
    assert delta(run, "discard-online", "discard-online-done", trims, op="trim") >= 1, "-o discard sent no TRIM"


def test_crash_keeps_fsynced_files_and_a_clean_journal(run):
    assert "kill" in run.requests, console_tail(run)
    assert passed(run, "crash"), console_tail(run)
    assert run.result.lines("@@ WRITES")


def test_graceful_restart_keeps_the_filesystem(run):
    assert "restart" in run.requests, console_tail(run)
    assert passed(run, "restart"), console_tail(run)


def test_upgrades_under_a_mounted_filesystem_fail_nothing(run):
    assert run.requests.count("upgrade") == 20, run.requests
    assert passed(run, "upgrade"), console_tail(run)
    assert len(run.result.lines("@@ UPGRADED 10 times")) == 2
    pauses = sorted(run.pauses)
    print(f"20 upgrades under ext4: pause median {pauses[10]:.3f} s, max {pauses[-1]:.3f} s")
    print(*run.result.lines("@@ UPGRADED"), sep="\n")


def test_worker_kills_under_a_mounted_filesystem_fail_nothing(recovery_run):
    """Ten SIGKILLs of a worker through one connection, ten through four: the guest sees no error."""
    run = recovery_run
    assert run.result.lines("@@ BOOTED"), console_tail(run)
    assert passed(run, "recovery"), console_tail(run)
    assert run.requests.count("kill-worker") == 20, run.requests
    assert len(run.result.lines("@@ RECOVERED from 10 kills")) == 2, console_tail(run)
    print(*run.result.lines("@@ RECOVERED"), sep="\n")


def test_every_killed_worker_is_replaced_with_its_connections(recovery_run):
    """Each kill: a replacement took over every connection the dead worker served, closing none, soon."""
    run = recovery_run
    for n, kill in enumerate(run.kills):
        print(
            f"kill {n + 1:2}: worker pid {kill.pid} (serving {kill.held} of the guest's {kill.serving} connection(s))"
            f" -> pid {kill.replacement} took over {kill.resumed} ({kill.closed} closed) after {kill.pause:.3f} s"
        )
    assert not server_problems(run.logs), "\n".join(server_problems(run.logs))
    assert len(run.kills) == 20, run.requests
    for kill in run.kills:
        assert kill.pid, f"the guest had lost its connections before a kill: {run.kills}"
        assert kill.replacement != kill.pid, kill
        assert kill.closed == 0, kill
        assert kill.resumed == kill.held, kill
        assert kill.pause < RECOVERY_PAUSE_LIMIT, kill
    one, four = run.kills[:10], run.kills[10:]
    assert all(kill.serving == 1 for kill in one), one
    assert all(kill.serving >= 2 for kill in four), f"nbd-client -C 4 opened fewer than 2 connections: {four}"
    pauses = sorted(kill.pause for kill in run.kills)
    print(f"20 worker kills under ext4: pause min {pauses[0]:.3f} s, median {pauses[10]:.3f} s, max {pauses[-1]:.3f} s")
    resumed = delta(run, "start-recovery", "end-recovery", "nbdserver_recovered_connections_total", outcome="resumed")
    closed = delta(run, "start-recovery", "end-recovery", "nbdserver_recovered_connections_total", outcome="closed")
    assert delta(run, "start-recovery", "end-recovery", "nbdserver_recoveries_total") == 20
    assert (resumed, closed) == (sum(kill.resumed for kill in run.kills), 0)
