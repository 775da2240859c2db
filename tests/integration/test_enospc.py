"""A backing file on a full filesystem: the write that finds no space fails with ENOSPC, nothing else does."""

from __future__ import annotations

import errno
from collections.abc import Iterator
from pathlib import Path

import nbd
import pytest

from tests.conftest import MiB, mounted_ext4

pytestmark = pytest.mark.bindings  # libnbd's Python bindings: run again by tests/in_current


@pytest.fixture
def small_filesystem(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB ext4 filesystem, loop-mounted for the test and unmounted after it."""
    with mounted_ext4(tmp_path / "fs.img", tmp_path / "mnt", 16 * MiB) as mountpoint:
        yield mountpoint


def test_enospc_fails_that_write_only(small_filesystem, start_server, io_mode):  # stops before the unmount
    export = small_filesystem / "disk.img"
    server = start_server(export, "--size", "64M", *io_mode)  # sparse: larger than the filesystem
    h = nbd.NBD()
    h.connect_uri(server.uri())
    chunk = b"\x5a" * MiB
    written = []
    failure = None
    for block in range(64):
        try:
            h.pwrite(chunk, block * MiB)
            written.append(block)
        except nbd.Error as exc:
            failure = exc
            break
    assert failure is not None and failure.errnum == errno.ENOSPC, failure
    assert 4 <= len(written) < 16, written  # some space was there, and then it ran out
    # The connection and the data written before are fine; overwriting allocated space still works.
    for block in written:
        assert h.pread(MiB, block * MiB) == chunk
    h.pwrite(b"\xa5" * MiB, written[0] * MiB, nbd.CMD_FLAG_FUA)
    assert h.pread(16, written[0] * MiB) == b"\xa5" * 16
    # A second connection is served too.
    other = nbd.NBD()
    other.connect_uri(server.uri())
    assert other.pread(16, written[-1] * MiB) == b"\x5a" * 16
    other.shutdown()
    h.shutdown()
    assert server.stop() == 0
