"""The small decisions of the block layer: may these merge, how far may a submission grow, must this wait."""

from __future__ import annotations

import pytest

from nbdserver.block import Request
from nbdserver.block.hazards import HazardTracker
from nbdserver.block.merge import (
    MergeLimits,
    Submission,
    build_submissions,
    can_back_merge,
    could_merge,
    split_extents,
)
from nbdserver.protocol import Command, CommandFlag

LIMITS = MergeLimits(max_bytes=64 * 1024, max_segments=4, max_range_bytes=1 << 20)


def req(command: int, offset: int, length: int, flags: int = 0, seq: int = 0, sparse: bool = False) -> Request:
    request = Request(command, flags, seq, offset, length, lambda r: None, sparse=sparse)
    request.seq = seq
    return request


def sub(*requests: Request) -> Submission:
    submission = Submission(requests[0])
    for request in requests[1:]:
        submission.add(request)
    return submission


@pytest.mark.parametrize("command", [Command.READ, Command.WRITE, Command.TRIM, Command.WRITE_ZEROES])
def test_adjacent_requests_of_one_kind_merge(command):
    assert can_back_merge(sub(req(command, 0, 4096)), req(command, 4096, 4096), LIMITS)


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (req(Command.WRITE, 0, 4096), req(Command.WRITE, 8192, 4096)),  # gap
        (req(Command.WRITE, 0, 4096), req(Command.WRITE, 2048, 4096)),  # overlap
        (req(Command.WRITE, 0, 4096), req(Command.READ, 4096, 4096)),  # other command
        (req(Command.FLUSH, 0, 0), req(Command.FLUSH, 0, 0)),  # never merges
        (req(Command.CACHE, 0, 4096), req(Command.CACHE, 4096, 4096)),
        (req(Command.BLOCK_STATUS, 0, 4096), req(Command.BLOCK_STATUS, 4096, 4096)),
        (req(Command.READ, 0, 4096, sparse=True), req(Command.READ, 4096, 4096)),  # reply shapes differ
        (req(Command.WRITE_ZEROES, 0, 4096), req(Command.WRITE_ZEROES, 4096, 4096, CommandFlag.NO_HOLE)),
        (
            req(Command.WRITE_ZEROES, 0, 4096, CommandFlag.FAST_ZERO),
            req(Command.WRITE_ZEROES, 4096, 4096, CommandFlag.FAST_ZERO),
        ),
    ],
)
def test_requests_that_must_not_merge(first, second):
    assert not can_back_merge(sub(first), second, LIMITS)


def test_fua_does_not_prevent_merging_and_makes_the_submission_durable():
    first, second = req(Command.WRITE, 0, 4096), req(Command.WRITE, 4096, 4096, CommandFlag.FUA)
    assert can_back_merge(sub(first), second, LIMITS)
    assert not sub(first).dsync
    assert sub(first, second).dsync


def test_submission_bytes_and_segments_are_bounded():
    full = sub(*(req(Command.WRITE, i * 16384, 16384) for i in range(4)))  # 64 KiB, 4 segments
    assert not can_back_merge(full, req(Command.WRITE, 65536, 512), LIMITS)
    three = sub(*(req(Command.WRITE, i * 4096, 4096) for i in range(3)))
    assert can_back_merge(three, req(Command.WRITE, 12288, 4096), LIMITS)
    big = sub(req(Command.WRITE, 0, 60 * 1024))
    assert not can_back_merge(big, req(Command.WRITE, 60 * 1024, 8192), LIMITS)
    # Ranges without buffers grow further, up to their own limit.
    trim = sub(req(Command.TRIM, 0, 512 * 1024))
    assert can_back_merge(trim, req(Command.TRIM, 512 * 1024, 512 * 1024), LIMITS)
    assert not can_back_merge(trim, req(Command.TRIM, 512 * 1024, 512 * 1024 + 1), LIMITS)


def test_build_sorts_and_merges_within_limits():
    arrivals = [req(Command.WRITE, off, 4096) for off in (12288, 0, 4096, 8192, 16384, 40960)]
    arrivals += [req(Command.READ, 0, 4096), req(Command.FLUSH, 0, 0), req(Command.READ, 4096, 4096)]
    submissions = build_submissions(arrivals, LIMITS)
    shapes = sorted((s.command, s.offset, s.length, len(s.requests)) for s in submissions)
    assert shapes == [
        (Command.READ, 0, 8192, 2),
        (Command.WRITE, 0, 16384, 4),  # max_segments=4 stops the run here
        (Command.WRITE, 16384, 4096, 1),
        (Command.WRITE, 40960, 4096, 1),
        (Command.FLUSH, 0, 0, 1),
    ]
    for s in submissions:  # segments are in offset order, one per request
        assert [r.offset for r in s.requests] == sorted(r.offset for r in s.requests)


def test_split_extents_at_request_boundaries():
    extents = [(3000, False), (5000, True), (192, False)]
    assert split_extents(extents, [4096, 4096]) == [[(3000, False), (1096, True)], [(3904, True), (192, False)]]
    assert split_extents([(8192, True)], [4096, 4096]) == [[(4096, True)], [(4096, True)]]


