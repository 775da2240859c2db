"""End-to-end tests with the libnbd client against a real server process."""

from __future__ import annotations

import contextlib
import errno
import random
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nbd
import pytest

from tests.conftest import IMAGE_SIZE, make_image, needs_ipv6_loopback

pytestmark = pytest.mark.bindings  # libnbd's Python bindings: run again by tests/in_current

KiB = 1024
MiB = 1024 * KiB
MAX_PAYLOAD = 32 * MiB
HOLE_ZERO = nbd.STATE_HOLE | nbd.STATE_ZERO
END = IMAGE_SIZE


def pattern(length: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(length)


# libnbd 1.18 and later ask for extended headers unless told not to: there, both header forms.
HEADER_FORMS = ["extended", "compact"] if hasattr(nbd.NBD, "set_request_extended_headers") else ["compact"]


@pytest.fixture(params=HEADER_FORMS)
def header_form(request) -> str:
    return request.param


@pytest.fixture
def connect(header_form: str):
    """Factory: ``connect(uri, ...)`` opens a libnbd handle; every handle is disconnected at teardown."""
    handles: list[nbd.NBD] = []

    def open_handle(
        uri: str | None = None,
        *,
        structured: bool = True,
        strict: bool = True,
        opt_mode: bool = False,
        full_info: bool = False,
    ) -> nbd.NBD:
        h = nbd.NBD()
        handles.append(h)
        h.set_request_structured_replies(structured)
        if structured:
            h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
        if not strict:
            h.set_strict_mode(0)
        h.set_opt_mode(opt_mode)
        h.set_full_info(full_info)
        if header_form == "compact" and hasattr(h, "set_request_extended_headers"):
            h.set_request_extended_headers(False)
        if uri is not None:
            h.connect_uri(uri)
            if header_form == "extended" and structured:
                assert h.get_extended_headers_negotiated()
        return h

    yield open_handle
    for h in handles:
        if h.aio_is_ready() or h.aio_is_processing() or h.aio_is_negotiating():
            with contextlib.suppress(nbd.Error):  # the server may already be gone
                h.shutdown()
    handles.clear()


@pytest.fixture(params=[True, False], ids=["structured", "simple"])
def structured(request) -> bool:
    return request.param


def extents(h: nbd.NBD, count: int, offset: int, flags: int = 0) -> list[tuple[int, int, int]]:
    """``block_status`` as (offset, length, flags) triples of base:allocation."""
    entries: list[int] = []

    def collect(metacontext, _offset, descriptors, _error):
        assert metacontext == nbd.CONTEXT_BASE_ALLOCATION
        entries.extend(descriptors)

    h.block_status(count, offset, collect, flags)
    out, pos = [], offset
    for length, state in zip(entries[::2], entries[1::2], strict=True):
        out.append((pos, length, state))
        pos += length
    return out


def state_at(h: nbd.NBD, offset: int) -> int:
    return extents(h, 1, offset, nbd.CMD_FLAG_REQ_ONE)[0][2]


def read_chunks(h: nbd.NBD, count: int, offset: int, flags: int = 0) -> tuple[bytes, list[tuple[int, int, int]]]:
    """``pread_structured``: the data and its chunks as (offset, length, status)."""
    chunks: list[tuple[int, int, int]] = []

    def chunk(subbuf, chunk_offset, status, _error):
        chunks.append((chunk_offset, len(subbuf), status))

    data = h.pread_structured(count, offset, chunk, flags)
    return bytes(data), sorted(chunks)


def expect_errno(errnum: int, call, *args) -> None:
    with pytest.raises(nbd.Error) as info:
        call(*args)
    assert info.value.errnum == errnum, str(info.value)


def assert_alive(h: nbd.NBD, offset: int = 3 * MiB) -> None:
    data = pattern(4 * KiB, offset)
    h.pwrite(data, offset)
    assert h.pread(len(data), offset) == data


# Capabilities ---------------------------------------------------------------------------


def test_writable_export_capabilities(server, image, connect):
    h = connect(server.uri())
    assert not h.is_read_only()
    for can in (h.can_flush, h.can_fua, h.can_trim, h.can_zero, h.can_fast_zero, h.can_cache, h.can_multi_conn):
        assert can(), can.__name__
    assert h.can_df()
    assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    assert h.get_structured_replies_negotiated()
    assert h.get_size() == image.stat().st_size == IMAGE_SIZE
    assert h.get_block_size(nbd.SIZE_MAXIMUM) == MAX_PAYLOAD


def test_size_of_odd_sized_file(start_server, tmp_path, connect):
    path = tmp_path / "odd.img"
    content = pattern(MiB + 511, 7)
    path.write_bytes(content)
    h = connect(start_server(path).uri())
    assert h.get_size() == len(content)
    assert h.pread(1000, len(content) - 1000) == content[-1000:]


def test_simple_replies(server, connect):
    h = connect(server.uri(), structured=False)
    assert not h.get_structured_replies_negotiated()
    assert not h.can_df()
    assert not h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    data = pattern(300 * KiB, 1)
    h.pwrite(data, 12345)
    assert h.pread(len(data), 12345) == data
    assert h.pread(4 * KiB, 40 * MiB) == bytes(4 * KiB)  # a hole reads as zeroes


# Reads and writes ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("offset", "length"),
    [
        (0, 1),
        (1, 1),
        (4095, 2),
        (12345, 7777),
        (MiB + 3, MiB),
        (IMAGE_SIZE - 1, 1),
        (IMAGE_SIZE - 64 * KiB, 64 * KiB),
        (17, MAX_PAYLOAD),
    ],
)
def test_write_then_read(server, connect, structured, offset, length):
    h = connect(server.uri(), structured=structured)
    data = pattern(length, offset)
    h.pwrite(data, offset)
    assert h.pread(length, offset) == data
    # The bytes on either side are untouched.
    if offset:
        assert h.pread(1, offset - 1) == b"\0"
    if offset + length < IMAGE_SIZE:
        assert h.pread(1, offset + length) == b"\0"


