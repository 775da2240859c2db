"""The fixed newstyle handshake state machine, driven with bytes only."""

from __future__ import annotations

import struct
import tracemalloc

import pytest

from nbdserver.protocol import Aborted, ExportCatalog, ExportInfo, Negotiated, OptionSeen, ServerHandshake
from nbdserver.protocol.constants import BASE_ALLOCATION, Info, Option, OptionReply
from nbdserver.protocol.constants import TransmissionFlag as TF
from nbdserver.protocol.errors import ProtocolViolation
from nbdserver.protocol.handshake import MAX_OPTION_DATA, Event

from .wire import (
    GREETING_MAGICS,
    OptReply,
    client_flags,
    info_request,
    meta_request,
    nbd_string,
    option,
    parse_option_replies,
)

FIXED, NO_ZEROES = 1, 2

DISK = ExportInfo(
    "disk",
    1 << 20,
    TF.HAS_FLAGS | TF.SEND_FLUSH | TF.SEND_FUA | TF.SEND_TRIM,
    description="main disk",
    min_block=512,
    preferred_block=8192,
    max_payload=1 << 21,
)
RO = ExportInfo("ro", 3 * 4096, TF.HAS_FLAGS | TF.READ_ONLY)


def start(flags: int = FIXED | NO_ZEROES, catalog: ExportCatalog | None = None) -> ServerHandshake:
    """A handshake past the greeting and the client flags."""
    hs = ServerHandshake(catalog or ExportCatalog([DISK, RO]))
    assert hs.data_to_send().startswith(GREETING_MAGICS)
    assert hs.receive_data(client_flags(flags)) == []
    assert hs.data_to_send() == b""
    return hs


def send(hs: ServerHandshake, *options: bytes) -> tuple[list[OptReply], list[Event]]:
    events = hs.receive_data(b"".join(options))
    return parse_option_replies(hs.data_to_send()), events


def types(replies: list[OptReply]) -> list[int]:
    return [r.type for r in replies]


def negotiated(events: list[Event]) -> Negotiated | None:
    found = [e for e in events if isinstance(e, Negotiated)]
    assert len(found) <= 1
    return found[0] if found else None


def infos(replies: list[OptReply]) -> dict[int, bytes]:
    """NBD_REP_INFO payloads by information type; each type at most once."""
    items = [(struct.unpack(">H", r.data[:2])[0], r.data[2:]) for r in replies if r.type == OptionReply.INFO]
    result = dict(items)
    assert len(result) == len(items), "an information type was sent twice"
    return result


def contexts(replies: list[OptReply]) -> list[tuple[int, str]]:
    return [
        (struct.unpack(">I", r.data[:4])[0], r.data[4:].decode()) for r in replies if r.type == OptionReply.META_CONTEXT
    ]


def go_disk(hs: ServerHandshake, name: str = "disk") -> Negotiated:
    replies, events = send(hs, option(Option.GO, info_request(name)))
    assert types(replies)[-1] == OptionReply.ACK
    result = negotiated(events)
    assert result is not None and hs.done
    return result


def assert_still_negotiating(hs: ServerHandshake) -> None:
    """The handshake goes on: a following GO still succeeds."""
    assert not hs.done
    assert go_disk(hs).export == DISK


# Greeting and client flags ----------------------------------------------------------


def test_greeting_bytes() -> None:
    hs = ServerHandshake(ExportCatalog([DISK]))
    assert hs.data_to_send() == b"NBDMAGIC" + b"IHAVEOPT" + b"\x00\x03"
    assert hs.data_to_send() == b""
    assert not hs.done


@pytest.mark.parametrize("flags", [0, FIXED, NO_ZEROES, FIXED | NO_ZEROES])
def test_known_client_flags_are_accepted(flags: int) -> None:
    hs = start(flags)
    assert hs.no_zeroes == bool(flags & NO_ZEROES)


def accepts_client_flags(flags: int) -> bool:
    try:
        ServerHandshake(ExportCatalog([DISK])).receive_data(client_flags(flags))
    except ProtocolViolation:
        return False
    return True


def test_unknown_client_flags_are_a_violation() -> None:
    accepted = [hex(f) for f in (1 << 2, 1 << 31, FIXED | NO_ZEROES | 1 << 7) if accepts_client_flags(f)]
    assert accepted == []


