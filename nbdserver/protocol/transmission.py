"""Sans-I/O rules of the transmission phase: request headers, payload lengths, validation.

The I/O layer reads :attr:`Transmission.header_size` bytes (28, or 32 with extended
headers), calls :meth:`Transmission.parse_header`, then reads
:meth:`Transmission.payload_length` bytes of payload (a WRITE's data, which must be
consumed even when the request is refused), and asks :meth:`Transmission.check`
which error, if any, the request gets.  A BLOCK_STATUS naming its metadata contexts
carries a few bytes of its own (:meth:`Transmission.filter_length`): they are taken
together with its header, by :meth:`Transmission.take_filter`.
"""

from __future__ import annotations

import struct

from .constants import (
    CMD_BLOCK_STATUS,
    CMD_DISC,
    CMD_FLUSH,
    CMD_READ,
    CMD_WRITE,
    CMD_WRITE_ZEROES,
    EXTENDED_REQUEST_MAGIC,
    FLAG_PAYLOAD_LEN,
    REQUEST_MAGIC,
    WRITING,
    Command,
    CommandFlag,
    Error,
    TransmissionFlag,
)
from .errors import ProtocolViolation
from .handshake import Negotiated
from .replies import CompactReplies, ExtendedReplies, Replies

_HEADER = struct.Struct(">IHHQQI")
HEADER_SIZE = _HEADER.size
_EXTENDED_HEADER = struct.Struct(">IHHQQQ")  # the same, with a 64-bit length
EXTENDED_HEADER_SIZE = _EXTENDED_HEADER.size
_FILTER_LENGTH = struct.Struct(">Q")  # a BLOCK_STATUS payload: the effect length, then context ids

# A WRITE payload longer than this is not read but ends the connection: the spec
# allows a hard disconnect for payloads large enough to be a denial of service,
# and anything up to 32 MiB must be accepted (though it may be refused with an error).
MAX_DISCARDED_PAYLOAD = 64 * 1024 * 1024

# Flags each command accepts, beyond FUA (which every command accepts when advertised).
_COMMAND_FLAGS = {
    Command.READ: CommandFlag.DF,
    Command.WRITE: CommandFlag(0),
    Command.DISC: CommandFlag(0),
    Command.FLUSH: CommandFlag(0),
    Command.TRIM: CommandFlag(0),
    Command.CACHE: CommandFlag(0),
    Command.WRITE_ZEROES: CommandFlag.NO_HOLE | CommandFlag.FAST_ZERO,
    Command.BLOCK_STATUS: CommandFlag.REQ_ONE,
}
# The transmission flag that must have been advertised before a command may be sent.
_COMMAND_ADVERTISED = {
    Command.FLUSH: TransmissionFlag.SEND_FLUSH,
    Command.TRIM: TransmissionFlag.SEND_TRIM,
    Command.WRITE_ZEROES: TransmissionFlag.SEND_WRITE_ZEROES,
}


_OK = (Error.OK, "")


class RequestHeader:
    """One request's header as parsed.  A plain class, not a dataclass: compiled, a dataclass's
    ``__init__`` is generated when the module loads and runs interpreted, for every request."""

    __slots__ = ("command", "contexts", "cookie", "flags", "length", "offset")

    def __init__(
        self, flags: int, command: int, cookie: int, offset: int, length: int, contexts: tuple[int, ...] | None = None
    ) -> None:
        self.flags = flags
        self.command = command
        self.cookie = cookie
        self.offset = offset
        self.length = length  # with PAYLOAD_LEN, of the payload; else of the range the request affects
        self.contexts = contexts  # the context ids a BLOCK_STATUS named; None: every one

    def _fields(self) -> tuple[int, int, int, int, int, tuple[int, ...] | None]:
        return self.flags, self.command, self.cookie, self.offset, self.length, self.contexts

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RequestHeader) and self._fields() == other._fields()

    def __repr__(self) -> str:
        flags, command, cookie, offset, length, contexts = self._fields()
        return (
            f"RequestHeader(flags={flags:#x}, command={command}, cookie={cookie:#x}, offset={offset}, "
            f"length={length}, contexts={contexts})"
        )


