"""A connection's journal: what a process serving it leaves behind, at every instant, for a
replacement to go on exactly where it stopped should it die (a crash, SIGKILL, the OOM killer).

The journal lives in the process's arena (block/buffers.py), memory the primary keeps when the
process dies, beside the request buffers it refers to.  It holds three things:

- the **consumed** mark: the stream offset (counted from the connection's first byte, as the
  kernel counts, serving/counts.py) up to which the client's bytes were cut into requests;
- a **slot** per request taken and not answered: its header as the client sent it, where its
  header ended in the stream, and the arena block its payload is received into.  A slot counts
  only once the consumed mark has passed its header, so a slot and the mark never tell two stories;
- a **reply log**: each reply, as it is queued to be sent, with its stream offset on the way out:
  its header bytes, and for data the arena block that holds it (kept until the kernel has it).

And where the bytes after the consumed mark are: in one half of the staging buffer (kept in the
arena too, in two halves so that moving what is left to the front never overwrites it), or, while
a large payload is received in place, in that request's block.

A replacement asks the kernel how many bytes were read from the connection and written to it, and
from those and the journal it finishes the reply the kernel has only part of (from the exact byte),
sends the replies queued and never written, and receives again, as if the client had just sent
them, the requests taken and not answered (in arrival order) and the bytes read after them.  No
request is answered twice, and none is lost: every NBD command may be carried out again.

Every record is written before the word that makes it count (the consumed mark, a slot's state,
the log's head), each an aligned 8-byte store: whatever instant the process dies, the journal
tells one consistent story.

The consumed mark is stored lazily: taking a request (its slot written) and copying out its payload
move the mark in the writer's memory only, and it is stored before anything that would make a
lagging mark tell a wrong story: before a reply is logged (a request answered must have been
counted, or it would be taken again and answered twice), before the staging buffer drops bytes
(those after the mark must still be where the journal says), before a payload is received in place,
and before the disconnect flag.  Until then a replacement cuts the requests after the stored mark
again from the staging buffer, where their bytes still are, exactly as it would had the process died
before taking them.  A WRITE taken and answered thus stores the mark once, not two or three times.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, Protocol

from ..block.buffers import BufferPool
from ..protocol import Command
from ..protocol.replies import Buffer
from ..protocol.transmission import encode_request_header
from .staging import STAGING_MAX

log = logging.getLogger(__name__)

VERSION: Final = 1
MAGIC: Final = 0x4E42444A524E0000 | VERSION  # "NBDJRN", version
SIZE: Final = 2 << 20  # one connection's journal, a block of the arena
HEAD_SIZE: Final = 4096
SLOT_SIZE: Final = 128
SLOTS: Final = 4096 + 64  # requests in flight on a connection (MAX_INFLIGHT_REQUESTS), a refusal, and room
_SLOT_HEADER: Final = 24  # a slot's header bytes start here: its words come first
MAX_HEADER: Final = SLOT_SIZE - _SLOT_HEADER  # a request header with its block status filter
RING_START: Final = HEAD_SIZE + SLOTS * SLOT_SIZE
RING_SIZE: Final = SIZE - RING_START
MAX_RECORD: Final = 64 * 1024  # a reply whose record would be larger gives the journal up
CROWDED: Final = RING_SIZE // 2  # the log holds this much not yet written: take no new request meanwhile
NONE: Final = (1 << 64) - 1

# Words of the head.
_MAGIC: Final = 0
_FLAGS: Final = 1
_CONSUMED: Final = 2
_BASE: Final = 3
_DIRECT: Final = 4
_HEAD: Final = 5
_TAIL: Final = 6
_HALF0: Final = 7
_HALF1: Final = 8
_HALF_SIZE: Final = 9
_TAG: Final = 10
_TAIL_OUT: Final = 11  # the stream offset where the reply at the log's tail starts (every byte before: written)
_TERMS: Final = 12  # the length of the terms kept at TERMS_AT (0: none yet)
TERMS_AT: Final = 256  # the connection's terms, as its server describes them, for a primary that died too
MAX_TERMS: Final = HEAD_SIZE - TERMS_AT
FLAG_DISCONNECTING: Final = 1  # the client asked to disconnect: answer what was taken, then close
FLAG_GIVEN_UP: Final = 2  # the journal could not keep up (see ``give_up``): the connection cannot be recovered
# Words of a slot: where its header ended in the stream << 1 | 1 while taken (0: free; the end names
# the request, and orders it among the others); its payload's length << 8 | its header's length;
# its payload's block (NONE: none); then its header.
_REF: Final = 1  # a piece of a logged reply that is a slice of the arena (0: bytes in the log)
_FAST_BYTES: Final = 4096  # a reply's first piece (bytes) up to this long is logged with one pack_into

# A reply record written by one call (the ``pack_into`` of a struct: the words, then the bytes, padded
# to a word), by the length of its bytes: those bytes alone (``_bytes_record``), or followed by a slice
# of the arena (``_ref_record``).  Bound methods, looked up once.
_BYTES_RECORDS: Final[dict[int, Callable[..., None]]] = {}
_REF_RECORDS: Final[dict[int, Callable[..., None]]] = {}


def _bytes_record(n: int) -> Callable[..., None]:
    pack = _BYTES_RECORDS.get(n)
    if pack is None:
        pack = _BYTES_RECORDS[n] = struct.Struct(f"<4Q{(n + 7) & ~7}s").pack_into
    return pack


def _ref_record(n: int) -> Callable[..., None]:
    pack = _REF_RECORDS.get(n)
    if pack is None:
        pack = _REF_RECORDS[n] = struct.Struct(f"<4Q{(n + 7) & ~7}s2Q").pack_into
    return pack


class Writer(Protocol):
    """What a connection asks of its journal's writer: ``Journal`` below, or the same in C
    (``_journal.c``, in the compiled build), which writes the same bytes for a fraction of the
    interpreter's cost per request."""

    @property
    def record(self) -> int: ...
    @property
    def halves(self) -> tuple[memoryview, memoryview]: ...
    @property
    def out(self) -> int: ...
    @property
    def given_up(self) -> bool: ...
    @property
    def crowded(self) -> bool: ...
    def close(self) -> None: ...
    def taken(
        self, view: memoryview, pos: int, length: int, payload: int, block: memoryview | None, copied: int = 0
    ) -> int: ...
    def consumed(self, pos: int) -> None: ...
    def receiving(self, direct: bool) -> None: ...
    def received(self, slot: int, got: int) -> None: ...
    def moved(self, pos: int, half: int) -> None: ...
    def disconnecting(self) -> None: ...
    def describe(self, terms: bytes) -> bool: ...
    def reply(self, slot: int, pieces: Sequence[Buffer], data: Buffer | None, block: memoryview | None) -> bool: ...
    def written(self, offset: int) -> bool: ...
    def give_up(self, why: str) -> None: ...


