"""Encoders of transmission-phase replies: simple replies and structured reply chunks.

Each returns buffers for ``transport.writelines``; payload data is passed through
as the caller's own buffer, never copied.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from .constants import SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC, ChunkType, ReplyFlag
from .errors import encode_string

Buffer = bytes | bytearray | memoryview

_SIMPLE = struct.Struct(">IIQ")
_CHUNK = struct.Struct(">IHHQI")
_DATA = struct.Struct(">IHHQIQ")  # chunk header + offset
_HOLE = struct.Struct(">IHHQIQI")  # chunk header + offset + hole size
_ERROR = struct.Struct(">IHHQIIH")  # chunk header + error + message length

# A request's extent: (length, is_hole).  Holes read as zeroes.
Extent = tuple[int, bool]


def simple_reply(cookie: int, error: int = 0) -> bytes:
    return _SIMPLE.pack(SIMPLE_REPLY_MAGIC, error, cookie)


def none_chunk(cookie: int) -> bytes:
    return _CHUNK.pack(STRUCTURED_REPLY_MAGIC, ReplyFlag.DONE, ChunkType.NONE, cookie, 0)


def data_chunk_header(cookie: int, offset: int, length: int, done: bool) -> bytes:
    """Header of an OFFSET_DATA chunk; ``length`` bytes of data follow it."""
    flags = ReplyFlag.DONE if done else 0
    return _DATA.pack(STRUCTURED_REPLY_MAGIC, flags, ChunkType.OFFSET_DATA, cookie, 8 + length, offset)


def hole_chunk(cookie: int, offset: int, length: int, done: bool) -> bytes:
    flags = ReplyFlag.DONE if done else 0
    return _HOLE.pack(STRUCTURED_REPLY_MAGIC, flags, ChunkType.OFFSET_HOLE, cookie, 12, offset, length)


def error_chunk(cookie: int, error: int, message: str = "") -> bytes:
    text = encode_string(message)
    return (
        _ERROR.pack(STRUCTURED_REPLY_MAGIC, ReplyFlag.DONE, ChunkType.ERROR, cookie, 6 + len(text), error, len(text))
        + text
    )


def block_status_chunk(cookie: int, context_id: int, descriptors: Sequence[tuple[int, int]]) -> bytes:
    """One BLOCK_STATUS chunk (the last of its reply) of (length, status flags) descriptors."""
    body = struct.pack(f">I{2 * len(descriptors)}I", context_id, *[v for d in descriptors for v in d])
    return _CHUNK.pack(STRUCTURED_REPLY_MAGIC, ReplyFlag.DONE, ChunkType.BLOCK_STATUS, cookie, len(body)) + body


def error_reply(cookie: int, error: int, structured: bool, message: str = "") -> list[Buffer]:
    if structured:
        return [error_chunk(cookie, error, message)]
    return [simple_reply(cookie, error)]


def ok_reply(cookie: int) -> list[Buffer]:
    # A simple reply is valid for every data-less success, structured or not.
    return [simple_reply(cookie)]


def read_reply(
    cookie: int,
    offset: int,
    data: Buffer,
    structured: bool,
    extents: Sequence[Extent] | None = None,
) -> list[Buffer]:
    """The reply to a successful READ of ``data`` at ``offset``.

    With structured replies and ``extents`` (from the backing's hole map), holes are
    sent as OFFSET_HOLE chunks instead of zeroes.  Pass ``extents=None`` for one
    OFFSET_DATA chunk (as the DF flag demands).
    """
    if not structured:
        return [simple_reply(cookie), data]
    if not data:  # a data chunk must carry at least one byte
        return [none_chunk(cookie)]
    if not extents or (len(extents) == 1 and not extents[0][1]):
        return [data_chunk_header(cookie, offset, len(data), True), data]
    view = memoryview(data)
    out: list[Buffer] = []
    pos = 0
    last = len(extents) - 1
    for i, (length, hole) in enumerate(extents):
        if hole:
            out.append(hole_chunk(cookie, offset + pos, length, i == last))
        else:
            out.append(data_chunk_header(cookie, offset + pos, length, i == last))
            out.append(view[pos : pos + length])
        pos += length
    return out


def block_status_reply(
    cookie: int,
    context_id: int,
    extents: Sequence[Extent],
    zero_flags: int,
) -> list[Buffer]:
    """BLOCK_STATUS reply for base:allocation: holes carry ``zero_flags`` (HOLE|ZERO)."""
    descriptors = [(length, zero_flags if hole else 0) for length, hole in extents]
    return [block_status_chunk(cookie, context_id, descriptors)]


__all__ = [
    "Buffer",
    "Extent",
    "block_status_chunk",
    "block_status_reply",
    "data_chunk_header",
    "error_chunk",
    "error_reply",
    "hole_chunk",
    "none_chunk",
    "ok_reply",
    "read_reply",
    "simple_reply",
]
