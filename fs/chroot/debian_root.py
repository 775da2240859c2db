"""Debian roots unpacked from Debian's archive with ``mmdebstrap``, and built once into a cache.

``unpack`` runs mmdebstrap (root mode, minbase, no Recommends) inside a private mount namespace:
the /proc, /dev and /sys it mounts in the new root while installing die with it, even when it is
killed half-way, so a root left behind holds only files; and it is stopped when its caller dies.

``build_once`` makes a cache entry appear whole or not at all: the entry is built in a directory
beside it and renamed into place when complete, under a lock, so that builders in parallel wait
for the first one and the leftovers of an interrupted build are removed by the next.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

UNFINISHED = ".building-"


class BuildError(RuntimeError):
    """mmdebstrap failed (no network, an unknown package, ...); the message ends with its log."""


def missing_tools() -> list[str]:
    return [tool for tool in ("mmdebstrap", "unshare", "setpriv") if shutil.which(tool) is None]


def unpack(suite: str, packages: Sequence[str], target: Path, sources: Sequence[str] = ()) -> None:
    """Debian ``suite`` with ``packages`` and what they depend on, unpacked into ``target``.

    ``sources`` are mirrors or whole ``deb URI SUITE COMPONENT`` lines; without them mmdebstrap
    takes Debian's defaults for the suite (its updates and security suites included).
    """
    command = [
        # Stopped (it then cleans up after itself) if the builder dies: no build goes on unowned.
        *("setpriv", "--pdeathsig", "TERM", "--"),
        *("unshare", "--mount", "--propagation", "private", "--"),
        *("mmdebstrap", "--mode=root", "--variant=minbase", f"--include={','.join(packages)}"),
        *(suite, str(target), *sources),
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        log = (done.stderr + done.stdout).strip().splitlines()
        raise BuildError(f"mmdebstrap {suite} failed with status {done.returncode}: " + " / ".join(log[-5:]))


def build_once(entry: Path, make: Callable[[Path], None]) -> Path:
    """``entry``, made by ``make(directory)`` into a new directory if it does not exist yet."""
    if entry.is_dir():
        return entry
    entry.parent.mkdir(parents=True, exist_ok=True)
    with _locked(entry.parent / ".lock"):
        if entry.is_dir():  # built by another process while this one waited
            return entry
        _remove_unfinished(entry.parent)
        work = Path(tempfile.mkdtemp(prefix=UNFINISHED, dir=entry.parent))
        try:
            make(work)
            work.chmod(0o755)  # mkdtemp made it private
            work.rename(entry)
        except BaseException:
            remove_tree(work)
            raise
    return entry


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _remove_unfinished(cache: Path) -> None:
    """What a build that was killed left (only ever seen under the lock, so no build is running)."""
    for leftover in cache.glob(f"{UNFINISHED}*"):
        remove_tree(leftover)


def remove_tree(path: Path) -> None:
    """Never crosses into another filesystem, should anything still be mounted inside."""
    subprocess.run(["rm", "-rf", "--one-file-system", "--", os.fspath(path)], check=False)
