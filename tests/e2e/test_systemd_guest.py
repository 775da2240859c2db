"""The packaged units under a real systemd: a Debian 12 guest with systemd as PID 1, the server
installed as the README says, and the kernel's nbd-client with ext4 in the same guest
(fs/guest/systemd_guest.py, fs/scenarios/systemd/).  One boot runs every scenario in order."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "fs" / "guest"))
import guest
import systemd_guest

SCENARIOS = ["install", "start", "socket", "reload", "blockdev", "restart", "watchdog", "crash", "stop"]


@pytest.fixture(scope="module")
def run() -> Iterator[guest.Result]:
    missing = systemd_guest.missing_tools()
    if missing:
        pytest.skip(f"the systemd guest needs {', '.join(missing)} (tests/bootstrap installs them)")
    image = systemd_guest.build(log=lambda line: print(line, flush=True))
    result = systemd_guest.run(image, SCENARIOS, echo=lambda line: print(line, flush=True))
    print(f"boot to the first scenario: {result.boot_seconds:.1f} s ({result.accelerator})")
    yield result


def tail(result: guest.Result, lines: int = 80) -> str:
    return "\n".join(result.console[-lines:])


def test_systemd_is_pid_1(run):
    (booted,) = run.lines("@@ BOOTED")
    assert "systemd 252" in booted and booted.endswith("PID 1 is systemd"), booted


def test_installed_as_the_readme_says(run):
    assert run.passed["install"], tail(run)
    assert run.lines("@@ INSTALLED nbdserver ")


def test_the_service_starts_as_a_notify_unit_in_its_sandbox(run):
    assert run.passed["start"], tail(run)


def test_the_first_client_starts_the_socket_activated_service(run):
    assert run.passed["socket"], tail(run)


def test_reload_applies_a_new_export_and_read_only_and_refuses_a_bad_file(run):
    assert run.passed["reload"], tail(run)


def test_a_block_device_is_served_from_inside_the_sandbox(run):
    assert run.passed["blockdev"], tail(run)


def test_the_watchdog_restarts_a_stopped_server(run):
    assert run.passed["watchdog"], tail(run)
    print(*run.lines("@@ WATCHDOG"), sep="\n")


def test_systemctl_restart_under_a_mounted_filesystem_fails_nothing(run):
    assert run.passed["restart"], tail(run)
    print(*run.lines("@@ RESTARTED"), sep="\n")


def test_a_crash_of_the_whole_service_under_a_mounted_filesystem_fails_nothing(run):
    """systemctl kill -s KILL five times, and the watchdog's abort: the fd store keeps the
    connection, the restarted service takes it over (fs/scenarios/systemd/crash.sh)."""
    assert run.passed["crash"], tail(run)
    print(*run.lines("@@ CRASHED"), sep="\n")


def test_systemctl_stop_exits_cleanly(run):
    assert run.passed["stop"], tail(run)