def test_bad_option_magic_is_a_violation() -> None:
    hs = start()
    with pytest.raises(ProtocolViolation):
        hs.receive_data(b"IHAVEOPS" + struct.pack(">II", Option.LIST, 0))


def test_partial_option_header_waits_for_more() -> None:
    hs = start()
    raw = option(Option.LIST)
    assert hs.receive_data(raw[:-1]) == []
    assert hs.data_to_send() == b""
    replies, _ = send(hs, raw[-1:])
    assert types(replies) == [OptionReply.SERVER, OptionReply.SERVER, OptionReply.ACK]


# NBD_OPT_EXPORT_NAME ----------------------------------------------------------------


@pytest.mark.parametrize(("flags", "padding"), [(FIXED, bytes(124)), (FIXED | NO_ZEROES, b"")])
def test_export_name_reply(flags: int, padding: bytes) -> None:
    hs = start(flags)
    events = hs.receive_data(option(Option.EXPORT_NAME, b"disk"))
    assert hs.data_to_send() == struct.pack(">QH", DISK.size, DISK.flags | TF.HAS_FLAGS) + padding
    assert hs.done
    assert negotiated(events) == Negotiated(DISK, DISK.flags, structured_replies=False, meta_contexts={})


def test_export_name_empty_means_default() -> None:
    hs = start()
    events = hs.receive_data(option(Option.EXPORT_NAME))
    assert hs.data_to_send() == struct.pack(">QH", DISK.size, DISK.flags)
    assert negotiated(events).export == DISK


def test_export_name_unknown_is_a_violation() -> None:
    hs = start()
    with pytest.raises(ProtocolViolation):
        hs.receive_data(option(Option.EXPORT_NAME, b"nope"))


def test_export_name_too_long_is_a_violation_before_its_data() -> None:
    hs = start()
    with pytest.raises(ProtocolViolation):
        hs.receive_data(b"IHAVEOPT" + struct.pack(">II", Option.EXPORT_NAME, MAX_OPTION_DATA + 1))


def test_export_name_after_structured_reply_has_send_df() -> None:
    hs = start()
    send(hs, option(Option.STRUCTURED_REPLY))
    events = hs.receive_data(option(Option.EXPORT_NAME, b"ro"))
    size, flags = struct.unpack(">QH", hs.data_to_send())
    assert (size, flags) == (RO.size, RO.flags | TF.SEND_DF)
    assert negotiated(events) == Negotiated(RO, RO.flags | TF.SEND_DF, structured_replies=True)


# NBD_OPT_ABORT, NBD_OPT_STARTTLS, unknown options -----------------------------------


@pytest.mark.parametrize("data", [b"", b"ignored"])
def test_abort(data: bytes) -> None:
    hs = start()
    replies, events = send(hs, option(Option.ABORT, data))
    assert replies == [OptReply(Option.ABORT, OptionReply.ACK, b"")]
    assert Aborted() in events
    assert negotiated(events) is None
    assert hs.done


def test_starttls_is_refused_by_policy() -> None:
    hs = start()
    replies, events = send(hs, option(Option.STARTTLS))
    assert [(r.option, r.type) for r in replies] == [(Option.STARTTLS, OptionReply.ERR_POLICY)]
    assert OptionSeen(Option.STARTTLS, OptionReply.ERR_POLICY) in events
    assert_still_negotiating(hs)


@pytest.mark.parametrize("opt", [0, Option.PEEK_EXPORT, 12, 0xFFFFFFFF])
def test_unknown_option_is_unsupported(opt: int) -> None:
    hs = start()
    replies, events = send(hs, option(opt, b"some data"))
    assert [(r.option, r.type) for r in replies] == [(opt, OptionReply.ERR_UNSUP)]
    assert events == [OptionSeen(opt, OptionReply.ERR_UNSUP)]
    assert_still_negotiating(hs)


# Over-long options -------------------------------------------------------------------


def test_option_data_at_the_limit_is_read_and_parsed() -> None:
    hs = start()
    replies, _ = send(hs, option(Option.LIST, bytes(MAX_OPTION_DATA)))
    assert types(replies) == [OptionReply.ERR_INVALID]
    assert_still_negotiating(hs)


