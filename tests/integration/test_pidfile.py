"""--pid-file: written once the server serves, kept true across upgrades, removed at a stop."""

from __future__ import annotations

import signal
from pathlib import Path

from tests.conftest import make_image, running, wait_for


def pid_in(path: Path) -> int | None:
    try:
        return int(path.read_text())
    except (OSError, ValueError):
        return None


def test_the_pid_file_follows_the_main_process_across_upgrades(upgradable, tmp_path):
    pid_file = tmp_path / "run" / "nbdserver.pid"
    pid_file.parent.mkdir()
    u = upgradable(str(make_image(tmp_path / "disk.img")), "--pid-file", str(pid_file))
    assert wait_for(lambda: pid_in(pid_file) == u.pids[-1])
    assert pid_file.read_text() == f"{u.pids[-1]}\n" and oct(pid_file.stat().st_mode & 0o777) == "0o644"
    for _ in range(2):
        u.upgrade()
        successor = u.pids[-1]
        assert wait_for(lambda successor=successor: pid_in(pid_file) == successor), pid_file.read_text()
        assert wait_for(lambda: not running(u.pids[-2]), 30)
        assert pid_in(pid_file) == successor  # the predecessor's exit left the successor's
    assert sorted(p.name for p in pid_file.parent.iterdir()) == ["nbdserver.pid"]  # no temporary left
    u.stop(signal.SIGTERM)
    assert wait_for(lambda: not pid_file.exists())


def test_a_pid_file_that_cannot_be_written_is_said_and_the_server_serves(start_server, tmp_path, image):
    pid_file = tmp_path / "missing-dir" / "nbdserver.pid"
    server = start_server(image, "--pid-file", pid_file)
    assert server.logged(f"cannot write the PID file {pid_file}")
    assert server.proc.poll() is None


def test_the_configuration_file_names_it_relative_to_itself(start_server, tmp_path, image):
    config = tmp_path / "nbdserver.toml"
    config.write_text(f'pid-file = "server.pid"\n[[export]]\nname = "disk"\npath = "{image}"\n')
    server = start_server("--config", config)
    assert wait_for(lambda: pid_in(tmp_path / "server.pid") == server.proc.pid)
