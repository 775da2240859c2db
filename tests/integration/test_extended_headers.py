"""Extended headers (32-byte requests and replies, 64-bit lengths and block status) with real
clients: libnbd 1.22's Python bindings, nbdinfo and qemu-img 10 from the Debian 13 chroot, and the
raw client for what they would not send.  The export is a sparse 16 GiB file, so that requests
and extents pass 4 GiB."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.conftest import scrape, value
from tests.integration.rawclient import Cmd, CmdFlag, Err, Opt, RawClient, Rep, meta_request, option_bytes
from tests.integration.test_bad_input import memory
from tests.integration.test_current_tools import inside
from tests.integration.test_merging import expected, write_stats

GiB, MiB = 1 << 30, 1 << 20
SIZE = 16 * GiB
HOLE_ZERO = 3  # base:allocation: a hole that reads as zeroes


@pytest.fixture
def big(tmp_path: Path) -> Path:
    """16 GiB, sparse: 1 MiB of data at 0, 5 GiB and 9 GiB + 4 KiB, holes elsewhere."""
    path = tmp_path / "big.img"
    with open(path, "wb") as f:
        f.truncate(SIZE)
        for offset in (0, 5 * GiB, 9 * GiB + 4096):
            f.seek(offset)
            f.write(os.urandom(MiB))
    return path


def file_map(path: Path) -> list[tuple[int, int, bool]]:
    """(offset, length, is data) of the file, from SEEK_DATA and SEEK_HOLE."""
    out: list[tuple[int, int, bool]] = []
    fd = os.open(path, os.O_RDONLY)
    try:
        size, pos = os.fstat(fd).st_size, 0
        while pos < size:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                data = size
            if data > pos:
                out.append((pos, data - pos, False))
                pos = data
                continue
            hole = os.lseek(fd, pos, os.SEEK_HOLE)
            out.append((pos, hole - pos, True))
            pos = hole
    finally:
        os.close(fd)
    return out


def negotiated(server, name: str = "") -> RawClient:
    """A raw client with extended headers and base:allocation."""
    client = RawClient(server.host, server.port).handshake()
    assert client.option(Opt.EXTENDED_HEADERS)[-1].type == Rep.ACK
    assert client.option(Opt.SET_META_CONTEXT, meta_request(name, ["base:allocation"]))[-1].type == Rep.ACK
    return client.go(name, extended=True)


# The option on the wire ----------------------------------------------------------------------


def test_structured_replies_after_extended_headers_are_refused_as_implied(server):
    with RawClient(server.host, server.port).handshake() as client:
        assert client.option(Opt.EXTENDED_HEADERS)[-1].type == Rep.ACK
        assert client.option(Opt.STRUCTURED_REPLY)[-1].type == Rep.ERR_EXT_HEADER_REQD
        client.go(extended=True)
        client.request(Cmd.READ, 0, 4096)
        assert client.read_reply().error == Err.OK


def test_export_name_after_extended_headers_hangs_up(server):
    with RawClient(server.host, server.port).handshake() as client:
        assert client.option(Opt.EXTENDED_HEADERS)[-1].type == Rep.ACK
        client.send(option_bytes(Opt.EXPORT_NAME, b""))
        assert client.wait_closed()
    kind = value(scrape(server.metrics_url), "nbdserver_protocol_errors_total", kind="export_name_extended")
    assert kind == 1


# 64-bit requests -------------------------------------------------------------------------------


def test_trim_and_zeroing_of_many_gib_hold_no_memory(start_server, big):
    server = start_server(big, "--processes", "1")
    before = memory(server.proc.pid)
    with negotiated(server) as client:
        client.request(Cmd.TRIM, 4 * GiB, 6 * GiB)  # the data at 5 GiB goes
        assert client.read_reply().error == Err.OK
        client.request(Cmd.WRITE_ZEROES, 8 * GiB, 8 * GiB)  # and the data at 9 GiB reads as zeroes
        assert client.read_reply().error == Err.OK
        client.request(Cmd.CACHE, 0, 12 * GiB)
        assert client.read_reply().error == Err.OK
        client.request(Cmd.BLOCK_STATUS, 0, SIZE)
        reply = client.read_reply()
        assert reply.error == Err.OK
        extents = reply.extents[1]
        assert extents[0][1] == 0 and extents[1] == (SIZE - extents[0][0], HOLE_ZERO)  # 16 GiB - 1 MiB: one
        client.request(Cmd.READ, 0, 5 * GiB)  # a transfer stays within the payload limit
        assert client.read_reply().error == Err.EOVERFLOW
        client.request(Cmd.READ, 9 * GiB + 4096, 4096)
        assert client.read_reply().data == bytes(4096)
    after = memory(server.proc.pid)
    assert after["VmHWM"] - before["VmRSS"] < 64, (before, after)
    assert file_map(big) == [(0, MiB, True), (MiB, SIZE - MiB, False)]


def test_block_status_past_4_gib_in_one_descriptor_with_req_one(start_server, big):
    server = start_server(big)
    with negotiated(server) as client:
        client.request(Cmd.BLOCK_STATUS, MiB, SIZE - MiB, CmdFlag.REQ_ONE)
        reply = client.read_reply()
        assert reply.error == Err.OK and reply.extents == {1: [(5 * GiB - MiB, HOLE_ZERO)]}


@pytest.mark.parametrize(
    "payload, error",
    [
        ((1).to_bytes(4, "big"), Err.OK),
        ((2).to_bytes(4, "big"), Err.EINVAL),  # a context not negotiated
        ((1).to_bytes(4, "big") * 2, Err.EINVAL),  # named twice
        (b"", Err.EINVAL),  # no context
    ],
    ids=["asked", "unknown", "twice", "none"],
)
def test_a_block_status_filter_gets_only_its_contexts_or_einval(start_server, big, payload, error):
    server = start_server(big)
    with negotiated(server) as client:
        assert client.flags & (1 << 12), "BLOCK_STATUS_PAYLOAD not advertised"
        body = (6 * GiB).to_bytes(8, "big") + payload
        client.request(Cmd.BLOCK_STATUS, 4 * GiB, len(body), CmdFlag.PAYLOAD_LEN, payload=body)
        reply = client.read_reply()
        assert reply.error == error, reply.message
        if not error:
            assert list(reply.extents) == [1]
            assert reply.extents[1][0] == (GiB, HOLE_ZERO)  # from 4 GiB to the data at 5 GiB
        client.request(Cmd.READ, 5 * GiB, 4096)  # the payload was taken, not parsed as requests
        with open(big, "rb") as f:
            f.seek(5 * GiB)
            assert client.read_reply().data == f.read(4096)


def test_a_payload_on_a_command_without_one_is_read_and_refused(server):
    with negotiated(server) as client:
        client.request(Cmd.TRIM, 0, 8192, CmdFlag.PAYLOAD_LEN, payload=bytes(8192))
        assert client.read_reply().error == Err.EINVAL
        data = os.urandom(4096)
        client.request(Cmd.WRITE, 0, 4096, payload=data)
        assert client.read_reply().error == Err.OK
        client.request(Cmd.READ, 0, 4096)
        assert client.read_reply().data == data


# libnbd 1.22 (its Python bindings, in the chroot) ------------------------------------------------

# Every command, with or without extended headers as asked, on the 16 GiB export.
LIBNBD_EVERY_COMMAND = """
import json, sys, nbd
uri, extended = sys.argv[1], sys.argv[2] == "1"
GiB, MiB = 1 << 30, 1 << 20
h = nbd.NBD()
h.set_request_extended_headers(extended)
h.add_meta_context("base:allocation")
h.connect_uri(uri)
out = {"extended": h.get_extended_headers_negotiated(), "structured": h.get_structured_replies_negotiated(),
       "payload": h.can_block_status_payload()}
