"""The event loop every process of the server runs on: uvloop's."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

import uvloop

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` to its end on a new uvloop loop, as ``uvloop.run`` does (uvloop 0.18 and later;
    Debian 12's python3-uvloop is 0.17)."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)
