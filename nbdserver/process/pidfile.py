"""``--pid-file``: the main process's PID in a file, for scripts and supervisors other than systemd.

Written once the server serves (so its existence says the server is ready), atomically (a
temporary file renamed over it: a reader never sees half a number).  An upgrade keeps it true:
the predecessor writes its successor's PID as it hands everything over, and the successor writes
its own once it serves.  A clean stop removes it, if it still names this process.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


def write(path: Path, pid: int | None = None) -> None:
    """Say that ``pid`` (this process by default) is the server's main process; a failure is
    logged, not fatal (the clients are served all the same)."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_text(f"{pid or os.getpid()}\n")
        os.chmod(temporary, 0o644)
        os.rename(temporary, path)
    except OSError as exc:
        log.error("cannot write the PID file %s: %s", path, exc.strerror or exc)
        with contextlib.suppress(OSError):
            temporary.unlink()


def remove(path: Path) -> None:
    """At a clean stop: remove the file if it names this process (not a successor)."""
    try:
        if int(path.read_text().strip() or 0) == os.getpid():
            path.unlink()
    except (OSError, ValueError):
        pass