def encode_request_header(
    flags: int, command: int, cookie: int, offset: int, length: int, extended: bool = False
) -> bytes:
    """A request header as a client sends it."""
    if extended:
        return _EXTENDED_HEADER.pack(EXTENDED_REQUEST_MAGIC, flags, command, cookie, offset, length)
    return _HEADER.pack(REQUEST_MAGIC, flags, command, cookie, offset, length)


class Transmission:
    """The terms one connection negotiated, and the checks every request must pass."""

    def __init__(self, negotiated: Negotiated) -> None:
        self.negotiated = negotiated
        export = negotiated.export
        self.size = export.size
        self.flags = negotiated.flags
        self.structured_replies = negotiated.structured_replies
        self.extended = negotiated.extended_headers
        self.meta_contexts = negotiated.meta_contexts
        self.header_size = EXTENDED_HEADER_SIZE if self.extended else HEADER_SIZE
        self._header = _EXTENDED_HEADER if self.extended else _HEADER
        self._magic = EXTENDED_REQUEST_MAGIC if self.extended else REQUEST_MAGIC
        self.replies: Replies = ExtendedReplies() if self.extended else CompactReplies(self.structured_replies)
        self.min_block = export.min_block
        self.max_payload = export.max_payload
        self.read_only = bool(self.flags & TransmissionFlag.READ_ONLY)
        # Plain ints, worked out once: IntFlag arithmetic is slow on the per-request path.
        negotiated_flags = int(CommandFlag.REQ_ONE | CommandFlag.NO_HOLE)
        if self.flags & TransmissionFlag.SEND_DF:
            negotiated_flags |= int(CommandFlag.DF)
        if self.flags & TransmissionFlag.SEND_FAST_ZERO:
            negotiated_flags |= int(CommandFlag.FAST_ZERO)
        fua = int(CommandFlag.FUA) if self.flags & TransmissionFlag.SEND_FUA else 0
        self._allowed_flags = {int(c): int(f) & negotiated_flags | fua for c, f in _COMMAND_FLAGS.items()}
        if self.extended:  # a WRITE's payload, and a BLOCK_STATUS's if it was advertised
            self._allowed_flags[Command.WRITE] |= FLAG_PAYLOAD_LEN
            if self.flags & TransmissionFlag.BLOCK_STATUS_PAYLOAD:
                self._allowed_flags[Command.BLOCK_STATUS] |= FLAG_PAYLOAD_LEN
        self._filter_max = 8 + 4 * len(self.meta_contexts)  # each context named once, at most
        self._not_advertised = frozenset(int(c) for c, f in _COMMAND_ADVERTISED.items() if not self.flags & f)
        # READ and WRITE (if writable) with their flags, for the common case's few comparisons.
        transfers = (Command.READ,) if self.read_only else (Command.READ, Command.WRITE)
        self._transfer_flags = {int(c): self._allowed_flags[c] for c in transfers}
        self._transfer_max = min(self.max_payload, self.size)

    @property
    def form(self) -> str:
        """The form of requests and replies, in words (for the log)."""
        if self.extended:
            return "extended headers"
        return "structured replies" if self.structured_replies else "simple replies"

    def refuse_writes(self) -> None:
        """From now on, requests that change data get EPERM (the export became read-only)."""
        self.read_only = True
        self._transfer_flags.pop(int(Command.WRITE), None)

    def parse_header(self, raw: bytes | bytearray | memoryview, pos: int = 0) -> RequestHeader:
        """The header at ``pos`` of ``raw`` (which holds at least ``header_size`` bytes from there)."""
        magic, flags, command, cookie, offset, length = self._header.unpack_from(raw, pos)
        if magic != self._magic:
            raise ProtocolViolation(f"bad request magic {magic:#x}", "bad_request_magic")
        return RequestHeader(flags, command, cookie, offset, length)

    def payload_length(self, header: RequestHeader) -> int:
        """Bytes of payload that follow this header on the wire, to be read (a WRITE's data) or
        read and dropped (a payload the request may not have: it is refused); a block status
        filter's are not counted (:meth:`filter_length`)."""
        command = header.command
        if command != CMD_WRITE and not (self.extended and header.flags & FLAG_PAYLOAD_LEN):
            return 0
        if command == CMD_BLOCK_STATUS and (header.contexts is not None or self.filter_length(header)):
            return 0  # taken with its header
        if header.length > MAX_DISCARDED_PAYLOAD:
            kind = "oversized_write" if command == CMD_WRITE else "oversized_payload"
            raise ProtocolViolation(f"payload of {header.length} bytes (command {command})", kind)
        return header.length

    def filter_length(self, header: RequestHeader) -> int:
        """Bytes of a BLOCK_STATUS payload that names contexts (an effect length and at most as many
        ids as were negotiated), to be taken with the header; 0 for any other request."""
        length = header.length
        if (
            header.command == CMD_BLOCK_STATUS
            and header.flags & FLAG_PAYLOAD_LEN
            and self.extended
            and self.flags & TransmissionFlag.BLOCK_STATUS_PAYLOAD
            and 12 <= length <= self._filter_max
            and not length % 4
        ):
            return length
        return 0

    def take_filter(self, header: RequestHeader, raw: bytes | bytearray | memoryview, pos: int) -> None:
        """Read the block status filter at ``pos`` (``filter_length`` bytes) into ``header``: its
        length becomes the effect length, its contexts the ids named."""
        count = (header.length - 8) // 4
        (header.length,) = _FILTER_LENGTH.unpack_from(raw, pos)
        header.contexts = struct.unpack_from(f">{count}I", raw, pos + 8)

    def check(self, header: RequestHeader) -> tuple[Error, str]:
        """The error this request must get before any I/O, or (OK, "")."""
        command, flags, offset, length = header.command, header.flags, header.offset, header.length
        allowed = self._transfer_flags.get(command)
        if (
            allowed is not None  # a READ or WRITE that may be sent: most requests pass here
            and not flags & ~allowed
            and length <= self._transfer_max
            and offset <= self.size - length
            and not (offset | length) & (self.min_block - 1)
        ):
            return _OK
        return self._check_slowly(command, flags, offset, length, header.contexts)

    def _check_slowly(
        self, command: int, flags: int, offset: int, length: int, contexts: tuple[int, ...] | None
    ) -> tuple[Error, str]:
        allowed = self._allowed_flags.get(command)
        if allowed is None:
            return Error.EINVAL, f"unknown command {command}"
        if flags & ~allowed:
            return Error.EINVAL, f"flags {flags:#x} not valid for {Command(command).name}"
        if command in WRITING and self.read_only:
            return Error.EPERM, "export is read-only"
        if command in self._not_advertised:
            return Error.EINVAL, f"{Command(command).name} was not advertised"
        if command == CMD_FLUSH:
            if offset or length:
                return Error.EINVAL, "FLUSH must have zero offset and length"
            return _OK
        if command == CMD_DISC:
            return _OK
        if command == CMD_BLOCK_STATUS:
            if not self.meta_contexts:
                return Error.EINVAL, "no metadata context was negotiated"
            if flags & FLAG_PAYLOAD_LEN:
                wrong = self._check_filter(contexts)
                if wrong:
                    return Error.EINVAL, wrong
            if not length:
                return Error.EINVAL, "BLOCK_STATUS of zero length"
        if offset + length > self.size:
            error = Error.ENOSPC if command in (CMD_WRITE, CMD_WRITE_ZEROES) else Error.EINVAL
            return error, f"range {offset}+{length} is beyond the end of the export ({self.size})"
        if command in (CMD_READ, CMD_WRITE):
            if length > self.max_payload:
                error = Error.EOVERFLOW if command == CMD_READ else Error.EINVAL
                return error, f"length {length} exceeds the maximum payload {self.max_payload}"
            if (offset | length) & (self.min_block - 1):
                return Error.EINVAL, f"request not aligned to {self.min_block} bytes"
        return _OK

    def _check_filter(self, contexts: tuple[int, ...] | None) -> str:
        """What is wrong with the context ids a BLOCK_STATUS named, if anything."""
        if contexts is None:
            most = len(self.meta_contexts)
            return f"a block status payload is an effect length and 1 to {most} context id(s)"
        if len(set(contexts)) != len(contexts):
            return "a context id is named twice"
        for context in contexts:
            if context not in self.meta_contexts:
                return f"context id {context} was not negotiated"
        return ""
