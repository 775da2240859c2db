"""A socket pair's end on an event loop, carrying frames (frames.py) both ways without blocking.

The primary and each worker process talk over one (workers.py, worker.py).  A
blocking send there could wait for ever: when each side's buffer toward the
other is full, each process would be stuck in its send, and neither would read.
So frames going out are queued and written as the peer reads, and frames coming
in are taken as their bytes arrive.

A frame's descriptors travel with its first bytes.  The kernel ends a read at
the bytes that carry descriptors, so descriptors come in the order of the
frames they belong to, never after that frame's first byte: a queue of them
pairs each frame with its own.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
from collections import deque
from collections.abc import Callable
from typing import Any

from .frames import MAX_FDS_PER_FRAME, PREFIX, FrameError, encode_frame, oversized

READ_SIZE = 256 << 10

OnFrame = Callable[[dict[str, Any], bytes, list[int]], None]


class Channel:
    """Frames over ``sock`` (made non-blocking).  Each complete frame that arrives goes to
    ``on_frame`` (the receiver owns its descriptors); ``on_lost`` is called once, when the
    peer has gone (end of file, a broken pipe, or a malformed frame)."""

    def __init__(self, sock: socket.socket, on_frame: OnFrame, on_lost: Callable[[], None]) -> None:
        self._sock, self._on_frame, self._on_lost = sock, on_frame, on_lost
        self._loop = asyncio.get_running_loop()
        self._out: deque[tuple[memoryview, list[int]]] = deque()  # bytes to write, descriptors to pass with them
        self._in = bytearray()
        self._fds: deque[int] = deque()  # received, not yet given to a frame
        self._writing = False
        self.closed = False
        sock.setblocking(False)
        self._loop.add_reader(sock.fileno(), self._read)

    def send(self, head: dict[str, Any], raw: bytes = b"", fds: list[int] | None = None) -> bool:
        """Queue one frame; its descriptors are duplicated (the caller may close its own at once).
        False if the channel is closed."""
        if self.closed:
            return False
        fds = [os.dup(fd) for fd in fds or []]
        self._out.append((memoryview(encode_frame(head, raw, len(fds))), fds))
        if not self._writing:
            self._write()
        return not self.closed

    def close(self) -> None:
        """Stop both ways at once; frames not yet written are dropped."""
        if self.closed:
            return
        self.closed = True
        self._loop.remove_reader(self._sock.fileno())
        if self._writing:
            self._loop.remove_writer(self._sock.fileno())
        self._sock.close()
        for _, fds in self._out:
            _close_all(fds)
        _close_all(self._fds)
        self._out.clear()
        self._fds.clear()

    def _lose(self) -> None:
        if not self.closed:
            self.close()
            self._loop.call_soon(self._on_lost)  # not inside the caller's send

    def _write(self) -> None:
        while self._out:
            data, fds = self._out[0]
            try:
                sent = socket.send_fds(self._sock, [data], fds) if fds else self._sock.send(data)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._lose()
                return
            _close_all(fds)  # passed: the peer has its own now
            if sent < len(data):
                self._out[0] = (data[sent:], [])
            else:
                self._out.popleft()
        waiting = bool(self._out)
        if waiting != self._writing:
            self._writing = waiting
            if waiting:
                self._loop.add_writer(self._sock.fileno(), self._write)
            else:
                self._loop.remove_writer(self._sock.fileno())

    def _read(self) -> None:
        try:
            data, fds, _, _ = socket.recv_fds(self._sock, READ_SIZE, MAX_FDS_PER_FRAME)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._lose()
            return
        self._fds.extend(fds)
        if not data:
            self._lose()
            return
        self._in += data
        while not self.closed:
            try:
                frame = self._take_frame()
            except ValueError:  # FrameError, or a head that is not JSON
                self._lose()
                return
            if frame is None:
                return
            self._on_frame(*frame)

    def _take_frame(self) -> tuple[dict[str, Any], bytes, list[int]] | None:
        """The first frame, if all of it is here."""
        if len(self._in) < PREFIX.size:
            return None
        head_length, raw_length, nfds = PREFIX.unpack_from(self._in)
        if oversized(head_length, raw_length) or nfds > len(self._fds):
            raise FrameError(f"malformed frame ({head_length}, {raw_length}, {nfds} fds, {len(self._fds)} came)")
        end = PREFIX.size + head_length + raw_length
        if len(self._in) < end:
            return None
        head = json.loads(self._in[PREFIX.size : PREFIX.size + head_length])
        raw = bytes(self._in[PREFIX.size + head_length : end])
        del self._in[:end]
        return head, raw, [self._fds.popleft() for _ in range(nfds)]


def _close_all(fds: list[int] | deque[int]) -> None:
    for fd in fds:
        os.close(fd)
