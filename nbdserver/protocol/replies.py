"""Encoders of transmission-phase replies: simple replies, structured reply chunks, and the
32-byte chunks of extended headers.

Each returns buffers for ``transport.writelines``; payload data is passed through
as the caller's own buffer, never copied.  :class:`CompactReplies` and
:class:`ExtendedReplies` answer requests in the form a connection negotiated.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from typing import Final

from .constants import (
    EXTENDED_REPLY_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    ChunkType,
    ReplyFlag,
)
from .errors import encode_string

Buffer = bytes | bytearray | memoryview

# Plain ints for the encoders every reply passes through: compiled, an enum member costs an
# attribute lookup, a Final int nothing.
_DONE: Final = int(ReplyFlag.DONE)
_NONE: Final = int(ChunkType.NONE)
_OFFSET_DATA: Final = int(ChunkType.OFFSET_DATA)
_OFFSET_HOLE: Final = int(ChunkType.OFFSET_HOLE)

_SIMPLE: Final = struct.Struct(">IIQ")
_pack_simple: Final = _SIMPLE.pack
_CHUNK: Final = struct.Struct(">IHHQI")
_DATA: Final = struct.Struct(">IHHQIQ")  # chunk header + offset
_pack_data: Final = _DATA.pack  # bound once: a method looked up per reply costs more than the call
_HOLE: Final = struct.Struct(">IHHQIQI")  # chunk header + offset + hole size
_ERROR: Final = struct.Struct(">IHHQIIH")  # chunk header + error + message length
# Extended: magic, flags, type, cookie, the request's offset, payload length.
_EXT_CHUNK: Final = struct.Struct(">IHHQQQ")
_EXT_DATA: Final = struct.Struct(">IHHQQQQ")
_EXT_HOLE: Final = struct.Struct(">IHHQQQQI")
_EXT_ERROR: Final = struct.Struct(">IHHQQQIH")
_EXT_STATUS: Final = struct.Struct(">IHHQQQII")  # + context id + descriptor count

# A request's extent: (length, is_hole).  Holes read as zeroes.
Extent = tuple[int, bool]
# An encoder of one chunk of a READ's reply: (cookie, request offset, offset, length, done).
_ReadChunk = Callable[[int, int, int, int, bool], bytes]


def simple_reply(cookie: int, error: int = 0) -> bytes:
    return _pack_simple(SIMPLE_REPLY_MAGIC, error, cookie)


def none_chunk(cookie: int) -> bytes:
    return _CHUNK.pack(STRUCTURED_REPLY_MAGIC, _DONE, _NONE, cookie, 0)


def data_chunk_header(cookie: int, offset: int, length: int, done: bool) -> bytes:
    """Header of an OFFSET_DATA chunk; ``length`` bytes of data follow it."""
    return _pack_data(STRUCTURED_REPLY_MAGIC, _DONE if done else 0, _OFFSET_DATA, cookie, 8 + length, offset)


def hole_chunk(cookie: int, offset: int, length: int, done: bool) -> bytes:
    flags = _DONE if done else 0
    return _HOLE.pack(STRUCTURED_REPLY_MAGIC, flags, _OFFSET_HOLE, cookie, 12, offset, length)


def error_chunk(cookie: int, error: int, message: str = "") -> bytes:
    text = encode_string(message)
    return _ERROR.pack(STRUCTURED_REPLY_MAGIC, _DONE, ChunkType.ERROR, cookie, 6 + len(text), error, len(text)) + text


def block_status_chunk(
    cookie: int, context_id: int, descriptors: Sequence[tuple[int, int]], done: bool = True
) -> bytes:
    """One BLOCK_STATUS chunk (``done``: the last of its reply) of (length, status flags) descriptors."""
    body = struct.pack(f">I{2 * len(descriptors)}I", context_id, *[v for d in descriptors for v in d])
    flags = _DONE if done else 0
    return _CHUNK.pack(STRUCTURED_REPLY_MAGIC, flags, ChunkType.BLOCK_STATUS, cookie, len(body)) + body


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
    if not extents or (len(extents) == 1 and not extents[0][1]):  # all data: one chunk (as _read_chunks)
        return [data_chunk_header(cookie, offset, len(data), True), data]
    return _read_chunks(cookie, offset, data, extents, _compact_data, _compact_hole)


def _compact_data(cookie: int, request_offset: int, offset: int, length: int, done: bool) -> bytes:
    return data_chunk_header(cookie, offset, length, done)


def _compact_hole(cookie: int, request_offset: int, offset: int, length: int, done: bool) -> bytes:
    return hole_chunk(cookie, offset, length, done)


def _read_chunks(
    cookie: int,
    offset: int,
    data: Buffer,
    extents: Sequence[Extent] | None,
    data_header: _ReadChunk,
    hole: _ReadChunk,
) -> list[Buffer]:
    """A READ's data as OFFSET_DATA and OFFSET_HOLE chunks, one per extent."""
    if not extents or (len(extents) == 1 and not extents[0][1]):
        return [data_header(cookie, offset, offset, len(data), True), data]
    view = memoryview(data)
    out: list[Buffer] = []
    pos = 0
    last = len(extents) - 1
    for i, (length, is_hole) in enumerate(extents):
        if is_hole:
            out.append(hole(cookie, offset, offset + pos, length, i == last))
        else:
            out.append(data_header(cookie, offset, offset + pos, length, i == last))
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


# Extended headers: every chunk's header carries the request's offset and a 64-bit length.


def ext_none_chunk(cookie: int, offset: int) -> bytes:
    return _EXT_CHUNK.pack(EXTENDED_REPLY_MAGIC, _DONE, _NONE, cookie, offset, 0)


