"""Client side of the NBD wire format for unit tests.

Written from the protocol document with plain ``struct`` and literal magic
numbers, so that the server's encoders are checked against an independent
decoder rather than against themselves.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

GREETING_MAGICS = b"NBDMAGIC" + b"IHAVEOPT"
IHAVEOPT = b"IHAVEOPT"
OPTION_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF
EXTENDED_REQUEST_MAGIC = 0x21E41C71
EXTENDED_REPLY_MAGIC = 0x6E8A278C


# Client to server -------------------------------------------------------------------


def client_flags(flags: int) -> bytes:
    return struct.pack(">I", flags)


def option(opt: int, data: bytes = b"") -> bytes:
    return IHAVEOPT + struct.pack(">II", opt, len(data)) + data


def nbd_string(value: str | bytes) -> bytes:
    raw = value.encode() if isinstance(value, str) else value
    return struct.pack(">I", len(raw)) + raw


def info_request(name: str | bytes, *infos: int) -> bytes:
    """Data of NBD_OPT_INFO / NBD_OPT_GO."""
    return nbd_string(name) + struct.pack(f">H{len(infos)}H", len(infos), *infos)


def meta_request(name: str | bytes, *queries: str | bytes) -> bytes:
    """Data of NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT."""
    return nbd_string(name) + struct.pack(">I", len(queries)) + b"".join(nbd_string(q) for q in queries)


def request(flags: int, command: int, cookie: int, offset: int, length: int, magic: int = REQUEST_MAGIC) -> bytes:
    return struct.pack(">IHHQQI", magic, flags, command, cookie, offset, length)


def ext_request(flags: int, command: int, cookie: int, offset: int, length: int) -> bytes:
    """A 32-byte request (extended headers): the length is 64 bits."""
    return struct.pack(">IHHQQQ", EXTENDED_REQUEST_MAGIC, flags, command, cookie, offset, length)


# Server to client -------------------------------------------------------------------


@dataclass(frozen=True)
class OptReply:
    option: int
    type: int
    data: bytes


def parse_option_replies(buf: bytes) -> list[OptReply]:
    """Split handshake output into option replies; fails on bad magic or truncation."""
    replies = []
    pos = 0
    while pos < len(buf):
        assert len(buf) - pos >= 20, "truncated option reply header"
        magic, opt, rtype, length = struct.unpack_from(">QIII", buf, pos)
        assert magic == OPTION_REPLY_MAGIC, f"bad option reply magic {magic:#x}"
        data = buf[pos + 20 : pos + 20 + length]
        assert len(data) == length, "truncated option reply data"
        replies.append(OptReply(opt, rtype, data))
        pos += 20 + length
    return replies


@dataclass(frozen=True)
class Chunk:
    flags: int
    type: int
    cookie: int
    payload: bytes


def parse_chunks(buf: bytes) -> list[Chunk]:
    """Split transmission output into structured reply chunks."""
    chunks = []
    pos = 0
    while pos < len(buf):
        assert len(buf) - pos >= 20, "truncated chunk header"
        magic, flags, ctype, cookie, length = struct.unpack_from(">IHHQI", buf, pos)
        assert magic == STRUCTURED_REPLY_MAGIC, f"bad structured reply magic {magic:#x}"
        payload = buf[pos + 20 : pos + 20 + length]
        assert len(payload) == length, "truncated chunk payload"
        chunks.append(Chunk(flags, ctype, cookie, payload))
        pos += 20 + length
    return chunks


@dataclass(frozen=True)
class ExtChunk:
    flags: int
    type: int
    cookie: int
    offset: int  # the request's offset, echoed in every chunk
    payload: bytes


def parse_ext_chunks(buf: bytes) -> list[ExtChunk]:
    """Split transmission output into 32-byte-header reply chunks (extended headers)."""
    chunks = []
    pos = 0
    while pos < len(buf):
        assert len(buf) - pos >= 32, "truncated extended chunk header"
        magic, flags, ctype, cookie, offset, length = struct.unpack_from(">IHHQQQ", buf, pos)
        assert magic == EXTENDED_REPLY_MAGIC, f"bad extended reply magic {magic:#x}"
        payload = buf[pos + 32 : pos + 32 + length]
        assert len(payload) == length, "truncated chunk payload"
        chunks.append(ExtChunk(flags, ctype, cookie, offset, payload))
        pos += 32 + length
    return chunks


def parse_block_status_ext(payload: bytes) -> tuple[int, list[tuple[int, int]]]:
    """A BLOCK_STATUS_EXT payload: the context id and its (length, flags) descriptors."""
    context, count = struct.unpack_from(">II", payload)
    assert len(payload) == 8 + 16 * count and count > 0, "descriptor count does not match the length"
    values = struct.unpack_from(f">{2 * count}Q", payload, 8)
    return context, list(zip(values[::2], values[1::2], strict=True))
