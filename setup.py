"""Build nbdserver: pure Python by default; with NBDSERVER_COMPILE=1, the modules every request
passes through are compiled with mypyc from the same typed source (they need a C compiler and the
Python headers then).  Everything else (pyproject.toml) is declarative."""

from __future__ import annotations

import os

from setuptools import setup

# Bytes in, replies out: the protocol core, the block layer, the engines and the connection.
COMPILED = [
    "nbdserver/protocol",
    "nbdserver/block",
    "nbdserver/backing",
    "nbdserver/connection.py",
    "nbdserver/export.py",
]


def compiling() -> bool:
    return os.environ.get("NBDSERVER_COMPILE", "0") not in ("", "0")


def ext_modules() -> list:
    if not compiling():
        return []
    from mypyc.build import mypycify

    return mypycify(COMPILED, opt_level="3")


setup(ext_modules=ext_modules())
