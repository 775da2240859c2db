"""One suite for every engine in every cache mode, on a file in ext4 (where O_DIRECT has real alignment rules),
and in buffered mode on tmpfs too (where transfers are done on the event loop's thread)."""

from __future__ import annotations

import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import nbd
import pytest

from tests.conftest import IO_MODES, START_TIMEOUT, MiB

pytestmark = pytest.mark.bindings  # libnbd's Python bindings: run again by tests/in_current

SIZE = 64 * MiB


# Every engine in every cache mode on ext4; the buffered ones on tmpfs too.
SETUPS = {f"{mode}-ext4": ("ext4", args) for mode, args in IO_MODES.items()} | {
    f"{mode}-tmpfs": ("tmpfs", args) for mode, args in IO_MODES.items() if "buffered" in mode
}


@pytest.fixture(params=SETUPS)
def setup(request: pytest.FixtureRequest) -> tuple[str, list[str]]:
    """Where the export file lives, and the server arguments choosing engine and cache mode."""
    if SETUPS[request.param][0] == "tmpfs" and not os.path.isdir("/dev/shm"):
        pytest.skip("no tmpfs at /dev/shm")
    return SETUPS[request.param]


@pytest.fixture
def io_mode(setup: tuple[str, list[str]]) -> list[str]:
    return setup[1]


@pytest.fixture
def export_file(ext4_dir: Path, setup: tuple[str, list[str]], request: pytest.FixtureRequest) -> Iterator[Path]:
    folder = Path("/dev/shm") if setup[0] == "tmpfs" else ext4_dir
    path = folder / f"nbdserver-test-{os.getpid()}-{request.node.name.replace('/', '_')}.img"
    with open(path, "wb") as f:
        f.truncate(SIZE)
    yield path
    path.unlink(missing_ok=True)


@pytest.fixture
def engine_server(start_server, export_file: Path, io_mode: list[str]):
    return start_server(export_file, *io_mode)


def connect(server, strict: bool = True) -> nbd.NBD:
    h = nbd.NBD()
    if not strict:
        h.set_strict_mode(0)  # let requests through that the client would refuse itself
    h.connect_uri(server.uri())
    return h


def logged_total(server, label: str) -> int:
    """The number after ``label`` in the shutdown summaries, summed over the processes that log one."""
    return sum(int(line.split(label)[1].split()[0]) for line in server.log if label in line)


def pattern(seed: int, length: int) -> bytes:
    return random.Random(seed).randbytes(length)


# Offsets and lengths of every alignment: sector, byte, page-straddling, and the largest request.
RANGES = [
    (0, 4096),
    (512, 512),
    (1, 1),
    (4095, 2),
    (1000, 70000),
    (MiB - 3, 8192),
    (2 * MiB, MiB),
    (3 * MiB + 512, 3 * MiB - 1024),
    (8 * MiB, 32 * MiB),
    (SIZE - 7, 7),
]


def test_writes_of_every_alignment_read_back(engine_server, export_file):
    model = bytearray(SIZE)
    h = connect(engine_server, strict=False)
    try:
        for i, (offset, length) in enumerate(RANGES):
            data = pattern(i, length)
            h.pwrite(data, offset, nbd.CMD_FLAG_FUA if i % 3 == 0 else 0)
            model[offset : offset + length] = data
        for offset, length in [*RANGES, (4093, 9), (MiB - 4096, 3 * 4096 + 5), (0, 32 * MiB), (32 * MiB, 32 * MiB)]:
            assert h.pread(length, offset) == model[offset : offset + length], (offset, length)
        h.flush()
    finally:
        h.shutdown()
    assert engine_server.stop() == 0
    assert export_file.read_bytes() == model


def resident_bytes(path: Path) -> int:
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)], capture_output=True)
    assert out.returncode == 0, out.stderr
    return int(out.stdout.split()[0])


def test_direct_mode_bypasses_the_page_cache(engine_server, export_file, io_mode):
    h = connect(engine_server)
    try:
        for i in range(16):
            h.pwrite(pattern(i, MiB), i * MiB)
        h.flush()
        for i in range(16):
            assert h.pread(MiB, i * MiB) == pattern(i, MiB)
    finally:
        h.shutdown()
    resident = resident_bytes(export_file)
    if "direct" in io_mode:
        assert resident < MiB, f"{resident} bytes in the page cache"
    else:
        assert resident >= 15 * MiB, f"only {resident} bytes in the page cache"


