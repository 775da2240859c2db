"""A minimal NBD client on a raw socket, able to send what a well-behaved client never would.

The protocol numbers are spelled out here from the specification rather than taken from the
server's package, so that a wrong constant there cannot hide from the tests.  Every socket
operation has a timeout: a server that stops answering makes a test fail, never hang.
"""

from __future__ import annotations

import enum
import itertools
import socket
import struct
from dataclasses import dataclass, field

TIMEOUT = 10.0

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPTION_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF
EXTENDED_REQUEST_MAGIC = 0x21E41C71
EXTENDED_REPLY_MAGIC = 0x6E8A278C

FLAG_FIXED_NEWSTYLE = 1
FLAG_NO_ZEROES = 2
TRANSMISSION_READ_ONLY = 1 << 1
REP_ERR = 1 << 31
INFO_EXPORT = 0
INFO_BLOCK_SIZE = 3
REPLY_FLAG_DONE = 1


class Opt(enum.IntEnum):
    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


class Rep(enum.IntEnum):
    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = REP_ERR | 1
    ERR_POLICY = REP_ERR | 2
    ERR_INVALID = REP_ERR | 3
    ERR_TLS_REQD = REP_ERR | 5
    ERR_UNKNOWN = REP_ERR | 6
    ERR_TOO_BIG = REP_ERR | 9
    ERR_EXT_HEADER_REQD = REP_ERR | 10


class Cmd(enum.IntEnum):
    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7


class CmdFlag(enum.IntFlag):
    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4
    PAYLOAD_LEN = 1 << 5


class Err(enum.IntEnum):
    OK = 0
    EPERM = 1
    EIO = 5
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95


class Chunk(enum.IntEnum):
    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    BLOCK_STATUS_EXT = 6
    ERROR = (1 << 15) | 1
    ERROR_OFFSET = (1 << 15) | 2


class Closed(Exception):
    """The server closed the connection (EOF or reset)."""


@dataclass
class OptionReply:
    option: int
    type: int
    data: bytes


@dataclass
class Reply:
    cookie: int
    error: int = 0
    data: bytes = b""
    structured: bool = False
    chunks: list[int] = field(default_factory=list)  # chunk types, in order
    message: bytes = b""
    pieces: list[tuple[int, bytes]] = field(default_factory=list)  # (offset, data) of data and hole chunks
    extents: dict[int, list[tuple[int, int]]] = field(default_factory=dict)  # block status: id -> (length, flags)


def option_bytes(option: int, data: bytes = b"", length: int | None = None) -> bytes:
    return struct.pack(">QII", IHAVEOPT, option, len(data) if length is None else length) + data


def info_request(name: str = "", requests: tuple[int, ...] = ()) -> bytes:
    """Data of NBD_OPT_INFO / NBD_OPT_GO."""
    raw = name.encode()
    return struct.pack(f">I{len(raw)}sH{len(requests)}H", len(raw), raw, len(requests), *requests)


def meta_request(name: str, queries: list[str]) -> bytes:
    """Data of NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT."""
    strings = [s.encode() for s in (name, *queries)]
    parts = [struct.pack(">I", len(strings[0])), strings[0], struct.pack(">I", len(queries))]
    parts += [struct.pack(">I", len(q)) + q for q in strings[1:]]
    return b"".join(parts)


