"""Malformed and hostile input on raw sockets.

Each case checks the server's answer against the NBD specification, then that the same
server process is alive and still serves a well-behaved libnbd client.  Memory bounds are
checked on the server's VmRSS / VmHWM from /proc.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import threading
import time

import nbd
import pytest

from tests.conftest import IMAGE_SIZE, wait_for

from .rawclient import (
    FLAG_FIXED_NEWSTYLE,
    FLAG_NO_ZEROES,
    IHAVEOPT,
    REQUEST_MAGIC,
    TIMEOUT,
    TRANSMISSION_READ_ONLY,
    Chunk,
    Cmd,
    CmdFlag,
    Err,
    Opt,
    RawClient,
    Rep,
    info_request,
    meta_request,
    option_bytes,
)

pytestmark = pytest.mark.bindings  # libnbd's Python bindings: run again by tests/in_current

MiB = 1 << 20
FLAGS = struct.pack(">I", FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)
GO = option_bytes(Opt.GO, info_request())
RO_OFFSET = 8 * MiB
RO_PATTERN = bytes(range(256)) * 64
MODES = ["export_name", "go", "structured", "extended"]
SIZE = IMAGE_SIZE


# Utilities -----------------------------------------------------------------------------


def memory(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM (peak RSS) of a process, in MiB."""
    values = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(value.split()[0]) / 1024
    return values


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def call_with_timeout(fn, timeout: float = TIMEOUT):
    """Run ``fn`` in a thread; fail instead of hanging if it does not return in time."""
    result: dict = {}

    def run() -> None:
        try:
            result["value"] = fn()
        except BaseException as exc:
            result["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"no answer within {timeout} s"
    if "error" in result:
        raise result["error"]
    return result["value"]


def assert_serves(server, read_only: bool = False) -> None:
    """The server process lives and a libnbd client can write a pattern and read it back."""
    assert server.proc.poll() is None, f"server exited with {server.proc.returncode}:\n{server.log_text()}"
    if read_only:
        offset, data = RO_OFFSET, RO_PATTERN
    else:
        offset, data = 48 * MiB + 4096 * int.from_bytes(os.urandom(2)) % (8 * MiB), os.urandom(64 * 1024)

    def talk() -> bytes:
        handle = nbd.NBD()
        handle.connect_uri(server.uri())
        try:
            if not read_only:
                handle.pwrite(data, offset)
            return handle.pread(len(data), offset)
        finally:
            handle.shutdown()

    assert call_with_timeout(talk) == data


def connect(server) -> RawClient:
    return RawClient(server.host, server.port)


def negotiate(server, mode: str) -> RawClient:
    client = connect(server).handshake()
    if mode == "export_name":
        return client.export_name()
    return client.go(structured=mode == "structured", extended=mode == "extended")


def roundtrip(client: RawClient, read_only: bool = False) -> None:
    """The connection still works: a WRITE and a READ of it (or a READ of known data)."""
    if read_only:
        offset, data = RO_OFFSET, RO_PATTERN
    else:
        offset, data = MiB, os.urandom(8192)
        client.request(Cmd.WRITE, offset, len(data), payload=data)
        assert client.read_reply().error == Err.OK
    client.request(Cmd.READ, offset, len(data))
    reply = client.read_reply()
    assert (reply.error, reply.data) == (Err.OK, data)


def assert_error_reply(client: RawClient, reply, error: int, cmd: int) -> None:
    assert reply.error == error, f"got {reply.error}, expected {error} ({reply.message!r})"
    if error and client.structured and cmd == Cmd.READ:
        assert reply.structured, "READ errors must come as structured replies once negotiated"
    if error and reply.structured:
        assert reply.chunks == [Chunk.ERROR], reply.chunks
        reply.message.decode()


@pytest.fixture
def server(start_server, image):
    """One process: these tests measure the memory and descriptors of the process that serves
    (test_workers.py holds the worker processes to the budgets)."""
    return start_server(image, "--processes", "1")


@pytest.fixture(params=MODES)
def mode(request) -> str:
    return request.param


@pytest.fixture
def ro_server(start_server, image):
    with open(image, "r+b") as f:
        f.seek(RO_OFFSET)
        f.write(RO_PATTERN)
    return start_server(image, "--read-only")


# Handshake -------------------------------------------------------------------------------

# (read the greeting first?, bytes sent) -> the server must close the connection.
HANDSHAKE_VIOLATIONS = {
    "unknown client flags": (True, struct.pack(">I", FLAG_FIXED_NEWSTYLE | 1 << 2)),
    "all client flags": (True, struct.pack(">I", 0xFFFFFFFF)),
    "wrong option magic": (True, FLAGS + struct.pack(">QII", IHAVEOPT ^ 1, Opt.LIST, 0)),
    "wrong magic after good option": (True, FLAGS + option_bytes(Opt.LIST) + struct.pack(">QII", 0, Opt.LIST, 0)),
    "EXPORT_NAME of unknown export": (True, FLAGS + option_bytes(Opt.EXPORT_NAME, b"no-such-export")),
    "EXPORT_NAME of 16 MiB": (True, FLAGS + option_bytes(Opt.EXPORT_NAME, length=16 * MiB)),
    "HTTP request at once": (False, b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n"),
    "64 KiB of 0xff at once": (False, b"\xff" * 65536),
    "64 KiB of zeroes at once": (False, bytes(65536)),
}


@pytest.mark.parametrize("greet, data", HANDSHAKE_VIOLATIONS.values(), ids=HANDSHAKE_VIOLATIONS.keys())
def test_handshake_violation_closes_connection(server, greet, data):
    with connect(server) as client:
        if greet:
            client.greeting()
        with contextlib.suppress(OSError):  # the server may close while we still send
            client.send(data)
        assert client.wait_closed(), "server kept the connection open:\n" + server.log_text()
    assert_serves(server)


# Bytes the client sends before it goes away; the server must just drop the connection.
ABANDONED = {
    "at once": b"",
    "after client flags": FLAGS,
    "in an option header": FLAGS + option_bytes(Opt.LIST)[:8],
    "in option data": FLAGS + GO[:20],
    "in a request header": FLAGS + GO + struct.pack(">IHH", REQUEST_MAGIC, 0, Cmd.READ),
    "in a WRITE payload": FLAGS + GO + struct.pack(">IHHQQI", REQUEST_MAGIC, 0, Cmd.WRITE, 1, 0, MiB) + bytes(1000),
}


@pytest.mark.parametrize("reset", [False, True], ids=["close", "reset"])
@pytest.mark.parametrize("data", ABANDONED.values(), ids=ABANDONED.keys())
def test_client_disconnects_midway(server, data, reset):
    pid = server.proc.pid
    fds = open_fds(pid)
    client = connect(server)
    client.send(data)
    if reset:
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    else:
        client.greeting()
    client.close()
    assert wait_for(lambda: open_fds(pid) <= fds), "server did not release the connection"
    assert_serves(server)


# Options -------------------------------------------------------------------------------

# option, data, the reply that ends it; the connection must go on afterwards.
OPTION_ERRORS = {
    "unknown option": (0x1234, b"", Rep.ERR_UNSUP),
    "option 0": (0, b"", Rep.ERR_UNSUP),
    "option 0xffffffff with data": (0xFFFFFFFF, b"x" * 100, Rep.ERR_UNSUP),
    "1 MiB of option data": (Opt.GO, bytes(MiB), Rep.ERR_TOO_BIG),
    "LIST with data": (Opt.LIST, b"x", Rep.ERR_INVALID),
    "STARTTLS": (Opt.STARTTLS, b"", Rep.ERR_POLICY),
    "STRUCTURED_REPLY with data": (Opt.STRUCTURED_REPLY, b"\0", Rep.ERR_INVALID),
    "SET_META_CONTEXT before STRUCTURED_REPLY": (
        Opt.SET_META_CONTEXT,
        meta_request("", ["base:allocation"]),
        Rep.ERR_INVALID,
    ),
    "LIST_META_CONTEXT query without namespace": (
        Opt.LIST_META_CONTEXT,
        meta_request("", ["nonamespace"]),
        Rep.ERR_INVALID,
    ),
    "LIST_META_CONTEXT query count beyond data": (
        Opt.LIST_META_CONTEXT,
        struct.pack(">II", 0, 1000),
        Rep.ERR_INVALID,
    ),
    "GO without data": (Opt.GO, b"", Rep.ERR_INVALID),
    "GO name length beyond data": (Opt.GO, struct.pack(">I", 100) + b"abc", Rep.ERR_INVALID),
    "GO name length 0xffffffff": (Opt.GO, struct.pack(">IH", 0xFFFFFFFF, 0), Rep.ERR_INVALID),
    "GO without request count": (Opt.GO, struct.pack(">I", 0), Rep.ERR_INVALID),
    "GO request count beyond data": (Opt.GO, struct.pack(">IHH", 0, 5, 1), Rep.ERR_INVALID),
    "GO with trailing byte": (Opt.GO, info_request() + b"\0", Rep.ERR_INVALID),
    "INFO with odd request list": (Opt.INFO, struct.pack(">IHB", 0, 1, 0), Rep.ERR_INVALID),
    "GO of unknown export": (Opt.GO, info_request("no-such-export"), Rep.ERR_UNKNOWN),
}


@pytest.mark.parametrize("option, data, expected", OPTION_ERRORS.values(), ids=OPTION_ERRORS.keys())
def test_option_refused_and_connection_goes_on(server, option, data, expected):
    with connect(server).handshake() as client:
        replies = client.option(option, data)
        assert [r.type for r in replies] == [expected]
        assert len(replies[-1].data) <= 4096
        replies[-1].data.decode()  # an error message is UTF-8 text
        listing = client.option(Opt.LIST)
        assert [r.type for r in listing] == [Rep.SERVER, Rep.ACK]
        client.go()
        roundtrip(client)
    assert_serves(server)


def test_option_of_4_gib_is_skipped_not_buffered(server):
    pid = server.proc.pid
    before = memory(pid)
    sent = 64 * MiB
    with connect(server).handshake() as client:
        client.send(option_bytes(Opt.LIST, length=0xFFFFFFFF))
        block = bytes(MiB)
        for _ in range(sent // MiB):
            client.send(block)
        client.sock.settimeout(1)
        with pytest.raises(TimeoutError):  # nothing to answer before the 4 GiB have arrived
            client.recv_exact(1)
    after = memory(pid)
    print(f"option of 0xffffffff bytes, {sent // MiB} MiB sent: RSS {before} -> {after}")
    assert after["VmHWM"] - before["VmRSS"] < 16, (before, after)
    assert_serves(server)


def test_option_storm(server):
    """10,000 pipelined options on one connection; answers in order and bounded memory."""
    pid = server.proc.pid
    before = memory(pid)
    cycle = [
        (Opt.LIST, b"", Rep.ACK),
        (0x4242, b"", Rep.ERR_UNSUP),
        (Opt.GO, b"\0", Rep.ERR_INVALID),
        (Opt.INFO, info_request(), Rep.ACK),
        (Opt.STARTTLS, b"", Rep.ERR_POLICY),
    ]
    count = 10_000
    blob = b"".join(option_bytes(o, d) for o, d, _ in cycle) * (count // len(cycle))
    with connect(server).handshake() as client:
        sender = threading.Thread(target=client.send, args=(blob,), daemon=True)
        sender.start()
        for i in range(count):
            option, _, expected = cycle[i % len(cycle)]
            assert client.option_replies(option)[-1].type == expected, f"option #{i}"
        sender.join(TIMEOUT)
        client.go()
        roundtrip(client)
    after = memory(pid)
    print(f"storm of {count} options: RSS {before} -> {after}")
    assert after["VmHWM"] - before["VmRSS"] < 32, (before, after)
    assert_serves(server)


def test_abort_is_acknowledged_and_closes(server):
    with connect(server).handshake() as client:
        assert [r.type for r in client.option(Opt.ABORT)] == [Rep.ACK]
        assert client.wait_closed()
    assert_serves(server)


# Transmission: requests that close the connection -----------------------------------------


@pytest.mark.parametrize("magic", [0, 0x25609514, 0x67446698], ids=["zero", "off by one", "reply magic"])
def test_bad_request_magic_closes(server, mode, magic):
    with negotiate(server, mode) as client:
        roundtrip(client)
        client.send(client.request_bytes(Cmd.READ, 0, 512, magic=magic))
        assert client.wait_closed()
    assert_serves(server)


def test_write_header_of_1_gib_closes_without_allocating(server, mode):
    pid = server.proc.pid
    before = memory(pid)
    with negotiate(server, mode) as client:
        client.send(client.request_bytes(Cmd.WRITE, 0, 1 << 30))
        with contextlib.suppress(OSError):  # the server may close while the payload's first MiB goes
            client.send(bytes(MiB))
        assert client.wait_closed()
    after = memory(pid)
    print(f"WRITE header of 1 GiB: RSS {before} -> {after}")
    assert after["VmHWM"] - before["VmRSS"] < 64, (before, after)
    assert_serves(server)


# Transmission: requests refused with an error, the connection going on --------------------

# request (command, offset, length, flags), error with simple replies, error with structured replies.
REFUSED = {
    "unknown command": ((42, 0, 4096, 0), Err.EINVAL, Err.EINVAL),
    "READ beyond the end": ((Cmd.READ, SIZE - 512, 4096, 0), Err.EINVAL, Err.EINVAL),
    "READ at offset 2^63": ((Cmd.READ, 1 << 63, 512, 0), Err.EINVAL, Err.EINVAL),
    "READ above the maximum payload": ((Cmd.READ, 0, 33 * MiB, 0), Err.EOVERFLOW, Err.EOVERFLOW),
    "READ with REQ_ONE": ((Cmd.READ, 0, 4096, CmdFlag.REQ_ONE), Err.EINVAL, Err.EINVAL),
    "READ with DF": ((Cmd.READ, 0, 4096, CmdFlag.DF), Err.EINVAL, Err.OK),
    "READ with unknown flag": ((Cmd.READ, 0, 4096, 1 << 9), Err.EINVAL, Err.EINVAL),
    "WRITE beyond the end": ((Cmd.WRITE, SIZE - 512, 4096, 0), Err.ENOSPC, Err.ENOSPC),
    "WRITE of 40 MiB": ((Cmd.WRITE, 0, 40 * MiB, 0), Err.EINVAL, Err.EINVAL),
    "WRITE with FAST_ZERO": ((Cmd.WRITE, 0, 4096, CmdFlag.FAST_ZERO), Err.EINVAL, Err.EINVAL),
    "WRITE_ZEROES beyond the end": ((Cmd.WRITE_ZEROES, SIZE, 4096, 0), Err.ENOSPC, Err.ENOSPC),
    "TRIM beyond the end": ((Cmd.TRIM, SIZE - 4096, 8192, 0), Err.EINVAL, Err.EINVAL),
    "FLUSH with length": ((Cmd.FLUSH, 0, 4096, 0), Err.EINVAL, Err.EINVAL),
    "FLUSH with offset": ((Cmd.FLUSH, 4096, 0, 0), Err.EINVAL, Err.EINVAL),
    "BLOCK_STATUS without metadata context": ((Cmd.BLOCK_STATUS, 0, 4096, 0), Err.EINVAL, Err.EINVAL),
}


@pytest.mark.parametrize("request_, simple, structured", REFUSED.values(), ids=REFUSED.keys())
def test_refused_request(server, mode, request_, simple, structured):
    cmd, offset, length, flags = request_
    with negotiate(server, mode) as client:
        if cmd == Cmd.WRITE and length > 32 * MiB:
            assert client.block_size is None or client.block_size[2] < length
        client.request(cmd, offset, length, flags, payload=bytes(length) if cmd == Cmd.WRITE else b"")
        reply = client.read_reply()
        assert_error_reply(client, reply, structured if client.structured else simple, cmd)
        roundtrip(client)  # a refused WRITE's payload was consumed, not parsed as requests
    assert_serves(server)


READ_ONLY_WRITES = {
    "WRITE": (Cmd.WRITE, 0, 4096),
    "WRITE beyond the end": (Cmd.WRITE, SIZE - 512, 4096),
    "TRIM": (Cmd.TRIM, 0, 4096),
    "WRITE_ZEROES": (Cmd.WRITE_ZEROES, 0, 4096),
}


@pytest.mark.parametrize("cmd, offset, length", READ_ONLY_WRITES.values(), ids=READ_ONLY_WRITES.keys())
def test_write_to_read_only_export(ro_server, mode, cmd, offset, length):
    with negotiate(ro_server, mode) as client:
        assert client.flags & TRANSMISSION_READ_ONLY, "READ_ONLY not advertised"
        client.request(cmd, offset, length, payload=os.urandom(length) if cmd == Cmd.WRITE else b"")
        assert_error_reply(client, client.read_reply(), Err.EPERM, cmd)
        roundtrip(client, read_only=True)  # the refused payload was consumed
    assert_serves(ro_server, read_only=True)
    with open(ro_server.args[0], "rb") as f:
        assert f.read(4096) == bytes(4096)
        f.seek(SIZE - 512)
        assert f.read() == bytes(512)


@pytest.mark.parametrize("cmd", [Cmd.READ, Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES, Cmd.CACHE])
@pytest.mark.parametrize("offset", [0, SIZE], ids=["start", "end"])
def test_zero_length_request_succeeds(server, mode, cmd, offset):
    with negotiate(server, mode) as client:
        client.request(cmd, offset, 0)
        reply = client.read_reply()
        assert (reply.error, reply.data) == (Err.OK, b"")
        roundtrip(client)
    assert_serves(server)


def test_disc_answers_requests_in_flight(server, mode):
    count, size = 8, MiB
    old = [os.urandom(size) for _ in range(count)]
    new = [os.urandom(size) for _ in range(count)]
    with negotiate(server, mode) as client:
        for i, data in enumerate(old):  # known data for the READs below, written beforehand
            client.request(Cmd.WRITE, i * size, size, payload=data)
            assert client.read_reply().error == Err.OK
        blob = []
        for i in range(count):
            blob += [client.request_bytes(Cmd.WRITE, (16 + i) * size, size), new[i]]
            blob.append(client.request_bytes(Cmd.READ, i * size, size))
        blob.append(client.request_bytes(Cmd.DISC))
        outcome: list[BaseException | None] = []

        # Every request is sent before any reply is awaited (all are in flight when DISC comes), but the
        # replies are read meanwhile: a client that takes none makes the server stop reading (flow
        # control), and then neither side moves.
        def send() -> None:
            try:
                for piece in blob:  # each sendall with its own timeout, however slow the machine
                    client.send(piece)
            except BaseException as exc:
                outcome.append(exc)
            else:
                outcome.append(None)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        replies = {}
        try:
            for _ in range(2 * count):
                reply = client.read_reply()
                replies[reply.cookie] = reply
        finally:
            sender.join(TIMEOUT)
        assert outcome == [None], f"sending the requests: {outcome or 'still under way'}"
        assert client.wait_closed()
    reads = [r for r in replies.values() if r.data]
    assert all(r.error == Err.OK for r in replies.values())
    assert sorted(r.data for r in reads) == sorted(old)
    assert_serves(server)

    def written() -> list[bytes]:
        handle = nbd.NBD()
        handle.connect_uri(server.uri())
        try:
            return [handle.pread(size, (16 + i) * size) for i in range(count)]
        finally:
            handle.shutdown()

    assert call_with_timeout(written) == new


# Resource exhaustion -----------------------------------------------------------------------


def flood(server, mode: str, cmd: int, offset: int, length: int, count: int) -> tuple[RawClient, int]:
    """A client that pipelines ``count`` requests (or options) and never reads a reply."""
    client = connect(server).handshake() if mode == "options" else negotiate(server, mode)
    client.sock.settimeout(1)
    payload = bytes(length) if cmd == Cmd.WRITE and mode != "options" else b""
    sent = 0
    with contextlib.suppress(TimeoutError):  # the server stopped reading: that is the point
        while sent < count:
            n = 1 if payload else min(1000, count - sent)
            if mode == "options":
                client.send(option_bytes(cmd) * n)
            else:  # spread over the export, so that no queue has to keep many overlapping requests in order
                heads = (client.request_bytes(cmd, offset + (sent + j) * length % SIZE, length) for j in range(n))
                client.send(b"".join(head + payload for head in heads))
            sent += n
    return client, sent


# Per connection the server lets 256 MiB of requests be in flight (ServerConfig.max_inflight_bytes);
# allow one more maximum-size request (32 MiB) and 32 MiB for the interpreter on top of that.
FLOOD_BOUND = 256 + 32 + 32
# kind: (mode, command or option, offset, length, count)
FLOODS = {
    "READ 64KiB": ("go", Cmd.READ, 0, 64 * 1024, 20_000),
    "READ 1MiB": ("go", Cmd.READ, 0, MiB, 8192),
    "READ 32MiB": ("go", Cmd.READ, 0, 32 * MiB, 256),
    "refused READ": ("structured", Cmd.READ, 1 << 62, 4096, 1_000_000),
    "WRITE 32MiB": ("go", Cmd.WRITE, 0, 32 * MiB, 24),
    "READ 1MiB, extended headers": ("extended", Cmd.READ, 0, MiB, 8192),
    "WRITE 32MiB, extended headers": ("extended", Cmd.WRITE, 0, 32 * MiB, 24),
    "refused TRIM of 1 TiB, extended headers": ("extended", Cmd.TRIM, 0, 1 << 40, 1_000_000),
    "LIST options": ("options", Opt.LIST, 0, 0, 1_000_000),
}


@pytest.mark.parametrize("kind", FLOODS)
def test_client_not_reading_replies_memory_is_bounded(server, kind):
    pid = server.proc.pid
    before = memory(pid)
    client, sent = flood(server, *FLOODS[kind])
    try:
        peak = before["VmHWM"]
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and peak - before["VmRSS"] < FLOOD_BOUND:
            time.sleep(0.2)
            peak = memory(pid)["VmHWM"]
        print(f"{sent} x {kind} never answered: RSS {before['VmRSS']:.0f} MiB, peak {peak:.0f} MiB")
        assert peak - before["VmRSS"] < FLOOD_BOUND
    finally:
        client.close()
        server.kill()  # a flooded server may take long to finish its queue on SIGTERM


@pytest.mark.parametrize("kind", FLOODS)
def test_client_not_reading_replies_does_not_starve_others(server, kind):
    client, _ = flood(server, *FLOODS[kind])
    try:
        assert_serves(server)
        client.close()
        assert_serves(server)
    finally:
        client.close()
        server.kill()


def test_abandoned_write_payload_is_freed(server):
    pid = server.proc.pid
    fds, before = open_fds(pid), memory(pid)["VmRSS"]
    clients = [negotiate(server, "go") for _ in range(15)]  # 480 MiB: within the export's 512 MiB budget
    for client in clients:
        client.send(client.request_bytes(Cmd.WRITE, 0, 32 * MiB) + b"x")
    assert wait_for(lambda: memory(pid)["VmRSS"] - before > 15 * 30), "WRITE buffers were not allocated"
    for client in clients:
        client.close()
    assert wait_for(lambda: open_fds(pid) <= fds), "connections not released"
    assert_serves(server)
    wait_for(lambda: memory(pid)["VmRSS"] - before < 64, timeout=3)
    print(f"15 connections gone mid-WRITE of 32 MiB: RSS {before:.0f} -> {memory(pid)['VmRSS']:.0f} MiB")
    assert memory(pid)["VmRSS"] - before < 64


# The export's budget of bytes in flight (ServerConfig.max_export_inflight_bytes, 512 MiB) plus the
# one request that crosses it, and 32 MiB for the interpreter.
EXPORT_BOUND = 512 + 32 + 32


def test_stalled_writes_on_many_connections_are_bounded_by_the_export_budget(server):
    pid = server.proc.pid
    before = memory(pid)["VmRSS"]
    clients = [negotiate(server, "go") for _ in range(40)]  # 40 x 32 MiB would be 1.25 GiB
    try:
        for client in clients:
            client.send(client.request_bytes(Cmd.WRITE, 0, 32 * MiB) + b"x")
        wait_for(lambda: memory(pid)["VmHWM"] - before > EXPORT_BOUND, timeout=3)
        peak = memory(pid)["VmHWM"]
        print(f"40 connections each stalled in a 32 MiB WRITE: RSS {before:.0f} MiB, peak {peak:.0f} MiB")
        assert peak - before < EXPORT_BOUND
    finally:
        for client in clients:
            client.close()
    assert_serves(server)


def test_overlapping_writes_are_answered_in_time(server):
    """Two clients pipeline 4096 WRITEs each to the same 4 KiB; keeping them in order must stay cheap."""
    count, deadline = 4096, time.monotonic() + 10
    clients = [negotiate(server, "go") for _ in range(2)]
    try:
        for client in clients:
            blob = b"".join(client.request_bytes(Cmd.WRITE, 0, 4096) + bytes(4096) for _ in range(count))
            threading.Thread(target=client.send, args=(blob,), daemon=True).start()
        for client in clients:
            for i in range(count):
                assert client.read_reply().error == Err.OK
                assert time.monotonic() < deadline, f"only {i} of {count} WRITEs answered in 10 s"
        assert_serves(server)
    finally:
        for client in clients:
            client.close()
        server.kill()  # its queue may still hold thousands of WRITEs


def half_open(server, count: int) -> list[RawClient]:
    """``count`` connections stopped at every stage of ABANDONED, all greeted."""
    stages = list(ABANDONED.values())
    clients = [connect(server) for _ in range(count)]
    for i, client in enumerate(clients):
        client.send(stages[i % len(stages)])
        client.greeting()
    return clients


def test_many_half_open_connections(server):
    pid = server.proc.pid
    fds, before = open_fds(pid), memory(pid)
    clients = half_open(server, 200)
    assert wait_for(lambda: open_fds(pid) >= fds + len(clients))
    during = memory(pid)
    assert_serves(server)
    for i, client in enumerate(clients):
        if i % 2:
            client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()
    assert wait_for(lambda: open_fds(pid) <= fds), "connections not released"
    print(f"{len(clients)} half-open connections: RSS {before} -> {during}")
    assert during["VmHWM"] - before["VmRSS"] < 150
    assert_serves(server)


def test_half_open_connections_do_not_delay_shutdown(server):
    clients = half_open(server, 60)
    assert_serves(server)
    start = time.monotonic()
    returncode = server.stop(timeout=10)  # SIGTERM; SIGKILL (returncode -9) if it takes longer
    elapsed = time.monotonic() - start
    for client in clients:
        client.close()
    assert (returncode, elapsed < 5) == (0, True), f"exit {returncode} after {elapsed:.1f} s:\n{server.log_text()}"
