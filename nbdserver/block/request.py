"""The request: one NBD command travelling from a connection through the block layer."""

from __future__ import annotations

from collections.abc import Callable

from ..backing import Extent


class Request:
    """One command, its buffer, and its outcome.

    ``buffer`` holds a WRITE's payload, or receives a READ's data; it is a
    slice of ``block``, pooled memory the connection gives back once the
    buffer is no longer needed (see :mod:`.buffers`).  The block
    layer sets ``errno`` (0 on success) and, for READ and BLOCK_STATUS,
    ``extents``, then calls ``on_done(request)`` exactly once.
    """

    __slots__ = (
        "arrival",
        "block",
        "blocked_by",
        "buffer",
        "command",
        "contexts",
        "cookie",
        "errno",
        "extents",
        "flags",
        "length",
        "message",
        "offset",
        "on_done",
        "seq",
        "slot",
        "sparse",
        "tracked",
        "waiters",
    )

    def __init__(
        self,
        command: int,
        flags: int,
        cookie: int,
        offset: int,
        length: int,
        on_done: Callable[[Request], None],
        buffer: bytearray | memoryview | None = None,
        sparse: bool = False,
    ) -> None:
        self.command = command
        self.flags = flags
        self.cookie = cookie
        self.offset = offset
        self.length = length
        self.on_done = on_done
        self.buffer = buffer
        self.block: memoryview | None = None
        self.sparse = sparse  # READ: the caller can send holes as such, so holes need not be read
        self.errno = 0
        self.message = ""
        self.extents: list[Extent] | None = None
        self.contexts: tuple[int, ...] | None = None  # BLOCK_STATUS: the context ids it named; None: all
        self.seq = 0  # arrival order at the queue
        self.slot = -1  # where the connection's journal holds it (serving/journal.py); -1: nowhere
        self.arrival = 0.0  # time.monotonic() when the queue took it
        self.tracked = False  # in the hazard tracker: later requests may wait for it
        self.blocked_by = 0  # earlier overlapping requests still to complete
        self.waiters: list[Request] | None = None  # later requests blocked by this one

    def fail(self, errno: int, message: str = "") -> None:
        self.errno = errno
        self.message = message

    def __repr__(self) -> str:
        return f"<Request cmd={self.command} flags={self.flags:#x} {self.offset}+{self.length}>"
