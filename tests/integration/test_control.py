"""The control socket: ``nbdserver ctl`` against real servers, with and without worker processes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import nbd
import pytest

from tests.conftest import MiB, ServerProcess, Upgradable, make_image, wait_for

pytestmark = pytest.mark.bindings  # libnbd's Python bindings: run again by tests/in_current

BLOCK = 4096
PROCESSES = ["1", "2"]  # served in one process, and by worker processes


def ctl(control: Path, *args: str | os.PathLike[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "nbdserver", "ctl", "--control", str(control), *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL, cwd=cwd)


def status(control: Path) -> dict:
    result = ctl(control, "--json", "status")
    assert result.returncode == 0, result.stderr
    reply = json.loads(result.stdout)
    assert reply["ok"] is True
    return reply


def exports(control: Path) -> dict[str, dict]:
    return {e["name"]: e for e in status(control)["exports"]}


def connect(server: ServerProcess, name: str) -> nbd.NBD:
    h = nbd.NBD()
    h.connect_uri(server.uri(name))
    return h


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path: a Unix socket's path has at most 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="ctl-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def control(short_dir: Path) -> Path:
    return short_dir / "control"


@pytest.mark.parametrize("processes", PROCESSES)
def test_status_on_a_socket_of_mode_0600(start_server, image, control, processes):
    server = start_server(image, "--name", "disk", "--control", control, "--processes", processes)
    assert stat.S_ISSOCK(control.stat().st_mode) and stat.S_IMODE(control.stat().st_mode) == 0o600
    h = connect(server, "disk")
    try:
        h.pwrite(b"x" * BLOCK, 0)
        reply = status(control)
        [disk] = reply["exports"]
        assert disk == {
            "name": "disk",
            "size": 64 * MiB,
            "backing": str(image),
            "engine": disk["engine"],
            "read_only": False,
            "connections": 1,
            "bitmaps": [],
        }
        assert disk["engine"] in ("uring", "threads")
        [client] = reply["connections"]
        assert client["export"] == "disk" and client["peer"].startswith("127.0.0.1:") and client["in_flight"] == 0
        table = ctl(control, "status")
        assert table.returncode == 0, table.stderr
        assert "EXPORT" in table.stdout and "disk" in table.stdout and str(image) in table.stdout
        assert client["peer"] in table.stdout
    finally:
        h.shutdown()
    server.stop()
    assert not control.exists()  # removed at shutdown


@pytest.mark.parametrize("processes", PROCESSES)
def test_an_added_export_is_served_by_every_process(start_server, image, control, short_dir, processes):
    server = start_server(image, "--control", control, "--processes", processes)
    added = ctl(control, "export", "add", "b", "b.img", "--size", "8M", cwd=short_dir)  # relative to ctl's cwd
    assert added.returncode == 0 and "export 'b' added" in added.stdout, added.stderr
    assert (short_dir / "b.img").stat().st_size == 8 * MiB
    assert exports(control)["b"]["backing"] == str(short_dir / "b.img")
    assert server.logged("control: uid 0 pid") or server.logged(f"control: uid {os.getuid()} pid")
    # More clients than workers: each worker serves the export.
    handles = [connect(server, "b") for _ in range(4)]
    try:
        for i, h in enumerate(handles):
            h.pwrite(bytes([i + 1]) * BLOCK, i * BLOCK)
        for i, h in enumerate(handles):
            assert h.pread(BLOCK, ((i + 1) % 4) * BLOCK) == bytes([(i + 1) % 4 + 1]) * BLOCK
        assert exports(control)["b"]["connections"] == 4
    finally:
        for h in handles:
            h.shutdown()
    read_only = ctl(control, "export", "add", "ro", short_dir / "b.img", "--read-only")
    assert read_only.returncode == 0, read_only.stderr
    h = connect(server, "ro")
    assert h.is_read_only() and h.pread(BLOCK, 0) == b"\1" * BLOCK
    with pytest.raises(nbd.Error):
        h.pwrite(b"x" * BLOCK, 0)
    h.shutdown()


@pytest.mark.parametrize("processes", PROCESSES)
def test_errors_name_what_is_wrong(start_server, image, control, short_dir, processes):
    start_server(image, "--name", "disk", "--control", control, "--processes", processes)
    cases = [
        (("export", "add", "disk", image), "export 'disk' exists already"),
        (("export", "add", "c", short_dir / "missing.img"), f"export 'c' not added: {short_dir / 'missing.img'}: "),
        (("export", "add", "c", short_dir), f"export 'c' not added: {short_dir}: Is a directory"),
        (("export", "remove", "nope"), "no export 'nope'"),
    ]
    for args, message in cases:
        result = ctl(control, *args)
        assert result.returncode == 1 and message in result.stderr, (args, result.stderr)
        assert result.stdout == ""
    as_json = ctl(control, "--json", "export", "remove", "nope")
    assert as_json.returncode == 1 and json.loads(as_json.stdout) == {"ok": False, "error": "no export 'nope'"}
    assert list(exports(control)) == ["disk"]  # nothing changed


def test_nothing_listening_is_a_clear_error(short_dir):
    absent = ctl(short_dir / "absent", "status")
    assert absent.returncode == 1 and f"{short_dir / 'absent'}: no such control socket" in absent.stderr
    stale = short_dir / "stale"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(stale))  # bound, never listening: as a dead server leaves it
    refused = ctl(stale, "status")
    assert refused.returncode == 1 and f"{stale}: nothing listens" in refused.stderr


def test_a_stale_socket_is_replaced_and_a_live_one_refused(start_server, image, control, tmp_path):
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(control))
    start_server(image, "--control", control)
    assert status(control)["exports"]
    other = make_image(tmp_path / "other.img")
    again = subprocess.run(
        [sys.executable, "-m", "nbdserver", "serve", str(other), "--no-metrics", "--control", str(control)],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert again.returncode == 1 and "another server is listening" in again.stderr, again.stderr
    assert status(control)["exports"]  # the first one's socket is untouched


def raw(control: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(30)
    sock.connect(str(control))
    return sock


def replies(sock: socket.socket, count: int) -> list[dict]:
    data = b""
    while data.count(b"\n") < count:
        chunk = sock.recv(65536)
        assert chunk, f"closed after {data!r}"
        data += chunk
    return [json.loads(line) for line in data.splitlines()]


@pytest.mark.parametrize("processes", PROCESSES)
def test_garbage_gets_an_error_and_an_over_long_line_a_close(start_server, image, control, processes):
    start_server(image, "--control", control, "--processes", processes)
    with raw(control) as sock:
        sock.sendall(b'garbage\n[1]\n{"command": 7}\n{"command": "frobnicate"}\n\xff\xfe\n{"command": "status"}\n')
        answers = replies(sock, 6)
        assert [a["ok"] for a in answers] == [False] * 5 + [True]
        assert "unknown command 'frobnicate'" in answers[3]["error"] and answers[5]["exports"]
    with raw(control) as sock:
        try:
            sock.sendall(b"x" * (1024 * 1024))  # no newline: closed once 64 KiB have come
        except (BrokenPipeError, ConnectionResetError):
            pass
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
        assert json.loads(data.splitlines()[0])["error"].startswith("bad request: a request is at most")
    with raw(control) as sock:  # a client that sends requests and reads no reply is served when it reads
        sock.sendall(b'{"command": "status"}\n' * 2000)
        assert all(a["ok"] for a in replies(sock, 2000))
    assert status(control)["exports"]


@pytest.mark.parametrize("processes", PROCESSES)
def test_a_client_that_leaves_mid_command_changes_nothing_else(start_server, image, control, short_dir, processes):
    server = start_server(image, "--control", control, "--processes", processes)
    with raw(control) as sock:
        request = {"command": "export.add", "args": {"name": "b", "path": str(short_dir / "b.img"), "size": MiB}}
        sock.sendall(json.dumps(request).encode() + b"\n")
    with raw(control) as sock:
        sock.sendall(b'{"command": "export.remove", "args": {"na')  # half a request
    assert wait_for(lambda: "b" in exports(control))  # the command ran to its end all the same
    assert server.logged("export 'b' added")
    h = connect(server, "b")
    assert h.pread(BLOCK, 0) == bytes(BLOCK)
    h.shutdown()
    assert server.proc.poll() is None


@pytest.mark.parametrize("processes", PROCESSES)
def test_remove_is_refused_with_clients_unless_forced(start_server, image, control, short_dir, processes):
    server = start_server(image, "--name", "disk", "--control", control, "--processes", processes)
    backing = make_image(short_dir / "b.img", 8 * MiB)
    assert ctl(control, "export", "add", "b", backing).returncode == 0
    h = connect(server, "b")
    other = connect(server, "disk")
    try:
        h.pwrite(b"w" * BLOCK, BLOCK)
        refused = ctl(control, "export", "remove", "b")
        assert refused.returncode == 1 and "has 1 client(s) connected (--force" in refused.stderr, refused.stderr
        assert h.pread(BLOCK, BLOCK) == b"w" * BLOCK  # still served, and offered to new clients
        connect(server, "b").shutdown()
        forced = ctl(control, "export", "remove", "b", "--force")
        assert forced.returncode == 0 and "1 client(s) disconnected" in forced.stdout, forced.stderr
        with pytest.raises(nbd.Error):  # a clean close: the next request finds the connection gone
            h.pread(BLOCK, 0)
        with open(backing, "rb") as f:  # what it wrote is in the file
            f.seek(BLOCK)
            assert f.read(BLOCK) == b"w" * BLOCK
        assert list(exports(control)) == ["disk"]
        with pytest.raises(nbd.Error):
            connect(server, "b")
        other.pwrite(b"o" * BLOCK, 0)  # the server goes on
        assert other.pread(BLOCK, 0) == b"o" * BLOCK
    finally:
        other.shutdown()
    assert server.proc.poll() is None


def test_changes_survive_a_restart_in_the_state_directory(start_server, image, control, short_dir):
    state = short_dir / "state"
    args = [image, "--name", "disk", "--control", control, "--state-dir", state]
    server = start_server(*args)
    make_image(short_dir / "b.img", 4 * MiB)
    assert ctl(control, "export", "add", "b", short_dir / "b.img", "--read-only").returncode == 0
    assert ctl(control, "export", "add", "c", short_dir / "c.img", "--size", "4M").returncode == 0
    assert ctl(control, "export", "remove", "c").returncode == 0
    assert ctl(control, "export", "remove", "disk").returncode == 0  # a configured one
    kept = json.loads((state / "exports.json").read_text())
    assert [e["name"] for e in kept["added"]] == ["b"] and kept["removed"] == ["disk"]
    assert stat.S_IMODE((state / "exports.json").stat().st_mode) == 0o600
    assert [p.name for p in state.iterdir()] == ["exports.json"]  # no temporary file left
    server.stop()
    server = start_server(*args)
    assert {name: e["read_only"] for name, e in exports(control).items()} == {"b": True}
    h = connect(server, "b")
    assert h.is_read_only() and h.get_size() == 4 * MiB
    h.shutdown()


@pytest.mark.parametrize("processes", PROCESSES)
def test_the_control_socket_and_its_changes_survive_an_upgrade(image, control, short_dir, processes):
    args = [str(image), "--name", "disk", "--control", str(control), "--processes", processes]
    u = Upgradable(ServerProcess([*args, "--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0"]).wait_ready())
    try:
        assert ctl(control, "export", "add", "b", short_dir / "b.img", "--size", "4M").returncode == 0
        inode = control.stat().st_ino
        h = connect(u.server, "b")
        h.pwrite(b"u" * BLOCK, 0)
        u.upgrade()
        assert control.stat().st_ino == inode  # the same socket: its file never went away
        assert set(exports(control)) == {"disk", "b"}  # no state directory: handed over all the same
        assert h.pread(BLOCK, 0) == b"u" * BLOCK  # its client goes on in the successor
        assert exports(control)["b"]["connections"] == 1
        assert ctl(control, "export", "remove", "disk").returncode == 0  # the successor takes commands
        assert u.server.logged(f"handed to pid {u.pids[-1]}")
        h.shutdown()
    finally:
        u.stop()
    assert not control.exists()


@pytest.mark.parametrize("processes", PROCESSES)
def test_a_reload_keeps_the_changes(start_server, control, short_dir, processes):
    """SIGHUP re-reads the file with the changes over it: a removed export stays removed, an added one stays."""
    make_image(short_dir / "a.img", MiB)
    make_image(short_dir / "c.img", MiB)
    config = short_dir / "nbdserver.toml"
    config.write_text('[[export]]\nname = "a"\npath = "a.img"\n[[export]]\nname = "c"\npath = "c.img"\n')
    server = start_server("--config", config, "--control", control, "--processes", processes)
    assert ctl(control, "export", "add", "b", short_dir / "b.img", "--size", "1M").returncode == 0
    assert ctl(control, "export", "remove", "a").returncode == 0
    server.proc.send_signal(signal.SIGHUP)
    assert server.logged("reloaded:")
    assert set(exports(control)) == {"b", "c"}
    assert not any("no longer configured" in line or "not added" in line for line in server.log), server.log_text()


def test_with_a_control_socket_a_server_may_start_with_no_export_and_get_one(start_server, short_dir):
    """As the packaged service starts before the admin configures anything: nothing is offered,
    then an export added through the socket is served, and the last one may be removed again."""
    control = short_dir / "control"
    server = start_server("--control", control)
    assert server.logged("no exports yet")
    assert exports(control) == {}
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.connect_uri(server.uri())
    try:
        assert h.opt_list(lambda name, description: 0) == 0  # none listed
    finally:
        h.opt_abort()
    image = make_image(short_dir / "disk.img", MiB)
    assert ctl(control, "export", "add", "disk", image).returncode == 0
    h = connect(server, "disk")
    h.pwrite(b"x" * 512, 0)
    h.shutdown()
    assert ctl(control, "export", "remove", "disk").returncode == 0
    assert exports(control) == {}
