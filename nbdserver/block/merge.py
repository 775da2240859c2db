"""Merge decisions: small pure functions, after Linux's block/blk-merge.c.

A :class:`Submission` is one I/O on the backing: a run of requests of the same
kind whose ranges follow each other, carried as one vectored call whose
segments are the requests' own buffers (a multipage bvec).
"""

from __future__ import annotations

from dataclasses import dataclass
from operator import attrgetter

from ..backing import Extent
from ..protocol.constants import (
    CMD_READ,
    CMD_TRIM,
    CMD_WRITE,
    CMD_WRITE_ZEROES,
    FLAG_FAST_ZERO,
    FLAG_FUA,
    FLAG_NO_HOLE,
)
from .request import Request

# Commands whose adjacent requests may share a submission.
MERGEABLE = frozenset({CMD_READ, CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES})
# Commands whose requests carry a buffer, one segment each.
WITH_SEGMENTS = frozenset({CMD_READ, CMD_WRITE})
_KIND_AND_OFFSET = attrgetter("command", "offset")


MAX_SUBMISSION_BYTES = 1024 * 1024  # of a READ or WRITE submission, by default
MAX_SEGMENTS = 256  # of one submission, by default; never above IOV_MAX


@dataclass(frozen=True)
class MergeLimits:
    max_bytes: int = MAX_SUBMISSION_BYTES
    max_segments: int = MAX_SEGMENTS
    max_range_bytes: int = 1 << 30  # of a TRIM or WRITE_ZEROES submission (no buffers)


class Submission:
    """One I/O on the backing, completing every request in ``requests``."""

    __slots__ = ("command", "dsync", "flags", "length", "offset", "requests")

    def __init__(self, request: Request) -> None:
        self.command = request.command
        self.offset = request.offset
        self.length = request.length
        self.requests = [request]
        self.flags = request.flags  # of the first request; merged requests share the flags that matter
        self.dsync = bool(request.flags & FLAG_FUA)  # durable before completion: any FUA request makes it so

    def add(self, request: Request) -> None:
        """Append a request that starts where this submission ends (see :func:`can_back_merge`)."""
        self.requests.append(request)
        self.length += request.length
        if request.flags & FLAG_FUA:
            self.dsync = True

    @property
    def end(self) -> int:
        return self.offset + self.length

    @property
    def segments(self) -> list[bytearray | memoryview]:
        return [r.buffer for r in self.requests]  # type: ignore[misc]

    def __repr__(self) -> str:
        return f"<Submission cmd={self.command} {self.offset}+{self.length} of {len(self.requests)}>"


def could_merge(request: Request, limits: MergeLimits) -> bool:
    """Is there any room to merge this request with another? If not, plugging it only delays it."""
    if request.command not in MERGEABLE or not request.length:
        return False
    limit = limits.max_bytes if request.command in WITH_SEGMENTS else limits.max_range_bytes
    return request.length < limit


def same_kind(a: Request | Submission, b: Request) -> bool:
    """Requests that may ride in one submission: same command and same flags that change the I/O."""
    if a.command != b.command or a.command not in MERGEABLE:
        return False
    if a.command == CMD_WRITE_ZEROES:
        # FAST_ZERO may fail as a whole with ENOTSUP; NO_HOLE changes how zeroes are made.
        mask = FLAG_NO_HOLE | FLAG_FAST_ZERO
        return not (a.flags & FLAG_FAST_ZERO) and (a.flags & mask) == (b.flags & mask)
    if a.command == CMD_READ:
        first = a.requests[0] if isinstance(a, Submission) else a
        return first.sparse == b.sparse
    return True


def fits(submission: Submission, request: Request, limits: MergeLimits) -> bool:
    """Would ``submission`` stay within the limits with ``request`` added?"""
    if submission.command in WITH_SEGMENTS:
        return submission.length + request.length <= limits.max_bytes and len(submission.requests) < limits.max_segments
    return submission.length + request.length <= limits.max_range_bytes


def can_back_merge(submission: Submission, request: Request, limits: MergeLimits) -> bool:
    """Can ``request`` be appended: it starts where the submission ends?"""
    return request.offset == submission.end and same_kind(submission, request) and fits(submission, request, limits)


def build_submissions(requests: list[Request], limits: MergeLimits) -> list[Submission]:
    """Sort requests by kind and offset, and merge the adjacent ones.

    Sorting first turns every front merge (a request ending where a later-arrived
    one starts) into a back merge, so one rule covers both.

    The requests must not conflict with each other (the hazard check comes first).
    Zero-length requests and commands that never merge get a submission of their own.
    """
    if len(requests) == 1:
        return [Submission(requests[0])]
    mergeable = []
    submissions = []
    for request in requests:
        if request.command in MERGEABLE and request.length:
            mergeable.append(request)
        else:
            submissions.append(Submission(request))
    mergeable.sort(key=_KIND_AND_OFFSET)
    current: Submission | None = None
    for request in mergeable:
        if current is not None and can_back_merge(current, request, limits):
            current.add(request)
        else:
            current = Submission(request)
            submissions.append(current)
    return submissions


def split_extents(extents: list[Extent], lengths: list[int]) -> list[list[Extent]]:
    """Cut a submission's extent map (which covers it exactly) at its requests' boundaries."""
    parts: list[list[Extent]] = []
    remaining = iter(extents)
    length, hole = next(remaining, (0, False))
    for wanted in lengths:
        part = []
        while wanted:
            take = min(wanted, length)
            part.append((take, hole))
            wanted -= take
            length -= take
            if not length:
                length, hole = next(remaining, (0, False))
        parts.append(part)
    return parts
