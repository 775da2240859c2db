"""Hazards: overlapping requests keep their arrival order.

A request conflicts with an earlier one when their ranges overlap and at
least one of them changes data.  The tracker holds every request that is in
flight or still waiting, indexed by 1 MiB buckets so that a lookup costs a few
comparisons however deep the queue is; non-overlapping requests never wait.
"""

from __future__ import annotations

from ..protocol import Command
from .request import Request

WRITING = frozenset({Command.WRITE, Command.TRIM, Command.WRITE_ZEROES})
# Commands whose order against overlapping writes matters (CACHE is a hint, FLUSH has no range).
TRACKED = WRITING | {Command.READ, Command.BLOCK_STATUS}

_BUCKET_SHIFT = 20
_LARGE = 64 << _BUCKET_SHIFT  # longer ranges go in one list that every lookup scans


def tracked(request: Request) -> bool:
    return request.command in TRACKED and request.length > 0


def _buckets(request: Request) -> range:
    return range(request.offset >> _BUCKET_SHIFT, ((request.offset + request.length - 1) >> _BUCKET_SHIFT) + 1)


def conflict(earlier: Request, later: Request) -> bool:
    """Must ``later`` wait for ``earlier``?"""
    return (
        earlier.seq < later.seq
        and (earlier.command in WRITING or later.command in WRITING)
        and earlier.offset < later.offset + later.length
        and later.offset < earlier.offset + earlier.length
    )


class HazardTracker:
    def __init__(self) -> None:
        self._buckets: dict[int, list[Request]] = {}
        self._large: list[Request] = []
        self.count = 0

    def add(self, request: Request) -> None:
        self.count += 1
        if request.length > _LARGE:
            self._large.append(request)
            return
        for key in _buckets(request):
            self._buckets.setdefault(key, []).append(request)

    def remove(self, request: Request) -> None:
        self.count -= 1
        if request.length > _LARGE:
            self._large.remove(request)
            return
        for key in _buckets(request):
            bucket = self._buckets[key]
            bucket.remove(request)
            if not bucket:
                del self._buckets[key]

    def conflicts(self, request: Request) -> bool:
        """Does any tracked request that arrived before ``request`` conflict with it?"""
        if any(conflict(other, request) for other in self._large):
            return True
        if request.length > _LARGE and len(self._buckets) < len(_buckets(request)):
            candidates = (r for bucket in self._buckets.values() for r in bucket)
        else:
            candidates = (r for key in _buckets(request) for r in self._buckets.get(key, ()))
        return any(conflict(other, request) for other in candidates)
