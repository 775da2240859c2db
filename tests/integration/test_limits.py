"""Who may connect, and how much one client may hold: address allow-lists, Unix socket modes,
the connection cap, handshake and idle timeouts, and the server-wide in-flight budget."""

from __future__ import annotations

import os
import re
import socket
import stat
import struct
import subprocess
import time
from pathlib import Path

import nbd
import pytest

from tests.conftest import MiB, make_image, scrape, value, wait_for
from tests.integration.rawclient import Closed, Cmd, Opt, RawClient, Rep, info_request, option_bytes

pytestmark = pytest.mark.bindings  # libnbd's Python bindings: run again by tests/in_current


def turned_away(server, reason: str) -> float:
    return value(scrape(server.metrics_url), "nbdserver_connections_turned_away_total", reason=reason)


def held(server) -> float:
    samples = scrape(server.metrics_url)
    return sum(value(samples, "nbdserver_inflight_bytes", export=e) for e in ("", "other"))


def exports_listed(c: RawClient) -> list[str]:
    c.send(option_bytes(Opt.LIST))
    names = []
    while (reply := c.read_option_reply()).type == Rep.SERVER:
        (length,) = struct.unpack(">I", reply.data[:4])
        names.append(reply.data[4 : 4 + length].decode())
    assert reply.type == Rep.ACK
    return names


def test_a_client_outside_the_allow_list_gets_errors_not_the_export_list(start_server, image):
    server = start_server(image, "--name", "private", "--description", "payroll", "--allow", "10.0.0.0/8+192.0.2.1")
    with RawClient(server.host, server.port) as c:
        c.handshake().expect_only_errors(Rep.ERR_POLICY, "private", hidden=(b"private", b"payroll"))
    assert turned_away(server, "not_allowed") == 1
    h = nbd.NBD()
    with pytest.raises(nbd.Error):
        h.connect_uri(server.uri("private"))


def test_each_export_may_have_its_own_allow_list(start_server, image, tmp_path):
    closed = make_image(tmp_path / "closed.img")
    server = start_server(
        image, "--name", "open", "--allow", "127.0.0.0/8", "--export", f"name=closed,path={closed},allow=10.1.2.0/24"
    )
    with RawClient(server.host, server.port) as c:
        c.handshake()
        assert exports_listed(c) == ["open"]  # the other one is not even named
        c.send(option_bytes(Opt.GO, info_request("closed")))
        assert c.read_option_reply().type == Rep.ERR_UNKNOWN
    h = nbd.NBD()
    h.connect_uri(server.uri("open"))
    assert h.get_size() == image.stat().st_size
    h.shutdown()


def test_ipv6_clients_match_ipv6_networks(start_server, image):
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        socket.create_server(("::1", 0), family=socket.AF_INET6).close()
    except OSError:
        pytest.skip("no ::1 here")
    server = start_server(image, "--listen", "[::1]:0", "--allow", "::1/128")
    h = nbd.NBD()
    h.connect_uri(server.uri())
    assert h.pread(4096, 0) == bytes(4096)
    h.shutdown()
    refused = start_server(image, "--listen", "[::1]:0", "--allow", "127.0.0.1")
    with pytest.raises(nbd.Error):
        nbd.NBD().connect_uri(refused.uri())


@pytest.mark.parametrize("mode", [None, "0600"])
def test_unix_sockets_are_created_with_the_asked_mode(start_server, image, tmp_path, mode):
    path = tmp_path / "nbd.sock"
    server = start_server(image, "--listen", f"unix:{path}", *(["--unix-socket-mode", mode] if mode else []))
    assert stat.S_IMODE(os.stat(path).st_mode) == (int(mode, 8) if mode else 0o660)
    h = nbd.NBD()
    h.connect_uri(server.uri())
    h.shutdown()


def test_connections_over_the_cap_are_closed_and_the_others_served(start_server, image):
    server = start_server(image, "--max-connections", "2")
    first, second = RawClient(server.host, server.port).handshake(), RawClient(server.host, server.port).handshake()
    try:
        third = RawClient(server.host, server.port, timeout=5)
        with pytest.raises(Closed):
            third.greeting()  # closed before any greeting
        third.close()
        assert turned_away(server, "max_connections") == 1
        first.go()
        first.request(Cmd.READ, 0, 4096)
        assert first.read_reply().error == 0
        second.close()
        assert wait_for(lambda: value(scrape(server.metrics_url), "nbdserver_connections_negotiating") == 0)
        h = nbd.NBD()
        h.connect_uri(server.uri())  # a place is free again
        h.shutdown()
    finally:
        first.close()
        second.close()


