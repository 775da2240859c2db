"""Frames over a Unix socket pair: a JSON head, raw bytes, and file descriptors riding along.

What a server says to its successor in an upgrade (handover.py), what it keeps in
systemd's fd store (fdstore.py, without descriptors), and what the primary and its
worker processes say to each other (workers.py, over channel.py).
"""

from __future__ import annotations

import json
import os
import socket
import struct
from typing import Any

PREFIX = struct.Struct(">IIB")  # head length, raw length, descriptors
MAX_FDS_PER_FRAME = 1
MAX_HEAD = 1 << 20
MAX_RAW = 64 << 20  # a staged receive (1 MiB) and the part of a WRITE payload received (32 MiB)


class FrameError(ValueError):
    """A frame that cannot be one: the peer is not what it should be."""


def oversized(head_length: int, raw_length: int) -> bool:
    """Lengths no frame has: the peer is not what it should be."""
    return head_length > MAX_HEAD or raw_length > MAX_RAW


def encode_frame(head: dict[str, Any], raw: bytes = b"", nfds: int = 0) -> bytes:
    encoded = json.dumps(head).encode()
    return PREFIX.pack(len(encoded), len(raw), nfds) + encoded + raw


def decode_frames(data: bytes) -> list[tuple[dict[str, Any], bytes]]:
    """Frames written one after another (to a file: no descriptors ride along)."""
    frames, pos = [], 0
    while pos < len(data):
        head_length, raw_length, _ = PREFIX.unpack_from(data, pos)
        pos += PREFIX.size
        if oversized(head_length, raw_length) or pos + head_length + raw_length > len(data):
            raise FrameError(f"malformed state at byte {pos}")
        head = json.loads(data[pos : pos + head_length])
        pos += head_length
        frames.append((head, data[pos : pos + raw_length]))
        pos += raw_length
    return frames


def send_frame(sock: socket.socket, head: dict[str, Any], raw: bytes = b"", fds: list[int] | None = None) -> None:
    """One frame; the descriptors travel with its first bytes."""
    frame = encode_frame(head, raw, len(fds or []))
    if fds:
        sent = socket.send_fds(sock, [frame[: PREFIX.size]], fds)
        assert sent == PREFIX.size
        frame = frame[PREFIX.size :]
    sock.sendall(frame)


def receive_frame(sock: socket.socket) -> tuple[dict[str, Any], bytes, list[int]]:
    """The next frame; EOFError if the peer closed its end between frames."""
    prefix, fds, _, _ = socket.recv_fds(sock, PREFIX.size, MAX_FDS_PER_FRAME)
    if not prefix:
        raise EOFError("the other side closed the handover socket")
    prefix += _receive_exactly(sock, PREFIX.size - len(prefix))
    head_length, raw_length, nfds = PREFIX.unpack(prefix)
    if oversized(head_length, raw_length) or nfds != len(fds):
        for fd in fds:
            os.close(fd)
        raise FrameError(f"malformed frame ({head_length}, {raw_length}, {nfds} fds, {len(fds)} came)")
    head = json.loads(_receive_exactly(sock, head_length))
    return head, _receive_exactly(sock, raw_length), fds


def _receive_exactly(sock: socket.socket, n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            raise EOFError("the handover socket closed inside a frame")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)
