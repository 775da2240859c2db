"""Errors of the protocol core, and the mapping of OS errors onto NBD error values."""

from __future__ import annotations

import errno

from .constants import MAX_STRING, Error

# The ``kind`` of every ProtocolViolation raised by the core, known in advance so they can be counted from zero.
VIOLATION_KINDS = (
    "bad_client_flags",
    "bad_option_magic",
    "oversized_export_name",
    "unknown_export",
    "bad_request_magic",
    "oversized_write",
    "tls_required",
    "data_after_starttls",
    "tls_handshake",
    "not_allowed",
    "export_name_extended",
    "oversized_payload",
)


class ProtocolViolation(Exception):
    """The peer broke a MUST of the protocol; the only answer is a hard disconnect.

    ``kind`` names the rule broken in a few words (a metric label), the message says how.
    """

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


_FROM_ERRNO = {
    errno.EPERM: Error.EPERM,
    errno.EACCES: Error.EPERM,
    errno.EROFS: Error.EPERM,
    errno.EIO: Error.EIO,
    errno.ENOMEM: Error.ENOMEM,
    errno.EINVAL: Error.EINVAL,
    errno.ENOSPC: Error.ENOSPC,
    errno.EDQUOT: Error.ENOSPC,
    errno.EFBIG: Error.ENOSPC,
    errno.EOVERFLOW: Error.EOVERFLOW,
    errno.ENOTSUP: Error.ENOTSUP,
    errno.EOPNOTSUPP: Error.ENOTSUP,
    errno.ESHUTDOWN: Error.ESHUTDOWN,
}


def error_from_errno(code: int) -> Error:
    """The NBD error a client should see for an OS error; EIO for anything unlisted."""
    return _FROM_ERRNO.get(code, Error.EIO)


def encode_string(text: str) -> bytes:
    """UTF-8 for the wire, cut to the spec's longest string without splitting a character."""
    raw = text.encode()
    if len(raw) <= MAX_STRING:
        return raw
    return raw[:MAX_STRING].decode("utf-8", "ignore").encode()
