"""The connection journal (serving/journal.py) read back as a replacement reads it, at the instants
a crash can hit: what it sends again and what it takes again, byte for byte."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nbdserver.block.buffers import Arena, BufferPool, arena_memory
from nbdserver.protocol.constants import Command
from nbdserver.protocol.transmission import encode_request_header
from nbdserver.serving import journal as journal_module
from nbdserver.serving.journal import (
    CROWDED,
    MAX_TERMS,
    RING_SIZE,
    SIZE,
    SLOTS,
    Journal,
    JournalError,
    Opener,
    recover,
    terms_at,
)
from nbdserver.serving.staging import Staging
from tests.conftest import EXPECTED_BUILD

ARENA_SIZE = 1 << 30  # of the test's arena: address space only
TAG = 7
IN_BASE, OUT_BASE = 1000, 500  # the handshake's bytes, as the kernel counts them


@pytest.fixture
def pool() -> Iterator[BufferPool]:
    fd = arena_memory(ARENA_SIZE)
    yield BufferPool(arena=Arena(fd, ARENA_SIZE))
    os.close(fd)


WRITERS: dict[str, Opener | None] = {"python": Journal, "c": journal_module._FAST}


@pytest.fixture(params=sorted(WRITERS))
def writer(request: pytest.FixtureRequest) -> Opener:
    """Each writer of the journal: the Python one, and the C one where the build has it."""
    cls = WRITERS[request.param]
    if cls is None:
        pytest.skip("this build has no C writer (the compiled build has)")
    return cls


class Side:
    """A connection's journal and staging buffer, fed as the connection feeds them."""

    def __init__(self, pool: BufferPool, writer: Opener = Journal, staged: bytes = b"") -> None:
        self.pool = pool
        self.journal = writer(pool, TAG, IN_BASE - len(staged), OUT_BASE, len(staged))
        self.staging = Staging(4096, staged, self.journal.halves, self.journal)
        self.read = IN_BASE  # every byte read, as the kernel counts them

    def receive(self, data: bytes) -> None:
        window = self.staging.window()
        window[: len(data)] = data
        self.staging.received(len(data))
        self.read += len(data)

    def take(
        self, pos: int, header: bytes, payload: bytes = b"", got: int | None = None, at_once: bool = False
    ) -> tuple[int, memoryview | None]:
        """Take the request whose header is at ``pos``, and ``got`` bytes of its payload (all, if
        None) from the staging buffer: copied after the header is taken, or before and taken with it
        (``at_once``), as the connection takes a payload staged in full."""
        block = self.pool.take(len(payload)) if payload else None
        got = len(payload) if got is None else got
        start = pos + len(header)
        if at_once:
            if block is not None:
                block[:got] = self.staging.view[start : start + got]
            return self.journal.taken(self.staging.view, pos, len(header), len(payload), block, got), block
        slot = self.journal.taken(self.staging.view, pos, len(header), len(payload), block)
        if block is not None:
            block[:got] = self.staging.view[start : start + got]
            self.journal.consumed(start + got)
        return slot, block

    def recovered(self, written: int, extended: bool = False) -> tuple[bytes, bytes]:
        got = recover(self.pool.arena.view, self.journal.record, TAG, self.read, written, extended)  # type: ignore[union-attr]
        return got.resend, got.pending


def write(cookie: int, offset: int, data: bytes) -> tuple[bytes, bytes]:
    return encode_request_header(0, Command.WRITE, cookie, offset, len(data), False), data


def read(cookie: int, offset: int, length: int) -> bytes:
    return encode_request_header(0, Command.READ, cookie, offset, length, False)


def test_a_request_taken_and_not_answered_is_taken_again_and_one_answered_is_not(pool, writer):
    side = Side(pool, writer)
    first, second = write(1, 0, b"a" * 100), write(2, 4096, b"b" * 50)
    side.receive(b"".join(first) + b"".join(second))
    slot, _ = side.take(0, *first)
    side.take(len(b"".join(first)), *second)
    side.staging.keep(side.staging.filled)
    side.journal.reply(slot, [b"R" * 16], None, None)  # the first is answered
    resend, pending = side.recovered(written=OUT_BASE + 16)
    assert resend == b""
    assert pending == b"".join(second)


