"""RBD exports against a real Ceph cluster: the same client traffic on an image and on a file
gives the same contents; FLUSH, FUA, TRIM, WRITE_ZEROES and BLOCK_STATUS answered with their
meaning on RBD; read-only exports; clear, bounded failures at start; nbdcopy both ways, qemu-img
convert and compare, fio with verify; the export in /metrics and top."""

from __future__ import annotations

import hashlib
import json
import random
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.conftest import free_port, make_image, scrape, value

nbd = pytest.importorskip("nbd", reason="libnbd's Python bindings (python3-libnbd)")

KiB = 1024
MiB = 1024 * KiB
SIZE = 16 * MiB
START_FAILS_WITHIN = 60.0  # seconds: a start that cannot work ends by then (the RBD timeout is far below)


def rbd_server(start_server, cluster, *args: str):
    return start_server("--rbd-conf", str(cluster.conf_path), "--rbd-timeout", "20", *args)


def connect(uri: str, strict: bool = True):
    h = nbd.NBD()
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    if not strict:
        h.set_strict_mode(0)  # send what the server said it refuses: the server must refuse it
    h.connect_uri(uri)
    return h


def wait_all(h, cookies: list[int]) -> None:
    """Wait for libnbd commands started with aio_*; one that failed raises."""
    while h.aio_in_flight():
        h.poll(-1)
    for cookie in cookies:
        assert h.aio_command_completed(cookie)


def exported(cluster, spec: str, tmp_path: Path) -> bytes:
    """The image's contents as the rbd tool reads them (not through the server)."""
    out = tmp_path / f"export-{uuid.uuid4().hex[:6]}"
    cluster.rbd("export", "--no-progress", spec, str(out), timeout=120)
    data = out.read_bytes()
    out.unlink()
    return data


def test_the_same_traffic_on_an_image_and_a_file_gives_the_same_contents(ceph_cluster, image, start_server, tmp_path):
    file = make_image(tmp_path / "twin.img", SIZE)
    server = rbd_server(start_server, ceph_cluster, "--export", f"name=rbd,path=rbd:{image}",
                        "--export", f"name=file,path={file}")  # fmt: skip
    assert server.logged("engine rbd"), server.log_text()
    handles = {name: connect(server.uri(name)) for name in ("rbd", "file")}
    model = bytearray(SIZE)
    rng = random.Random(29)
    for round_ in range(6):
        # A burst of writes in flight at once (merged, ordered where they overlap), then reads.
        burst = []
        for _ in range(24):
            length = rng.choice([512, 4 * KiB, 4 * KiB, 64 * KiB, 200 * KiB])
            offset = rng.randrange(0, SIZE - length) // 512 * 512
            kind = rng.choice(["write", "write", "write", "fua", "zero", "zero-no-hole"])
            data = rng.randbytes(length) if kind in ("write", "fua") else bytes(length)
            burst.append((kind, offset, data))
            model[offset : offset + length] = data
        for h in handles.values():
            cookies = []
            for kind, offset, data in burst:
                if kind == "write":
                    cookies.append(h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(data)), offset))
                elif kind == "fua":
                    flags = nbd.CMD_FLAG_FUA
                    cookies.append(h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(data)), offset, flags=flags))
                else:
                    flags = nbd.CMD_FLAG_NO_HOLE if kind == "zero-no-hole" else 0
                    cookies.append(h.aio_zero(len(data), offset, flags=flags))
            wait_all(h, cookies)
            if round_ % 2:
                h.flush()
        for _ in range(8):
            length = rng.choice([4 * KiB, 128 * KiB, MiB])
            offset = rng.randrange(0, SIZE - length)
            for name, h in handles.items():
                assert h.pread(length, offset) == model[offset : offset + length], (name, offset, length)
    for h in handles.values():
        h.flush()
        h.shutdown()
    assert hashlib.sha256(exported(ceph_cluster, image, tmp_path)).digest() == hashlib.sha256(model).digest()
    assert file.read_bytes() == model


def test_flush_and_fua_writes_are_answered_and_kept(ceph_cluster, image, start_server, tmp_path):
    server = rbd_server(start_server, ceph_cluster, f"rbd:{image}")
    h = connect(server.uri())
    assert h.can_flush() and h.can_fua()
    one = random.randbytes(64 * KiB)
    h.pwrite(one, 3 * MiB, nbd.CMD_FLAG_FUA)  # one segment: a write with librbd's FUA flag
    # Adjacent FUA writes in flight together merge into one of several segments: write, then flush.
    parts = [random.randbytes(4 * KiB) for _ in range(8)]
    cookies = [
        h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(part)), 5 * MiB + i * 4 * KiB, flags=nbd.CMD_FLAG_FUA)
        for i, part in enumerate(parts)
    ]
    wait_all(h, cookies)
    h.flush()
    h.shutdown()
    data = exported(ceph_cluster, image, tmp_path)
    assert data[3 * MiB : 3 * MiB + len(one)] == one
    assert data[5 * MiB : 5 * MiB + 32 * KiB] == b"".join(parts)


