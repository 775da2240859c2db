"""What is running: this package's version, how it was built, and the interpreter under it.

Both matter for speed: the hot modules may be compiled with mypyc (see setup.py),
and a distribution's python3 is built with profile-guided optimisation where a
self-built one often is not.  The server says which it runs on, at start, in
``--version`` and in ``nbdserver_build_info``.
"""

from __future__ import annotations

import os
import platform
import sys
from importlib.machinery import EXTENSION_SUFFIXES

from . import __version__
from .serving import connection


def kind() -> str:
    """'mypyc' when the hot modules are compiled (the connection stands for them all), else 'pure'."""
    origin = connection.__file__ or ""
    return "mypyc" if origin.endswith(tuple(EXTENSION_SUFFIXES)) else "pure"


def interpreter() -> str:
    return f"{platform.python_implementation()} {platform.python_version()}"


def location() -> str:
    """The folder this package was imported from."""
    return os.path.dirname(os.path.realpath(__file__))


def describe() -> str:
    """E.g. 'nbdserver 0.1.0 (mypyc) on CPython 3.11.2 (/usr/bin/python3.11) from /usr/lib/.../nbdserver'."""
    python = os.path.realpath(sys.executable)
    return f"nbdserver {__version__} ({kind()}) on {interpreter()} ({python}) from {location()}"


def child_command(*args: str) -> list[str]:
    """The command line of a process this one starts (a worker, a successor): this interpreter,
    importing this package as installed.  ``-P`` keeps the working directory (``-m``) or the
    script's folder off ``sys.path``: a server started from a source tree, or from a folder where
    someone else put an ``nbdserver/`` package, must not run that code in its children.
    ``PYTHONPATH`` is still honoured (the compiled modules of ``tests/compiled`` are found by it)."""
    return [sys.executable, "-P", *args]
