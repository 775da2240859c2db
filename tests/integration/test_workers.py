"""Worker processes (``--processes N``): connections spread over several event loops, one
server to its clients, to /metrics and to the service manager."""

from __future__ import annotations

import os
import re
import signal
import socket
import time
from pathlib import Path

import nbd
import pytest

from nbdserver.block.ledger import ROWS
from tests.conftest import MiB, ServerProcess, make_image, running, scrape, value, wait_for
from tests.integration.rawclient import Cmd
from tests.integration.test_bad_input import assert_serves, memory, negotiate

pytestmark = pytest.mark.bindings  # libnbd's Python bindings: run again by tests/in_current

BLOCK = 4096


def connect(server: ServerProcess, name: str = "") -> nbd.NBD:
    h = nbd.NBD()
    h.connect_uri(server.uri(name))
    return h


def served_by(server: ServerProcess, count: int) -> set[str]:
    """Which workers logged the first ``count`` connections."""
    assert server.logged(": connected", count), server.log_text()
    return {m for m in re.findall(r"(worker \d+): \S+: connected", server.log_text())}


@pytest.fixture
def two_workers(start_server, tmp_path: Path) -> ServerProcess:
    return start_server(make_image(tmp_path / "disk.img", 64 * MiB), "--name", "disk", "--processes", "2")


def test_connections_spread_over_the_workers_and_see_each_others_writes(two_workers):
    handles = [connect(two_workers, "disk") for _ in range(4)]
    try:
        assert served_by(two_workers, 4) == {"worker 0", "worker 1"}
        assert all(h.can_multi_conn() for h in handles)
        for i, h in enumerate(handles):  # each write is read back through a connection of the other worker
            h.pwrite(bytes([i + 1]) * BLOCK, i * BLOCK)
        for i in range(4):
            assert handles[(i + 1) % 4].pread(BLOCK, i * BLOCK) == bytes([i + 1]) * BLOCK
        handles[1].flush()
    finally:
        for h in handles:
            h.shutdown()
    assert "2 worker processes" in two_workers.log_text()


def test_metrics_sum_every_worker(two_workers):
    handles = [connect(two_workers, "disk") for _ in range(4)]
    try:
        for i, h in enumerate(handles):
            for n in range(i + 1):  # 1 + 2 + 3 + 4 writes
                h.pwrite(b"m" * BLOCK, (16 * i + n) * BLOCK)
            h.pread(BLOCK, 0)
        samples = scrape(two_workers.metrics_url)
        assert value(samples, "nbdserver_requests_total", export="disk", op="write") == 10
        assert value(samples, "nbdserver_requests_total", export="disk", op="read") == 4
        assert value(samples, "nbdserver_written_bytes_total", export="disk") == 10 * BLOCK
        assert value(samples, "nbdserver_connections", export="disk") == 4
        assert value(samples, "nbdserver_connections_total") == 4
        assert value(samples, "nbdserver_export_size_bytes", export="disk") == 64 * MiB
        buckets = value(samples, "nbdserver_request_duration_seconds_count", export="disk", op="write")
        assert buckets == 10
    finally:
        for h in handles:
            h.shutdown()
    assert wait_for(lambda: value(scrape(two_workers.metrics_url), "nbdserver_connections", export="disk") == 0)


def ledger_row(server: ServerProcess) -> list[int]:
    """The one used row of the primary's ledger (block/ledger.py), read through /proc: the file,
    the total at the start of the last flush, and what each worker wrote."""
    fds = Path(f"/proc/{server.proc.pid}/fd")
    (memfd,) = [fd for fd in fds.iterdir() if os.readlink(fd).startswith("/memfd:nbd-ledger")]
    words = memoryview(memfd.read_bytes()).cast("Q")
    width = len(words) // ROWS
    rows = [list(words[base : base + width]) for base in range(0, len(words), width) if words[base]]
    assert len(rows) == 1, rows
    return rows[0][3:]


