"""Sans-I/O state machine of the fixed newstyle handshake, server side.

Bytes from the client go in through :meth:`ServerHandshake.receive_data`, which
returns events; bytes for the client accumulate and are taken with
:meth:`ServerHandshake.data_to_send`.  Nothing here touches sockets or files.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from .constants import (
    BASE_ALLOCATION,
    DIRTY_BITMAP_PREFIX,
    IHAVEOPT,
    MAX_STRING,
    NBDMAGIC,
    OPTION_REPLY_MAGIC,
    ClientFlag,
    HandshakeFlag,
    Info,
    Option,
    OptionReply,
    TransmissionFlag,
)
from .errors import ProtocolViolation, encode_string

# Longest option payload we buffer. A valid option is far smaller (names are at
# most 4 KiB); a longer one is skipped unread and answered with ERR_TOO_BIG.
MAX_OPTION_DATA = 64 * 1024

_GREETING = struct.pack(">QQH", NBDMAGIC, IHAVEOPT, HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES)
_OPTION_HEADER = struct.Struct(">QII")
_REPLY_HEADER = struct.Struct(">QIII")
# Plain ints: ~ on an IntFlag flips only its defined bits.
_KNOWN_CLIENT_FLAGS = int(ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES)
_ALLOCATION_CONTEXT_ID = 1


@dataclass(frozen=True)
class ExportInfo:
    """What the protocol tells a client about one export."""

    name: str
    size: int
    flags: TransmissionFlag  # SEND_DF is added per connection, once structured replies are on
    description: str = ""
    min_block: int = 1
    preferred_block: int = 4096
    max_payload: int = 32 * 1024 * 1024
    tls_required: bool = False  # reachable only after STARTTLS (selective TLS)
    bitmaps: tuple[str, ...] = ()  # dirty bitmaps, offered as qemu:dirty-bitmap:NAME contexts


class TlsMode(enum.Enum):
    """What a server says to STARTTLS: ``off`` refuses it, ``on`` lets clients choose, ``require``
    answers every other option with ERR_TLS_REQD until TLS is up."""

    OFF = "off"
    ON = "on"
    REQUIRE = "require"


class ExportCatalog:
    """The exports a handshake may offer, and which one the empty name means."""

    def __init__(self, exports: Iterable[ExportInfo], default: str | None = None) -> None:
        self._exports = {info.name: info for info in exports}
        if default is None and self._exports:
            default = "" if "" in self._exports else next(iter(self._exports))
        self.default = default

    def lookup(self, name: str) -> ExportInfo | None:
        if name == "" and self.default is not None:
            name = self.default
        return self._exports.get(name)

    def __iter__(self) -> Iterator[ExportInfo]:
        return iter(self._exports.values())


# Events -----------------------------------------------------------------------


@dataclass(frozen=True)
class Negotiated:
    """The handshake is over; the transmission phase starts with these terms."""

    export: ExportInfo
    flags: TransmissionFlag
    structured_replies: bool  # also true with extended headers, which imply them
    meta_contexts: dict[int, str] = field(default_factory=dict)
    extended_headers: bool = False  # 32-byte requests and replies, 64-bit lengths


@dataclass(frozen=True)
class Aborted:
    """The client ended the session during option haggling."""


@dataclass(frozen=True)
class OptionSeen:
    """An option was answered (for logging and metrics)."""

    option: int
    reply: int


@dataclass(frozen=True)
class StartTls:
    """STARTTLS was accepted: once its ACK is sent, run the TLS handshake (server side) on the
    connection, then call :meth:`ServerHandshake.tls_started`.  No bytes go in meanwhile."""


Event = Negotiated | Aborted | OptionSeen | StartTls


class _State(enum.Enum):
    CLIENT_FLAGS = enum.auto()
    OPTION_HEADER = enum.auto()
    OPTION_DATA = enum.auto()
    SKIP = enum.auto()
    TLS = enum.auto()  # STARTTLS accepted; the I/O layer runs the TLS handshake
    DONE = enum.auto()


class _InvalidOption(Exception):
    """An option's data does not parse; answered with ERR_INVALID."""