def test_a_payload_taken_with_its_header_is_taken_again_whole(pool, writer):
    """A payload staged in full is copied to its block and taken with its header, in one call."""
    side = Side(pool, writer)
    first, second = write(1, 0, b"a" * 100), write(2, 4096, b"b" * 50)
    side.receive(b"".join(first) + b"".join(second))
    slot, block = side.take(0, *first, at_once=True)
    side.take(len(b"".join(first)), *second, at_once=True)
    assert block is not None and bytes(block[:100]) == b"a" * 100
    side.staging.keep(side.staging.filled)
    assert side.recovered(written=OUT_BASE) == (b"", b"".join(first) + b"".join(second))
    side.journal.reply(slot, [b"R" * 16], None, None)
    assert side.recovered(written=OUT_BASE + 16) == (b"", b"".join(second))


def test_a_reply_and_a_write_to_the_socket_say_whether_the_log_is_crowded(pool, writer):
    """The connection keeps what they return rather than asking before each request."""
    side = Side(pool, writer)
    out, said = OUT_BASE, []
    while not said or not said[-1]:
        said.append(side.journal.reply(-1, [b"C" * 200], None, None))
        out += 200
    assert len(said) > CROWDED // 256 and not any(said[:-1]) and not side.journal.given_up
    assert side.journal.written(out - 200) is False  # all but the last reply: one record left
    assert side.journal.written(out) is False and not side.journal.crowded


def test_a_reply_half_written_is_finished_from_the_exact_byte(pool, writer):
    side = Side(pool, writer)
    header = read(3, 0, 4096)
    side.receive(header)
    slot, _ = side.take(0, header)
    side.staging.keep(len(header))
    data = pool.take(4096)
    data[:4096] = os.urandom(4096)
    reply = [b"H" * 16, data[:4096]]
    side.journal.reply(slot, reply, reply[1], data)
    whole = b"H" * 16 + bytes(data[:4096])
    for written in (0, 1, 16, 17, 2000, 4112):
        resend, pending = side.recovered(written=OUT_BASE + written)
        assert resend == whole[written:]
        assert pending == b""  # answered: never taken again


def test_the_kernel_counts_must_fit_the_journal(pool, writer):
    side = Side(pool, writer)
    side.journal.reply(-1, [b"E" * 16], None, None)
    with pytest.raises(JournalError):
        side.recovered(written=OUT_BASE + 17)  # more written than was ever queued
    with pytest.raises(JournalError):
        side.recovered(written=OUT_BASE - 1)  # less than the journal started from
    side.read = IN_BASE - 1
    with pytest.raises(JournalError):
        side.recovered(written=OUT_BASE)


def test_half_a_header_and_half_a_payload_are_received_again(pool, writer):
    side = Side(pool, writer)
    header, payload = write(4, 0, bytes(range(256)) * 4)
    side.receive(header + payload[:300])
    slot, block = side.take(0, header, payload, got=300)  # the payload's first 300 bytes, copied out
    side.staging.keep(side.staging.filled)
    assert side.recovered(OUT_BASE)[1] == header + payload[:300]
    side.receive(payload[300:700])  # staged, not copied out yet: a crash now
    assert side.recovered(OUT_BASE)[1] == header + payload[:700]
    # Received in place: the next bytes land in the request's block, not the staging buffer.
    assert block is not None
    block[300:700] = payload[300:700]
    side.journal.consumed(side.staging.filled)
    side.staging.keep(side.staging.filled)
    side.journal.receiving(True)
    block[700:900] = payload[700:900]
    side.read += 200  # read, and the process died before it said so
    assert side.recovered(OUT_BASE)[1] == header + payload[:900]
    side.journal.received(slot, 900)
    assert side.recovered(OUT_BASE)[1] == header + payload[:900]


def test_what_follows_a_request_in_the_staging_buffer_survives_a_move(pool, writer):
    side = Side(pool, writer, staged=b"xy")  # two bytes came behind the handshake
    assert side.recovered(OUT_BASE)[1] == b"xy"
    header = read(5, 0, 512)
    side.receive(header[2:] + header[:10])  # completes a header with b"xy", and half of another
    full = b"xy" + header[2:]
    side.take(0, full)
    side.staging.keep(len(full))  # moves the half header to the other half
    assert side.recovered(OUT_BASE)[1] == full + header[:10]