def test_trim_and_write_zeroes(ceph_cluster, image, start_server):
    server = rbd_server(start_server, ceph_cluster, f"rbd:{image}")
    h = connect(server.uri())
    assert h.can_trim() and h.can_zero()
    h.pwrite(b"\xaa" * (2 * MiB), 0)
    h.zero(100 * KiB, 4 * KiB)  # may punch: librbd zeroes what it cannot deallocate
    h.zero(12 * KiB, 1 * MiB + 512, nbd.CMD_FLAG_NO_HOLE)  # written as zeroes (thick-provisioned)
    h.zero(8 * KiB, 1536 * KiB, nbd.CMD_FLAG_FAST_ZERO)
    assert h.pread(4 * KiB, 0) == b"\xaa" * (4 * KiB)
    assert h.pread(100 * KiB, 4 * KiB) == bytes(100 * KiB)
    assert h.pread(KiB, 104 * KiB) == b"\xaa" * KiB
    assert h.pread(12 * KiB, MiB + 512) == bytes(12 * KiB)
    assert h.pread(8 * KiB, 1536 * KiB) == bytes(8 * KiB)
    # TRIM is answered; below the discard granularity it need not zero anything, so nothing is read
    # back of the small one.  A whole object's worth does read as zeroes.
    h.trim(4 * KiB, 700 * KiB)
    h.pwrite(b"\xbb" * (4 * MiB), 8 * MiB)
    h.trim(4 * MiB, 8 * MiB)
    h.flush()
    assert h.pread(4 * MiB, 8 * MiB) == bytes(4 * MiB)
    h.shutdown()


def test_block_status_of_a_sparse_image(ceph_cluster, image, start_server):
    server = rbd_server(start_server, ceph_cluster, f"rbd:{image}")
    h = connect(server.uri())
    assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    written = [(MiB, 64 * KiB), (9 * MiB + 4 * KiB, 8 * KiB)]
    for offset, length in written:
        h.pwrite(b"\x01" * length, offset)
    extents: list[tuple[int, int, int]] = []  # (offset, length, flags)

    def collect(meta: str, offset: int, entries: list[int], error: int) -> int:
        if meta == nbd.CONTEXT_BASE_ALLOCATION:
            position = offset
            for length, flags in zip(entries[::2], entries[1::2], strict=True):
                extents.append((position, length, flags))
                position += length
        return 0

    position = 0
    while position < SIZE:  # a reply may cover less than asked: ask again from where it ended
        before = len(extents)
        h.block_status(SIZE - position, position, collect)
        assert len(extents) > before
        position = extents[-1][0] + extents[-1][1]
    assert position == SIZE

    def flags_at(offset: int) -> int:
        return next(f for start, length, f in extents if start <= offset < start + length)

    hole = nbd.STATE_HOLE | nbd.STATE_ZERO
    for offset, length in written:  # what was written is data (librbd may say more: whole objects)
        assert flags_at(offset) == 0 and flags_at(offset + length - 1) == 0, extents
    for untouched in (4 * MiB, 6 * MiB, 13 * MiB, SIZE - 1):  # in objects never written: holes
        assert flags_at(untouched) == hole, (untouched, extents)
    h.shutdown()


def test_read_only_export_refuses_writes(ceph_cluster, image, start_server, tmp_path):
    ceph_cluster.rbd("bench", "--io-type", "write", "--io-size", "64K", "--io-total", "1M",
                     "--io-pattern", "seq", image, timeout=120)  # fmt: skip
    before = exported(ceph_cluster, image, tmp_path)
    server = rbd_server(start_server, ceph_cluster, "--read-only", f"rbd:{image}")
    h = connect(server.uri(), strict=False)
    assert h.is_read_only()
    assert h.pread(MiB, 0) == before[:MiB]
    for write in (lambda: h.pwrite(b"x" * 4096, 0), lambda: h.zero(4096, 0), lambda: h.trim(4096, 0)):
        with pytest.raises(nbd.Error) as refused:
            write()
        assert refused.value.errno == "EPERM"
    h.shutdown()
    assert exported(ceph_cluster, image, tmp_path) == before


