"""A restart through the service manager's file descriptor store (``systemctl restart`` under systemd).

The manager's side is played here on a real datagram socket, as systemd 252 plays it:
``FDSTORE=1`` with ``FDNAME=`` keeps descriptors, ``FDSTOREREMOVE=1`` drops them, the next
start gets them in ``LISTEN_FDS``/``LISTEN_FDNAMES``, and a stop closes what is kept.
(The systemd guest proves the same under systemd itself.)
"""

from __future__ import annotations

import array
import contextlib
import os
import random
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import nbd
import pytest

from tests.conftest import MiB, ServerProcess, make_image, scrape, value, wait_for
from tests.integration.rawclient import Cmd, RawClient
from tests.integration.test_handover import Client, finish

pytestmark = pytest.mark.bindings  # libnbd's Python bindings: run again by tests/in_current

BLOCK = 4096

# Puts the given descriptors at 3, 4, ... with LISTEN_PID/LISTEN_FDS/LISTEN_FDNAMES, then runs the rest.
LAUNCH = """
import fcntl, os, sys
fds = [int(fd) for fd in sys.argv[1].split(",") if fd]
high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 1000) for fd in fds]
for fd in fds:
    os.close(fd)  # no copy but the one at 3 + i may reach the server
for i, fd in enumerate(high):
    os.dup2(fd, 3 + i)
    os.close(fd)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS=str(len(fds)), LISTEN_FDNAMES=sys.argv[2])
os.execv(sys.argv[3], sys.argv[3:])
"""


def same_file(a: int, b: int) -> bool:
    first, second = os.fstat(a), os.fstat(b)
    return (first.st_dev, first.st_ino) == (second.st_dev, second.st_ino)


class FdStore:
    """The manager's end of NOTIFY_SOCKET, keeping descriptors by name."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.kept: dict[str, int] = {}
        self.messages: list[str] = []
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                data, ancdata, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(253 * 4))
            except OSError:
                return
            if not data:  # shut down by close()
                return
            fds = array.array("i")
            for level, kind, payload in ancdata:
                if (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS):
                    fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            with self._lock:
                self.messages.append(data.decode())
                if fields.get("FDSTORE") == "1":
                    for fd in fds:
                        if any(same_file(fd, other) for other in self.kept.values()):
                            os.close(fd)  # systemd keeps a file once, under its first name
                        else:
                            self.kept[f"{fields['FDNAME']}"] = fd
                    continue
                for fd in fds:
                    os.close(fd)
                if fields.get("FDSTOREREMOVE") == "1" and fields["FDNAME"] in self.kept:  # else: ignored
                    os.close(self.kept.pop(fields["FDNAME"]))

    def start(self, args: list[str], env: dict[str, str]) -> ServerProcess:
        """The next start, with what is kept (the manager keeps its copies until told otherwise)."""
        with self._lock:
            names, fds = list(self.kept), list(self.kept.values())
        wrapper = [sys.executable, "-c", LAUNCH, ",".join(map(str, fds)), ":".join(names)]
        return ServerProcess(args, env=env, wrapper=wrapper, pass_fds=tuple(fds))

    def stop(self) -> None:
        """``systemctl stop``: what is kept is closed."""
        with self._lock:
            for fd in self.kept.values():
                os.close(fd)
            self.kept.clear()

    def close(self) -> None:
        """Let the reader end before the socket is closed: a reader that called recvmsg on the number
        just after the close would block on whatever socket is given that number next (a client's
        of a later test) and take its bytes."""
        self.sock.shutdown(socket.SHUT_RDWR)  # wakes the reader with an empty datagram
        self._reader.join(10)
        self.stop()
        self.sock.close()


def restart_names(store: FdStore) -> list[str]:
    """What a restart keeps (fdstore.py), beside what is kept for a crash (keeper.py)."""
    return [name for name in store.kept if not name.startswith(("nbd-a", "nbd-c"))]


def crash_names(store: FdStore, server: ServerProcess) -> list[str]:
    """What ``server`` keeps for its crash: its connections and its workers' arenas."""
    pid = server.proc.pid
    return [name for name in store.kept if name.startswith((f"nbd-a{pid}.", f"nbd-c{pid}."))]


@pytest.fixture
def store(tmp_path):
    manager = FdStore(tmp_path / "notify.sock")
    yield manager
    manager.close()


