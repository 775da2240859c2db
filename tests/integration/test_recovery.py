"""Crash recovery (``--processes N``): a worker process SIGKILLed at any instant, and its clients see
a pause, never an error.

The primary keeps a copy of each connection's socket and the dead worker's arena; a replacement
takes over every journaled connection from the exact byte (nbdserver/process/recovery.py,
nbdserver/serving/journal.py): it sends the rest of the replies the kernel had only part of,
carries out again the requests taken and not answered, and reads on.  Connections still in the
handshake, and Unix socket ones, are closed instead.

The kills are aimed at the worker that serves a connection: the primary names each worker's PID in
its log ("2 worker processes: pids A, B", "worker N started again: pid P"), each worker logs the
connections it serves ("worker N: PEER: connected"), and a replacement keeps its predecessor's
index.  Where a test needs the server to have read what a client sent, or to have replies backed
up, it asks the kernel (the client socket's unacknowledged bytes, ``ss`` for the server's end)
and waits, with a deadline, never for a fixed time.
"""

from __future__ import annotations

import fcntl
import os
import random
import re
import signal
import socket
import statistics
import struct
import subprocess
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import nbd
import pytest

from tests.conftest import MiB, ServerProcess, make_image, scrape, value, wait_for
from tests.integration.rawclient import Cmd, RawClient
from tests.integration.test_handover import BLOCK, Client, finish

KILLS = 20
RECOVERY_TIMEOUT = 60.0  # for a replacement to start and take over (it waits 1 s after a young death)
PATTERN_SIZE = 16 * MiB
COPY_KILLS = 3


# Workers, and killing them ---------------------------------------------------------------------


def children(server: ServerProcess) -> list[int]:
    """The primary's children, which are its workers (it starts no other process)."""
    pid = server.proc.pid
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def count(server: ServerProcess, text: str) -> int:
    return sum(text in line for line in list(server.log))


def kill(server: ServerProcess, pid: int, wait_for_line: str = "took over") -> None:
    """SIGKILL a worker, then wait until the primary logged one more ``wait_for_line``: "took over"
    once a replacement goes on with the dead worker's connections; "started again" where it had
    none to go on with."""
    assert pid in server.worker_pids() or pid in children(server), f"{pid} is not one of the server's workers"
    before = count(server, wait_for_line)
    os.kill(pid, signal.SIGKILL)
    assert server.logged(wait_for_line, before + 1, timeout=RECOVERY_TIMEOUT), server.log_text()[-4000:]


def pauses(server: ServerProcess) -> list[float]:
    """The pause of each recovery, from its worker's death to its replacement's going on, as logged."""
    found = (re.search(r"of its predecessor ([\d.]+) s after it died", line) for line in list(server.log))
    return [float(m.group(1)) for m in found if m]


def live_connections(server: ServerProcess) -> dict[str, int]:
    """Peer -> index of the worker serving it, of every connection logged and not ended (a
    connection taken over stays with the same index: the replacement has its predecessor's)."""
    live: dict[str, int] = {}
    for line in list(server.log):
        m = re.search(r"worker (\d+): (\S+): (connected|disconnected)", line)
        if m and m.group(3) == "connected":
            live[m.group(2)] = int(m.group(1))
        elif m:
            live.pop(m.group(2), None)
    return live


def worker_of(server: ServerProcess, peer: str) -> int:
    """The index of the worker that logged the connection of ``peer`` ("127.0.0.1:PORT", or "unix")."""
    assert server.logged(f": {peer}: connected"), server.log_text()
    line = next(line for line in list(server.log) if f": {peer}: connected" in line)
    return int(re.search(r"worker (\d+): ", line).group(1))  # type: ignore[union-attr]


def peer_of(client: RawClient) -> str:
    host, port = client.sock.getsockname()[:2]
    return f"{host}:{port}"


def kill_worker_of(server: ServerProcess, client: RawClient) -> None:
    """Kill the worker serving ``client``'s connection, and wait until its replacement took it over."""
    kill(server, server.worker_pids()[worker_of(server, peer_of(client))])


# What the kernel says of a connection ----------------------------------------------------------


