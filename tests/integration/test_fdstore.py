"""A restart through the service manager's file descriptor store (``systemctl restart`` under systemd).

The manager's side is played here on a real datagram socket, as systemd 252 plays it:
``FDSTORE=1`` with ``FDNAME=`` keeps descriptors, ``FDSTOREREMOVE=1`` drops them, the next
start gets them in ``LISTEN_FDS``/``LISTEN_FDNAMES``, and a stop closes what is kept.
(The systemd guest proves the same under systemd itself.)
"""

from __future__ import annotations

import array
import os
import random
import signal
import socket
import sys
import threading
from pathlib import Path

import nbd
import pytest

from tests.conftest import MiB, ServerProcess, make_image, scrape, value, wait_for
from tests.integration.rawclient import Cmd, RawClient

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
            fds = array.array("i")
            for level, kind, payload in ancdata:
                if (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS):
                    fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            with self._lock:
                self.messages.append(data.decode())
                if fields.get("FDSTORE") == "1":
                    for fd in fds:
                        self.kept[f"{fields['FDNAME']}"] = fd
                    continue
                for fd in fds:
                    os.close(fd)
                if fields.get("FDSTOREREMOVE") == "1":
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
        self.stop()
        self.sock.close()


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
        assert sorted(store.kept) == ["nbd-0", "nbd-1", "nbd-2", "nbd-3", "nbd-state"]

        second = store.start(args, env)
        servers.append(second)
        second.wait_ready()
        assert second.logged("took over 2 connection(s)"), second.log_text()
        assert wait_for(lambda: not store.kept), store.kept  # it removed them: its close reaches the clients
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