def test_a_flush_counts_what_every_worker_wrote(two_workers):
    """What a flush may write back (which decides whether it is done in place) is counted for
    both workers in the primary's shared table: a flush on one worker's connection covers the
    other worker's writes too."""
    handles = [connect(two_workers, "disk") for _ in range(2)]
    try:
        assert served_by(two_workers, 2) == {"worker 0", "worker 1"}
        handles[0].pwrite(b"a" * 8 * MiB, 0)
        handles[1].pwrite(b"b" * BLOCK, 8 * MiB)
        assert sorted(ledger_row(two_workers)[1:]) == [BLOCK, 8 * MiB]
        handles[1].flush()
        assert ledger_row(two_workers)[0] == 8 * MiB + BLOCK  # the flush covered both
        handles[0].pwrite(b"c" * BLOCK, 0)
        handles[0].flush()
        assert ledger_row(two_workers)[0] == 8 * MiB + 2 * BLOCK
    finally:
        for h in handles:
            h.shutdown()


def test_requests_of_one_connection_are_merged_in_its_worker(two_workers):
    h = connect(two_workers, "disk")
    try:
        with two_workers.paused():  # all 256 wait in the socket: merging does not depend on timing
            for n in range(256):
                h.aio_pwrite(b"s" * BLOCK, n * BLOCK)
        while h.aio_in_flight() > 0:
            h.poll(-1)
    finally:
        h.shutdown()
    samples = scrape(two_workers.metrics_url)
    assert value(samples, "nbdserver_requests_total", export="disk", op="write") == 256
    assert value(samples, "nbdserver_writes_merged_total", export="disk") > 0


def test_max_connections_counts_the_connections_of_every_worker(start_server, image):
    server = start_server(image, "--processes", "2", "--max-connections", "3")
    handles = [connect(server) for _ in range(3)]
    try:
        refused = nbd.NBD()
        with pytest.raises(nbd.Error):
            refused.connect_uri(server.uri())
        assert value(scrape(server.metrics_url), "nbdserver_connections_turned_away_total", reason="max_connections")
        assert handles[2].pread(BLOCK, 0) == bytes(BLOCK)
    finally:
        for h in handles:
            h.shutdown()


def test_a_worker_that_dies_is_replaced_and_its_connections_taken_over(two_workers):
    handles = [connect(two_workers, "disk") for _ in range(2)]
    assert served_by(two_workers, 2) == {"worker 0", "worker 1"}
    for h in handles:
        h.pwrite(b"d" * BLOCK, 0)
        h.flush()
    before = value(scrape(two_workers.metrics_url), "nbdserver_requests_total", export="disk", op="write")
    first, second = two_workers.worker_pids()
    os.kill(first, signal.SIGKILL)
    assert two_workers.logged("worker 0 started again"), two_workers.log_text()
    assert two_workers.logged("took over 1 connection(s) of its predecessor"), two_workers.log_text()
    for h in handles:  # the dead worker's client too: it saw a pause
        assert h.pread(BLOCK, 0) == b"d" * BLOCK
        h.pwrite(b"e" * BLOCK, BLOCK)
    fresh = [connect(two_workers, "disk") for _ in range(2)]
    for h in fresh:
        assert h.pread(2 * BLOCK, 0) == b"d" * BLOCK + b"e" * BLOCK
    new_first, still_second = two_workers.worker_pids()
    assert new_first != first and still_second == second and running(new_first)
    samples = scrape(two_workers.metrics_url)
    assert value(samples, "nbdserver_recoveries_total") == 1
    assert value(samples, "nbdserver_recovered_connections_total", outcome="resumed") == 1
    assert value(samples, "nbdserver_recovered_connections_total", outcome="closed") == 0
    assert 0 < value(samples, "nbdserver_recovery_pause_seconds") < 30
    # The dead worker's counts stay in the sums: counters never go back.
    after = value(samples, "nbdserver_requests_total", export="disk", op="write")
    assert after >= before == 2
    for h in [*handles, *fresh]:
        h.shutdown()


