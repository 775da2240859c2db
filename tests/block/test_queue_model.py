"""The request queue against a reference model.

Random interleavings of READ/WRITE/TRIM/WRITE_ZEROES/FLUSH arrive at one
export's queue (as from several connections), and the engine completes
operations in an order hypothesis chooses.  The I/O itself runs on a real
backing file.  Because only overlapping requests are ordered (in arrival
order) and the others commute, every read reply and the final file must equal
executing the requests one by one in arrival order.

Batches (requests cut from one receive, under one plug) arrive too, and in
some scenarios the engine does part of the reads and writes at once, as the
page cache lets it: those never wait on the engine, and a queue with nothing
in flight takes a batch without overlaps past the hazard tracker.
"""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nbdserver.backing import Backing
from nbdserver.backing.engine import Done, resolve
from nbdserver.block import Request, RequestQueue
from nbdserver.block.ledger import Ledger, shared_memory
from nbdserver.block.merge import MergeLimits
from nbdserver.block.queue import MERGE_SKIP_MAX
from nbdserver.protocol import Command, CommandFlag

SIZE = 16 * 1024
SECTOR = 512


class ReorderingEngine:
    """Does each operation on a real backing, but only when the test releases it; with ``at_once``,
    does the reads and writes it picks (about half) at once instead."""

    def __init__(self, backing: Backing, at_once: random.Random | None = None) -> None:
        self.backing = backing
        self.at_once = at_once
        self.pending: list[tuple[Done, Callable[[], object]]] = []
        self.calls: list[tuple[str, int, int]] = []

    def _hold(self, name: str, offset: int, length: int, op: Callable[[], object], done: Done) -> None:
        self.calls.append((name, offset, length))
        self.pending.append((done, op))

    async def _wait(self, name: str, offset: int, length: int, op: Callable[[], object]):
        future = asyncio.get_running_loop().create_future()
        self._hold(name, offset, length, op, partial(resolve, future))
        return await future

    def release(self, index: int) -> None:
        done, op = self.pending.pop(index % len(self.pending))
        try:
            result = op()
        except OSError as exc:
            done(None, exc)
        else:
            done(result, None)

    def _now(self) -> bool:
        return self.at_once is not None and self.at_once.random() < 0.5

    def readv_now(self, offset, segments):
        if not self._now():
            return False
        self.backing.readv(offset, segments)
        return True

    def read_sparse_now(self, offset, segments):
        if not self._now():
            return None
        self.backing.readv(offset, segments)
        return [(_total(segments), False)]

    def writev_now(self, offset, segments, dsync=False):
        if not self._now():
            return False
        self.backing.writev(offset, segments)
        return True

    def flush_now(self, unflushed):
        if not self._now():
            return False
        self.backing.flush()
        return True

    def start_readv(self, offset, segments, done):
        self._hold("readv", offset, _total(segments), lambda: self.backing.readv(offset, segments), done)

    def start_writev(self, offset, segments, dsync, done):
        self._hold("writev", offset, _total(segments), lambda: self.backing.writev(offset, segments), done)

    async def flush(self):
        return await self._wait("flush", 0, 0, self.backing.flush)

    async def discard(self, offset, length, dsync=False):
        return await self._wait("discard", offset, length, lambda: self.backing.discard(offset, length))

    async def write_zeroes(self, offset, length, *, may_trim, fast_only, dsync=False):
        def zero():
            self.backing.write_zeroes(offset, length, may_trim=may_trim, fast_only=fast_only)

        return await self._wait("write_zeroes", offset, length, zero)

    async def extents(self, offset, length):
        return await self._wait("extents", offset, length, lambda: self.backing.extents(offset, length))

    async def cache(self, offset, length):
        return None

    def close(self) -> None:
        self.backing.close()


def _total(segments) -> int:
    return sum(len(s) for s in segments)


class Model:
    """The export's contents after executing requests one by one; None marks bytes TRIM left undefined."""

    def __init__(self) -> None:
        self.data: list[int | None] = [0] * SIZE

    def apply(self, command: int, offset: int, length: int, payload: bytes | None) -> list[int | None] | None:
        span = slice(offset, offset + length)
        if command == Command.READ:
            return self.data[span]
        if command == Command.WRITE:
            self.data[span] = list(payload or b"")
        elif command == Command.WRITE_ZEROES:
            self.data[span] = [0] * length
        elif command == Command.TRIM:
            self.data[span] = [None] * length
        return None


def assert_matches(actual: bytes, expected: list[int | None], what: str) -> None:
    for i, (got, want) in enumerate(zip(actual, expected, strict=True)):
        assert want is None or got == want, f"{what}: byte {i} is {got}, the serial order says {want}"