def serve_fails(*args: str) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "nbdserver", "serve", "--listen", "127.0.0.1:0", "--no-metrics", *args],
        capture_output=True,
        text=True,
        timeout=START_FAILS_WITHIN * 2,
    )
    return result, time.monotonic() - started


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("rbd/no-such-image", "rbd:rbd/no-such-image: no such image"),
        ("no-such-pool/disk", "rbd:no-such-pool/disk: no such pool 'no-such-pool'"),
        ("rbd/nons/disk", "rbd:rbd/nons/disk: no such image in namespace 'nons'"),
    ],
)
def test_an_unknown_image_or_pool_stops_the_start(ceph_cluster, name, message):
    result, took = serve_fails("--rbd-conf", str(ceph_cluster.conf_path), f"rbd:{name}")
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert took < START_FAILS_WITHIN


def test_a_cluster_that_does_not_answer_stops_the_start_after_the_timeout(ceph_cluster, tmp_path):
    conf = tmp_path / "silent.conf"
    text = ceph_cluster.conf_path.read_text()
    conf.write_text(re.sub(r"mon host = .*", f"mon host = v2:127.0.0.1:{free_port()}", text))
    result, took = serve_fails("--rbd-conf", str(conf), "--rbd-timeout", "3", "rbd:rbd/disk")
    assert result.returncode == 2, result.stderr
    assert "rbd:rbd/disk: the cluster did not answer within 3 s" in result.stderr
    assert took < START_FAILS_WITHIN


def test_refused_credentials_stop_the_start(ceph_cluster):
    result, took = serve_fails("--rbd-conf", str(ceph_cluster.conf_path), "--rbd-id", "nobody", "rbd:rbd/disk")
    assert result.returncode == 2, result.stderr
    assert "client.nobody" in result.stderr
    assert took < START_FAILS_WITHIN


def test_nbdcopy_both_ways(ceph_cluster, image, start_server, tmp_path):
    source = tmp_path / "source.img"
    data = bytearray(SIZE)
    rng = random.Random(7)
    for offset in range(0, SIZE, 3 * MiB):  # some data, some zeroes
        data[offset : offset + MiB] = rng.randbytes(MiB)
    source.write_bytes(data)
    server = rbd_server(start_server, ceph_cluster, f"rbd:{image}")
    subprocess.run(["nbdcopy", str(source), server.uri()], check=True, timeout=300)
    assert exported(ceph_cluster, image, tmp_path) == data
    back = tmp_path / "back.img"
    back.write_bytes(b"")
    subprocess.run(["nbdcopy", server.uri(), str(back)], check=True, timeout=300)
    assert back.read_bytes() == data
    assert server.stop() == 0  # SIGTERM: flushed, the image closed, the cluster left


def test_one_worker_process_serves_an_rbd_export(ceph_cluster, image, start_server, tmp_path):
    file = make_image(tmp_path / "disk.img", MiB)
    server = rbd_server(start_server, ceph_cluster, "--processes", "3", f"rbd:{image}",
                        "--export", f"name=file,path={file}")  # fmt: skip
    assert server.logged("one worker process serves every connection (not 3)"), server.log_text()
    assert len(server.worker_pids()) == 1


