"""The command line: creating images, refusing bad input, listeners, signals, exports."""

from __future__ import annotations

import os
import platform
import signal
import socket
import stat
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

import nbdserver
from tests.conftest import EXPECTED_BUILD, IMAGE_SIZE, make_image, needs_ipv6_loopback, wait_for

MiB = 1024 * 1024
QUICK = 10.0  # seconds to exit after an error or a signal, on a busy machine too


def nbdserver_run(*args: str | os.PathLike[str], timeout: float = 15) -> subprocess.CompletedProcess:
    """``nbdserver serve ARGS`` expected to exit on its own."""
    cmd = [sys.executable, "-m", "nbdserver", "serve", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def tool(*cmd: str | os.PathLike[str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout)


def nbd_size(uri: str) -> int:
    result = tool("nbdinfo", "--size", uri)
    assert result.returncode == 0, result.stderr
    return int(result.stdout)


def stop_quickly(server, sig: int = signal.SIGTERM) -> int:
    """Signal the server and return its exit code; -9 if it needed a SIGKILL after ``QUICK`` seconds."""
    return server.stop(sig, timeout=QUICK)


def read_at(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


# Creating images ------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["--size", "export-size"])
@pytest.mark.clients
def test_size_creates_sparse_image(start_server, tmp_path, how):
    path = tmp_path / "new.img"
    args = ["--size", "16M", path] if how == "--size" else ["--export", f"name=,path={path},size=16M"]
    server = start_server(*args)
    st = path.stat()
    assert st.st_size == 16 * MiB
    assert st.st_blocks * 512 < MiB
    assert nbd_size(server.uri()) == 16 * MiB


@pytest.mark.clients
def test_size_keeps_existing_file(start_server, tmp_path):
    path = make_image(tmp_path / "old.img", 8 * MiB)
    path.write_bytes(b"keep" * 1024 + bytes(8 * MiB - 4096))
    server = start_server("--size", "16M", path)
    assert path.stat().st_size == 8 * MiB
    assert nbd_size(server.uri()) == 8 * MiB
    assert read_at(path, 0, 4096) == b"keep" * 1024


# Refusing bad input ---------------------------------------------------------------------------


def test_missing_backing_file(tmp_path):
    missing = tmp_path / "nope.img"
    result = nbdserver_run(missing, "--listen", "127.0.0.1:0")
    assert result.returncode == 1
    assert str(missing) in result.stderr and "No such file" in result.stderr
    assert not missing.exists()


def test_read_only_export_is_not_created(tmp_path):
    missing = tmp_path / "ro.img"
    result = nbdserver_run("--read-only", "--size", "1M", missing, "--listen", "127.0.0.1:0")
    assert result.returncode == 1
    assert str(missing) in result.stderr and "read-only" in result.stderr
    assert not missing.exists()


@pytest.mark.parametrize("kind", ["directory", "character-device"])
def test_backing_is_not_a_file(tmp_path, kind):
    path = tmp_path if kind == "directory" else Path("/dev/null")
    result = nbdserver_run(path, "--listen", "127.0.0.1:0")
    assert result.returncode == 1
    assert str(path) in result.stderr
    assert ("directory" if kind == "directory" else "not a regular file") in result.stderr.lower()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--size", "12Q", "{img}"], "bad size '12Q'"),
        (["--size", "lots", "{img}"], "bad size 'lots'"),
        (["--listen", "localhost", "{img}"], "bad listen address 'localhost'"),
        (["--listen", "127.0.0.1:99999", "{img}"], "bad port 99999"),
        (["--listen", "[::1]", "{img}"], "bad listen address"),
        (["--listen", "unix:", "{img}"], "unix: listener needs a path"),
        (["--export", "name=a"], "has no path="),
        (["--export", "name=a,path={img},bogus"], "bad export option 'bogus'"),
        (["--export", "name=a,path={img},size=big"], "bad size 'big'"),
        (["--default-export", "zz", "{img}"], "default export 'zz' is not defined"),
        (["--workers", "0", "{img}"], "workers must be at least 1"),
        (["--busy-poll", "-1", "{img}"], "busy poll must be from 0 (off) to 10000 microseconds"),
        (["--worker-timeout", "-1", "{img}"], "the worker timeout must not be negative (0: never)"),
        (["--name", "a"], "PATH, which is missing"),
        ([], "no exports"),
    ],
)
def test_usage_errors(image, args, message):
    result = nbdserver_run(*(a.format(img=image) for a in args))
    assert result.returncode == 2, result.stderr
    assert "usage:" in result.stderr and message in result.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["--name", "a", "{img}", "--export", "name=a,path={other}"],
        ["--export", "name=b,path={img}", "--export", "name=b,path={other},read-only"],
        ["{img}", "--export", "name=,path={other}"],
    ],
    ids=["path-and-export", "two-exports", "empty-name"],
)
def test_duplicate_export_names_refused(image, tmp_path, args):
    other = make_image(tmp_path / "other.img", MiB)
    result = nbdserver_run(*(a.format(img=image, other=other) for a in args), "--listen", "127.0.0.1:0")
    assert result.returncode == 2
    assert "defined twice" in result.stderr