def test_a_restart_through_the_fd_store_keeps_every_connection(store, tmp_path):
    disk = make_image(tmp_path / "disk.img", 64 * MiB)
    env = {"NOTIFY_SOCKET": store.path, "FDSTORE": "64"}
    args = [str(disk), "--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0"]
    first = ServerProcess(args, env=env).wait_ready()
    servers = [first]
    try:
        h = nbd.NBD()
        h.connect_uri(first.uri())
        data = random.Random(8).randbytes(MiB)
        h.pwrite(data, 0)
        raw = RawClient(first.host, first.port)
        raw.handshake().go()
        header = raw.request_bytes(Cmd.WRITE, 4 * MiB, BLOCK)
        raw.send(header[:20])  # half a header waits across the restart

        assert first.stop() == 0, first.log_text()  # SIGTERM, as systemctl restart sends it
        assert first.logged("2 connection(s) and 2 listener(s) kept in the fd store"), first.log_text()
        assert sorted(restart_names(store)) == ["nbd-0", "nbd-1", "nbd-2", "nbd-3", "nbd-state"]

        second = store.start(args, env)
        servers.append(second)
        second.wait_ready()
        assert second.logged("took over 2 connection(s)"), second.log_text()
        # It removed them (its close reaches the clients); what it keeps for a crash is its own.
        assert wait_for(lambda: not restart_names(store) and not crash_names(store, first)), store.kept
        assert second.port == first.port and second.metrics_url == first.metrics_url  # the same sockets

        raw.send(header[20:] + b"w" * BLOCK)
        assert raw.read_reply().error == 0
        assert h.pread(MiB, 0) == data
        assert value(scrape(second.metrics_url), "nbdserver_connections", export="") == 2
        fresh = nbd.NBD()
        fresh.connect_uri(second.uri())  # the listening socket came through the store too
        assert fresh.pread(BLOCK, 4 * MiB) == b"w" * BLOCK
        fresh.shutdown()

        # systemctl stop: the server keeps them in the store again, and the manager closes them.
        raw.request(Cmd.WRITE, 5 * MiB, BLOCK, payload=b"x" * BLOCK)
        assert raw.read_reply().error == 0  # answered before the stop
        assert second.stop() == 0
        store.stop()
        assert raw.wait_closed()
        with pytest.raises(nbd.Error):
            h.pread(BLOCK, 0)
    finally:
        for server in servers:
            server.stop()
    with open(disk, "rb") as f:
        f.seek(4 * MiB)
        assert f.read(BLOCK) == b"w" * BLOCK
        f.seek(5 * MiB)
        assert f.read(BLOCK) == b"x" * BLOCK


def test_without_a_store_a_stop_closes_connections_as_before(store, tmp_path):
    disk = make_image(tmp_path / "disk.img", 16 * MiB)
    server = ServerProcess([str(disk), "--listen", "127.0.0.1:0", "--no-metrics"], env={"NOTIFY_SOCKET": store.path})
    try:
        server.wait_ready()
        with RawClient(server.host, server.port) as raw:
            raw.handshake().go()
            assert server.stop() == 0
            assert raw.wait_closed()
        assert not store.kept and not any("FDSTORE" in m for m in store.messages)
    finally:
        server.stop()


def test_a_state_it_cannot_read_closes_the_kept_connections_and_starts_afresh(store, tmp_path):
    disk = make_image(tmp_path / "disk.img", 16 * MiB)
    env = {"NOTIFY_SOCKET": store.path, "FDSTORE": "64"}
    args = [str(disk), "--listen", "127.0.0.1:0", "--no-metrics"]
    first = ServerProcess(args, env=env).wait_ready()
    with RawClient(first.host, first.port) as raw:
        raw.handshake().go()
        assert first.stop() == 0
        state = store.kept["nbd-state"]
        os.ftruncate(state, 10)  # torn: the successor cannot make sense of it
        second = store.start(args, env)
        try:
            second.wait_ready()
            assert second.logged("cannot take what the fd store kept"), second.log_text()
            assert wait_for(lambda: not store.kept), store.kept
            assert raw.wait_closed()  # closed, not left hanging
            fresh = nbd.NBD()
            fresh.connect_uri(f"nbd://127.0.0.1:{second.port}/")  # and it serves
            assert fresh.get_size() == 16 * MiB
            fresh.shutdown()
        finally:
            second.stop(signal.SIGTERM)


# A crash of the whole service (keeper.py) ---------------------------------------------------------

CRASHES = 4


