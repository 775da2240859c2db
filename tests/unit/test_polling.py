"""Busy polling's windows on a real event loop: kept open by arrivals, counted, and resting
after windows that received nothing."""

from __future__ import annotations

import asyncio
from time import monotonic

import uvloop

from nbdserver.serving.polling import EMPTY_BEFORE_REST, REST, BusyPoll
from nbdserver.stats import ServerStats

# Windows far wider than the pauses between the events of a scenario (on a loaded machine the loop
# may be kept off the CPU for tens of milliseconds), and each scenario waits a window and more
# after its last event, so that its last window has ended when the counts are read.
WINDOW = 0.25


def test_answers_within_the_window_keep_one_window_open():
    async def scenario() -> tuple[ServerStats, float, float]:
        stats = ServerStats()
        poll = BusyPoll(int(WINDOW * 1e6), stats)
        first = last = monotonic()
        for _ in range(20):
            poll.arrived(last)  # the window starts at the first one's time: ``first``
            last = monotonic()  # the window ends a window after the last reply, which comes after this
            poll.replied()
            await asyncio.sleep(0.001)
        await asyncio.sleep(WINDOW + 0.05)
        return stats, last - first, monotonic() - first

    stats, answers, total = uvloop.run(scenario())
    assert stats.busy_poll_windows == 1 and stats.busy_poll_empty_windows == 0
    assert answers + WINDOW <= stats.busy_poll_seconds <= total  # the answers, then one window


def test_bytes_with_no_reply_between_are_no_answer():
    """A header, then its payload: the window they open pays off only if the client answers."""

    async def scenario() -> ServerStats:
        stats = ServerStats()
        poll = BusyPoll(int(WINDOW * 1e6), stats)
        poll.arrived(monotonic())
        await asyncio.sleep(0.001)
        poll.arrived(monotonic())  # the payload, no reply yet
        poll.replied()
        await asyncio.sleep(WINDOW + 0.05)  # the client does not answer
        return stats

    stats = uvloop.run(scenario())
    assert stats.busy_poll_windows == 1 and stats.busy_poll_empty_windows == 1


def test_a_reply_after_a_slow_read_opens_a_window_for_the_answer():
    """A read that outlasts the window its request opened: the reply opens another, and the
    client's next request, arriving in it, is an answer."""

    async def scenario() -> ServerStats:
        stats = ServerStats()
        poll = BusyPoll(int(WINDOW * 1e6), stats)
        poll.arrived(monotonic())
        await asyncio.sleep(WINDOW + 0.05)  # the disk takes longer than the window
        poll.replied()
        await asyncio.sleep(0.002)
        poll.arrived(monotonic())
        await asyncio.sleep(WINDOW + 0.05)
        return stats

    stats = uvloop.run(scenario())
    assert stats.busy_poll_windows == 2 and stats.busy_poll_empty_windows == 1


def test_the_loop_runs_while_it_polls():
    """Polling keeps a callback ready: the loop goes round without sleeping, and runs other work."""

    async def scenario() -> tuple[int, float]:
        poll = BusyPoll(30_000, ServerStats())
        ticks = 0

        def tick() -> None:
            nonlocal ticks
            ticks += 1

        loop = asyncio.get_running_loop()
        started = monotonic()
        poll.arrived(started)
        fired = loop.create_future()
        loop.call_later(0.01, lambda: fired.set_result(monotonic()))
        for _ in range(100):
            loop.call_soon(tick)
            await asyncio.sleep(0)
        return ticks, await fired - started

    ticks, late = uvloop.run(scenario())
    assert ticks == 100
    assert 0.005 <= late < 0.5  # timers still fire in the window (uvloop counts in milliseconds)


def test_empty_windows_rest_polling_then_it_resumes():
    async def scenario() -> tuple[ServerStats, int, int]:
        stats = ServerStats()
        poll = BusyPoll(200, stats)  # 0.2 ms windows, requests 5 ms apart: each window is empty
        for _ in range(EMPTY_BEFORE_REST):
            poll.arrived(monotonic())
            await asyncio.sleep(0.005)
        resting = stats.busy_poll_windows
        poll.arrived(monotonic())  # within the rest: no window
        await asyncio.sleep(0.005)
        rested = stats.busy_poll_windows
        await asyncio.sleep(REST)
        poll.arrived(monotonic())
        await asyncio.sleep(0.005)
        return stats, resting, rested

    stats, resting, rested = uvloop.run(scenario())
    assert resting == EMPTY_BEFORE_REST and stats.busy_poll_empty_windows == EMPTY_BEFORE_REST + 1
    assert rested == resting  # the arrival during the rest opened none
    assert stats.busy_poll_windows == EMPTY_BEFORE_REST + 1  # after the rest, polling resumed


def test_a_window_of_zero_never_polls():
    async def scenario() -> ServerStats:
        stats = ServerStats()
        poll = BusyPoll(0, stats)
        for _ in range(10):
            poll.arrived(monotonic())
            await asyncio.sleep(0)
        return stats

    stats = uvloop.run(scenario())
    assert stats.busy_poll_windows == 0 and stats.busy_poll_seconds == 0