data = bytes(range(256)) * 4096
h.pwrite(data, 5 * GiB + 512 * 1024, nbd.CMD_FLAG_FUA)
h.flush()
out["read"] = h.pread(len(data), 5 * GiB + 512 * 1024) == data
# (count, offset): counts past 4 GiB only with extended headers
h.trim(6 * GiB if extended else 2 * GiB, 9 * GiB)  # the data at 9 GiB goes
h.zero(5 * GiB if extended else GiB, 10 * GiB)
h.zero(64 * 1024, 5 * GiB + 2 * MiB, nbd.CMD_FLAG_NO_HOLE)
h.cache(8 * GiB if extended else GiB, 0)
seen = []
def flat(entries):  # block_status_64 gives (length, flags) pairs, block_status a flat list
    return [v for e in entries for v in (e if isinstance(e, tuple) else (e,))]
def status(context, offset, entries, err):
    seen.append([context, offset, flat(entries)])
    return 0
if extended:
    h.block_status_64(16 * GiB, 0, status)
else:
    h.block_status(4 * GiB - 4096, 0, status)
out["status"] = seen
if extended:
    filtered = []
    h.block_status_filter(4 * GiB, 4 * GiB, ["base:allocation"],
                          lambda c, o, e, err: filtered.append([c, o, flat(e)]) or 0)
    out["filtered"] = filtered