def open_journal(pool: BufferPool, tag: int, in_base: int, out_base: int, staged: int) -> Writer:
    """A connection's journal (see ``Journal``): written in C where the build has it."""
    if _FAST is not None:
        return _FAST(pool, tag, in_base, out_base, staged)
    return Journal(pool, tag, in_base, out_base, staged)


class JournalError(Exception):
    """A journal a replacement cannot trust: the connection is closed rather than served wrongly."""


class Journal:
    """The writer: one connection's journal, as the process serving it keeps it."""

    def __init__(self, pool: BufferPool, tag: int, in_base: int, out_base: int, staged: int) -> None:
        """``tag``: the connection's name to the primary; ``in_base``/``out_base``: the stream offsets
        of the first byte staged (``staged`` bytes are) and of the next reply byte."""
        arena = pool.arena
        assert arena is not None
        self._pool, self._arena = pool, arena
        self._block = pool.take(SIZE)
        self.record = arena.offset_of(self._block)  # how the primary names this journal
        halves = max(staged, STAGING_MAX)
        self.halves = (pool.take(halves), pool.take(halves))  # the staging buffer's two halves
        self._words = self._block[:RING_START].cast("Q")
        self._ring = self._block[RING_START:]
        self._ring_words = self._ring.cast("Q")
        self._base = in_base  # the stream offset of byte 0 of the staging half in use
        self._consumed = in_base  # the consumed mark, as the writer knows it (stored: see _store_consumed)
        self._lagging = False  # the stored consumed mark is behind _consumed
        self._last_block: memoryview | None = None  # the block _offset_of was asked about last,
        self._last_offset = -1  # and its offset
        self._half = 0  # the staging half in use
        self._direct = False
        self._free = list(range(SLOTS - 1, -1, -1))
        self._ends = [0] * SLOTS  # each slot's header end, as written
        self._head = self._tail = 0  # bytes ever appended to / dropped from the log
        self.out = out_base  # the stream offset of the next reply byte queued
        self.given_up = self.record < 0 or any(arena.offset_of(h) < 0 for h in self.halves)
        words = self._words
        words[: HEAD_SIZE // 8] = memoryview(bytes(HEAD_SIZE)).cast("Q")
        for slot in range(SLOTS):
            words[(HEAD_SIZE + slot * SLOT_SIZE) // 8] = 0
        words[_CONSUMED] = in_base
        words[_BASE] = in_base << 1
        words[_HALF0], words[_HALF1] = (max(arena.offset_of(h), 0) for h in self.halves)
        words[_HALF_SIZE] = halves
        words[_TAG] = tag
        words[_TAIL_OUT] = out_base
        words[_FLAGS] = FLAG_GIVEN_UP if self.given_up else 0
        words[_MAGIC] = MAGIC  # last: now the journal counts

    def close(self) -> None:
        """The connection ended: its blocks go back to the pool."""
        self._words[_MAGIC] = 0
        self._words.release()
        self._pool.give(self._block)
        for half in self.halves:
            self._pool.give(half)

    # Requests in ---------------------------------------------------------------------------

    def taken(
        self, view: memoryview, pos: int, length: int, payload: int, block: memoryview | None, copied: int = 0
    ) -> int:
        """A request header at ``pos`` of the staging buffer, ``length`` bytes with its filter, whose
        payload (``payload`` bytes) goes to ``block``; the header is consumed, and the first ``copied``
        bytes of the payload behind it, already in ``block``.  Returns its slot (-1: none, the
        journal gave up)."""
        end = self._base + pos + length
        free, words = self._free, self._words
        if not free or length > MAX_HEADER:
            self.give_up("no room for a request")
            self._consumed, self._lagging = end + copied, False
            words[_CONSUMED] = end + copied
            return -1
        slot = free.pop()
        at = HEAD_SIZE + slot * SLOT_SIZE
        w = at >> 3
        words[w + 1] = payload << 8 | length
        if payload:
            offset = -1 if block is None else self._offset_of(block)
            if offset < 0 and block is not None:
                self.give_up("a payload outside the arena")
            words[w + 2] = NONE if offset < 0 else offset
        self._block[at + _SLOT_HEADER : at + _SLOT_HEADER + length] = view[pos : pos + length]
        words[w] = end << 1 | 1
        # The commit, the consumed mark passing the header, is stored later (_store_consumed): the
        # slot counts from there; until then the request is in the staging buffer still.
        self._consumed = end + copied
        self._lagging = True
        self._ends[slot] = end
        return slot

    def _offset_of(self, block: memoryview) -> int:
        """The arena's ``offset_of``, remembered for the last block asked about: a client with one
        request at a time is given the same block for each."""
        if block is not self._last_block:
            self._last_block, self._last_offset = block, self._arena.offset_of(block)
        return self._last_offset

    def consumed(self, pos: int) -> None:
        """Bytes of the staging buffer up to ``pos`` are taken (a payload copied out, a header)."""
        self._consumed = self._base + pos
        self._lagging = True

    def _store_consumed(self) -> None:
        """Store the consumed mark (see the module's docstring for when it must be)."""
        if self._lagging:
            self._lagging = False
            self._words[_CONSUMED] = self._consumed

    def receiving(self, direct: bool) -> None:
        """The next receive goes into the payload being received itself (``direct``), or into the
        staging buffer."""
        if direct != self._direct:
            self._store_consumed()  # the payload's bytes so far are counted before more go after them
            self._direct = direct
            self._words[_DIRECT] = 1 if direct else 0

    def received(self, slot: int, got: int) -> None:
        """``got`` bytes of ``slot``'s payload are in its block, received in place: the staging
        buffer, empty meanwhile, starts after them."""
        if slot >= 0:
            consumed = self._ends[slot] + got
            words = self._words
            self._consumed, self._lagging = consumed, False
            words[_CONSUMED] = consumed
            self._base = consumed
            words[_BASE] = consumed << 1 | self._half

    def moved(self, pos: int, half: int) -> None:
        """The staging buffer dropped its first ``pos`` bytes; what was left is in ``half`` now."""
        self._store_consumed()  # past what was dropped, before the staged bytes are said to be elsewhere
        self._base += pos
        self._half = half
        self._words[_BASE] = self._base << 1 | half

    def disconnecting(self) -> None:
        self._store_consumed()  # the requests before the disconnect are counted first
        self._words[_FLAGS] |= FLAG_DISCONNECTING

    def describe(self, terms: bytes) -> bool:
        """Keep the connection's terms (what it negotiated, opaque here) beside its journal, for a
        primary that dies with this process and whose successor finds only the arena; False if they
        do not fit (the connection then survives this process's crash alone)."""
        if len(terms) > MAX_TERMS:
            return False
        self._block[TERMS_AT : TERMS_AT + len(terms)] = terms
        self._words[_TERMS] = len(terms)  # the commit
        return True

    # Replies out ---------------------------------------------------------------------------

    def reply(self, slot: int, pieces: Sequence[Buffer], data: Buffer | None, block: memoryview | None) -> bool:
        """A reply queued to be sent; the request in ``slot`` (-1: none) is answered.  ``data``
        (a slice of ``block``) is where the pieces that are not bytes come from.  Returns
        ``crowded``, for the caller to keep (the log grows only here)."""
        self._store_consumed()  # the request counts before its answer does
        if not self.given_up:
            self._append(self._ends[slot] if slot >= 0 else 0, pieces, data, block)
        else:
            for piece in pieces:
                self.out += len(piece)
        if slot >= 0:
            self._words[(HEAD_SIZE + slot * SLOT_SIZE) >> 3] = 0
            self._free.append(slot)
        return self.crowded

    def _append(self, request: int, pieces: Sequence[Buffer], data: Buffer | None, block: memoryview | None) -> None:
        """Log a reply: 3 words (the request's header end << 1 | 1, the reply's stream offset, its
        length << 24 | the record's size), then per piece a word (length << 1 | kind) and the bytes
        or the piece's arena offset.  A record is at most MAX_RECORD bytes, and starts where that
        much room is left before the end of the log (else at its start)."""
        head = self._head
        at = head % RING_SIZE
        skip = RING_SIZE - at if at + MAX_RECORD > RING_SIZE else 0
        if head + skip + MAX_RECORD - self._tail > RING_SIZE:
            self.give_up("the reply log is full")
            self.reply(-1, pieces, None, None)  # counted, not logged
            return
        ring, words = self._ring, self._ring_words
        if skip:
            words[at >> 3] = 0  # the next record is at the start
            at = 0
        size = self._append_fast(request, at, pieces, data, block)
        if size:
            self._head = head + skip + size
            self._words[_HEAD] = self._head  # the commit: the reply counts from here
            return
        first = at >> 3
        w = first + 3
        length = 0
        for i, piece in enumerate(pieces):
            n = len(piece)
            length += n
            if type(piece) is bytes:
                if ((w + 1) << 3) + n - at > MAX_RECORD:
                    self.give_up("a reply too large to log")
                    self.out += length - n
                    self.reply(-1, pieces[i:], None, None)
                    return
                words[w] = n << 1  # bytes, in the log
                start = (w + 1) << 3
                ring[start : start + n] = piece
                w += 1 + ((n + 7) >> 3)
                continue
            offset = -1
            if piece is data and block is not None:
                offset = self._arena.offset_of(block)  # data is the block's first bytes
            if offset < 0:
                assert isinstance(piece, memoryview)
                offset = self._arena.offset_within(piece)
            if offset < 0 or ((w + 2) << 3) - at > MAX_RECORD:
                self.give_up("reply data outside the arena, or too many pieces")
                self.out += length - n
                self.reply(-1, pieces[i:], None, None)
                return
            words[w] = n << 1 | _REF
            words[w + 1] = offset
            w += 2
        size = (w << 3) - at
        words[first] = request << 1 | 1
        words[first + 1] = self.out
        words[first + 2] = length << 24 | size
        self.out += length
        self._head = head + skip + size
        self._words[_HEAD] = self._head  # the commit: the reply counts from here

    def _append_fast(
        self, request: int, at: int, pieces: Sequence[Buffer], data: Buffer | None, block: memoryview | None
    ) -> int:
        """Write the record of a reply of the common shapes in one ``pack_into`` at ``at`` of the log,
        not committed: a header alone (bytes), or a header and the data that is ``block``'s first
        bytes.  Returns the record's size; 0 for any other reply (``_append`` writes it piece by
        piece, in the same format)."""
        count = len(pieces)
        if not 0 < count <= 2:
            return 0
        header = pieces[0]
        if type(header) is not bytes:
            return 0
        n = len(header)
        if n > _FAST_BYTES:
            return 0
        padded = (n + 7) & ~7
        if count == 1:
            size = 32 + padded
            _bytes_record(n)(self._ring, at, request << 1 | 1, self.out, n << 24 | size, n << 1, header)
            self.out += n
            return size
        piece = pieces[1]
        if piece is not data or block is None:
            return 0
        offset = self._offset_of(block)  # data is the block's first bytes
        if offset < 0:
            return 0
        m = len(piece)
        size = 48 + padded
        _ref_record(n)(
            self._ring, at, request << 1 | 1, self.out, (n + m) << 24 | size, n << 1, header, m << 1 | _REF, offset
        )
        self.out += n + m
        return size

    @property
    def crowded(self) -> bool:
        """The log holds so much not yet known to be written that no new request should be taken."""
        return self._head - self._tail > CROWDED

    def written(self, offset: int) -> bool:
        """Every reply byte before stream offset ``offset`` is the kernel's: drop their records.
        Returns ``crowded`` (the log shrinks only here)."""
        tail, head = self._tail, self._head
        if tail == head:
            return False
        if offset >= self.out and not self.given_up:  # all of them: the log's end is known
            end = self.out
            tail = head
        else:
            words, end = self._ring_words, -1
            while tail < head:
                w = (tail % RING_SIZE) >> 3
                if words[w] == 0:  # the next record is at the start
                    tail += RING_SIZE - (w << 3)
                    continue
                sizes = words[w + 2]
                record_end = words[w + 1] + (sizes >> 24)
                if record_end > offset:
                    break
                tail += sizes & 0xFFFFFF
                end = record_end
            if end < 0:
                return self.crowded
        # The end of what is dropped before the tail moves (it may run ahead of the tail meanwhile:
        # see _resend): an empty log always tells where it ended.
        self._words[_TAIL_OUT] = end
        self._tail = tail
        self._words[_TAIL] = tail
        return self.crowded

    def give_up(self, why: str) -> None:
        """Stop journaling this connection: it cannot be recovered (it is served on as before)."""
        if not self.given_up:
            self.given_up = True
            self._words[_FLAGS] |= FLAG_GIVEN_UP
            log.warning("connection journal: %s: this connection would not survive a crash", why)


Opener = Callable[[BufferPool, int, int, int, int], Writer]  # (pool, tag, in_base, out_base, staged)
# A writer's two calls per request, as bound methods: the connection looks them up once.
Taken = Callable[[memoryview, int, int, int, "memoryview | None", int], int]
Replied = Callable[[int, Sequence[Buffer], "Buffer | None", "memoryview | None"], bool]


def _fast_writer() -> Opener | None:
    """The C writer, if this build has one that writes this module's format."""
    try:
        from . import _journal
    except ImportError:  # the pure build
        return None
    ours = {
        "VERSION": VERSION,
        "SIZE": SIZE,
        "HEAD_SIZE": HEAD_SIZE,
        "SLOT_SIZE": SLOT_SIZE,
        "SLOTS": SLOTS,
        "SLOT_HEADER": _SLOT_HEADER,
        "RING_START": RING_START,
        "MAX_RECORD": MAX_RECORD,
        "FAST_BYTES": _FAST_BYTES,
        "STAGING_MAX": STAGING_MAX,
        "TERMS_AT": TERMS_AT,
    }
    if any(getattr(_journal, name) != value for name, value in ours.items()):
        log.warning("connection journal: the C writer was built for another format: writing it in Python")
        return None
    return _journal.Writer


_FAST: Final = _fast_writer()


# The replacement's side ------------------------------------------------------------------------


def terms_at(arena: memoryview, record: int, tag: int) -> bytes:
    """The terms kept with the journal at ``record`` of the connection called ``tag`` (``describe``);
    JournalError if there is no such journal, or it keeps none."""
    words = _head(arena, record, tag)
    if not 0 < words[_TERMS] <= MAX_TERMS:
        raise JournalError("the journal keeps no terms")
    return bytes(arena[record + TERMS_AT : record + TERMS_AT + words[_TERMS]])


def _head(arena: memoryview, record: int, tag: int) -> list[int]:
    """The head words of the journal at ``record``, checked to be the one of connection ``tag``."""
    if record < 0 or record + SIZE > len(arena):
        raise JournalError("the journal is outside the arena")
    words = arena[record : record + HEAD_SIZE].cast("Q").tolist()
    if words[_MAGIC] != MAGIC:
        raise JournalError(f"no journal of version {VERSION} there")
    if words[_TAG] != tag:
        raise JournalError("the journal there is another connection's")
    return words


@dataclass
class Recovered:
    """What a replacement does for a connection: send ``resend`` first, then take ``pending`` as if
    just received."""

    resend: bytes  # the rest of the replies the kernel had not been given
    pending: bytes  # the requests taken and not answered, as the client sent them, then what came after
    requests: int  # how many requests are taken again


def recover(arena: memoryview, record: int, tag: int, read: int, written: int, extended: bool) -> Recovered:
    """Read the journal at ``record`` of a dead process's arena, of the connection it called ``tag``;
    ``read``/``written``: every byte read from and written to the connection, as the kernel counts
    them; ``extended``: whether the connection has extended headers.  JournalError if the journal
    cannot be trusted."""
    _head(arena, record, tag)
    block = arena[record : record + SIZE]
    words = block[:RING_START].cast("Q").tolist()
    if words[_FLAGS] & FLAG_GIVEN_UP:
        raise JournalError("the connection's journal had been given up")
    disconnecting = bool(words[_FLAGS] & FLAG_DISCONNECTING)
    replies = _replies(arena, block[RING_START:], words[_TAIL], words[_HEAD])
    resend = _resend(replies, words[_TAIL_OUT], written)
    consumed = words[_CONSUMED]
    slots = _slots(block, words, consumed)
    answered = {request for request, _, _ in replies}
    requests, partial = _unanswered([slot for slot in slots if slot[0] not in answered], arena, consumed)
    pending = [header + payload for header, payload in requests]
    if partial is not None:
        pending.append(partial)
    if disconnecting:  # after what it had sent before, as it asked then
        pending.append(encode_request_header(0, Command.DISC, 0, 0, 0, extended))
    else:
        pending.append(_after(arena, block, words, slots, consumed, read))
    return Recovered(resend, b"".join(pending), len(requests) + (partial is not None))


def _replies(arena: memoryview, ring: memoryview, tail: int, head: int) -> list[tuple[int, int, bytes]]:
    """(the request's header end, stream offset, bytes) of every reply in the log, in order."""
    out = []
    words = ring.cast("Q")
    while tail < head:
        at = tail % RING_SIZE
        w = at >> 3
        if words[w] == 0:
            tail += RING_SIZE - at
            continue
        request, offset, sizes = words[w], words[w + 1], words[w + 2]
        length, size = sizes >> 24, sizes & 0xFFFFFF
        if size < 24 or at + size > RING_SIZE:
            raise JournalError("a torn reply record")
        parts, end, w = [], w + (size >> 3), w + 3
        while w < end:
            n, kind = words[w] >> 1, words[w] & 1
            if kind == _REF:
                start = words[w + 1]
                if start + n > len(arena):
                    raise JournalError("a reply's data outside the arena")
                parts.append(bytes(arena[start : start + n]))
                w += 2
            else:
                start = (w + 1) << 3
                parts.append(bytes(ring[start : start + n]))
                w += 1 + ((n + 7) >> 3)
        data = b"".join(parts)
        if len(data) != length:
            raise JournalError("a reply of the wrong length")
        out.append((request >> 1, offset, data))
        tail += size
    return out


def _resend(replies: list[tuple[int, int, bytes]], start: int, written: int) -> bytes:
    """What of the logged replies (from stream offset ``start``) the kernel was not given, from the
    exact byte."""
    if not replies:
        if written != start:
            raise JournalError(f"the kernel wrote {written} bytes; the log says {start}")
        return b""
    first, last = replies[0][1], replies[-1][1] + len(replies[-1][2])  # (start may be past first: see written)
    expected = first
    for _, offset, data in replies:
        if offset != expected:
            raise JournalError("the reply log has a gap")
        expected += len(data)
    if not first <= written <= last:
        raise JournalError(f"the kernel wrote {written} bytes; the log holds {first} to {last}")
    out = []
    for _, offset, data in replies:
        end = offset + len(data)
        if end > written:
            out.append(data[max(0, written - offset) :])
    return b"".join(out)


def _slots(block: memoryview, words: list[int], consumed: int) -> list[tuple[int, bytes, int, int]]:
    """The requests taken, in the order they arrived: (header end, header, payload length, block)."""
    taken = []
    for slot in range(SLOTS):
        at = HEAD_SIZE + slot * SLOT_SIZE
        w = at >> 3
        state, lengths, where = words[w], words[w + 1], words[w + 2]
        end, payload, length = state >> 1, lengths >> 8, lengths & 0xFF
        if not state & 1 or end > consumed:
            continue  # free, or not counted yet
        if length > MAX_HEADER:
            raise JournalError("a torn request slot")
        header = bytes(block[at + _SLOT_HEADER : at + _SLOT_HEADER + length])
        taken.append((end, header, payload, where if payload else NONE))
    taken.sort()
    return taken


def _unanswered(
    slots: list[tuple[int, bytes, int, int]], arena: memoryview, consumed: int
) -> tuple[list[tuple[bytes, bytes]], bytes | None]:
    """The requests not answered as (header, payload), and the one whose payload is not all here,
    as its header and what came of its payload (None if there is none)."""
    complete, partial = [], None
    for i, (end, header, payload, where) in enumerate(slots):
        got = min(payload, consumed - end)
        if got < payload and i != len(slots) - 1:
            raise JournalError("a payload cut short before the last request")
        if where == NONE:
            data = bytes(got)  # a refused payload, discarded again
        elif where + got > len(arena):
            raise JournalError("a payload outside the arena")
        else:
            data = bytes(arena[where : where + got])
        if got < payload:
            partial = header + data
        else:
            complete.append((header, data))
    return complete, partial


def _after(
    arena: memoryview,
    block: memoryview,
    words: list[int],
    slots: list[tuple[int, bytes, int, int]],
    consumed: int,
    read: int,
) -> bytes:
    """The bytes read after the consumed mark: in the staging buffer, or in the block of the payload
    being received in place."""
    if read < consumed:
        raise JournalError(f"the kernel read {read} bytes, fewer than the {consumed} consumed")
    if read == consumed:
        return b""
    if words[_DIRECT]:
        receiving = [s for s in slots if s[0] <= consumed < s[0] + s[2] and s[3] != NONE]
        if len(receiving) != 1:
            raise JournalError("a payload received in place, but no request it belongs to")
        end, _, payload, where = receiving[0]
        if read > end + payload:
            raise JournalError("more read in place than the payload holds")
        return bytes(arena[where + consumed - end : where + read - end])
    base, half = words[_BASE] >> 1, words[_BASE] & 1
    start, size = words[_HALF0 + half], words[_HALF_SIZE]
    if not base <= consumed or read - base > size or start + size > len(arena):
        raise JournalError("the staged bytes are not where the journal says")
    return bytes(arena[start + consumed - base : start + read - base])