def test_unaligned_writes_sharing_pages_from_many_connections(engine_server, export_file):
    """Each 512-byte sector of 64 pages gets its own writer; half of the writes are unaligned (page cache),
    half sector-aligned (O_DIRECT in direct mode), all in flight at once from four connections."""
    handles = [connect(engine_server, strict=False) for _ in range(4)]
    model = bytearray(64 * 4096)
    try:
        for round_ in range(4):
            for page in range(64):
                for sector in range(8):
                    h = handles[(sector + page + round_) % 4]
                    offset = page * 4096 + sector * 512
                    start, length = (offset, 512) if (sector + round_) % 2 else (offset + 1, 510)
                    data = pattern(round_ * 4096 + page * 8 + sector, length)
                    model[start : start + length] = data
                    h.aio_pwrite(data, start)
            for h in handles:
                while h.aio_in_flight():
                    h.poll(1)
                h.flush()
        assert handles[0].pread(len(model), 0) == model
    finally:
        for h in handles:
            h.shutdown()
    assert engine_server.stop() == 0
    with open(export_file, "rb") as f:
        assert f.read(len(model)) == model


def test_trim_zero_and_block_status(engine_server, export_file):
    h = nbd.NBD()
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_uri(engine_server.uri())
    try:
        h.pwrite(b"\xee" * (4 * MiB), 0)
        h.trim(MiB, MiB)  # libnbd takes (length, offset)
        h.zero(MiB, 2 * MiB, nbd.CMD_FLAG_NO_HOLE)
        assert h.pread(4 * MiB, 0) == b"\xee" * MiB + bytes(2 * MiB) + b"\xee" * MiB
        h.zero(3 * MiB, MiB, nbd.CMD_FLAG_FAST_ZERO)  # ext4 punches the range: fast
        h.flush()
        assert h.pread(MiB, 0) == b"\xee" * MiB
        assert h.pread(3 * MiB, MiB) == bytes(3 * MiB)

        extents: list[tuple[int, int]] = []

        def record(context: str, offset: int, entries: list[int], error: int) -> int:
            extents.extend(zip(entries[::2], entries[1::2], strict=True))
            return 0

        h.block_status(4 * MiB, 0, record)
        assert extents == [(MiB, 0), (3 * MiB, nbd.STATE_HOLE | nbd.STATE_ZERO)], extents
    finally:
        h.shutdown()


def test_reads_of_holes_come_as_hole_chunks(engine_server, export_file):
    h = connect(engine_server)
    try:
        h.pwrite(b"\x11" * MiB, 0)
        chunks: list[tuple[int, int, int]] = []

        def chunk(data: bytes, offset: int, status: int, error: int) -> int:
            chunks.append((status, offset, len(data)))
            return 0

        assert h.pread_structured(2 * MiB, 0, chunk) == b"\x11" * MiB + bytes(MiB)
        assert (nbd.READ_DATA, 0, MiB) in chunks
        assert (nbd.READ_HOLE, MiB, MiB) in chunks
        assert sum(length for status, _, length in chunks if status == nbd.READ_DATA) == MiB
    finally:
        h.shutdown()


def test_pipelined_reads_keep_their_data(engine_server, export_file):
    """Many 1 MiB reads in flight while the client reads its socket slowly: pooled buffers are reused
    only after their reply has left, so every reply carries the data of its own offset."""
    with open(export_file, "r+b") as f:
        for i in range(48):
            f.write(bytes([i + 1]) * MiB)
    h = connect(engine_server)
    try:
        for _ in range(3):
            buffers = [nbd.Buffer(MiB) for _ in range(48)]
            cookies = [h.aio_pread(buffer, i * MiB) for i, buffer in enumerate(buffers)]
            while h.aio_in_flight():
                h.poll(1)
            for cookie in cookies:
                assert h.aio_command_completed(cookie)
            for i, buffer in enumerate(buffers):
                assert buffer.to_bytearray() == bytes([i + 1]) * MiB, f"read of MiB {i}"
    finally:
        h.shutdown()


