"""Every process the server starts (its workers, an upgrade's successor) runs the installed build,
and only it: never a package of the same name in the working directory."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import nbd
import pytest

from nbdserver import build
from tests.conftest import MiB, ServerProcess, Upgradable, make_image

pytestmark = pytest.mark.bindings

BLOCK = 4096


def plant_decoy(folder: Path) -> Path:
    """An ``nbdserver`` package in ``folder`` that leaves a mark if anything imports it."""
    mark = folder / "decoy-imported"
    package = folder / "nbdserver"
    for sub in (package, package / "process"):
        sub.mkdir(parents=True)
        (sub / "__init__.py").write_text(f"open({str(mark)!r}, 'a').write(__name__ + '\\n')\nraise SystemExit(3)\n")
    return mark


def test_workers_and_successor_run_the_installed_build_not_a_decoy_in_the_working_directory(tmp_path):
    here = tmp_path / "cwd"
    mark = plant_decoy(here)
    disk = make_image(tmp_path / "disk.img", 16 * MiB)
    # Started as a user starts it (the console script, whose folder is not the working directory).
    program = [sys.executable, "-P", "-m", "nbdserver"]
    args = [str(disk), "--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0", "--processes", "2"]
    server = ServerProcess(args, program=program, cwd=here)
    u = Upgradable(server.wait_ready())
    try:
        handles = []
        for i in range(4):  # connections on both workers, before and after an upgrade
            h = nbd.NBD()
            h.connect_uri(server.uri())
            h.pwrite(bytes([i + 1]) * BLOCK, i * BLOCK)
            handles.append(h)
        u.upgrade()
        for i, h in enumerate(handles):
            assert h.pread(BLOCK, i * BLOCK) == bytes([i + 1]) * BLOCK
            h.shutdown()
        assert server.logged("worker 1: nbdserver", count=2), server.log_text()  # the successor's workers too
    finally:
        u.stop()
    assert not mark.exists(), mark.read_text()
    described = [line for line in server.log if re.search(r"nbdserver \S+ \((pure|mypyc)\) on ", line)]
    # The first primary, its two workers, the successor and its two workers.
    assert len(described) >= 6, server.log_text()
    expected = f"({build.kind()}) on {build.interpreter()}"
    for line in described:
        assert expected in line and line.endswith(f" from {build.location()}"), line
    assert server.log[0] == described[0]  # the primary's first line names its build
    assert any("worker 0: nbdserver" in line for line in described), described
