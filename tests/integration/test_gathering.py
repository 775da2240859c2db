"""Deep queues' requests gathered before a receive (serving/gathering.py), through a real server
and libnbd: clients measured, every request answered at any depth, the data as written."""

from __future__ import annotations

import os

import nbd
import pytest

from tests.conftest import ServerProcess, scrape, value

pytestmark = pytest.mark.bindings  # libnbd's Python bindings: run again by tests/in_current

BLOCK = 4096
BUSY = 1100  # requests: more than PROBE_AFTER, so the connection is measured


def gathered(server: ServerProcess) -> tuple[float, float, float]:
    samples = scrape(server.metrics_url)
    return tuple(value(samples, f"nbdserver_gather_{name}_total") for name in ("probes", "waits", "late"))  # type: ignore[return-value]


def connect(server: ServerProcess) -> nbd.NBD:
    h = nbd.NBD()
    h.connect_uri(server.uri())
    return h


@pytest.mark.parametrize("gather", [True, False], ids=["gather", "no-gather"])
def test_a_busy_client_with_one_request_at_a_time_is_measured_and_never_waited_for(start_server, image, gather):
    server = start_server(image, *([] if gather else ["--no-gather"]))
    h = connect(server)
    data = os.urandom(BLOCK)
    for i in range(BUSY):
        h.pwrite(data, i % 64 * BLOCK)
    assert h.pread(BLOCK, 0) == data
    h.shutdown()
    probes, waits, late = gathered(server)
    if gather:
        assert probes >= 1  # it answered everything before each request: measured once busy
    else:
        assert probes == 0
    assert waits == 0 and late == 0  # one request in flight: never worth a wait


def test_a_deep_queue_gets_every_write_and_then_one_request_at_a_time_is_answered(start_server, image):
    """256 sequential writes in flight at a time, over and over, then requests one at a time: a
    client whose queue shrank is answered (a gathering it cannot fill is read when its time is up)."""
    server = start_server(image)
    h = connect(server)
    blocks = 8192  # 32 MiB
    errors: list[int] = []

    def completed(error) -> int:
        if error.value:
            errors.append(error.value)
        return 1

    for rounds in range(3):
        pattern = bytes([rounds + 1]) * BLOCK
        for block in range(blocks):
            while h.aio_in_flight() >= 256:
                h.poll(-1)
            h.aio_pwrite(pattern, block * BLOCK, completion=completed)
        while h.aio_in_flight():
            h.poll(-1)
    assert errors == []
    expected = bytearray(bytes([3]) * BLOCK * blocks)
    for block in range(0, blocks, 97):
        fresh = os.urandom(BLOCK)
        h.pwrite(fresh, block * BLOCK)
        assert h.pread(BLOCK, block * BLOCK) == fresh
        expected[block * BLOCK : (block + 1) * BLOCK] = fresh
    assert h.pread(blocks * BLOCK, 0) == expected
    h.shutdown()
    with open(image, "rb") as f:
        assert f.read(blocks * BLOCK) == expected
