"""Running as a systemd service: units, configuration file, readiness and watchdog, socket activation,
reload, journal logging, and a clean stop under load."""

from __future__ import annotations

import itertools
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import MiB, free_port, make_image, scrape, value, wait_for
from tests.integration.rawclient import Closed, Cmd, Err, RawClient, Reply

ROOT = Path(__file__).resolve().parents[2]
SYSTEMD = ROOT / "deploy" / "systemd"
EXAMPLE = ROOT / "deploy" / "nbdserver.toml.example"


def run(*cmd: str | os.PathLike[str], timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kwargs)


def nbdserver(*args: str | os.PathLike[str]) -> subprocess.CompletedProcess:
    return run(sys.executable, "-m", "nbdserver", *args, stdin=subprocess.DEVNULL)


def needs(program: str) -> None:
    if shutil.which(program) is None:
        pytest.skip(f"{program} is not installed")


# Units ------------------------------------------------------------------------------------------


def test_units_verify(tmp_path):
    """systemd-analyze checks every key and that ExecStart runs (pointed at this checkout's nbdserver)."""
    needs("systemd-analyze")
    program = Path(sys.executable).with_name("nbdserver")
    assert program.exists(), "the nbdserver script of the test environment"
    units = []
    for unit in ("nbdserver.service", "nbdserver.socket", "nbdserver-metrics.socket"):
        text = (SYSTEMD / unit).read_text().replace("/opt/nbdserver/bin/nbdserver", str(program))
        (tmp_path / unit).write_text(text)
        units.append(tmp_path / unit)
    result = run("systemd-analyze", "verify", "--man=no", *units)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr
    service = (SYSTEMD / "nbdserver.service").read_text()
    for key in (
        "Type=notify",
        "NotifyAccess=main",  # MAINPID= after an upgrade comes from the main process
        "WatchdogSec=",
        "ExecReload=",
        "User=nbdserver",
        "ProtectSystem=strict",
        "FileDescriptorStoreMax=1100",
        "Environment=FDSTORE=1100",
    ):
        assert key in service
    assert "FileDescriptorName=nbd" in (SYSTEMD / "nbdserver.socket").read_text()
    assert "FileDescriptorName=metrics" in (SYSTEMD / "nbdserver-metrics.socket").read_text()


def test_example_config_is_valid():
    """The example loads; check-config then objects only to backing files this machine does not have."""
    result = nbdserver("check-config", EXAMPLE)
    assert result.returncode == 1
    problems = result.stderr.strip().splitlines()
    assert problems and all("/var/lib/nbdserver/" in line for line in problems), result.stderr


# Configuration file ----------------------------------------------------------------------------


CONFIG = """\
log-level = "info"
default-export = "b"
max-inflight = "64M"

[metrics]
enabled = false

[[export]]
name = "a"
path = "a.img"
size = "8M"
description = "first, created"

[[export]]
name = "b"
path = "{b}"
read-only = true
cache = "buffered"
max-export-inflight = "16M"
"""


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    b = make_image(tmp_path / "b.img", 4 * MiB)
    path = tmp_path / "nbdserver.toml"
    path.write_text(CONFIG.format(b=b))
    return path


