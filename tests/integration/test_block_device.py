"""A block device as backing: a loop device over a file, set up and torn down by the test."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import nbd
import pytest

pytestmark = pytest.mark.bindings  # libnbd's Python bindings: run again by tests/in_current

MiB = 1024 * 1024


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    if os.geteuid() != 0 or shutil.which("losetup") is None:
        pytest.skip("loop devices need root and losetup")
    backing = tmp_path / "loop.img"
    backing.write_bytes(bytes(range(256)) * (32 * MiB // 256))
    result = subprocess.run(["losetup", "--find", "--show", str(backing)], capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        pytest.skip(f"no loop device available here: {result.stderr.strip()}")
    device = result.stdout.strip()
    try:
        yield device, backing
    finally:
        subprocess.run(["losetup", "--detach", device], timeout=30, check=False)


def test_block_device_export(start_server, loop_device, io_mode):
    device, backing = loop_device
    server = start_server(device, *io_mode)
    h = nbd.NBD()
    h.connect_uri(server.uri())
    try:
        assert h.get_size() == 32 * MiB  # BLKGETSIZE64
        assert h.pread(4096, 8192) == (bytes(range(256)) * 16)
        h.pwrite(b"\xab" * 65536, MiB, nbd.CMD_FLAG_FUA)
        h.zero(65536, 4 * MiB)  # BLKZEROOUT
        h.trim(65536, 8 * MiB)  # BLKDISCARD where the device supports it; advisory either way
        h.flush()
        assert h.pread(65536, MiB) == b"\xab" * 65536
        assert h.pread(65536, 4 * MiB) == bytes(65536)
        with pytest.raises(nbd.Error):
            h.zero(4096, 0, nbd.CMD_FLAG_FAST_ZERO)  # no fast zeroing on block devices
    finally:
        h.shutdown()
    assert server.stop() == 0
    data = backing.read_bytes()
    assert data[MiB : MiB + 65536] == b"\xab" * 65536
    assert data[4 * MiB : 4 * MiB + 65536] == bytes(65536)
