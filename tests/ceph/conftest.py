"""A real Ceph cluster (fs/ceph/cluster.py: one monitor, one OSD, pool ``rbd``) for the whole
session, started on first use: the tests that export RBD images run against it."""

from __future__ import annotations

import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent / "fs" / "ceph"))
import cluster as ceph

SIZE = 16 * 1024 * 1024  # of an image made for a test
_started: list[str] = []  # how long the session's cluster took to start, for the summary


def pytest_terminal_summary(terminalreporter) -> None:
    for line in _started:
        terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def ceph_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ceph.Cluster]:
    missing = ceph.missing_programs()
    if missing:
        pytest.skip(f"no Ceph here (tests/bootstrap installs ceph-mon, ceph-osd, ceph-common): {' '.join(missing)}")
    # Started once: a start costs about 3 s, and every test makes images of its own names.
    with ceph.Cluster(tmp_path_factory.mktemp("ceph")) as cluster:
        steps = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in cluster.steps.items())
        _started.append(f"Ceph test cluster: up in {cluster.startup_seconds:.1f} s ({steps})")
        yield cluster


@pytest.fixture(scope="session")
def rbd_user(ceph_cluster) -> str:
    """A cephx user with only the caps an RBD client needs (profile rbd), as --rbd-id names it."""
    ceph_cluster.create_user("nbd")
    return "nbd"


@pytest.fixture
def image(ceph_cluster) -> Iterator[str]:
    """A new 16 MiB image (its spec, rbd/NAME), removed afterwards."""
    spec = ceph_cluster.create_image(f"t-{uuid.uuid4().hex[:10]}", SIZE)
    yield spec
    remove_image(ceph_cluster, spec)


def remove_image(cluster, spec: str) -> None:
    # A server stopped a moment ago may still be a watcher for a few seconds: retry meanwhile.
    deadline = time.monotonic() + 60
    while True:
        try:
            cluster.rbd("rm", "--no-progress", spec, timeout=60)
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
