"""Build nbdserver.  The modules every request passes through are compiled with mypyc from the
same typed source where a C compiler and the Python headers are at hand; anywhere else, or if
compiling fails, the build is pure Python, complete and only slower.  NBDSERVER_COMPILE=0 asks
for the pure build, NBDSERVER_COMPILE=1 for the compiled one (failing without a compiler).
Everything else is declared in pyproject.toml."""

from __future__ import annotations

import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "build_support"))
from nbdserver_build import compile_wanted  # beside the build backend: not part of the package

# Bytes in, replies out: the protocol core, the block layer, the engines and the connection.
# The RBD engine (backing/librbd.py, and rbdlock.py beside it) stays pure Python, its error type deriving from OSError,
# which mypyc cannot compile; its two calls per request are in C beside it (backing/_rbd.c).
COMPILED = [
    "nbdserver/protocol",
    "nbdserver/block",
    "nbdserver/backing/__init__.py",
    "nbdserver/backing/choice.py",
    "nbdserver/backing/engine.py",
    "nbdserver/backing/file.py",
    "nbdserver/backing/uring.py",
    "nbdserver/serving/connection.py",
    "nbdserver/serving/export.py",
    "nbdserver/serving/polling.py",
    "nbdserver/serving/staging.py",
    "nbdserver/serving/journal.py",
    "nbdserver/serving/counts.py",
    "nbdserver/serving/gathering.py",
]


class BuildOrFallBack(build_ext):
    """Compile; if that fails and the compiled build was not insisted on, build pure Python."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # the compiler's errors come as several distutils types
            if os.environ.get("NBDSERVER_COMPILE") == "1":
                raise
            for ext in self.extensions:  # nothing half-built goes into the package
                built = self.get_ext_fullpath(ext.name)
                if os.path.exists(built):
                    os.remove(built)
            self.extensions = []
            print(f"nbdserver: compiling failed ({exc}); building pure Python", file=sys.stderr)


def ext_modules() -> list:
    if not compile_wanted():
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:  # asked what the build needs (mypy among it), or built without it
        print("nbdserver: mypyc is not installed: building pure Python", file=sys.stderr)
        return []
    # Beside them, the journal's writer in C (serving/_journal.c): the bookkeeping that lets a
    # connection outlive its process, at a few stores per request.
    writer = Extension("nbdserver.serving._journal", ["nbdserver/serving/_journal.c"], extra_compile_args=["-O2"])
    # And the RBD engine's calls per request (backing/_rbd.c): through librbd's functions as ctypes
    # found them, linking against nothing.
    rbd = Extension("nbdserver.backing._rbd", ["nbdserver/backing/_rbd.c"], extra_compile_args=["-O2"])
    return [*mypycify(COMPILED, opt_level="3"), writer, rbd]


setup(ext_modules=ext_modules(), cmdclass={"build_ext": BuildOrFallBack})
