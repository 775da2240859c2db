"""RBD exports through what a server lives through: a worker killed with requests in flight, an
upgrade with requests in flight, the cluster gone for a while.

Clients keep requests in flight against a model of what they wrote (tests/integration's
``Client``); what the cluster holds afterwards is read with the rbd tool, not through the server:
every write the server answered must be there, whatever happened to the process that answered it.
"""

from __future__ import annotations

import os
import re
import signal
import time

import pytest

from tests.ceph.test_rbd_export import connect, exported, rbd_server, serve_fails
from tests.conftest import wait_for
from tests.integration.test_handover import BLOCK, Client, finish
from tests.integration.test_recovery import children, count, kill

nbd = pytest.importorskip("nbd", reason="libnbd's Python bindings (python3-libnbd)")

KILLS = 3
UPGRADES = 3
BLOCKS = range(0, 4096)  # the 16 MiB image of the image fixture, in 4 KiB blocks
# The cluster lets a dead client's lock go once its watch times out (osd_client_watch_timeout,
# 30 s): progress well before then shows the replacement took the lock itself.
PROGRESS_AFTER_A_KILL = 20.0


def progressed(clients: list[Client], by: int, timeout: float) -> bool:
    before = sum(c.done for c in clients)
    return wait_for(lambda: sum(c.done for c in clients) >= before + by, timeout=timeout)


def assert_the_cluster_holds(cluster, spec: str, clients: list[Client], tmp_path) -> None:
    data = exported(cluster, spec, tmp_path)
    for c in clients:
        for block, written in c.model.items():
            assert data[block * BLOCK : (block + 1) * BLOCK] == written, f"block {block}"


@pytest.mark.parametrize("exclusive", [[], ["--rbd-exclusive"]], ids=["", "exclusive"])
def test_a_killed_worker_costs_no_request_and_its_lock_is_taken_back(
    ceph_cluster, image, rbd_user, start_server, tmp_path, exclusive
):
    # As a user with the caps of profile rbd only: breaking a lock blocklists its owner, which they allow.
    args = ("--rbd-id", rbd_user, "--processes", "2", *exclusive, f"rbd:{image}")
    server = rbd_server(start_server, ceph_cluster, *args)
    clients = [Client(server.uri(), BLOCKS[:2048], True, seed=1), Client(server.uri(), BLOCKS[2048:], True, seed=2)]
    for c in clients:
        c.start()
    try:
        for _ in range(KILLS):
            assert progressed(clients, 200, 60), [c.errors for c in clients]
            (worker,) = children(server)  # one worker serves an RBD export
            kill(server, worker)
            assert progressed(clients, 50, PROGRESS_AFTER_A_KILL), ("stalled after a kill", server.log_text()[-3000:])
            assert not any(c.errors for c in clients), [c.errors for c in clients]
    finally:
        finish(clients)
    # Each replacement broke its predecessor's lock (and the cluster blocklisted the dead one).
    found = (re.search(r"the lock of (\S+), which died, broken", line) for line in list(server.log))
    broken = [m.group(1) for m in found if m]
    assert len(broken) == len(set(broken)) == KILLS, server.log_text()  # each once
    blocklist = ceph_cluster.ceph("osd", "blocklist", "ls")
    assert all(holder in blocklist for holder in broken), (broken, blocklist)
    for c in clients:
        c.h.shutdown()
    assert_the_cluster_holds(ceph_cluster, image, clients, tmp_path)


@pytest.mark.parametrize(
    ("processes", "exclusive"),
    [("1", []), ("2", []), ("1", ["--rbd-exclusive"]), ("2", ["--rbd-exclusive"])],
    ids=["one-process", "worker", "one-process-exclusive", "worker-exclusive"],
)
def test_upgrades_with_requests_in_flight(ceph_cluster, image, upgradable, tmp_path, processes, exclusive):
    conf = str(ceph_cluster.conf_path)
    u = upgradable("--rbd-conf", conf, "--rbd-timeout", "20", "--processes", processes, *exclusive, f"rbd:{image}")
    clients = [Client(u.server.uri(), BLOCKS[:2048], True, seed=3), Client(u.server.uri(), BLOCKS[2048:], True, seed=4)]
    for c in clients:
        c.start()
    try:
        for _ in range(UPGRADES):
            assert progressed(clients, 200, 60), [c.errors for c in clients]
            u.upgrade(timeout=60)
            assert not any(c.errors for c in clients), [c.errors for c in clients]
        assert progressed(clients, 200, 60), [c.errors for c in clients]
    finally:
        finish(clients)
    for c in clients:
        c.h.shutdown()
    if exclusive:  # each predecessor let the lock go, each successor took it
        assert count(u.server, "exclusive lock released for the successor") == UPGRADES, u.server.log_text()
        assert count(u.server, "exclusive lock taken") == UPGRADES + 1, u.server.log_text()
    assert_the_cluster_holds(ceph_cluster, image, clients, tmp_path)