# Listeners --------------------------------------------------------------------------------


@pytest.mark.parametrize("listening", [True, False], ids=["listening", "bound"])
@pytest.mark.parametrize("first_ok", [False, True], ids=["only", "second"])
def test_port_in_use(image, listening, first_ok):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        if listening:
            busy.listen()
        port = busy.getsockname()[1]
        extra = ["--listen", "127.0.0.1:0"] if first_ok else []
        start = time.monotonic()
        result = nbdserver_run(image, *extra, "--listen", f"127.0.0.1:{port}", timeout=QUICK + 5)
    assert time.monotonic() - start < QUICK
    assert result.returncode == 1
    assert "cannot listen" in result.stderr and str(port) in result.stderr
    assert "ready:" not in result.stderr


@needs_ipv6_loopback
@pytest.mark.clients
def test_ipv6_listener(start_server, image):
    server = start_server(image, "--listen", "[::1]:0")
    assert server.host == "[::1]"
    assert server.uri().startswith("nbd://[::1]:")
    assert nbd_size(server.uri()) == IMAGE_SIZE
    assert stop_quickly(server) == 0


@pytest.mark.parametrize("stale", [False, True], ids=["fresh", "stale-socket"])
@pytest.mark.clients
def test_unix_listener(start_server, image, tmp_path, stale):
    path = tmp_path / "nbd.sock"
    if stale:  # left behind by a server that died
        with socket.socket(socket.AF_UNIX) as old:
            old.bind(str(path))
    server = start_server(image, "--listen", f"unix:{path}")
    assert stat.S_ISSOCK(path.stat().st_mode)
    assert server.uri().startswith("nbd+unix:///?socket=")
    assert nbd_size(server.uri()) == IMAGE_SIZE
    result = tool("qemu-io", "-f", "raw", "-c", "write -P 0x42 1M 4k", server.uri())
    assert result.returncode == 0, result.stderr
    assert stop_quickly(server) == 0
    assert not path.exists()
    assert read_at(image, MiB, 4096) == b"\x42" * 4096


def test_unix_listener_keeps_regular_file(image, tmp_path):
    path = tmp_path / "precious"
    path.write_text("not a socket")
    result = nbdserver_run(image, "--listen", f"unix:{path}")
    assert result.returncode == 1 and "cannot listen" in result.stderr
    assert path.read_text() == "not a socket"


# Signals ----------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("disconnect", [False, True], ids=["client-connected", "client-gone"])
def test_signal_keeps_unflushed_writes(server, image, disconnect, sig):
    nbd = pytest.importorskip("nbd")
    h = nbd.NBD()
    h.connect_uri(server.uri())
    chunks = {offset: os.urandom(64 * 1024) for offset in (0, 3 * MiB + 17, 40 * MiB, IMAGE_SIZE - 64 * 1024)}
    for offset, data in chunks.items():
        h.pwrite(data, offset)  # acknowledged, never flushed
    if disconnect:
        h.shutdown()
    code = stop_quickly(server, sig)
    assert code == 0, server.log_text()
    for offset, data in chunks.items():
        assert read_at(image, offset, len(data)) == data
    if not disconnect:
        with pytest.raises(nbd.Error):
            h.pread(4096, 0)


