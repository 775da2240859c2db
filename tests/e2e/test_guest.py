"""ext4 on an export through the kernel's nbd-client, in a QEMU guest (fs/guest, fs/scenarios).

One boot runs every scenario against one server; the host side answers the guest's requests
(kill or restart the server, snapshot its counters at marks) and checks what the server saw.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import MiB, ServerProcess, Upgradable, free_port, make_image, scrape, value

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "fs" / "guest"))
import guest

SCENARIOS = ["ext4", "multiconn", "discard", "upgrade", "crash", "restart"]
DISK_SIZE = 512 * MiB


@dataclass
class Run:
    result: guest.Result
    marks: dict[str, dict] = field(default_factory=dict)  # mark -> the server's metrics at that moment
    requests: list[str] = field(default_factory=list)  # what the guest asked the host, in order
    logs: list[str] = field(default_factory=list)  # every server's log, in order
    final: dict = field(default_factory=dict)  # the last server's metrics at the end
    pauses: list[float] = field(default_factory=list)  # each upgrade's pause, as the successor logged it


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    missing = guest.missing_tools()
    if missing:
        pytest.skip(f"the guest needs {', '.join(missing)} (tests/bootstrap installs them)")
    image = guest.build(log=lambda line: print(line, flush=True))
    disk = make_image(tmp_path_factory.mktemp("guest") / "disk.img", DISK_SIZE)
    port = free_port()

    def start() -> Upgradable:
        args = [str(disk), "--listen", f"127.0.0.1:{port}", "--metrics", "127.0.0.1:0"]
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
        elif verb in ("kill", "restart"):
            servers[-1].stop(signal.SIGKILL if verb == "kill" else signal.SIGTERM)
            servers.append(start())

    try:
        outcome.result = guest.run(image, port, SCENARIOS, on_request=on_request, echo=lambda line: print(line))
        outcome.final = scrape(servers[-1].server.metrics_url)
    finally:
        for server in servers:
            server.stop()
            outcome.logs.append(server.server.log_text())
    print(f"boot to first scenario: {outcome.result.boot_seconds:.1f} s ({outcome.result.accelerator})")
    for log in outcome.logs:  # what the kernel client sent, as each server counted it at shutdown
        print(*(line for line in log.splitlines() if "requests in" in line), sep="\n")
    yield outcome


SERVER_WIDE = ("nbdserver_connections_total",)  # counted for the server, with no export label


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