def test_acknowledged_writes_survive_a_kill(engine_server, export_file):
    h = connect(engine_server)
    expected = {}
    try:
        cookies = []
        for i in range(64):
            data = pattern(1000 + i, 256 * 1024)
            expected[i * 256 * 1024] = data
            cookies.append(h.aio_pwrite(data, i * 256 * 1024, flags=nbd.CMD_FLAG_FUA if i % 2 else 0))
        while h.aio_in_flight():
            h.poll(1)
        for cookie in cookies:
            assert h.aio_command_completed(cookie)
    finally:
        h.shutdown()
    engine_server.kill()
    fd = os.open(export_file, os.O_RDONLY)
    try:
        for offset, data in expected.items():
            assert os.pread(fd, len(data), offset) == data, offset
    finally:
        os.close(fd)


@pytest.mark.parametrize("flags", [0, nbd.CMD_FLAG_DF], ids=["sparse", "DF"])
def test_hole_reads_never_show_earlier_buffer_contents(engine_server, flags):
    """A 1 MiB read of a hole is answered without reading (SEEK_DATA), in a buffer that held other data."""
    h = connect(engine_server)
    try:
        for i in range(8):
            h.pwrite(b"\xab" * MiB, i * MiB)
            assert h.pread(MiB, i * MiB) == b"\xab" * MiB  # the pooled buffers now hold 0xab
        for i in range(8):  # libnbd takes the DF flag on structured reads only
            assert h.pread_structured(MiB, (16 + i) * MiB, lambda *chunk: 0, flags) == bytes(MiB)
    finally:
        h.shutdown()


def test_transfers_are_done_in_place_only_where_they_should_need_no_waiting(ext4_dir):
    from nbdserver.backing import Backing
    from nbdserver.backing.file import INLINE_FLUSH_MAX, INLINE_MAX

    data = pattern(7, MiB)
    on_ext4 = ext4_dir / "cached.img"
    on_ext4.write_bytes(data)  # now in the page cache
    backing = Backing(on_ext4)
    buffer = bytearray(MiB)
    try:
        assert not backing.in_memory
        assert backing.read_now(0, [buffer]) and buffer == data
        assert not backing.read_now(MiB - 4096, [bytearray(8192)])  # runs past the end: left to readv
    finally:
        backing.close()
    with open(on_ext4, "r+b") as f:
        f.truncate(4 * MiB)  # a hole after the data, in no page cache
    backing = Backing(on_ext4)
    try:
        hole = bytearray(b"\xff" * 8192)
        assert backing.read_now(2 * MiB, [hole]) and hole == bytes(8192)  # a hole: zeroes without a read
        os.fsync(backing.fd)
        os.posix_fadvise(backing.fd, 0, MiB, os.POSIX_FADV_DONTNEED)  # the data leaves the page cache
        assert not backing.read_now(0, [bytearray(4096)])  # cold data: the engine reads it
        assert backing.hole_checks.skip()  # SEEK_DATA found data: the next miss does not ask it
        assert not backing.write_now(0, [bytearray(4096)], dsync=True)  # FUA waits for the device
        assert on_ext4.read_bytes()[:MiB] == data
        assert backing.write_now(0, [b"\x11" * 4096])  # into the page cache, at once
        backing.slow_write = 0.0  # from now on every write counts as one the kernel made wait
        assert backing.write_now(4096, [b"\x22" * 4096])
        assert not backing.write_now(8192, [b"\x33" * 4096])  # after a slow one: workers for a while
        assert on_ext4.read_bytes()[:MiB] == b"\x11" * 4096 + b"\x22" * 4096 + data[8192:]
    finally:
        backing.close()
    backing = Backing(on_ext4)
    try:
        backing.slow_write = 60.0  # however busy the machine: only the length decides here
        assert backing.write_now(MiB, [b"\x44" * INLINE_MAX])  # a whole merged submission, at once
        assert not backing.write_now(MiB, [bytearray(INLINE_MAX + 4096)])  # longer: the engine writes it
        assert on_ext4.read_bytes()[MiB : 2 * MiB] == b"\x44" * INLINE_MAX
    finally:
        backing.close()
    direct = Backing(on_ext4, direct=True)
    try:
        assert not direct.read_now(0, [buffer])  # O_DIRECT would wait for the device
        assert not direct.write_now(0, [buffer[:4096]])
    finally:
        direct.close()
    if os.path.isdir("/dev/shm"):
        on_tmpfs = Path("/dev/shm") / f"nbdserver-test-{os.getpid()}.img"
        on_tmpfs.write_bytes(data)
        shm = Backing(on_tmpfs)
        try:
            assert shm.in_memory  # tmpfs: a copy to or from memory, never a wait
            whole = bytearray(INLINE_MAX)
            assert shm.read_now(0, [whole]) and whole == data[:INLINE_MAX]
            assert shm.write_now(4096, [b"\x5a" * 4096], dsync=True)
            assert shm.flush_now(INLINE_FLUSH_MAX + 1)  # nothing to write back, however much was written
            longer = bytearray(INLINE_MAX + 4096)
            assert not shm.read_now(0, [longer])  # longer than INLINE_MAX: the engine copies it
            assert not shm.write_now(0, [longer])
            shm.readv(0, [buffer])
            assert buffer == data[:4096] + b"\x5a" * 4096 + data[8192:]
        finally:
            shm.close()
            on_tmpfs.unlink()


