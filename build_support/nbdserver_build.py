"""setuptools' build backend, which also asks for mypy (its mypyc) when NBDSERVER_COMPILE=1
asks for a compiled build (see setup.py): a pure build needs nothing more than setuptools."""

from __future__ import annotations

import os

from setuptools import build_meta
from setuptools.build_meta import *  # noqa: F403  (the rest of the backend, unchanged)

MYPYC = "mypy>=1.10"


def _compiler() -> list[str]:
    return [MYPYC] if os.environ.get("NBDSERVER_COMPILE", "0") not in ("", "0") else []


def get_requires_for_build_wheel(config_settings: dict | None = None) -> list[str]:
    return [*build_meta.get_requires_for_build_wheel(config_settings), *_compiler()]


def get_requires_for_build_editable(config_settings: dict | None = None) -> list[str]:
    return [*build_meta.get_requires_for_build_editable(config_settings), *_compiler()]
