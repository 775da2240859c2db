"""/metrics, the Grafana dashboard's queries through a real Prometheus, and ``nbdserver top``."""

from __future__ import annotations

import json
import math
import platform
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import nbd
import pytest

from tests.conftest import EXPECTED_BUILD, MiB, free_port, make_image, needs_ipv6_loopback, scrape, value, wait_for
from tests.integration.rawclient import Cmd, RawClient

pytestmark = pytest.mark.bindings  # libnbd's Python bindings: run again by tests/in_current

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "nbdserver.json"
RULES = ROOT / "deploy" / "prometheus"


@pytest.fixture
def disk(start_server, tmp_path: Path):
    """A server with one export named "disk" (an empty name would read as a missing label in PromQL)."""
    return start_server(make_image(tmp_path / "disk.img", 256 * MiB), "--name", "disk")


def test_endpoint_answers_get_and_head_only(disk):
    samples = scrape(disk.metrics_url)
    assert value(samples, "nbdserver_export_size_bytes", export="disk") == 256 * MiB
    served = {"export": "disk", "engine": disk_engine(disk), "backing": str(disk_path(disk))}
    assert value(samples, "nbdserver_export_info", **served) == 1
    version = __import__("nbdserver").__version__
    python = f"{platform.python_implementation()} {platform.python_version()}"
    assert value(samples, "nbdserver_build_info", version=version, build=EXPECTED_BUILD, python=python) == 1
    base = disk.metrics_url.removesuffix("/metrics")
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(base + "/nothing", timeout=10)
    assert missing.value.code == 404
    with pytest.raises(urllib.error.HTTPError) as posted:
        urllib.request.urlopen(urllib.request.Request(disk.metrics_url, data=b"x", method="POST"), timeout=10)
    assert posted.value.code == 405
    head = urllib.request.urlopen(urllib.request.Request(disk.metrics_url, method="HEAD"), timeout=10)
    assert head.status == 200 and head.read() == b"" and int(head.headers["Content-Length"]) > 1000
    with socket.create_connection(("127.0.0.1", int(base.rsplit(":", 1)[1]))) as silent:
        silent.settimeout(10)
        assert silent.recv(1) == b""  # a client that sends nothing is dropped after a few seconds
    assert scrape(disk.metrics_url)  # and the endpoint still serves


def test_no_metrics_serves_none(start_server, image):
    server = start_server(image, "--no-metrics")
    assert server.metrics_url == ""
    assert not any("metrics on" in line for line in server.log)


@pytest.mark.clients
def test_counters_count_what_clients_did(disk):
    h = nbd.NBD()
    h.set_strict_mode(0)
    h.connect_uri(disk.uri("disk"))
    try:
        for i in range(10):  # one at a time: nothing to merge
            h.pwrite(b"w" * 4096, i * MiB)
        for i in range(5):
            h.pread(8192, i * MiB)
        h.flush()
        h.flush()
        h.trim(MiB, 32 * MiB)
        with pytest.raises(nbd.Error):
            h.pread(4096, 256 * MiB)  # beyond the end: refused before any I/O
        samples = scrape(disk.metrics_url)
        assert value(samples, "nbdserver_connections", export="disk") == 1
    finally:
        h.shutdown()
    with RawClient(disk.host, disk.port) as raw:
        raw.handshake().go("disk")
        raw.send(raw.request_bytes(Cmd.READ, 0, 512, magic=0x12345678))
        assert raw.wait_closed()
    assert wait_for(lambda: value(scrape(disk.metrics_url), "nbdserver_connections", export="disk") == 0)
    samples = scrape(disk.metrics_url)
    expected = {
        "nbdserver_writes_completed_total": 10,
        "nbdserver_writes_merged_total": 0,
        "nbdserver_written_bytes_total": 10 * 4096,
        "nbdserver_reads_completed_total": 5,
        "nbdserver_read_bytes_total": 5 * 8192,
        "nbdserver_flush_requests_total": 2,
        "nbdserver_discards_completed_total": 1,
        "nbdserver_discarded_bytes_total": MiB,
        "nbdserver_io_now": 0,
        "nbdserver_inflight_bytes": 0,
    }
    for name, count in expected.items():
        assert value(samples, name, export="disk") == count, name
    assert value(samples, "nbdserver_requests_total", export="disk", op="write") == 10
    assert value(samples, "nbdserver_requests_total", export="disk", op="read") == 5
    assert value(samples, "nbdserver_request_duration_seconds_count", export="disk", op="write") == 10
    assert value(samples, "nbdserver_submission_bytes_count", export="disk", op="read") == 5
    assert value(samples, "nbdserver_submission_bytes_bucket", export="disk", op="read", le="8192.0") == 5
    assert value(samples, "nbdserver_submission_bytes_bucket", export="disk", op="read", le="4096.0") == 0
    assert value(samples, "nbdserver_refused_requests_total", export="disk", error="EINVAL") == 1
    assert value(samples, "nbdserver_protocol_errors_total", kind="bad_request_magic") == 1
    assert value(samples, "nbdserver_protocol_errors_total", kind="oversized_write") == 0
    assert value(samples, "nbdserver_io_errors_total", export="disk", errno="EIO") == 0
    assert value(samples, "nbdserver_connections_total") == 2
    busy = value(samples, "nbdserver_io_time_seconds_total", export="disk")
    spent = sum(value(samples, f"nbdserver_{k}_time_seconds_total", export="disk") for k in ("read", "write"))
    assert 0 < busy and 0 < spent <= value(samples, "nbdserver_io_time_weighted_seconds_total", export="disk") + 1e-6


