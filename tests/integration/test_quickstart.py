"""The README's first command, as a new user runs it: as root, with no ``sudo`` to call."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ServerProcess, clean_checkout

pytestmark = pytest.mark.own_build  # the build under test is not used: one pass

ROOT = Path(__file__).resolve().parents[2]
SERVE = " && .venv/bin/nbdserver serve"


def first_command() -> str:
    """The line under ``# 1.`` in the README's opening code block."""
    match = re.search(r"^# 1\..*\n(.+)$", (ROOT / "README.md").read_text(), re.MULTILINE)
    assert match, "the README has no '# 1.' command"
    return match.group(1)


def test_the_first_command_serves_as_a_new_user_sees_it():
    command = first_command()
    assert SERVE in command, command
    serve = command.split(SERVE, 1)[1]
    assert serve.split() == ["--size", "1G", "disk.img"], "the test below runs this serve part: keep them in step"


@pytest.mark.slow
def test_the_first_command_installs_and_serves_as_root_without_sudo(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("runs the command as root, as a fresh machine's root shell would")
    install = first_command().split(SERVE, 1)[0]
    # A sudo that must not be called shadows any real one.
    trap = tmp_path / "bin"
    trap.mkdir()
    called = tmp_path / "sudo-called"
    (trap / "sudo").write_text(f'#!/bin/sh\necho "$@" >> {called}\nexit 1\n')
    (trap / "sudo").chmod(0o755)
    tree = clean_checkout(tmp_path / "tree")
    env = {**os.environ, "PATH": f"{trap}:{os.environ['PATH']}", "DEBIAN_FRONTEND": "noninteractive"}
    env.pop("VIRTUAL_ENV", None)
    result = subprocess.run(["bash", "-c", install], cwd=tree, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert not called.exists(), "sudo was called: " + called.read_text()

    # The serve part, as written, on ports of its own so that it does not meet other servers.
    own_ports = ["--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0"]
    server = ServerProcess(["--size", "1G", "disk.img", *own_ports], program=[".venv/bin/nbdserver"], cwd=tree)
    try:
        server.wait_ready()
        assert "(mypyc)" in server.log[0], server.log[0]  # a compiler is at hand here: the compiled build
        info = subprocess.run(["nbdinfo", "--size", server.uri()], capture_output=True, text=True, timeout=60)
        assert info.returncode == 0 and int(info.stdout) == 1 << 30, info.stderr
        image = tree / "disk.img"
        assert image.stat().st_size == 1 << 30 and image.stat().st_blocks == 0  # sparse, nothing written
    finally:
        code = server.stop()
    assert code == 0, server.log_text()