def unacknowledged(sock: socket.socket) -> int:
    """Bytes the client sent that the server's kernel has not acknowledged yet (SIOCOUTQ)."""
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]


def unread(sock: socket.socket) -> int:
    """Bytes the server sent that the client has not read yet (SIOCINQ)."""
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0" * 4))[0]


def server_queues(server: ServerProcess, client: RawClient) -> tuple[int, int]:
    """(Recv-Q, Send-Q) of the server's end of ``client``'s connection: bytes it has not read yet,
    and bytes it wrote that the client's kernel has not acknowledged."""
    port = client.sock.getsockname()[1]
    query = f"( sport = :{server.port} and dport = :{port} )"
    out = subprocess.run(
        ["ss", "-tnH", "state", "established", query], capture_output=True, text=True, check=True, timeout=10
    ).stdout.split()
    assert len(out) == 4, out  # Recv-Q, Send-Q, local and peer address: one socket
    return int(out[0]), int(out[1])


def wait_read(server: ServerProcess, client: RawClient) -> None:
    """Wait until the server read every byte the client sent: all acknowledged by the server's kernel
    (so in its receive queue, or read) and its receive queue empty."""
    assert wait_for(lambda: unacknowledged(client.sock) == 0 and server_queues(server, client)[0] == 0, timeout=10), (
        server_queues(server, client)
    )


def assert_ends_cleanly(client: RawClient) -> None:
    """Nothing follows the replies read: asked to disconnect, the server closes without another byte."""
    client.send(client.request_bytes(Cmd.DISC))
    assert client.sock.recv(1 << 16) == b""


# Servers ---------------------------------------------------------------------------------------


def pattern_image(path: Path, seed: int, size: int = PATTERN_SIZE) -> bytes:
    """A file of random bytes, for READs whose data is known."""
    data = random.Random(seed).randbytes(size)
    path.write_bytes(data)
    return data


@pytest.fixture
def two_workers(start_server) -> Iterator:
    """Factory: a server with two worker processes (the fixture stops it).  Its log is printed at the
    end, which pytest shows for a test that failed."""
    started: list[ServerProcess] = []

    def start(*args: str | Path) -> ServerProcess:
        started.append(start_server(*args, "--processes", "2"))
        return started[-1]

    yield start
    for server in started:
        print(server.log_text())


def metric(server: ServerProcess, name: str, **labels: str) -> float:
    return value(scrape(server.metrics_url), name, **labels)


# 1. Kills at random instants under load -------------------------------------------------------


@pytest.mark.bindings
def test_twenty_kills_at_random_instants_fail_no_request(two_workers, tmp_path):
    """Four connections (two on one export: multi-conn; one O_DIRECT; one read-only) keep 64
    requests in flight each, checked against a model, while a random worker is killed 20 times."""
    disk = make_image(tmp_path / "disk.img", 64 * MiB)
    direct = make_image(tmp_path / "direct.img", 64 * MiB)
    pattern = pattern_image(tmp_path / "ro.img", 1, 4 * MiB)
    server = two_workers(
        "--export",
        f"name=disk,path={disk}",
        "--export",
        f"name=direct,path={direct},cache=direct",
        "--export",
        f"name=ro,path={tmp_path / 'ro.img'},read-only",
    )
    clients = [
        Client(server.uri("disk"), range(0, 2048), True, seed=1),
        Client(server.uri("disk"), range(2048, 4096), True, seed=2),
        Client(server.uri("direct"), range(0, 4096), True, seed=3),
        Client(server.uri("ro"), range(0, 1024), False, expect=pattern, seed=4),
    ]
    for c in clients:
        c.start()
    chance = random.Random(20)
    try:
        for _ in range(KILLS):
            before = sum(c.done for c in clients)
            progress = wait_for(lambda before=before: sum(c.done for c in clients) > before + 1000, timeout=60)
            assert progress, ("no progress", [c.errors for c in clients])
            time.sleep(chance.uniform(0, 0.030))  # a random instant of the traffic: what is tested, not a wait
            kill(server, chance.choice(children(server)))
            assert not any(c.errors for c in clients), [c.errors for c in clients]
    finally:
        finish(clients)
    took = pauses(server)
    print(
        f"{KILLS} kills, {sum(c.done for c in clients)} requests; recovery pauses: "
        f"median {statistics.median(took):.3f} s, max {max(took):.3f} s"
    )
    for c, name in ((clients[0], "disk"), (clients[1], "disk"), (clients[2], "direct")):
        fresh = nbd.NBD()
        fresh.connect_uri(server.uri(name))
        for block, data in c.model.items():
            assert fresh.pread(BLOCK, block * BLOCK) == data
        fresh.shutdown()
    for c in clients:
        c.h.shutdown()
    samples = scrape(server.metrics_url)
    assert value(samples, "nbdserver_recoveries_total") == KILLS
    assert value(samples, "nbdserver_recovered_connections_total", outcome="resumed") >= KILLS
    assert value(samples, "nbdserver_recovered_connections_total", outcome="closed") == 0
    assert value(samples, "nbdserver_recovery_pause_seconds") == pytest.approx(took[-1], abs=0.001)
    assert value(samples, "nbdserver_recovery_pause_seconds_total") == pytest.approx(sum(took), abs=0.001 * KILLS)