def test_a_request_answered_in_the_same_instant_its_slot_was_freed(pool, writer):
    """The reply is logged before the slot is freed: a crash between the two answers once."""
    side = Side(pool, writer)
    header = read(6, 0, 512)
    side.receive(header)
    slot, _ = side.take(0, header)
    side.journal.reply(slot, [b"O" * 16], None, None)
    assert side.recovered(OUT_BASE + 16) == (b"", b"")
    assert side.recovered(OUT_BASE) == (b"O" * 16, b"")


def test_a_disconnect_asked_for_is_asked_again_after_what_was_taken(pool, writer):
    side = Side(pool, writer)
    first = write(8, 0, b"w" * 64)
    disc = encode_request_header(0, Command.DISC, 9, 0, 0, True)
    side.receive(b"".join(first) + disc)
    side.take(0, *first)
    side.journal.consumed(len(b"".join(first)) + len(disc))
    side.journal.disconnecting()
    side.staging.keep(side.staging.filled)
    assert side.recovered(OUT_BASE, extended=True)[1] == b"".join(first) + encode_request_header(
        0, Command.DISC, 0, 0, 0, True
    )


def test_requests_are_taken_again_in_the_order_they_arrived(pool, writer):
    side = Side(pool, writer)
    requests = [write(10 + i, 0, bytes([i]) * 16) for i in range(40)]
    pos = 0
    slots = []
    for header, payload in requests:
        side.receive(header + payload)
        slots.append(side.take(pos, header, payload)[0])
        pos += len(header) + len(payload)
    for slot in slots[::3]:
        side.journal.reply(slot, [b"K" * 16], None, None)  # out of order, as the block layer may
    side.staging.keep(side.staging.filled)
    written = OUT_BASE + 16 * len(slots[::3])
    expected = b"".join(h + p for i, (h, p) in enumerate(requests) if i % 3)
    assert side.recovered(written) == (b"", expected)