def test_an_idle_connection_rides_through_kills_in_quick_succession(two_workers):
    """Kills one after another, each as soon as the last replacement took over: an idle connection
    (nothing to take again, nothing written) is taken over every time, never given up on."""
    h = connect(two_workers, "disk")
    h.pwrite(b"i" * BLOCK, 0)
    (serving,) = served_by(two_workers, 1)  # the log is read by another thread: wait for the line
    index = int(serving.split()[1])
    for kill in range(1, 6):
        os.kill(two_workers.worker_pids()[index], signal.SIGKILL)
        assert two_workers.logged("took over 1 connection(s)", count=kill, timeout=30), two_workers.log_text()
    assert h.pread(BLOCK, 0) == b"i" * BLOCK
    assert value(scrape(two_workers.metrics_url), "nbdserver_recovered_connections_total", outcome="closed") == 0
    h.shutdown()


def test_a_replacement_that_died_on_what_it_took_again_counts_a_strike():
    """Three strikes close a connection (a request that kills every worker that carries it out
    again): a strike is a replacement that took requests again and wrote nothing past what it sent
    again before it died."""
    from nbdserver.process.workers import _Held

    held = _Held(socket.socket(), written=1000, requests=2, resent=50)
    try:
        assert held.stuck(1050)  # the replies it sent again, and not one more byte
        assert not held.stuck(1051)  # it answered something
        assert not held.stuck(None)  # the client is gone: nothing to tell
        held.requests = 0
        assert not held.stuck(1000)  # an idle connection: it had nothing to carry out again
        held.written = -1
        assert not held.stuck(0)  # never taken over before
    finally:
        held.sock.close()


def test_a_worker_that_stops_answering_is_killed_and_replaced(start_server, image):
    """Its event loop stuck (here: SIGSTOP), a worker serves no one; the primary's pings find it."""
    server = start_server(image, "--processes", "2", "--worker-timeout", "2")
    handles = [connect(server) for _ in range(2)]
    assert served_by(server, 2) == {"worker 0", "worker 1"}
    deadline = time.monotonic() + 3  # busy or idle, a worker that answers is left alone
    while time.monotonic() < deadline:
        for h in handles:
            h.pwrite(b"w" * BLOCK, 0)
        time.sleep(0.01)
    assert "has not answered" not in server.log_text()
    first, second = server.worker_pids()
    first_connected = next(line for line in server.log if ": connected" in line)
    survivor = handles[1] if "worker 0" in first_connected else handles[0]
    os.kill(first, signal.SIGSTOP)
    try:
        assert server.logged(f"worker 0 (pid {first}) has not answered for"), server.log_text()
        assert server.logged("worker 0 started again"), server.log_text()
    finally:
        if running(first):
            os.kill(first, signal.SIGCONT)
    assert not running(first)
    new_first, still_second = server.worker_pids()
    assert new_first != first and still_second == second
    assert survivor.pread(BLOCK, 0) == b"w" * BLOCK
    served_by_first = len(re.findall(r"worker 0: \S+: connected", server.log_text()))
    fresh = [connect(server) for _ in range(2)]  # the new worker 0 has the fewest: it takes one
    assert wait_for(lambda: len(re.findall(r"worker 0: \S+: connected", server.log_text())) > served_by_first)
    for h in fresh:
        assert h.pread(BLOCK, 0) == b"w" * BLOCK
    for h in [survivor, *fresh]:
        h.shutdown()
    assert "worker 1 (pid" not in server.log_text()


def test_stop_ends_every_worker(start_server, image):
    server = start_server(image, "--processes", "3")
    h = connect(server)
    h.pwrite(b"x" * BLOCK, 0)
    pids = server.worker_pids()
    assert len(pids) == 3 and all(running(p) for p in pids)
    assert server.stop() == 0
    assert wait_for(lambda: not any(running(p) for p in pids))
    assert "exited with status" not in server.log_text()  # none died: each was asked to stop
    with open(image, "rb") as f:
        assert f.read(BLOCK) == b"x" * BLOCK


