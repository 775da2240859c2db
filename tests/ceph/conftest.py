"""A real Ceph cluster (fs/ceph/cluster.py: one monitor, one OSD, pool ``rbd``) for the whole
session, started on first use: the tests that export RBD images run against it."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent / "fs" / "ceph"))
import cluster as ceph


@pytest.fixture(scope="session")
def ceph_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ceph.Cluster]:
    missing = ceph.missing_programs()
    if missing:
        pytest.skip(f"no Ceph here (tests/bootstrap installs ceph-mon, ceph-osd, ceph-common): {' '.join(missing)}")
    # Started once: a start costs about 3 s, and every test makes images of its own names.
    with ceph.Cluster(tmp_path_factory.mktemp("ceph")) as cluster:
        yield cluster