# 2. Aimed kills, byte-exact -------------------------------------------------------------------


@pytest.fixture
def patterned(two_workers, tmp_path) -> tuple[ServerProcess, bytes, Path]:
    """A server with two workers exporting a file of known random bytes."""
    path = tmp_path / "disk.img"
    data = pattern_image(path, 2)
    return two_workers(path), data, path


def connected(server: ServerProcess, extended: bool = False, sock: socket.socket | None = None) -> RawClient:
    """A client in the transmission phase, as its worker knows it: one request answered.  (The reply
    to the handshake's GO may reach the client before the worker has told the primary that the
    connection has a journal; until then a kill closes it as one still in the handshake.)"""
    client = RawClient(server.host, server.port, sock=sock).handshake().go(extended=extended)
    client.request(Cmd.FLUSH)
    assert client.read_reply().error == 0
    return client


@pytest.mark.parametrize("extended", [False, True], ids=["compact", "extended"])
def test_a_kill_between_the_halves_of_a_request_header(patterned, extended):
    server, data, _ = patterned
    with connected(server, extended) as client:
        header = client.request_bytes(Cmd.READ, 3 * MiB, 64 * 1024)
        client.send(header[:11])
        wait_read(server, client)
        kill_worker_of(server, client)
        client.send(header[11:])
        reply = client.read_reply()
        assert reply.error == 0 and reply.data == data[3 * MiB : 3 * MiB + 64 * 1024]
        assert_ends_cleanly(client)