def test_workers_leave_when_the_primary_is_killed(start_server, image):
    server = start_server(image, "--processes", "2")
    pids = server.worker_pids()
    h = connect(server)
    h.pwrite(b"k" * BLOCK, 0)
    server.proc.kill()
    server.proc.wait()
    assert wait_for(lambda: not any(running(p) for p in pids), timeout=30)  # they finish and exit on their own
    with open(image, "rb") as f:
        assert f.read(BLOCK) == b"k" * BLOCK


def test_reload_reaches_every_worker(start_server, tmp_path):
    one, two = make_image(tmp_path / "one.img", 4 * MiB), make_image(tmp_path / "two.img", 8 * MiB)
    config = tmp_path / "nbdserver.toml"
    config.write_text(f'[[export]]\nname = "one"\npath = "{one}"\n')
    server = start_server("--config", config, "--processes", "2")
    config.write_text(config.read_text() + f'[[export]]\nname = "two"\npath = "{two}"\n')
    server.proc.send_signal(signal.SIGHUP)
    assert server.logged("reloaded:"), server.log_text()
    handles = [connect(server, "two") for _ in range(2)]  # one in each worker
    try:
        assert served_by(server, 2) == {"worker 0", "worker 1"}
        assert [h.get_size() for h in handles] == [8 * MiB, 8 * MiB]
    finally:
        for h in handles:
            h.shutdown()


@pytest.mark.parametrize("processes", ["0", "-1", "many"])
def test_processes_must_be_auto_or_at_least_one(start_server, image, processes):
    server = start_server(image, "--processes", processes, wait=False)
    assert server.proc.wait(30) == 2
    assert "processes" in server.log_text() and "auto or" in server.log_text(), server.log_text()


def test_the_export_budget_holds_across_the_workers(start_server, image):
    """40 connections each stall a 32 MiB WRITE: together the workers hold no more than the export's
    in-flight budget (each its share of it) and one request over it each.  (The buffers are carved
    from the workers' arenas, whose pages are used only as payload bytes arrive: what the budget
    bounds is counted by the server, and the memory stays that of the interpreters.)"""
    server = start_server(image, "--processes", "2", "--max-export-inflight", "128M")
    pids = server.worker_pids()
    before = sum(memory(pid)["VmRSS"] for pid in pids)
    clients = [negotiate(server, "go") for _ in range(40)]  # 40 x 32 MiB would be 1.25 GiB
    try:
        for client in clients:
            client.send(client.request_bytes(Cmd.WRITE, 0, 32 * MiB) + b"x")

        def held() -> float:
            return value(scrape(server.metrics_url), "nbdserver_inflight_bytes", export="") / MiB

        assert wait_for(lambda: held() >= 128)  # both workers took their share
        time.sleep(2)  # and no more comes
        print(f"40 stalled 32 MiB WRITEs over 2 workers: {held():.0f} MiB in flight")
        assert held() <= 128 + 2 * 32  # the budget, and one request over each worker's share
        grown = sum(memory(pid)["VmHWM"] for pid in pids) - before
        assert grown < 128 + 2 * 32 + 32  # the budget, one request over each worker's share, the interpreters
    finally:
        for client in clients:
            client.close()
    assert_serves(server)


@pytest.mark.parametrize("cpus", ["0", "0,1"])
def test_auto_starts_a_worker_per_cpu_and_one_on_one(start_server, image, cpus):
    """One CPU too: a worker under the primary, so that a crash of the serving code costs a pause."""
    if len(os.sched_getaffinity(0)) < len(cpus.split(",")):
        pytest.skip(f"fewer than {len(cpus.split(','))} CPUs here")
    server = start_server(image, "--processes", "auto", wrapper=["taskset", "-c", cpus])
    assert len(server.worker_pids()) == len(cpus.split(","))
    h = connect(server)
    h.pwrite(b"a" * BLOCK, 0)
    assert h.pread(BLOCK, 0) == b"a" * BLOCK
    h.shutdown()
