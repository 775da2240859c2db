"""Hostile clients on raw sockets, beyond single malformed messages: every command with every flag
combination, thousands of half-open connections, and random byte streams in the transmission
phase.  After each, the same server process serves a well-behaved client, and its peak RSS stays
within a stated bound of where it started.
"""

from __future__ import annotations

import functools
import itertools
import os
import random
import socket
import struct
import time

import pytest

from tests.conftest import wait_for
from tests.integration.rawclient import REQUEST_MAGIC, Closed, Cmd, CmdFlag, Err
from tests.integration.test_bad_input import assert_serves, memory, negotiate, open_fds, roundtrip
from tests.integration.test_limits import turned_away

MiB = 1 << 20
RSS_BOUND = 64  # MiB of peak RSS above the start, for every test here

# Flags each command takes (NBD spec): FUA on every command once SEND_FUA is advertised, DF on READ
# with structured replies, NO_HOLE and FAST_ZERO on WRITE_ZEROES, REQ_ONE on BLOCK_STATUS.
# PAYLOAD_LEN belongs to extended headers, never negotiated here.
ALLOWED = {
    Cmd.READ: CmdFlag.FUA | CmdFlag.DF,
    Cmd.WRITE: CmdFlag.FUA,
    Cmd.FLUSH: CmdFlag.FUA,
    Cmd.TRIM: CmdFlag.FUA,
    Cmd.CACHE: CmdFlag.FUA,
    Cmd.WRITE_ZEROES: CmdFlag.FUA | CmdFlag.NO_HOLE | CmdFlag.FAST_ZERO,
    Cmd.BLOCK_STATUS: CmdFlag.FUA | CmdFlag.REQ_ONE,
}
COMMANDS = [Cmd.READ, Cmd.WRITE, Cmd.FLUSH, Cmd.TRIM, Cmd.CACHE, Cmd.WRITE_ZEROES, Cmd.BLOCK_STATUS, 8, 9, 0xFFFF]
FLAG_SETS = [sum(bits) for n in range(7) for bits in itertools.combinations([1 << b for b in range(6)], n)]
FLAG_SETS += [1 << 7, 1 << 15, 0xFFFF]
WHERE = 2 * MiB  # these requests stay in [2 MiB, 2 MiB + 4 KiB)


def expected_error(cmd: int, flags: int, structured: bool) -> int:
    if cmd not in ALLOWED:
        return Err.EINVAL
    allowed = int(ALLOWED[cmd])  # plain ints: ~ on an IntFlag flips only its defined bits
    if not structured:
        allowed &= ~int(CmdFlag.DF)
    if flags & ~allowed:
        return Err.EINVAL
    if cmd == Cmd.FLUSH or cmd == Cmd.BLOCK_STATUS:  # FLUSH takes no range; no metadata context here
        return Err.EINVAL
    return Err.OK


@pytest.mark.parametrize("mode", ["export_name", "go", "structured"])
def test_every_command_with_every_flag_combination(server, mode):
    pid = server.proc.pid
    before = memory(pid)
    sent = 0
    with negotiate(server, mode) as client:
        for cmd in COMMANDS:
            batch = {}
            for flags in FLAG_SETS:
                header = client.request_bytes(cmd, WHERE, 4096, flags)
                client.send(header + (os.urandom(4096) if cmd == Cmd.WRITE else b""))
                batch[struct.unpack_from(">Q", header, 8)[0]] = (cmd, flags)
                sent += 1
            for _ in range(len(batch)):  # one reply each, in whatever order they complete
                reply = client.read_reply()
                cmd_, flags = batch.pop(reply.cookie)
                want = expected_error(cmd_, flags, client.structured)
                assert reply.error == want, f"command {cmd_} flags {flags:#x}: {reply.error} ({reply.message!r})"
        roundtrip(client)
    after = memory(pid)
    print(f"{sent} requests, every command x flags: RSS {before} -> {after}")
    assert after["VmHWM"] - before["VmRSS"] < RSS_BOUND
    assert_serves(server)