def test_fua_write_lands_in_file(server, image, connect):
    h = connect(server.uri())
    data = pattern(100 * KiB, 2)
    h.pwrite(data, 5 * MiB + 1, nbd.CMD_FLAG_FUA)
    with open(image, "rb") as f:
        f.seek(5 * MiB + 1)
        assert f.read(len(data)) == data


def test_flushed_writes_land_in_file(server, image, connect):
    h = connect(server.uri())
    writes = {
        offset: pattern(length, offset)
        for offset, length in [(0, 1), (4097, 5000), (9 * MiB - 3, MiB), (END - 999, 999)]
    }
    for offset, data in writes.items():
        h.pwrite(data, offset)
    h.flush()
    content = image.read_bytes()
    for offset, data in writes.items():
        assert content[offset : offset + len(data)] == data
    assert content.count(0) == IMAGE_SIZE - sum(len(d) - d.count(0) for d in writes.values())


def test_cache_leaves_data_alone(server, connect):
    h = connect(server.uri())
    data = pattern(MiB, 3)
    h.pwrite(data, 2 * MiB)
    h.cache(4 * MiB, MiB)
    h.cache(1, IMAGE_SIZE - 1)
    assert h.pread(MiB, 2 * MiB) == data


def test_pread_df_sends_one_data_chunk(server, connect):
    h = connect(server.uri())
    assert h.can_df()
    h.pwrite(pattern(4 * KiB, 4), 64 * KiB)
    data, chunks = read_chunks(h, 256 * KiB, 0, nbd.CMD_FLAG_DF)
    assert chunks == [(0, 256 * KiB, nbd.READ_DATA)]
    assert data == bytes(64 * KiB) + pattern(4 * KiB, 4) + bytes(188 * KiB)


def test_pread_of_holes_sends_hole_chunks(server, connect):
    h = connect(server.uri())
    written = pattern(64 * KiB, 5)
    h.pwrite(written, MiB)
    data, chunks = read_chunks(h, 256 * KiB, MiB - 64 * KiB)
    assert data == bytes(64 * KiB) + written + bytes(128 * KiB)
    assert chunks == [
        (MiB - 64 * KiB, 64 * KiB, nbd.READ_HOLE),
        (MiB, 64 * KiB, nbd.READ_DATA),
        (MiB + 64 * KiB, 128 * KiB, nbd.READ_HOLE),
    ]
    _, chunks = read_chunks(h, 1000, 30 * MiB + 5)  # all hole, unaligned
    assert chunks == [(30 * MiB + 5, 1000, nbd.READ_HOLE)]