class ServerHandshake:
    def __init__(self, catalog: ExportCatalog, tls: TlsMode = TlsMode.OFF, refusal: str = "") -> None:
        self.catalog = catalog
        self.tls = tls
        self.refusal = refusal  # if set: this client may use nothing; every option gets ERR_POLICY with it
        self.tls_active = False
        self._state = _State.CLIENT_FLAGS
        self._in = bytearray()
        self._out: list[bytes] = [_GREETING]
        self._option = 0
        self._wanted = 0  # bytes of option data still to buffer or skip
        self.no_zeroes = False
        self.structured_replies = False
        self.extended_headers = False
        self._meta_export: str | None = None
        self._meta_contexts: dict[int, str] = {}
        self.trailing_data = b""  # bytes after the end of the handshake: transmission data

    @property
    def done(self) -> bool:
        return self._state is _State.DONE

    def data_to_send(self) -> bytes:
        out = b"".join(self._out)
        self._out.clear()
        return out

    def receive_data(self, data: bytes | memoryview) -> list[Event]:
        """Consume bytes from the client; raises ProtocolViolation for a hard disconnect."""
        if self._state is _State.DONE:
            raise RuntimeError("handshake already finished")
        self._in += data
        events: list[Event] = []
        while self._state is not _State.DONE:
            if not self._step(events):
                break
        if self._state is _State.TLS and self._in:
            # Taken as options from inside TLS, these could be injected by anyone on the path.
            raise ProtocolViolation("bytes sent in the clear after STARTTLS", "data_after_starttls")
        if self._state is _State.DONE:
            self.trailing_data = bytes(self._in)
            self._in.clear()
        return events

    def tls_started(self) -> None:
        """The TLS handshake succeeded: option haggling starts afresh, inside TLS."""
        if self._state is not _State.TLS:
            raise RuntimeError("no STARTTLS is pending")
        self.tls_active = True
        # Nothing agreed in the clear carries over.
        self.structured_replies = self.extended_headers = False
        self._meta_export, self._meta_contexts = None, {}
        self._state = _State.OPTION_HEADER

    # One step of the state machine; False when it needs more bytes.
    def _step(self, events: list[Event]) -> bool:
        state = self._state
        if state is _State.TLS:
            return False
        if state is _State.CLIENT_FLAGS:
            if len(self._in) < 4:
                return False
            (flags,) = struct.unpack_from(">I", self._in)
            del self._in[:4]
            if flags & ~_KNOWN_CLIENT_FLAGS:
                raise ProtocolViolation(f"unknown client flags {flags:#x}", "bad_client_flags")
            self.no_zeroes = bool(flags & ClientFlag.NO_ZEROES)
            self._state = _State.OPTION_HEADER
        elif state is _State.OPTION_HEADER:
            if len(self._in) < _OPTION_HEADER.size:
                return False
            magic, option, length = _OPTION_HEADER.unpack_from(self._in)
            del self._in[: _OPTION_HEADER.size]
            if magic != IHAVEOPT:
                raise ProtocolViolation(f"bad option magic {magic:#x}", "bad_option_magic")
            self._option, self._wanted = option, length
            if length > MAX_OPTION_DATA:
                if option == Option.EXPORT_NAME:
                    raise ProtocolViolation(f"export name of {length} bytes", "oversized_export_name")
                self._state = _State.SKIP
            else:
                self._state = _State.OPTION_DATA
        elif state is _State.SKIP:
            skipped = min(self._wanted, len(self._in))
            del self._in[:skipped]
            self._wanted -= skipped
            if self._wanted:
                return False
            self._reply(OptionReply.ERR_TOO_BIG, message="option data too long")
            events.append(OptionSeen(self._option, OptionReply.ERR_TOO_BIG))
            self._state = _State.OPTION_HEADER
        elif state is _State.OPTION_DATA:
            if len(self._in) < self._wanted:
                return False
            data = bytes(self._in[: self._wanted])
            del self._in[: self._wanted]
            self._state = _State.OPTION_HEADER
            self._handle_option(self._option, data, events)
        return True

    # Option replies ------------------------------------------------------------

    def _reply(self, reply: OptionReply, payload: bytes = b"", message: str = "") -> None:
        if message:
            payload = encode_string(message)
        self._out.append(_REPLY_HEADER.pack(OPTION_REPLY_MAGIC, self._option, reply, len(payload)) + payload)

    def _handle_option(self, option: int, data: bytes, events: list[Event]) -> None:
        handler = _HANDLERS.get(option)
        if self.refusal and option != Option.ABORT:
            if option == Option.EXPORT_NAME:
                raise ProtocolViolation(f"EXPORT_NAME refused: {self.refusal}", "not_allowed")
            reply = OptionReply.ERR_POLICY
            self._reply(reply, message=self.refusal)
        elif self.tls is TlsMode.REQUIRE and not self.tls_active and option not in (Option.STARTTLS, Option.ABORT):
            if option == Option.EXPORT_NAME:  # it has no error reply
                raise ProtocolViolation("EXPORT_NAME in the clear; this server requires TLS", "tls_required")
            reply = OptionReply.ERR_TLS_REQD
            self._reply(reply, message="this server requires TLS: send NBD_OPT_STARTTLS first")
        elif handler is None:
            reply = OptionReply.ERR_UNSUP
            self._reply(reply, message=f"option {option} is not supported")
        else:
            try:
                reply = handler(self, data, events)
            except _InvalidOption as exc:
                reply = OptionReply.ERR_INVALID
                self._reply(reply, message=str(exc))
        events.append(OptionSeen(option, reply))

    def _opt_export_name(self, data: bytes, events: list[Event]) -> OptionReply:
        if self.extended_headers:  # its reply cannot say that the export takes them
            raise ProtocolViolation("EXPORT_NAME after extended headers were negotiated", "export_name_extended")
        info = self.catalog.lookup(_decode(data))
        if info is None:
            # This option cannot return an error: the spec asks for a hard disconnect.
            raise ProtocolViolation(f"unknown export {_decode(data)!r} requested by EXPORT_NAME", "unknown_export")
        if info.tls_required and not self.tls_active:
            raise ProtocolViolation(f"export {info.name!r} requires TLS; EXPORT_NAME came in the clear", "tls_required")
        flags = self._transmission_flags(info)
        reply = struct.pack(">QH", info.size, flags)
        self._out.append(reply if self.no_zeroes else reply + bytes(124))
        self._finish(info, flags, events, meta_name=_decode(data))
        return OptionReply.ACK

    def _opt_abort(self, data: bytes, events: list[Event]) -> OptionReply:
        self._reply(OptionReply.ACK)
        self._state = _State.DONE
        events.append(Aborted())
        return OptionReply.ACK

    def _opt_list(self, data: bytes, events: list[Event]) -> OptionReply:
        if data:
            raise _InvalidOption("NBD_OPT_LIST takes no data")
        for info in self.catalog:
            name = info.name.encode()
            self._reply(OptionReply.SERVER, struct.pack(">I", len(name)) + name + info.description.encode())
        self._reply(OptionReply.ACK)
        return OptionReply.ACK

    def _opt_starttls(self, data: bytes, events: list[Event]) -> OptionReply:
        if data:
            raise _InvalidOption("NBD_OPT_STARTTLS takes no data")
        if self.tls_active:
            raise _InvalidOption("TLS is already on")
        if self.tls is TlsMode.OFF:
            self._reply(OptionReply.ERR_POLICY, message="TLS is not configured on this server")
            return OptionReply.ERR_POLICY
        self._reply(OptionReply.ACK)
        self._state = _State.TLS
        events.append(StartTls())
        return OptionReply.ACK

    def _opt_info_go(self, data: bytes, events: list[Event]) -> OptionReply:
        name, requests = _parse_info_request(data)
        info = self.catalog.lookup(name)
        if info is None:
            self._reply(OptionReply.ERR_UNKNOWN, message=f"no export named {name!r}")
            return OptionReply.ERR_UNKNOWN
        if info.tls_required and not self.tls_active:
            self._reply(OptionReply.ERR_TLS_REQD, message=f"export {info.name!r} requires TLS")
            return OptionReply.ERR_TLS_REQD
        flags = self._transmission_flags(info, name)
        self._reply(OptionReply.INFO, struct.pack(">HQH", Info.EXPORT, info.size, flags))
        if Info.NAME in requests or name != info.name:
            self._reply(OptionReply.INFO, struct.pack(">H", Info.NAME) + info.name.encode())
        if Info.DESCRIPTION in requests and info.description:
            self._reply(OptionReply.INFO, struct.pack(">H", Info.DESCRIPTION) + info.description.encode())
        # Sent unasked as well: a client that does not understand it must ignore it.
        self._reply(
            OptionReply.INFO,
            struct.pack(">HIII", Info.BLOCK_SIZE, info.min_block, info.preferred_block, info.max_payload),
        )
        self._reply(OptionReply.ACK)
        if self._option == Option.GO:
            self._finish(info, flags, events, meta_name=name)
        return OptionReply.ACK

    def _opt_structured_reply(self, data: bytes, events: list[Event]) -> OptionReply:
        if data:
            raise _InvalidOption("NBD_OPT_STRUCTURED_REPLY takes no data")
        if self.extended_headers:
            reply = OptionReply.ERR_EXT_HEADER_REQD
            self._reply(reply, message="extended headers are negotiated, and take the place of structured replies")
            return reply
        if self.structured_replies:
            raise _InvalidOption("structured replies are already negotiated")
        self.structured_replies = True
        self._reply(OptionReply.ACK)
        return OptionReply.ACK

    def _opt_extended_headers(self, data: bytes, events: list[Event]) -> OptionReply:
        """32-byte requests and replies from GO on, with structured replies' rules (whether or not
        those were negotiated first); metadata contexts already set stay."""
        if data:
            raise _InvalidOption("NBD_OPT_EXTENDED_HEADERS takes no data")
        if self.extended_headers:
            raise _InvalidOption("extended headers are already negotiated")
        self.extended_headers = self.structured_replies = True
        self._reply(OptionReply.ACK)
        return OptionReply.ACK

    def _opt_meta_context(self, data: bytes, events: list[Event]) -> OptionReply:
        setting = self._option == Option.SET_META_CONTEXT
        if setting:
            self._meta_export, self._meta_contexts = None, {}  # replaced even when the option fails
            if not self.structured_replies:
                raise _InvalidOption("negotiate structured replies before metadata contexts")
        name, queries = _parse_meta_request(data)
        info = self.catalog.lookup(name)
        if info is None:
            self._reply(OptionReply.ERR_UNKNOWN, message=f"no export named {name!r}")
            return OptionReply.ERR_UNKNOWN
        if info.tls_required and not self.tls_active:
            self._reply(OptionReply.ERR_TLS_REQD, message=f"export {info.name!r} requires TLS")
            return OptionReply.ERR_TLS_REQD
        for query in queries:
            if ":" not in query:
                raise _InvalidOption(f"metadata context query {query!r} has no namespace")
        contexts: dict[int, str] = {}
        for context in _select_contexts(info, queries, setting):
            context_id = len(contexts) + _ALLOCATION_CONTEXT_ID if setting else 0
            contexts[context_id] = context
            self._reply(OptionReply.META_CONTEXT, struct.pack(">I", context_id) + context.encode())
        if setting and contexts:
            self._meta_export = name
            self._meta_contexts = contexts
        self._reply(OptionReply.ACK)
        return OptionReply.ACK

    # Helpers ---------------------------------------------------------------------

    def _transmission_flags(self, info: ExportInfo, meta_name: str | None = None) -> TransmissionFlag:
        flags = info.flags | TransmissionFlag.HAS_FLAGS
        if self.structured_replies:
            flags |= TransmissionFlag.SEND_DF
        # A block status request may name its contexts: said to a client that has contexts to
        # name, or asks INFO (whose contexts may come after it).
        if self.extended_headers and (self._option == Option.INFO or self._contexts_for(meta_name)):
            flags |= TransmissionFlag.BLOCK_STATUS_PAYLOAD
        return flags

    def _contexts_for(self, meta_name: str | None) -> dict[int, str]:
        """Contexts count only if they were set for the very name the client goes with."""
        return self._meta_contexts if meta_name is not None and meta_name == self._meta_export else {}

    def _finish(
        self, info: ExportInfo, flags: TransmissionFlag, events: list[Event], meta_name: str | None = None
    ) -> None:
        contexts = self._contexts_for(meta_name)
        self._state = _State.DONE
        events.append(Negotiated(info, flags, self.structured_replies, dict(contexts), self.extended_headers))