def ext_data_chunk_header(cookie: int, request_offset: int, offset: int, length: int, done: bool) -> bytes:
    flags = _DONE if done else 0
    return _EXT_DATA.pack(EXTENDED_REPLY_MAGIC, flags, _OFFSET_DATA, cookie, request_offset, 8 + length, offset)


def ext_hole_chunk(cookie: int, request_offset: int, offset: int, length: int, done: bool) -> bytes:
    flags = _DONE if done else 0
    return _EXT_HOLE.pack(EXTENDED_REPLY_MAGIC, flags, _OFFSET_HOLE, cookie, request_offset, 12, offset, length)


def ext_error_chunk(cookie: int, offset: int, error: int, message: str = "") -> bytes:
    text = encode_string(message)
    header = _EXT_ERROR.pack(
        EXTENDED_REPLY_MAGIC, _DONE, ChunkType.ERROR, cookie, offset, 6 + len(text), error, len(text)
    )
    return header + text


def ext_block_status_chunk(
    cookie: int, offset: int, context_id: int, descriptors: Sequence[tuple[int, int]], done: bool = True
) -> bytes:
    """One BLOCK_STATUS_EXT chunk (``done``: the last of its reply) of 64-bit (length, status flags)
    descriptors."""
    count = len(descriptors)
    header = _EXT_STATUS.pack(
        EXTENDED_REPLY_MAGIC,
        _DONE if done else 0,
        ChunkType.BLOCK_STATUS_EXT,
        cookie,
        offset,
        8 + 16 * count,
        context_id,
        count,
    )
    return header + struct.pack(f">{2 * count}Q", *[v for d in descriptors for v in d])


class Replies:
    """The replies of one connection, in the form it negotiated."""

    def ok(self, cookie: int, offset: int) -> list[Buffer]:
        raise NotImplementedError

    def error(self, cookie: int, offset: int, error: int, message: str = "") -> list[Buffer]:
        raise NotImplementedError

    def read(self, cookie: int, offset: int, data: Buffer, extents: Sequence[Extent] | None) -> list[Buffer]:
        raise NotImplementedError

    def block_status(
        self, cookie: int, offset: int, context_id: int, extents: Sequence[Extent], zero_flags: int
    ) -> list[Buffer]:
        """For base:allocation: holes carry ``zero_flags`` (HOLE|ZERO)."""
        raise NotImplementedError

    def status_chunk(
        self, cookie: int, offset: int, context_id: int, descriptors: Sequence[tuple[int, int]], done: bool
    ) -> Buffer:
        """One chunk of a BLOCK_STATUS reply of several contexts: (length, flags) descriptors."""
        raise NotImplementedError


class CompactReplies(Replies):
    """Simple replies, or 20-byte structured reply chunks where they were negotiated."""

    def __init__(self, structured: bool) -> None:
        self.structured = structured

    def ok(self, cookie: int, offset: int) -> list[Buffer]:
        return ok_reply(cookie)

    def error(self, cookie: int, offset: int, error: int, message: str = "") -> list[Buffer]:
        return error_reply(cookie, error, self.structured, message)

    def read(self, cookie: int, offset: int, data: Buffer, extents: Sequence[Extent] | None) -> list[Buffer]:
        return read_reply(cookie, offset, data, self.structured, extents)

    def block_status(
        self, cookie: int, offset: int, context_id: int, extents: Sequence[Extent], zero_flags: int
    ) -> list[Buffer]:
        return block_status_reply(cookie, context_id, extents, zero_flags)

    def status_chunk(
        self, cookie: int, offset: int, context_id: int, descriptors: Sequence[tuple[int, int]], done: bool
    ) -> Buffer:
        return block_status_chunk(cookie, context_id, descriptors, done)


class ExtendedReplies(Replies):
    """32-byte chunks: never a simple reply, block status in 64-bit descriptors."""

    def ok(self, cookie: int, offset: int) -> list[Buffer]:
        return [ext_none_chunk(cookie, offset)]

    def error(self, cookie: int, offset: int, error: int, message: str = "") -> list[Buffer]:
        return [ext_error_chunk(cookie, offset, error, message)]

    def read(self, cookie: int, offset: int, data: Buffer, extents: Sequence[Extent] | None) -> list[Buffer]:
        if not data:
            return [ext_none_chunk(cookie, offset)]
        return _read_chunks(cookie, offset, data, extents, ext_data_chunk_header, ext_hole_chunk)

    def block_status(
        self, cookie: int, offset: int, context_id: int, extents: Sequence[Extent], zero_flags: int
    ) -> list[Buffer]:
        descriptors = [(length, zero_flags if hole else 0) for length, hole in extents]
        return [ext_block_status_chunk(cookie, offset, context_id, descriptors)]

    def status_chunk(
        self, cookie: int, offset: int, context_id: int, descriptors: Sequence[tuple[int, int]], done: bool
    ) -> Buffer:
        return ext_block_status_chunk(cookie, offset, context_id, descriptors, done)


__all__ = [
    "Buffer",
    "CompactReplies",
    "ExtendedReplies",
    "Extent",
    "Replies",
    "block_status_chunk",
    "block_status_reply",
    "data_chunk_header",
    "error_chunk",
    "error_reply",
    "ext_block_status_chunk",
    "ext_data_chunk_header",
    "ext_error_chunk",
    "ext_hole_chunk",
    "ext_none_chunk",
    "hole_chunk",
    "none_chunk",
    "ok_reply",
    "read_reply",
    "simple_reply",
]
