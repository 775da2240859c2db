"""Busy polling (``--busy-poll``) with a real client: requests served alike with it on and off,
its windows counted in /metrics (summed over worker processes), and resting for a client that
pauses between requests."""

from __future__ import annotations

import os
import time

import nbd
import pytest

from tests.conftest import ServerProcess, scrape, value

pytestmark = pytest.mark.bindings  # libnbd's Python bindings: run again by tests/in_current

BLOCK = 4096


def polled(server: ServerProcess) -> tuple[float, float, float]:
    samples = scrape(server.metrics_url)
    return tuple(
        value(samples, f"nbdserver_busy_poll_{name}")
        for name in ("windows_total", "empty_windows_total", "seconds_total")
    )  # type: ignore[return-value]


def one_at_a_time(server: ServerProcess, count: int, pause: float = 0.0) -> None:
    """``count`` writes, each read back, one request in flight at a time."""
    h = nbd.NBD()
    h.connect_uri(server.uri())
    try:
        for i in range(count):
            data = os.urandom(BLOCK)
            h.pwrite(data, i * BLOCK)
            assert h.pread(BLOCK, i * BLOCK) == data
            time.sleep(pause)
    finally:
        h.shutdown()


@pytest.mark.parametrize("processes", ["1", "2"])
def test_windows_are_counted_and_summed_over_workers(start_server, image, processes):
    server = start_server(image, "--processes", processes)
    one_at_a_time(server, 200)
    windows, empty, seconds = polled(server)
    assert 1 <= windows < 400  # requests back to back share windows
    assert seconds > 0 and empty <= windows


def test_off_never_polls(start_server, image):
    server = start_server(image, "--busy-poll", "0", "--processes", "1")
    one_at_a_time(server, 50)
    assert polled(server) == (0, 0, 0)


def test_a_pausing_client_rests_polling(start_server, image):
    server = start_server(image, "--processes", "1")
    h = nbd.NBD()
    h.connect_uri(server.uri())
    time.sleep(0.3)  # the handshake's windows are over, and any rest after them
    before = polled(server)
    try:
        for i in range(12):  # a request every 3 ms: each 100 µs window expires empty
            h.pwrite(bytes([i]) * BLOCK, 0)
            time.sleep(0.003)
        assert h.pread(BLOCK, 0) == bytes([11]) * BLOCK
    finally:
        h.shutdown()
    after = polled(server)
    windows, empty = after[0] - before[0], after[1] - before[1]
    assert 1 <= windows < 12, (before, after)  # some requests came while polling rested
    assert empty == windows, (before, after)  # the client never answered within one


def test_the_configuration_file_sets_it(start_server, image, tmp_path):
    config = tmp_path / "nbdserver.toml"
    config.write_text(f'busy-poll = 0\nprocesses = 1\n[[export]]\nname = ""\npath = "{image}"\n')
    server = start_server("--config", config)
    one_at_a_time(server, 10)
    assert polled(server)[0] == 0