def test_overlong_option_is_skipped_and_answered_too_big() -> None:
    hs = start()
    length = MAX_OPTION_DATA + 1
    assert hs.receive_data(b"IHAVEOPT" + struct.pack(">II", 99, length)) == []
    assert hs.receive_data(bytes(length - 1)) == []
    assert hs.data_to_send() == b"", "answered before all data was skipped"
    # The last skipped byte and the next option arrive together.
    replies, events = send(hs, b"\xff" + option(Option.GO, info_request("disk")))
    assert [(r.option, r.type) for r in replies[:1]] == [(99, OptionReply.ERR_TOO_BIG)]
    assert OptionSeen(99, OptionReply.ERR_TOO_BIG) in events
    assert types(replies)[-1] == OptionReply.ACK
    assert negotiated(events).export == DISK


def test_overlong_option_is_not_buffered() -> None:
    hs = start()
    chunk = bytes(1 << 20)
    count = 64
    hs.receive_data(b"IHAVEOPT" + struct.pack(">II", Option.LIST, count * len(chunk)))
    tracemalloc.start()
    try:
        for _ in range(count):
            hs.receive_data(chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * len(chunk), f"peak {peak} bytes while skipping {count} MiB"
    replies, _ = send(hs)
    assert types(replies) == [OptionReply.ERR_TOO_BIG]
    assert_still_negotiating(hs)


# NBD_OPT_LIST --------------------------------------------------------------------------


def test_list_sends_one_server_reply_per_export() -> None:
    hs = start()
    replies, events = send(hs, option(Option.LIST))
    assert replies == [
        OptReply(Option.LIST, OptionReply.SERVER, nbd_string("disk") + b"main disk"),
        OptReply(Option.LIST, OptionReply.SERVER, nbd_string("ro")),
        OptReply(Option.LIST, OptionReply.ACK, b""),
    ]
    assert events == [OptionSeen(Option.LIST, OptionReply.ACK)]
    assert_still_negotiating(hs)


def test_list_with_data_is_invalid() -> None:
    hs = start()
    replies, _ = send(hs, option(Option.LIST, b"x"))
    assert [(r.option, r.type) for r in replies] == [(Option.LIST, OptionReply.ERR_INVALID)]
    assert_still_negotiating(hs)


# NBD_OPT_INFO and NBD_OPT_GO -------------------------------------------------------


@pytest.mark.parametrize("opt", [Option.INFO, Option.GO])
def test_info_go_describes_the_export(opt: Option) -> None:
    hs = start()
    replies, events = send(hs, option(opt, info_request("disk")))
    assert all(r.option == opt for r in replies)
    assert types(replies)[-1] == OptionReply.ACK
    assert set(types(replies[:-1])) == {OptionReply.INFO}
    found = infos(replies)
    assert found[Info.EXPORT] == struct.pack(">QH", DISK.size, DISK.flags)
    assert found[Info.BLOCK_SIZE] == struct.pack(">III", 512, 8192, 1 << 21)
    assert Info.NAME not in found
    assert Info.DESCRIPTION not in found
    assert OptionSeen(opt, OptionReply.ACK) in events


def test_go_ends_the_handshake() -> None:
    hs = start()
    _, events = send(hs, option(Option.GO, info_request("ro")))
    assert hs.done
    assert negotiated(events) == Negotiated(RO, RO.flags, structured_replies=False, meta_contexts={})


def test_info_does_not_end_the_handshake() -> None:
    hs = start()
    _, events = send(hs, option(Option.INFO, info_request("ro")))
    assert negotiated(events) is None
    assert_still_negotiating(hs)


def test_go_after_info_repeats_the_same_information() -> None:
    hs = start()
    request = info_request("disk", Info.NAME, Info.DESCRIPTION, Info.BLOCK_SIZE)
    info_replies, _ = send(hs, option(Option.INFO, request))
    go_replies, _ = send(hs, option(Option.GO, request))
    assert infos(info_replies) == infos(go_replies)
    assert len(infos(go_replies)) == 4


@pytest.mark.parametrize("opt", [Option.INFO, Option.GO])
def test_info_go_name_and_description_on_request(opt: Option) -> None:
    hs = start()
    replies, _ = send(hs, option(opt, info_request("disk", Info.DESCRIPTION, Info.NAME, 0x7FFF)))
    found = infos(replies)
    assert found[Info.NAME] == b"disk"
    assert found[Info.DESCRIPTION] == b"main disk"
    assert 0x7FFF not in found
    assert types(replies)[-1] == OptionReply.ACK


@pytest.mark.parametrize("opt", [Option.INFO, Option.GO])
def test_info_go_empty_name_is_default_with_canonical_name(opt: Option) -> None:
    hs = start()
    replies, events = send(hs, option(opt, info_request("")))
    found = infos(replies)
    assert found[Info.EXPORT] == struct.pack(">QH", DISK.size, DISK.flags)
    assert found[Info.NAME] == b"disk"
    assert hs.done == (opt == Option.GO)
    if opt == Option.GO:
        assert negotiated(events).export == DISK


def test_explicit_default_export() -> None:
    hs = start(catalog=ExportCatalog([DISK, RO], default="ro"))
    replies, _ = send(hs, option(Option.INFO, info_request("")))
    assert infos(replies)[Info.NAME] == b"ro"


@pytest.mark.parametrize("opt", [Option.INFO, Option.GO])
def test_info_go_unknown_export(opt: Option) -> None:
    hs = start()
    replies, events = send(hs, option(opt, info_request("nope")))
    assert [(r.option, r.type) for r in replies] == [(opt, OptionReply.ERR_UNKNOWN)]
    assert events == [OptionSeen(opt, OptionReply.ERR_UNKNOWN)]
    assert_still_negotiating(hs)


def test_default_name_without_exports_is_unknown() -> None:
    hs = start(catalog=ExportCatalog([]))
    replies, _ = send(hs, option(Option.GO, info_request("")))
    assert types(replies) == [OptionReply.ERR_UNKNOWN]
    assert not hs.done


MALFORMED_INFO = {
    "empty": b"",
    "short name length": b"\x00\x00",
    "no request count": nbd_string("disk"),
    "name beyond data": struct.pack(">I", 10) + b"disk" + b"\x00\x00",
    "count too large": nbd_string("disk") + struct.pack(">HH", 2, Info.NAME),
    "count too small": nbd_string("disk") + struct.pack(">HH", 0, Info.NAME),
    "odd trailing byte": info_request("disk") + b"\x00",
    "name over 4096 bytes": info_request("d" * 4097),
}


@pytest.mark.parametrize("opt", [Option.INFO, Option.GO])
@pytest.mark.parametrize("data", MALFORMED_INFO.values(), ids=MALFORMED_INFO.keys())
def test_info_go_malformed_is_invalid(opt: Option, data: bytes) -> None:
    hs = start()
    replies, events = send(hs, option(opt, data))
    assert [(r.option, r.type) for r in replies] == [(opt, OptionReply.ERR_INVALID)]
    assert events == [OptionSeen(opt, OptionReply.ERR_INVALID)]
    assert_still_negotiating(hs)


def test_error_message_stays_valid_utf8_when_truncated() -> None:
    hs = start()
    # Valid names of 4096 and 4095 bytes; the messages quoting them are longer than 4096 bytes, and
    # whatever the length of the text around the name, one of the two is cut inside a character.
    for name in ("é" * 2048, "a" + "é" * 2047):
        replies, _ = send(hs, option(Option.INFO, info_request(name)))
        assert types(replies) == [OptionReply.ERR_UNKNOWN]
        assert len(replies[0].data) <= 4096
        replies[0].data.decode("utf-8")


# NBD_OPT_STRUCTURED_REPLY ------------------------------------------------------------


def test_structured_reply() -> None:
    hs = start()
    replies, events = send(hs, option(Option.STRUCTURED_REPLY))
    assert replies == [OptReply(Option.STRUCTURED_REPLY, OptionReply.ACK, b"")]
    assert events == [OptionSeen(Option.STRUCTURED_REPLY, OptionReply.ACK)]
    result = go_disk(hs)
    assert result.structured_replies
    assert result.flags == DISK.flags | TF.SEND_DF


def test_structured_reply_twice_is_invalid() -> None:
    hs = start()
    replies, _ = send(hs, option(Option.STRUCTURED_REPLY), option(Option.STRUCTURED_REPLY))
    assert types(replies) == [OptionReply.ACK, OptionReply.ERR_INVALID]
    assert go_disk(hs).structured_replies


def test_structured_reply_with_data_is_invalid() -> None:
    hs = start()
    replies, _ = send(hs, option(Option.STRUCTURED_REPLY, b"\x00"))
    assert types(replies) == [OptionReply.ERR_INVALID]
    result = go_disk(hs)
    assert not result.structured_replies
    assert not result.flags & TF.SEND_DF


def test_send_df_only_with_structured_replies() -> None:
    plain = start()
    plain_replies, _ = send(plain, option(Option.INFO, info_request("disk")))
    structured = start()
    structured_replies, _ = send(structured, option(Option.STRUCTURED_REPLY), option(Option.INFO, info_request("disk")))
    (_, plain_flags) = struct.unpack(">QH", infos(plain_replies)[Info.EXPORT])
    (_, structured_flags) = struct.unpack(">QH", infos(structured_replies)[Info.EXPORT])
    assert not plain_flags & TF.SEND_DF
    assert structured_flags == plain_flags | TF.SEND_DF


# Metadata contexts -------------------------------------------------------------------


def structured() -> ServerHandshake:
    hs = start()
    send(hs, option(Option.STRUCTURED_REPLY))
    return hs


@pytest.mark.parametrize(
    ("queries", "listed"),
    [
        ((), True),
        (("base:",), True),
        (("base:allocation",), True),
        (("x-foo:bar", "base:"), True),
        (("base:other",), False),
        (("x-foo:bar", "qemu:dirty-bitmap:a"), False),
    ],
)
@pytest.mark.parametrize("negotiate_structured", [False, True])
def test_list_meta_context(queries: tuple[str, ...], listed: bool, negotiate_structured: bool) -> None:
    hs = structured() if negotiate_structured else start()
    replies, _ = send(hs, option(Option.LIST_META_CONTEXT, meta_request("disk", *queries)))
    assert all(r.option == Option.LIST_META_CONTEXT for r in replies)
    assert types(replies)[-1] == OptionReply.ACK
    assert [name for _, name in contexts(replies)] == ([BASE_ALLOCATION] if listed else [])
    assert_still_negotiating(hs)


@pytest.mark.parametrize(
    ("queries", "selected"),
    [
        (("base:allocation",), True),
        (("x-foo:bar", "base:allocation", "base:allocation"), True),
        ((), False),
        (("base:",), False),
        (("base:other", "x-foo:bar"), False),
    ],
)
def test_set_meta_context(queries: tuple[str, ...], selected: bool) -> None:
    hs = structured()
    replies, _ = send(hs, option(Option.SET_META_CONTEXT, meta_request("disk", *queries)))
    assert types(replies)[-1] == OptionReply.ACK
    found = contexts(replies)
    assert [name for _, name in found] == ([BASE_ALLOCATION] if selected else [])
    assert go_disk(hs).meta_contexts == dict(found)


def test_set_meta_context_before_structured_reply_is_invalid() -> None:
    hs = start()
    replies, _ = send(hs, option(Option.SET_META_CONTEXT, meta_request("disk", BASE_ALLOCATION)))
    assert types(replies) == [OptionReply.ERR_INVALID]
    assert go_disk(hs).meta_contexts == {}


@pytest.mark.parametrize("opt", [Option.LIST_META_CONTEXT, Option.SET_META_CONTEXT])
@pytest.mark.parametrize(
    "data",
    [
        meta_request("disk", "allocation"),
        meta_request("disk", BASE_ALLOCATION, "nocolon"),
        meta_request("disk")[:-1],
        meta_request("disk", BASE_ALLOCATION) + b"\x00",
        meta_request("disk", BASE_ALLOCATION)[:-1],
        nbd_string("disk") + struct.pack(">I", 2) + nbd_string(BASE_ALLOCATION),
        meta_request("disk", "x:" + "q" * 4095),
    ],
    ids=["no colon", "second without colon", "no count", "trailing", "short query", "count too large", "long query"],
)
def test_meta_context_malformed_is_invalid(opt: Option, data: bytes) -> None:
    hs = structured()
    replies, _ = send(hs, option(opt, data))
    assert [(r.option, r.type) for r in replies] == [(opt, OptionReply.ERR_INVALID)]
    assert_still_negotiating(hs)


@pytest.mark.parametrize("opt", [Option.LIST_META_CONTEXT, Option.SET_META_CONTEXT])
def test_meta_context_unknown_export(opt: Option) -> None:
    hs = structured()
    replies, _ = send(hs, option(opt, meta_request("nope", BASE_ALLOCATION)))
    assert types(replies) == [OptionReply.ERR_UNKNOWN]
    assert go_disk(hs).meta_contexts == {}


@pytest.mark.parametrize(
    ("set_name", "go_name", "kept"),
    [("disk", "disk", True), ("", "", True), ("ro", "disk", False), ("", "disk", False), ("disk", "", False)],
)
def test_meta_contexts_count_only_for_the_same_export_name(set_name: str, go_name: str, kept: bool) -> None:
    hs = structured()
    replies, _ = send(hs, option(Option.SET_META_CONTEXT, meta_request(set_name, BASE_ALLOCATION)))
    [(context_id, _)] = contexts(replies)
    assert go_disk(hs, go_name).meta_contexts == ({context_id: BASE_ALLOCATION} if kept else {})


def test_set_meta_context_id_is_not_the_reserved_list_id() -> None:
    hs = structured()
    listed, _ = send(hs, option(Option.LIST_META_CONTEXT, meta_request("disk")))
    selected, _ = send(hs, option(Option.SET_META_CONTEXT, meta_request("disk", BASE_ALLOCATION)))
    assert contexts(listed) == [(0, BASE_ALLOCATION)]
    [(context_id, _)] = contexts(selected)
    assert context_id != 0


@pytest.mark.parametrize(
    "second",
    [
        meta_request("disk"),  # selects nothing
        meta_request("disk", "nocolon"),  # fails
        meta_request("nope", BASE_ALLOCATION),  # fails
    ],
    ids=["empty", "invalid", "unknown export"],
)
def test_set_meta_context_replaces_earlier_selection(second: bytes) -> None:
    hs = structured()
    send(hs, option(Option.SET_META_CONTEXT, meta_request("disk", BASE_ALLOCATION)))
    send(hs, option(Option.SET_META_CONTEXT, second))
    assert go_disk(hs).meta_contexts == {}


def test_list_meta_context_keeps_earlier_selection() -> None:
    hs = structured()
    send(hs, option(Option.SET_META_CONTEXT, meta_request("disk", BASE_ALLOCATION)))
    send(hs, option(Option.LIST_META_CONTEXT, meta_request("ro")))
    assert list(go_disk(hs).meta_contexts.values()) == [BASE_ALLOCATION]


def test_meta_contexts_kept_with_export_name_of_the_same_name() -> None:
    hs = structured()
    replies, _ = send(hs, option(Option.SET_META_CONTEXT, meta_request("disk", BASE_ALLOCATION)))
    [(context_id, _)] = contexts(replies)
    events = hs.receive_data(option(Option.EXPORT_NAME, b"disk"))
    assert negotiated(events).meta_contexts == {context_id: BASE_ALLOCATION}


# End of the handshake ------------------------------------------------------------------


@pytest.mark.parametrize(
    "final",
    [option(Option.GO, info_request("disk")), option(Option.EXPORT_NAME, b"disk"), option(Option.ABORT)],
    ids=["go", "export_name", "abort"],
)
def test_trailing_data_holds_bytes_after_the_handshake(final: bytes) -> None:
    hs = start()
    after = b"\x25\x60\x95\x13 first request" + option(Option.LIST)
    events = hs.receive_data(option(Option.LIST) + final + after)
    assert hs.done
    assert hs.trailing_data == after
    assert OptionSeen(Option.LIST, OptionReply.ACK) in events


def test_trailing_data_empty_when_nothing_follows() -> None:
    hs = start()
    go_disk(hs)
    assert hs.trailing_data == b""


def test_receive_after_the_end_is_an_error() -> None:
    hs = start()
    go_disk(hs)
    with pytest.raises(RuntimeError):
        hs.receive_data(b"x")
