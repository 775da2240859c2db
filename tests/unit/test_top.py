"""The arithmetic of ``nbdserver top``: iostat -x columns from two samples of the counters."""

from __future__ import annotations

import pytest

from nbdserver.metrics.top import COLUMNS, Sample, parse, render, rows

PAGE = """\
# TYPE nbdserver_reads_completed_total counter
nbdserver_reads_completed_total{export="a"} %(reads)s
nbdserver_reads_merged_total{export="a"} %(rmerged)s
nbdserver_read_bytes_total{export="a"} %(rbytes)s
nbdserver_read_time_seconds_total{export="a"} %(rtime)s
nbdserver_writes_completed_total{export="a"} %(writes)s
nbdserver_writes_merged_total{export="a"} %(wmerged)s
nbdserver_written_bytes_total{export="a"} %(wbytes)s
nbdserver_write_time_seconds_total{export="a"} %(wtime)s
nbdserver_io_time_seconds_total{export="a"} %(busy)s
nbdserver_io_time_weighted_seconds_total{export="a"} %(weighted)s
nbdserver_reads_completed_total{export=""} %(default)s
"""
ZERO = dict(
    default=0, reads=0, rmerged=0, rbytes=0, rtime=0, writes=0, wmerged=0, wbytes=0, wtime=0, busy=0, weighted=0
)


def test_columns_over_two_seconds():
    before = parse(PAGE % ZERO, at=100.0)
    after = parse(
        PAGE
        % dict(
            default=7,
            reads=100,
            rmerged=300,
            rbytes=8 * 1024 * 1024,
            rtime=2.0,
            writes=50,
            wmerged=0,
            wbytes=2 * 1024 * 1024,
            wtime=0.5,
            busy=1.5,
            weighted=6.0,
        ),
        at=102.0,
    )
    table = rows(before, after)
    assert set(table) == {"a", ""}
    a = table["a"]
    assert a["r/s"] == 50 and a["w/s"] == 25
    assert a["rMB/s"] == 4 and a["wMB/s"] == 1
    assert a["rrqm/s"] == 150 and a["wrqm/s"] == 0
    assert a["%rrqm"] == 75 and a["%wrqm"] == 0
    assert a["r_await"] == pytest.approx(2000 / 400)  # ms per client request: 100 completed + 300 merged
    assert a["w_await"] == pytest.approx(500 / 50)
    assert a["aqu-sz"] == 3 and a["%util"] == 75
    assert table[""]["r/s"] == 3.5  # the default export, whose name is empty


def test_an_idle_export_shows_zeroes_not_errors():
    sample = parse(PAGE % ZERO, at=1.0)
    later = Sample(2.0, sample.exports)
    assert rows(sample, later)["a"] == dict.fromkeys(COLUMNS, 0.0)


def test_render_lines_up_with_iostat_names():
    text = render({"": dict.fromkeys(COLUMNS, 1.0), "long-export-name": dict.fromkeys(COLUMNS, 12.345)})
    header, default, named = text.splitlines()
    assert header.split() == ["Export", *COLUMNS]
    assert default.split()[0] == '""' and default.split()[1] == "1.00"
    assert named.split()[1:] == ["12.35"] * len(COLUMNS)
    assert len({len(line) for line in text.splitlines()}) == 1
