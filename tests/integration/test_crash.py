"""Crash consistency: SIGKILL the server again and again while clients write with FUA and FLUSH.

After each kill, every write acknowledged as durable (a FUA write's reply, or a write completed
before a FLUSH that was then acknowledged) must be on the device under the filesystem, not only
in the page cache, which a power cut would lose: its blocks are found with FIEMAP (without
syncing) and read from the block device with O_DIRECT.  Every acknowledged write must be in the
file (the page cache outlives the process), and the restarted server must read each back.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import random
import signal
import struct
import subprocess
import threading
from pathlib import Path

import nbd
import pytest

from tests.conftest import MiB

pytestmark = pytest.mark.bindings  # libnbd's Python bindings: run again by tests/in_current

SIZE = 256 * MiB
SLOT = 64 * 1024  # one write per slot per round: no two writes in a round overlap
ROUNDS = int(os.environ.get("NBDSERVER_CRASH_ROUNDS", "6"))  # kills per cache mode; more on demand
QUEUE_DEPTH = 16
FS_IOC_FIEMAP = 0xC020660B
_FIEMAP = struct.Struct("=QQIIII")  # start, length, flags, mapped extents, extent count, reserved
_EXTENT = struct.Struct("=QQQQQIIII")  # logical, physical, length, 2 reserved, flags, 3 reserved
FIEMAP_EXTENT_UNKNOWN = 0x2  # not yet allocated (delayed allocation): not on the device


def device_of(path: Path) -> str:
    return subprocess.run(["findmnt", "-no", "SOURCE", "-T", str(path)], capture_output=True, text=True).stdout.strip()


def on_device(path: Path, device: int, offset: int, length: int) -> bytes | None:
    """What the block device holds for a range of the file, as FIEMAP maps it without syncing;
    None if any part has no place on the device yet."""
    fd = os.open(path, os.O_RDONLY)
    try:
        request = bytearray(_FIEMAP.pack(offset, length, 0, 0, 16, 0) + bytes(16 * _EXTENT.size))
        fcntl.ioctl(fd, FS_IOC_FIEMAP, request)
    finally:
        os.close(fd)
    mapped = _FIEMAP.unpack_from(request)[3]
    out = bytearray()
    for i in range(mapped):
        logical, physical, extent_length, *_, flags, _, _, _ = _EXTENT.unpack_from(
            request, _FIEMAP.size + i * _EXTENT.size
        )
        if flags & FIEMAP_EXTENT_UNKNOWN:
            return None
        start, end = max(logical, offset + len(out)), min(logical + extent_length, offset + length)
        if start != offset + len(out):
            return None  # a hole where data should be
        buffer = mmap.mmap(-1, end - start)  # page-aligned, as O_DIRECT wants
        os.preadv(device, [buffer], physical + start - logical)
        out += buffer
    return bytes(out) if len(out) == length else None


def payload(round_: int, slot: int) -> bytes:
    return random.Random(round_ * 100_000 + slot).randbytes(SLOT)


class Acked:
    """Every writer's acknowledged writes: a FLUSH on one connection makes durable those of all."""

    def __init__(self) -> None:
        self.slots: set[int] = set()
        self.lock = threading.Lock()

    def add(self, slot: int) -> None:
        with self.lock:
            self.slots.add(slot)

    def now(self) -> set[int]:
        with self.lock:
            return set(self.slots)