@pytest.mark.clients
def test_serves_what_the_config_file_says(start_server, config_file, tmp_path):
    server = start_server("--config", config_file, "--metrics", "127.0.0.1:0")  # a flag overrides the file
    assert (tmp_path / "a.img").stat().st_size == 8 * MiB  # relative to the file, created
    listing = run("nbdinfo", "--list", "--json", server.uri())
    assert listing.returncode == 0, listing.stderr
    assert '"export-name": "a"' in listing.stdout and "first, created" in listing.stdout
    default = run("nbdinfo", "--json", server.uri())  # the empty name: "b", read-only
    assert '"export-name": "b"' in default.stdout and '"is_read_only": true' in default.stdout
    assert server.metrics_url  # metrics were off in the file, on by the flag


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("workers = 'many'", "workers: expected an integer, got a string"),
        ("wrokers = 4", "wrokers: unknown key"),
        ("[[export]]\nname = 'x'", "export[0]: path is missing"),
        ("[[export]]\npath = 'x.img'\ncache = 'fast'", "export[0].cache: 'fast' is not one of buffered, direct"),
        ("[[export]]\npath = 'x.img'\nsize = '1Q'", "export[0].size: bad size '1Q'"),
        ("[[export]]\npath = 'x.img'\nread-only = 'yes'", "export[0].read-only: expected true or false"),
        ("listen = ['localhost']", "listen[0]: bad listen address 'localhost'"),
        ("[metrics]\nport = 1", "metrics.port: unknown key"),
        ("allow = ['10.0.0.0/8', '10.0.0.0/33']", "allow[1]: bad network '10.0.0.0/33'"),
        ("allow = 7", "allow: expected a list of networks, got an integer"),
        ("unix-socket-mode = 660", "unix-socket-mode: expected a string"),
        ("tls = 'maybe'", "tls: 'maybe' is not one of off, on, require"),
        ("tls = 'require'\n[[export]]\npath = 'x.img'\nsize = '1M'", "needs a TLS certificate and key"),
        (
            "tls = 'on'\ntls-certificate = 'c.pem'\ntls-key = 'k.pem'\n[[export]]\npath = 'x.img'\nsize = '1M'",
            "tls: cannot load",
        ),
        ("[[export]]\npath = 'x.img'\nsize = '1M'\ntls = 'require'", "needs the server's tls on"),
        ("engine = ", "not valid TOML"),
        ("workers = 0\n[[export]]\npath = 'x.img'\nsize = '1M'", "workers must be at least 1"),
        ("[[export]]\npath = 'x.img'\nsize = '1M'\n[[export]]\npath = 'y.img'\nsize = '1M'", "defined twice"),
    ],
)
def test_check_config_names_file_key_and_problem(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text + "\n")
    result = nbdserver("check-config", path)
    assert result.returncode == 1
    assert f"{path}: " in result.stderr and message in result.stderr, result.stderr
    served = nbdserver("serve", "--config", path)  # the server refuses it the same way
    assert served.returncode == 2 and message in served.stderr, served.stderr


def test_check_config_checks_backing_files(tmp_path, config_file):
    result = nbdserver("check-config", config_file)
    assert result.returncode == 0, result.stderr
    assert "OK: 2 export(s) ('a', 'b')" in result.stdout
    (tmp_path / "b.img").unlink()
    result = nbdserver("check-config", config_file)
    assert result.returncode == 1 and "export 'b': path" in result.stderr and "does not exist" in result.stderr
    missing = nbdserver("check-config", tmp_path / "none.toml")
    assert missing.returncode == 1 and "none.toml: cannot read" in missing.stderr


# Readiness, status, watchdog ----------------------------------------------------------------------


