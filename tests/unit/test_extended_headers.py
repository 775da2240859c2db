"""Extended headers in the sans-I/O core: the option and its order with structured replies and
metadata contexts, 32-byte requests with 64-bit lengths, block status filters, and 32-byte
reply chunks, checked with an independent decoder."""

from __future__ import annotations

import struct

import pytest

from nbdserver.protocol import (
    Command,
    Error,
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
from nbdserver.protocol.constants import BASE_ALLOCATION, Option, OptionReply
from nbdserver.protocol.constants import TransmissionFlag as TF
from nbdserver.protocol.replies import ExtendedReplies
from nbdserver.protocol.transmission import MAX_DISCARDED_PAYLOAD, encode_request_header

from .wire import (
    EXTENDED_REPLY_MAGIC,
    ExtChunk,
    client_flags,
    ext_request,
    info_request,
    meta_request,
    option,
    parse_block_status_ext,
    parse_ext_chunks,
    parse_option_replies,
    request,
)

GiB = 1 << 30
FUA, PAYLOAD_LEN, REQ_ONE = 1, 0x20, 0x08
DONE, NONE, OFFSET_DATA, OFFSET_HOLE, BLOCK_STATUS_EXT, ERROR = 1, 0, 1, 2, 6, 0x8001
FLAGS = TF.HAS_FLAGS | TF.SEND_FLUSH | TF.SEND_FUA | TF.SEND_TRIM | TF.SEND_WRITE_ZEROES | TF.SEND_CACHE
BIG = ExportInfo("big", 16 * GiB, FLAGS, min_block=512, max_payload=32 << 20)


def start(mode: TlsMode = TlsMode.OFF) -> ServerHandshake:
    hs = ServerHandshake(ExportCatalog([BIG]), mode)
    hs.data_to_send()
    assert hs.receive_data(client_flags(3)) == []
    return hs


def send(hs: ServerHandshake, *options: bytes) -> tuple[list[int], list]:
    events = hs.receive_data(b"".join(options))
    return [r.type for r in parse_option_replies(hs.data_to_send())], events


def go(hs: ServerHandshake) -> Negotiated:
    _, events = send(hs, option(Option.GO, info_request("big")))
    [result] = [e for e in events if isinstance(e, Negotiated)]
    return result


def allocation(hs: ServerHandshake) -> list[int]:
    types, _ = send(hs, option(Option.SET_META_CONTEXT, meta_request("big", BASE_ALLOCATION)))
    return types


# The option ----------------------------------------------------------------------------------


def test_extended_headers_are_acknowledged_and_imply_structured_replies() -> None:
    hs = start()
    assert send(hs, option(Option.EXTENDED_HEADERS))[0] == [OptionReply.ACK]
    result = go(hs)
    assert result.extended_headers and result.structured_replies
    assert result.flags & TF.SEND_DF
    assert not result.flags & TF.BLOCK_STATUS_PAYLOAD  # no context to name


def test_with_data_twice_or_after_structured_replies() -> None:
    hs = start()
    assert send(hs, option(Option.EXTENDED_HEADERS, b"\0"))[0] == [OptionReply.ERR_INVALID]
    assert send(hs, option(Option.STRUCTURED_REPLY))[0] == [OptionReply.ACK]  # may come first
    assert send(hs, option(Option.EXTENDED_HEADERS))[0] == [OptionReply.ACK]
    assert send(hs, option(Option.EXTENDED_HEADERS))[0] == [OptionReply.ERR_INVALID]
    assert go(hs).extended_headers


def test_structured_replies_after_them_are_refused_as_implied() -> None:
    hs = start()
    send(hs, option(Option.EXTENDED_HEADERS))
    assert send(hs, option(Option.STRUCTURED_REPLY))[0] == [OptionReply.ERR_EXT_HEADER_REQD]
    assert go(hs).extended_headers


@pytest.mark.parametrize("contexts_first", [True, False])
def test_contexts_set_either_side_stay_and_may_be_named(contexts_first: bool) -> None:
    hs = start()
    if contexts_first:
        send(hs, option(Option.STRUCTURED_REPLY))
        assert allocation(hs)[-1] == OptionReply.ACK
        send(hs, option(Option.EXTENDED_HEADERS))
    else:
        send(hs, option(Option.EXTENDED_HEADERS))
        assert allocation(hs)[-1] == OptionReply.ACK
    result = go(hs)
    assert result.meta_contexts == {1: BASE_ALLOCATION}
    assert result.flags & TF.BLOCK_STATUS_PAYLOAD


def test_info_says_block_status_may_name_contexts() -> None:
    hs = start()
    send(hs, option(Option.EXTENDED_HEADERS))
    hs.receive_data(option(Option.INFO, info_request("big")))
    [export] = [r for r in parse_option_replies(hs.data_to_send()) if r.type == OptionReply.INFO][:1]
    _, _, flags = struct.unpack(">HQH", export.data)
    assert flags & TF.BLOCK_STATUS_PAYLOAD


def test_without_them_nothing_changes() -> None:
    hs = start()
    send(hs, option(Option.STRUCTURED_REPLY))
    allocation(hs)
    result = go(hs)
    assert not result.extended_headers and not result.flags & TF.BLOCK_STATUS_PAYLOAD


def test_export_name_after_them_is_a_violation() -> None:
    hs = start()
    send(hs, option(Option.EXTENDED_HEADERS))
    with pytest.raises(ProtocolViolation):
        hs.receive_data(option(Option.EXPORT_NAME, b"big"))


def test_starttls_forgets_them() -> None:
    hs = start(TlsMode.ON)
    send(hs, option(Option.EXTENDED_HEADERS))
    _, events = send(hs, option(Option.STARTTLS))
    assert any(isinstance(e, StartTls) for e in events)
    hs.tls_started()
    assert not go(hs).extended_headers


# Requests ----------------------------------------------------------------------------------


def extended(contexts: bool = True, flags: TF = FLAGS) -> Transmission:
    flags |= TF.SEND_DF | (TF.BLOCK_STATUS_PAYLOAD if contexts else 0)
    return Transmission(Negotiated(BIG, flags, True, {1: BASE_ALLOCATION} if contexts else {}, True))


def check(tx: Transmission, header: RequestHeader) -> Error:
    error, message = tx.check(header)
    assert bool(message) == (error != Error.OK)
    return error


def test_headers_are_32_bytes_with_64_bit_lengths() -> None:
    tx = extended()
    assert tx.header_size == 32
    raw = ext_request(FUA, Command.TRIM, 0x0102030405060708, 4 * GiB, 8 * GiB)
    assert raw == encode_request_header(FUA, Command.TRIM, 0x0102030405060708, 4 * GiB, 8 * GiB, True)
    header = tx.parse_header(raw)
    assert (header.command, header.offset, header.length) == (Command.TRIM, 4 * GiB, 8 * GiB)
    assert tx.payload_length(header) == 0 and check(tx, header) == Error.OK


def test_the_other_header_form_is_a_violation() -> None:
    with pytest.raises(ProtocolViolation):
        extended().parse_header(request(0, Command.READ, 1, 0, 512) + bytes(4))
    compact = Transmission(Negotiated(BIG, FLAGS, True, {}))
    with pytest.raises(ProtocolViolation):
        compact.parse_header(ext_request(0, Command.READ, 1, 0, 512))


@pytest.mark.parametrize("command", [Command.TRIM, Command.WRITE_ZEROES, Command.CACHE, Command.BLOCK_STATUS])
def test_ranges_past_4_gib_are_served(command: Command) -> None:
    tx = extended()
    assert check(tx, RequestHeader(0, command, 1, 512, 16 * GiB - 512)) == Error.OK
    past_the_end = RequestHeader(0, command, 1, 512, 16 * GiB)
    assert check(tx, past_the_end) == (Error.EINVAL if command != Command.WRITE_ZEROES else Error.ENOSPC)


def test_transfers_stay_within_the_payload_limit() -> None:
    tx = extended()
    assert check(tx, RequestHeader(0, Command.READ, 1, 0, 5 * GiB)) == Error.EOVERFLOW
    with pytest.raises(ProtocolViolation):  # its payload is not read: the connection ends
        tx.payload_length(RequestHeader(PAYLOAD_LEN, Command.WRITE, 1, 0, 5 * GiB))
    write = RequestHeader(PAYLOAD_LEN, Command.WRITE, 1, 0, 4096)
    assert tx.payload_length(write) == 4096 and check(tx, write) == Error.OK


@pytest.mark.parametrize("command", [Command.READ, Command.TRIM, Command.FLUSH, Command.CACHE, 99])
def test_a_payload_where_none_belongs_is_read_and_refused(command: int) -> None:
    tx = extended()
    header = RequestHeader(PAYLOAD_LEN, command, 1, 0, 4096)
    assert tx.payload_length(header) == 4096
    assert check(tx, header) == Error.EINVAL
    with pytest.raises(ProtocolViolation):
        tx.payload_length(RequestHeader(PAYLOAD_LEN, command, 1, 0, MAX_DISCARDED_PAYLOAD + 1))


def test_payload_len_without_extended_headers_is_refused() -> None:
    compact = Transmission(Negotiated(BIG, FLAGS | TF.SEND_DF, True, {}))
    write = RequestHeader(PAYLOAD_LEN, Command.WRITE, 1, 0, 4096)
    assert compact.payload_length(write) == 4096 and check(compact, write) == Error.EINVAL
    assert compact.payload_length(RequestHeader(PAYLOAD_LEN, Command.TRIM, 1, 0, 4096)) == 0


def filtered(tx: Transmission, *ids: int, effect: int = 8 * GiB) -> RequestHeader:
    """A BLOCK_STATUS naming ``ids``, as the connection takes it: header and filter together."""
    payload = struct.pack(f">Q{len(ids)}I", effect, *ids)
    raw = ext_request(PAYLOAD_LEN, Command.BLOCK_STATUS, 7, 4096, len(payload)) + payload
    header = tx.parse_header(raw)
    taken = tx.filter_length(header)
    if taken:
        assert taken == len(payload)
        tx.take_filter(header, raw, 32)
    return header


def test_a_block_status_filter_is_taken_with_its_header() -> None:
    tx = extended()
    header = filtered(tx, 1)
    assert (header.length, header.contexts) == (8 * GiB, (1,))
    assert tx.payload_length(header) == 0 and check(tx, header) == Error.OK


@pytest.mark.parametrize("ids", [(2,), (0,), (1, 1), (1, 2)])
def test_a_filter_naming_a_context_twice_or_not_negotiated_is_refused(ids: tuple[int, ...]) -> None:
    tx = extended()
    header = filtered(tx, *ids)
    payload = tx.payload_length(header)
    assert payload == (0 if len(ids) == 1 else 8 + 4 * len(ids))  # longer ones are read and dropped
    assert check(tx, header) == Error.EINVAL


def test_a_filter_that_was_not_advertised_is_refused() -> None:
    tx = Transmission(Negotiated(BIG, FLAGS | TF.SEND_DF, True, {1: BASE_ALLOCATION}, True))
    header = filtered(tx, 1)
    assert header.contexts is None and tx.payload_length(header) == 12
    assert check(tx, header) == Error.EINVAL


@pytest.mark.parametrize("length", [0, 4, 8, 10, 13])
def test_a_filter_of_a_wrong_length_is_read_and_refused(length: int) -> None:
    tx = extended()
    header = RequestHeader(PAYLOAD_LEN, Command.BLOCK_STATUS, 1, 0, length)
    assert tx.filter_length(header) == 0 and tx.payload_length(header) == length
    assert check(tx, header) == Error.EINVAL


# Replies -----------------------------------------------------------------------------------


def chunks(buffers: list) -> list[ExtChunk]:
    return parse_ext_chunks(b"".join(bytes(b) for b in buffers))


def test_success_is_a_none_chunk_never_a_simple_reply() -> None:
    [chunk] = chunks(ExtendedReplies().ok(0x0102030405060708, 5 * GiB))
    assert chunk == ExtChunk(DONE, NONE, 0x0102030405060708, 5 * GiB, b"")


def test_an_error_chunk_echoes_the_offset() -> None:
    [chunk] = chunks(ExtendedReplies().error(9, 4096, Error.ENOSPC, "full"))
    assert (chunk.flags, chunk.type, chunk.cookie, chunk.offset) == (DONE, ERROR, 9, 4096)
    assert chunk.payload == struct.pack(">IH", Error.ENOSPC, 4) + b"full"


def test_a_read_with_holes_in_data_and_hole_chunks() -> None:
    data = b"a" * 4096 + bytes(8192) + b"b" * 4096
    out = ExtendedReplies().read(3, 6 * GiB, data, [(4096, False), (8192, True), (4096, False)])
    got = chunks(out)
    assert [c.type for c in got] == [OFFSET_DATA, OFFSET_HOLE, OFFSET_DATA]
    assert [c.flags for c in got] == [0, 0, DONE]
    assert {c.offset for c in got} == {6 * GiB}  # every header echoes the request's offset
    assert got[0].payload == struct.pack(">Q", 6 * GiB) + b"a" * 4096
    assert got[1].payload == struct.pack(">QI", 6 * GiB + 4096, 8192)
    assert got[2].payload == struct.pack(">Q", 6 * GiB + 12288) + b"b" * 4096
    assert out[1] is data or bytes(out[1]) == b"a" * 4096  # the data itself is not copied


def test_block_status_in_64_bit_descriptors() -> None:
    [chunk] = chunks(ExtendedReplies().block_status(5, 0, 1, [(6 * GiB, True), (4096, False)], 3))
    assert (chunk.flags, chunk.type, chunk.offset) == (DONE, BLOCK_STATUS_EXT, 0)
    assert parse_block_status_ext(chunk.payload) == (1, [(6 * GiB, 3), (4096, 0)])
    assert EXTENDED_REPLY_MAGIC == struct.unpack(">I", b"".join(ExtendedReplies().ok(1, 0))[:4])[0]
