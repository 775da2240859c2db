"""The server's two builds for the benchmarks: the pure-Python source tree as it is, and a
copy of it with the hot modules compiled by mypyc (setup.py), cached by a hash of the sources."""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("NBDSERVER_BENCH_CACHE", Path.home() / ".cache" / "nbdserver-bench"))
SOURCES = ("nbdserver", "setup.py", "pyproject.toml", "build_support", "README.md")


def _files(root: Path) -> list[Path]:
    out = []
    for name in SOURCES:
        path = root / name
        out += sorted(p for p in path.rglob("*") if p.suffix in (".py", ".pyi", ".c")) if path.is_dir() else [path]
    return out


@functools.cache
def compiled_tree(python: str = sys.executable, root: Path = ROOT) -> Path:
    """A copy of the sources of ``root`` (a checkout) with the compiled modules beside them (built
    once per source state).

    Asked once per benchmark: sources edited during a run do not reach its later servers."""
    digest = hashlib.sha256(python.encode())
    for path in _files(root):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    tree = CACHE / f"mypyc-{digest.hexdigest()[:16]}"
    if tree.exists():
        return tree
    CACHE.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=".building-", dir=CACHE))
    for path in _files(root):
        target = building / path.relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    print(f"compiling the hot modules with mypyc into {tree} ...", file=sys.stderr)
    built = subprocess.run(
        [python, "setup.py", "--quiet", "build_ext", "--inplace"],
        cwd=building,
        env={**os.environ, "NBDSERVER_COMPILE": "1"},
        capture_output=True,
        text=True,
        check=False,
    )
    if built.returncode:
        shutil.rmtree(building)
        raise RuntimeError(f"the compiled build failed:\n{built.stderr[-3000:]}")
    shutil.rmtree(building / "build", ignore_errors=True)
    building.rename(tree)
    return tree


def tree_of(build: str) -> Path:
    """Where ``python -m nbdserver`` of a build ("pure" or "mypyc") is imported from."""
    return compiled_tree() if build == "mypyc" else ROOT
