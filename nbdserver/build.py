"""What is running: this package's version and the interpreter under it.

The interpreter's build matters for speed (a distribution's python3 is built
with profile-guided optimisation; a self-built one often is not), so the
server says which one it runs on, at start and in ``--version``.
"""

from __future__ import annotations

import os
import platform
import sys

from . import __version__


def describe() -> str:
    """E.g. 'nbdserver 0.1.0 on CPython 3.11.2 (/usr/bin/python3.11)'."""
    interpreter = f"{platform.python_implementation()} {platform.python_version()}"
    return f"nbdserver {__version__} on {interpreter} ({os.path.realpath(sys.executable)})"
