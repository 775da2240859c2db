"""The server under a real systemd: a Debian 12 guest with systemd as PID 1 and the kernel's
nbd-client with ext4 in the same guest (fs/guest/systemd_guest.py, fs/scenarios/systemd/).

One boot runs every scenario in order: the Debian package installed with apt as the README says
(the older of two builds made here), the service's scenarios on that install, the upgrade to the
newer build under a mounted ext4 with a writer running, the purge, then the install without the
package that docs/systemd.md gives."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.test_package import build_deb, can_build

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "fs" / "guest"))
import guest
import systemd_guest

pytestmark = pytest.mark.own_build  # the guest runs what it installs, not the build under test

SCENARIOS = [
    *["package", "start", "socket", "reload", "blockdev", "restart", "watchdog", "crash", "pkgupgrade", "pkgpurge"],
    *["install", "stop"],
]
NEXT = "0.1.0+next1"  # the version of the second build


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[guest.Result]:
    missing = systemd_guest.missing_tools()
    if missing:
        pytest.skip(f"the systemd guest needs {', '.join(missing)} (tests/bootstrap installs them)")
    if not can_build():
        pytest.skip("debhelper and dh-python are not installed (tests/bootstrap installs them)")
    debs = [build_deb(tmp_path_factory.mktemp("first")), build_deb(tmp_path_factory.mktemp("next"), NEXT)]
    image = systemd_guest.build(log=lambda line: print(line, flush=True))
    result = systemd_guest.run(image, SCENARIOS, files=debs, echo=lambda line: print(line, flush=True))
    print(f"boot to the first scenario: {result.boot_seconds:.1f} s ({result.accelerator})")
    yield result


def tail(result: guest.Result, lines: int = 80) -> str:
    return "\n".join(result.console[-lines:])


def test_systemd_is_pid_1(run):
    (booted,) = run.lines("@@ BOOTED")
    assert "systemd 252" in booted and booted.endswith("PID 1 is systemd"), booted


def test_apt_installs_it_as_the_readme_says_and_it_starts_exporting_nothing_until_told(run):
    assert run.passed["package"], tail(run)
    assert run.lines("@@ PACKAGED nbdserver")


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


def test_apt_upgrades_it_under_a_mounted_ext4_with_no_error(run):
    assert run.passed["pkgupgrade"], tail(run)
    (upgraded,) = run.lines(f"@@ UPGRADED to {NEXT}")
    assert "fsynced files" in upgraded


def test_purge_stops_it_and_leaves_nothing_behind(run):
    assert run.passed["pkgpurge"], tail(run)


def test_installed_without_the_package_as_the_docs_say(run):
    assert run.passed["install"], tail(run)
    assert run.lines("@@ INSTALLED nbdserver ")


def test_systemctl_stop_exits_cleanly(run):
    assert run.passed["stop"], tail(run)