def dead(pid: int) -> bool:
    """Gone, or a zombie (whose descriptors are closed): as the manager waits for before a restart."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def crash(server: ServerProcess, everything: bool) -> None:
    """SIGKILL the primary, and its workers too (``systemctl kill -s KILL``) or not (the watchdog's
    abort of the main process); wait until none is left, as the manager does before a restart."""
    workers = [int(pid) for pid in Path(f"/proc/{server.proc.pid}/task/{server.proc.pid}/children").read_text().split()]
    assert workers, "a server without worker processes"
    server.proc.kill()
    server.proc.wait()
    if everything:
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
    assert wait_for(lambda: all(dead(pid) for pid in workers), timeout=30), workers  # alone, if not killed


def kept_connections(store: FdStore, server: ServerProcess) -> int:
    return sum(name.startswith("nbd-c") for name in crash_names(store, server))


def stop_with_workers(server: ServerProcess) -> None:
    """Stop a server, and kill its workers should it have died without them (a failed test)."""
    pid = server.proc.pid
    try:
        workers = [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        workers = []
    server.stop()
    for worker in workers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker, signal.SIGKILL)


def test_a_crash_of_the_whole_service_costs_the_clients_a_pause(store, tmp_path):
    """Three connections (two on one export, one O_DIRECT) keep 64 requests in flight each, checked
    against a model, while the primary (and its workers, or not) is SIGKILLed at random instants and
    started again from what the store kept: no request fails, none is lost."""
    disk = make_image(tmp_path / "disk.img", 64 * MiB)
    direct = make_image(tmp_path / "direct.img", 64 * MiB)
    env = {"NOTIFY_SOCKET": store.path, "FDSTORE": "64"}
    args = ["--export", f"name=disk,path={disk}", "--export", f"name=direct,path={direct},cache=direct"]
    args += ["--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0", "--processes", "2"]
    server = ServerProcess(args, env=env).wait_ready()
    servers = [server]
    clients = [
        Client(server.uri("disk"), range(0, 2048), True, seed=1),
        Client(server.uri("disk"), range(2048, 4096), True, seed=2),
        Client(server.uri("direct"), range(0, 4096), True, seed=3),
    ]
    chance = random.Random(28)
    try:
        for c in clients:
            c.start()
        for round_ in range(CRASHES):
            assert wait_for(lambda s=server: kept_connections(store, s) == 3)
            before = sum(c.done for c in clients)
            assert wait_for(lambda before=before: sum(c.done for c in clients) > before + 1000, timeout=60)
            time.sleep(chance.uniform(0, 0.030))  # a random instant of the traffic: what is tested, not a wait
            crash(server, everything=round_ % 2 == 0)
            server = store.start(args, env)
            servers.append(server)
            server.wait_ready()
            assert server.logged("taking over 3 connection(s) it kept in the fd store"), server.log_text()
            assert server.logged("after this process started (0 closed)", 2, timeout=30), server.log_text()
            assert not any(c.errors for c in clients), [c.errors for c in clients]
        # Then systemctl restart, as after any start: the connections go through the store's other way.
        assert wait_for(lambda s=server: kept_connections(store, s) == 3)
        assert server.stop() == 0, server.log_text()
        server = store.start(args, env)
        servers.append(server)
        server.wait_ready()
        assert server.logged("took over 3 connection(s)"), server.log_text()
        # And a crash after it: what the restart resumed is kept again.
        assert wait_for(lambda s=server: kept_connections(store, s) == 3)
        before = sum(c.done for c in clients)
        assert wait_for(lambda: sum(c.done for c in clients) > before + 1000, timeout=60)
        crash(server, everything=False)
        server = store.start(args, env)
        servers.append(server)
        server.wait_ready()
        assert server.logged("after this process started (0 closed)", 2, timeout=30), server.log_text()
        before = sum(c.done for c in clients)
        assert wait_for(lambda: sum(c.done for c in clients) > before + 1000, timeout=60)
        finish(clients)
        for c, name in ((clients[0], "disk"), (clients[1], "disk"), (clients[2], "direct")):
            fresh = nbd.NBD()
            fresh.connect_uri(f"nbd://127.0.0.1:{server.port}/{name}")
            for block, data in c.model.items():
                assert fresh.pread(BLOCK, block * BLOCK) == data
            fresh.shutdown()
        samples = scrape(server.metrics_url)
        assert value(samples, "nbdserver_recovered_connections_total", outcome="resumed") == 3
        for c in clients:
            c.h.shutdown()
        # The connections ended: out of the store (the arenas stay while the workers do).
        assert wait_for(lambda: kept_connections(store, server) == 0), store.kept
        assert server.stop() == 0
        assert wait_for(lambda: not crash_names(store, server)), store.kept  # a stop lets the arenas go
    finally:
        for c in clients:
            c.stop.set()
        print(server.log_text())
        for s in servers:
            stop_with_workers(s)
