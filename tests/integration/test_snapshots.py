"""Snapshots and checkpoints on real filesystems that share blocks (XFS and btrfs on loop devices),
refused on one that cannot (ext4), and the backup round trip they exist for: a full copy from a
first checkpoint of a live export under fio, an incremental copy of only the dirty extents of a
second one, read through libnbd, qemu's NBD client and nbdinfo."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import nbd
import pytest

from tests.conftest import ROOT, MiB, ServerProcess, Upgradable, make_image, running, wait_for
from tests.integration.test_bitmaps import PROCESSES, ctl, dirty_map, merge, ok

pytestmark = pytest.mark.bindings  # libnbd's Python bindings: run again by tests/in_current

SIZE = 64 * MiB
G = 64 * 1024
MKFS = {
    "xfs": ["mkfs.xfs", "-q", "-m", "reflink=1"],
    "btrfs": ["mkfs.btrfs", "-q"],
    "ext4": ["mkfs.ext4", "-q", "-F"],
}
REFLINKS = ["xfs", "btrfs"]


@contextlib.contextmanager
def mounted(kind: str) -> Iterator[Path]:
    """A fresh filesystem of ``kind`` on a loop device, in a directory with a short path (the
    control socket's path has at most 107 bytes); unmounted and deleted whatever happens."""
    if os.geteuid() != 0 or shutil.which("losetup") is None:
        pytest.skip("loop devices need root")
    if shutil.which(MKFS[kind][0]) is None:
        pytest.skip(f"{MKFS[kind][0]} is not installed")
    root = Path(tempfile.mkdtemp(prefix="snap-", dir="/tmp"))
    mount = root / "fs"
    mount.mkdir()
    try:
        make_image(root / "fs.img", 512 * MiB)
        subprocess.run([*MKFS[kind], str(root / "fs.img")], check=True, capture_output=True, timeout=120)
        subprocess.run(["mount", "-o", "loop", str(root / "fs.img"), str(mount)], check=True, timeout=60)
        try:
            yield root
        finally:
            if subprocess.run(["umount", str(mount)], timeout=60).returncode != 0:
                subprocess.run(["umount", "-l", str(mount)], timeout=60)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(params=REFLINKS)
def reflinks(request) -> Iterator[Path]:
    with mounted(request.param) as root:
        yield root


def serve_args(root: Path, processes: str = "1") -> list[str]:
    image = root / "fs" / "disk.img"
    if not image.exists():
        make_image(image, SIZE)
    return [
        "--export",
        f"name=disk,path={image}",
        "--state-dir",
        str(root / "state"),
        "--control",
        str(root / "control"),
        "--processes",
        processes,
    ]


def connect(server: ServerProcess, export: str, *contexts: str) -> nbd.NBD:
    h = nbd.NBD()
    for context in contexts:
        h.add_meta_context(context)
    h.connect_uri(server.uri(export))
    return h


def reply(root: Path, *args: str) -> dict:
    return json.loads(ok(root / "control", "--json", *args))


def ctl_command(root: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "nbdserver", "ctl", "--control", str(root / "control"), *args]


def refused(root: Path, *args: str) -> str:
    result = ctl(root / "control", *args)
    assert result.returncode == 1, result.stdout
    return result.stderr


def read_extents(h: nbd.NBD, extents: list[tuple[int, int, int]]) -> dict[int, bytes]:
    """The data of the dirty extents only, in pieces a client would read."""
    data = {}
    for offset, length, flags in extents:
        if flags:
            for at in range(offset, offset + length, 4 * MiB):
                data[at] = h.pread(min(4 * MiB, offset + length - at), at)
    return data


def whole(h: nbd.NBD, size: int = SIZE) -> bytes:
    return b"".join(h.pread(4 * MiB, at) for at in range(0, size, 4 * MiB))


# Snapshots --------------------------------------------------------------------------------


@pytest.mark.parametrize("processes", PROCESSES)
def test_a_snapshot_is_the_export_at_one_moment(reflinks, start_server, processes):
    root = reflinks
    server = start_server(*serve_args(root, processes))
    h = connect(server, "disk")
    try:
        h.pwrite(b"a" * MiB, 0)
        made = reply(root, "snapshot", "add", "disk", "s1")
        assert made["snapshot"]["served_as"] == "disk@s1" and made["paused_ms"] > 0
        assert made["snapshot"]["path"] == str(root / "fs" / "disk.img@s1") and not made["snapshot"]["checkpoint"]
        h.pwrite(b"b" * MiB, 0)
        s = connect(server, "disk@s1")
        try:
            assert s.is_read_only() and s.get_size() == SIZE
            assert s.pread(MiB, 0) == b"a" * MiB
            with pytest.raises(nbd.Error):
                s.pwrite(b"x", 0)
            assert "1 client(s) connected" in refused(root, "snapshot", "remove", "disk", "s1")
        finally:
            s.shutdown()
        assert h.pread(MiB, 0) == b"b" * MiB
        [listed] = reply(root, "snapshot", "list")["snapshots"]
        assert (listed["export"], listed["name"], listed["size"]) == ("disk", "s1", SIZE)
        assert "disk@s1" in ok(root / "control", "snapshot", "list", "disk")
        assert "removed" in ok(root / "control", "snapshot", "remove", "disk", "s1")
        assert not (root / "fs" / "disk.img@s1").exists()
        assert reply(root, "snapshot", "list")["snapshots"] == []
        assert h.pread(MiB, 0) == b"b" * MiB
    finally:
        h.shutdown()
    assert "snapshot 's1' made" in server.log_text()


def test_snapshots_are_refused_clearly_where_blocks_cannot_be_shared(start_server):
    """ext4 has no reflinks: no copy of the data is made behind the operator's back, nothing is
    left behind, and the export's writes go on."""
    with mounted("ext4") as root:
        server = start_server(*serve_args(root))
        ok(root / "control", "bitmap", "add", "disk", "b")
        h = connect(server, "disk")
        try:
            h.pwrite(b"a" * 4096, 0)
            for command in (["snapshot", "add"], ["checkpoint"]):
                error = refused(root, *command, "disk", "s1")
                assert "cannot share blocks between files" in error and "XFS (reflink=1) or btrfs" in error, error
            assert sorted(p.name for p in (root / "fs").iterdir()) == ["disk.img", "lost+found"]
            assert [b["name"] for b in reply(root, "bitmap", "list")["bitmaps"]] == ["b"]
            assert not (root / "state" / "bitmaps" / ("e" + b"disk@s1".hex())).exists()
            h.pwrite(b"b" * 4096, 0)
            assert h.pread(4096, 0) == b"b" * 4096
        finally:
            h.shutdown()
            server.stop()  # before its filesystem is unmounted


def test_bad_snapshot_commands_are_refused(reflinks, start_server):
    root = reflinks
    start_server(*serve_args(root))
    ok(root / "control", "bitmap", "add", "disk", "mine")
    assert "no export 'nope'" in refused(root, "snapshot", "add", "nope", "s")
    assert "bad bitmap name" in refused(root, "snapshot", "add", "disk", "a/b")
    assert "bad bitmap name" in refused(root, "checkpoint", "disk", "x@y")
    assert "has a bitmap 'mine' already" in refused(root, "checkpoint", "disk", "mine")
    ok(root / "control", "checkpoint", "disk", "c1")
    assert "has a snapshot 'c1' already" in refused(root, "checkpoint", "disk", "c1")
    assert "is a snapshot already" in refused(root, "snapshot", "add", "disk@c1", "again")
    assert "snapshot remove disk c1" in refused(root, "export", "remove", "disk@c1")
    assert "is a snapshot" in refused(root, "bitmap", "clear", "disk@c1", "c1")
    assert "is a snapshot" in refused(root, "bitmap", "remove", "disk@c1", "c1")
    assert "has no snapshot 'c9'" in refused(root, "snapshot", "remove", "disk", "c9")
    (root / "fs" / "disk.img@taken").write_bytes(b"someone else's")
    assert "exists already" in refused(root, "snapshot", "add", "disk", "taken")
    assert (root / "fs" / "disk.img@taken").read_bytes() == b"someone else's"


def test_snapshots_need_a_state_directory(reflinks, start_server):
    image = make_image(reflinks / "fs" / "disk.img", SIZE)
    start_server("--export", f"name=disk,path={image}", "--control", str(reflinks / "control"))
    assert "--state-dir" in refused(reflinks, "snapshot", "add", "disk", "s1")


class VersionedWriter:
    """Writes 4k blocks, each holding its block number and a version that grows with every write,
    QD writes in flight and never two to one block; records when each was sent and answered."""

    QD = 16

    def __init__(self, server: ServerProcess, blocks: int) -> None:
        self.h = connect(server, "disk")
        self.blocks = blocks
        self.sent: dict[int, tuple[int, float]] = {}  # version -> block, when sent
        self.acked: dict[int, float] = {}  # version -> when answered
        self.errors: list[tuple[int, int]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def block(number: int, version: int) -> bytes:
        return struct.pack("<QQ", number, version) * 256

    def _run(self) -> None:
        rng = random.Random(7)
        busy: set[int] = set()
        version = 0
        while not self.stop.is_set() or busy:
            while not self.stop.is_set() and len(busy) < self.QD:
                number = rng.randrange(self.blocks)
                if number in busy:
                    continue
                version += 1
                busy.add(number)
                self.sent[version] = (number, time.monotonic())

                def done(error: int, version: int = version, number: int = number) -> int:
                    if error:  # no exception in libnbd's callback: said in the test's thread
                        self.errors.append((version, error))
                    self.acked[version] = time.monotonic()
                    busy.discard(number)
                    return 1

                self.h.aio_pwrite(self.block(number, version), number * 4096, completion=done)
            self.h.poll(-1)

    def __enter__(self) -> VersionedWriter:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(60)
        assert not self.thread.is_alive()
        self.h.shutdown()
        assert not self.errors


def fragment(h: nbd.NBD, blocks: int, writes: int) -> None:
    """Scatter 4k writes over a file whose blocks a snapshot shares: each gets an extent of its own."""
    rng = random.Random(3)
    for _ in range(writes):
        number = rng.randrange(blocks)
        h.pwrite(VersionedWriter.block(number, 0), number * 4096)


@pytest.mark.parametrize("command", ["snapshot", "checkpoint"])
@pytest.mark.parametrize("processes", PROCESSES)
def test_a_snapshot_taken_under_writes_holds_one_moment(reflinks, start_server, processes, command):
    """A writer keeps 16 writes in flight while a snapshot is made of a fragmented file, which is
    cloned while the writes go on: every block of the snapshot holds the last version answered
    before the command was sent, or a later one, never one sent after its answer; and no write in
    it was answered after one left out of it was sent (one moment, across blocks)."""
    root = reflinks
    server = start_server(*serve_args(root, processes))
    blocks = SIZE // 4096
    h = connect(server, "disk")
    try:
        for start in range(0, SIZE, 4 * MiB):
            h.pwrite(
                b"".join(VersionedWriter.block(n, 0) for n in range(start // 4096, (start + 4 * MiB) // 4096)), start
            )
        ok(root / "control", "snapshot", "add", "disk", "base")  # shared from now on: writes fragment it
        fragment(h, blocks, 3000)
    finally:
        h.shutdown()
    args = ["checkpoint", "disk", "s"] if command == "checkpoint" else ["snapshot", "add", "disk", "s"]
    with VersionedWriter(server, blocks) as writer:
        time.sleep(0.3)
        asked = time.monotonic()
        made = reply(root, *args)
        answered = time.monotonic()
        time.sleep(0.3)
    assert made["cloned_ms"] >= 0 and made["paused_ms"] > 0
    s = connect(server, "disk@s")
    try:
        data = whole(s)
    finally:
        s.shutdown()
    versions = {}
    for number in range(blocks):
        got, version = struct.unpack_from("<QQ", data, number * 4096)
        assert got == number and data[number * 4096 : (number + 1) * 4096] == VersionedWriter.block(number, version)
        versions[number] = version
    inside, outside = [], []
    for version, (number, sent) in writer.sent.items():
        acked = writer.acked[version]
        (inside if version <= versions[number] else outside).append((sent, acked))
        if acked < asked:
            assert version <= versions[number], "a write answered before the snapshot was asked for is missing"
        if sent > answered:
            assert version > versions[number], "a write sent after the snapshot was made is in it"
    assert inside and outside
    assert min(acked for _, acked in outside) >= max(sent for sent, _ in inside), "not one moment"


def test_a_worker_killed_during_a_checkpoint_costs_at_most_a_retry(reflinks, start_server):
    """A worker dies while the file of a checkpoint is cloned (or just before or after): either the
    checkpoint is made, or it fails saying why, leaves no file, and can be tried again under the
    same name, its bitmap then all dirty (the tracking bitmap went with the failed one)."""
    root = reflinks
    server = start_server(*serve_args(root, "2"))
    h = connect(server, "disk")
    try:
        ok(root / "control", "checkpoint", "disk", "c0")
        fragment(h, SIZE // 4096, 6000)  # a clone of some tenths of a second
    finally:
        h.shutdown()
    command = ctl_command(root, "checkpoint", "disk", "c1")
    asked = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    server.logged("checkpoint 'c1' fixed at a request boundary", timeout=60)  # cloning now, most likely
    os.kill(server.worker_pids()[0], signal.SIGKILL)
    _, err = asked.communicate(timeout=120)
    assert server.logged("worker 0 started again", timeout=60)
    if asked.returncode:
        assert "worker process died" in err or "did not answer" in err or "is gone" in err, err
        assert sorted(p.name for p in (root / "fs").iterdir() if "c1" in p.name) == []
        assert "c1" not in {b["name"] for b in reply(root, "bitmap", "list", "disk")["bitmaps"]}
        again = reply(root, "checkpoint", "disk", "c1")
        assert again["snapshot"]["bitmap"]["dirty"] == SIZE  # no bitmap tracked since c0 any more
    with contextlib.closing(_Reader(server, "disk@c1", "c1")) as c1:
        assert c1.h.get_size() == SIZE and dirty_map(c1.h, "c1")[0][2] == 1


# Checkpoints: the backup round trip --------------------------------------------------------


def fio_writer(server: ServerProcess, seconds: int) -> subprocess.Popen[bytes]:
    """Random 4k writes at a bounded rate (so that a second's worth dirties part of the export)."""
    if shutil.which("fio") is None:
        pytest.skip("fio is not installed")
    command = ["fio", "--name=writer", "--ioengine=nbd", f"--uri={server.uri('disk')}", "--rw=randwrite"]
    command += ["--bs=4k", "--iodepth=8", "--rate_iops=300", "--time_based", f"--runtime={seconds}"]
    return subprocess.Popen([*command, "--output-format=terse"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


@pytest.mark.clients  # qemu-img and nbdinfo too
@pytest.mark.parametrize("processes", PROCESSES)
def test_full_then_incremental_backup_of_a_live_export(reflinks, start_server, processes):
    root = reflinks
    server = start_server(*serve_args(root, processes))
    h = connect(server, "disk")
    h.pwrite(bytes(random.Random(1).randbytes(SIZE // 2)), 0)
    writer = fio_writer(server, 5)  # a writer under both checkpoints, on a machine not too busy
    try:
        assert wait_for(lambda: reply(root, "status")["connections"].__len__() >= 2, 30)
        first = reply(root, "checkpoint", "disk", "c1")
        assert first["snapshot"]["checkpoint"] and first["paused_ms"] > 0, first
        # The first checkpoint has nothing before it: its bitmap says everything changed.
        with contextlib.closing(_Reader(server, "disk@c1", "c1")) as c1:
            assert dirty_map(c1.h, "c1") == [(0, SIZE, 1)]
            backup = bytearray(whole(c1.h))
        written = []
        rng = random.Random(2)
        for _ in range(40):  # writes of ours, known to land between the two checkpoints
            offset = rng.randrange(0, SIZE - 8192)
            h.pwrite(b"n" * 8192, offset)
            written.append((offset, 8192))
        second = reply(root, "checkpoint", "disk", "c2")
        assert second["snapshot"]["bitmap"]["frozen"] and second["snapshot"]["bitmap"]["dirty"] < SIZE
    finally:
        assert writer.wait(120) == 0, writer.stderr.read() if writer.stderr else ""
    with contextlib.closing(_Reader(server, "disk@c2", "c2")) as c2:
        extents = dirty_map(c2.h, "c2")
        dirty = sum(length for _, length, flags in extents if flags)
        assert 0 < dirty < SIZE
        for offset, length in written:  # every write between the checkpoints is in the bitmap
            assert all(flags for o, n, flags in extents if o < offset + length and offset < o + n)
        pieces = read_extents(c2.h, extents)
        assert sum(map(len, pieces.values())) == dirty  # the incremental read the changes only
        for at, data in pieces.items():
            backup[at : at + len(data)] = data
        assert bytes(backup) == whole(c2.h)  # the full copy plus the incremental: the snapshot
        assert qemu_dirty(server, "disk@c2", "c2") == extents
        assert nbdinfo_dirty(server, "disk@c2", "c2") == extents
    # The backup is taken: the checkpoints go, the bitmap tracking since c2 stays.
    ok(root / "control", "snapshot", "remove", "disk", "c1")
    ok(root / "control", "snapshot", "remove", "disk", "c2")
    tracking = {b["name"]: b for b in reply(root, "bitmap", "list", "disk")["bitmaps"]}
    assert list(tracking) == ["c2"] and tracking["c2"]["checkpoint"] and tracking["c2"]["trusted"]
    h.shutdown()


def test_the_backup_script_brings_a_copy_to_each_checkpoint(reflinks, start_server, tmp_path):
    """README's worked example: fs/backup/incremental.py after each checkpoint, into one file."""
    root = reflinks
    server = start_server(*serve_args(root, "2"))
    h = connect(server, "disk")
    target = tmp_path / "backup.img"
    script = [sys.executable, str(ROOT / "fs" / "backup" / "incremental.py")]
    try:
        h.pwrite(b"a" * MiB, 3 * MiB)
        for n, writes in enumerate([[(0, 4096)], [(5 * MiB, 3 * MiB), (SIZE - 1, 1)]], start=1):
            for offset, length in writes:
                h.pwrite(bytes([n]) * length, offset)
            ok(root / "control", "checkpoint", "disk", f"c{n}")
            out = subprocess.run(
                [*script, server.uri(f"disk@c{n}"), f"c{n}", str(target)], capture_output=True, text=True, timeout=120
            )
            assert out.returncode == 0, out.stderr
            copied = int(out.stdout.split()[0])
            with contextlib.closing(_Reader(server, f"disk@c{n}", f"c{n}")) as c:
                assert target.read_bytes() == whole(c.h)
                assert copied == sum(length for _, length, flags in dirty_map(c.h, f"c{n}") if flags)
            assert copied == SIZE if n == 1 else copied == 3 * MiB + G  # the second: the changes alone
            ok(root / "control", "snapshot", "remove", "disk", f"c{n}")
    finally:
        h.shutdown()
    wrong = subprocess.run([*script, server.uri("disk"), "nope", str(target)], capture_output=True, text=True)
    assert wrong.returncode == 1 and "no bitmap 'nope'" in wrong.stderr


class _Reader:
    """A libnbd client of a snapshot, with its bitmap negotiated."""

    def __init__(self, server: ServerProcess, export: str, bitmap: str) -> None:
        self.h = connect(server, export, "base:allocation", f"qemu:dirty-bitmap:{bitmap}")

    def close(self) -> None:
        self.h.shutdown()


def qemu_dirty(server: ServerProcess, export: str, bitmap: str) -> list[tuple[int, int, int]]:
    """The bitmap as qemu's NBD client reads it: x-dirty-bitmap reports dirty extents as holes
    (``data`` false) in ``qemu-img map``."""
    if shutil.which("qemu-img") is None:
        pytest.skip("qemu-img is not installed")
    opts = (
        f"driver=nbd,server.type=inet,server.host={server.host},server.port={server.port},"
        f"export={export},x-dirty-bitmap=qemu:dirty-bitmap:{bitmap}"
    )
    out = subprocess.run(
        ["qemu-img", "map", "--output=json", "--image-opts", opts], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return merge([(e["start"], e["length"], int(not e["data"])) for e in json.loads(out.stdout)])


def nbdinfo_dirty(server: ServerProcess, export: str, bitmap: str) -> list[tuple[int, int, int]]:
    if shutil.which("nbdinfo") is None:
        pytest.skip("nbdinfo is not installed")
    command = ["nbdinfo", "--json", f"--map=qemu:dirty-bitmap:{bitmap}", server.uri(export)]
    out = subprocess.run(command, capture_output=True, text=True, timeout=60, check=True).stdout
    return merge([(e["offset"], e["length"], e["type"]) for e in json.loads(out)])


# Kept through restarts, upgrades and crashes ------------------------------------------------


def test_checkpoints_survive_a_restart_an_upgrade_and_a_crash(reflinks, start_server):
    root = reflinks
    args = serve_args(root, "2")
    server = start_server(*args)
    h = connect(server, "disk")
    h.pwrite(b"1" * G, 0)
    ok(root / "control", "checkpoint", "disk", "c1")
    h.pwrite(b"2" * G, 4 * G)
    h.shutdown()
    server.stop()

    def check(server: ServerProcess, dirty: list[tuple[int, int]]) -> None:
        """c1 is served with its frozen bitmap, and bitmap c1 on disk tracks ``dirty`` (at least)."""
        with contextlib.closing(_Reader(server, "disk@c1", "c1")) as c1:
            assert c1.h.pread(G, 0) == b"1" * G and c1.h.pread(G, 4 * G) == bytes(G)
            assert dirty_map(c1.h, "c1") == [(0, SIZE, 1)]
        live = connect(server, "disk", "qemu:dirty-bitmap:c1")
        try:
            extents = dirty_map(live, "c1")
            for offset, length in dirty:
                assert all(flags for o, n, flags in extents if o < offset + length and offset < o + n), extents
        finally:
            live.shutdown()

    server = start_server(*args)
    check(server, [(4 * G, G)])
    upgradable = Upgradable(server)
    try:
        upgradable.upgrade()
        check(server, [(4 * G, G)])
        assert [s["name"] for s in reply(root, "snapshot", "list")["snapshots"]] == ["c1"]
        # Killed with writes in flight: every acknowledged one is in the bitmap after the restart.
        h = connect(server, "disk")
        acknowledged = []
        for i in range(64):
            h.pwrite(b"3" * 4096, (100 + i * 7) * G)
            acknowledged.append(((100 + i * 7) * G, 4096))
        h.aio_pwrite(b"4" * 4096, 50 * G)  # in flight, maybe
    finally:
        pids = [upgradable.pids[-1], *server.worker_pids()]
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        assert wait_for(lambda: not any(running(pid) for pid in pids))
        upgradable.stop()
    server = start_server(*args)
    check(server, [(4 * G, G), *acknowledged])
    ok(root / "control", "checkpoint", "disk", "c2")
    with contextlib.closing(_Reader(server, "disk@c2", "c2")) as c2:
        extents = dirty_map(c2.h, "c2")
        for offset, length in [(4 * G, G), *acknowledged]:
            assert all(flags for o, n, flags in extents if o < offset + length and offset < o + n)
        assert c2.h.pread(4096, 100 * G) == b"3" * 4096
