"""Encoders of transmission-phase replies, checked with an independent decoder."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nbdserver.protocol import replies

from .wire import SIMPLE_REPLY_MAGIC, Chunk, parse_chunks

COOKIE = 0x0102030405060708
DONE = 1
NONE, OFFSET_DATA, OFFSET_HOLE, BLOCK_STATUS, ERROR = 0, 1, 2, 5, 0x8001


def joined(buffers: list[replies.Buffer]) -> bytes:
    return b"".join(bytes(b) for b in buffers)


def single_chunk(raw: bytes) -> Chunk:
    [chunk] = parse_chunks(raw)
    return chunk


def decode_error(chunk: Chunk) -> tuple[int, str]:
    error, length = struct.unpack_from(">IH", chunk.payload)
    assert len(chunk.payload) == 6 + length
    return error, chunk.payload[6:].decode("utf-8")


# Single messages -----------------------------------------------------------------------


@pytest.mark.parametrize("error", [0, 1, 22, 108])
def test_simple_reply(error: int) -> None:
    expected = bytes.fromhex("67446698") + error.to_bytes(4, "big") + bytes.fromhex("0102030405060708")
    assert replies.simple_reply(COOKIE, error) == expected
    assert struct.unpack(">IIQ", expected) == (SIMPLE_REPLY_MAGIC, error, COOKIE)


def test_none_chunk() -> None:
    raw = replies.none_chunk(COOKIE)
    assert raw == bytes.fromhex("668e33ef00010000010203040506070800000000")
    assert single_chunk(raw) == Chunk(DONE, NONE, COOKIE, b"")


@pytest.mark.parametrize("done", [False, True])
def test_data_chunk_header(done: bool) -> None:
    raw = replies.data_chunk_header(COOKIE, offset=0x10000, length=4096, done=done)
    assert raw == bytes.fromhex("668e33ef") + struct.pack(">HHQIQ", done, OFFSET_DATA, COOKIE, 8 + 4096, 0x10000)
    chunk = single_chunk(raw + bytes(4096))
    assert (chunk.flags, chunk.type, chunk.cookie) == (int(done), OFFSET_DATA, COOKIE)
    assert struct.unpack_from(">Q", chunk.payload) == (0x10000,)


@pytest.mark.parametrize("done", [False, True])
def test_hole_chunk(done: bool) -> None:
    raw = replies.hole_chunk(COOKIE, offset=1 << 40, length=65536, done=done)
    assert len(raw) == 20 + 12
    chunk = single_chunk(raw)
    assert (chunk.flags, chunk.type, chunk.cookie) == (int(done), OFFSET_HOLE, COOKIE)
    assert struct.unpack(">QI", chunk.payload) == (1 << 40, 65536)


@pytest.mark.parametrize("message", ["", "range 5+10 is beyond the end", "späte Fehlermeldung"])
def test_error_chunk(message: str) -> None:
    raw = replies.error_chunk(COOKIE, 22, message)
    chunk = single_chunk(raw)
    assert (chunk.flags, chunk.type, chunk.cookie) == (DONE, ERROR, COOKIE)
    assert decode_error(chunk) == (22, message)


def test_error_chunk_message_is_limited_to_4096_bytes() -> None:
    _, message = decode_error(single_chunk(replies.error_chunk(COOKIE, 5, "x" * 5000)))
    assert message == "x" * 4096


def test_error_chunk_truncation_keeps_valid_utf8() -> None:
    for message in ("é" * 2100, "a" + "é" * 2100):  # one of the two is cut inside a character
        error, text = decode_error(single_chunk(replies.error_chunk(COOKIE, 5, message)))
        assert error == 5
        assert message.startswith(text)


def test_block_status_chunk() -> None:
    raw = replies.block_status_chunk(COOKIE, 7, [(4096, 0), (8192, 3), (512, 1)])
    chunk = single_chunk(raw)
    assert (chunk.flags, chunk.type, chunk.cookie) == (DONE, BLOCK_STATUS, COOKIE)
    assert len(chunk.payload) == 4 + 3 * 8
    assert struct.unpack(">I6I", chunk.payload) == (7, 4096, 0, 8192, 3, 512, 1)


def test_block_status_reply_marks_holes() -> None:
    [raw] = replies.block_status_reply(COOKIE, 1, [(4096, False), (8192, True), (512, False)], zero_flags=3)
    chunk = single_chunk(raw)
    assert struct.unpack(">I6I", chunk.payload) == (1, 4096, 0, 8192, 3, 512, 0)


# Whole replies --------------------------------------------------------------------------


def test_error_reply() -> None:
    assert joined(replies.error_reply(COOKIE, 1, structured=False, message="ignored")) == replies.simple_reply(
        COOKIE, 1
    )
    chunk = single_chunk(joined(replies.error_reply(COOKIE, 1, structured=True, message="read-only")))
    assert chunk.type == ERROR and chunk.flags == DONE
    assert decode_error(chunk) == (1, "read-only")


def test_ok_reply_is_simple() -> None:
    assert joined(replies.ok_reply(COOKIE)) == struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, 0, COOKIE)


def test_simple_read_reply_passes_the_data_through() -> None:
    data = bytearray(b"abc" * 100)
    out = replies.read_reply(COOKIE, 512, data, structured=False)
    assert out[0] == replies.simple_reply(COOKIE)
    assert out[1] is data
    assert len(out) == 2


@pytest.mark.parametrize("extents", [None, [], [(4096, False)]])
def test_structured_read_reply_in_one_chunk(extents: list[replies.Extent] | None) -> None:
    data = bytes(range(256)) * 16
    chunk = single_chunk(joined(replies.read_reply(COOKIE, 8192, data, structured=True, extents=extents)))
    assert (chunk.flags, chunk.type, chunk.cookie) == (DONE, OFFSET_DATA, COOKIE)
    assert chunk.payload == struct.pack(">Q", 8192) + data


@pytest.mark.parametrize("extents", [None, [(0, False)], [(0, True)]])
def test_zero_length_structured_read_is_a_none_chunk(extents: list[replies.Extent] | None) -> None:
    out = joined(replies.read_reply(COOKIE, 4096, b"", structured=True, extents=extents))
    assert single_chunk(out) == Chunk(DONE, NONE, COOKIE, b"")


def reassemble(offset: int, length: int, chunks: list[Chunk]) -> bytes:
    """The bytes a client reads from a structured READ reply; each byte must be sent exactly once."""
    result = bytearray(length)
    covered = [0] * length
    for chunk in chunks:
        assert chunk.cookie == COOKIE
        if chunk.type == OFFSET_DATA:
            (start,) = struct.unpack_from(">Q", chunk.payload)
            piece = chunk.payload[8:]
        else:
            assert chunk.type == OFFSET_HOLE
            start, size = struct.unpack(">QI", chunk.payload)
            piece = bytes(size)
        assert piece, "a content chunk must describe at least one byte"
        rel = start - offset
        assert 0 <= rel and rel + len(piece) <= length, "chunk outside the request"
        result[rel : rel + len(piece)] = piece
        for i in range(rel, rel + len(piece)):
            covered[i] += 1
    assert covered == [1] * length, "a byte is described twice or not at all"
    return bytes(result)


EXTENT_LISTS = st.lists(st.tuples(st.integers(1, 300), st.booleans()), min_size=1, max_size=12)


@settings(max_examples=200, deadline=None)
@given(extents=EXTENT_LISTS, offset=st.integers(0, 2**40), seed=st.binary(min_size=1, max_size=64))
def test_structured_read_reply_with_extents(extents: list[replies.Extent], offset: int, seed: bytes) -> None:
    total = sum(length for length, _ in extents)
    data = bytearray((seed * (total // len(seed) + 1))[:total])
    pos = 0
    for length, hole in extents:  # holes read as zeroes
        if hole:
            data[pos : pos + length] = bytes(length)
        pos += length
    chunks = parse_chunks(joined(replies.read_reply(COOKIE, offset, data, structured=True, extents=extents)))
    assert [c.flags & DONE for c in chunks] == [0] * (len(chunks) - 1) + [DONE]
    assert reassemble(offset, total, chunks) == bytes(data)
    holes = [c for c in chunks if c.type == OFFSET_HOLE]
    assert len(holes) == sum(hole for _, hole in extents)