def test_metrics_and_top_show_an_rbd_export_with_its_engine(ceph_cluster, image, start_server):
    server = rbd_server(start_server, ceph_cluster, "--name", "vm", f"rbd:{image}")
    h = connect(server.uri("vm"))
    h.pwrite(b"x" * 64 * KiB, 0)
    samples = scrape(server.metrics_url)
    assert value(samples, "nbdserver_export_info", export="vm", engine="rbd", backing=f"rbd:{image}") == 1
    assert value(samples, "nbdserver_written_bytes_total", export="vm") == 64 * KiB
    assert value(samples, "nbdserver_export_size_bytes", export="vm") == SIZE
    top = subprocess.run(
        [sys.executable, "-m", "nbdserver", "top", "--once", "--interval", "0.5", server.metrics_url],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert top.returncode == 0, top.stderr
    header, row = top.stdout.splitlines()
    assert header.split()[:2] == ["Export", "Engine"] and row.split()[:2] == ["vm", "rbd"]
    h.shutdown()


def poll_windows(server) -> float:
    return value(scrape(server.metrics_url), "nbdserver_busy_poll_windows_total")


def test_an_rbd_exports_connections_do_not_busy_poll(ceph_cluster, image, start_server, tmp_path):
    file = make_image(tmp_path / "disk.img", MiB)
    server = rbd_server(start_server, ceph_cluster, "--name", "vm", f"rbd:{image}",
                        "--export", f"name=file,path={file}")  # fmt: skip
    on_rbd, on_file = connect(server.uri("vm")), connect(server.uri("file"))
    time.sleep(0.3)  # the handshakes' windows are over, and any rest after them
    before = poll_windows(server)
    for i in range(20):  # one request at a time: each would open a window on a file
        data = random.randbytes(4 * KiB)
        on_rbd.pwrite(data, i * 4 * KiB)
        assert on_rbd.pread(4 * KiB, i * 4 * KiB) == data
    assert poll_windows(server) == before
    for i in range(20):
        on_file.pwrite(b"f" * 4 * KiB, i * 4 * KiB)
    assert poll_windows(server) > before, "the file export's connection polls (the same event loop)"
    on_rbd.shutdown()
    on_file.shutdown()


def test_qemu_img_convert_and_compare(ceph_cluster, image, start_server, tmp_path):
    source = tmp_path / "source.raw"
    data = bytearray(SIZE)
    for offset in (0, 5 * MiB + 4096, 9 * MiB + 123, SIZE - MiB):
        data[offset : offset + MiB] = random.Random(offset).randbytes(MiB)
    source.write_bytes(data)
    server = rbd_server(start_server, ceph_cluster, f"rbd:{image}")
    convert = ["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw"]
    compare = ["qemu-img", "compare", "-f", "raw", "-F", "raw"]
    subprocess.run([*convert, source, server.uri()], check=True, timeout=120)
    subprocess.run([*compare, server.uri(), source], check=True, timeout=120)
    assert exported(ceph_cluster, image, tmp_path) == data
    other = tmp_path / "other.raw"
    data[9 * MiB + 200] ^= 0xFF
    other.write_bytes(data)
    assert subprocess.run([*compare, server.uri(), other], timeout=120).returncode == 1  # a difference shows


def test_fio_verify(ceph_cluster, image, start_server, tmp_path):
    server = rbd_server(start_server, ceph_cluster, f"rbd:{image}")
    report = tmp_path / "fio.json"
    subprocess.run(
        ["fio", "--name=rbd", "--ioengine=nbd", f"--uri={server.uri()}", "--rw=randwrite", "--bs=4k",
         "--iodepth=32", "--size=8M", "--verify=crc32c", "--do_verify=1", "--output-format=json",
         f"--output={report}"],
        check=True, timeout=300, cwd=tmp_path,  # fio leaves its verify state file in the working directory
    )  # fmt: skip
    (stats,) = json.loads(report.read_text())["jobs"]
    assert stats["error"] == 0
    assert stats["write"]["io_bytes"] == stats["read"]["io_bytes"] == 8 * MiB  # all written, all verified
    written = exported(ceph_cluster, image, tmp_path)[: 8 * MiB]
    assert written.count(0) < len(written) // 2  # in the cluster, as the rbd tool reads it


def test_a_reload_adds_an_rbd_export_and_serves_the_others_while_the_cluster_is_silent(
    ceph_cluster, image, start_server, tmp_path
):
    make_image(tmp_path / "a.img", MiB)
    silent = tmp_path / "silent.conf"
    silent.write_text(
        re.sub(r"mon host = .*", f"mon host = v2:127.0.0.1:{free_port()}", ceph_cluster.conf_path.read_text())
    )
    path = tmp_path / "nbdserver.toml"
    first = 'rbd-timeout = 4\n[[export]]\nname = "a"\npath = "a.img"\n'
    path.write_text(first)
    server = start_server("--config", path, "--processes", "1")
    path.write_text(first + f'[[export]]\nname = "silent"\npath = "rbd:{image}"\nrbd-conf = "{silent}"\n')
    server.proc.send_signal(signal.SIGHUP)
    assert server.logged("SIGHUP: reloading the configuration"), server.log_text()
    h = connect(server.uri("a"))
    for _ in range(10):  # answered while the image's open waits on the silent cluster
        assert h.pread(4096, 0) == bytes(4096)
    assert "not added" not in server.log_text()
    assert server.logged("export 'silent' not added"), server.log_text()
    assert "the cluster did not answer within 4 s" in server.log_text()
    path.write_text(first + f'[[export]]\nname = "vm"\npath = "rbd:{image}"\nrbd-conf = "{ceph_cluster.conf_path}"\n')
    server.proc.send_signal(signal.SIGHUP)
    assert server.logged("export 'vm' added"), server.log_text()
    vm = connect(server.uri("vm"))
    vm.pwrite(b"v" * 4096, 0)
    assert exported(ceph_cluster, image, tmp_path)[:4096] == b"v" * 4096
    vm.shutdown()
    h.shutdown()
