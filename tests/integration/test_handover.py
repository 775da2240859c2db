"""Upgrades in place (SIGUSR2): clients with requests in flight see a pause, never an error.

Every reply is checked against a model of what each client wrote; libnbd itself
fails a connection on a reply it did not ask for, so a request answered twice
or not at all shows too.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import threading
from pathlib import Path

import nbd
import pytest

from nbdserver.process.handover import QUIESCE_TIMEOUT
from tests.conftest import MiB, ServerProcess, Upgradable, make_image, scrape, value, wait_for
from tests.integration.rawclient import Cmd, RawClient

pytestmark = pytest.mark.bindings  # libnbd's Python bindings: run again by tests/in_current

ROOT = Path(__file__).resolve().parents[2]
BLOCK = 4096
IN_FLIGHT = 64  # per connection; four connections keep 256 in flight


class Client(threading.Thread):
    """One connection keeping IN_FLIGHT reads and writes going on its own blocks, checked against a model."""

    def __init__(self, uri: str, blocks: range, writable: bool, expect: bytes | None = None, seed: int = 0) -> None:
        super().__init__(daemon=True)
        self.h = nbd.NBD()
        self.h.connect_uri(uri)
        self.blocks, self.writable, self.expect = blocks, writable, expect
        self.model: dict[int, bytes] = {}
        self.random = random.Random(seed)
        self.stop = threading.Event()
        self.errors: list[str] = []
        self.done = 0

    def run(self) -> None:
        busy: dict[int, int] = {}  # cookie -> block
        pending: dict[int, tuple[str, int, object]] = {}
        try:
            while not self.stop.is_set() or pending:
                while len(pending) < IN_FLIGHT and not self.stop.is_set():
                    block = self.random.choice(self.blocks)
                    if block in busy.values():
                        continue
                    if self.writable and self.random.random() < 0.5:
                        data = self.random.randbytes(BLOCK)
                        flags = nbd.CMD_FLAG_FUA if self.random.random() < 0.1 else 0
                        cookie = self.h.aio_pwrite(data, block * BLOCK, flags=flags)
                        pending[cookie] = ("write", block, data)
                    else:
                        buf = nbd.Buffer(BLOCK)
                        cookie = self.h.aio_pread(buf, block * BLOCK)
                        pending[cookie] = ("read", block, buf)
                    busy[cookie] = block
                self.h.poll(1000)
                for cookie in list(pending):
                    if not self.h.aio_command_completed(cookie):
                        continue
                    kind, block, thing = pending.pop(cookie)
                    del busy[cookie]
                    self.done += 1
                    if kind == "write":
                        self.model[block] = thing  # type: ignore[assignment]
                    else:
                        got = bytes(thing.to_bytearray())  # type: ignore[attr-defined]
                        want = self.model.get(block, self.expect or bytes(BLOCK))
                        if self.expect is not None:
                            want = self.expect[block * BLOCK : (block + 1) * BLOCK]
                        if got != want:
                            self.errors.append(f"block {block}: read back differs")
        except nbd.Error as exc:
            self.errors.append(f"libnbd: {exc}")


def finish(clients: list[Client]) -> None:
    """Stop the clients once their requests in flight are answered; none may have seen an error."""
    for c in clients:
        c.stop.set()
    for c in clients:
        c.join(60)
    assert not any(c.is_alive() for c in clients)
    assert [c.errors for c in clients] == [[] for _ in clients]


@pytest.mark.parametrize("processes", [1, 2], ids=["one-process", "two-workers"])
def test_twenty_upgrades_under_load_fail_no_request(upgradable, tmp_path, processes):
    disk = make_image(tmp_path / "disk.img", 64 * MiB)
    direct = make_image(tmp_path / "direct.img", 64 * MiB)
    pattern = random.Random(1).randbytes(4 * MiB)
    (tmp_path / "ro.img").write_bytes(pattern)
    u = upgradable(
        "--export",
        f"name=disk,path={disk}",
        "--export",
        f"name=direct,path={direct},cache=direct",
        "--export",
        f"name=ro,path={tmp_path / 'ro.img'},read-only",
        "--processes",
        str(processes),
    )
    uri = u.server.uri
    clients = [
        Client(uri("disk"), range(0, 2048), True, seed=1),  # two connections on one export: multi-conn
        Client(uri("disk"), range(2048, 4096), True, seed=2),
        Client(uri("direct"), range(0, 4096), True, seed=3),
        Client(uri("ro"), range(0, 1024), False, expect=pattern, seed=4),
    ]
    for c in clients:
        c.start()
    pauses = []
    try:
        for _ in range(20):
            before = sum(c.done for c in clients)
            assert wait_for(lambda before=before: sum(c.done for c in clients) > before + 1000), "no progress"
            pauses.append(u.upgrade())
            assert not any(c.errors for c in clients), [c.errors for c in clients]
            # The successor serves /metrics on the same address, with the connections it took at once.
            samples = scrape(u.server.metrics_url)
            assert abs(value(samples, "nbdserver_handover_pause_seconds") - pauses[-1]) < 0.001
            assert value(samples, "nbdserver_connections", export="disk") == 2
            assert value(samples, "nbdserver_connections", export="ro") == 1
    finally:
        finish(clients)
    print(
        f"requests: {sum(c.done for c in clients)}; pauses: median {sorted(pauses)[10]:.3f} s, max {max(pauses):.3f} s"
    )
    # The last successor serves what every client wrote, on fresh connections too.
    for c, image in ((clients[0], disk), (clients[1], disk), (clients[2], direct)):
        fresh = nbd.NBD()
        fresh.connect_uri(uri(image.stem))
        for block, data in c.model.items():
            assert fresh.pread(BLOCK, block * BLOCK) == data
        fresh.shutdown()
        c.h.shutdown()


def a_client_wrote(u: Upgradable, fill: bytes) -> nbd.NBD:
    """A libnbd client of ``u`` that wrote a block of ``fill`` at offset 0."""
    h = nbd.NBD()
    h.connect_uri(u.server.uri())
    h.pwrite(fill * BLOCK, 0)
    return h


def test_a_successor_that_cannot_start_leaves_the_server_serving(upgradable, tmp_path):
    disk = make_image(tmp_path / "disk.img", 16 * MiB)
    u = upgradable(str(disk))
    h = a_client_wrote(u, b"1")
    disk.rename(tmp_path / "moved.img")  # the successor cannot open its export: it exits at start
    os.kill(u.pids[-1], signal.SIGUSR2)
    assert u.server.logged("upgrade failed, serving on"), u.server.log_text()
    assert "cannot open export" in u.server.log_text()
    h.pwrite(b"2" * BLOCK, BLOCK)  # the same connection goes on
    assert h.pread(2 * BLOCK, 0) == b"1" * BLOCK + b"2" * BLOCK
    fresh = nbd.NBD()
    fresh.connect_uri(u.server.uri())  # and new ones are accepted
    assert fresh.pread(BLOCK, BLOCK) == b"2" * BLOCK
    fresh.shutdown()
    h.shutdown()
    assert u.alive() and len(u.pids) == 1


def test_a_client_that_reads_no_replies_is_closed_and_holds_up_no_one(upgradable, tmp_path):
    disk = make_image(tmp_path / "disk.img", 128 * MiB)
    u = upgradable(str(disk))
    reader = nbd.NBD()
    reader.connect_uri(u.server.uri())
    with RawClient(u.server.host, u.server.port) as stuck:
        stuck.handshake().go()
        for i in range(64):  # 64 MiB of replies it never reads
            stuck.request(Cmd.READ, i * MiB, MiB)
        assert wait_for(lambda: value(scrape(u.server.metrics_url), "nbdserver_inflight_bytes", export="") == 0)
        u.upgrade(timeout=QUIESCE_TIMEOUT + 30)
        assert reader.pread(BLOCK, 0) == bytes(BLOCK)  # the other client was handed over
        samples = scrape(u.server.metrics_url)
        assert value(samples, "nbdserver_connections_turned_away_total", reason="handover_timeout") == 1
        assert value(samples, "nbdserver_connections", export="") == 1
        assert stuck.wait_closed()
    reader.shutdown()


@pytest.mark.parametrize("extended", [False, True], ids=["compact", "extended"])
def test_bytes_received_but_not_taken_go_with_the_connection(upgradable, tmp_path, extended):
    """Half a request header, then half a WRITE payload, each cut by an upgrade: the successor reads
    on, in the header form the connection negotiated."""
    disk = make_image(tmp_path / "disk.img", 16 * MiB)
    u = upgradable(str(disk))
    payload = random.Random(5).randbytes(MiB)
    with RawClient(u.server.host, u.server.port) as raw:
        raw.handshake().go(extended=extended)
        header = raw.request_bytes(Cmd.WRITE, 2 * MiB, len(payload))
        raw.send(header[:11])
        u.upgrade()
        raw.send(header[11:] + payload[: 300 * 1024])
        assert wait_for(lambda: value(scrape(u.server.metrics_url), "nbdserver_inflight_bytes", export="") > 0)
        u.upgrade()
        raw.send(payload[300 * 1024 :])
        reply = raw.read_reply()
        assert reply.error == 0
        raw.request(Cmd.READ, 2 * MiB, len(payload))
        reply = raw.read_reply()
        assert reply.error == 0 and reply.data == payload
    with open(disk, "rb") as f:
        f.seek(2 * MiB)
        assert f.read(len(payload)) == payload


@pytest.mark.clients
def test_nbdcopy_from_a_pipe_rides_through_upgrades(upgradable, tmp_path):
    disk = make_image(tmp_path / "disk.img", 64 * MiB)
    u = upgradable(str(disk))
    data = random.Random(6).randbytes(48 * MiB)
    copy = subprocess.Popen(["nbdcopy", "-", u.server.uri()], stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    assert copy.stdin is not None
    for i in range(6):  # 8 MiB, an upgrade, the next 8 MiB...
        copy.stdin.write(data[i * 8 * MiB : (i + 1) * 8 * MiB])
        copy.stdin.flush()
        u.upgrade()
    copy.stdin.close()
    assert copy.wait(120) == 0, copy.stderr.read() if copy.stderr else ""
    assert disk.read_bytes()[: len(data)] == data
    assert len(u.pids) == 7


@pytest.mark.clients
def test_qemu_img_convert_rides_through_upgrades(upgradable, tmp_path):
    disk = make_image(tmp_path / "disk.img", 64 * MiB)
    source = tmp_path / "source.img"
    source.write_bytes(random.Random(7).randbytes(64 * MiB))
    u = upgradable(str(disk))
    convert = subprocess.Popen(
        ["qemu-img", "convert", "-n", "-r", "16M", "-f", "raw", "-O", "raw", str(source), u.server.uri()],
        stderr=subprocess.PIPE,
        text=True,
    )
    upgrades = 0
    while convert.poll() is None and upgrades < 3:  # 64 MiB at 16 MiB/s: about 4 s
        u.upgrade()
        upgrades += 1
    assert convert.wait(120) == 0, convert.stderr.read() if convert.stderr else ""
    assert upgrades == 3, "the copy ended before three upgrades"
    assert disk.read_bytes() == source.read_bytes()


def installed_copy(tmp_path: Path) -> Path:
    """The package copied elsewhere, as an install that can be replaced under a running server."""
    site = tmp_path / "site"
    shutil.copytree(ROOT / "nbdserver", site / "nbdserver", ignore=shutil.ignore_patterns("__pycache__"))
    for library in ROOT.glob("*__mypyc*.so"):  # what the compiled modules share, beside the package
        shutil.copy(library, site)
    return site


def serve_from(site: Path, tmp_path: Path, fill: bytes) -> tuple[Upgradable, nbd.NBD]:
    """A server run from the copy at ``site``, and a client that wrote a block of ``fill``."""
    disk = make_image(tmp_path / "disk.img", 16 * MiB)
    env = {"PYTHONPATH": str(site)}
    server = ServerProcess([str(disk), "--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0"], env=env, cwd=tmp_path)
    u = Upgradable(server.wait_ready())
    return u, a_client_wrote(u, fill)


def test_the_newly_installed_version_takes_over(tmp_path):
    site = installed_copy(tmp_path)
    u, h = serve_from(site, tmp_path, b"v")
    try:
        init = site / "nbdserver" / "__init__.py"
        init.write_text(init.read_text().replace('__version__ = "', '__version__ = "9.9.9+'))
        u.upgrade()
        assert "nbdserver 9.9.9+" in u.server.log_text()  # the successor runs the new code
        assert h.pread(BLOCK, 0) == b"v" * BLOCK
        h.shutdown()
    finally:
        u.stop()


def test_a_successor_of_another_state_version_takes_nothing(tmp_path):
    site = installed_copy(tmp_path)
    module = site / "nbdserver" / "process" / "handover.py"
    text = module.read_text()
    assert "STATE_VERSION = 1 " in text
    module.write_text(text.replace("STATE_VERSION = 1 ", "STATE_VERSION = 2 "))
    u, h = serve_from(site, tmp_path, b"s")
    server = u.server
    try:
        module.write_text(text)  # the "new" install speaks version 1 only
        os.kill(u.pids[-1], signal.SIGUSR2)
        assert server.logged("upgrade failed, serving on"), server.log_text()
        assert "does not take state version 2" in server.log_text()
        assert h.pread(BLOCK, 0) == b"s" * BLOCK  # the old server still has the connection
        h.shutdown()
        assert u.alive()
    finally:
        u.stop()


def test_a_stop_during_an_upgrade_lets_the_upgrade_finish_first(upgradable, tmp_path):
    u = upgradable(str(make_image(tmp_path / "disk.img", 16 * MiB)))
    h = a_client_wrote(u, b"u")
    os.kill(u.pids[-1], signal.SIGUSR2)
    # Once the upgrade is under way (signals sent back to back may be taken in either order:
    # each reaches whichever of the process's threads the kernel picks).
    assert u.server.logged("SIGUSR2: upgrading: starting the successor"), u.server.log_text()
    os.kill(u.pids[-1], signal.SIGTERM)  # the service manager stops it meanwhile
    assert u.server.logged("took over 1 connection"), u.server.log_text()
    assert u.server.proc.wait(30) == 0
    assert h.pread(BLOCK, 0) == b"u" * BLOCK  # the successor has the connection
    h.shutdown()
    u.follow()  # so that the fixture stops the successor
    assert u.alive() and len(u.pids) == 2
