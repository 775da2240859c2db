#!/usr/bin/env python3
"""The current generation of NBD clients and servers: Debian 13 (trixie) in a chroot.

This machine is Debian 12; its libnbd, QEMU, nbdkit and nbd-server are a generation behind what
users of a newer system run.  This builds (once, from Debian's archive with ``mmdebstrap``) a
Debian 13 root holding libnbd's tools and Python bindings, qemu-utils, nbdkit, nbd-server,
nbd-client and fio, cached in ``$NBDSERVER_CHROOT_CACHE`` (default ``~/.cache/nbdserver-chroot``)
under a hash of its recipe, and runs programs in it.

A program runs with the host's /proc, /dev, /sys and /tmp (and any ``--bind`` directory) bound in
at the same paths, in a private mount namespace: the mounts exist only for as long as a process
inside lives, whatever kills it.  The chroot shares the host's network, so it reaches servers on
127.0.0.1, ::1 and Unix sockets in /tmp.  Each step execs the next, so the program keeps the PID
of the process first started: its CPU time is in /proc/PID and a signal to that PID reaches it.

    fs/chroot/current.py build
    fs/chroot/current.py run -- nbdinfo nbd://127.0.0.1:10809
    fs/chroot/current.py run --bind /srv/images -- nbdkit -f -i 127.0.0.1 file /srv/images/disk.img
    fs/chroot/current.py versions

Root only (mmdebstrap in root mode, mounts).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import debian_root

SUITE = "trixie"
RELEASE = "Debian 13"
# `file`: nbdinfo describes what an export holds with it, as on a system where it is installed.
# The tests that use libnbd's Python bindings run in the root itself with its Python and libnbd
# (tests/in_current), the server beside them; what they need: pytest, uvloop, prometheus-client,
# hypothesis, iproute2 (ss), e2fsprogs and mount (a loop-mounted ext4, a loop device),
# util-linux-extra (fincore), openssl (certificates) and prometheus (the dashboard's queries).
PACKAGES = (
    *("libnbd-bin", "python3-libnbd", "qemu-utils", "nbdkit", "nbd-server", "nbd-client", "fio", "file"),
    *("python3-pytest", "python3-uvloop", "python3-prometheus-client", "python3-hypothesis", "iproute2"),
    *("e2fsprogs", "mount", "util-linux-extra", "openssl", "prometheus"),
)
# Debian's archive as apt on this machine knows it (deb.debian.org), with the suite's updates and security updates.
SOURCES = (
    f"deb http://deb.debian.org/debian {SUITE} main",
    f"deb http://deb.debian.org/debian {SUITE}-updates main",
    f"deb http://deb.debian.org/debian-security {SUITE}-security main",
)
# The first line each tool prints about its version, recorded when the root is built.
TOOLS = {
    "nbdinfo": ("nbdinfo", "--version"),
    "qemu-img": ("qemu-img", "--version"),
    "qemu-nbd": ("qemu-nbd", "--version"),
    "nbdkit": ("nbdkit", "--version"),
    "nbd-server": ("nbd-server", "-V"),
    "fio": ("fio", "--version"),
}
# Bound into every run: Unix sockets, images and job files live there (and in /dev/shm).
SHARED = (Path("/tmp"),)
SYSTEM = (Path("/proc"), Path("/dev"), Path("/sys"))
VERSIONS = "versions.json"

# Runs as `sh -c ENTER sh ROOT N BIND... PROGRAM ARGS...` in a new mount namespace.  `set -e`: a
# mount that fails stops it before anything runs without its files.
ENTER = """\
set -e
root=$1 count=$2
shift 2
for dir in /proc /dev /sys; do mount --rbind "$dir" "$root$dir"; done
while [ "$count" -gt 0 ]; do
    mkdir -p "$root$1"
    mount --rbind "$1" "$root$1"
    shift
    count=$((count - 1))
