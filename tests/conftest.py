"""Shared fixtures: real server processes on loopback or Unix sockets, real image files."""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

# fs/chroot: the Debian 13 chroot of the current_tools fixture.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "fs" / "chroot"))
import current
import debian_root

ROOT = Path(__file__).resolve().parent.parent  # the checkout

IMAGE_SIZE = 64 * 1024 * 1024
# The build under test: "pure", or "mypyc" when tests/compiled runs the suite on the compiled one.
EXPECTED_BUILD = os.environ.get("NBDSERVER_EXPECT_BUILD", "pure")
# Worker processes for every server the tests start, unless a test says (pytest --processes N):
# "" leaves the server's default.
PROCESSES = ""
# The client programs the tests run (nbdinfo, nbdcopy, nbdsh, qemu-img, qemu-io, fio): this
# machine's, or with --clients current the Debian 13 chroot's (fs/chroot/current.py).
CLIENT_PROGRAMS = ("nbdinfo", "nbdcopy", "nbdsh", "qemu-img", "qemu-io", "fio")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--processes",
        default="",
        help="start every server with --processes N unless a test sets it (default: the server's default)",
    )
    parser.addoption(
        "--clients",
        choices=("installed", "current"),
        default="installed",
        help="the client programs the tests run: this machine's (default), or Debian 13's from the chroot"
        " of fs/chroot/current.py (libnbd 1.22, qemu 10, fio 3.39); then only the tests marked 'clients' run",
    )