def test_thousands_of_half_open_connections_are_capped_and_reaped(start_server, image):
    # The cap is low enough to be reached at any connect rate before the first handshake times out.
    server = start_server(image, "--max-connections", "200", "--handshake-timeout", "10")
    pid = server.proc.pid
    fds, before = open_fds(pid), memory(pid)
    sockets, most_fds = [], 0
    started = time.monotonic()
    try:
        for i in range(2500):  # connect and never answer the greeting
            sockets.append(socket.create_connection((server.host, server.port), timeout=30))
            if i % 100 == 0:
                most_fds = max(most_fds, open_fds(pid))
        took = time.monotonic() - started
        most_fds = max(most_fds, open_fds(pid))
        during = memory(pid)
        turned = functools.partial(turned_away, server)
        # Every one ends: closed on arrival past the cap, or dropped by the handshake timeout.
        assert wait_for(lambda: turned("max_connections") + turned("handshake_timeout") >= 2500, timeout=30)
        assert turned("max_connections") >= 1, f"the cap was never reached ({took:.1f} s to connect)"
        # Each process logs a few of them a period (and then how many it left out): not a line per client.
        lines = [line for line in server.log if "turned away" in line]
        assert len(lines) < 250, lines[-5:]
        assert most_fds <= fds + 200 + 16, most_fds  # the cap holds
        assert wait_for(lambda: open_fds(pid) <= fds, timeout=10)
        print(
            f"2500 half-open connections in {took:.1f} s, cap 200: {turned('max_connections'):.0f} closed on arrival,"
            f" {turned('handshake_timeout'):.0f} timed out; most fds {most_fds - fds}; RSS {before} -> {during}"
        )
        assert during["VmHWM"] - before["VmRSS"] < RSS_BOUND
        assert_serves(server)
    finally:
        for sock in sockets:
            sock.close()


def _random_stream(rng: random.Random, size: int) -> bytes:
    """Transmission-phase bytes: well-formed headers with random fields, payloads, and garbage."""
    out = bytearray()
    while len(out) < size:
        kind = rng.random()
        if kind < 0.6:
            cmd = rng.choice([*COMMANDS, Cmd.DISC] if rng.random() < 0.02 else COMMANDS)
            length = rng.choice([0, 1, 512, 4096, 65536, rng.randrange(1 << 26)])
            offset = rng.choice([0, 4096, WHERE, rng.randrange(1 << 64)])
            flags = rng.choice(FLAG_SETS)
            out += struct.pack(">IHHQQI", REQUEST_MAGIC, flags, cmd, rng.randrange(1 << 64), offset, length)
            if cmd == Cmd.WRITE and rng.random() < 0.9:
                out += rng.randbytes(min(length, 1 << 16))  # often shorter than announced
        elif kind < 0.9:
            out += rng.randbytes(rng.randrange(1, 64))
        else:
            out += struct.pack(">I", REQUEST_MAGIC) + rng.randbytes(rng.randrange(0, 24))  # a torn header
    return bytes(out)


def test_random_transmission_streams_never_hurt_the_server(server):
    pid = server.proc.pid
    before = memory(pid)
    rng = random.Random(9)
    started, streams, sent = time.monotonic(), 0, 0
    while streams < 300 or time.monotonic() - started < 5:
        with negotiate(server, rng.choice(["export_name", "go", "structured"])) as client:
            data = _random_stream(rng, rng.choice([64, 1024, 65536, 1 << 20]))
            client.sock.settimeout(2)
            try:
                client.send(data)
                client.sock.shutdown(socket.SHUT_WR)
                client.wait_closed()  # replies, then the server closes (or has already)
            except (OSError, Closed, TimeoutError):
                pass
            streams, sent = streams + 1, sent + len(data)
        if streams % 50 == 0:
            assert server.proc.poll() is None
    after = memory(pid)
    print(f"{streams} random streams, {sent // MiB} MiB: RSS {before} -> {after}")
    assert after["VmHWM"] - before["VmRSS"] < RSS_BOUND
    assert_serves(server)