done
unset PYTHONHOME PYTHONPATH VIRTUAL_ENV LD_LIBRARY_PATH LD_PRELOAD
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
exec chroot "$root" "$@"
"""


def cache_dir() -> Path:
    default = Path.home() / ".cache" / "nbdserver-chroot"
    return Path(os.environ.get("NBDSERVER_CHROOT_CACHE", default))


def recipe() -> str:
    """What the root is made of; a change builds a new one beside the old."""
    text = repr((SUITE, PACKAGES, SOURCES, TOOLS, "minbase", "no recommends"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def command(root: Path, argv: Sequence[str | os.PathLike[str]], binds: Sequence[Path] = ()) -> list[str]:
    """``argv`` run inside ``root``, with the shared directories and ``binds`` in it.

    A bind outside the shared directories leaves an empty directory in the root, its mount point.
    """
    shared = [*SHARED, *(d for d in map(Path.resolve, binds) if not _inside(d, (*SHARED, *SYSTEM)))]
    return [
        *("unshare", "--mount", "--propagation", "private", "--"),
        *("sh", "-c", ENTER, "sh", str(root), str(len(shared)), *map(str, shared)),
        *(os.fspath(arg) for arg in argv),
    ]


def _inside(path: Path, directories: Sequence[Path]) -> bool:
    return any(path == d or d in path.parents for d in directories)


@dataclass(frozen=True)
class Chroot:
    entry: Path  # the cache entry: the root and what was recorded when it was built

    @property
    def root(self) -> Path:
        return self.entry / "root"

    def command(self, argv: Sequence[str | os.PathLike[str]], binds: Sequence[Path] = ()) -> list[str]:
        return command(self.root, argv, binds)

    def run(
        self, argv: Sequence[str | os.PathLike[str]], binds: Sequence[Path] = (), timeout: float = 120, **kwargs: Any
    ) -> subprocess.CompletedProcess[str]:
        """Run to completion, output captured (killed by its PID at the timeout)."""
        return subprocess.run(
            self.command(argv, binds), capture_output=True, text=True, timeout=timeout, check=False, **kwargs
        )

    def versions(self) -> dict[str, dict[str, str]]:
        """``{"packages": {name: Debian version}, "tools": {name: first line of its version}}``."""
        return json.loads((self.entry / VERSIONS).read_text())

    def release(self, package: str, parts: int = 2) -> str:
        """The upstream version of ``package``, cut to ``parts`` numbers: ``1.42``, ``10``, ``3.26``."""
        version = self.versions()["packages"][package]
        upstream = re.sub(r"^\d+:", "", version)  # no epoch
        numbers = re.match(r"\d+(?:\.\d+)*", upstream)
        if numbers is None:
            raise ValueError(f"{package} {version}: no version number")
        return ".".join(numbers.group().split(".")[:parts])


def cached() -> Chroot | None:
    """The chroot if it has been built, without building it."""
    entry = cache_dir() / f"{SUITE}-{recipe()}"
    return Chroot(entry) if entry.is_dir() else None


def build(log: Callable[[str], None] = print) -> Chroot:
    """The chroot, built once (about 270 MiB, under a minute with a fast link to the archive)."""
    found = cached()
    if found is not None:
        return found
    if os.geteuid() != 0:
        raise debian_root.BuildError("building the chroot needs root (mmdebstrap in root mode)")
    missing = debian_root.missing_tools()
    if missing:
        raise debian_root.BuildError(f"building the chroot needs {', '.join(missing)}")

    def make(work: Path) -> None:
        log(f"chroot: {RELEASE} ({SUITE}) with {', '.join(PACKAGES)}, from Debian's archive (mmdebstrap)")
        debian_root.unpack(SUITE, PACKAGES, work / "root", SOURCES)
        (work / VERSIONS).write_text(json.dumps(_survey(work / "root"), indent=2) + "\n")

    return Chroot(debian_root.build_once(cache_dir() / f"{SUITE}-{recipe()}", make))


def _survey(root: Path) -> dict[str, dict[str, str]]:
    """The Debian versions of the packages and what each tool says of itself."""
    query = subprocess.run(
        command(root, ["dpkg-query", "-W", "-f", "${Package}\t${Version}\n", *PACKAGES]), capture_output=True, text=True
    )
    if query.returncode:
        raise debian_root.BuildError(f"dpkg-query in the new root: {query.stderr.strip()}")
    packages = dict(line.split("\t", 1) for line in query.stdout.splitlines())
    tools = {}
    for name, argv in TOOLS.items():
        said = subprocess.run(command(root, argv), capture_output=True, text=True, check=False)
        lines = (said.stdout + said.stderr).strip().splitlines()
        tools[name] = lines[0] if lines else f"(exit status {said.returncode})"
    return {"packages": packages, "tools": tools}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("build", help="build the chroot (cached) and print where it is")
    runner = commands.add_parser("run", help="run a command in it (it keeps this process's PID)")
    runner.add_argument("--bind", type=Path, action="append", default=[], help="a directory to share (repeatable)")
    runner.add_argument("argv", nargs="+", metavar="CMD", help="the program and its arguments, after --")
    commands.add_parser("versions", help="the versions of its packages and tools")
    args = parser.parse_args()
    try:
        chroot = build(log=lambda line: print(line, file=sys.stderr, flush=True))
    except debian_root.BuildError as exc:
        print(f"current.py: {exc}", file=sys.stderr)
        return 1
    if args.command == "build":
        print(chroot.root)
    elif args.command == "run":
        argv = chroot.command(args.argv, args.bind)
        os.execvp(argv[0], argv)
    else:
        report = chroot.versions()
        for name, version in report["packages"].items():
            print(f"{name:16} {version}")
        print()
        for line in report["tools"].values():
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
