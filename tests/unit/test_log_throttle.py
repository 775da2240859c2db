"""The throttle on the lines a flood of turned-away clients would otherwise write to the log."""

from __future__ import annotations

import time

from nbdserver.serving.server import LogThrottle


def test_a_burst_is_logged_then_the_rest_counted_for_the_next_period():
    throttle = LogThrottle(burst=3, period=0.2)
    assert [throttle.allow() for _ in range(5)] == ["", "", "", None, None]
    time.sleep(0.25)
    assert throttle.allow() == " (2 more since the last such line were not logged)"
    assert throttle.allow() == ""  # the count starts again


def test_a_trickle_is_logged_whole():
    throttle = LogThrottle(burst=2, period=0.05)
    for _ in range(4):
        assert throttle.allow() == ""
        time.sleep(0.06)