h.shutdown()
print(json.dumps(out))
"""


@pytest.mark.parametrize("extended", [True, False], ids=["extended", "compact"])
def test_libnbd_1_22_does_every_command(current_tools, start_server, big, extended):
    server = start_server(big)
    said = inside(current_tools, "python3", "-c", LIBNBD_EVERY_COMMAND, server.uri(), "1" if extended else "0")
    report = json.loads(said)
    assert report["extended"] is extended and report["structured"] is True
    assert report["payload"] is extended
    assert report["read"] is True
    [[context, offset, entries]] = report["status"]
    assert context == "base:allocation" and offset == 0
    lengths, flags = entries[::2], entries[1::2]
    expected = file_map(big)
    covered = 0
    for length, flag in zip(lengths, flags, strict=True):  # each descriptor agrees with the file
        pieces = [(o, n, d) for o, n, d in expected if o < covered + length and o + n > covered]
        assert all(d == (flag == 0) for _, _, d in pieces), (covered, length, flag, pieces)
        covered += length
    if extended:
        assert max(lengths) > 4 * GiB  # from the data at 5 GiB to the end: one hole
        [[name, _, described]] = report["filtered"]
        assert name == "base:allocation"
        assert described[:2] == [GiB, HOLE_ZERO] and described[3] == 0  # from 4 GiB: a hole, then the data
    with open(big, "rb") as f:
        f.seek(5 * GiB + 512 * 1024)
        assert f.read(MiB) == bytes(range(256)) * 4096


def test_nbdinfo_map_and_qemu_img_map_agree_with_the_files_holes(current_tools, start_server, big):
    server = start_server(big)
    data = [(o, n) for o, n, d in file_map(big) if d]
    nbdinfo = json.loads(inside(current_tools, "nbdinfo", "--map", "--json", server.uri()))
    assert [(e["offset"], e["length"]) for e in nbdinfo if e["type"] == 0] == data
    assert sum(e["length"] for e in nbdinfo) == SIZE
    qemu = json.loads(inside(current_tools, "qemu-img", "map", "--output=json", server.uri()))
    assert [(e["start"], e["length"]) for e in qemu if e["data"]] == data
    assert sum(e["length"] for e in qemu) == SIZE
    described = inside(current_tools, "nbdinfo", server.uri())
    assert "using extended packets" in described and "can_block_status_payload: true" in described


def test_qemu_io_10_writes_zeroes_and_discards_past_4_gib(current_tools, start_server, big):
    """At offsets past 4 GiB (qemu-io itself takes less than 2 GiB per command)."""
    server = start_server(big)
    commands = ["write -P 0x5a 12G 1M", "write -z 9G 1G", "discard 4G 1G", "read -P 0x5a 12G 1M", "read -P 0 9G 1M"]
    out = inside(current_tools, "qemu-io", "-f", "raw", *[a for c in commands for a in ("-c", c)], server.uri())
    assert "Pattern verification failed" not in out
    assert out.count("wrote") == 2 and out.count("read") == 2 and "discard" in out
    with open(big, "rb") as f:
        f.seek(12 * GiB)
        assert f.read(MiB) == b"\x5a" * MiB
        f.seek(9 * GiB + 4096)
        assert f.read(MiB) == bytes(MiB)


# Merging and durability, whatever the header form -----------------------------------------------

# Run by the chroot's python3: 256 adjacent 4k writes pipelined on one connection, then a flush.
# The server (argv[3], a PID: the chroot shares the host's) is stopped while they are sent, so that
# what it can merge does not depend on which process runs faster.
LIBNBD_PIPELINED_WRITES = """
import os, signal, sys, nbd
h = nbd.NBD()
h.set_request_extended_headers(sys.argv[2] == "1")
h.connect_uri(sys.argv[1])
assert h.get_extended_headers_negotiated() == (sys.argv[2] == "1")
os.kill(int(sys.argv[3]), signal.SIGSTOP)
try:
    for block in range(256):
        h.aio_pwrite(bytes([block % 251 + 1]) * 4096, block * 4096)
finally:
    os.kill(int(sys.argv[3]), signal.SIGCONT)
while h.aio_in_flight():
    h.poll(-1)
h.flush()
h.shutdown()
"""


@pytest.mark.parametrize("extended", [True, False], ids=["extended", "compact"])
def test_adjacent_writes_merge_in_either_form(current_tools, start_server, image, extended):
    server = start_server(image, "--processes", "1")
    flag = "1" if extended else "0"
    inside(current_tools, "python3", "-c", LIBNBD_PIPELINED_WRITES, server.uri(), flag, str(server.proc.pid))
    requests, submissions = write_stats(server)
    assert requests == 256 and submissions <= 256 // 4
    with open(image, "rb") as f:
        assert f.read(256 * 4096) == expected(range(256))
