"""ext4 on an RBD export through the kernel's nbd-client in a QEMU guest (fs/guest, fs/scenarios):
the guest's filesystem, upgrades of the server under it, and kills of the worker that serves it.

One boot against a server with two worker processes (one serves an RBD export) on a fresh image
of the session's cluster; the checks are those of tests/e2e/test_guest.py for a file, plus the
image lock each replacement breaks.
"""

from __future__ import annotations

import re
import uuid

import pytest

from tests.ceph.conftest import remove_image
from tests.conftest import MiB
from tests.e2e.test_guest import RECOVERY_PAUSE_LIMIT, Run, boot, console_tail, passed, server_problems

SCENARIOS = ["ext4", "upgrade", "recovery"]
IMAGE_SIZE = 512 * MiB


@pytest.fixture(scope="module")
def rbd_run(tmp_path_factory: pytest.TempPathFactory, ceph_cluster) -> Run:
    spec = ceph_cluster.create_image(f"guest-{uuid.uuid4().hex[:8]}", IMAGE_SIZE)
    try:
        args = ("--processes", "2", "--rbd-conf", str(ceph_cluster.conf_path))
        return boot(tmp_path_factory, SCENARIOS, args, export=f"rbd:{spec}", timeout=1200)
    finally:
        remove_image(ceph_cluster, spec)


def test_ext4_on_an_rbd_export(rbd_run):
    assert rbd_run.result.lines("@@ BOOTED"), console_tail(rbd_run)
    assert passed(rbd_run, "ext4"), console_tail(rbd_run)


def test_upgrades_under_ext4_on_an_rbd_export_fail_nothing(rbd_run):
    assert passed(rbd_run, "upgrade"), console_tail(rbd_run)
    assert rbd_run.pauses and rbd_run.requests.count("upgrade") == len(rbd_run.pauses)
    print(f"{len(rbd_run.pauses)} upgrades: pause max {max(rbd_run.pauses):.3f} s")


def test_worker_kills_under_ext4_on_an_rbd_export_fail_nothing(rbd_run):
    run = rbd_run
    assert passed(run, "recovery"), console_tail(run)
    assert len(run.result.lines("@@ RECOVERED from 10 kills")) == 2, console_tail(run)
    assert not server_problems(run.logs), "\n".join(server_problems(run.logs))
    assert len(run.kills) == 20, run.requests
    for kill in run.kills:
        assert kill.pid and kill.closed == 0 and kill.resumed == kill.held, kill
        assert kill.pause < RECOVERY_PAUSE_LIMIT, kill
    # A dead worker that held the image's lock (it wrote since it took over) had it broken by its
    # replacement; one killed before its first write held none.
    broken = sum(len(re.findall(r"which died, broken", log)) for log in run.logs)
    assert 1 <= broken <= len(run.kills), broken
    pauses = sorted(kill.pause for kill in run.kills)
    print(f"20 worker kills under ext4 on RBD: pause median {pauses[10]:.3f} s, max {pauses[-1]:.3f} s")