def test_data_between_zero_bytes_is_sent_as_data(server, connect):
    """A block whose first and last bytes are zero is looked at whole before it is called a hole."""
    h = connect(server.uri())
    block = bytearray(4 * KiB)
    block[2048] = 1
    h.pwrite(bytes(block), 2 * MiB)
    data, chunks = read_chunks(h, 4 * KiB, 2 * MiB)
    assert data == block
    assert chunks == [(2 * MiB, 4 * KiB, nbd.READ_DATA)]
    data, chunks = read_chunks(h, 128 * KiB, 2 * MiB - 64 * KiB)
    assert data == bytes(64 * KiB) + block + bytes(60 * KiB)
    assert chunks == [
        (2 * MiB - 64 * KiB, 64 * KiB, nbd.READ_HOLE),
        (2 * MiB, 4 * KiB, nbd.READ_DATA),
        (2 * MiB + 4 * KiB, 60 * KiB, nbd.READ_HOLE),
    ]


# Trim, zero, block status ----------------------------------------------------------------


@pytest.mark.parametrize("flags", [0, nbd.CMD_FLAG_FUA], ids=["plain", "fua"])
def test_trim_then_reads_zero(server, image, connect, flags):
    h = connect(server.uri())
    h.pwrite(pattern(2 * MiB, 6), MiB)
    assert state_at(h, 2 * MiB) == 0
    h.trim(MiB, MiB + 64 * KiB, flags)
    assert h.pread(MiB, MiB + 64 * KiB) == bytes(MiB)
    assert h.pread(64 * KiB, MiB) == pattern(2 * MiB, 6)[: 64 * KiB]
    assert state_at(h, 2 * MiB) == HOLE_ZERO
    h.flush()
    with open(image, "rb") as f:
        f.seek(MiB + 64 * KiB)
        assert f.read(MiB) == bytes(MiB)


@pytest.mark.parametrize(
    "flags",
    [0, nbd.CMD_FLAG_NO_HOLE, nbd.CMD_FLAG_FUA, nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FUA],
    ids=["plain", "no-hole", "fua", "no-hole-fua"],
)
def test_zero(server, connect, structured, flags):
    h = connect(server.uri(), structured=structured)
    data = pattern(MiB, 8)
    h.pwrite(data, 4 * MiB)
    h.zero(300 * KiB + 3, 4 * MiB + 100 * KiB + 1, flags)
    expected = data[: 100 * KiB + 1] + bytes(300 * KiB + 3) + data[400 * KiB + 4 :]
    assert h.pread(MiB, 4 * MiB) == expected


@pytest.mark.parametrize(
    "flags",
    [nbd.CMD_FLAG_FAST_ZERO, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE],
    ids=["fast", "fast-no-hole"],
)
def test_fast_zero(server, connect, flags):
    h = connect(server.uri())
    data = pattern(MiB, 9)
    h.pwrite(data, 6 * MiB)
    try:
        h.zero(512 * KiB, 6 * MiB + 256 * KiB, flags)
    except nbd.Error as exc:
        assert exc.errnum == errno.ENOTSUP, str(exc)
        assert h.pread(MiB, 6 * MiB) == data  # refused: nothing changed
    else:
        assert h.pread(MiB, 6 * MiB) == data[: 256 * KiB] + bytes(512 * KiB) + data[768 * KiB :]


def test_block_status_of_sparse_and_written_image(server, connect):
    h = connect(server.uri())
    assert extents(h, IMAGE_SIZE, 0) == [(0, IMAGE_SIZE, HOLE_ZERO)]
    h.pwrite(pattern(64 * KiB, 10), MiB)
    status = extents(h, 4 * MiB, 0)
    assert sum(length for _, length, _ in status) == 4 * MiB
    assert status == [(0, MiB, HOLE_ZERO), (MiB, 64 * KiB, 0), (MiB + 64 * KiB, 3 * MiB - 64 * KiB, HOLE_ZERO)]