@pytest.mark.parametrize(
    ("earlier", "later", "waits"),
    [
        (req(Command.WRITE, 0, 4096, seq=1), req(Command.READ, 4095, 10, seq=2), True),
        (req(Command.READ, 0, 4096, seq=1), req(Command.WRITE, 100, 10, seq=2), True),
        (req(Command.TRIM, 0, 4096, seq=1), req(Command.WRITE_ZEROES, 0, 4096, seq=2), True),
        (req(Command.WRITE, 0, 4096, seq=1), req(Command.BLOCK_STATUS, 0, 4096, seq=2), True),
        (req(Command.READ, 0, 4096, seq=1), req(Command.READ, 0, 4096, seq=2), False),  # reads commute
        (req(Command.WRITE, 0, 4096, seq=1), req(Command.WRITE, 4096, 4096, seq=2), False),  # adjacent
    ],
)
def test_a_later_request_waits_for_a_conflicting_earlier_one(earlier, later, waits):
    tracker = HazardTracker()
    tracker.add(earlier)
    assert tracker.blockers(later) == ([earlier] if waits else [])


def test_tracker_finds_blockers_across_buckets_and_large_ranges():
    tracker = HazardTracker()
    write = req(Command.WRITE, (1 << 20) - 512, 1024, seq=1)  # straddles two 1 MiB buckets
    trim = req(Command.TRIM, 100 << 20, 200 << 20, seq=2)  # a large range
    tracker.add(write)
    tracker.add(trim)
    assert tracker.blockers(req(Command.READ, 1 << 20, 4096, seq=5)) == [write]
    assert tracker.blockers(req(Command.READ, 150 << 20, 4096, seq=5)) == [trim]
    assert set(map(id, tracker.blockers(req(Command.WRITE, 0, 1 << 40, seq=5)))) == {id(write), id(trim)}
    assert tracker.blockers(req(Command.READ, 2 << 20, 4096, seq=5)) == []
    tracker.remove(write)
    tracker.remove(trim)
    assert tracker.blockers(req(Command.READ, 1 << 20, 4096, seq=5)) == []
    assert tracker.blockers(req(Command.READ, 150 << 20, 4096, seq=5)) == []
    assert tracker.count == 0


def test_reads_never_block_reads_and_writes_wait_for_overlapping_reads():
    tracker = HazardTracker()
    reads = [req(Command.READ, 0, 4096, seq=i) for i in range(100)]
    for r in reads:
        assert tracker.blockers(r) == []
        tracker.add(r)
    write = req(Command.WRITE, 2048, 4096, seq=100)
    assert len(tracker.blockers(write)) == 100


def test_a_covering_writer_stands_for_everything_older():
    tracker = HazardTracker()
    older = [req(Command.WRITE, 0, 512, seq=0), req(Command.READ, 512, 512, seq=1)]
    cover = req(Command.WRITE, 0, 8192, seq=2)
    partial = req(Command.WRITE, 4096, 512, seq=3)
    for r in [*older, cover, partial]:
        tracker.add(r)
    # A read of [0, 4096) needs only the covering write: it waits for the older ones itself.
    assert tracker.blockers(req(Command.READ, 0, 4096, seq=9)) == [cover]
    # A read reaching the partial write waits for both the newest overlapping writers.
    found = tracker.blockers(req(Command.READ, 0, 8192, seq=9))
    assert sorted(r.seq for r in found) == [2, 3]
    # Flood: each write to one block finds just the previous one.
    flood = HazardTracker()
    previous = None
    for seq in range(1000):
        w = req(Command.WRITE, 0, 4096, seq=seq)
        assert flood.blockers(w) == ([previous] if previous else [])
        flood.add(w)
        previous = w


@pytest.mark.parametrize(
    ("request_", "room"),
    [
        (req(Command.WRITE, 0, 4096), True),
        (req(Command.WRITE, 0, 64 * 1024), False),  # already at max_bytes
        (req(Command.READ, 0, 0), False),
        (req(Command.TRIM, 0, 64 * 1024), True),  # ranges grow further
        (req(Command.FLUSH, 0, 0), False),
        (req(Command.BLOCK_STATUS, 0, 4096), False),
    ],
)
def test_could_merge(request_, room):
    assert could_merge(request_, LIMITS) is room


@pytest.mark.parametrize(
    ("earlier", "later", "waits"),
    [
        ((Command.WRITE, 0, 512), (Command.WRITE, 512, 512), True),  # other sectors of one page
        ((Command.WRITE, 4095, 1), (Command.READ, 0, 1), True),
        ((Command.READ, 100, 10), (Command.WRITE, 4000, 10), True),
        ((Command.WRITE, 0, 4096), (Command.WRITE, 4096, 4096), False),  # next page
        ((Command.WRITE, 8191, 1), (Command.TRIM, 4096 * 3, 4096), False),
    ],
)
def test_page_granule_orders_requests_that_share_a_page(earlier, later, waits):
    tracker = HazardTracker(granule=4096)
    first = req(*earlier, seq=1)
    tracker.add(first)
    assert tracker.blockers(req(*later, seq=2)) == ([first] if waits else [])
    exact = HazardTracker()
    exact.add(first)
    assert exact.blockers(req(*later, seq=2)) == []  # byte-exact: none of these overlap


@pytest.mark.parametrize("granule", [0, 3, 4097, 2 << 20])
def test_hazard_granule_is_a_power_of_two_within_a_bucket(granule):
    with pytest.raises(ValueError):
        HazardTracker(granule=granule)
