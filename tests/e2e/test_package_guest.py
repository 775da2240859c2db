"""The Debian package under a real systemd (fs/guest/systemd_guest.py, fs/scenarios/systemd/):
installed with apt from the .deb, upgraded to the next build under ext4 mounted through the
kernel's nbd-client with a writer running, then purged.  One boot runs the three scenarios."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.test_package import build_deb, can_build

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "fs" / "guest"))
import guest
import systemd_guest

SCENARIOS = ["package", "pkgupgrade", "pkgpurge"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Iterator[guest.Result]:
    missing = systemd_guest.missing_tools()
    if missing:
        pytest.skip(f"the systemd guest needs {', '.join(missing)} (tests/bootstrap installs them)")
    if not can_build():
        pytest.skip("debhelper and dh-python are not installed (tests/bootstrap installs them)")
    debs = [build_deb(tmp_path_factory.mktemp("first")), build_deb(tmp_path_factory.mktemp("next"), "0.1.0+next1")]
    image = systemd_guest.build(log=lambda line: print(line, flush=True))
    result = systemd_guest.run(image, SCENARIOS, files=debs, echo=lambda line: print(line, flush=True))
    yield result


def tail(result: guest.Result, lines: int = 80) -> str:
    return "\n".join(result.console[-lines:])


def test_apt_installs_it_and_the_service_starts_exporting_nothing(run):
    assert run.passed["package"], tail(run)
    assert run.lines("@@ PACKAGED nbdserver")


def test_apt_upgrades_it_under_a_mounted_ext4_with_no_error(run):
    assert run.passed["pkgupgrade"], tail(run)
    (upgraded,) = run.lines("@@ UPGRADED to 0.1.0+next1")
    assert "fsynced files" in upgraded


def test_purge_leaves_nothing_behind(run):
    assert run.passed["pkgpurge"], tail(run)
