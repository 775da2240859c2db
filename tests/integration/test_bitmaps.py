"""Dirty bitmaps against real servers and real clients: libnbd's bindings and nbdinfo read the
qemu:dirty-bitmap contexts after writes, zeroes and trims, through worker processes, worker and
server crashes, restarts, upgrades and a machine crash (a header's boot id edited)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import nbd
import pytest

from tests.conftest import MiB, ServerProcess, Upgradable, make_image, running, wait_for

pytestmark = pytest.mark.bindings  # libnbd's Python bindings: run again by tests/in_current

K = 1024
SIZE = 64 * MiB
G = 64 * K  # the default granularity
PROCESSES = ["1", "2"]
# libnbd 1.18 and later ask for extended headers unless told not to: there, both header forms.
HEADER_FORMS = ["extended", "compact"] if hasattr(nbd.NBD, "set_request_extended_headers") else ["compact"]
# (offset, length) of the writes, zeroes and trims the tests make, and the granules they touch.
WRITES = [(70000, 4096), (10 * MiB - 1, 2)]
ZEROES = [(20 * MiB, MiB + 1)]
TRIMS = [(40 * MiB + 4096, 4096)]


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path: a Unix socket's path has at most 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="bm-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def ctl(control: Path, *args: str | os.PathLike[str]) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "nbdserver", "ctl", "--control", str(control), *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


def ok(control: Path, *args: str | os.PathLike[str]) -> str:
    result = ctl(control, *args)
    assert result.returncode == 0, result.stderr
    return result.stdout


def listed(control: Path, *export: str) -> dict[str, dict]:
    reply = json.loads(ok(control, "--json", "bitmap", "list", *export))
    return {b["name"]: b for b in reply["bitmaps"]}


def serve_args(short_dir: Path, processes: str, *bitmaps: str) -> list[str]:
    image = short_dir / "disk.img"
    if not image.exists():
        make_image(image, SIZE)
    spec = ",".join([f"name=disk,path={image}", *(f"dirty-bitmap={b}" for b in bitmaps)])
    return [
        "--export",
        spec,
        "--state-dir",
        str(short_dir / "state"),
        "--control",
        str(short_dir / "control"),
        "--processes",
        processes,
    ]


def client(server: ServerProcess, *contexts: str, header_form: str = "compact") -> nbd.NBD:
    h = nbd.NBD()
    if header_form == "compact" and hasattr(h, "set_request_extended_headers"):
        h.set_request_extended_headers(False)
    for context in contexts:
        h.add_meta_context(context)
    h.connect_uri(server.uri("disk"))
    if header_form == "extended":
        assert h.get_extended_headers_negotiated()
    return h


def write_all(h: nbd.NBD) -> None:
    """Every kind of write the bitmaps mark, each acknowledged."""
    for offset, length in WRITES:
        h.pwrite(b"w" * length, offset)
    h.pwrite(b"f" * 512, 30 * MiB, nbd.CMD_FLAG_FUA)
    for offset, length in ZEROES:
        h.zero(length, offset)
    for offset, length in TRIMS:
        h.trim(length, offset)
    h.flush()


ALL = [*WRITES, (30 * MiB, 512), *ZEROES, *TRIMS]


def expected(ranges: list[tuple[int, int]], granularity: int = G, size: int = SIZE) -> list[tuple[int, int, int]]:
    """(offset, length, flags) runs: dirty (1) over every granule a range touches, clean (0) elsewhere."""
    granules = set()
    for offset, length in ranges:
        granules.update(range(offset // granularity, (offset + length - 1) // granularity + 1))
    flags = [int(g in granules) for g in range(size // granularity)]
    return merge([(g * granularity, granularity, f) for g, f in enumerate(flags)])


def merge(extents: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    out: list[tuple[int, int, int]] = []
    for offset, length, flags in extents:
        if out and out[-1][2] == flags and out[-1][0] + out[-1][1] == offset:
            out[-1] = (out[-1][0], out[-1][1] + length, flags)
        else:
            out.append((offset, length, flags))
    return out


def dirty_map(h: nbd.NBD, name: str, size: int = SIZE) -> list[tuple[int, int, int]]:
    """The bitmap ``name`` over the whole export, as libnbd's block_status reports it; every reply
    also checked to hold one chunk per negotiated context."""
    context = f"qemu:dirty-bitmap:{name}"
    found: list[tuple[int, int, int]] = []
    offset = 0
    while offset < size:
        seen: dict[str, list[int]] = {}

        def got(meta: str, at: int, entries: list[int], err: int, seen: dict = seen, offset: int = offset) -> int:
            assert meta not in seen and at == offset
            seen[meta] = list(entries)
            return 0

        h.block_status(min(size - offset, 1 << 31), offset, got)
        assert context in seen
        assert all(h.can_meta_context(m) for m in seen)
        entries = seen[context]
        for length, flags in zip(entries[::2], entries[1::2], strict=True):
            found.append((offset, length, flags))
            offset += length
    return merge(found)


def nbdinfo_map(server: ServerProcess, name: str) -> list[tuple[int, int, int]]:
    if not shutil.which("nbdinfo"):
        pytest.skip("nbdinfo is not installed")
    out = subprocess.run(
        ["nbdinfo", "--json", f"--map=qemu:dirty-bitmap:{name}", server.uri("disk")],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    return merge([(e["offset"], e["length"], e["type"]) for e in json.loads(out)])


def bitmap_file(short_dir: Path, name: str) -> Path:
    [path] = (short_dir / "state" / "bitmaps").glob(f"*/{name}.bitmap")
    return path


def kill_everything(server: ServerProcess) -> None:
    """SIGKILL the primary and its workers at once, as a crash of the whole service."""
    pids = server.serving_pids()
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    server.stop()
    assert wait_for(lambda: not any(running(pid) for pid in pids))


# Marks --------------------------------------------------------------------------------------


@pytest.mark.clients  # nbdinfo too
@pytest.mark.parametrize("header_form", HEADER_FORMS)
@pytest.mark.parametrize("processes", PROCESSES)
def test_exactly_the_granules_written_zeroed_and_trimmed_are_dirty(start_server, short_dir, processes, header_form):
    server = start_server(*serve_args(short_dir, processes, "b"))
    control = short_dir / "control"
    ok(control, "bitmap", "add", "disk", "fine", "--granularity", "4K")
    contexts = ["base:allocation", "qemu:dirty-bitmap:b", "qemu:dirty-bitmap:fine"]
    h = client(server, *contexts, header_form=header_form)
    try:
        assert dirty_map(h, "b") == [(0, SIZE, 0)]
        write_all(h)
        assert dirty_map(h, "b") == expected(ALL)
        assert dirty_map(h, "fine") == expected(ALL, 4 * K)
        assert nbdinfo_map(server, "b") == expected(ALL)
        bitmaps = listed(control, "disk")
        assert bitmaps["b"]["trusted"] and bitmaps["b"]["dirty"] == sum(x[1] for x in expected(ALL) if x[2])
        assert bitmaps["fine"]["granularity"] == 4 * K
        ok(control, "bitmap", "clear", "disk", "b")
        assert dirty_map(h, "b") == [(0, SIZE, 0)]
        assert dirty_map(h, "fine") == expected(ALL, 4 * K)  # the other one is not cleared
        h.pwrite(b"x", SIZE - 1)
        assert dirty_map(h, "b") == [(0, SIZE - G, 0), (SIZE - G, G, 1)]
    finally:
        h.shutdown()


def test_reads_and_refused_writes_mark_nothing(start_server, short_dir):
    server = start_server(*serve_args(short_dir, "1", "b"))
    h = client(server, "qemu:dirty-bitmap:b")
    try:
        h.pread(MiB, 0)
        h.cache(MiB, 0) if h.can_cache() else None
        with pytest.raises(nbd.Error):
            h.pwrite(b"x" * 4096, SIZE - 1024)  # past the end: refused before any I/O
        assert dirty_map(h, "b") == [(0, SIZE, 0)]
    finally:
        h.shutdown()


@pytest.mark.parametrize("processes", PROCESSES)
def test_a_bitmap_added_at_run_time_sees_only_later_writes(start_server, short_dir, processes):
    server = start_server(*serve_args(short_dir, processes))
    control = short_dir / "control"
    h = client(server)
    h.pwrite(b"before" * 100, 0)
    ok(control, "bitmap", "add", "disk", "late")
    h.pwrite(b"after", 5 * MiB)
    h.shutdown()
    h = client(server, "qemu:dirty-bitmap:late")
    try:
        assert dirty_map(h, "late") == expected([(5 * MiB, 5)])
    finally:
        h.shutdown()
    ok(control, "bitmap", "remove", "disk", "late")
    assert listed(control) == {}
    assert not list((short_dir / "state" / "bitmaps").glob("*/*.bitmap"))
    h = client(server, "qemu:dirty-bitmap:late")
    try:
        assert not h.can_meta_context("qemu:dirty-bitmap:late")  # no longer offered
    finally:
        h.shutdown()


def test_clients_on_two_workers_mark_the_same_bitmap(start_server, short_dir):
    server = start_server(*serve_args(short_dir, "2", "b"))
    # Both open at once: the primary passes each to the worker with fewer connections.
    one, two = client(server, "qemu:dirty-bitmap:b"), client(server, "qemu:dirty-bitmap:b")
    try:
        one.pwrite(b"1" * 4096, 0)
        two.pwrite(b"2" * 4096, 8 * MiB)
        two.zero(MiB, 16 * MiB)
        want = expected([(0, 4096), (8 * MiB, 4096), (16 * MiB, MiB)])
        assert dirty_map(one, "b") == want and dirty_map(two, "b") == want
    finally:
        one.shutdown()
        two.shutdown()


# What survives ------------------------------------------------------------------------------


def test_marks_survive_the_sigkill_of_a_worker(start_server, short_dir):
    server = start_server(*serve_args(short_dir, "2", "b"))
    one, two = client(server, "qemu:dirty-bitmap:b"), client(server, "qemu:dirty-bitmap:b")
    write_all(one)
    two.pwrite(b"2" * 4096, 50 * MiB)
    pids = server.worker_pids()
    os.kill(pids[0], signal.SIGKILL)
    assert server.logged("worker 0 started again", timeout=30), server.log_text()
    try:
        want = expected([*ALL, (50 * MiB, 4096)])
        assert dirty_map(one, "b") == want and dirty_map(two, "b") == want  # both connections go on
        one.pwrite(b"3", 60 * MiB)  # and the replacement marks
        assert dirty_map(two, "b") == expected([*ALL, (50 * MiB, 4096), (60 * MiB, 1)])
    finally:
        one.shutdown()
        two.shutdown()


@pytest.mark.parametrize("processes", PROCESSES)
def test_marks_survive_the_sigkill_of_the_whole_server(start_server, short_dir, processes):
    args = serve_args(short_dir, processes, "b")
    server = start_server(*args)
    h = client(server, "qemu:dirty-bitmap:b")
    write_all(h)  # every write acknowledged, then a FLUSH
    assert bitmap_file(short_dir, "b").read_bytes()[66] == 0  # the FLUSH synced the marks first
    kill_everything(server)
    server = start_server(*args)
    h = client(server, "qemu:dirty-bitmap:b")
    try:
        assert dirty_map(h, "b") == expected(ALL)
        assert listed(short_dir / "control")["b"]["trusted"]  # the machine stayed up: nothing lost
    finally:
        h.shutdown()


def test_marks_survive_the_sigkill_of_the_primary(start_server, short_dir):
    """Its workers finish and exit (no service manager keeps their connections): the last one to
    close a bitmap marks it clean, and the next start finds every acknowledged write marked."""
    args = serve_args(short_dir, "2", "b")
    server = start_server(*args)
    workers = server.worker_pids()
    h = client(server, "qemu:dirty-bitmap:b")
    write_all(h)
    server.kill()
    assert wait_for(lambda: not any(running(pid) for pid in workers), timeout=60)
    assert bitmap_file(short_dir, "b").read_bytes()[64] == 1
    server = start_server(*args)
    h = client(server, "qemu:dirty-bitmap:b")
    try:
        assert dirty_map(h, "b") == expected(ALL) and listed(short_dir / "control")["b"]["trusted"]
    finally:
        h.shutdown()


@pytest.mark.parametrize("processes", PROCESSES)
def test_bitmaps_survive_a_stop_and_one_added_at_run_time_a_restart(start_server, short_dir, processes):
    args = serve_args(short_dir, processes)
    server = start_server(*args)
    ok(short_dir / "control", "bitmap", "add", "disk", "kept", "--granularity", "1M")
    h = client(server)
    h.pwrite(b"k" * 4096, 3 * MiB + 5)
    h.shutdown()
    server.stop()
    assert bitmap_file(short_dir, "kept").read_bytes()[64] == 1  # marked clean by the last process
    server = start_server(*args)
    h = client(server, "qemu:dirty-bitmap:kept")
    try:
        assert dirty_map(h, "kept") == expected([(3 * MiB + 5, 4096)], MiB)
    finally:
        h.shutdown()


@pytest.mark.parametrize("processes", PROCESSES)
def test_marks_survive_an_upgrade(short_dir, processes):
    args = [*serve_args(short_dir, processes, "b"), "--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0"]
    u = Upgradable(ServerProcess(args).wait_ready())
    try:
        h = client(u.server, "qemu:dirty-bitmap:b")
        h.pwrite(b"u" * 4096, 0)
        u.upgrade()
        h.pwrite(b"v" * 4096, 32 * MiB)  # marked by the successor
        assert dirty_map(h, "b") == expected([(0, 4096), (32 * MiB, 4096)])
        assert set(listed(short_dir / "control")) == {"b"}
        h.shutdown()
    finally:
        u.stop()


@pytest.mark.clients  # nbdinfo too
def test_a_bitmap_left_open_when_the_machine_stopped_reports_everything_dirty(start_server, short_dir):
    """A machine crash is simulated: the server is killed, and the bitmap's header then names
    another boot, as after a reboot."""
    args = serve_args(short_dir, "2", "b")
    server = start_server(*args)
    h = client(server)
    h.pwrite(b"x" * 4096, 0)
    kill_everything(server)
    path = bitmap_file(short_dir, "b")
    with open(path, "r+b") as f:
        f.seek(32)  # the boot id
        f.write(uuid.uuid4().bytes)
    server = start_server(*args)
    assert server.logged("marks may be lost"), server.log_text()
    control = short_dir / "control"
    assert listed(control)["b"]["trusted"] is False
    assert "NO: reports all dirty until cleared" in ok(control, "bitmap", "list")
    assert "NO: reports all dirty" in ok(control, "status")
    h = client(server, "qemu:dirty-bitmap:b")
    try:
        assert dirty_map(h, "b") == [(0, SIZE, 1)]
        assert nbdinfo_map(server, "b") == [(0, SIZE, 1)]
        ok(control, "bitmap", "clear", "disk", "b")
        assert listed(control)["b"]["trusted"] is True
        h.pwrite(b"y", MiB)
        assert dirty_map(h, "b") == expected([(MiB, 1)])
    finally:
        h.shutdown()


# Errors -------------------------------------------------------------------------------------


def test_errors_name_what_is_wrong(start_server, short_dir):
    ro = make_image(short_dir / "ro.img", MiB)
    server = start_server(*serve_args(short_dir, "1", "b"), "--export", f"name=ro,path={ro},read-only")
    assert server
    control = short_dir / "control"
    for args, message in [
        (("add", "nope", "x"), "no export 'nope'"),
        (("add", "disk", "b"), "a bitmap 'b' exists already"),
        (("add", "disk", "x", "--granularity", "3K"), "a power of two from 4 KiB to 64 MiB"),
        (("add", "disk", "x", "--granularity", "128M"), "a power of two from 4 KiB to 64 MiB"),
        (("add", "disk", "bad/name"), "bad bitmap name"),
        (("add", "ro", "x"), "export 'ro' is read-only"),
        (("remove", "disk", "nope"), "no bitmap 'nope'"),
        (("clear", "disk", "nope"), "no bitmap 'nope'"),
        (("clear", "nope", "b"), "no export 'nope'"),
        (("list", "nope"), "no export 'nope'"),
    ]:
        result = ctl(control, "bitmap", *args)
        assert result.returncode == 1 and message in result.stderr, (args, result.stderr)
    assert set(listed(control)) == {"b"}
    assert [p.name for p in bitmap_file(short_dir, "b").parent.iterdir()] == ["b.bitmap"]  # nothing half-made


def test_without_a_state_directory_bitmaps_are_refused(start_server, short_dir, image):
    server = start_server(image, "--name", "disk", "--control", short_dir / "control")
    assert server
    result = ctl(short_dir / "control", "bitmap", "add", "disk", "b")
    assert result.returncode == 1 and "start the server with --state-dir" in result.stderr
    refused = subprocess.run(
        [sys.executable, "-m", "nbdserver", "serve", "--export", f"name=x,path={image},dirty-bitmap=b", "--no-metrics"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 2 and "kept in the state directory" in refused.stderr


# Other clients ------------------------------------------------------------------------------


@pytest.mark.clients
def test_qemu_img_map_reads_the_bitmap(start_server, short_dir):
    """qemu's x-dirty-bitmap reads the context in place of allocation: dirty reads as no data."""
    if not shutil.which("qemu-img"):
        pytest.skip("qemu-img is not installed")
    server = start_server(*serve_args(short_dir, "1", "b"))
    h = client(server)
    write_all(h)
    h.shutdown()
    options = f"driver=nbd,server.type=inet,server.host={server.host},server.port={server.port},export=disk"
    result = subprocess.run(
        ["qemu-img", "map", "--output=json", "--image-opts", f"{options},x-dirty-bitmap=qemu:dirty-bitmap:b"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    regions = merge([(r["start"], r["length"], int(not r["data"])) for r in json.loads(result.stdout)])
    assert regions == expected(ALL)
