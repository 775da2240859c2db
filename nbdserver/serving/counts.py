"""What the kernel counts of a TCP connection: every byte the processes serving it have read from
it and written to it, whichever process did and whether it is still alive.

``tcpi_bytes_received`` counts the bytes that arrived in order, read or not; ``SIOCINQ`` those
not read yet: the difference is every byte read.  ``tcpi_bytes_acked`` counts the bytes the peer
acknowledged; ``SIOCOUTQ`` those written and not acknowledged: the sum is every byte written.
A crashed server's replacement asks these to know exactly where its predecessor stopped.
Unix sockets have no such counts: ``None``.
"""

from __future__ import annotations

import fcntl
import socket
import struct
import termios

_SIOCINQ = termios.FIONREAD
_SIOCOUTQ = termios.TIOCOUTQ
_TCP_INFO_SIZE = 256  # more than any kernel's struct tcp_info; the kernel says how much it filled
_BYTES_ACKED = 120  # offsetof(struct tcp_info, tcpi_bytes_acked), since Linux 4.1
_BYTES_RECEIVED = 128  # offsetof(struct tcp_info, tcpi_bytes_received), since Linux 4.1
_TRIES = 100  # reads of a count that kept changing (the peer sent, or acknowledged, meanwhile)


def _tcp_info(sock: socket.socket) -> bytes:
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_SIZE)
    if len(info) < _BYTES_RECEIVED + 8:
        raise OSError("this kernel's TCP_INFO has no byte counts")
    return info


def _queued(sock: socket.socket, request: int) -> int:
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), request, b"\0" * 4))[0]


def _stable(sock: socket.socket, offset: int, request: int, sign: int) -> int:
    """``count ± queue``, read again until the count did not move between (the two are two calls,
    and the peer may send or acknowledge between them)."""
    for _ in range(_TRIES):
        (before,) = struct.unpack_from("Q", _tcp_info(sock), offset)
        queued = _queued(sock, request)
        (after,) = struct.unpack_from("Q", _tcp_info(sock), offset)
        if before == after:
            return before + sign * queued
    raise OSError("the connection's byte counts kept changing")


def unread(sock: socket.socket) -> int:
    """Bytes received on the socket and not read yet."""
    return _queued(sock, _SIOCINQ)


def is_tcp(sock: socket.socket | None) -> bool:
    return sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM


def bytes_read(sock: socket.socket) -> int | None:
    """Every byte read from the connection since it was accepted; None for a Unix socket."""
    return _stable(sock, _BYTES_RECEIVED, _SIOCINQ, -1) if is_tcp(sock) else None


def bytes_written(sock: socket.socket) -> int | None:
    """Every byte written to the connection since it was accepted; None for a Unix socket."""
    return _stable(sock, _BYTES_ACKED, _SIOCOUTQ, +1) if is_tcp(sock) else None