# Each option's handler: a table outside the class, since a compiled class cannot hold one.
_HANDLERS: dict[int, Callable[[ServerHandshake, bytes, list[Event]], OptionReply]] = {
    Option.EXPORT_NAME: ServerHandshake._opt_export_name,
    Option.ABORT: ServerHandshake._opt_abort,
    Option.LIST: ServerHandshake._opt_list,
    Option.STARTTLS: ServerHandshake._opt_starttls,
    Option.INFO: ServerHandshake._opt_info_go,
    Option.GO: ServerHandshake._opt_info_go,
    Option.STRUCTURED_REPLY: ServerHandshake._opt_structured_reply,
    Option.LIST_META_CONTEXT: ServerHandshake._opt_meta_context,
    Option.SET_META_CONTEXT: ServerHandshake._opt_meta_context,
    Option.EXTENDED_HEADERS: ServerHandshake._opt_extended_headers,
}


def _select_contexts(info: ExportInfo, queries: list[str], setting: bool) -> list[str]:
    """The contexts of ``info`` that ``queries`` select, each once, in the order first asked.

    SET takes whole names only; LIST also takes a namespace (``base:``, ``qemu:``) or the
    ``qemu:dirty-bitmap:`` prefix for all of its kind, and no query for every context, as qemu-nbd
    answers.  Unknown names and namespaces select nothing."""
    bitmaps = [DIRTY_BITMAP_PREFIX + name for name in info.bitmaps]
    every = [BASE_ALLOCATION, *bitmaps]
    if not queries:
        return [] if setting else every
    selected: list[str] = []
    for query in queries:
        if query in every:
            found = [query]
        elif setting:
            found = []
        elif query == "base:":
            found = [BASE_ALLOCATION]
        elif query in ("qemu:", DIRTY_BITMAP_PREFIX):
            found = bitmaps
        else:
            found = []
        selected += [context for context in found if context not in selected]
    return selected