def test_a_flush_is_done_in_place_only_after_little_was_written(ext4_dir):
    from nbdserver.backing import Backing
    from nbdserver.backing.file import INLINE_FLUSH_MAX

    path = ext4_dir / "flush.img"
    path.write_bytes(bytes(2 * MiB))
    backing = Backing(path)
    try:
        backing.slow_write = 60.0  # however busy the machine: only what was written decides here
        backing.writev(0, [b"\x01" * MiB])
        assert backing.flush_now(MiB)  # little to write back: done at once
        assert not backing.flush_now(INLINE_FLUSH_MAX + 1)  # more: the engine flushes it
        backing.slow_write = 0.0  # from now on every flush counts as one that had to wait
        assert backing.flush_now(0)
        assert not backing.flush_now(0)  # after a slow one: workers for a while
    finally:
        backing.close()
    assert path.read_bytes() == b"\x01" * MiB + bytes(MiB)


def test_the_back_off_after_slow_work_in_place_lasts_with_it(tmp_path):
    """The back-off after a write or flush that was slow in place (when such work goes to the
    engine) lasts at least a second, and BACKOFF_FACTOR times as long as the slow one took: slow
    work may take at most 1/51 of the loop's time."""
    from time import monotonic

    from nbdserver.backing import Backing
    from nbdserver.backing.file import BACKOFF_FACTOR, INLINE_BACKOFF

    def back_off(took: float) -> float:
        return max(INLINE_BACKOFF, BACKOFF_FACTOR * took)

    path = tmp_path / "backoff.img"
    path.write_bytes(bytes(MiB))
    backing = Backing(path)
    try:
        backing.slow_write = 60.0
        assert backing._in_place_again(monotonic(), "write") == 0.0  # quick: in place again at once
        backing.slow_write = 0.0  # whatever it took, it was slow
        for took in (0.005, 0.1, 2.0):
            started = monotonic() - took
            until = backing._in_place_again(started, "flush")
            now = monotonic()
            assert started + took + back_off(took) <= until <= now + back_off(now - started)
    finally:
        backing.close()


