"""The soak runner itself works (a few seconds of it; real soaks run on demand, for hours)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_soak_runner_reports_flat_rss_and_no_errors(tmp_path):
    result = subprocess.run(
        [sys.executable, ROOT / "fs" / "bench" / "soak.py", "--duration", "6", "--interval", "2", "--dir", tmp_path],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) >= 3
    assert all(float(row.split("|")[3]) > 0 for row in rows), rows  # writes flowed in every interval
    assert "flat" in result.stdout and "errors: 0 " in result.stdout
