"""Busy polling: after a request arrives or a reply leaves, the event loop polls for a short window
instead of sleeping.

A client with one request in flight at a time sends its next request a few tens of
microseconds after it reads the reply.  An event loop asleep in ``epoll_wait`` meanwhile has to
be woken for it: an interrupt to its CPU, then the scheduler, which on a virtual machine costs
more than serving a 4k request does.  Polling (``epoll_wait`` with no timeout, by keeping one
callback ready) for a few tens of microseconds after each request and reply spares that wake-up
(and, while the window lasts, the one for a read from the disk), as the
kernel's own ``busy_poll`` does for sockets.  The CPU it takes per request is about what the
wake-up cost; while requests queue up the loop is busy anyway and the window changes nothing.

A window pays off when a request arrives in it after a reply has left (the client answered):
bytes that follow other bytes with no reply between (a request's payload behind its header) do
not count.  A client that thinks between requests lets the windows expire without one: after a
few such windows in a row polling rests, so an idle or slow client costs a bounded trickle.
"""

from __future__ import annotations

import asyncio
from time import monotonic
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..stats import ServerStats

EMPTY_BEFORE_REST = 4  # windows in a row that received nothing, before polling rests
REST = 0.1  # seconds without polling after that


class BusyPoll:
    """One per event loop; connections report each receive with :meth:`arrived` and each batch of
    replies sent with :meth:`replied`.  The windows, those that did not pay off, and the time
    spent polling are counted in ``stats``."""

    def __init__(self, window_us: int, stats: ServerStats) -> None:
        self.window = window_us / 1e6  # seconds; 0: never poll
        self.stats = stats
        self._deadline = 0.0  # polling stops at this monotonic() time unless more arrives
        self._polling = False
        self._started = 0.0
        self._answers = 0  # receives in the current window that followed a reply
        self._replied = False  # a reply left since the last receive
        self._empty = 0  # windows in a row without an answer
        self._resting_until = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None

    def arrived(self, now: float) -> None:
        """Bytes arrived at ``now`` (``time.monotonic()``): poll for the window from now on."""
        if not self.window:
            return
        if self._polling and self._replied:
            self._answers += 1
        self._replied = False
        self._open(now)

    def replied(self) -> None:
        """Replies left: a receive from now on is a client's answer, awaited for a window from now
        (a reply that had to wait for the disk may have outlasted the window its request opened)."""
        if not self.window:
            return
        self._replied = True
        self._open(monotonic())

    def _open(self, now: float) -> None:
        self._deadline = now + self.window
        if self._polling or now < self._resting_until:
            return
        self._polling, self._answers, self._started = True, 0, now
        self.stats.busy_poll_windows += 1
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        self._loop.call_soon(self._poll)

    def _poll(self) -> None:
        """Stay ready (the loop then polls without sleeping) until the deadline passes."""
        now = monotonic()
        if now < self._deadline:
            self._loop.call_soon(self._poll)  # type: ignore[union-attr]
            return
        self._polling = False
        self.stats.busy_poll_seconds += now - self._started
        if self._answers:
            self._empty = 0
            return
        self.stats.busy_poll_empty_windows += 1
        self._empty += 1
        if self._empty >= EMPTY_BEFORE_REST:
            self._empty = 0
            self._resting_until = now + REST
