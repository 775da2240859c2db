"""Letting a deep queue's requests gather in the socket before they are received.

A client with many requests in flight sends a new one each time it has read a reply.  A server
that keeps up receives them as they come, one or two per receive: its block layer has nothing to
merge, and each arrival wakes the server, a wake-up that loopback charges to the client's send.
So once every reply has left, a connection whose client keeps a deep queue asks the kernel not
to report the socket readable until half of that queue has arrived again (``SO_RCVLOWAT``): the
requests then come in one receive, plug and merge as one batch, and cost one wake-up, while the
client still has the other half of its replies to work through.

A client's depth cannot be seen while the server keeps up with it, so it is measured: on a busy
connection (``PROBE_AFTER`` requests since the last measurement, at most once per
``PROBE_EVERY``), the server answers everything, then waits for as many requests as a mark can
ask for, or ``PROBE_WAIT``: what arrived is what the client sends without an answer.  A gathering
that the client does not fill in time (it keeps fewer requests in flight now, or waits for
something else) is read anyway, and the depth believed of it falls to what arrived or half of
what it was.  The time allowed follows the client's pace (``WAIT_SPAN`` times as long as the
requests took to arrive the last time), within ``MIN_WAIT`` and ``MAX_WAIT``.

What it costs: a client that keeps few requests in flight waits up to ``PROBE_WAIT`` for one
reply a second; one that keeps fewer than ``MIN_DEPTH`` is never waited for otherwise (below it,
random reads lost more to the pauses than the wake-ups saved; fs/bench/results).  Only TCP: for
a Unix socket the kernel reports readable at the first byte whatever the mark.
"""

from __future__ import annotations

import asyncio
import socket
from time import monotonic
from typing import TYPE_CHECKING

from .counts import unread

if TYPE_CHECKING:
    from ..stats import ServerStats

MIN_DEPTH = 64  # a client that keeps fewer requests in flight is read as its requests come
SHARE = 2  # wait for this part of the client's depth: the rest keeps it busy meanwhile
MAX_MARK = 768 * 1024  # the most bytes a mark asks for (the staging buffer grows to 1 MiB)
MAX_REQUEST = 64 * 1024  # larger requests are not waited for: a receive is cheap next to them
PROBE_AFTER = 1000  # requests since the last measurement that make a connection busy
PROBE_EVERY = 1.0  # seconds, at least, between measurements
PROBE_WAIT = 0.002  # seconds a measurement waits (1-2 ms: libuv's timers count whole ms)
WAIT_SPAN = 3  # a gathering waits this many times as long as its requests took the last time
MIN_WAIT, MAX_WAIT = 0.002, 0.008  # seconds


class Gathering:
    """One per TCP connection in transmission: :meth:`taken` after each receive, :meth:`idle`
    once nothing is in flight and every reply has left, :meth:`stop` before the socket is handed
    on, :meth:`close` once it is closed."""

    def __init__(
        self,
        sock: socket.socket,
        loop: asyncio.AbstractEventLoop,
        stats: ServerStats,
        probe_after: int = PROBE_AFTER,
        probe_every: float = PROBE_EVERY,
    ) -> None:
        self._sock = sock
        self._loop = loop
        self._stats = stats
        self._probe_after, self._probe_every = probe_after, probe_every
        self.depth = 0  # requests the client sent without an answer, as last measured
        self._request_bytes = 0  # bytes per request of the last receive
        self._requests = 0  # taken since the last measurement
        self._probe_at = 0.0  # no measurement before this monotonic() time
        self._probing = False  # the mark asks for all the client would send
        self._gathering = False  # a mark above one byte was set since the last receive
        self._late = False  # and its time passed before it was filled
        self._since = 0.0  # when the mark was set
        self._interval = 0.0  # seconds between the client's requests while they gathered
        self._mark = 1  # the low-water mark on the socket, in bytes (1: the kernel's default)
        self._timer: asyncio.TimerHandle | None = None
        clear_mark(sock)  # a predecessor that crashed may have left one

    def taken(self, in_flight: int, nbytes: int, requests: int, at: float, partial: bool = False) -> None:
        """A receive of ``nbytes`` at ``at`` (``time.monotonic()``) brought ``requests``;
        ``in_flight`` are still being served; ``partial``: it ended inside a request."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if partial and self._mark > 1:
            # The rest of that request may be all the client sends until it is answered: it
            # must not wait for a mark.
            self._set(1)
        if not requests:
            return  # the rest of a request: nothing to learn
        self._request_bytes = nbytes // requests
        self._requests += requests
        if not self._gathering:
            return
        self._gathering = False
        arrived = (nbytes + _unread(self._sock)) // self._request_bytes
        if self._probing:
            self.depth = arrived  # all the client sends without an answer
        elif self._late:
            self.depth = max(arrived, self.depth // 2)
        else:
            self._interval = (at - self._since) / arrived
        self._probing = self._late = False

    def idle(self) -> bool:
        """Nothing in flight, every reply out: set the mark for the requests to come.  Whether the
        connection waits for more than one (so that no quick answer is due)."""
        mark, wait, now = 1, PROBE_WAIT, monotonic()
        if 0 < self._request_bytes <= MAX_REQUEST:
            if self._requests >= self._probe_after and now >= self._probe_at:
                self._probing, self._requests, self._probe_at = True, 0, now + self._probe_every
                self._stats.gather_probes += 1
                mark = MAX_MARK
            elif self.depth >= MIN_DEPTH:
                mark = min(self.depth // SHARE * self._request_bytes, MAX_MARK)
                wait = min(max(WAIT_SPAN * mark // self._request_bytes * self._interval, MIN_WAIT), MAX_WAIT)
                if not self._gathering:  # a second flush before the next receive waits on the same
                    self._stats.gather_waits += 1
        if mark > 1 and self._timer is None:
            self._since = now
            self._timer = self._loop.call_later(wait, self._expired)
        if mark != self._mark:
            self._set(mark)
        self._gathering = mark > 1
        return self._gathering

    def stop(self) -> None:
        """Read as requests come from now on (the socket goes to a process that may not gather)."""
        self.close()
        if self._mark > 1:
            self._set(1)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._gathering = False

    def _expired(self) -> None:
        """Not filled in time: read what arrived (the kernel reports it at once when the mark is
        lowered).  libuv's clock counts whole milliseconds, so the timer may run early: a mark
        that was met is left to the receive that follows."""
        self._timer = None
        if _unread(self._sock) < self._mark:
            self._late = True
            if not self._probing:
                self._stats.gather_late += 1
            self._set(1)

    def _set(self, mark: int) -> None:
        if _set_mark(self._sock, mark):
            self._mark = mark


def clear_mark(sock: socket.socket) -> None:
    """Have the socket reported readable at its first byte (the kernel's default), whatever mark a
    process that served it before and crashed left on it."""
    _set_mark(sock, 1)


def _set_mark(sock: socket.socket, mark: int) -> bool:
    """Set the socket's low-water mark; False if it is closed meanwhile."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, mark)
    except OSError:
        return False
    return True


def _unread(sock: socket.socket) -> int:
    try:
        return unread(sock)
    except OSError:
        return 0  # closed meanwhile
