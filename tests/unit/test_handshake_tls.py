"""NBD_OPT_STARTTLS in the handshake state machine: forced and selective TLS, driven with bytes only."""

from __future__ import annotations

import dataclasses

import pytest

from nbdserver.protocol import ExportCatalog, ServerHandshake, StartTls, TlsMode
from nbdserver.protocol.constants import Option, OptionReply
from nbdserver.protocol.errors import ProtocolViolation

from .test_handshake import DISK, FIXED, NO_ZEROES, RO, negotiated, send, types
from .wire import GREETING_MAGICS, client_flags, info_request, option

SECRET = dataclasses.replace(DISK, name="secret", tls_required=True)


def start(mode: TlsMode, exports: tuple = (DISK, RO)) -> ServerHandshake:
    hs = ServerHandshake(ExportCatalog(exports), tls=mode)
    assert hs.data_to_send().startswith(GREETING_MAGICS)
    assert hs.receive_data(client_flags(FIXED | NO_ZEROES)) == []
    return hs


def starttls(hs: ServerHandshake) -> None:
    replies, events = send(hs, option(Option.STARTTLS))
    assert types(replies) == [OptionReply.ACK]
    assert StartTls() in events
    assert not hs.tls_active
    hs.tls_started()
    assert hs.tls_active


def test_without_tls_starttls_is_refused_by_policy() -> None:
    hs = start(TlsMode.OFF)
    replies, events = send(hs, option(Option.STARTTLS))
    assert types(replies) == [OptionReply.ERR_POLICY]
    assert not any(isinstance(e, StartTls) for e in events)


@pytest.mark.parametrize(
    "opt, data",
    [
        (Option.LIST, b""),
        (Option.INFO, info_request("disk")),
        (Option.GO, info_request("disk")),
        (Option.STRUCTURED_REPLY, b""),
        (Option.LIST_META_CONTEXT, b"\0\0\0\0\0\0\0\0"),
        (99, b""),
    ],
)
def test_forced_tls_answers_every_option_but_starttls_with_tls_reqd(opt: int, data: bytes) -> None:
    hs = start(TlsMode.REQUIRE)
    replies, events = send(hs, option(opt, data))
    assert types(replies) == [OptionReply.ERR_TLS_REQD]
    assert negotiated(events) is None  # and no export was listed or described
    starttls(hs)
    replies, events = send(hs, option(Option.GO, info_request("disk")))
    assert types(replies)[-1] == OptionReply.ACK
    assert negotiated(events) is not None


def test_forced_tls_disconnects_export_name_in_the_clear() -> None:
    hs = start(TlsMode.REQUIRE)
    with pytest.raises(ProtocolViolation, match="TLS"):
        hs.receive_data(option(Option.EXPORT_NAME, b"disk"))


def test_forced_tls_still_takes_abort() -> None:
    hs = start(TlsMode.REQUIRE)
    replies, _ = send(hs, option(Option.ABORT))
    assert types(replies) == [OptionReply.ACK]


def test_selective_tls_guards_only_the_exports_that_require_it() -> None:
    hs = start(TlsMode.ON, (DISK, SECRET))
    replies, _ = send(hs, option(Option.INFO, info_request("secret")))
    assert types(replies) == [OptionReply.ERR_TLS_REQD]
    replies, _ = send(hs, option(Option.INFO, info_request("disk")))
    assert types(replies)[-1] == OptionReply.ACK
    with pytest.raises(ProtocolViolation, match="TLS"):
        start(TlsMode.ON, (DISK, SECRET)).receive_data(option(Option.EXPORT_NAME, b"secret"))
    starttls(hs)
    replies, events = send(hs, option(Option.GO, info_request("secret")))
    assert types(replies)[-1] == OptionReply.ACK
    assert negotiated(events).export.name == "secret"


def test_state_from_before_tls_is_forgotten() -> None:
    hs = start(TlsMode.ON)
    replies, _ = send(hs, option(Option.STRUCTURED_REPLY))
    assert types(replies) == [OptionReply.ACK]
    starttls(hs)
    _, events = send(hs, option(Option.GO, info_request("disk")))
    assert not negotiated(events).structured_replies  # negotiated in the clear: not carried over


def test_starttls_twice_or_with_data_is_invalid() -> None:
    hs = start(TlsMode.ON)
    replies, _ = send(hs, option(Option.STARTTLS, b"x"))
    assert types(replies) == [OptionReply.ERR_INVALID]
    starttls(hs)
    replies, _ = send(hs, option(Option.STARTTLS))
    assert types(replies) == [OptionReply.ERR_INVALID]


def test_plaintext_after_starttls_is_a_violation() -> None:
    """Bytes sent in the clear behind STARTTLS must never be taken as options from inside TLS."""
    hs = start(TlsMode.ON)
    with pytest.raises(ProtocolViolation, match="STARTTLS"):
        hs.receive_data(option(Option.STARTTLS) + option(Option.GO, info_request("disk")))