def read_result(request: Request) -> bytes:
    """What the client would see: holes in the extent map read as zeroes."""
    data = bytearray(request.buffer or b"")
    if request.extents:
        pos = 0
        for length, hole in request.extents:
            if hole:
                data[pos : pos + length] = bytes(length)
            pos += length
        assert pos == request.length, "extent map does not cover the request"
    return bytes(data)


ranges = st.tuples(st.integers(0, SIZE // SECTOR - 1), st.integers(1, 16)).map(
    lambda t: (t[0] * SECTOR, min(t[1] * SECTOR, SIZE - t[0] * SECTOR))
)
requests = st.one_of(
    st.tuples(st.just(Command.READ), ranges, st.booleans()),
    st.tuples(st.just(Command.WRITE), ranges, st.booleans()),
    st.tuples(st.just(Command.WRITE), ranges, st.booleans()),
    st.tuples(st.just(Command.TRIM), ranges, st.just(False)),
    st.tuples(st.just(Command.WRITE_ZEROES), ranges, st.booleans()),
    st.tuples(st.just(Command.FLUSH), st.just((0, 0)), st.just(False)),
)
# A step: a request or a batch arrives, the engine completes one operation, or the loop ticks.
steps = st.lists(
    st.one_of(
        requests.map(lambda r: ("arrive", [r])),
        st.lists(requests, min_size=2, max_size=6).map(lambda rs: ("arrive", rs)),
        st.integers(0, 1000).map(lambda i: ("complete", i)),
        st.just(("tick", None)),
    ),
    min_size=1,
    max_size=80,
)


async def run_scenario(path: Path, script, merge: bool, seed: int, at_once: bool) -> None:
    backing = Backing(path)
    engine = ReorderingEngine(backing, random.Random(seed + 1) if at_once else None)
    queue = RequestQueue(engine, merge=merge, limits=MergeLimits(max_bytes=8192, max_segments=4))
    model = Model()
    rng = random.Random(seed)
    expected: dict[int, list[int | None]] = {}
    done: list[Request] = []
    reads: list[Request] = []

    for step, arg in script:
        if step == "arrive":
            queue.start_plug()  # a batch, as cut from one receive
            for command, (offset, length), flag in arg:
                payload = rng.randbytes(length) if command == Command.WRITE else None
                flags = CommandFlag.FUA if flag and command == Command.WRITE else 0
                if command == Command.WRITE_ZEROES and flag:
                    flags = CommandFlag.NO_HOLE
                request = Request(command, flags, len(done) + len(expected), offset, length, done.append)
                request.sparse = command == Command.READ and flag
                if payload is not None:
                    request.buffer = bytearray(payload)
                result = model.apply(command, offset, length, payload)
                if result is not None:
                    expected[id(request)] = result
                    reads.append(request)
                queue.submit(request)
            queue.finish_plug()
        elif step == "complete" and engine.pending:
            engine.release(arg)
        for _ in range(3):
            await asyncio.sleep(0)

    submitted = sum(queue.stats.requests)
    while len(done) < submitted:
        queue.unplug()
        if engine.pending:
            engine.release(rng.randrange(len(engine.pending)))
        await asyncio.sleep(0)
    await queue.drain()

    assert all(r.errno == 0 for r in done), [(r, r.errno, r.message) for r in done if r.errno]
    assert len({id(r) for r in done}) == len(done), "a request completed twice"
    for request in reads:
        assert_matches(read_result(request), expected[id(request)], f"read {request.offset}+{request.length}")
    assert_matches(path.read_bytes(), model.data, "final file")
    if not merge:
        assert sum(queue.stats.merged) == 0
    assert queue._hazards.count == 0 and not any(r.tracked for r in done), "the tracker kept a request"
    engine.close()


@pytest.mark.parametrize("at_once", [False, True], ids=["queued", "some-at-once"])
@pytest.mark.parametrize("merge", [True, False], ids=["merge", "no-merge"])
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(script=steps, seed=st.integers(0, 2**32))
def test_queue_equals_serial_execution(tmp_path: Path, merge: bool, at_once: bool, script, seed: int) -> None:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(SIZE))
    asyncio.run(run_scenario(path, script, merge, seed, at_once))


def test_adjacent_writes_from_one_tick_become_one_submission(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(32 * 4096))

    async def scenario() -> RequestQueue:
        engine = ReorderingEngine(Backing(path))
        queue = RequestQueue(engine, limits=MergeLimits(max_bytes=16 * 4096, max_segments=64))
        done: list[Request] = []
        busy = Request(Command.READ, 0, 99, 20 * 4096, 4096, done.append)
        queue.submit(busy)  # an idle queue sends a lone request at once; now it is busy
        order = list(range(16))
        random.Random(1).shuffle(order)  # arrival order is not offset order: front and back merges
        for i in order:
            request = Request(Command.WRITE, 0, i, i * 4096, 4096, done.append, bytearray([i]) * 4096)
            queue.submit(request)
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert engine.calls == [("readv", 20 * 4096, 4096), ("writev", 0, 16 * 4096)]
        while engine.pending:
            engine.release(0)
        await queue.drain()
        assert len(done) == 17
        return queue

    queue = asyncio.run(scenario())
    assert queue.stats.submissions[Command.WRITE] == 1
    assert queue.stats.merged[Command.WRITE] == 15
    assert path.read_bytes()[: 16 * 4096] == b"".join(bytes([i]) * 4096 for i in range(16))


