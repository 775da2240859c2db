"""The flow of request bytes: a burst longer than the receive buffer arrives whole, and bytes in flight are bounded
per export (over the budget, every connection of the export stops taking requests)."""

from __future__ import annotations

import random
import threading

import pytest

from tests.conftest import MiB, scrape, value, wait_for
from tests.integration.rawclient import Cmd, RawClient

pytestmark = pytest.mark.bindings  # libnbd's Python bindings: run again by tests/in_current


def client(server) -> RawClient:
    return RawClient(server.host, server.port, timeout=10).handshake().go()


def test_bursts_longer_than_the_receive_buffer_arrive_whole(server):
    """Pipelined WRITEs sent in one go, then on another connection 20 000 pipelined READs (headers only, so that
    receives end inside headers): the receive buffers grow under them, and every byte is where it was written.
    The WRITEs mix sizes, so receives narrow under large payloads (received in place), take headers alone
    after payloads of 128 KiB and more, and widen again."""
    rng = random.Random(5)
    sizes = [rng.choice((512, 4096, 32_769, 65536, 65536 + 7, 131_072, 300_000, MiB)) for _ in range(120)]
    # Runs of one kind, each after the other kind.
    sizes += [4096] * 300 + [MiB] * 3 + [512] * 300 + [131_072] * 40 + [4096] * 100 + [300_000] * 10
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    payloads = [rng.randbytes(size) for size in sizes]
    written = b"".join(payloads)
    with client(server) as c:
        c.send(b"".join(c.request_bytes(Cmd.WRITE, o, len(p)) + p for o, p in zip(offsets, payloads, strict=True)))
        assert [c.read_reply().error for _ in sizes] == [0] * len(sizes)
    with client(server) as c:  # a new connection: its receive buffer starts small again
        reads = [rng.randrange(len(written) - 512) for _ in range(20_000)]
        headers = b"".join(c.request_bytes(Cmd.READ, offset, 512) for offset in reads)
        sender = threading.Thread(target=c.send, args=(headers,))  # replies are read meanwhile
        sender.start()
        replies = {reply.cookie: reply.data for reply in (c.read_reply() for _ in reads)}
        sender.join()
    assert [data for _, data in sorted(replies.items())] == [written[o : o + 512] for o in reads]


def test_export_budget_pauses_every_connection_until_it_frees(start_server, image):
    server = start_server(image, "--max-export-inflight", "8M")
    a, b, c = client(server), client(server), client(server)
    try:
        # Two WRITEs of 6 MiB, each with only part of its payload sent: 12 MiB held, over the 8 MiB budget.
        a.send(a.request_bytes(Cmd.WRITE, 0, 6 * MiB) + b"a" * MiB)
        b.send(b.request_bytes(Cmd.WRITE, 8 * MiB, 6 * MiB) + b"b" * MiB)
        # Both headers taken (the three sockets are read in whatever order they become ready).
        assert wait_for(lambda: value(scrape(server.metrics_url), "nbdserver_inflight_bytes", export="") == 12 * MiB)
        c.request(Cmd.READ, 0, 4096)
        c.sock.settimeout(1)
        with pytest.raises(TimeoutError):
            c.read_reply()  # a third connection is not served while the export is over its budget
        a.send(b"a" * (5 * MiB))  # A's WRITE completes: 6 MiB held, within the budget again
        c.sock.settimeout(10)
        assert a.read_reply().error == 0
        reply = c.read_reply()
        assert reply.error == 0 and reply.data == b"a" * 4096
        b.send(b"b" * (5 * MiB))
        assert b.read_reply().error == 0
        c.request(Cmd.READ, 8 * MiB, 4096)
        assert c.read_reply().data == b"b" * 4096
    finally:
        for raw in (a, b, c):
            raw.close()