@pytest.mark.parametrize(
    ("offset", "count"), [(0, IMAGE_SIZE), (MiB - 4 * KiB, 8 * KiB), (MiB + 1, 100), (5, 10 * MiB)]
)
def test_block_status_req_one(server, connect, offset, count):
    h = connect(server.uri())
    h.pwrite(pattern(64 * KiB, 11), MiB)
    status = extents(h, count, offset, nbd.CMD_FLAG_REQ_ONE)
    assert len(status) == 1
    (start, length, state) = status[0]
    assert 0 < length <= count
    assert state == (0 if MiB <= start < MiB + 64 * KiB else HOLE_ZERO)


# Errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "expected"),
    [
        pytest.param(lambda h: h.pread(2, END - 1), errno.EINVAL, id="read-past-end"),
        pytest.param(lambda h: h.pread(1, END), errno.EINVAL, id="read-at-end"),
        pytest.param(lambda h: h.pwrite(b"ab", END - 1), errno.ENOSPC, id="write-past-end"),
        pytest.param(lambda h: h.pwrite(pattern(MiB), END + MiB), errno.ENOSPC, id="big-write-past-end"),
        pytest.param(lambda h: h.zero(2, END - 1), errno.ENOSPC, id="zero-past-end"),
        pytest.param(lambda h: h.trim(2, END - 1), errno.EINVAL, id="trim-past-end"),
        pytest.param(lambda h: h.cache(2, END - 1), errno.EINVAL, id="cache-past-end"),
        pytest.param(lambda h: h.pread(MAX_PAYLOAD + 1, 0), errno.EOVERFLOW, id="read-too-long"),
        pytest.param(lambda h: h.pwrite(bytes(MAX_PAYLOAD + 1), 0), errno.EINVAL, id="write-too-long"),
        pytest.param(lambda h: h.pwrite(b"x", 0, nbd.CMD_FLAG_DF), errno.EINVAL, id="write-with-read-flag"),
        pytest.param(lambda h: h.zero(9, 0, nbd.CMD_FLAG_REQ_ONE), errno.EINVAL, id="zero-with-status-flag"),
    ],
)
def test_bad_request_fails_and_connection_survives(server, connect, structured, call, expected):
    h = connect(server.uri(), structured=structured, strict=False)
    expect_errno(expected, call, h)
    assert_alive(h)
    expect_errno(expected, call, h)
    assert_alive(h, 7 * MiB)


def test_block_status_past_end_fails(server, connect):
    h = connect(server.uri(), strict=False)
    expect_errno(errno.EINVAL, extents, h, 2, END - 1)
    assert_alive(h)


# Disconnect -------------------------------------------------------------------------------


def test_shutdown_answers_requests_in_flight(server, connect):
    h = connect(server.uri())
    buffers = [nbd.Buffer.from_bytearray(bytearray(pattern(64 * KiB, i))) for i in range(32)]
    cookies = [h.aio_pwrite(buf, i * 64 * KiB) for i, buf in enumerate(buffers)]
    h.shutdown()
    while h.aio_in_flight():
        h.poll(-1)
    assert all(h.aio_command_completed(cookie) for cookie in cookies)
    with pytest.raises(nbd.Error):
        h.pread(1, 0)
    other = connect(server.uri())
    assert other.pread(32 * 64 * KiB, 0) == b"".join(pattern(64 * KiB, i) for i in range(32))
    assert server.logged("disconnected"), server.log_text()


def test_server_stop_flushes_and_exits_cleanly(server, image, connect):
    h = connect(server.uri())
    data = pattern(3 * MiB, 14)
    h.pwrite(data, 11 * MiB)
    assert server.stop() == 0
    with pytest.raises(nbd.Error):
        h.pread(1, 0)
    with open(image, "rb") as f:
        f.seek(11 * MiB)
        assert f.read(len(data)) == data


# Concurrency ------------------------------------------------------------------------------


