"""Hazards: overlapping requests keep their arrival order.

A request conflicts with an earlier one when their ranges overlap and at
least one of them changes data.  The tracker holds every request that is in
flight or still waiting, indexed by 1 MiB buckets (writers and readers apart),
so a lookup costs a few comparisons however deep the queue is, and
non-overlapping requests never wait.  A batch that arrives while nothing is
tracked, and whose requests are :meth:`~HazardTracker.disjoint`, skips the
lookups: the queue tracks only those of it that do not complete at once.

Ranges are compared after rounding out to a *granule*: 1 byte normally, a
page where the backing mixes O_DIRECT and page-cache I/O on one file, since
the kernel keeps those coherent per page, not per byte (a buffered write of
part of a page must not race a direct write to the rest of it).

A request waits for the earlier requests it conflicts with, its *blockers*.
The search stops early at an earlier writer that covers the whole request:
that writer itself waits for everything older that overlaps it, so the
older requests need not be listed.  A flood of writes to one block thus
costs one blocker each, not one per request in flight.
"""

from __future__ import annotations

from operator import attrgetter

from ..protocol.constants import CMD_BLOCK_STATUS, CMD_READ, WRITING
from .request import Request

# Commands whose order against overlapping writes matters (CACHE is a hint, FLUSH has no range).
TRACKED = WRITING | {CMD_READ, CMD_BLOCK_STATUS}

_BUCKET_SHIFT = 20
_LARGE = 64 << _BUCKET_SHIFT  # longer ranges go in one list that every lookup scans
_offset = attrgetter("offset")


def ordered(request: Request) -> bool:
    """Does this request keep its order against overlapping ones (so it may need tracking)?"""
    return request.command in TRACKED and request.length > 0


def _bucket_keys(request: Request) -> range:
    return range(request.offset >> _BUCKET_SHIFT, ((request.offset + request.length - 1) >> _BUCKET_SHIFT) + 1)


class _Bucket:
    __slots__ = ("readers", "readers_end", "writers", "writers_end")

    def __init__(self) -> None:
        self.writers: list[Request] = []  # in arrival order
        self.readers: list[Request] = []
        # No writer (reader) here ends after this (rounded out): a request that starts at or past it
        # overlaps none of them, found without a scan, as every request of a sequential stream is.
        # Lowered only when its list empties, so it may be larger than it has to be: more scans, no misses.
        self.writers_end = 0
        self.readers_end = 0


class HazardTracker:
    def __init__(self, granule: int = 1) -> None:
        if granule & (granule - 1) or not 0 < granule <= 1 << _BUCKET_SHIFT:
            raise ValueError(f"hazard granule {granule} is not a power of two up to the bucket size")
        self._mask = -granule  # rounding to a power of two never moves a range to another bucket
        self._buckets: dict[int, _Bucket] = {}
        self._large = _Bucket()
        self.count = 0

    def _span(self, request: Request) -> tuple[int, int]:
        """The range of ``request``, rounded out to the granule."""
        mask = self._mask
        return request.offset & mask, (request.offset + request.length - mask - 1) & mask

    def _places(self, request: Request) -> list[_Bucket]:
        """The buckets whose requests may overlap ``request``."""
        first = request.offset >> _BUCKET_SHIFT
        if (request.offset + request.length - 1) >> _BUCKET_SHIFT == first:  # one bucket: most requests
            bucket = self._buckets.get(first)
            return [self._large] if bucket is None else [bucket, self._large]
        if request.length > _LARGE:
            keys = _bucket_keys(request)
            if len(self._buckets) < len(keys):
                return [*self._buckets.values(), self._large]
            return [*(self._buckets[k] for k in keys if k in self._buckets), self._large]
        return [*(self._buckets[k] for k in _bucket_keys(request) if k in self._buckets), self._large]

    def disjoint(self, requests: list[Request]) -> bool:
        """Do no two of ``requests`` overlap (rounded out to the granule), so that none need wait
        for another?  Reads that overlap count too: a cheap test for the common case, not exact."""
        if len(requests) < 2:
            return True
        mask, end = self._mask, -1
        for request in sorted(requests, key=_offset):
            if request.command in TRACKED and request.length:  # ordered(), inline
                start = request.offset & mask
                if start < end:
                    return False
                end = max(end, (request.offset + request.length - mask - 1) & mask)
        return True

    # add() and remove() run for every request: plain loops, no intermediate lists.
    def add(self, request: Request) -> None:
        """Track ``request`` (which arrived after everything tracked so far, or overlaps none of
        what did not arrive before it)."""
        request.tracked = True
        self.count += 1
        writer = request.command in WRITING
        end = self._span(request)[1]
        if request.length > _LARGE:
            _place(self._large, request, writer, end)
            return
        buckets = self._buckets
        for key in _bucket_keys(request):  # mostly one
            bucket = buckets.get(key)
            if bucket is None:
                bucket = buckets[key] = _Bucket()
            _place(bucket, request, writer, end)

    def remove(self, request: Request) -> None:
        request.tracked = False
        self.count -= 1
        writer = request.command in WRITING
        if request.length > _LARGE:
            _take(self._large, request, writer)
            return
        buckets = self._buckets
        for key in _bucket_keys(request):
            bucket = buckets[key]
            _take(bucket, request, writer)
            if not bucket.writers and not bucket.readers:
                del buckets[key]

    def blockers(self, request: Request) -> list[Request]:
        """The tracked requests ``request`` must wait for (call before adding it)."""
        if not self.count:
            return []
        found: dict[int, Request] = {}
        horizon = -1  # requests at or before this arrival are ordered behind a covering writer
        places = self._places(request)
        mask = self._mask
        start, end = self._span(request)
        for bucket in places:
            if start >= bucket.writers_end:
                continue
            for other in reversed(bucket.writers):
                if other.seq <= horizon:
                    break
                other_start = other.offset & mask  # _span(), inline: this is the innermost loop
                other_end = (other.offset + other.length - mask - 1) & mask
                if other_start < end and start < other_end:
                    found[id(other)] = other
                    if other_start <= start and end <= other_end:  # covers the request
                        horizon = other.seq
                        break
        if request.command in WRITING:
            for bucket in places:
                if start >= bucket.readers_end:
                    continue
                for other in reversed(bucket.readers):
                    if other.seq <= horizon:
                        break
                    other_start = other.offset & mask
                    other_end = (other.offset + other.length - mask - 1) & mask
                    if other_start < end and start < other_end:
                        found[id(other)] = other
        if not found:
            return []
        # A covering writer found late (say in the large list) makes older finds redundant.
        return [r for r in found.values() if r.seq >= horizon]


def _place(bucket: _Bucket, request: Request, writer: bool, end: int) -> None:
    if writer:
        bucket.writers.append(request)
        if end > bucket.writers_end:
            bucket.writers_end = end
    else:
        bucket.readers.append(request)
        if end > bucket.readers_end:
            bucket.readers_end = end


def _take(bucket: _Bucket, request: Request, writer: bool) -> None:
    if writer:
        bucket.writers.remove(request)
        if not bucket.writers:
            bucket.writers_end = 0
    else:
        bucket.readers.remove(request)
        if not bucket.readers:
            bucket.readers_end = 0
