"""Fuzzing the sans-I/O core with hypothesis: raw byte streams into the handshake (every TLS mode,
a refused client) and the transmission phase's header parser and checks, in both header forms
(28-byte, and 32-byte extended headers with their block status filters).

Invariants: the only exception is ProtocolViolation; every byte the server sends parses as
option replies; the handshake never holds more than one option's worth of input; a header is
either refused with an NBD error or accepted within the export and the payload limit.

CI runs FUZZ_EXAMPLES examples per test (a few seconds in all); set NBDSERVER_FUZZ_EXAMPLES for
a longer run, e.g. NBDSERVER_FUZZ_EXAMPLES=200000 pytest tests/unit/test_fuzz.py
--hypothesis-show-statistics.  Failing inputs are kept in .hypothesis/ and replayed first.
"""

from __future__ import annotations

import itertools
import os
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nbdserver.protocol import (
    ExportCatalog,
    ExportInfo,
    Negotiated,
    ProtocolViolation,
    RequestHeader,
    ServerHandshake,
    StartTls,
    TlsMode,
    Transmission,
)
from nbdserver.protocol.constants import EXTENDED_REQUEST_MAGIC, REQUEST_MAGIC, Error, Option
from nbdserver.protocol.constants import TransmissionFlag as TF
from nbdserver.protocol.handshake import MAX_OPTION_DATA
from nbdserver.protocol.transmission import HEADER_SIZE, MAX_DISCARDED_PAYLOAD

from .wire import client_flags, info_request, option, parse_ext_chunks, parse_option_replies

FUZZ_EXAMPLES = int(os.environ.get("NBDSERVER_FUZZ_EXAMPLES", "1500"))
FUZZ = settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))

DISK = ExportInfo("disk", 1 << 30, TF.HAS_FLAGS | TF.SEND_FLUSH | TF.SEND_FUA | TF.SEND_TRIM, max_payload=1 << 25)
SECRET = ExportInfo("secret", 1 << 20, TF.HAS_FLAGS | TF.READ_ONLY, tls_required=True)
CATALOG = ExportCatalog([DISK, SECRET])

# Pieces a client stream is made of: real options (some mangled), raw bytes, and option headers
# that announce more data than follows.
PIECES = st.one_of(
    st.binary(max_size=64),
    st.builds(option, st.sampled_from(list(Option)) | st.integers(0, 2**32 - 1), st.binary(max_size=64)),
    st.sampled_from(["disk", "secret", "", "x" * 300]).map(lambda n: option(Option.GO, info_request(n))),
    st.sampled_from([b"disk", b"secret", b""]).map(lambda n: option(Option.EXPORT_NAME, n)),
    st.integers(0, 2**32 - 1).map(lambda n: struct.pack(">QII", 0x49484156454F5054, Option.LIST, n)),
)
STREAMS = st.builds(
    lambda flags, pieces: flags + b"".join(pieces),
    st.sampled_from([client_flags(1), client_flags(3), client_flags(0), b"\xff\xff\xff\xff", b""]),
    st.lists(PIECES, max_size=12),
)


@FUZZ
@given(
    stream=STREAMS,
    cuts=st.lists(st.integers(0, 2000), max_size=8),
    tls=st.sampled_from(list(TlsMode)),
    refused=st.booleans(),
)
def test_handshake_takes_any_byte_stream(stream: bytes, cuts: list[int], tls: TlsMode, refused: bool) -> None:
    hs = ServerHandshake(CATALOG, tls, "not for you" if refused else "")
    out = hs.data_to_send()[18:]  # after the greeting
    bounds = [0, *sorted(c for c in cuts if c < len(stream)), len(stream)]
    try:
        for start, end in itertools.pairwise(bounds):
            if hs.done:
                break
            events = hs.receive_data(stream[start:end])
            out += hs.data_to_send()
            assert len(hs._in) <= MAX_OPTION_DATA + 16, "the handshake holds more than one option"
            for event in events:
                if isinstance(event, StartTls):
                    assert tls is not TlsMode.OFF and not refused
                    hs.tls_started()  # as if the TLS handshake had succeeded
                if isinstance(event, Negotiated):
                    assert not refused
                    assert event.structured_replies or not event.extended_headers
                    assert event.extended_headers or not event.flags & TF.BLOCK_STATUS_PAYLOAD
                    assert not event.export.tls_required or hs.tls_active
                    assert tls is not TlsMode.REQUIRE or hs.tls_active
    except ProtocolViolation:
        out += hs.data_to_send()
    replies = parse_option_replies(_strip_export_name_reply(out))
    if refused:
        assert all(r.type & (1 << 31) or r.option == Option.ABORT for r in replies)