def test_a_client_silent_in_the_handshake_is_dropped(start_server, image):
    server = start_server(image, "--handshake-timeout", "1")
    with RawClient(server.host, server.port, timeout=10) as c:
        c.greeting()
        started = time.monotonic()
        assert c.wait_closed()
        assert 0.8 < time.monotonic() - started < 5
    assert turned_away(server, "handshake_timeout") == 1


def test_idle_connections_are_closed_busy_ones_kept(start_server, image):
    server = start_server(image, "--idle-timeout", "1")
    busy = RawClient(server.host, server.port, timeout=10).handshake().go()
    idle = RawClient(server.host, server.port, timeout=10).handshake().go()
    try:
        for _ in range(10):  # 2.5 s of requests, 0.25 s apart
            busy.request(Cmd.READ, 0, 4096)
            assert busy.read_reply().error == 0
            time.sleep(0.25)
        assert idle.wait_closed()
        busy.request(Cmd.READ, 0, 4096)
        assert busy.read_reply().error == 0
    finally:
        busy.close()
        idle.close()
    assert turned_away(server, "idle_timeout") == 1


def test_server_budget_pauses_connections_of_every_export(start_server, image, tmp_path):
    """Two exports, each within its own budget, together over the server's: a third client waits."""
    other = make_image(tmp_path / "other.img")
    server = start_server(image, "--export", f"name=other,path={other}", "--max-server-inflight", "8M")
    a = RawClient(server.host, server.port).handshake().go()
    b = RawClient(server.host, server.port).handshake().go("other")
    c = RawClient(server.host, server.port).handshake().go("other")
    try:
        a.send(a.request_bytes(Cmd.WRITE, 0, 6 * MiB) + b"a" * MiB)
        b.send(b.request_bytes(Cmd.WRITE, 0, 6 * MiB) + b"b" * MiB)
        assert wait_for(lambda: held(server) == 12 * MiB)
        c.request(Cmd.READ, 0, 4096)
        c.sock.settimeout(1)
        with pytest.raises(TimeoutError):
            c.read_reply()  # its export is within its budget, the server is not
        a.send(b"a" * (5 * MiB))
        c.sock.settimeout(10)
        assert a.read_reply().error == 0
        assert c.read_reply().error == 0
        b.send(b"b" * (5 * MiB))
        assert b.read_reply().error == 0
    finally:
        for raw in (a, b, c):
            raw.close()


def test_a_client_on_this_machine_gets_a_fixed_send_buffer(start_server, image):
    """Over loopback the server's socket has a send buffer of its own size, not the kernel's
    autotuned one (which let 1 MiB replies leave in bursts that loopback reordered)."""
    from nbdserver.serving.connection import LOOPBACK_SEND_BUFFER

    server = start_server(image)
    wmem_max = int(Path("/proc/sys/net/core/wmem_max").read_text())
    expected = 2 * min(LOOPBACK_SEND_BUFFER, wmem_max)  # the kernel doubles what it is given
    seen: list[str] = []

    def send_buffer() -> int | None:
        out = subprocess.run(
            ["ss", "-tmnH", "state", "established", f"( sport = :{server.port} )"], capture_output=True, text=True
        ).stdout
        seen.append(out)
        match = re.search(r"\btb(\d+)", out)
        return int(match.group(1)) if match else None

    with RawClient(server.host, server.port) as c:
        c.handshake().go("")
        c.request(Cmd.READ, 0, MiB)
        assert c.read_reply().error == 0
        assert wait_for(lambda: send_buffer() == expected), seen[-1]


def test_tcp_connections_carry_keepalive_probes(start_server, image):
    """A peer that vanishes without a FIN is found by keepalive after a minute idle, not never."""
    server = start_server(image)
    seen: list[str] = []

    def keepalive_armed() -> bool:
        out = subprocess.run(
            ["ss", "-tnoH", "state", "established", f"( sport = :{server.port} )"], capture_output=True, text=True
        ).stdout
        seen.append(out)
        # ss rounds down: a timer of 60 s shows as "1min" or, a moment later, as 59, 58... seconds.
        match = re.search(r"timer:\(keepalive,(?:(1)min|(\d+)sec)", out)
        return bool(match) and (match.group(1) is not None or 50 <= int(match.group(2)) <= 59)

    with RawClient(server.host, server.port) as c:
        c.greeting()
        assert wait_for(keepalive_armed), seen[-1]
