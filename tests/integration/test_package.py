"""The Debian package, built from a clean checkout with dpkg-buildpackage as Debian builds it: what
it installs, what lintian says of it, and that what it holds serves (unpacked, not installed:
installing and upgrading it under a running service is the systemd guest's)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbd
import pytest

from tests.conftest import ServerProcess, clean_checkout, make_image

pytestmark = pytest.mark.own_build  # the build under test is not used: one pass

# Debian's tools, on Debian's python3 (not whatever python3 comes first on PATH).
DEBIAN_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
CONTENTS = [
    "./usr/bin/nbdserver",
    "./usr/lib/python3/dist-packages/nbdserver/__init__.py",
    "./usr/lib/python3/dist-packages/nbdserver/serving/snapshots.py",
    "./lib/systemd/system/nbdserver.service",
    "./lib/systemd/system/nbdserver.socket",
    "./lib/systemd/system/nbdserver-metrics.socket",
    "./usr/lib/sysusers.d/nbdserver.conf",
    "./etc/nbdserver/nbdserver.toml",
    "./usr/share/man/man8/nbdserver.8.gz",
    "./usr/share/man/man5/nbdserver.toml.5.gz",
    "./usr/share/doc/nbdserver/copyright",
    "./usr/share/doc/nbdserver/examples/nbdserver.toml.example",
]
ROOT = Path(__file__).resolve().parents[2]
LINTIAN_KEPT: list[str] = []  # warnings accepted, each with why (none)


def readme_lines(marker: str) -> list[str]:
    """The lines of the README's code block that follows ``<!-- marker``."""
    text = (ROOT / "README.md").read_text()
    match = re.search(rf"<!-- {marker}\b.*?\n```sh\n(.*?)\n```", text, re.DOTALL)
    assert match, f"the README has no {marker} block"
    return match.group(1).splitlines()


def build_deb(work: Path, version: str = "") -> Path:
    """The package built from a clean checkout in ``work`` by the README's build line
    (``version``: as the changelog's newest entry, else the changelog's)."""
    tree = clean_checkout(work / "nbdserver")
    if version:
        changelog = tree / "debian" / "changelog"
        first, rest = changelog.read_text().split("\n", 1)
        changelog.write_text(re.sub(r"\(.*?\)", f"({version})", first, count=1) + "\n" + rest)
    build = readme_lines("package-build")[-1]
    built = subprocess.run(["sh", "-c", build], cwd=tree, capture_output=True, text=True, timeout=900)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    [deb] = work.glob("nbdserver_*_all.deb")
    return deb


def can_build() -> bool:
    return shutil.which("dpkg-buildpackage", path=DEBIAN_PATH) is not None and Path("/usr/bin/dh_python3").exists()


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> Path:
    if not can_build():
        pytest.skip("debhelper and dh-python are not installed (tests/bootstrap installs them)")
    return build_deb(tmp_path_factory.mktemp("deb"))


def test_the_readme_builds_it_with_what_the_bootstrap_installs():
    """The README's build block: Debian's build tools (which tests/bootstrap installs, so that CI
    runs the rest of the block as it stands), then dpkg-buildpackage on Debian's python3."""
    install, build = readme_lines("package-build")
    assert install.startswith("apt-get install -y "), install
    bootstrap = (ROOT / "tests" / "bootstrap").read_text().split()
    assert [name for name in install.split()[3:] if name not in bootstrap] == []
    assert build == f"PATH={DEBIAN_PATH} dpkg-buildpackage -us -uc -b"


def dpkg_deb(*args: str | os.PathLike[str]) -> str:
    return subprocess.run(["dpkg-deb", *map(str, args)], capture_output=True, text=True, check=True).stdout


def test_it_holds_the_program_the_units_the_user_the_configuration_and_the_manuals(package):
    listed = {line.split()[-1] for line in dpkg_deb("-c", package).splitlines()}
    assert [path for path in CONTENTS if path not in listed] == []
    assert not [path for path in listed if "/opt/" in path or ".venv" in path or "__pycache__" in path]
    fields = dpkg_deb("-f", package, "Depends", "Architecture")
    assert "python3-uvloop" in fields and "python3-prometheus-client" in fields and "Architecture: all" in fields