class Writer:
    """Pipelined writes into fresh slots, every third with FUA, a FLUSH every 24 writes."""

    def __init__(self, uri: str, round_: int, first_slot: int, slots: int, everyone: Acked) -> None:
        self.h = nbd.NBD()
        self.h.connect_uri(uri)
        self.round = round_
        self.todo = list(range(first_slot, first_slot + slots))
        self.sent: set[int] = set()
        self.acked: set[int] = set()
        self.durable: set[int] = set()  # of any writer
        self.everyone = everyone
        self.flushes = 0

    def run(self) -> None:
        """Until the server dies (every error after the kill ends the run)."""
        h, in_flight = self.h, {}
        try:
            while self.todo or in_flight:
                while self.todo and len(in_flight) < QUEUE_DEPTH:
                    slot = self.todo.pop(0)
                    self.sent.add(slot)
                    fua = slot % 3 == 0
                    cookie = h.aio_pwrite(payload(self.round, slot), slot * SLOT, flags=nbd.CMD_FLAG_FUA if fua else 0)
                    in_flight[cookie] = ("write", slot, fua)
                    if slot % 24 == 23:
                        in_flight[h.aio_flush()] = ("flush", self.everyone.now(), False)
                h.poll(1)
                while in_flight and (cookie := h.aio_peek_command_completed()) != 0:
                    kind, what, fua = in_flight.pop(cookie)
                    h.aio_command_completed(cookie)  # raises if the command failed
                    if kind == "write":
                        self.acked.add(what)
                        self.everyone.add(what)
                        if fua:
                            self.durable.add(what)
                    else:
                        self.durable |= what
                        self.flushes += 1
        except nbd.Error:
            pass  # the server was killed


@pytest.mark.parametrize("processes", [1, 2], ids=["one-process", "two-workers"])
@pytest.mark.parametrize("cache", ["buffered", "direct"])
def test_durable_writes_survive_repeated_sigkill(start_server, ext4_dir, cache, processes):
    """With worker processes, one worker is killed first, then the primary and the other."""
    image = ext4_dir / f"crash-{cache}.img"
    with open(image, "wb") as f:
        f.truncate(SIZE)
    slots_per_writer = SIZE // SLOT // 2
    totals = {"acked": 0, "durable": 0, "flushes": 0}
    device = os.open(device_of(image), os.O_RDONLY | os.O_DIRECT)
    rng = random.Random(cache)
    expected: dict[int, bytes] = {}
    for round_ in range(ROUNDS):
        server = start_server(image, "--cache", cache, "--processes", str(processes))
        everyone = Acked()
        writers = [Writer(server.uri(), round_, i * slots_per_writer, slots_per_writer, everyone) for i in range(2)]
        threads = [threading.Thread(target=w.run) for w in writers]
        for thread in threads:
            thread.start()
        threading.Event().wait(rng.uniform(0.2, 0.8))  # mid-stream: the writers need longer
        workers = server.worker_pids() if processes > 1 else []
        if workers:
            os.kill(workers[0], signal.SIGKILL)
            threading.Event().wait(rng.uniform(0.05, 0.2))
        for pid in [server.proc.pid, *workers[1:]]:
            os.kill(pid, signal.SIGKILL)
        server.proc.wait()
        for thread in threads:
            thread.join(30)
            assert not thread.is_alive()
        for writer in writers:
            assert writer.durable <= everyone.now()
            assert writer.acked, "nothing was acknowledged before the kill"
            for slot in writer.sent - writer.acked:
                expected.pop(slot, None)  # cut short by the kill: old data, new data or a mix
            for slot in writer.acked:
                expected[slot] = payload(round_, slot)
        for slot in set().union(*(w.durable for w in writers)):
            found = on_device(image, device, slot * SLOT, SLOT)
            assert found == payload(round_, slot), f"round {round_}: durable slot {slot} is not on the device"
        for writer in writers:
            totals["acked"] += len(writer.acked)
            totals["durable"] += len(writer.durable)
            totals["flushes"] += writer.flushes
        with open(image, "rb") as f:
            for slot, data in expected.items():
                f.seek(slot * SLOT)
                assert f.read(SLOT) == data, f"round {round_}: acknowledged write to slot {slot} is missing"
    server = start_server(image, "--cache", cache)  # and through a restarted server
    h = nbd.NBD()
    h.connect_uri(server.uri())
    try:
        for slot, data in expected.items():
            assert h.pread(SLOT, slot * SLOT) == data
    finally:
        h.shutdown()
    os.close(device)
    image.unlink()
    print(f"{cache}: {ROUNDS} kills, {totals}")
    assert totals["durable"] > ROUNDS  # FUA and FLUSH were exercised in every mode
    assert totals["acked"] < ROUNDS * SIZE // SLOT, "every kill came after the writers had finished"