# A real Prometheus --------------------------------------------------------------------------------


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator:
    """Start Prometheus on loopback; the test gives it targets by calling the returned function."""
    if shutil.which("prometheus") is None:
        pytest.skip("the prometheus package is not installed")
    procs: list[subprocess.Popen] = []

    def start(target: str) -> str:
        port = free_port()
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            f"scrape_configs: [{{job_name: nbdserver, static_configs: [{{targets: ['{target}']}}]}}]\n"
        )
        procs.append(
            subprocess.Popen(
                [
                    "prometheus",
                    f"--config.file={config}",
                    f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--log.level=warn",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        url = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            try:
                return urllib.request.urlopen(url + "/-/ready", timeout=2).status == 200
            except OSError:
                return False

        assert wait_for(ready, timeout=30), "prometheus did not start"
        return url

    yield start
    for proc in procs:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def query(prometheus_url: str, expr: str) -> list[dict]:
    url = f"{prometheus_url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as response:
        reply = json.load(response)
    assert reply["status"] == "success", reply
    return reply["data"]["result"]


def panel_queries() -> list[tuple[str, str, str]]:
    """(panel title, legend, expression) of every query of the dashboard, for export "disk"."""
    dashboard = json.loads(DASHBOARD.read_text())
    assert [v["name"] for v in dashboard["templating"]["list"]] == ["export"]
    return [
        (
            panel["title"],
            target["legendFormat"],
            target["expr"].replace("$export", "disk").replace("$__rate_interval", "5s"),
        )
        for panel in dashboard["panels"]
        for target in panel["targets"]
    ]


def start_load(server, tmp_path: Path, seconds: int) -> subprocess.Popen:
    """4k sequential writes at QD32 (they merge) and 64k sequential reads at QD8, on export "disk"."""
    return subprocess.Popen(
        [
            "fio",
            "--thread",
            "--ioengine=nbd",
            f"--uri={server.uri('disk')}",
            "--time_based",
            f"--runtime={seconds}",
            "--name=writes",
            "--rw=write",
            "--bs=4k",
            "--iodepth=32",
            "--size=64M",
            "--name=reads",
            "--rw=read",
            "--bs=64k",
            "--iodepth=8",
            "--offset=128M",
            "--size=64M",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=tmp_path,
    )


def load_arrived(server) -> bool:
    """Have both of start_load's jobs reached the server?"""
    samples = scrape(server.metrics_url)
    return all(value(samples, f"nbdserver_{op}_completed_total", export="disk") > 0 for op in ("reads", "writes"))


def test_every_dashboard_query_has_data_in_prometheus(disk, prometheus, tmp_path):
    prom = prometheus(disk.metrics_url.removeprefix("http://").removesuffix("/metrics"))
    assert wait_for(lambda: query(prom, 'up{job="nbdserver"} == 1'), timeout=15), "not scraped"
    load = start_load(disk, tmp_path, seconds=30)
    try:
        with RawClient(disk.host, disk.port) as raw:  # a protocol error and a refused request, for the error panel
            raw.handshake().go("disk")
            raw.request(Cmd.READ, 1 << 40, 512)
            assert raw.read_reply().error
            raw.send(raw.request_bytes(Cmd.READ, 0, 512, magic=0))
            assert raw.wait_closed()
        assert wait_for(lambda: load_arrived(disk)), "fio's load never reached the server"
        time.sleep(8)  # several scrapes under load
        assert [r["metric"]["export"] for r in query(prom, "nbdserver_export_size_bytes")] == ["disk"]  # the variable
        empty = []
        for title, legend, expr in panel_queries():
            result = query(prom, expr)
            values = [float(r["value"][1]) for r in result]
            print(f"{title} / {legend}: {[round(v, 3) for v in values]}")
            if not result or not any(math.isfinite(v) for v in values):
                empty.append(f"{title}: {expr}")
        assert not empty, "queries without data:\n" + "\n".join(empty)
        merged = query(
            prom,
            'rate(nbdserver_writes_merged_total{export="disk"}[5s]) '
            '/ rate(nbdserver_writes_completed_total{export="disk"}[5s])',
        )
        assert float(merged[0]["value"][1]) >= 1, "4k sequential writes at QD32 should merge 2 or more at a time"
        depth = float(query(prom, 'rate(nbdserver_io_time_weighted_seconds_total{export="disk"}[5s])')[0]["value"][1])
        assert 1 <= depth <= 40, f"average queue depth {depth} for QD32 + QD8"
        assert float(query(prom, 'max_over_time(nbdserver_io_now{export="disk"}[10s])')[0]["value"][1]) <= 40
        utilisation = float(query(prom, 'rate(nbdserver_io_time_seconds_total{export="disk"}[5s])')[0]["value"][1])
        # Busy a good part of the time, never more than all of it: how much depends on how fast the
        # server answers what fio sends (its reads are of a region never written: holes, no I/O).
        assert 0.25 <= utilisation <= 1.0001
    finally:
        load.kill()
        load.wait()


def test_alert_rules_and_scrape_config_pass_promtool():
    if shutil.which("promtool") is None:
        pytest.skip("the prometheus package is not installed")
    for args in (
        ["check", "rules", "nbdserver.rules.yml"],
        ["check", "config", "prometheus.yml"],
        ["test", "rules", "nbdserver.rules.test.yml"],
    ):
        result = subprocess.run(["promtool", *args], cwd=RULES, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr


# nbdserver top ------------------------------------------------------------------------------------


def top(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nbdserver", "top", *args], capture_output=True, text=True, timeout=30)


def disk_path(server) -> Path:
    return Path(next(a for a in server.args if a.endswith("disk.img")))


def disk_engine(server) -> str:
    """The engine the server's log names for its export ("engine io_uring" or "engine threads")."""
    line = next(line for line in list(server.log) if ", engine " in line)
    return line.split(", engine ")[1].split()[0]


def test_top_once_shows_the_load(disk, tmp_path):
    load = start_load(disk, tmp_path, seconds=30)
    try:
        assert wait_for(lambda: load_arrived(disk)), "fio's load never reached the server"
        result = top("--once", "--interval", "2", disk.metrics_url)
    finally:
        load.kill()
        load.wait()
    assert result.returncode == 0, result.stderr
    header, row = result.stdout.splitlines()
    columns = header.split()
    assert columns == [
        "Export",
        "Engine",
        "r/s",
        "w/s",
        "rMB/s",
        "wMB/s",
        "rrqm/s",
        "wrqm/s",
        "%rrqm",
        "%wrqm",
        "r_await",
        "w_await",
        "aqu-sz",
        "%util",
    ]
    figures = dict(zip(columns[2:], map(float, row.split()[2:]), strict=True))
    assert row.split()[:2] == ["disk", disk_engine(disk)]
    assert figures["w/s"] > 0 and figures["r/s"] > 0 and figures["wMB/s"] > 1 and figures["rMB/s"] > 1
    assert figures["%wrqm"] >= 50, figures  # 4k sequential writes at QD32 merge
    assert 1 <= figures["aqu-sz"] <= 40 and 25 <= figures["%util"] <= 100  # as in the dashboard's test
    assert figures["w_await"] > 0 and figures["r_await"] > 0


def test_top_of_an_idle_server_shows_zeroes(disk):
    result = top("--once", "--interval", "0.5", disk.metrics_url)
    assert result.returncode == 0, result.stderr
    assert [float(x) for x in result.stdout.splitlines()[1].split()[2:]] == [0.0] * 12  # after Export, Engine


@pytest.mark.parametrize("host", ["127.0.0.1", pytest.param("[::1]", marks=needs_ipv6_loopback)])
def test_top_takes_the_address_as_serve_metrics_takes_it(start_server, image, host):
    server = start_server(image, "--name", "disk", "--metrics", f"{host}:0")
    address = server.metrics_url.removeprefix("http://").removesuffix("/metrics")
    assert address.startswith(f"{host}:"), server.metrics_url
    result = top("--once", "--interval", "0.2", address)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[1].split()[0] == "disk"


@pytest.mark.parametrize("address", ["unix:/run/nbd.sock", "localhost", "[::1]"])
def test_top_refuses_what_is_no_metrics_address(address):
    result = top("--once", address)
    assert result.returncode == 2
    assert f"bad metrics address {address!r}" in result.stderr


def test_top_of_no_server_fails_clearly():
    result = top("--once", f"http://127.0.0.1:{free_port()}/metrics")
    assert result.returncode == 1
    assert "cannot read" in result.stderr and "refused" in result.stderr.lower()