def test_its_configuration_is_a_conffile_that_exports_nothing(package, tmp_path):
    control = tmp_path / "control"
    dpkg_deb("-e", package, control)
    assert (control / "conffiles").read_text().split() == ["/etc/nbdserver/nbdserver.toml"]
    root = tmp_path / "root"
    dpkg_deb("-x", package, root)
    conf = root / "etc" / "nbdserver" / "nbdserver.toml"
    assert "\n[[export]]" not in conf.read_text()
    unit = (root / "lib" / "systemd" / "system" / "nbdserver.service").read_text()
    assert "ExecStart=/usr/bin/nbdserver serve --config /etc/nbdserver/nbdserver.toml\n" in unit
    assert "/opt/" not in unit
    postinst, postrm = (control / "postinst").read_text(), (control / "postrm").read_text()
    assert "_dh_action=restart" in postinst  # an upgrade restarts it: the clients ride through the fd store
    assert "systemd-sysusers" in postinst.split("deb-systemd-invoke")[0]  # the user exists before it starts
    assert "rm -rf /var/lib/nbdserver /etc/nbdserver" in postrm and "userdel nbdserver" in postrm
    prerm = (control / "prerm").read_text()
    # A removal stops the sockets (enabled by the admin, if at all) before the service.
    assert prerm.index("stop nbdserver.socket nbdserver-metrics.socket") < prerm.index("stop 'nbdserver.service'")


def test_lintian_finds_no_error_and_no_warning_but_those_kept(package):
    if shutil.which("lintian", path=DEBIAN_PATH) is None:
        pytest.skip("lintian is not installed")
    found = subprocess.run(
        ["lintian", "--fail-on", "error", str(package)],
        env={**os.environ, "PATH": DEBIAN_PATH},
        capture_output=True,
        text=True,
        timeout=600,
    )
    tags = [line for line in found.stdout.splitlines() if line[:2] in ("E:", "W:")]
    assert found.returncode == 0, found.stdout + found.stderr
    assert [t for t in tags if not any(kept in t for kept in LINTIAN_KEPT)] == []


def test_what_it_holds_serves_from_the_packaged_configuration(package, tmp_path):
    """Unpacked, on this interpreter with the test environment's dependencies: check-config takes
    the packaged file as it is, and the server serves an export added to it."""
    root = tmp_path / "root"
    dpkg_deb("-x", package, root)
    packaged = root / "usr" / "lib" / "python3" / "dist-packages"
    env = {"PYTHONPATH": str(packaged)}
    version = subprocess.run(
        [sys.executable, "-P", "-m", "nbdserver", "--version"],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
    )
    assert version.returncode == 0 and f"from {packaged / 'nbdserver'}" in version.stdout, version.stdout
    conf = root / "etc" / "nbdserver" / "nbdserver.toml"
    checked = subprocess.run(
        [sys.executable, "-P", "-m", "nbdserver", "check-config", str(conf)],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    image = make_image(tmp_path / "disk.img", 1 << 20)
    text = conf.read_text().replace('"/run/nbdserver/control"', f'"{tmp_path}/ctl"')
    text = text.replace('"/var/lib/nbdserver"', f'"{tmp_path}/state"').replace("127.0.0.1:10810", "127.0.0.1:0")
    conf.write_text(text.replace('listen = ["127.0.0.1:10809"]', 'listen = ["127.0.0.1:0"]'))
    conf.write_text(conf.read_text() + f'\n[[export]]\nname = "disk"\npath = "{image}"\n')
    server = ServerProcess(
        ["--config", str(conf)], env=env, program=[sys.executable, "-P", "-m", "nbdserver"]
    ).wait_ready()
    try:
        assert any(f"from {packaged / 'nbdserver'}" in line for line in server.log)
        h = nbd.NBD()
        h.connect_uri(server.uri("disk"))
        h.pwrite(b"p" * 4096, 0)
        assert h.pread(4096, 0) == b"p" * 4096
        h.shutdown()
    finally:
        server.stop()