@pytest.mark.parametrize("extended", [False, True], ids=["compact", "extended"])
def test_a_kill_in_the_middle_of_a_write_payload(patterned, extended):
    server, _, path = patterned
    payload = random.Random(3).randbytes(MiB)
    with connected(server, extended) as client:
        client.send(client.request_bytes(Cmd.WRITE, 5 * MiB, MiB) + payload[: MiB // 2])
        wait_read(server, client)
        kill_worker_of(server, client)
        client.send(payload[MiB // 2 :])
        assert client.read_reply().error == 0
        client.request(Cmd.READ, 5 * MiB, MiB)
        reply = client.read_reply()
        assert reply.error == 0 and reply.data == payload
        assert_ends_cleanly(client)
    with open(path, "rb") as f:
        f.seek(5 * MiB)
        assert f.read(MiB) == payload


def small_window(server: ServerProcess) -> socket.socket:
    """A socket whose receive buffer (64 KiB, set before connecting, so the window stays small)
    holds back the server's replies once the client stops reading."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    sock.settimeout(10)
    sock.connect((server.host, server.port))
    return sock


def backed_up_reads(server: ServerProcess, extended: bool, reads: int) -> tuple[RawClient, dict[int, int]]:
    """A client that sent ``reads`` 1 MiB READs and read none of the replies, once they back up on
    the server's side: cookie -> offset."""
    client = connected(server, extended, small_window(server))
    cookies = {}
    for i in range(reads):
        offset = i * MiB
        client.request(Cmd.READ, offset, MiB)
        cookies[max(client._pending)] = offset
    assert wait_for(lambda: server_queues(server, client)[1] > 0, timeout=10), server_queues(server, client)
    return client, cookies


def assert_every_read_reply(client: RawClient, cookies: dict[int, int], data: bytes) -> None:
    """One complete reply for each READ, with its data (the server may answer in any order)."""
    answered = []
    for _ in cookies:
        reply = client.read_reply()  # a cookie not asked, or asked and answered already, fails here
        offset = cookies[reply.cookie]
        assert reply.error == 0 and reply.data == data[offset : offset + MiB], f"READ at {offset}"
        answered.append(reply.cookie)
    assert sorted(answered) == sorted(cookies)


@pytest.mark.parametrize("extended", [False, True], ids=["compact", "extended"])
def test_a_kill_in_the_middle_of_read_replies(patterned, extended):
    """Replies backed up in the kernel and in the worker: the kill cuts one of them somewhere; the
    replacement sends the rest of it from the exact byte, then the others."""
    server, data, _ = patterned
    client, cookies = backed_up_reads(server, extended, 12)
    with client:
        kill_worker_of(server, client)
        assert_every_read_reply(client, cookies, data)
        assert_ends_cleanly(client)
    print(re.findall(r"taken over after a crash: .*", server.log_text()))  # what was sent again


def test_a_kill_with_a_flush_in_flight(patterned):
    """WRITEs and a FLUSH sent together, the worker killed at once, three times: each is answered
    exactly once, whichever of them the dead worker had read, carried out or answered."""
    server, _, path = patterned
    chance = random.Random(4)
    written: dict[int, bytes] = {}
    with connected(server) as client:
        for round_ in range(3):
            batch, cookies = [], set()
            for i in range(32):
                offset = (round_ * 32 + i) * 64 * 1024
                written[offset] = chance.randbytes(64 * 1024)
                batch.append(client.request_bytes(Cmd.WRITE, offset, 64 * 1024) + written[offset])
                cookies.add(max(client._pending))
            batch.append(client.request_bytes(Cmd.FLUSH))
            cookies.add(max(client._pending))
            client.send(b"".join(batch))
            kill_worker_of(server, client)
            replies = [client.read_reply() for _ in cookies]  # one more for a cookie fails in read_reply
            assert sorted(r.cookie for r in replies) == sorted(cookies)
            assert all(r.error == 0 for r in replies)
        assert_ends_cleanly(client)
    with open(path, "rb") as f:
        for offset, chunk in written.items():
            f.seek(offset)
            assert f.read(len(chunk)) == chunk


def test_a_kill_closes_unix_socket_and_handshake_connections(two_workers, tmp_path):
    """Neither can be taken over (the kernel counts no bytes of a Unix socket; a handshake is not
    journaled): each client sees its connection closed, not a hang, and the server serves on."""
    path = tmp_path / "nbd.sock"
    server = two_workers(
        make_image(tmp_path / "disk.img", 16 * MiB), "--listen", "127.0.0.1:0", "--listen", f"unix:{path}"
    )
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.connect(str(path))
    with RawClient(sock=unix) as on_unix, RawClient(server.host, server.port) as shaking:
        on_unix.handshake().go()
        on_unix.request(Cmd.WRITE, 0, BLOCK, payload=b"u" * BLOCK)
        assert on_unix.read_reply().error == 0
        shaking.greeting()  # and nothing more: still in the handshake
        victims = {worker_of(server, "unix"), worker_of(server, peer_of(shaking))}
        pids = server.worker_pids()
        for index in victims:
            kill(server, pids[index], wait_for_line=f"worker {index} started again")
        assert on_unix.wait_closed() and shaking.wait_closed()
    assert metric(server, "nbdserver_recovered_connections_total", outcome="closed") == 2
    fresh_unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    fresh_unix.connect(str(path))
    for fresh in (RawClient(sock=fresh_unix), RawClient(server.host, server.port)):
        with fresh:
            fresh.handshake().go()
            fresh.request(Cmd.READ, 0, BLOCK)
            assert fresh.read_reply().data == b"u" * BLOCK
            assert_ends_cleanly(fresh)


def test_a_kill_of_a_connection_idle_after_a_large_write(patterned):
    """As qemu-img convert writes: a 2 MiB WRITE, most of it received in its own buffer, answered;
    the connection idle when its worker is killed.  (Until 0a1f4ab the journal lost track of where
    the staging buffer started after a payload received in place: the connection was closed.)"""
    server, _, _ = patterned
    payload = random.Random(8).randbytes(2 * MiB)
    with connected(server) as client:
        client.request(Cmd.WRITE, 4 * MiB, len(payload), payload=payload)
        assert client.read_reply().error == 0
        kill_worker_of(server, client)
        client.request(Cmd.READ, 4 * MiB, BLOCK)
        reply = client.read_reply()
        assert reply.error == 0 and reply.data == payload[:BLOCK]
        assert_ends_cleanly(client)


def phantom_requests(offset: int, count: int, size: int) -> bytes:
    """``size`` bytes of data that read as ``count`` WRITE requests of a block of b"PHANTOM!" each,
    from ``offset`` on, then zeros (a bad request magic)."""
    one = struct.pack(">IHHQQI", 0x25609513, 0, 1, 0xBAD, 0, BLOCK)  # magic, flags, WRITE, cookie, offset, length
    data = b"".join(
        one[:16] + struct.pack(">QI", offset + i * BLOCK, BLOCK) + b"PHANTOM!" * (BLOCK // 8) for i in range(count)
    )
    return data + bytes(size - len(data))


def test_a_kill_after_a_large_write_takes_no_request_from_its_payload(patterned):
    """A 1 MiB WRITE whose last 32 KiB come in a receive of their own, after the rest was received in
    place; the connection idle, its worker killed.  Its payload is only data: nothing of it may be
    taken as a request (here the data reads as seven WRITEs to 8 MiB), and the next READ is answered.
    (Until 0a1f4ab a replacement took the staged bytes from the wrong place: these seven WRITEs.)"""
    server, data, path = patterned
    tail = 32 * 1024
    payload = random.Random(9).randbytes(MiB - tail) + phantom_requests(8 * MiB, 7, tail)
    with connected(server) as client:
        client.send(client.request_bytes(Cmd.WRITE, 0, MiB) + payload[:-tail])
        wait_read(server, client)
        client.send(payload[-tail:])
        assert client.read_reply().error == 0
        kill_worker_of(server, client)
        client.request(Cmd.READ, 8 * MiB, 7 * BLOCK)
        try:
            reply = client.read_reply()
            assert reply.error == 0 and reply.data == data[8 * MiB : 8 * MiB + 7 * BLOCK]
        finally:
            with open(path, "rb") as f:
                f.seek(8 * MiB)
                assert b"PHANTOM!" not in f.read(7 * BLOCK), "requests the client never sent were carried out"


def test_a_kill_with_a_bad_request_staged_still_closes_the_connection(two_workers, tmp_path):
    """A client that breaks the protocol is disconnected, crash or no crash.  A 4 MiB READ (over
    --max-inflight 1M: the worker takes no further request until its reply is sent, and the client
    reads nothing) with 28 bytes of zeros right behind it, read but not parsed; the worker killed:
    the client gets the reply, then its connection is closed."""
    path = tmp_path / "disk.img"
    data = pattern_image(path, 5)
    server = two_workers(path, "--max-inflight", "1M")
    with connected(server, sock=small_window(server)) as client:
        client.send(client.request_bytes(Cmd.READ, 0, 4 * MiB) + bytes(28))
        wait_read(server, client)
        assert wait_for(lambda: server_queues(server, client)[1] > 0, timeout=10), server_queues(server, client)
        kill_worker_of(server, client)
        reply = client.read_reply()
        assert reply.error == 0 and reply.data == data[: 4 * MiB]
        assert client.wait_closed(), "neither served nor closed"


# The instants around the journal's own edges --------------------------------------------------


def test_a_kill_right_after_the_handshake(patterned):
    """The handshake ends, for the client, with the reply to its GO: from then on its connection is in
    the transmission phase, and a kill at any instant must not close it."""
    server, data, _ = patterned
    with RawClient(server.host, server.port).handshake().go() as client:
        client.request(Cmd.READ, 0, BLOCK)
        index = worker_of(server, peer_of(client))
        kill(server, server.worker_pids()[index], wait_for_line=f"worker {index} started again")
        reply = client.read_reply()
        assert reply.error == 0 and reply.data == data[:BLOCK]
        assert_ends_cleanly(client)


def test_a_replacement_killed_before_it_sent_the_rest_of_the_replies(patterned):
    """Two kills in a row, the client reading nothing meanwhile: the first replacement had sent
    again only part of what its predecessor left unsent when it is killed in turn; the second must
    send the rest, from the exact byte."""
    server, data, _ = patterned
    reads = 12
    client, cookies = backed_up_reads(server, False, reads)
    with client:
        kill_worker_of(server, client)
        total = reads * (MiB + 16)  # simple replies
        # The kernel holds only part of the replies: the rest is the replacement's to send.
        assert unread(client.sock) + server_queues(server, client)[1] < total
        kill_worker_of(server, client)
        assert_every_read_reply(client, cookies, data)
        assert_ends_cleanly(client)
    print(re.findall(r"taken over after a crash: .*", server.log_text()))


# 3. Real copying tools ------------------------------------------------------------------------


def written(server: ServerProcess) -> float:
    return metric(server, "nbdserver_written_bytes_total", export="")


def kill_a_copy_worker(server: ServerProcess, copy: subprocess.Popen, target: int) -> None:
    """Once ``target`` bytes were written (so the copying tool's connections are in the transmission
    phase, and the copy is under way), kill a worker serving one of them.  (The count may fall short
    of the truth by what a killed worker wrote since /metrics last asked it: a margin of MiBs.)"""
    if not wait_for(lambda: written(server) >= target or copy.poll() is not None, timeout=60):
        pytest.fail("the copy made no progress")
    assert copy.poll() is None, f"the copy ended ({copy.returncode}): {copy.stderr.read() if copy.stderr else ''}"
    index = random.Random(len(pauses(server))).choice(sorted(set(live_connections(server).values())))
    kill(server, server.worker_pids()[index])


@pytest.mark.clients
def test_nbdcopy_from_a_pipe_rides_through_kills(two_workers, tmp_path):
    disk = make_image(tmp_path / "disk.img", 64 * MiB)
    server = two_workers(disk)
    data = random.Random(6).randbytes(32 * MiB)
    copy = subprocess.Popen(["nbdcopy", "-", server.uri()], stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    assert copy.stdin is not None
    try:
        chunk = len(data) // (COPY_KILLS + 1)
        for i in range(COPY_KILLS):  # 8 MiB, a kill, the next 8 MiB...: the copy waits for its input
            copy.stdin.write(data[i * chunk : (i + 1) * chunk])
            copy.stdin.flush()
            kill_a_copy_worker(server, copy, i * chunk + chunk // 2)
        copy.stdin.write(data[COPY_KILLS * chunk :])
        copy.stdin.close()
        assert copy.wait(120) == 0, copy.stderr.read() if copy.stderr else ""
    finally:
        if copy.poll() is None:
            copy.kill()
            copy.wait()
    assert disk.read_bytes()[: len(data)] == data
    assert len(pauses(server)) == COPY_KILLS


@pytest.mark.clients
def test_qemu_img_convert_rides_through_kills(two_workers, tmp_path):
    disk = make_image(tmp_path / "disk.img", 64 * MiB)
    source = tmp_path / "source.img"
    source.write_bytes(random.Random(7).randbytes(64 * MiB))
    server = two_workers(disk)
    convert = subprocess.Popen(
        ["qemu-img", "convert", "-n", "-r", "8M", "-f", "raw", "-O", "raw", str(source), server.uri()],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for i in range(COPY_KILLS):  # 64 MiB at 8 MiB/s: about 8 s of copying, a kill every 8 MiB
            kill_a_copy_worker(server, convert, (i + 1) * 8 * MiB)
        assert convert.wait(120) == 0, convert.stderr.read() if convert.stderr else ""
    finally:
        if convert.poll() is None:
            convert.kill()
            convert.wait()
    assert disk.read_bytes() == source.read_bytes()
    assert len(pauses(server)) == COPY_KILLS