def _decode(raw: bytes) -> str:
    return raw.decode("utf-8", errors="replace")


def _take_string(data: bytes, pos: int, what: str) -> tuple[str, int]:
    if pos + 4 > len(data):
        raise _InvalidOption(f"{what} length is missing")
    (length,) = struct.unpack_from(">I", data, pos)
    pos += 4
    if length > MAX_STRING or pos + length > len(data):
        raise _InvalidOption(f"{what} length {length} does not fit the option")
    return _decode(data[pos : pos + length]), pos + length


def _parse_info_request(data: bytes) -> tuple[str, set[int]]:
    name, pos = _take_string(data, 0, "export name")
    if pos + 2 > len(data):
        raise _InvalidOption("information request count is missing")
    (count,) = struct.unpack_from(">H", data, pos)
    pos += 2
    if len(data) != pos + 2 * count:
        raise _InvalidOption("information request list does not match the option length")
    return name, set(struct.unpack_from(f">{count}H", data, pos))


def _parse_meta_request(data: bytes) -> tuple[str, list[str]]:
    name, pos = _take_string(data, 0, "export name")
    if pos + 4 > len(data):
        raise _InvalidOption("query count is missing")
    (count,) = struct.unpack_from(">I", data, pos)
    pos += 4
    queries = []
    for _ in range(count):
        query, pos = _take_string(data, pos, "query")
        queries.append(query)
    if pos != len(data):
        raise _InvalidOption("trailing bytes after the queries")
    return name, queries