@pytest.mark.clients
def test_sigterm_under_full_load_exits_cleanly(engine_server, tmp_path):
    """Unthrottled 4k random writes at QD32, then SIGTERM: everything in flight completes and the server
    exits 0 in good time, whatever the engine has outstanding in the kernel."""
    fio = subprocess.Popen(
        [
            "fio",
            "--name=load",
            "--thread",
            "--ioengine=nbd",
            f"--uri={engine_server.uri()}",
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=32",
            "--size=48M",
            "--time_based",
            "--runtime=60",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=tmp_path,
        start_new_session=True,
    )
    try:
        time.sleep(2)
        assert fio.poll() is None, "fio stopped early"
        started = time.monotonic()
        code = engine_server.stop(timeout=20)
        took = time.monotonic() - started
    finally:
        os.killpg(fio.pid, signal.SIGKILL)
        fio.wait()
    assert code == 0, engine_server.log_text()[-2000:]
    assert took < 15, f"shutdown took {took:.1f} s"


@pytest.mark.clients
def test_streaming_reads_reuse_their_buffers(engine_server, export_file, tmp_path):
    """1 MiB reads at QD16 for a few seconds: each READ buffer goes back to the pool once its reply
    has left, so the pool allocates about one block per request in flight, not one per request."""
    with open(export_file, "r+b") as f:
        f.write(pattern(3, 32 * MiB))
    result = subprocess.run(
        [
            "fio",
            "--name=stream",
            "--thread",
            "--ioengine=nbd",
            f"--uri={engine_server.uri()}",
            "--rw=read",
            "--bs=1M",
            "--iodepth=16",
            "--size=32M",
            "--time_based",
            "--runtime=3",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert engine_server.stop() == 0
    allocated = logged_total(engine_server, "buffer pool:")
    reads = logged_total(engine_server, "READ ")
    print(f"{reads} reads of 1 MiB, {allocated} blocks allocated")
    assert reads > 200 and allocated <= 64


def test_read_buffers_come_back_while_a_slow_client_keeps_the_socket_full(engine_server, export_file):
    """A client that reads its replies slowly keeps the server's socket buffer from ever emptying:
    READ buffers must still return to the pool as their replies leave, not pile up."""
    from tests.integration.rawclient import Cmd, RawClient

    with open(export_file, "r+b") as f:
        f.write(pattern(5, 16 * MiB))
    client = RawClient(engine_server.host, engine_server.port).handshake().go()
    client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    try:
        window, total, sent = 16, 400, 0
        while sent < window:
            client.request(Cmd.READ, (sent % 16) * MiB, MiB)
            sent += 1
        for _ in range(total):
            reply = client.read_reply()
            assert reply.error == 0 and len(reply.data) == MiB
            time.sleep(0.002)
            if sent < total:
                client.request(Cmd.READ, (sent % 16) * MiB, MiB)
                sent += 1
    finally:
        client.close()
    assert engine_server.stop() == 0
    allocated = logged_total(engine_server, "buffer pool:")
    print(f"{total} reads of 1 MiB by a slow reader, {allocated} blocks allocated")
    assert allocated <= 64


@pytest.mark.parametrize("direct", [False, True], ids=["buffered", "direct"])
def test_zeroes_are_written_where_the_filesystem_cannot_deallocate(ext4_dir, direct):
    import errno

    from nbdserver.backing import Backing
    from nbdserver.backing.file import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE

    path = ext4_dir / f"zero-fallback-{direct}.img"
    path.write_bytes(b"\xff" * (4 * MiB))
    backing = Backing(path, direct=direct)
    try:
        # As on a filesystem without these fallocate modes: learned once, then never asked again.
        backing._unsupported_modes |= {
            FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
            FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE,
        }
        with pytest.raises(OSError) as refused:
            backing.write_zeroes(0, MiB, may_trim=True, fast_only=True)
        assert refused.value.errno == errno.ENOTSUP
        backing.write_zeroes(4096, 3 * MiB, may_trim=True, fast_only=False)
        backing.flush()
    finally:
        backing.close()
        data = path.read_bytes()
        path.unlink()
    assert data == b"\xff" * 4096 + bytes(3 * MiB) + b"\xff" * (MiB - 4096)


NO_IO_URING = [sys.executable, str(Path(__file__).with_name("no_io_uring.py"))]


def test_the_default_engine_is_io_uring_where_it_works_and_the_thread_pool_where_it_is_refused(start_server, image):
    """``auto`` (the default) takes io_uring where it passes its self-test; under a seccomp profile that
    refuses io_uring, as container runtimes' often do, it says so and serves through the thread pool."""
    with_uring = start_server(image)
    assert re.search(r"export '': .*engine uring", with_uring.log_text())
    data = pattern(3, 3 * MiB)
    h = connect(with_uring)
    try:
        h.pwrite(data, MiB, nbd.CMD_FLAG_FUA)  # longer than in-place transfers: through the ring
    finally:
        h.shutdown()
    with_uring.stop()

    refused = start_server(image, wrapper=NO_IO_URING)
    log = refused.log_text()
    assert "io_uring is not usable here (Operation not permitted); using the thread pool" in log
    assert re.search(r"export '': .*engine threads", log)
    h = connect(refused)
    try:
        assert h.pread(3 * MiB, MiB) == data
        h.pwrite(data[::-1], MiB, nbd.CMD_FLAG_FUA)
        assert h.pread(3 * MiB, MiB) == data[::-1]
    finally:
        h.shutdown()

    chosen = start_server(image, "--engine", "uring", wrapper=NO_IO_URING, wait=False)
    assert chosen.proc.wait(START_TIMEOUT) != 0  # asked for by name, it is not replaced
    chosen.stop()  # the log is whole once its reader has joined
    assert "Operation not permitted" in chosen.log_text()
