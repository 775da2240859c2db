"""Debian 13's NBD clients against the server on this machine: libnbd 1.22 (nbdinfo, nbdcopy, nbdsh
and its Python bindings), qemu-img 10 and fio 3.39's nbd engine, run in the chroot of
fs/chroot/current.py, which shares the host's loopback and /tmp.  And the chroot itself: a program
in it keeps its PID, and its mounts never reach the host."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
from pathlib import Path

import pytest

from tests.conftest import IMAGE_SIZE, current, free_port, needs_ipv6_loopback, wait_for

MiB = 1024 * 1024
FIO_HEADER_MAGIC = 0xACCA  # how each block fio's verify wrote begins


def inside(chroot: current.Chroot, *argv: str | os.PathLike[str], timeout: float = 120) -> str:
    """Its output; the program must succeed (at the timeout it is killed, by its PID)."""
    done = chroot.run(argv, timeout=timeout)
    assert done.returncode == 0, f"{argv} -> {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.stdout


def random_file(path: Path, size: int) -> Path:
    path.write_bytes(os.urandom(size))
    return path


@pytest.mark.parametrize("listener", ["127.0.0.1", pytest.param("::1", marks=needs_ipv6_loopback), "unix"])
def test_nbdinfo_1_22_describes_the_export(current_tools, start_server, image, tmp_path, listener):
    tool, library = inside(current_tools, "nbdinfo", "--version").splitlines()[:2]
    assert tool.startswith("nbdinfo 1.22.") and library.startswith("libnbd 1.22."), (tool, library)
    address = f"unix:{tmp_path / 'nbd.sock'}" if listener == "unix" else f"[{listener}]:0"
    server = start_server(image, "--listen", address)
    info = json.loads(inside(current_tools, "nbdinfo", "--json", server.uri()))
    (export,) = info["exports"]
    assert export["export-size"] == IMAGE_SIZE
    assert info["protocol"] == "newstyle-fixed" and info["structured"] is True
    assert export["is_read_only"] is False
    assert all(export[flag] for flag in ("can_flush", "can_fua", "can_multi_conn", "can_trim", "can_zero"))
    assert export["block_size_preferred"] == 4096


def test_qemu_img_10_converts_an_image_to_the_export_and_back(current_tools, server, image, tmp_path):
    assert inside(current_tools, "qemu-img", "--version").startswith("qemu-img version 10.")
    info = json.loads(inside(current_tools, "qemu-img", "info", "--output=json", server.uri()))
    assert info["virtual-size"] == IMAGE_SIZE and info["format"] == "raw"
    source = random_file(tmp_path / "source.raw", 8 * MiB)
    inside(current_tools, "qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", source, server.uri())
    back = tmp_path / "back.raw"
    inside(current_tools, "qemu-img", "convert", "-f", "raw", "-O", "raw", server.uri(), back)
    data = back.read_bytes()
    assert len(data) == IMAGE_SIZE
    assert data[: 8 * MiB] == source.read_bytes()
    assert data[8 * MiB :] == bytes(IMAGE_SIZE - 8 * MiB)
    assert image.read_bytes() == data  # what the server wrote to its file


# Run by the chroot's python3 with libnbd 1.22's bindings: a write, a flush, the same range read back.
LIBNBD_ROUND_TRIP = """
import json, sys, nbd
uri, source, copy, offset = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
data = open(source, "rb").read()
h = nbd.NBD()
h.connect_uri(uri)
h.pwrite(data, offset)
h.flush()
open(copy, "wb").write(h.pread(len(data), offset))
print(json.dumps({"version": h.get_version(), "size": h.get_size(), "can_flush": h.can_flush()}))
h.shutdown()
"""


def test_libnbd_1_22_python_writes_flushes_and_reads_back(current_tools, server, image, tmp_path):
    source, copy, offset = random_file(tmp_path / "block", 256 * 1024), tmp_path / "copy", 5 * MiB + 512
    said = inside(current_tools, "python3", "-c", LIBNBD_ROUND_TRIP, server.uri(), source, copy, str(offset))
    report = json.loads(said)
    assert report["version"].startswith("1.22."), report
    assert report["size"] == IMAGE_SIZE and report["can_flush"] is True
    data = source.read_bytes()
    assert copy.read_bytes() == data
    with open(image, "rb") as f:
        f.seek(offset)
        assert f.read(len(data)) == data
    # nbdsh, another client of the same library, reads it too.
    assert inside(current_tools, "nbdsh", "--version").startswith("nbdsh 1.22.")
    head = inside(current_tools, "nbdsh", "-u", server.uri(), "-c", f"print(h.pread(64, {offset}).hex())")
    assert head.strip() == data[:64].hex()


def test_nbdcopy_1_22_copies_to_the_export_and_back(current_tools, server, image, tmp_path):
    assert inside(current_tools, "nbdcopy", "--version").startswith("nbdcopy 1.22.")
    source = random_file(tmp_path / "source.raw", 16 * MiB)
    inside(current_tools, "nbdcopy", "--flush", source, server.uri())
    back = tmp_path / "back.raw"
    inside(current_tools, "nbdcopy", server.uri(), back)
    data = back.read_bytes()
    assert len(data) == IMAGE_SIZE
    assert data[: 16 * MiB] == source.read_bytes() and data[16 * MiB :] == bytes(IMAGE_SIZE - 16 * MiB)
    assert image.read_bytes() == data


def test_fio_3_39_nbd_engine_verifies_what_it_wrote(current_tools, server, image):
    assert inside(current_tools, "fio", "--version").strip() == "fio-3.39"
    out = inside(
        current_tools,
        "fio",
        "--name=verify",
        "--ioengine=nbd",
        f"--uri={server.uri()}",
        *("--rw=randwrite", "--bs=4k", "--iodepth=16", "--size=16m"),
        *("--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--output-format=json"),
    )
    report = json.loads(out[out.index("{") :])  # the engine says "connected" before the report
    (job,) = report["jobs"]
    assert job["error"] == 0
    assert job["write"]["io_bytes"] == 16 * MiB
    assert job["read"]["io_bytes"] == 16 * MiB  # every block read back and checked
    with open(image, "rb") as f:
        written = f.read(16 * MiB)
    assert all(struct.unpack_from("<H", written, at)[0] == FIO_HEADER_MAGIC for at in range(0, 16 * MiB, 4096))


def test_a_program_in_the_chroot_keeps_its_pid_and_its_mounts_stay_inside(current_tools):
    proc = subprocess.Popen(current_tools.command(["sleep", "300"]))
    try:
        assert wait_for(lambda: _command_name(proc.pid) == "sleep"), _command_name(proc.pid)
        assert os.readlink(f"/proc/{proc.pid}/root") == str(current_tools.root)
        assert {"/proc", "/dev", "/sys", "/tmp"} <= _mount_points(proc.pid)
        assert not _host_mounts_under(current_tools.root)
    finally:
        proc.kill()
        proc.wait()
    assert not _host_mounts_under(current_tools.root)


def test_nbdkit_1_42_in_the_chroot_serves_the_host_and_stops_by_its_pid(current_tools, image, tmp_path):
    if shutil.which("nbdinfo") is None:
        pytest.skip("nbdinfo is not installed")
    port, pidfile = free_port(), tmp_path / "nbdkit.pid"  # nbdkit writes its PID there once it accepts
    argv = ["nbdkit", "-f", "--exit-with-parent", "-P", pidfile, "-i", "127.0.0.1", "-p", str(port), "file", image]
    proc = subprocess.Popen(current_tools.command(argv), stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(lambda: _whole_line(pidfile) or proc.poll() is not None, timeout=20) and proc.poll() is None
        assert inside(current_tools, "nbdkit", "--version").startswith("nbdkit 1.42.")
        assert int(pidfile.read_text()) == proc.pid and _command_name(proc.pid) == "nbdkit"
        info = subprocess.run(
            ["nbdinfo", "--json", f"nbd://127.0.0.1:{port}/"], capture_output=True, text=True, timeout=60
        )
        assert info.returncode == 0, info.stderr
        assert json.loads(info.stdout)["exports"][0]["export-size"] == IMAGE_SIZE
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)


def _whole_line(path: Path) -> bool:
    """Has the file its line yet (a PID file is written after it is created)?"""
    return path.exists() and path.read_text().endswith("\n")


def _command_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except FileNotFoundError:
        return ""


def _mount_points(pid: int) -> set[str]:
    """Where the process sees mounts, relative to its root."""
    return {line.split()[4] for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines()}


def _host_mounts_under(root: Path) -> list[str]:
    return [point for point in _mount_points(os.getpid()) if point.startswith(str(root))]