def _strip_export_name_reply(out: bytes) -> bytes:
    """EXPORT_NAME's success reply (size and flags, maybe 124 zero bytes) has no option-reply header."""
    pos, end = 0, len(out)
    while pos < end:
        if end - pos < 20 or out[pos : pos + 8] != b"\x00\x03\xe8\x89\x04\x55\x65\xa9":
            return out[:pos]
        (length,) = struct.unpack_from(">I", out, pos + 16)
        pos += 20 + length
    return out


HEADERS = st.one_of(
    st.binary(min_size=HEADER_SIZE, max_size=HEADER_SIZE),
    st.builds(
        lambda flags, command, cookie, offset, length: struct.pack(
            ">IHHQQI", REQUEST_MAGIC, flags, command, cookie, offset, length
        ),
        st.integers(0, 0xFFFF),
        st.integers(0, 12) | st.integers(0, 0xFFFF),
        st.integers(0, 2**64 - 1),
        st.sampled_from([0, 512, 4096, DISK.size - 4096, DISK.size, 2**63]) | st.integers(0, 2**64 - 1),
        st.sampled_from([0, 1, 4096, 1 << 25, (1 << 25) + 1, 2**32 - 1]) | st.integers(0, 2**32 - 1),
    ),
)


def refused_or_within_bounds(
    tx: Transmission, header: RequestHeader, payload: int, read_only: bool
) -> tuple[Error, str]:
    """The checks' verdict on a parsed header: a refusal says why; what passes stays within the export,
    the payload limit and the export's writability, and only a WRITE brings a payload in."""
    assert 0 <= payload <= MAX_DISCARDED_PAYLOAD
    error, message = tx.check(header)
    if error == Error.OK:
        assert header.offset + header.length <= DISK.size or header.command in (2, 3)
        assert header.length <= DISK.max_payload or header.command not in (0, 1)
        assert not payload or header.command == 1, "only a WRITE's payload is taken"
        assert not (read_only and header.command in (1, 4, 6))
    else:
        assert message
    return error, message


@FUZZ
@given(raw=HEADERS, structured=st.booleans(), read_only=st.booleans())
def test_transmission_headers_are_refused_or_within_bounds(raw: bytes, structured: bool, read_only: bool) -> None:
    flags = DISK.flags | (TF.READ_ONLY if read_only else 0)
    tx = Transmission(Negotiated(DISK, flags, structured, {1: "base:allocation"} if structured else {}))
    try:
        header = tx.parse_header(raw)
        payload = tx.payload_length(header)
    except ProtocolViolation:
        return
    refused_or_within_bounds(tx, header, payload, read_only)


EXTENDED_HEADERS = st.one_of(
    st.binary(min_size=32, max_size=32),
    st.builds(
        lambda flags, command, cookie, offset, length: struct.pack(
            ">IHHQQQ", EXTENDED_REQUEST_MAGIC, flags, command, cookie, offset, length
        ),
        st.sampled_from([0, 0x20, 0x21, 0x28, 0x01]) | st.integers(0, 0xFFFF),
        st.integers(0, 12) | st.integers(0, 0xFFFF),
        st.integers(0, 2**64 - 1),
        st.sampled_from([0, 512, 4096, DISK.size - 4096, DISK.size, 2**63]) | st.integers(0, 2**64 - 1),
        st.sampled_from([0, 8, 12, 16, 4096, 1 << 25, MAX_DISCARDED_PAYLOAD, MAX_DISCARDED_PAYLOAD + 1])
        | st.sampled_from([2**32 - 1, 2**32, DISK.size, 2**64 - 1])
        | st.integers(0, 2**64 - 1),
    ),
)


@FUZZ
@given(raw=EXTENDED_HEADERS, following=st.binary(max_size=16), read_only=st.booleans(), contexts=st.booleans())
def test_extended_headers_are_refused_or_within_bounds(
    raw: bytes, following: bytes, read_only: bool, contexts: bool
) -> None:
    flags = DISK.flags | TF.SEND_DF | (TF.READ_ONLY if read_only else 0)
    flags |= TF.BLOCK_STATUS_PAYLOAD if contexts else 0
    tx = Transmission(Negotiated(DISK, flags, True, {1: "base:allocation"} if contexts else {}, True))
    try:
        header = tx.parse_header(raw)
        taken = tx.filter_length(header)
        assert taken <= 12, "a filter is taken with its header: it must stay small"
        if taken:
            if len(following) < taken:
                return  # the connection waits for the rest
            tx.take_filter(header, following, 0)
        payload = tx.payload_length(header)
    except ProtocolViolation:
        return
    error, _ = refused_or_within_bounds(tx, header, payload, read_only)
    if error != Error.OK:
        [chunk] = parse_ext_chunks(b"".join(bytes(b) for b in tx.replies.error(header.cookie, header.offset, error)))
        assert chunk.flags == 1 and chunk.offset == header.offset
