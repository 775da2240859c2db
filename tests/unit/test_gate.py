"""The gate in front of an export's queue while a snapshot's file is cloned (serving/cloning.py):
which requests wait, what they ask the cloner for, and in which order they go on."""

from __future__ import annotations

from nbdserver.block import Request
from nbdserver.protocol import Command
from nbdserver.serving.cloning import GRANULE, Gate

G = GRANULE


class Recorder:
    def __init__(self, count: int = 16) -> None:
        self.asked: list[tuple[int, int]] = []
        self.submitted: list[int] = []
        self.gate = Gate(count, lambda first, last: self.asked.append((first, last)), self.submit)

    def submit(self, request: Request) -> None:
        # As the queue does: the gate is asked again on the way in, and must let it pass.
        assert not self.gate.admit(request)
        self.submitted.append(request.cookie)


def request(cookie: int, offset: int, length: int, command: Command = Command.WRITE) -> Request:
    return Request(command, 0, cookie, offset, length, lambda r: None)


def test_writes_to_granules_not_cloned_wait_and_ask_for_them():
    r = Recorder()
    assert r.gate.admit(request(1, 3 * G + 10, 2 * G))  # granules 3..5
    assert r.asked == [(3, 5)] and r.gate.waiting == 1
    r.gate.cloned(0, [3, 4])
    assert r.submitted == []  # granule 5 is not cloned yet
    r.gate.cloned(0, [5])
    assert r.submitted == [1] and r.gate.waiting == 0


def test_reads_and_cloned_granules_pass():
    r = Recorder()
    assert not r.gate.admit(request(1, 0, G, Command.READ))
    assert not r.gate.admit(request(2, 0, 0))  # nothing to change
    r.gate.cloned(2, [7])
    assert not r.gate.admit(request(3, G, G))  # below the frontier
    assert not r.gate.admit(request(4, 7 * G, G))
    assert not r.gate.admit(request(5, 99 * G, G))  # past the end: the backing refuses it
    assert r.asked == []


def test_only_what_is_missing_is_asked_for():
    r = Recorder()
    r.gate.cloned(4, [])
    assert r.gate.admit(request(1, 2 * G, 4 * G, Command.WRITE_ZEROES))  # granules 2..5
    assert r.asked == [(4, 5)]


def test_a_write_overlapping_a_waiting_one_waits_behind_it():
    """Even on cloned granules: overlapping writes keep their order."""
    r = Recorder()
    assert r.gate.admit(request(1, 5 * G, 2 * G))  # 5..6
    r.gate.cloned(0, [6, 9])
    assert r.gate.admit(request(2, 6 * G, 10, Command.TRIM))  # granule 6 is cloned, but 1 waits on it
    assert not r.gate.admit(request(3, 9 * G, G))  # elsewhere, cloned: goes
    assert r.asked == [(5, 6)]
    r.gate.cloned(0, [5])
    assert r.submitted == [1, 2]


def test_writes_that_do_not_overlap_go_as_soon_as_their_granules_are_cloned():
    r = Recorder()
    assert r.gate.admit(request(1, 8 * G, G))
    assert r.gate.admit(request(2, 2 * G, G))
    r.gate.cloned(0, [2])
    assert r.submitted == [2]
    r.gate.open()
    assert r.submitted == [2, 1]
    assert not r.gate.admit(request(3, 12 * G, G))  # open: nothing waits