def pytest_configure(config: pytest.Config) -> None:
    global PROCESSES
    PROCESSES = config.getoption("--processes")
    config.addinivalue_line("markers", "clients: runs client programs, so runs again with --clients current")
    config.addinivalue_line(
        "markers", "bindings: uses libnbd's Python bindings, so runs again by tests/in_current with libnbd 1.22"
    )
    config.addinivalue_line(
        "markers",
        "own_build: never runs the build under test (installs its own, or reads the sources), so runs in the"
        " pure pass only, not again under tests/compiled",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--clients") == "current":
        chosen = [item for item in items if item.get_closest_marker("clients")]
    elif EXPECTED_BUILD != "pure":
        chosen = [item for item in items if not item.get_closest_marker("own_build")]
    else:
        return
    config.hook.pytest_deselected(items=[item for item in items if item not in chosen])
    items[:] = chosen


@pytest.fixture(scope="session", autouse=True)
def client_programs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """With --clients current: each client program on PATH is a script that runs the chroot's, in
    the same working directory (the checkout and /tmp are shared with the chroot)."""
    if request.config.getoption("--clients") != "current":
        yield
        return
    chroot = current.build(log=lambda line: print(line, flush=True))  # asked for: no skipping
    scripts = tmp_path_factory.mktemp("current-clients")
    for program in CLIENT_PROGRAMS:
        enter = chroot.command(["sh", "-c", 'cd "$1" && shift && exec "$@"', "sh"], [ROOT])
        script = scripts / program
        script.write_text(f'#!/bin/sh\nexec {shlex.join(enter)} "$PWD" {program} "$@"\n')
        script.chmod(0o755)
    path = os.environ["PATH"]
    os.environ["PATH"] = f"{scripts}:{path}"
    try:
        yield
    finally:
        os.environ["PATH"] = path


START_TIMEOUT = 20.0
MiB = 1024 * 1024

# Every engine in every cache mode: the suites that take ``io_mode`` run in each.
IO_MODES = {
    f"{engine}-{cache}": ["--engine", engine, "--cache", cache]
    for engine in ("threads", "uring")
    for cache in ("buffered", "direct")
}


class ServerProcess:
    """``nbdserver serve`` in a child process; its log is collected from stderr."""

    def __init__(
        self,
        args: list[str],
        env: dict[str, str] | None = None,
        wrapper: list[str] | None = None,
        program: list[str] | None = None,
        cwd: Path | None = None,
        pass_fds: tuple[int, ...] = (),
    ) -> None:
        """``program`` is the server's command (default: this interpreter's ``-m nbdserver``)."""
        if PROCESSES and "--processes" not in args:
            args = [*args, "--processes", PROCESSES]
        self.args = args
        self.log: list[str] = []
        self.addresses: list[str] = []
        self.metrics_url = ""
        self._ready = threading.Event()
        self.said_ready = False
        self.proc = subprocess.Popen(
            [*(wrapper or []), *(program or [sys.executable, "-m", "nbdserver"]), "serve", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
            cwd=cwd,
            pass_fds=pass_fds,
        )
        self._reader = threading.Thread(target=self._read_log, daemon=True)
        self._reader.start()

    def _read_log(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line.rstrip("\n"))
            match = re.search(r"listening on (\S+)", line)
            if match:
                self.addresses.append(match.group(1))
            match = re.search(r"metrics on (\S+)", line)
            if match and not self.metrics_url:
                self.metrics_url = match.group(1)
            if "ready:" in line:
                self.said_ready = True
                self._ready.set()
        self._ready.set()  # its stderr closed (it exited, most likely): wake the waiter

    def wait_ready(self, timeout: float = START_TIMEOUT) -> ServerProcess:
        if not self._ready.wait(timeout) or not self.said_ready or self.proc.poll() is not None:
            self.stop()
            raise RuntimeError("server did not start:\n" + self.log_text())
        return self

    def log_text(self) -> str:
        return "\n".join(self.log)

    def logged(self, text: str, count: int = 1, timeout: float = 10.0) -> bool:
        """Wait until ``count`` lines of the log hold ``text`` (the log is read by another thread)."""
        return wait_for(lambda: sum(text in line for line in list(self.log)) >= count, timeout)

    def worker_pids(self) -> list[int]:
        """The worker processes (``--processes``) serving now, as the log names them."""
        assert self.logged("worker processes: pids"), self.log_text()
        line = [line for line in self.log if "worker processes: pids" in line][-1]
        pids = [int(pid) for pid in re.findall(r"\d+", line.split("pids", 1)[1])]
        for index, pid in re.findall(r"worker (\d+) started again: pid (\d+)", self.log_text()):
            pids[int(index)] = int(pid)
        return pids

    def serving_pids(self) -> list[int]:
        """The server's process and its workers, if it has any: every process that may hold a connection."""
        started = any("worker processes: pids" in line for line in list(self.log))
        return [self.proc.pid, *(self.worker_pids() if started else [])]

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """SIGSTOP the server (and its workers) for the block: what clients send meanwhile waits in
        the sockets, and is read in bursts once it runs again, as when the server is busy."""
        pids = self.serving_pids()
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        try:
            yield
        finally:
            for pid in pids:
                os.kill(pid, signal.SIGCONT)

    @property
    def port(self) -> int:
        tcp = [a for a in self.addresses if not a.startswith("unix:")]
        return int(tcp[0].rsplit(":", 1)[1])

    @property
    def host(self) -> str:
        tcp = [a for a in self.addresses if not a.startswith("unix:")]
        return tcp[0].rsplit(":", 1)[0]

    def uri(self, name: str = "") -> str:
        unix = [a for a in self.addresses if a.startswith("unix:")]
        if not [a for a in self.addresses if not a.startswith("unix:")] and unix:
            return f"nbd+unix:///{name}?socket={unix[0][5:]}"
        return f"nbd://{self.host}:{self.port}/{name}"

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Signal the server and wait for it; SIGKILL if it does not exit in time."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(5)
        return self.proc.returncode

    def kill(self) -> int:
        return self.stop(signal.SIGKILL)


class Upgradable:
    """A server followed across upgrades: each successor's PID is read from the log."""

    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self.pids = [server.proc.pid]

    def upgrade(self, timeout: float = 30.0) -> float:
        """SIGUSR2, then wait until the successor has taken over; returns the pause it logged."""
        done = sum("took over" in line for line in self.server.log)
        handed = sum("handed to pid" in line for line in self.server.log)
        os.kill(self.pids[-1], signal.SIGUSR2)
        assert self.server.logged("took over", count=done + 1, timeout=timeout), self.server.log_text()[-3000:]
        # The predecessor names its successor in a line of its own, which may come after "took over":
        # signalling it again before then would reach a server that has handed everything over.
        assert self.server.logged("handed to pid", count=handed + 1, timeout=timeout), self.server.log_text()[-3000:]
        self.follow()
        pause = [m for line in self.server.log if (m := re.search(r"requests waited ([\d.]+) s", line))]
        return float(pause[-1].group(1))

    def follow(self) -> None:
        """Take the newest successor's PID from the log (after an upgrade not made by upgrade())."""
        handed = [int(m.group(1)) for line in self.server.log if (m := re.search(r"handed to pid (\d+)", line))]
        if handed and handed[-1] not in self.pids:
            self.pids.append(handed[-1])

    def alive(self) -> bool:
        return running(self.pids[-1])

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Signal the server that serves now, any predecessor still finishing, and any successor an
        upgrade started, whatever became of that upgrade (a failed test must leave none behind);
        SIGKILL after 30 s."""
        found = (re.search(r"successor started, pid (\d+)", line) for line in self.server.log)
        started = [int(m.group(1)) for m in found if m]
        for pid in reversed(list(dict.fromkeys([*self.pids, *started]))):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                continue
            if not wait_for(lambda pid=pid: not running(pid), timeout=30):
                os.kill(pid, signal.SIGKILL)
        self.server.stop()


def running(pid: int) -> bool:
    """Is ``pid`` running?  A child of ours that exited is a zombie until reaped: that counts as gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def free_port() -> int:
    """A TCP port on 127.0.0.1 nothing listens on right now (for servers that must be told one)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def have_ipv6_loopback() -> bool:
    """Can ::1 be bound here (some containers have IPv6 off)?"""
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


needs_ipv6_loopback = pytest.mark.skipif(not have_ipv6_loopback(), reason="::1 cannot be bound here")


def clean_checkout(tree: Path) -> Path:
    """The files git tracks, copied to ``tree``: the project as a fresh clone has it."""
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in filter(None, tracked.decode().split("\0")):
        if (ROOT / name).is_file():
            (tree / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, tree / name)
    return tree


def make_image(path: Path, size: int = IMAGE_SIZE) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


@pytest.fixture
def image(tmp_path: Path) -> Path:
    """A sparse 64 MiB image file."""
    return make_image(tmp_path / "disk.img")


@pytest.fixture
def start_server() -> Iterator:
    """Factory: ``start_server(*args)`` starts a server (default listener 127.0.0.1:0) and waits until it listens."""
    servers: list[ServerProcess] = []

    def start(
        *args: str | os.PathLike[str],
        listen: bool = True,
        env: dict[str, str] | None = None,
        wrapper: list[str] | None = None,
        wait: bool = True,
    ) -> ServerProcess:
        """``wrapper`` runs the server (e.g. systemd-socket-activate); ``wait=False`` returns before it is ready."""
        argv = [str(a) for a in args]
        if listen and "-l" not in argv and "--listen" not in argv:
            argv += ["--listen", "127.0.0.1:0"]
        if "--metrics" not in argv and "--no-metrics" not in argv:
            argv += ["--metrics", "127.0.0.1:0"]  # servers of parallel tests must not share a port
        server = ServerProcess(argv, env, wrapper)
        servers.append(server)
        return server.wait_ready() if wait else server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def server(start_server, image: Path) -> ServerProcess:
    """A server exporting ``image`` as the default export on 127.0.0.1."""
    return start_server(image)


@pytest.fixture
def upgradable() -> Iterator:
    """Factory: ``upgradable(*args)`` starts a server (127.0.0.1:0, metrics too) to follow across
    upgrades; it and its successors are stopped afterwards."""
    started: list[Upgradable] = []

    def start(*args: str) -> Upgradable:
        server = ServerProcess([*args, "--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0"])
        started.append(Upgradable(server.wait_ready()))
        return started[-1]

    yield start
    for u in started:
        u.stop()


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a /metrics page, keyed by name and sorted labels."""
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    return samples[name, tuple(sorted(labels.items()))]


@pytest.fixture(params=IO_MODES)
def io_mode(request: pytest.FixtureRequest) -> list[str]:
    """Server arguments choosing one engine and one cache mode."""
    return IO_MODES[request.param]


@contextlib.contextmanager
def mounted_ext4(image: Path, mountpoint: Path, size: int) -> Iterator[Path]:
    """A fresh ext4 filesystem of ``size`` bytes in ``image``, loop-mounted on ``mountpoint`` until the end."""
    if os.geteuid() != 0 or not shutil.which("mkfs.ext4"):
        pytest.skip("mounting a filesystem image needs root and e2fsprogs")
    with open(image, "wb") as f:
        f.truncate(size)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True, timeout=60)
    mountpoint.mkdir()
    mounted = subprocess.run(["mount", "-o", "loop", str(image), str(mountpoint)], capture_output=True, timeout=60)
    if mounted.returncode != 0:
        pytest.skip(f"cannot loop-mount here: {mounted.stderr.decode().strip()}")
    try:
        yield mountpoint
    finally:
        if subprocess.run(["umount", str(mountpoint)], timeout=60, check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(mountpoint)], timeout=60, check=False)


@pytest.fixture(scope="session")
def ext4_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A directory on a loop-mounted ext4 shared by the session: O_DIRECT there has real alignment rules
    (tmpfs accepts anything), whatever filesystem the temporary directory is on."""
    base = tmp_path_factory.mktemp("ext4")
    with mounted_ext4(base / "fs.img", base / "mnt", 1024 * MiB) as mountpoint:
        yield mountpoint


@pytest.fixture(scope="session")
def current_tools() -> current.Chroot:
    """The Debian 13 chroot with the current NBD clients and servers (fs/chroot/current.py), built on first
    use; the test skips, saying why, where it cannot be had (not root, no mmdebstrap, no Debian archive)."""
    try:
        return current.build(log=lambda line: print(line, flush=True))
    except (debian_root.BuildError, OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"no Debian 13 chroot (tests/bootstrap builds it): {exc}")