def test_many_requests_in_flight_on_one_handle(server, connect, structured):
    h = connect(server.uri(), structured=structured)
    rng = random.Random(12)
    requests = []  # (offset, data): distinct random patterns at distinct, unaligned offsets
    offset = 0
    for i in range(512):
        length = rng.choice([1, 511, 4096, 5000, 65536, 100_003])
        requests.append((offset, pattern(length, 1000 + i)))
        offset += length + rng.randrange(0, 3 * KiB)
    assert offset < IMAGE_SIZE
    rng.shuffle(requests)
    buffers = [nbd.Buffer.from_bytearray(bytearray(data)) for _, data in requests]
    cookies = [h.aio_pwrite(buf, off) for buf, (off, _) in zip(buffers, requests, strict=True)]
    assert h.aio_in_flight() >= 256
    while h.aio_in_flight():
        h.poll(-1)
    assert all(h.aio_command_completed(cookie) for cookie in cookies)

    reads = [nbd.Buffer(len(data)) for _, data in requests]
    cookies = [h.aio_pread(buf, off) for buf, (off, _) in zip(reads, requests, strict=True)]
    assert h.aio_in_flight() >= 256
    while h.aio_in_flight():
        h.poll(-1)
    assert all(h.aio_command_completed(cookie) for cookie in cookies)
    for buf, (off, data) in zip(reads, requests, strict=True):
        assert buf.to_bytearray() == data, f"mismatch at offset {off}"


def test_in_flight_bytes_beyond_the_per_connection_limit(start_server, tmp_path, connect):
    # 320 MiB of writes, then of reads, in flight at once: more than the server buffers per connection.
    size, count = 2 * MiB, 160
    image = make_image(tmp_path / "big.img", size * count)
    h = connect(start_server(image).uri())
    buffers = [nbd.Buffer.from_bytearray(bytearray(pattern(size, 300 + i))) for i in range(count)]
    for i, buf in enumerate(buffers):
        h.aio_pwrite(buf, i * size)
    while h.aio_in_flight():
        h.poll(-1)
    reads = [nbd.Buffer(size) for _ in range(count)]
    cookies = [h.aio_pread(buf, i * size) for i, buf in enumerate(reads)]
    while h.aio_in_flight():
        h.poll(-1)
    assert all(h.aio_command_completed(cookie) for cookie in cookies)
    for i, buf in enumerate(reads):
        assert buf.to_bytearray() == buffers[i].to_bytearray(), f"mismatch in piece {i}"


def test_connections_write_disjoint_regions_concurrently(server, image, connect):
    region, piece, workers = 4 * MiB, 256 * KiB, 6
    handles = [connect(server.uri()) for _ in range(workers)]
    expected = {w: pattern(region, 100 + w) for w in range(workers)}

    def write_region(w: int) -> None:
        h, base, data = handles[w], w * region, expected[w]
        for pos in range(0, region, piece):
            h.pwrite(data[pos : pos + piece], base + pos)
        h.flush()

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(write_region, range(workers)))
    check = connect(server.uri())
    content = image.read_bytes()
    for w, data in expected.items():
        assert check.pread(region, w * region) == data
        assert content[w * region : (w + 1) * region] == data


def test_extents_never_empty_while_another_connection_trims(server, connect):
    """Block status descriptors and read chunks must each describe at least one byte."""
    churners = [connect(server.uri()) for _ in range(2)]
    observers = [connect(server.uri()) for _ in range(2)]
    data, span = pattern(64 * KiB, 15), 128 * KiB
    deadline = time.monotonic() + 3
    empty: list[str] = []

    def churn(h: nbd.NBD) -> None:
        while not empty and time.monotonic() < deadline:
            h.pwrite(data, 0)
            h.trim(len(data), 0)

    def observe(h: nbd.NBD) -> None:
        while not empty and time.monotonic() < deadline:
            for flags in (0, nbd.CMD_FLAG_REQ_ONE):
                status = extents(h, span, 0, flags)
                if any(length == 0 for _, length, _ in status):
                    empty.append(f"block status {status}")
            _, chunks = read_chunks(h, span, 0)
            if any(length == 0 for _, length, _ in chunks):
                empty.append(f"read chunks {chunks}")

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(churn, h) for h in churners] + [pool.submit(observe, h) for h in observers]
        for future in futures:
            future.result()
    assert not empty, empty[0]


