"""Living under systemd: readiness and watchdog notifications, inherited sockets, journal logging.

The notification protocol is a few datagrams of ``KEY=VALUE`` lines to the
socket named by ``NOTIFY_SOCKET``; it is written out here rather than taken
from a library, since it is that small and the server needs nothing else of
libsystemd.  Without ``NOTIFY_SOCKET`` every notification is a no-op, so the
same code runs with and without a service manager.
"""

from __future__ import annotations

import array
import logging
import os
import socket
import stat
import sys
from collections.abc import MutableMapping

log = logging.getLogger(__name__)

SD_LISTEN_FDS_START = 3


class Notifier:
    """sd_notify(3) by hand: READY=1, STATUS=..., WATCHDOG=1, STOPPING=1, RELOADING=1."""

    def __init__(self, environ: MutableMapping[str, str] = os.environ) -> None:
        address = environ.pop("NOTIFY_SOCKET", "")  # not for any child we might start
        self._address: str | bytes | None = None
        self._sock: socket.socket | None = None
        if address.startswith("@"):  # abstract namespace
            self._address = "\0" + address[1:]
        elif address.startswith("/"):
            self._address = address
        if self._address is not None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.watchdog_interval = _watchdog_interval(environ)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def notify(self, *fields: str) -> None:
        """Send ``KEY=VALUE`` fields in one datagram; a failure is logged, never raised."""
        if self._sock is None:
            return
        try:
            self._sock.sendto("\n".join(fields).encode(), self._address)  # type: ignore[arg-type]
        except OSError as exc:
            log.warning("cannot notify the service manager: %s", exc)

    def notify_fds(self, fields: list[str], fds: list[int]) -> bool:
        """Fields with descriptors (FDSTORE=1): True if the manager got them."""
        if self._sock is None:
            return False
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
        try:
            self._sock.sendmsg(["\n".join(fields).encode()], rights, 0, self._address)  # type: ignore[arg-type]
        except OSError as exc:
            log.warning("cannot pass descriptors to the service manager: %s", exc)
            return False
        return True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _watchdog_interval(environ: MutableMapping[str, str]) -> float | None:
    """Seconds between WATCHDOG=1 pings (half the manager's timeout), or None if none is asked for."""
    usec = environ.pop("WATCHDOG_USEC", "")
    pid = environ.pop("WATCHDOG_PID", "")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        timeout = int(usec) / 1e6
    except ValueError:
        log.warning("ignoring WATCHDOG_USEC=%r: not a number", usec)
        return None
    return timeout / 2 if timeout > 0 else None


def inherited_fds(environ: MutableMapping[str, str] = os.environ) -> list[tuple[str, int]]:
    """Descriptors passed by the service manager (``LISTEN_FDS``: socket activation, the fd store),
    with their names.

    The variables are removed once read, as sd_listen_fds(3) does, so that they
    cannot be mistaken for ours by a process we start.
    """
    pid, count = environ.pop("LISTEN_PID", ""), environ.pop("LISTEN_FDS", "")
    names = environ.pop("LISTEN_FDNAMES", "")
    if not count or pid != str(os.getpid()):
        return []
    try:
        n = int(count)
    except ValueError:
        raise OSError(f"LISTEN_FDS={count!r} is not a number") from None
    labels = names.split(":") if names else []
    out = []
    for i in range(n):
        fd = SD_LISTEN_FDS_START + i
        os.set_inheritable(fd, False)
        out.append((labels[i] if i < len(labels) else "", fd))
    return out


def listening_sockets(named: list[tuple[str, int]]) -> list[tuple[str, socket.socket]]:
    """The inherited descriptors as listening sockets (socket activation); OSError for any other kind."""
    out = []
    for name, fd in named:
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            raise OSError(f"inherited descriptor {fd} is not a socket")
        sock = socket.socket(fileno=fd)
        if sock.type != socket.SOCK_STREAM:
            raise OSError(f"inherited socket {fd} is not a stream socket (ListenStream= is needed)")
        out.append((name, sock))
    return out


# Logging ----------------------------------------------------------------------------------


_SYSLOG_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


class JournalFormatter(logging.Formatter):
    """``<N>message``: the journal reads the syslog priority from the prefix and adds its own timestamp."""

    def format(self, record: logging.LogRecord) -> str:
        priority = _SYSLOG_PRIORITY.get(record.levelno, 6)
        text = super().format(record)
        # A traceback must not become lines of priority 6: prefix every line.
        return "\n".join(f"<{priority}>{line}" for line in text.splitlines())


def under_journal(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Is stderr connected to the journal?  ``JOURNAL_STREAM`` names its device and inode."""
    stream = environ.get("JOURNAL_STREAM", "")
    dev, _, ino = stream.partition(":")
    try:
        st = os.fstat(sys.stderr.fileno())
        return (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (ValueError, OSError):
        return False


def configure_logging(level: str, prefix: str = "") -> None:
    """Log to stderr: ``<N>`` priorities and no timestamps for the journal, timestamps otherwise;
    ``prefix`` begins every message (a worker process's number)."""
    handler = logging.StreamHandler(sys.stderr)
    if under_journal():
        handler.setFormatter(JournalFormatter(f"{prefix}%(message)s"))
    else:
        handler.setFormatter(logging.Formatter(f"%(asctime)s nbdserver[%(levelname)s] {prefix}%(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    set_log_level(level)


def set_log_level(level: str) -> None:
    logging.getLogger().setLevel(level.upper())