def test_the_log_wraps_and_drops_what_was_written(pool, writer):
    side = Side(pool, writer)
    reply = [b"Z" * 200]
    out = OUT_BASE
    for _ in range(3 * RING_SIZE // 256):
        side.journal.reply(-1, reply, None, None)
        out += 200
        side.journal.written(out - 400)  # the kernel has all but the last two
        assert not side.journal.given_up
    assert side.recovered(out - 300) == (b"Z" * 300, b"")


def test_a_journal_that_cannot_be_trusted_is_refused(pool, writer):
    side = Side(pool, writer)
    got = recover(pool.arena.view, side.journal.record, TAG, IN_BASE, OUT_BASE, False)  # type: ignore[union-attr]
    assert (got.resend, got.pending) == (b"", b"")
    with pytest.raises(JournalError, match="another connection"):
        recover(pool.arena.view, side.journal.record, TAG + 1, IN_BASE, OUT_BASE, False)  # type: ignore[union-attr]
    side.journal.give_up("for the test")
    with pytest.raises(JournalError, match="given up"):
        side.recovered(OUT_BASE)
    side.journal.close()  # the connection ended: nothing there to take over
    with pytest.raises(JournalError, match="no journal"):
        side.recovered(OUT_BASE)


def test_more_requests_than_slots_give_up_rather_than_lose_one(pool, writer):
    side = Side(pool, writer)
    header = read(1, 0, 512)
    for _ in range(SLOTS):
        side.receive(header)
        assert side.journal.taken(side.staging.view, 0, len(header), 0, None) >= 0
        side.staging.keep(len(header))
    assert not side.journal.given_up
    side.receive(header)
    assert side.journal.taken(side.staging.view, 0, len(header), 0, None) == -1
    assert side.journal.given_up


def test_after_a_payload_received_in_place_the_staging_buffer_starts_behind_it(pool, writer):
    side = Side(pool, writer)
    header, payload = write(11, 0, os.urandom(128 * 1024))
    side.receive(header)
    slot, block = side.take(0, header, payload, got=0)
    side.staging.keep(len(header))
    assert block is not None
    side.journal.receiving(True)
    block[: len(payload)] = payload
    side.read += len(payload)
    assert side.recovered(OUT_BASE)[1] == header + payload  # read, and the process died before it said so
    side.journal.received(slot, len(payload))
    assert side.recovered(OUT_BASE)[1] == header + payload  # whole, not answered: taken again
    side.journal.receiving(False)
    following = read(12, 0, 4096)
    side.receive(following[:10])
    assert side.recovered(OUT_BASE)[1] == header + payload + following[:10]
    side.journal.reply(slot, [b"W" * 16], None, None)
    assert side.recovered(OUT_BASE) == (b"W" * 16, following[:10])


def test_an_empty_log_must_agree_with_the_kernel(pool, writer):
    """Every logged reply written and dropped: the kernel's count must be where the log ended."""
    side = Side(pool, writer)
    side.journal.reply(-1, [b"D" * 40], None, None)
    side.journal.written(OUT_BASE + 40)
    assert side.recovered(OUT_BASE + 40) == (b"", b"")
    with pytest.raises(JournalError):
        side.recovered(OUT_BASE + 24)  # bytes the log no longer holds, which the kernel never had


def test_the_terms_kept_beside_the_journal_are_read_back_by_a_successor_of_the_primary(pool, writer):
    """A primary that died with its worker finds the connection's terms in the journal alone."""
    side = Side(pool, writer)
    view = pool.arena.view  # type: ignore[union-attr]
    with pytest.raises(JournalError, match="keeps no terms"):
        terms_at(view, side.journal.record, TAG)  # not described yet: not to be taken over by one
    terms = b'{"export": "disk", "extended_headers": true}'
    assert side.journal.describe(terms)
    assert terms_at(view, side.journal.record, TAG) == terms
    with pytest.raises(JournalError, match="another connection"):
        terms_at(view, side.journal.record, TAG + 1)
    assert not side.journal.describe(b"x" * (MAX_TERMS + 1))  # too long to keep: said, not cut
    assert terms_at(view, side.journal.record, TAG) == terms
    side.journal.close()
    with pytest.raises(JournalError, match="no journal"):
        terms_at(view, side.journal.record, TAG)  # the connection ended: nothing to take over


def test_a_request_taken_before_its_mark_is_stored_is_taken_again_from_the_staging_buffer(pool, writer):
    """The consumed mark is stored lazily: until a reply or a move of the staging buffer stores it,
    a replacement cuts the request again from the bytes still staged, and never answers it twice."""
    side = Side(pool, writer)
    first, second = write(20, 0, b"f" * 64), write(21, 8192, b"s" * 32)
    side.receive(b"".join(first) + b"".join(second))
    slot, _ = side.take(0, *first)
    side.take(len(b"".join(first)), *second)  # both taken, the mark not stored yet
    assert side.recovered(OUT_BASE) == (b"", b"".join(first) + b"".join(second))
    side.journal.reply(slot, [b"A" * 16], None, None)  # stores the mark before the reply counts
    assert side.recovered(OUT_BASE) == (b"A" * 16, b"".join(second))
    side.staging.keep(side.staging.filled)
    assert side.recovered(OUT_BASE + 16) == (b"", b"".join(second))


def test_replies_of_every_shape_are_read_back_byte_for_byte(pool, writer):
    """Headers alone and headers with data are logged by one call each, other shapes piece by piece:
    the log reads back the same either way."""
    side = Side(pool, writer)
    data = pool.take(4096)
    data[:4096] = os.urandom(4096)
    other = pool.take(8192)
    other[:100] = os.urandom(100)
    replies = [
        ([b"a" * 16], None, None),
        ([b"b" * 20], None, None),  # not a multiple of a word
        ([b"c" * 20, data[:4096]], data[:4096], data),  # a header and the block's data
        ([b"d" * 32, data[:1000]], data[:1000], data),
        ([b"e" * 12, data[:512], b"f" * 20, data[512:1024]], data[:1024], data),  # several chunks
        ([b"g" * 20, other[:100]], None, None),  # data that is a slice, not the block
        ([b"h" * 24, b"i" * 8], None, None),  # bytes in two pieces
    ]
    whole = b""
    for pieces, reply_data, block in replies:
        side.journal.reply(-1, pieces, reply_data, block)
        whole += b"".join(bytes(p) for p in pieces)
    for written in (0, 7, 16, 36, len(whole) - 1, len(whole)):
        assert side.recovered(OUT_BASE + written) == (whole[written:], b"")


def _serve_at_random(side: Side, rng: random.Random, steps: int) -> Iterator[int]:
    """A connection's life as the journal sees it, drawn from ``rng``: requests of every kind arrive
    in pieces and are taken, answered out of order with replies of every shape, their replies
    written bit by bit, the staging buffer moved.  After each step, yields how much of the replies
    the kernel was said to have."""
    taken_to, written = 0, OUT_BASE
    unanswered: list[int] = []
    side.journal.describe(b'{"export": "random"}')
    for _ in range(steps):
        draw = rng.random()
        if draw < 0.4 and side.staging.filled < 2048:
            payload = rng.randbytes(rng.choice((0, 0, 1, 100, 512, 1024)))
            header = write(len(unanswered), 4096, payload)[0] if payload else read(1, 0, 4096)
            side.receive(header + payload)
            unanswered.append(side.take(taken_to, header, payload, at_once=rng.random() < 0.5)[0])
            taken_to += len(header) + len(payload)
        elif draw < 0.7 and unanswered:
            slot = unanswered.pop(rng.randrange(len(unanswered)))
            block = side.pool.take(4096)
            block[:4096] = rng.randbytes(4096)
            data = block[: rng.choice((1, 1000, 4096))]
            shape = rng.randrange(4)
            if shape == 0:
                crowded = side.journal.reply(slot, [rng.randbytes(rng.choice((16, 20, 32)))], None, None)
            elif shape == 1:  # a header and the data that is the block's first bytes
                crowded = side.journal.reply(slot, [rng.randbytes(20), data], data, block)
            elif shape == 2:  # chunks: slices of the block
                crowded = side.journal.reply(
                    slot, [rng.randbytes(12), block[:512], rng.randbytes(20), block[512:600]], None, None
                )
            else:
                crowded = side.journal.reply(slot, [rng.randbytes(24), rng.randbytes(8)], None, None)
            assert crowded == side.journal.crowded
            side.pool.give(block)
        elif draw < 0.85:
            written = rng.randint(written, side.journal.out)
            assert side.journal.written(written) == side.journal.crowded
        else:
            side.staging.keep(taken_to)
            taken_to = 0
        yield written


def test_the_compiled_build_writes_journals_in_c():
    """Where the hot modules are compiled, so is the journal's writer; the pure build has none."""
    assert (WRITERS["c"] is not None) == (EXPECTED_BUILD == "mypyc")


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32))
def test_the_c_writer_writes_the_same_bytes_as_the_python_one(seed):
    """The two writers, driven alike, keep identical journals all along, and a replacement recovers
    alike from either."""
    if WRITERS["c"] is None:
        pytest.skip("this build has no C writer (the compiled build has)")
    steps, fds, sides, lives = 400, [], [], []
    try:
        for cls in (Journal, WRITERS["c"]):
            fds.append(arena_memory(ARENA_SIZE))
            sides.append(Side(BufferPool(arena=Arena(fds[-1], ARENA_SIZE)), cls))
            lives.append(_serve_at_random(sides[-1], random.Random(seed), steps))
        for step, written in enumerate(zip(*lives, strict=True)):
            if step % 20 == 0 or step == steps - 1:
                assert _state(sides[0], written[0]) == _state(sides[1], written[1]), f"after step {step}"
    finally:
        for fd in fds:
            os.close(fd)


def _state(side: Side, written: int) -> tuple[bytes, int, bool, tuple[bytes, bytes]]:
    """The journal's block, what its writer says, and what a replacement would recover."""
    view = side.pool.arena.view  # type: ignore[union-attr]
    record = side.journal.record
    return bytes(view[record : record + SIZE]), side.journal.out, side.journal.given_up, side.recovered(written)
