"""Numbers of the NBD wire protocol (doc/proto.md of the reference implementation)."""

from __future__ import annotations

import enum
from typing import Final

NBDMAGIC: Final = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT: Final = 0x49484156454F5054  # "IHAVEOPT"
OPTION_REPLY_MAGIC: Final = 0x0003E889045565A9
REQUEST_MAGIC: Final = 0x25609513
SIMPLE_REPLY_MAGIC: Final = 0x67446698
STRUCTURED_REPLY_MAGIC: Final = 0x668E33EF
EXTENDED_REQUEST_MAGIC: Final = 0x21E41C71  # 32-byte requests, once extended headers are negotiated
EXTENDED_REPLY_MAGIC: Final = 0x6E8A278C  # 32-byte reply chunks, likewise

NBD_DEFAULT_PORT = 10809
MAX_STRING = 4096  # longest name, description or message the spec allows


class HandshakeFlag(enum.IntFlag):
    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class ClientFlag(enum.IntFlag):
    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class TransmissionFlag(enum.IntFlag):
    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11
    BLOCK_STATUS_PAYLOAD = 1 << 12  # BLOCK_STATUS may name the contexts it wants (extended headers)


class Option(enum.IntEnum):
    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


_REP_ERR = 1 << 31


class OptionReply(enum.IntEnum):
    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = _REP_ERR | 1
    ERR_POLICY = _REP_ERR | 2
    ERR_INVALID = _REP_ERR | 3
    ERR_PLATFORM = _REP_ERR | 4
    ERR_TLS_REQD = _REP_ERR | 5
    ERR_UNKNOWN = _REP_ERR | 6
    ERR_SHUTDOWN = _REP_ERR | 7
    ERR_BLOCK_SIZE_REQD = _REP_ERR | 8
    ERR_TOO_BIG = _REP_ERR | 9
    ERR_EXT_HEADER_REQD = _REP_ERR | 10


class Info(enum.IntEnum):
    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class Command(enum.IntEnum):
    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7


class CommandFlag(enum.IntFlag):
    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4
    PAYLOAD_LEN = 1 << 5  # extended headers: the length is of a payload that follows


class ReplyFlag(enum.IntFlag):
    DONE = 1 << 0


class ChunkType(enum.IntEnum):
    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    BLOCK_STATUS_EXT = 6  # 64-bit descriptors, with extended headers
    ERROR = (1 << 15) | 1
    ERROR_OFFSET = (1 << 15) | 2


class Error(enum.IntEnum):
    """Error values of the transmission phase; zero means success."""

    OK = 0
    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108


class AllocationState(enum.IntFlag):
    """Flags of the base:allocation metadata context."""

    DATA = 0
    HOLE = 1 << 0
    ZERO = 1 << 1


BASE_ALLOCATION = "base:allocation"
DIRTY_BITMAP_PREFIX = "qemu:dirty-bitmap:"  # + a bitmap's name: qemu's context of changed blocks


# The commands and command flags as plain ints, for per-request code: compiled, a Final int literal
# is a C constant, where an enum member costs an attribute lookup and a comparison of objects.
# (tests/unit/test_transmission.py checks them against the enums.)
CMD_READ: Final = 0
CMD_WRITE: Final = 1
CMD_DISC: Final = 2
CMD_FLUSH: Final = 3
CMD_TRIM: Final = 4
CMD_CACHE: Final = 5
CMD_WRITE_ZEROES: Final = 6
CMD_BLOCK_STATUS: Final = 7
FLAG_FUA: Final = 1
FLAG_NO_HOLE: Final = 2
FLAG_DF: Final = 4
FLAG_REQ_ONE: Final = 8
FLAG_FAST_ZERO: Final = 16
FLAG_PAYLOAD_LEN: Final = 32
# The commands that change data: refused on a read-only export, ordered by the hazard tracker,
# marked in dirty bitmaps.
WRITING: Final = frozenset({CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES})