def test_a_lone_request_is_issued_without_waiting_for_the_tick(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(4096))

    async def scenario() -> None:
        engine = ReorderingEngine(Backing(path))
        queue = RequestQueue(engine)
        queue.submit(Request(Command.WRITE, 0, 1, 0, 4096, lambda r: None, bytearray(4096)))
        assert queue.stats.requests[Command.WRITE] == 1
        await asyncio.sleep(0)  # the task starts; no unplug had to run first
        assert engine.calls == [("writev", 0, 4096)]
        engine.release(0)
        await queue.drain()

    asyncio.run(scenario())


def test_overlapping_write_waits_for_the_earlier_one(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(64 * 1024))

    async def scenario() -> None:
        engine = ReorderingEngine(Backing(path))
        queue = RequestQueue(engine)
        done: list[Request] = []
        first = Request(Command.WRITE, 0, 1, 0, 8192, done.append, bytearray(b"a" * 8192))
        queue.submit(first)
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        second = Request(Command.WRITE, 0, 2, 4096, 8192, done.append, bytearray(b"b" * 8192))
        apart = Request(Command.WRITE, 0, 3, 32768, 4096, done.append, bytearray(b"c" * 4096))
        queue.submit(second)
        queue.submit(apart)
        for _ in range(3):
            await asyncio.sleep(0)
        # The overlapping write is held back; the one elsewhere is not.
        assert [c[1] for c in engine.calls] == [0, 32768]
        engine.release(1)  # "apart" completes first: no global lock
        await asyncio.sleep(0)
        assert [r.cookie for r in done] == [3]
        engine.release(0)
        for _ in range(3):
            await asyncio.sleep(0)
        assert [c[1] for c in engine.calls] == [0, 32768, 4096]
        engine.release(0)
        await queue.drain()
        assert [r.cookie for r in done] == [3, 1, 2]
        assert queue.stats.waits == 1

    asyncio.run(scenario())
    content = path.read_bytes()
    assert content[:4096] == b"a" * 4096 and content[4096:12288] == b"b" * 8192


def test_failed_submission_fails_each_of_its_requests_only(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(64 * 1024))

    async def scenario() -> list[Request]:
        engine = ReorderingEngine(Backing(path))
        queue = RequestQueue(engine)
        done: list[Request] = []
        queue.submit(Request(Command.READ, 0, 8, 61440, 4096, done.append))  # makes the queue busy
        for i in range(4):  # one merged submission of four writes at 0..16K
            queue.submit(Request(Command.WRITE, 0, i, i * 4096, 4096, done.append, bytearray(4096)))
        queue.submit(Request(Command.WRITE, 0, 9, 40960, 4096, done.append, bytearray(4096)))
        for _ in range(3):
            await asyncio.sleep(0)
        assert [call[1:] for call in engine.calls] == [(61440, 4096), (0, 16384), (40960, 4096)]
        complete, _ = engine.pending.pop(1)
        complete(None, OSError(28, "No space left on device"))
        while engine.pending:
            engine.release(0)
        await queue.drain()
        return done

    done = asyncio.run(scenario())
    assert {r.cookie: r.errno for r in done} == {8: 0, 0: 28, 1: 28, 2: 28, 3: 28, 9: 0}


def test_batches_that_never_merge_skip_the_sort_until_merging_pays_again(tmp_path: Path) -> None:
    """Random I/O: after batches that merged into nothing, most go unsorted (in arrival order);
    an adjacent stream is merged again within MERGE_SKIP_MAX batches."""
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(1024 * 4096))

    async def scenario() -> tuple[list[bool], list[int]]:
        engine = ReorderingEngine(Backing(path))
        queue = RequestQueue(engine)
        done: list[Request] = []

        def batch(*offsets: int) -> list[int]:
            """Submit one batch; the offsets of the submissions it made, in issue order."""
            before = len(engine.calls)
            queue.start_plug()
            for offset in offsets:
                queue.submit(Request(Command.WRITE, 0, offset, offset, 4096, done.append, bytearray(4096)))
            queue.finish_plug()
            return [offset for _, offset, _ in engine.calls[before:]]

        sorted_ = []
        for i in range(40):  # two writes far apart, the higher one first: sorting swaps them
            low = i * 8192
            sorted_.append(batch(low + 2048 * 1024, low) == [low, low + 2048 * 1024])
        merged = []
        for i in range(MERGE_SKIP_MAX + 2):  # now two adjacent writes each time
            start = (600 + 2 * i) * 4096
            merged.append(len(batch(start, start + 4096)) == 1)
        while engine.pending:
            engine.release(0)
        await queue.drain()
        return sorted_, merged

    sorted_, merged = asyncio.run(scenario())
    assert sorted_[0], "the first batch is sorted"
    assert sorted_.count(False) > 30, "most later ones go in arrival order"
    assert not merged[0] and merged[-1], "merging resumed"