class RawClient:
    def __init__(
        self, host: str = "", port: int = 0, timeout: float = TIMEOUT, sock: socket.socket | None = None
    ) -> None:
        """Connect to ``host``:``port``, or speak on ``sock``, connected already (a Unix socket, say,
        or one with options that must be set before it connects)."""
        if sock is None:
            sock = socket.create_connection((host, port), timeout=timeout)
        else:
            sock.settimeout(timeout)
        self.sock = sock
        self.no_zeroes = False
        self.structured = False
        self.extended = False  # 32-byte requests and replies
        self.size = 0
        self.flags = 0
        self.block_size: tuple[int, int, int] | None = None  # minimum, preferred, maximum payload
        self._cookies = itertools.count(1)
        self._pending: dict[int, tuple[int, int, int]] = {}  # cookie -> (command, offset, length)
        self._partial: dict[int, Reply] = {}  # structured replies still waiting for their DONE chunk

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    # Bytes -----------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            try:
                chunk = self.sock.recv(min(n - len(buf), 1 << 20))
            except ConnectionResetError as exc:
                raise Closed(f"reset after {len(buf)} of {n} bytes") from exc
            if not chunk:
                raise Closed(f"EOF after {len(buf)} of {n} bytes")
            buf += chunk
        return bytes(buf)

    def wait_closed(self) -> bool:
        """Drain whatever the server still sends; True once it closes, False if it stays open."""
        try:
            while self.sock.recv(1 << 16):
                pass
        except ConnectionResetError:
            pass
        except TimeoutError:
            return False
        return True

    # Handshake ---------------------------------------------------------------------

    def greeting(self) -> int:
        magic, opt_magic, flags = struct.unpack(">QQH", self.recv_exact(18))
        assert (magic, opt_magic) == (NBDMAGIC, IHAVEOPT), f"bad greeting {magic:#x} {opt_magic:#x}"
        return flags

    def handshake(self, flags: int = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES) -> RawClient:
        """Read the greeting and answer it with ``flags``."""
        server_flags = self.greeting()
        assert server_flags & FLAG_FIXED_NEWSTYLE
        self.no_zeroes = bool(flags & FLAG_NO_ZEROES)
        self.send(struct.pack(">I", flags))
        return self

    def read_option_reply(self) -> OptionReply:
        magic, option, rtype, length = struct.unpack(">QIII", self.recv_exact(20))
        assert magic == OPTION_REPLY_MAGIC, f"bad option reply magic {magic:#x}"
        return OptionReply(option, rtype, self.recv_exact(length))

    def option_replies(self, option: int) -> list[OptionReply]:
        """Replies to one option, up to and including the final one (ACK or an error)."""
        replies = []
        while True:
            reply = self.read_option_reply()
            assert reply.option == option, f"reply to option {reply.option}, expected {option}"
            replies.append(reply)
            if reply.type == Rep.ACK or reply.type & REP_ERR:
                return replies

    def option(self, option: int, data: bytes = b"", length: int | None = None) -> list[OptionReply]:
        self.send(option_bytes(option, data, length))
        replies = self.option_replies(option)
        if option == Opt.EXTENDED_HEADERS and replies[-1].type == Rep.ACK:
            self.structured = self.extended = True
        return replies

    def expect_only_errors(self, error: int, name: str = "", hidden: tuple[bytes, ...] = ()) -> None:
        """LIST, INFO and GO each get ``error``, telling none of ``hidden``; then EXPORT_NAME,
        which has no error reply, makes the server hang up."""
        for opt, data in [(Opt.LIST, b""), (Opt.INFO, info_request(name)), (Opt.GO, info_request(name))]:
            self.send(option_bytes(opt, data))
            reply = self.read_option_reply()
            assert (reply.option, reply.type) == (opt, error), reply
            assert not any(secret in reply.data for secret in hidden), reply.data
        self.send(option_bytes(Opt.EXPORT_NAME, name.encode()))
        assert self.wait_closed()

    def go(self, name: str = "", structured: bool = False, extended: bool = False) -> RawClient:
        if extended and not self.extended:
            assert self.option(Opt.EXTENDED_HEADERS)[-1].type == Rep.ACK
        elif structured:
            assert self.option(Opt.STRUCTURED_REPLY)[-1].type == Rep.ACK
            self.structured = True
        replies = self.option(Opt.GO, info_request(name))
        assert replies[-1].type == Rep.ACK, replies
        for reply in replies:
            kind = struct.unpack_from(">H", reply.data)[0] if reply.type == Rep.INFO else None
            if kind == INFO_EXPORT:
                self.size, self.flags = struct.unpack_from(">QH", reply.data, 2)
            elif kind == INFO_BLOCK_SIZE:
                self.block_size = struct.unpack_from(">III", reply.data, 2)
        assert self.size, "no NBD_INFO_EXPORT before the ACK of GO"
        return self

    def export_name(self, name: str = "") -> RawClient:
        self.send(option_bytes(Opt.EXPORT_NAME, name.encode()))
        self.size, self.flags = struct.unpack(">QH", self.recv_exact(10))
        if not self.no_zeroes:
            assert self.recv_exact(124) == bytes(124)
        return self

    # Transmission ------------------------------------------------------------------

    def request_bytes(self, cmd: int, offset: int = 0, length: int = 0, flags: int = 0, magic: int | None = None):
        """A request header (payload not included); its reply is expected by :meth:`read_reply`."""
        cookie = next(self._cookies)
        self._pending[cookie] = (cmd, offset, length)
        if self.extended:
            if cmd == Cmd.WRITE:  # its length is of the payload that follows, as a client must say
                flags |= CmdFlag.PAYLOAD_LEN
            magic = EXTENDED_REQUEST_MAGIC if magic is None else magic
            return struct.pack(">IHHQQQ", magic, flags, cmd, cookie, offset, length)
        magic = REQUEST_MAGIC if magic is None else magic
        return struct.pack(">IHHQQI", magic, flags, cmd, cookie, offset, length)

    def request(self, cmd: int, offset: int = 0, length: int = 0, flags: int = 0, payload: bytes = b"") -> None:
        self.send(self.request_bytes(cmd, offset, length, flags))
        if payload:
            self.send(payload)

    def read_reply(self) -> Reply:
        """The next complete reply, simple or structured (chunks of different cookies may interleave)."""
        while True:
            (magic,) = struct.unpack(">I", self.recv_exact(4))
            if magic == SIMPLE_REPLY_MAGIC:
                assert not self.extended, "a simple reply with extended headers"
                error, cookie = struct.unpack(">IQ", self.recv_exact(12))
                assert cookie in self._pending and cookie not in self._partial, f"unexpected cookie {cookie}"
                cmd, _, length = self._pending.pop(cookie)
                data = self.recv_exact(length) if cmd == Cmd.READ and not error else b""
                return Reply(cookie, error, data)
            if self.extended:
                assert magic == EXTENDED_REPLY_MAGIC, f"bad reply magic {magic:#x} with extended headers"
                flags, ctype, cookie, echoed, length = struct.unpack(">HHQQQ", self.recv_exact(28))
                assert cookie in self._pending, f"unexpected cookie {cookie}"
                assert echoed == self._pending[cookie][1], "an extended chunk must echo the request's offset"
                assert ctype != Chunk.BLOCK_STATUS, "32-bit block status with extended headers"
            else:
                assert magic == STRUCTURED_REPLY_MAGIC, f"bad reply magic {magic:#x}"
                assert self.structured, "structured reply chunk without structured replies negotiated"
                flags, ctype, cookie, length = struct.unpack(">HHQI", self.recv_exact(16))
                assert ctype != Chunk.BLOCK_STATUS_EXT, "64-bit block status without extended headers"
            body = self.recv_exact(length)
            assert cookie in self._pending, f"unexpected cookie {cookie}"
            reply = self._partial.setdefault(cookie, Reply(cookie, structured=True))
            reply.chunks.append(ctype)
            self._chunk(reply, ctype, body)
            if flags & REPLY_FLAG_DONE:
                del self._partial[cookie]
                cmd, offset, length = self._pending.pop(cookie)
                if cmd == Cmd.READ and not reply.error:
                    reply.data = self._assemble(reply, offset, length)
                return reply

    def _chunk(self, reply: Reply, ctype: int, body: bytes) -> None:
        if ctype & 0x8000:
            error, msg_len = struct.unpack_from(">IH", body)
            assert 6 + msg_len <= len(body), "error message longer than its chunk"
            assert error, "error chunk with error 0"
            reply.error = reply.error or error
            reply.message = body[6 : 6 + msg_len]
        elif ctype == Chunk.OFFSET_DATA:
            (offset,) = struct.unpack_from(">Q", body)
            assert len(body) > 8, "empty data chunk"
            reply.pieces.append((offset, body[8:]))
        elif ctype == Chunk.OFFSET_HOLE:
            offset, size = struct.unpack(">QI", body)
            reply.pieces.append((offset, bytes(size)))
        elif ctype == Chunk.BLOCK_STATUS:
            values = struct.unpack_from(f">I{(len(body) - 4) // 4}I", body)
            reply.extents[values[0]] = list(zip(values[1::2], values[2::2], strict=True))
        elif ctype == Chunk.BLOCK_STATUS_EXT:
            context, count = struct.unpack_from(">II", body)
            assert len(body) == 8 + 16 * count and count, "descriptor count does not match the chunk"
            values = struct.unpack_from(f">{2 * count}Q", body, 8)
            reply.extents[context] = list(zip(values[::2], values[1::2], strict=True))

    @staticmethod
    def _assemble(reply: Reply, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        covered = 0
        for start, piece in reply.pieces:
            assert offset <= start and start + len(piece) <= offset + length, "chunk outside the request"
            buf[start - offset : start - offset + len(piece)] = piece
            covered += len(piece)
        assert covered == length, f"READ reply covers {covered} of {length} bytes"
        return bytes(buf)
