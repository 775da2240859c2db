"""Gathering (serving/gathering.py) on a real TCP connection over loopback: the marks it sets on
the socket, what the kernel reports readable under them, and the clock that reads a gathering
the client falls short of."""

from __future__ import annotations

import asyncio
import select
import socket
import time
from collections.abc import Iterator

import pytest

from nbdserver.serving.gathering import MAX_MARK, MAX_REQUEST, MIN_DEPTH, SHARE, Gathering, clear_mark
from nbdserver.stats import ServerStats

REQUEST = 32  # bytes per request here: a READ's header with extended headers


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """(the server's end, the client's end) of a loopback TCP connection."""
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    listener.close()
    yield server, client
    server.close()
    client.close()


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def mark(sock: socket.socket) -> int:
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT)


def readable(sock: socket.socket) -> bool:
    return bool(select.select([sock], [], [], 0)[0])


def run_until_readable(loop: asyncio.AbstractEventLoop, sock: socket.socket, timeout: float = 10.0) -> float:
    """Run the loop (its timers) until the kernel reports ``sock`` readable; the seconds it took."""
    start = time.monotonic()
    while not readable(sock):
        assert time.monotonic() - start < timeout, "never readable"
        loop.run_until_complete(asyncio.sleep(0.001))
    return time.monotonic() - start


def receive(gathering: Gathering, sock: socket.socket) -> int:
    """Read what is there, as a connection would, and tell the gathering; the requests read."""
    data = sock.recv(4 << 20)
    gathering.taken(0, len(data), len(data) // REQUEST, time.monotonic())
    return len(data) // REQUEST


def send(sock: socket.socket, requests: int) -> None:
    sock.sendall(b"r" * REQUEST * requests)


def measured(server, client, loop, depth: int, stats: ServerStats) -> Gathering:
    """A gathering whose client was measured at ``depth`` requests without an answer."""
    gathering = Gathering(server, loop, stats, probe_after=1, probe_every=3600)
    send(client, 1)
    assert receive(gathering, server) == 1
    assert gathering.idle(), "a busy connection (probe_after=1) is measured"
    assert mark(server) == MAX_MARK
    send(client, depth)
    assert not readable(server), "fewer bytes than the mark: the kernel holds its report"
    run_until_readable(loop, server)  # the measurement's time ran out
    assert receive(gathering, server) == depth
    assert gathering.depth == depth
    return gathering


def test_a_busy_clients_depth_is_measured_once(pair, loop):
    server, client = pair
    stats = ServerStats()
    gathering = measured(server, client, loop, 10, stats)
    assert stats.gather_probes == 1
    # Too shallow to wait for, and not measured again before probe_every.
    for _ in range(3):
        assert not gathering.idle()
        assert mark(server) == 1
        send(client, 1)
        assert readable(server)
        receive(gathering, server)
    assert stats.gather_probes == 1 and stats.gather_waits == 0


def test_a_deep_client_is_read_once_a_share_of_its_queue_arrived(pair, loop):
    server, client = pair
    stats = ServerStats()
    depth = 2 * MIN_DEPTH
    gathering = measured(server, client, loop, depth, stats)
    share = depth // SHARE
    for _ in range(3):
        assert gathering.idle()
        assert gathering.idle(), "a second flush before the receive: the same gathering"
        assert mark(server) == share * REQUEST
        send(client, share - 1)
        assert not readable(server)
        send(client, 1)
        assert readable(server), "the mark met: readable at once"
        assert receive(gathering, server) == share
    assert gathering.depth == depth and stats.gather_waits == 3 and stats.gather_late == 0  # counted once each


def test_a_client_that_falls_short_is_read_when_the_time_is_up(pair, loop):
    server, client = pair
    stats = ServerStats()
    depth = 4 * MIN_DEPTH
    gathering = measured(server, client, loop, depth, stats)
    assert gathering.idle()
    send(client, 3)  # all it had left
    assert not readable(server)
    run_until_readable(loop, server)
    assert mark(server) == 1 and stats.gather_late == 1
    assert receive(gathering, server) == 3
    assert gathering.depth == depth // 2  # believed of it: what arrived, or half what it was
    assert gathering.idle()
    assert mark(server) == depth // 2 // SHARE * REQUEST


def test_a_receive_that_ends_inside_a_request_reads_the_rest_as_it_comes(pair, loop):
    server, client = pair
    stats = ServerStats()
    gathering = measured(server, client, loop, 2 * MIN_DEPTH, stats)
    assert gathering.idle() and mark(server) == MIN_DEPTH * REQUEST
    send(client, MIN_DEPTH)
    data = server.recv(MIN_DEPTH * REQUEST - 10)  # a request's last bytes left behind
    gathering.taken(0, len(data), MIN_DEPTH - 1, time.monotonic(), partial=True)
    assert mark(server) == 1 and readable(server)
    assert server.recv(100) == b"r" * 10


def test_large_requests_are_not_waited_for(pair, loop):
    server, _ = pair
    stats = ServerStats()
    gathering = Gathering(server, loop, stats, probe_after=1, probe_every=0)
    gathering.taken(0, MAX_REQUEST + REQUEST, 1, time.monotonic())
    assert not gathering.idle()
    assert mark(server) == 1 and stats.gather_probes == 0


def test_a_mark_left_on_the_socket_is_cleared_and_stop_clears_its_own(pair, loop):
    server, client = pair
    server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 5000)  # a crashed predecessor's
    stats = ServerStats()
    gathering = Gathering(server, loop, stats, probe_after=1, probe_every=0)
    assert mark(server) == 1
    send(client, 1)
    receive(gathering, server)
    assert gathering.idle() and mark(server) == MAX_MARK
    gathering.stop()  # handed to a successor
    assert mark(server) == 1
    send(client, 1)
    assert readable(server)
    loop.run_until_complete(asyncio.sleep(0.02))  # no timer left to run
    assert mark(server) == 1 and stats.gather_late == 0


def test_a_server_that_does_not_gather_clears_a_mark_left_on_a_socket(pair):
    server, client = pair
    server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 5000)
    send(client, 1)
    assert not readable(server)
    clear_mark(server)
    assert mark(server) == 1 and readable(server)