def test_a_flush_is_told_how_much_was_written_since_the_last_one(tmp_path: Path) -> None:
    """What the backing may have to write back decides whether it flushes in place (file.py)."""
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(64 * 1024))

    class Recording(ReorderingEngine):
        def __init__(self, backing: Backing) -> None:
            super().__init__(backing)
            self.unflushed: list[int] = []
            self.flush_at_once = False

        def flush_now(self, unflushed):
            self.unflushed.append(unflushed)
            if self.flush_at_once:
                self.backing.flush()
            return self.flush_at_once

    async def scenario() -> None:
        engine = Recording(Backing(path))
        queue = RequestQueue(engine)
        done: list[Request] = []

        async def run(command: Command, offset: int, length: int, flags: int = 0) -> None:
            payload = bytearray(length) if command == Command.WRITE else None
            queue.submit(Request(command, flags, 0, offset, length, done.append, payload))
            await asyncio.sleep(0)
            while engine.pending:
                engine.release(0)
            await queue.drain()

        await run(Command.WRITE, 0, 4096)
        await run(Command.WRITE, 4096, 4096, CommandFlag.FUA)  # durable already: not counted
        await run(Command.WRITE_ZEROES, 8192, 8192)
        await run(Command.FLUSH, 0, 0)
        await run(Command.WRITE, 0, 4096)
        await run(Command.FLUSH, 0, 0)  # counts from the engine's flush before it
        engine.flush_at_once = True
        await run(Command.WRITE, 16384, 4096)
        await run(Command.FLUSH, 0, 0)
        await run(Command.FLUSH, 0, 0)  # counts from the flush done at once before it
        assert engine.unflushed == [4096 + 8192, 4096, 4096, 0]
        assert len(done) == 9 and not any(r.errno for r in done)

    asyncio.run(scenario())


def test_a_flush_counts_what_other_processes_wrote_to_the_file(tmp_path: Path) -> None:
    """Two workers' queues of one file, each on its own mapping of the shared ledger: a flush in
    one is told of the other's writes, and once done starts the count again for both; a flush
    still under way in one counts for nothing in the other, and a write counts once done."""
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(64 * 1024))
    told: list[int] = []

    class Recording(ReorderingEngine):
        def flush_now(self, unflushed):
            told.append(unflushed)
            return False

    async def scenario() -> None:
        fd = shared_memory(2)
        engines, queues = [], []
        for slot in (0, 1):
            backing = Backing(path)
            engines.append(Recording(backing))
            queues.append(RequestQueue(engines[-1], written=Ledger(2, slot, fd).account(backing.fd)))
        done: list[Request] = []

        async def submit(worker: int, command: Command, offset: int = 0, length: int = 0) -> None:
            """Submit, and let the engine take it (and hold it)."""
            payload = bytearray(length) if command == Command.WRITE else None
            queues[worker].submit(Request(command, 0, 0, offset, length, done.append, payload))
            for _ in range(3):
                await asyncio.sleep(0)

        async def release(worker: int) -> None:
            while engines[worker].pending:
                engines[worker].release(0)
            await queues[worker].drain()

        async def run(worker: int, command: Command, offset: int = 0, length: int = 0) -> None:
            await submit(worker, command, offset, length)
            await release(worker)

        await run(0, Command.WRITE, 0, 32768)
        await run(1, Command.WRITE, 32768, 4096)
        await run(1, Command.FLUSH)  # the other worker's writes too
        await run(0, Command.WRITE, 0, 4096)
        await run(0, Command.FLUSH)  # only what came after the other's flush
        await run(1, Command.WRITE, 32768, 8192)
        await submit(1, Command.FLUSH)  # held in the engine
        await run(0, Command.FLUSH)  # the other's flush under way: all of it still to write back
        await release(1)
        await run(0, Command.FLUSH)  # that one done: nothing
        await submit(0, Command.WRITE, 0, 4096)  # held: not written yet
        await run(1, Command.FLUSH)
        await release(0)
        await run(1, Command.FLUSH)  # written now
        assert told == [32768 + 4096, 4096, 8192, 8192, 0, 0, 4096]
        assert len(done) == 12 and not any(r.errno for r in done)
        for engine in engines:
            engine.backing.close()
        os.close(fd)

    asyncio.run(scenario())
