"""The staging buffer: where a connection's bytes land before they are cut into requests.

Each receive fills a window of it.  The window widens (the buffer grows, up to STAGING_MAX) while
receives keep filling it, so that many small requests arrive in one batch to plug and merge; it
narrows to DIRECT_RECEIVE_MIN once a receive has copied a large payload out of it, so that the
rest of each large payload is received in its request's own buffer instead of copied there.

A journaled connection (journal.py) stages into two halves of memory its primary keeps: what is
left when the front is dropped moves to the other half, never over itself, so that the bytes not
taken yet are whole in one half or the other at every instant.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .journal import Writer

STAGING_SIZE = 256 * 1024  # the transmission phase's buffer, at first
STAGING_MAX = 1024 * 1024  # grown to while receives keep filling it: fewer, larger batches
HANDSHAKE_STAGING_SIZE = 4096  # options are small; longer ones arrive in pieces
DIRECT_RECEIVE_MIN = 64 * 1024  # payload remainders this large are received in place, not copied


class Staging:
    def __init__(
        self,
        size: int = HANDSHAKE_STAGING_SIZE,
        data: bytes = b"",
        halves: tuple[memoryview, memoryview] | None = None,
        journal: Writer | None = None,
    ) -> None:
        """A buffer of ``size`` bytes (or as many as ``data``), holding ``data`` unconsumed.  With
        ``halves`` (each as large as it may grow), it stages into those, and ``journal.moved(dropped,
        half)`` is told whenever bytes at the front are dropped (a call compiled code makes directly)."""
        size = max(size, len(data))
        self._halves, self._journal = halves, journal
        self._half = 0
        self.view = halves[0] if halves is not None else memoryview(bytearray(size))
        self._size = size  # where windows end (before narrowing); grows to STAGING_MAX
        self.view[: len(data)] = data
        self.filled = len(data)  # bytes at the start not consumed yet
        self._end = 0  # where the last window ended
        self._narrow = False
        self.copied_large = False  # the consumer copied a large payload out during this receive

    def window(self, upto: int = 0) -> memoryview:
        """Where the next receive goes; ``upto``: no further than this (a request header's end, so
        that a large payload behind it is received in place rather than copied out of here)."""
        end = self._size
        if upto and self.filled < upto:
            end = upto
        elif self._narrow and self.filled < DIRECT_RECEIVE_MIN <= end:
            end = DIRECT_RECEIVE_MIN
        self._end = end
        return self.view[self.filled : end]

    def received(self, nbytes: int) -> bool:
        """``nbytes`` arrived in the window; whether they filled it."""
        self.filled += nbytes
        return self.filled == self._end

    def adapt(self, full: bool) -> None:
        """After a receive's bytes were consumed: narrow for large payloads, widen for a full window."""
        if self.copied_large:
            self.copied_large, self._narrow = False, True
        elif full:
            self._narrow = False  # small requests fill the window: take as many as it holds
            if self._end == self._size < STAGING_MAX:
                self._grow()

    def _grow(self) -> None:
        size = min(2 * self._size, STAGING_MAX)
        if self._halves is None:
            buffer = memoryview(bytearray(size))
            buffer[: self.filled] = self.view[: self.filled]
            self.view = buffer
        self._size = size

    def copy_out(self, payload: memoryview, at: int, start: int, n: int) -> None:
        """Copy ``n`` staged bytes from ``start`` to ``at`` of a payload (a large one narrows the
        next window: see adapt)."""
        payload[at : at + n] = self.view[start : start + n]
        if n > DIRECT_RECEIVE_MIN // 2:
            self.copied_large = True

    def keep(self, pos: int) -> None:
        """Bytes up to ``pos`` are consumed: move the rest to the start."""
        left = self.filled - pos
        halves = self._halves
        if halves is not None:
            if pos:
                if left:
                    self._half ^= 1
                    target = halves[self._half]
                    target[:left] = self.view[pos : self.filled]
                    self.view = target
                assert self._journal is not None
                self._journal.moved(pos, self._half)
        elif left and pos:
            self.view[:left] = self.view[pos : self.filled]
        self.filled = left

    def take(self) -> bytes:
        """Every unconsumed byte, consumed."""
        data = bytes(self.view[: self.filled])
        self.filled = 0
        return data

    def unconsumed(self) -> bytes:
        return bytes(self.view[: self.filled])
