"""Sans-I/O core of the NBD protocol: bytes in, events and bytes out."""

from .constants import Command, CommandFlag, Error, TransmissionFlag
from .errors import ProtocolViolation, error_from_errno
from .handshake import (
    Aborted,
    ExportCatalog,
    ExportInfo,
    Negotiated,
    OptionSeen,
    ServerHandshake,
    StartTls,
    TlsMode,
)
from .transmission import HEADER_SIZE, RequestHeader, Transmission

__all__ = [
    "HEADER_SIZE",
    "Aborted",
    "Command",
    "CommandFlag",
    "Error",
    "ExportCatalog",
    "ExportInfo",
    "Negotiated",
    "OptionSeen",
    "ProtocolViolation",
    "RequestHeader",
    "ServerHandshake",
    "StartTls",
    "TlsMode",
    "Transmission",
    "TransmissionFlag",
    "error_from_errno",
]
