"""The code base stays ruff clean (lint and format), and the server's package mypy clean: the
compiled build is made by mypyc from the same types, so a type error is a build that fails."""

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.own_build  # the build under test is not used: one pass

ROOT = Path(__file__).resolve().parent.parent


def tool(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", name, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_ruff_check_is_clean():
    result = tool("ruff", "check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format_is_clean():
    result = tool("ruff", "format", "--check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_is_clean():
    result = tool("mypy", "nbdserver")
    assert result.returncode == 0, result.stdout + result.stderr