def notifications(sock: socket.socket, until: str, timeout: float = 20) -> list[str]:
    """Datagrams received until one has the field ``until``; each as its fields joined by spaces."""
    got: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            message = sock.recv(4096).decode()
        except TimeoutError:
            break
        got.append(message.replace("\n", " "))
        if until in message.split("\n"):
            return got
    raise AssertionError(f"no {until} within {timeout} s; got {got}")


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_notify_ready_status_watchdog_stopping(start_server, image, tmp_path, abstract):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if abstract:
        name = f"nbdserver-test-{os.getpid()}-{time.monotonic_ns()}"
        sock.bind("\0" + name)
        address = "@" + name
    else:
        address = str(tmp_path / "notify")
        sock.bind(address)
    with sock:
        server = start_server(
            image, "--processes", "1", env={"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "400000"}
        )  # its STATUS= wording (with worker processes, it adds how many)
        first = notifications(sock, "READY=1")
        assert any("STATUS=1 export(s) on 1 address(es), 0 connection(s)" in m for m in first), first
        pings = []
        for _ in range(8):
            notifications(sock, "WATCHDOG=1", timeout=2)
            pings.append(time.monotonic())
        gap = statistics.median(b - a for a, b in itertools.pairwise(pings))
        assert 0.1 < gap < 0.3, f"WATCHDOG=1 every {gap:.3f} s, not every 0.2 s (half of WATCHDOG_USEC)"
        with RawClient(server.host, server.port).handshake().go():
            notifications(sock, "STATUS=1 export(s) on 1 address(es), 1 connection(s)")
        notifications(sock, "STATUS=1 export(s) on 1 address(es), 0 connection(s)")
        server.proc.send_signal(signal.SIGTERM)
        assert notifications(sock, "STOPPING=1")
        assert server.proc.wait(20) == 0


def test_watchdog_only_for_its_pid(start_server, image, tmp_path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    with sock:
        env = {"NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "100000", "WATCHDOG_PID": "1"}
        start_server(image, env=env)
        assert not any("WATCHDOG" in m for m in notifications(sock, "READY=1"))
        sock.settimeout(0.5)
        with pytest.raises(TimeoutError):
            sock.recv(4096)  # WATCHDOG_PID names another process: no pings


# Socket activation --------------------------------------------------------------------------------


@pytest.mark.clients
def test_socket_activation_tcp_unix_and_metrics(start_server, image, tmp_path):
    needs("systemd-socket-activate")
    nbd_port, metrics_port = free_port(), free_port()
    unix = tmp_path / "nbd.sock"
    wrapper = [
        "systemd-socket-activate",
        "-l",
        f"127.0.0.1:{nbd_port}",
        "-l",
        str(unix),
        "-l",
        f"127.0.0.1:{metrics_port}",
        "--fdname=nbd:nbd:metrics",
    ]
    # The server starts on the first connection: nbdinfo's waits in the inherited socket's backlog.
    server = start_server(image, "--listen", "127.0.0.1:1", "--no-metrics", wrapper=wrapper, wait=False)
    assert wait_for(lambda: f"127.0.0.1:{metrics_port}" in server.log_text()), server.log_text()  # it listens
    info = run("nbdinfo", "--size", f"nbd://127.0.0.1:{nbd_port}/")
    assert info.returncode == 0 and int(info.stdout) == 64 * MiB, info.stderr + server.log_text()
    server.wait_ready()
    assert server.addresses == [f"127.0.0.1:{nbd_port}", f"unix:{unix}"]  # not the --listen address
    info = run("nbdinfo", "--size", f"nbd+unix:///?socket={unix}")
    assert info.returncode == 0 and int(info.stdout) == 64 * MiB, info.stderr
    samples = scrape(f"http://127.0.0.1:{metrics_port}/metrics")  # despite --no-metrics: a socket named so
    assert value(samples, "nbdserver_connections_total") >= 2
    assert server.stop() == 0
    assert unix.exists(), "the socket's file belongs to whoever created it"


# Reload -----------------------------------------------------------------------------------------


@pytest.mark.clients
def test_sighup_reloads_exports_read_only_and_log_level(start_server, tmp_path):
    make_image(tmp_path / "a.img", 4 * MiB)
    make_image(tmp_path / "c.img", 4 * MiB)
    path = tmp_path / "nbdserver.toml"
    path.write_text('[[export]]\nname = "a"\npath = "a.img"\n')
    server = start_server("--config", path)
    writer = RawClient(server.host, server.port).handshake().go("a")
    writer.request(Cmd.WRITE, 0, 4096, payload=b"1" * 4096)
    assert writer.read_reply().error == 0

    path.write_text(
        'log-level = "debug"\nengine = "uring"\n'
        '[[export]]\nname = "a"\npath = "a.img"\nread-only = true\ndescription = "now read-only"\n'
        '[[export]]\nname = "c"\npath = "c.img"\n'
        '[[export]]\nname = "missing"\npath = "missing.img"\n'
    )
    server.proc.send_signal(signal.SIGHUP)
    # The last line the reload writes: the warnings come after the "reloaded:" line.
    assert server.logged("not reloaded: engine changed: needs a restart"), server.log_text()
    log = server.log_text()
    assert "export 'a' read-only" in log and "export 'c' added" in log and "log level debug" in log
    assert re.search(r"not reloaded: export 'missing' not added: .*missing\.img", log), log

    writer.request(Cmd.WRITE, 4096, 4096, payload=b"2" * 4096)  # the open connection is refused writes now
    assert writer.read_reply().error == Err.EPERM
    writer.request(Cmd.READ, 0, 4096)
    assert writer.read_reply().data == b"1" * 4096
    info = run("nbdinfo", "--json", server.uri("a"))
    assert '"is_read_only": true' in info.stdout and "now read-only" in info.stdout
    assert run("nbdinfo", "--size", server.uri("c")).stdout.strip() == str(4 * MiB)
    assert wait_for(lambda: "connected" in server.log_text() and "[DEBUG]" in server.log_text())

    path.write_text("workers = 'x'\n")  # a broken file changes nothing
    server.proc.send_signal(signal.SIGHUP)
    assert wait_for(lambda: "reload failed, configuration unchanged" in server.log_text())
    assert "workers: expected an integer" in server.log_text()
    assert run("nbdinfo", "--size", server.uri("c")).returncode == 0
    writer.close()
    assert server.stop() == 0


@pytest.mark.clients
def test_read_only_export_cannot_be_made_writable_by_reload(start_server, tmp_path):
    make_image(tmp_path / "a.img", 4 * MiB)
    path = tmp_path / "nbdserver.toml"
    path.write_text('[[export]]\nname = "a"\npath = "a.img"\nread-only = true\n')
    server = start_server("--config", path)
    path.write_text('[[export]]\nname = "a"\npath = "a.img"\n')
    server.proc.send_signal(signal.SIGHUP)
    assert wait_for(lambda: "making it writable needs a restart" in server.log_text()), server.log_text()
    assert '"is_read_only": true' in run("nbdinfo", "--json", server.uri("a")).stdout


def test_sighup_without_config_file_changes_nothing(server):
    server.proc.send_signal(signal.SIGHUP)
    assert wait_for(lambda: "nothing to reload" in server.log_text())
    assert server.proc.poll() is None


# Logging ----------------------------------------------------------------------------------------


def test_journal_format_when_stderr_is_the_journal(image):
    """JOURNAL_STREAM naming our stderr: <N> priorities and no timestamps; otherwise timestamps."""
    read_end, write_end = os.pipe()
    st = os.fstat(write_end)
    env = {**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
    cmd = [sys.executable, "-m", "nbdserver", "serve", image, "--listen", "127.0.0.1:0", "--no-metrics"]
    proc = subprocess.Popen(cmd, stderr=write_end, stdin=subprocess.DEVNULL, env=env)
    os.close(write_end)
    with os.fdopen(read_end) as stream:
        lines = []
        for line in stream:
            lines.append(line.rstrip("\n"))
            if "ready:" in line:
                break
        proc.send_signal(signal.SIGTERM)
        lines += [line.rstrip("\n") for line in stream]
    assert proc.wait(20) == 0
    assert lines and all(re.fullmatch(r"<[0-7]>\S.*", line) for line in lines), lines
    assert any(line.startswith("<6>listening on 127.0.0.1:") for line in lines), lines

    plain = subprocess.run(
        [*cmd[:4], "/nonexistent/disk.img"], capture_output=True, text=True, timeout=20, env=os.environ
    )
    assert plain.returncode == 1
    assert re.search(
        r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} nbdserver\[ERROR\] cannot open export", plain.stderr, re.MULTILINE
    ), plain.stderr


# Stop under load --------------------------------------------------------------------------------


@pytest.mark.parametrize("processes", ["1", "2"], ids=["one-process", "two-workers"])
def test_sigterm_with_writes_in_flight_keeps_every_acknowledged_write(start_server, tmp_path, processes):
    """Hundreds of WRITEs pipelined, SIGTERM once a first batch of them is answered: exit 0, every write the
    server had taken is acknowledged, and each write acknowledged is in the file."""
    image = make_image(tmp_path / "disk.img", 64 * MiB)
    server = start_server(image, "--processes", processes)
    client = RawClient(server.host, server.port, timeout=30).handshake().go()
    size, first = 64 * 1024, 128
    blocks = [os.urandom(size) for _ in range(512)]  # 32 MiB; the write of block i has cookie i + 1
    heads = [client.request_bytes(Cmd.WRITE, i * size, size) for i in range(len(blocks))]

    def send() -> None:
        try:
            for head, data in zip(heads, blocks, strict=True):
                client.send(head + data)
        except OSError:
            pass  # the server stopped reading, answered what it took, and closed

    replies: list[Reply] = []
    ended: list[BaseException] = []

    def receive() -> None:  # replies are taken as they come: the server never stops reading for want of that
        try:
            while True:
                replies.append(client.read_reply())
        except BaseException as exc:
            ended.append(exc)

    sender, receiver = threading.Thread(target=send, daemon=True), threading.Thread(target=receive, daemon=True)
    sender.start()
    receiver.start()
    # The signal comes once the first batch is answered (so the server has taken those writes, however slowly
    # either side runs), the rest mostly still on the way: writes are in flight when it arrives.
    assert wait_for(lambda: len(replies) >= first or ended, timeout=60, interval=0.001), f"{len(replies)} replies"
    assert not ended, f"closed after {len(replies)} replies: {ended}"
    # What the server has taken by now (it counts each WRITE received whole as it queues it), answered or not:
    # it must answer every one of them.
    taken = int(value(scrape(server.metrics_url), "nbdserver_requests_total", export="", op="write"))
    server.proc.send_signal(signal.SIGTERM)
    receiver.join(60)
    sender.join(60)
    assert not receiver.is_alive() and not sender.is_alive(), "the server did not close the connection"
    assert server.proc.wait(30) == 0, server.log_text()
    assert len(ended) == 1 and isinstance(ended[0], Closed), ended
    assert all(reply.error == Err.OK for reply in replies), [reply for reply in replies if reply.error]
    acknowledged = [reply.cookie - 1 for reply in replies]
    # Every request the server took is answered, and it takes them in order: a prefix, which holds at least
    # the writes it had counted before the signal.
    assert sorted(acknowledged) == list(range(len(acknowledged))), "the acknowledged writes are not a prefix"
    assert len(acknowledged) >= taken, f"{len(acknowledged)} writes acknowledged of {taken} taken before SIGTERM"
    with open(image, "rb") as f:
        for i in acknowledged:
            f.seek(i * size)
            assert f.read(size) == blocks[i], f"acknowledged write {i} is not in the file"
