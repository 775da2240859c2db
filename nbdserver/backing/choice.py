"""Which engine serves an export: the one asked for by name, or the first that works here.

Apart from the engines themselves, so that neither engine module needs the other's.
"""

from __future__ import annotations

import logging
import os

from .engine import DEFAULT_WORKERS, Engine, ThreadPoolEngine
from .file import Backing

log = logging.getLogger(__name__)

ENGINES = ("auto", "threads", "uring")


def open_engine(name: str, backing: Backing, workers: int = DEFAULT_WORKERS) -> Engine:
    """The engine called ``name`` (one of ENGINES) on ``backing``."""
    if name == "threads":
        return ThreadPoolEngine(backing, workers)
    if name in ("uring", "auto"):
        from .uring import UringEngine  # its ctypes set-up is only wanted when chosen

        try:
            return UringEngine(backing)
        except OSError as exc:
            if name == "uring":
                raise
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            log.info("%s: io_uring is not usable here (%s); using the thread pool", backing.path, reason)
            return ThreadPoolEngine(backing, workers)
    raise ValueError(f"unknown engine {name!r}")
