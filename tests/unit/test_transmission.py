"""Request headers, payload lengths and the validation of transmission-phase requests."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nbdserver.protocol import (
    HEADER_SIZE,
    Command,
    CommandFlag,
    Error,
    ExportInfo,
    Negotiated,
    ProtocolViolation,
    RequestHeader,
    Transmission,
    constants,
)
from nbdserver.protocol.constants import BASE_ALLOCATION
from nbdserver.protocol.constants import TransmissionFlag as TF
from nbdserver.protocol.transmission import MAX_DISCARDED_PAYLOAD

from .wire import request

SIZE = 1 << 20
MAX_PAYLOAD = 64 * 1024
FUA, NO_HOLE, DF, REQ_ONE, FAST_ZERO = (CommandFlag(1 << bit) for bit in range(5))
BASE = TF.HAS_FLAGS | TF.SEND_FLUSH | TF.SEND_TRIM | TF.SEND_WRITE_ZEROES | TF.SEND_CACHE
EVERYTHING = BASE | TF.SEND_FUA | TF.SEND_FAST_ZERO
WRITING = (Command.WRITE, Command.TRIM, Command.WRITE_ZEROES)
RANGED = (Command.READ, Command.WRITE, Command.TRIM, Command.CACHE, Command.WRITE_ZEROES, Command.BLOCK_STATUS)


def test_the_plain_int_constants_are_the_enums():
    assert {c.name: int(c) for c in Command} == {
        name.removeprefix("CMD_"): getattr(constants, name) for name in dir(constants) if name.startswith("CMD_")
    }
    assert {f.name: int(f) for f in CommandFlag} == {
        name.removeprefix("FLAG_"): getattr(constants, name) for name in dir(constants) if name.startswith("FLAG_")
    }


def transmission(
    flags: TF = EVERYTHING, *, structured: bool = True, meta: bool | None = None, min_block: int = 1
) -> Transmission:
    """Terms as a handshake would produce them: SEND_DF and contexts only with structured replies."""
    if structured:
        flags |= TF.SEND_DF
    contexts = {1: BASE_ALLOCATION} if (structured if meta is None else meta) else {}
    export = ExportInfo("disk", SIZE, flags, min_block=min_block, max_payload=MAX_PAYLOAD)
    return Transmission(Negotiated(export, flags, structured, contexts))


def check(tx: Transmission, command: int, flags: int = 0, offset: int = 0, length: int | None = None) -> Error:
    """The error ``tx`` gives a request; a refusal always comes with a message."""
    if length is None:
        length = 0 if command in (Command.FLUSH, Command.DISC) else 4096
    error, message = tx.check(RequestHeader(flags, command, 0x1234, offset, length))
    assert isinstance(error, Error)
    assert bool(message) == (error != Error.OK), (error, message)
    return error


# Headers and payloads -------------------------------------------------------------------


def test_header_size() -> None:
    assert HEADER_SIZE == 28


def test_parse_header() -> None:
    raw = request(0x0501, 0x0007, 0x0102030405060708, 0x1122334455667788, 0xA0B0C0D0)
    assert transmission().parse_header(raw) == RequestHeader(
        flags=0x0501, command=7, cookie=0x0102030405060708, offset=0x1122334455667788, length=0xA0B0C0D0
    )
    assert transmission().parse_header(memoryview(bytearray(raw))).cookie == 0x0102030405060708


@pytest.mark.parametrize("magic", [0, 0x67446698, 0x13956025, 0x25609514])
def test_parse_header_bad_magic(magic: int) -> None:
    with pytest.raises(ProtocolViolation):
        transmission().parse_header(request(0, Command.READ, 1, 0, 512, magic=magic))


@pytest.mark.parametrize("length", [0, 1, 4096, MAX_DISCARDED_PAYLOAD])
def test_payload_length_of_write(length: int) -> None:
    assert transmission().payload_length(RequestHeader(0, Command.WRITE, 1, 0, length)) == length


def test_payload_length_of_huge_write_is_a_violation() -> None:
    with pytest.raises(ProtocolViolation):
        transmission().payload_length(RequestHeader(0, Command.WRITE, 1, 0, MAX_DISCARDED_PAYLOAD + 1))


@pytest.mark.parametrize("command", [c for c in Command if c != Command.WRITE] + [8, 0xFFFF])
def test_only_write_has_a_payload(command: int) -> None:
    """Without extended headers, whatever the flags (PAYLOAD_LEN included)."""
    tx = transmission()
    assert tx.payload_length(RequestHeader(0, command, 1, 0, 0xFFFFFFFF)) == 0
    assert tx.payload_length(RequestHeader(0xFFFF, command, 1, 0, 0xFFFFFFFF)) == 0


# Commands ----------------------------------------------------------------------------------


@pytest.mark.parametrize("command", list(Command))
def test_plain_request_is_accepted(command: Command) -> None:
    assert check(transmission(), command) == Error.OK


@pytest.mark.parametrize("command", [8, 9, 100, 0xFFFF])
def test_unknown_command(command: int) -> None:
    assert check(transmission(), command) == Error.EINVAL


@pytest.mark.parametrize(
    ("command", "advertised"),
    [(Command.FLUSH, TF.SEND_FLUSH), (Command.TRIM, TF.SEND_TRIM), (Command.WRITE_ZEROES, TF.SEND_WRITE_ZEROES)],
)
def test_command_needs_its_advertisement(command: Command, advertised: TF) -> None:
    assert check(transmission(EVERYTHING & ~advertised), command) == Error.EINVAL


# Command flags -----------------------------------------------------------------------------


def allowed_flags(command: Command, fua: bool, structured: bool, fast_zero: bool) -> CommandFlag:
    """Command flags the protocol document allows for ``command`` under these terms."""
    allowed = FUA if fua else CommandFlag(0)
    if command == Command.READ and structured:
        allowed |= DF
    if command == Command.BLOCK_STATUS:
        allowed |= REQ_ONE
    if command == Command.WRITE_ZEROES:
        allowed |= NO_HOLE | (FAST_ZERO if fast_zero else CommandFlag(0))
    return allowed


@pytest.mark.parametrize("command", list(Command))
@pytest.mark.parametrize("fua", [False, True], ids=["no-fua", "fua"])
@pytest.mark.parametrize("structured", [False, True], ids=["simple", "structured"])
@pytest.mark.parametrize("fast_zero", [False, True], ids=["no-fast-zero", "fast-zero"])
def test_every_combination_of_known_flags(command: Command, fua: bool, structured: bool, fast_zero: bool) -> None:
    flags = BASE | (TF.SEND_FUA if fua else 0) | (TF.SEND_FAST_ZERO if fast_zero else 0)
    tx = transmission(flags, structured=structured, meta=True)
    allowed = allowed_flags(command, fua, structured, fast_zero)
    for combo in range(1 << 5):
        expected = Error.EINVAL if combo & ~allowed else Error.OK
        assert check(tx, command, combo) == expected, f"{command.name} with {CommandFlag(combo)!r}"


@pytest.mark.parametrize("command", list(Command))
def test_fua_is_accepted_on_every_command_when_advertised(command: Command) -> None:
    assert check(transmission(EVERYTHING), command, FUA) == Error.OK
    assert check(transmission(EVERYTHING & ~TF.SEND_FUA), command, FUA) == Error.EINVAL


def test_df_only_with_structured_replies() -> None:
    assert check(transmission(structured=True), Command.READ, DF) == Error.OK
    assert check(transmission(structured=False), Command.READ, DF) == Error.EINVAL


def test_fast_zero_only_when_advertised() -> None:
    assert check(transmission(EVERYTHING), Command.WRITE_ZEROES, FAST_ZERO | NO_HOLE) == Error.OK
    assert check(transmission(EVERYTHING & ~TF.SEND_FAST_ZERO), Command.WRITE_ZEROES, FAST_ZERO) == Error.EINVAL


def test_undefined_flag_bits_are_invalid() -> None:
    tx = transmission(EVERYTHING)
    accepted = [(c.name, bit) for c in Command for bit in range(5, 16) if check(tx, c, 1 << bit) != Error.EINVAL]
    assert accepted == []


# Read-only exports -------------------------------------------------------------------------

READ_ONLY = BASE | TF.READ_ONLY | TF.SEND_FUA


@pytest.mark.parametrize("command", WRITING)
def test_writing_to_read_only_export(command: Command) -> None:
    assert check(transmission(READ_ONLY), command) == Error.EPERM
    assert check(transmission(READ_ONLY), command, FUA) == Error.EPERM


@pytest.mark.parametrize("command", [c for c in Command if c not in WRITING])
def test_reading_from_read_only_export(command: Command) -> None:
    assert check(transmission(READ_ONLY), command) == Error.OK


# Ranges ------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", RANGED)
def test_request_ending_at_the_end_is_accepted(command: Command) -> None:
    assert check(transmission(), command, offset=SIZE - 4096, length=4096) == Error.OK


@pytest.mark.parametrize(
    ("command", "error"),
    [
        (Command.WRITE, Error.ENOSPC),
        (Command.WRITE_ZEROES, Error.ENOSPC),
        (Command.READ, Error.EINVAL),
        (Command.TRIM, Error.EINVAL),
        (Command.CACHE, Error.EINVAL),
        (Command.BLOCK_STATUS, Error.EINVAL),
    ],
)
@pytest.mark.parametrize(
    ("offset", "length"),
    [(SIZE - 4096, 4097), (SIZE, 1), (SIZE + 4096, 4096), (2**64 - 1, 4096), (SIZE + 1, 0)],
    ids=["overlapping", "at-end", "past-end", "huge-offset", "empty-past-end"],
)
def test_request_beyond_the_end(command: Command, error: Error, offset: int, length: int) -> None:
    if command == Command.BLOCK_STATUS and length == 0:
        error = Error.EINVAL  # zero length is refused anyway
    assert check(transmission(), command, offset=offset, length=length) == error


def test_read_longer_than_max_payload() -> None:
    tx = transmission()
    assert check(tx, Command.READ, length=MAX_PAYLOAD) == Error.OK
    assert check(tx, Command.READ, length=MAX_PAYLOAD + 1) == Error.EOVERFLOW
    assert check(tx, Command.READ, DF, length=MAX_PAYLOAD + 1) == Error.EOVERFLOW


def test_write_longer_than_max_payload() -> None:
    tx = transmission()
    assert check(tx, Command.WRITE, length=MAX_PAYLOAD) == Error.OK
    assert check(tx, Command.WRITE, length=MAX_PAYLOAD + 1) == Error.EINVAL


@pytest.mark.parametrize("command", [Command.TRIM, Command.WRITE_ZEROES, Command.CACHE, Command.BLOCK_STATUS])
def test_payload_limit_is_only_for_read_and_write(command: Command) -> None:
    assert check(transmission(), command, length=SIZE) == Error.OK


@pytest.mark.parametrize(("offset", "length"), [(0, 0), (4096, 0), (0, 4096), (1, 1)])
def test_flush_with_a_range(offset: int, length: int) -> None:
    expected = Error.OK if offset == length == 0 else Error.EINVAL
    assert check(transmission(), Command.FLUSH, offset=offset, length=length) == expected


@pytest.mark.parametrize(("offset", "length"), [(0, 512), (512, 1024), (1, 512), (512, 100), (511, 1)])
@pytest.mark.parametrize("command", [Command.READ, Command.WRITE])
def test_alignment_to_minimum_block(command: Command, offset: int, length: int) -> None:
    expected = Error.EINVAL if (offset % 512 or length % 512) else Error.OK
    assert check(transmission(min_block=512), command, offset=offset, length=length) == expected
    assert check(transmission(min_block=1), command, offset=offset, length=length) == Error.OK


# BLOCK_STATUS ----------------------------------------------------------------------------


def test_block_status_needs_a_metadata_context() -> None:
    assert check(transmission(structured=True, meta=False), Command.BLOCK_STATUS) == Error.EINVAL
    assert check(transmission(structured=False), Command.BLOCK_STATUS) == Error.EINVAL
    assert check(transmission(structured=True, meta=True), Command.BLOCK_STATUS, REQ_ONE) == Error.OK


def test_block_status_of_zero_length() -> None:
    assert check(transmission(), Command.BLOCK_STATUS, offset=0, length=0) == Error.EINVAL
    assert check(transmission(), Command.BLOCK_STATUS, offset=0, length=1) == Error.OK


def test_terms_come_from_the_negotiation() -> None:
    tx = transmission(READ_ONLY, structured=True)
    assert tx.size == SIZE
    assert tx.read_only
    assert tx.structured_replies
    assert tx.max_payload == MAX_PAYLOAD
    assert tx.meta_contexts == {1: BASE_ALLOCATION}
    assert not transmission(EVERYTHING, structured=False).read_only


def test_refuse_writes_turns_a_writable_connection_read_only() -> None:
    tx = transmission()
    assert check(tx, Command.WRITE) == Error.OK
    tx.refuse_writes()
    for command in WRITING:
        assert check(tx, command) == Error.EPERM
    assert check(tx, Command.READ) == Error.OK


@settings(max_examples=2000, deadline=None)
@given(
    command=st.sampled_from([Command.READ, Command.WRITE]) | st.integers(0, 12),
    flags=st.sampled_from([0, int(FUA), int(DF), int(FUA | DF)]) | st.integers(0, 0xFFFF),
    offset=st.sampled_from([0, 512, 4096, SIZE - 4096, SIZE, SIZE + 4096, 2**64 - 4096]) | st.integers(0, 2**64 - 1),
    length=st.sampled_from([0, 1, 512, 4096, MAX_PAYLOAD, MAX_PAYLOAD + 4096, SIZE]) | st.integers(0, 2**32 - 1),
    read_only=st.booleans(),
    min_block=st.sampled_from([1, 512, 4096]),
)
def test_the_quick_check_of_reads_and_writes_agrees_with_the_full_one(
    command: int, flags: int, offset: int, length: int, read_only: bool, min_block: int
) -> None:
    tx = transmission(EVERYTHING | TF.READ_ONLY if read_only else EVERYTHING, min_block=min_block)
    quick, _ = tx.check(RequestHeader(flags, command, 1, offset, length))
    full, _ = tx._check_slowly(command, flags, offset, length, None)
    assert quick == full
