"""The build: compiled with mypyc where a compiler is at hand, pure Python anywhere else."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import ServerProcess, clean_checkout, make_image

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "build_support"))
from nbdserver_build import compile_wanted  # noqa: E402  (the build backend's, not the package's)

pytestmark = pytest.mark.own_build  # the build under test is not used: one pass


@pytest.mark.parametrize(
    ("env", "wanted"),
    [
        ({"NBDSERVER_COMPILE": "0"}, False),
        ({"NBDSERVER_COMPILE": "1", "CC": "no-such-compiler"}, True),  # asked for: the build fails loudly
        ({"CC": "no-such-compiler"}, False),  # nothing to compile with: pure, and mypy is not fetched
        ({"CC": "/bin/false"}, True),  # a compiler that fails: tried, then pure (below)
    ],
)
def test_a_compiled_build_is_tried_where_a_compiler_is_found(monkeypatch, env, wanted):
    monkeypatch.delenv("NBDSERVER_COMPILE", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert compile_wanted() is wanted


@pytest.mark.slow
def test_a_compiler_that_fails_gives_the_pure_build_which_serves(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "NBDSERVER_COMPILE"}
    env["CC"] = "/bin/false"
    wheels = tmp_path / "wheels"
    tree = clean_checkout(tmp_path / "tree")
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation", "-w", str(wheels)]
    built = subprocess.run(
        [*pip_wheel, str(tree)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    (wheel,) = wheels.glob("nbdserver-*.whl")
    assert "compiling failed" in built.stderr + built.stdout  # it was tried
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        archive.extractall(site)
    assert "nbdserver/serving/connection.py" in names and not [n for n in names if n.endswith(".so")]
    program = [sys.executable, "-m", "nbdserver"]
    run_env = {"PYTHONPATH": str(site)}
    version = subprocess.run(  # away from the checkout, whose package ``-m`` would find first
        [*program, "--version"], capture_output=True, text=True, env={**os.environ, **run_env}, cwd=tmp_path
    )
    assert "(pure)" in version.stdout, version.stdout + version.stderr
    image = make_image(tmp_path / "disk.img")
    server = ServerProcess(
        [str(image), "--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0"], env=run_env, program=program, cwd=tmp_path
    )
    try:
        server.wait_ready()
        assert "(pure)" in server.log[0]
        info = subprocess.run(["nbdinfo", "--size", server.uri()], capture_output=True, text=True, timeout=60)
        assert int(info.stdout) == image.stat().st_size, info.stderr
    finally:
        assert server.stop() == 0, server.log_text()