@pytest.mark.parametrize("fua", [False, True], ids=["flush", "fua"])
def test_multi_conn_write_flush_then_read_elsewhere(server, connect, fua):
    a, b = connect(server.uri()), connect(server.uri())
    assert a.can_multi_conn() and b.can_multi_conn()
    assert b.pread(64 * KiB, 8 * MiB) == bytes(64 * KiB)
    for round_ in range(3):
        data = pattern(64 * KiB, 200 + round_)
        if fua:
            a.pwrite(data, 8 * MiB, nbd.CMD_FLAG_FUA)
        else:
            a.pwrite(data, 8 * MiB)
            a.flush()
        assert b.pread(64 * KiB, 8 * MiB) == data
        a, b = b, a


# Exports and listeners ------------------------------------------------------------------


@pytest.fixture
def two_exports(start_server, tmp_path: Path):
    """A server with exports "alpha" (writable) and "beta" (read-only), each over its own file."""
    alpha = tmp_path / "alpha.img"
    alpha.write_bytes(b"A" * MiB)
    beta = tmp_path / "beta.img"
    beta.write_bytes(b"B" * (2 * MiB + 512))
    server = start_server(
        "--export",
        f"name=alpha,path={alpha},description=first disk, writable",
        "--export",
        f"name=beta,path={beta},read-only,description=second disk",
    )
    return server, {"alpha": alpha, "beta": beta}


def test_named_exports_serve_their_own_files(two_exports, connect):
    server, paths = two_exports
    for name, path in paths.items():
        h = connect()
        h.set_export_name(name)
        h.connect_tcp(server.host, str(server.port))
        assert h.get_export_name() == name
        assert h.get_size() == path.stat().st_size
        assert h.pread(16, 100) == name[0].upper().encode() * 16
    h = connect(server.uri("alpha"))
    h.pwrite(b"new", 10)
    h.flush()
    assert paths["alpha"].read_bytes()[8:15] == b"AAnewAA"
    assert connect(server.uri()).pread(5, 9) == b"AnewA"  # the empty name: the first export


def test_read_only_export(two_exports, connect):
    server, paths = two_exports
    h = connect(server.uri("beta"), strict=False)
    assert h.is_read_only()
    assert not (h.can_flush() or h.can_fua() or h.can_trim() or h.can_zero() or h.can_fast_zero())
    assert h.can_cache()
    before = paths["beta"].read_bytes()
    expect_errno(errno.EPERM, h.pwrite, b"xyz", 0)
    expect_errno(errno.EPERM, h.pwrite, pattern(MiB), MiB)
    h.cache(MiB, 0)
    assert h.pread(3, 0) == b"BBB"
    assert paths["beta"].read_bytes() == before


@pytest.mark.parametrize("call", [lambda h: h.zero(4096, 0), lambda h: h.trim(4096, 0)], ids=["zero", "trim"])
def test_read_only_export_refuses_trim_and_zero_with_eperm(two_exports, connect, call):
    server, _ = two_exports
    h = connect(server.uri("beta"), strict=False)
    expect_errno(errno.EPERM, call, h)


def test_read_only_default_export_refuses_strict_writes(start_server, image, connect):
    h = connect(start_server(image, "--read-only").uri())
    assert h.is_read_only()
    with pytest.raises(nbd.Error):
        h.pwrite(b"x", 0)
    assert h.pread(4, 0) == bytes(4)


def test_unknown_export_fails_cleanly(two_exports, connect):
    server, _ = two_exports
    with pytest.raises(nbd.Error):
        connect(server.uri("gamma"))
    h = connect(opt_mode=True)
    h.set_export_name("gamma")
    h.connect_uri(server.uri("gamma"))
    with pytest.raises(nbd.Error):
        h.opt_go()
    h.set_export_name("beta")
    h.opt_go()  # the same connection can still choose a real export
    assert h.get_size() == 2 * MiB + 512
    assert connect(server.uri("alpha")).pread(1, 0) == b"A"
    assert server.proc.poll() is None


