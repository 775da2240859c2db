"""OS errors mapped onto NBD errors, and the protocol numbers checked against the protocol document."""

from __future__ import annotations

import errno

import pytest

from nbdserver.protocol import Error, error_from_errno
from nbdserver.protocol.constants import (
    IHAVEOPT,
    NBDMAGIC,
    OPTION_REPLY_MAGIC,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    ChunkType,
    Command,
    CommandFlag,
    Info,
    Option,
    OptionReply,
    TransmissionFlag,
)


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (errno.EPERM, Error.EPERM),
        (errno.EACCES, Error.EPERM),
        (errno.EROFS, Error.EPERM),
        (errno.EIO, Error.EIO),
        (errno.ENOMEM, Error.ENOMEM),
        (errno.EINVAL, Error.EINVAL),
        (errno.ENOSPC, Error.ENOSPC),
        (errno.EDQUOT, Error.ENOSPC),
        (errno.EFBIG, Error.ENOSPC),
        (errno.EOVERFLOW, Error.EOVERFLOW),
        (errno.ENOTSUP, Error.ENOTSUP),
        (errno.EOPNOTSUPP, Error.ENOTSUP),
        (errno.ESHUTDOWN, Error.ESHUTDOWN),
    ],
)
def test_error_from_errno(code: int, expected: Error) -> None:
    assert error_from_errno(code) == expected


@pytest.mark.parametrize("code", [errno.ENOENT, errno.EBADF, errno.EAGAIN, errno.ENXIO, errno.ETIMEDOUT, 0, 99999])
def test_unlisted_errno_is_eio(code: int) -> None:
    assert error_from_errno(code) == Error.EIO


def test_every_mapped_value_is_an_nbd_error() -> None:
    spec_values = {1, 5, 12, 22, 28, 75, 95, 108}
    assert {int(error_from_errno(code)) for code in errno.errorcode} <= spec_values
    assert {int(e) for e in Error} == spec_values | {0}


def test_magic_numbers() -> None:
    assert NBDMAGIC.to_bytes(8, "big") == b"NBDMAGIC"
    assert IHAVEOPT.to_bytes(8, "big") == b"IHAVEOPT"
    assert OPTION_REPLY_MAGIC == 0x3E889045565A9
    assert (REQUEST_MAGIC, SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC) == (0x25609513, 0x67446698, 0x668E33EF)


@pytest.mark.parametrize(
    ("enum", "values"),
    [
        (Option, {"EXPORT_NAME": 1, "ABORT": 2, "LIST": 3, "STARTTLS": 5, "INFO": 6, "GO": 7}),
        (Option, {"STRUCTURED_REPLY": 8, "LIST_META_CONTEXT": 9, "SET_META_CONTEXT": 10}),
        (OptionReply, {"ACK": 1, "SERVER": 2, "INFO": 3, "META_CONTEXT": 4}),
        (OptionReply, {"ERR_UNSUP": 2**31 + 1, "ERR_POLICY": 2**31 + 2, "ERR_INVALID": 2**31 + 3}),
        (OptionReply, {"ERR_UNKNOWN": 2**31 + 6, "ERR_TOO_BIG": 2**31 + 9}),
        (Info, {"EXPORT": 0, "NAME": 1, "DESCRIPTION": 2, "BLOCK_SIZE": 3}),
        (Command, {"READ": 0, "WRITE": 1, "DISC": 2, "FLUSH": 3, "TRIM": 4, "CACHE": 5}),
        (Command, {"WRITE_ZEROES": 6, "BLOCK_STATUS": 7}),
        (CommandFlag, {"FUA": 1, "NO_HOLE": 2, "DF": 4, "REQ_ONE": 8, "FAST_ZERO": 16}),
        (TransmissionFlag, {"HAS_FLAGS": 1, "READ_ONLY": 2, "SEND_FLUSH": 4, "SEND_FUA": 8, "SEND_TRIM": 32}),
        (TransmissionFlag, {"SEND_WRITE_ZEROES": 64, "SEND_DF": 128, "SEND_CACHE": 1024, "SEND_FAST_ZERO": 2048}),
        (ChunkType, {"NONE": 0, "OFFSET_DATA": 1, "OFFSET_HOLE": 2, "BLOCK_STATUS": 5, "ERROR": 2**15 + 1}),
    ],
)
def test_protocol_numbers(enum: type, values: dict[str, int]) -> None:
    assert {name: int(enum[name]) for name in values} == values