@pytest.mark.clients
def test_sigterm_during_nbdcopy(start_server, tmp_path):
    image = make_image(tmp_path / "disk.img", 32 * MiB)
    server = start_server(image)
    data = os.urandom(32 * MiB)
    copy = subprocess.Popen(
        ["nbdcopy", "-", server.uri()], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        assert copy.stdin is not None
        copy.stdin.write(data[: 8 * MiB])
        copy.stdin.flush()
        assert wait_for(lambda: read_at(image, 0, 8 * MiB) == data[: 8 * MiB], timeout=20)
        code = stop_quickly(server)  # nbdcopy is still copying: it waits for more input
        try:
            copy.stdin.write(data[8 * MiB :])
            copy.stdin.close()
        except BrokenPipeError:
            pass
        assert copy.wait(30) != 0  # the copy could not finish
    finally:
        copy.kill()
        copy.wait()
    assert code == 0, server.log_text()
    written = Path(image).read_bytes()
    assert written[: 8 * MiB] == data[: 8 * MiB]
    assert written[8 * MiB :] == bytes(24 * MiB)  # nothing sent after the signal was taken


@pytest.mark.clients
def test_sigterm_during_fio(server, image, tmp_path):
    before = os.urandom(4 * MiB)
    with open(tmp_path / "before.bin", "wb") as f:
        f.write(before)
    assert tool("nbdcopy", tmp_path / "before.bin", server.uri()).returncode == 0
    fio = subprocess.Popen(
        [
            "fio",
            "--name=busy",
            "--thread",  # jobs as threads of one process, so killing it stops them all
            "--ioengine=nbd",
            f"--uri={server.uri()}",
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=4",
            "--rate_iops=500",
            f"--offset={16 * MiB}",
            "--size=32M",
            "--time_based",
            "--runtime=60",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=tmp_path,
        start_new_session=True,  # fio forks its jobs: kill the whole group
    )
    try:
        assert wait_for(lambda: read_at(image, 16 * MiB, 32 * MiB).count(0) < 32 * MiB - 64 * 1024, timeout=20)
        code = stop_quickly(server)
    finally:  # fio may retry or wait forever on a closed connection: not the server's business
        os.killpg(fio.pid, signal.SIGKILL)
        fio.wait()
    assert code == 0, server.log_text()
    assert read_at(image, 0, 4 * MiB) == before


def raw_client(port: int, stage: str) -> socket.socket:
    """A client stopped at ``stage``: in the handshake, idle after it, or halfway through a 1 MiB WRITE."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    assert len(sock.recv(18, socket.MSG_WAITALL)) == 18  # NBDMAGIC, IHAVEOPT, handshake flags
    if stage == "handshake":
        return sock
    sock.sendall(struct.pack(">I", 1))  # NBD_FLAG_C_FIXED_NEWSTYLE
    sock.sendall(struct.pack(">QII", 0x49484156454F5054, 1, 0))  # NBD_OPT_EXPORT_NAME ""
    assert len(sock.recv(134, socket.MSG_WAITALL)) == 134  # size, flags, 124 zero bytes
    if stage == "half-write":
        sock.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 1, 1, 0, MiB) + b"x" * 1000)
    return sock


@pytest.mark.parametrize(
    "stage",
    [
        "handshake",
        "idle",
        "half-write",
    ],
)
def test_sigterm_with_stalled_client(server, image, stage):
    with raw_client(server.port, stage):
        assert wait_for(lambda: ": connected" in server.log_text())
        if stage != "handshake":
            assert wait_for(lambda: "simple replies" in server.log_text())
        time.sleep(0.2)
        code = stop_quickly(server)
    assert code == 0, server.log_text()
    assert read_at(image, 0, 1000) == bytes(1000)  # an incomplete WRITE is not carried out


# Exports --------------------------------------------------------------------------------------


@pytest.mark.clients
def test_read_only_refuses_writes(start_server, image):
    nbd = pytest.importorskip("nbd")
    server = start_server(image, "--read-only")
    result = tool("qemu-io", "-f", "raw", "-c", "write -P 0x66 0 4k", server.uri())
    assert result.returncode != 0
    h = nbd.NBD()
    h.set_strict_mode(0)  # send the writes anyway: the server itself must refuse them
    h.connect_uri(server.uri())
    with pytest.raises(nbd.Error, match="EPERM"):
        h.pwrite(b"w" * 4096, 0)
    for unadvertised in (h.zero, h.trim):  # EINVAL (not advertised) or EPERM
        with pytest.raises(nbd.Error, match=r"EINVAL|EPERM"):
            unadvertised(4096, 0)
    assert h.pread(4, 0) == bytes(4)  # the connection is still usable
    assert read_at(image, 0, 4096) == bytes(4096)


@pytest.mark.parametrize(("default", "size"), [(None, 4 * MiB), ("alpha", 4 * MiB), ("beta", 2 * MiB)])
@pytest.mark.clients
def test_default_export(start_server, tmp_path, default, size):
    alpha, beta = make_image(tmp_path / "alpha.img", 4 * MiB), make_image(tmp_path / "beta.img", 2 * MiB)
    choice = ["--default-export", default] if default else []
    server = start_server("--export", f"name=alpha,path={alpha}", "--export", f"name=beta,path={beta}", *choice)
    assert nbd_size(server.uri("")) == size
    assert (nbd_size(server.uri("alpha")), nbd_size(server.uri("beta"))) == (4 * MiB, 2 * MiB)


# Version and help -------------------------------------------------------------------------


def test_version():
    """Which build runs (tests/compiled runs the suite again on the compiled one) and on what."""
    result = tool(sys.executable, "-m", "nbdserver", "--version")
    assert result.returncode == 0
    interpreter = f"{platform.python_implementation()} {platform.python_version()}"
    where = os.path.realpath(sys.executable)
    package = os.path.dirname(os.path.realpath(nbdserver.__file__))
    expected = f"nbdserver {nbdserver.__version__} ({EXPECTED_BUILD}) on {interpreter} ({where}) from {package}"
    assert result.stdout.strip() == expected


def test_the_log_says_which_build_and_interpreter_serve(server):
    assert server.log[0].endswith(
        f"({EXPECTED_BUILD}) on {platform.python_implementation()} {platform.python_version()} "
        f"({os.path.realpath(sys.executable)}) from {os.path.dirname(os.path.realpath(nbdserver.__file__))}"
    ), server.log[0]


@pytest.mark.parametrize("script", [False, True], ids=["module", "script"])
def test_serve_help(script):
    command = [Path(sys.executable).parent / "nbdserver"] if script else [sys.executable, "-m", "nbdserver"]
    if not Path(command[0]).exists():
        pytest.skip("no nbdserver script next to the interpreter")
    result = tool(*command, "serve", "--help")
    assert result.returncode == 0, result.stderr
    for option in ("--listen", "--export", "--read-only", "--size", "--default-export", "examples:"):
        assert option in result.stdout