def test_a_cluster_gone_fails_requests_after_the_timeout_and_serving_resumes(ceph_cluster, image, start_server):
    server = rbd_server(start_server, ceph_cluster, "--rbd-timeout", "3", f"rbd:{image}")
    h = connect(server.uri())
    h.pwrite(b"a" * BLOCK, 0)
    osd = ceph_cluster.daemons()["osd.0"]
    os.kill(osd, signal.SIGSTOP)
    try:
        started = time.monotonic()
        with pytest.raises(nbd.Error) as failed:
            h.pwrite(b"b" * BLOCK, BLOCK)
        took = time.monotonic() - started
    finally:
        os.kill(osd, signal.SIGCONT)
    assert failed.value.errno == "EIO", failed.value
    assert took >= 2.5, f"failed after {took:.1f} s, before the timeout"  # the failure is the timeout's
    # The cluster is back: the same connection is served again, and what was answered is there.
    assert wait_for(lambda: _writes(h), timeout=60)
    assert h.pread(BLOCK, 0) == b"a" * BLOCK
    assert h.pread(BLOCK, 2 * BLOCK) == b"c" * BLOCK
    h.shutdown()


def _writes(h) -> bool:
    try:
        h.pwrite(b"c" * BLOCK, 2 * BLOCK)
        return True
    except nbd.Error:
        return False


def test_exclusive_a_second_server_refuses_to_start_naming_the_owner(ceph_cluster, image, start_server):
    first = rbd_server(start_server, ceph_cluster, "--rbd-exclusive", f"rbd:{image}")
    assert first.logged("exclusive lock taken"), first.log_text()
    holder = ceph_cluster.rbd("lock", "ls", image)  # the owner as the cluster lists it
    second, _ = serve_fails("--rbd-conf", str(ceph_cluster.conf_path), "--rbd-exclusive", f"rbd:{image}")
    assert second.returncode == 2, second.stderr
    owner = re.search(r"held by (\S+) ", second.stderr)
    assert owner and owner.group(1) in holder, (second.stderr, holder)
    # The first serves on, and without --rbd-exclusive a server starts (its writes would wait).
    h = connect(first.uri())
    h.pwrite(b"e" * BLOCK, 0)
    assert h.pread(BLOCK, 0) == b"e" * BLOCK
    h.shutdown()
    assert first.stop() == 0
    third = rbd_server(start_server, ceph_cluster, "--rbd-exclusive", f"rbd:{image}")  # the lock was let go
    assert third.logged("exclusive lock taken"), third.log_text()


def test_exclusive_the_lock_of_a_dead_server_does_not_keep_the_next_from_starting(ceph_cluster, image, start_server):
    first = rbd_server(start_server, ceph_cluster, "--processes", "1", "--rbd-exclusive", f"rbd:{image}")
    assert first.logged("exclusive lock taken"), first.log_text()
    first.proc.kill()  # its lock stays in the cluster, its watch for half a minute more
    first.proc.wait()
    second = rbd_server(start_server, ceph_cluster, "--processes", "1", "--rbd-exclusive", f"rbd:{image}")
    assert second.logged("exclusive lock taken"), second.log_text()
    assert "which died, broken" in second.log_text()
    h = connect(second.uri())
    h.pwrite(b"s" * BLOCK, 0)
    h.shutdown()


def test_exclusive_a_worker_killed_without_clients_leaves_its_replacement_the_lock(ceph_cluster, image, start_server):
    server = rbd_server(start_server, ceph_cluster, "--processes", "2", "--rbd-exclusive", f"rbd:{image}")
    assert server.logged("exclusive lock taken"), server.log_text()
    (worker,) = children(server)
    kill(server, worker, wait_for_line="started again")
    assert server.logged("exclusive lock taken", count=2), server.log_text()
    h = connect(server.uri())
    h.pwrite(b"w" * BLOCK, 0)
    assert h.pread(BLOCK, 0) == b"w" * BLOCK
    h.shutdown()