@pytest.mark.parametrize("flags", [0, nbd.HANDSHAKE_FLAG_NO_ZEROES], ids=["zero-padded", "no-zeroes"])
def test_export_name_option(two_exports, connect, flags):
    server, paths = two_exports
    h = connect(structured=False)
    h.set_handshake_flags(flags)
    h.set_export_name("beta")
    h.connect_tcp(server.host, str(server.port))
    assert h.get_size() == paths["beta"].stat().st_size
    assert h.is_read_only()
    assert h.pread(4, 2 * MiB) == b"BBBB"
    bad = connect(structured=False)
    bad.set_handshake_flags(flags)
    bad.set_export_name("gamma")
    with pytest.raises(nbd.Error):
        bad.connect_tcp(server.host, str(server.port))
    assert connect(server.uri("alpha")).pread(1, 0) == b"A"


def test_list_exports_and_info(two_exports, connect):
    server, paths = two_exports
    h = connect(server.uri(), opt_mode=True, full_info=True)
    listed: dict[str, str] = {}
    assert h.opt_list(lambda name, description: listed.__setitem__(name, description)) == 2
    assert listed == {"alpha": "first disk, writable", "beta": "second disk"}
    for name, path in paths.items():
        h.set_export_name(name)
        h.opt_info()
        assert h.get_size() == path.stat().st_size
        assert h.is_read_only() == (name == "beta")
        assert h.get_export_description() == listed[name]
        assert h.get_canonical_export_name() == name
    h.set_export_name("")
    h.opt_info()
    assert h.get_canonical_export_name() == "alpha"
    contexts: list[str] = []
    assert h.opt_list_meta_context(contexts.append) == 1
    assert contexts == [nbd.CONTEXT_BASE_ALLOCATION]
    h.set_export_name("beta")
    h.opt_go()
    assert h.pread(2, 2 * MiB + 510) == b"BB"
    quitter = connect(server.uri(), opt_mode=True)
    assert quitter.opt_list(lambda *_: None) == 2
    quitter.opt_abort()
    assert quitter.aio_is_closed()
    assert h.pread(2, 0) == b"BB"


def test_unix_socket_listener(start_server, tmp_path, image, connect):
    sock = tmp_path / "nbd.sock"
    server = start_server(image, "--listen", f"unix:{sock}")
    uri = server.uri()
    assert uri.startswith("nbd+unix://")
    h = connect(uri)
    data = pattern(MiB + 7, 13)
    h.pwrite(data, 3)
    h.flush()
    assert h.pread(len(data), 3) == data
    assert image.read_bytes()[3 : 3 + len(data)] == data
    assert extents(h, 4 * KiB, 32 * MiB) == [(32 * MiB, 4 * KiB, HOLE_ZERO)]
    server.stop()
    assert not sock.exists()


@needs_ipv6_loopback
def test_one_export_over_tcp_ipv6_and_unix_socket(start_server, tmp_path, image, connect):
    sock = tmp_path / "nbd.sock"
    server = start_server(image, "--listen", "127.0.0.1:0", "--listen", "[::1]:0", "--listen", f"unix:{sock}")
    v6_port = next(int(a.rsplit(":", 1)[1]) for a in server.addresses if a.startswith("[::1]:"))
    uris = [server.uri(), f"nbd://[::1]:{v6_port}/", f"nbd+unix:///?socket={sock}"]
    handles = [connect(uri) for uri in uris]
    for i, h in enumerate(handles):
        h.pwrite(pattern(8 * KiB, 400 + i), i * MiB, nbd.CMD_FLAG_FUA)
    for h in handles:
        for i in range(len(uris)):
            assert h.pread(8 * KiB, i * MiB) == pattern(8 * KiB, 400 + i)


def test_export_created_with_size(start_server, tmp_path, connect):
    path = tmp_path / "new.img"
    server = start_server("--export", f"name=fresh,path={path},size=3M")
    h = connect(server.uri("fresh"))
    assert h.get_size() == path.stat().st_size == 3 * MiB
    h.pwrite(b"hello", 3 * MiB - 5, nbd.CMD_FLAG_FUA)
    assert path.read_bytes()[-5:] == b"hello"
