"""Plugging and merging through a real server, seen from real clients and the server's own counters."""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import signal

import nbd
import pytest

pytestmark = pytest.mark.bindings  # libnbd's Python bindings: run again by tests/in_current

KiB = 1024
BLOCK = 4 * KiB


def write_stats(server) -> tuple[int, int]:
    """(requests, submissions) of WRITE from the counters the server logs at shutdown."""
    assert server.stop() == 0, server.log_text()
    match = re.search(r"WRITE (\d+) requests in (\d+) submissions", server.log_text())
    assert match, server.log_text()
    return int(match.group(1)), int(match.group(2))


def connect(server) -> nbd.NBD:
    h = nbd.NBD()
    h.connect_uri(server.uri())
    return h


def pipeline_writes(
    handles: list[nbd.NBD], blocks: list[list[int]], fua: frozenset[int] = frozenset(), paused=None
) -> None:
    """Send every handle's writes without waiting, then wait for all replies; each must succeed.
    With ``paused`` (a server), it is stopped while they are sent: how much the server finds waiting
    in one read, and so what it can merge, does not depend on which process runs faster."""
    errors: list[int] = []

    def completed(error) -> int:
        if error.value:
            errors.append(error.value)
        return 1  # retire the command

    # Round-robin over the handles, so that their streams reach the server together.
    with paused.paused() if paused else contextlib.nullcontext():
        for step in itertools.zip_longest(*blocks):
            for h, block in zip(handles, step, strict=True):
                if block is not None:
                    flags = nbd.CMD_FLAG_FUA if block in fua else 0
                    h.aio_pwrite(bytes([block % 251 + 1]) * BLOCK, block * BLOCK, completion=completed, flags=flags)
    for h in handles:
        while h.aio_in_flight():
            h.poll(-1)
    assert errors == []


def expected(blocks: range) -> bytes:
    return b"".join(bytes([b % 251 + 1]) * BLOCK for b in blocks)


@pytest.mark.parametrize("merge", [True, False], ids=["merge", "no-merge"])
def test_adjacent_writes_on_one_connection(start_server, image, merge):
    server = start_server(image, *([] if merge else ["--no-merge"]))
    h = connect(server)
    pipeline_writes([h], [list(range(256))], paused=server)
    assert h.pread(256 * BLOCK, 0) == expected(range(256))
    h.shutdown()
    requests, submissions = write_stats(server)
    assert requests == 256
    if merge:
        assert submissions <= 256 // 4, "pipelined adjacent writes should share submissions"
    else:
        assert submissions == 256
    assert image.read_bytes()[: 256 * BLOCK] == expected(range(256))


def test_merging_across_connections(start_server, image):
    """Even blocks come from one connection, odd ones from another: any merge joins both (in one
    process: worker processes merge only the requests of the connections each serves)."""
    server = start_server(image, "--processes", "1")
    a, b = connect(server), connect(server)
    rounds = 0
    while rounds < 10:
        base = rounds * 512
        pipeline_writes([a, b], [list(range(base, base + 512, 2)), list(range(base + 1, base + 512, 2))], paused=server)
        rounds += 1
        assert a.pread(512 * BLOCK, base * BLOCK) == expected(range(base, base + 512))
    a.shutdown()
    b.shutdown()
    requests, submissions = write_stats(server)
    assert requests == rounds * 512
    assert submissions < requests, "no write from one connection was merged with one from the other"


def test_acknowledged_writes_survive_sigkill(start_server, image):
    """Merged or not, a write is in the backing file before its reply (FUA ones durable too)."""
    server = start_server(image)
    h = connect(server)
    blocks = list(range(0, 512))
    pipeline_writes([h], [blocks], fua=frozenset(blocks[::7]))
    h.flush()
    os.kill(server.proc.pid, signal.SIGKILL)
    server.proc.wait(10)
    assert image.read_bytes()[: 512 * BLOCK] == expected(range(512))
