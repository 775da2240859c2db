"""Where requests meet an export's dirty bitmaps (block/dirty.py): WRITE, WRITE_ZEROES and TRIM
mark them, BLOCK_STATUS reports them as qemu:dirty-bitmap contexts."""

from __future__ import annotations

from collections.abc import Sequence

from ..block import Request
from ..block.dirty import DIRTY, MAX_DESCRIPTORS, ExportBitmaps
from ..protocol.constants import BASE_ALLOCATION, DIRTY_BITMAP_PREFIX, FLAG_REQ_ONE, WRITING, AllocationState
from ..protocol.replies import Buffer, Extent, Replies

_HOLE_FLAGS = int(AllocationState.HOLE | AllocationState.ZERO)


def track(bitmaps: ExportBitmaps, request: Request) -> None:
    """Called as the request is submitted, so before it can be answered: a write marks what it
    touches (the whole request, whether or not it then succeeds: marking more is allowed)."""
    if request.command in WRITING:
        bitmaps.mark(request.offset, request.length)


def status_reply(
    replies: Replies,
    request: Request,
    contexts: dict[int, str],
    extents: Sequence[Extent],
    bitmaps: ExportBitmaps,
) -> list[Buffer]:
    """A BLOCK_STATUS reply of a chunk per context (those the request named, else every one
    negotiated); ``extents``: the allocation, for base:allocation."""
    ids = request.contexts if request.contexts is not None else tuple(contexts)
    out: list[Buffer] = []
    for i, context_id in enumerate(ids):
        name = contexts[context_id]
        if name == BASE_ALLOCATION:
            descriptors = [(length, _HOLE_FLAGS if hole else 0) for length, hole in extents]
        else:
            descriptors = _dirty(bitmaps, name[len(DIRTY_BITMAP_PREFIX) :], request)
        out.append(replies.status_chunk(request.cookie, request.offset, context_id, descriptors, i == len(ids) - 1))
    return out


def _dirty(bitmaps: ExportBitmaps, name: str, request: Request) -> list[tuple[int, int]]:
    """A bitmap's extents over the request; one removed since it was negotiated reports everything
    dirty (more than was written, never less)."""
    bitmap = bitmaps.by_name.get(name)
    if bitmap is None:
        return [(request.length, DIRTY)]
    limit = 1 if request.flags & FLAG_REQ_ONE else MAX_DESCRIPTORS
    return bitmap.extents(request.offset, request.length, limit)
