"""setuptools' build backend, which also asks for mypy (its mypyc) when the build is to be
compiled (see setup.py): where no C compiler or no Python headers are found, the build is pure
Python and needs nothing more than setuptools."""

from __future__ import annotations

import os
import shlex
import shutil
import sysconfig

from setuptools import build_meta
from setuptools.build_meta import *  # noqa: F403  (the rest of the backend, unchanged)

MYPYC = "mypy>=1.10"


def compile_wanted() -> bool:
    """NBDSERVER_COMPILE=1 or 0 if set; else whether a compiler and the Python headers are here."""
    asked = os.environ.get("NBDSERVER_COMPILE", "")
    if asked:
        return asked != "0"
    compiler = shlex.split(os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc")[:1]
    headers = os.path.join(sysconfig.get_paths()["include"], "Python.h")
    return bool(compiler) and shutil.which(compiler[0]) is not None and os.path.exists(headers)


def _compiler() -> list[str]:
    return [MYPYC] if compile_wanted() else []


def get_requires_for_build_wheel(config_settings: dict | None = None) -> list[str]:
    return [*build_meta.get_requires_for_build_wheel(config_settings), *_compiler()]


def get_requires_for_build_editable(config_settings: dict | None = None) -> list[str]:
    return [*build_meta.get_requires_for_build_editable(config_settings), *_compiler()]
