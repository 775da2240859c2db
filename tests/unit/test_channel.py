"""channel.py: frames both ways over a real socket pair on a real uvloop loop, never blocking it."""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Any

import uvloop

from nbdserver.process.channel import Channel
from nbdserver.process.frames import PREFIX

FRAMES = 5000  # far more than a socket pair's buffer holds


class End:
    """One end and what reached it."""

    def __init__(self, sock: socket.socket) -> None:
        self.frames: list[tuple[dict[str, Any], bytes, list[int]]] = []
        self.lost = asyncio.Event()
        self.channel = Channel(sock, lambda *frame: self.frames.append(frame), self.lost.set)

    async def until(self, count: int) -> None:
        while len(self.frames) < count and not self.lost.is_set():
            await asyncio.sleep(0.001)


def pair() -> tuple[End, End]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return End(a), End(b)


def pipe_saying(text: str) -> tuple[int, int]:
    r, w = os.pipe()
    os.write(w, text.encode())
    os.close(w)
    return r, w


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_both_sides_send_more_than_the_buffers_hold_without_waiting_on_each_other():
    # Blocking sends would hang here: nothing reads until both have sent everything.
    async def scenario() -> tuple[End, End]:
        a, b = pair()
        for i in range(FRAMES):
            assert a.channel.send({"type": "count", "n": i}, b"x" * (i % 300))
            assert b.channel.send({"type": "count", "n": i})
        await asyncio.wait_for(asyncio.gather(a.until(FRAMES), b.until(FRAMES)), 30)
        return a, b

    a, b = uvloop.run(scenario())
    assert [head["n"] for head, _, _ in b.frames] == list(range(FRAMES))  # in order
    assert [raw for _, raw, _ in b.frames] == [b"x" * (i % 300) for i in range(FRAMES)]
    assert [head["n"] for head, _, _ in a.frames] == list(range(FRAMES))
    a.channel.close()
    b.channel.close()


def test_each_frame_gets_its_own_descriptor_among_frames_without_any():
    async def scenario() -> End:
        a, b = pair()
        for i in range(2000):
            if i % 3 == 0:
                r, _ = pipe_saying(f"frame {i}")
                a.channel.send({"n": i}, os.urandom(i % 5000), [r])
                os.close(r)  # the channel has its own copy
            else:
                a.channel.send({"n": i}, os.urandom(i % 7000))
        await asyncio.wait_for(b.until(2000), 30)
        a.channel.close()
        return b

    before = open_fds()
    b = uvloop.run(scenario())
    for head, _, fds in b.frames:
        if head["n"] % 3 == 0:
            (fd,) = fds
            assert os.read(fd, 100) == f"frame {head['n']}".encode()
            os.close(fd)
        else:
            assert fds == []
    b.channel.close()
    assert open_fds() == before


def test_a_large_frame_arrives_whole():
    async def scenario() -> End:
        a, b = pair()
        a.channel.send({"type": "connection"}, b"\xab" * (32 << 20))
        a.channel.send({"type": "end"})
        await asyncio.wait_for(b.until(2), 30)
        return b

    b = uvloop.run(scenario())
    assert [head["type"] for head, _, _ in b.frames] == ["connection", "end"]
    assert b.frames[0][1] == b"\xab" * (32 << 20)


def test_the_peer_closing_is_lost_once_and_queued_descriptors_are_closed():
    async def scenario() -> tuple[End, bool, int]:
        a, b = pair()
        r, w = os.pipe()
        a.channel.send({"type": "connection"}, b"", [r])
        os.close(r)
        os.close(w)
        b.channel.close()
        await asyncio.wait_for(a.lost.wait(), 10)
        return a, a.channel.send({"type": "late"}), len(a.frames)

    before = open_fds()
    a, sent_late, frames = uvloop.run(scenario())
    assert a.channel.closed and not sent_late and frames == 0
    assert open_fds() == before  # nothing queued or received was left open


def test_a_malformed_frame_loses_the_channel():
    async def scenario() -> End:
        raw, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        b = End(theirs)
        raw.sendall(PREFIX.pack(1 << 30, 0, 0))  # a head of 1 GiB: no frame is that
        await asyncio.wait_for(b.lost.wait(), 10)
        raw.close()
        return b

    b = uvloop.run(scenario())
    assert b.channel.closed and b.frames == []


def test_a_frame_naming_descriptors_that_did_not_come_loses_the_channel():
    async def scenario() -> End:
        raw, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        b = End(theirs)
        raw.sendall(PREFIX.pack(2, 0, 1) + b"{}")  # says one descriptor, carries none
        await asyncio.wait_for(b.lost.wait(), 10)
        raw.close()
        return b

    b = uvloop.run(scenario())
    assert b.channel.closed and b.frames == []
