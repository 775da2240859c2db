"""The manual pages are made from the argument parser and the configuration file's keys
(nbdserver/manpages.py): they render without a warning and name every option and every key."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nbdserver import configfile, manpages
from nbdserver.cli import build_parser
from tests.conftest import ROOT

pytestmark = [
    pytest.mark.skipif(shutil.which("man") is None, reason="man-db is not installed"),
    pytest.mark.own_build,  # made from the sources: one pass
]


@pytest.fixture(scope="module")
def pages(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("man")
    made = subprocess.run(
        [sys.executable, "-m", "nbdserver.manpages", str(out)], capture_output=True, text=True, check=True
    )
    assert made.stdout.split() == [str(out / "nbdserver.8"), str(out / "nbdserver.toml.5")]
    return {path.name: path for path in out.iterdir()}


def render(page: Path) -> tuple[str, str]:
    """The page as man shows it (wide, so that nothing is folded), and its warnings."""
    env = {**os.environ, "MANWIDTH": "250", "MAN_KEEP_FORMATTING": "0"}
    shown = subprocess.run(
        ["man", "--warnings", "-l", "-Tutf8", str(page)], capture_output=True, text=True, env=env, timeout=60
    )
    assert shown.returncode == 0, shown.stderr
    return re.sub(r".\x08", "", shown.stdout), shown.stderr


@pytest.mark.parametrize("name", ["nbdserver.8", "nbdserver.toml.5"])
def test_the_pages_render_without_a_warning(pages, name):
    text, warnings = render(pages[name])
    assert warnings == "" and len(text.splitlines()) > 40


def every_help() -> list[tuple[list[str], str]]:
    """(command words, its --help) for nbdserver and every subcommand, however deep."""
    found = []

    def walk(words: list[str], parser) -> None:
        found.append((words, parser.format_help()))
        for name, (sub, _) in manpages._subcommands(parser).items():
            walk([*words, name], sub)

    walk([], build_parser())
    return found


def test_nbdserver_8_names_every_command_and_option_of_help(pages):
    text, _ = render(pages["nbdserver.8"])
    helps = every_help()
    assert len(helps) > 15  # serve, check-config, top, ctl and ctl's commands
    for words, help_text in helps:
        if words:
            assert "nbdserver " + " ".join(words) in text
        for option in set(re.findall(r"(?<![\w-])(--?[a-zA-Z][\w-]*)", help_text.split("\n", 1)[1])):
            assert option in text, f"{option} of nbdserver {' '.join(words)} --help is not in nbdserver(8)"
    for section in ("SIGNALS", "SIGUSR2", "FILES", "EXIT STATUS", "examples:"):
        assert section in text


def test_nbdserver_toml_5_names_every_key(pages):
    text, _ = render(pages["nbdserver.toml.5"])
    keys = [*configfile._SERVER_KEYS, *configfile._EXPORT_KEYS, *manpages.METRICS_KEYS]
    for key in keys:
        assert re.search(rf"^\s+{re.escape(key)}\b", text, re.MULTILINE), f"key {key} is not in nbdserver.toml(5)"
    assert "[[export]]" in text and 'path = "rbd:rbd/vm1"' in text  # the example


def test_the_pages_kept_in_man_are_those_made_now(pages):
    """What the package installs: made again with python3 -m nbdserver.manpages man after a change."""
    for name, made in pages.items():
        kept = ROOT / "man" / name
        assert kept.read_text() == made.read_text(), f"man/{name} is stale: python3 -m nbdserver.manpages man"


def test_a_key_described_nowhere_is_caught(monkeypatch):
    monkeypatch.setitem(configfile._SERVER_KEYS, "no-such-key", ("x", str))
    with pytest.raises(KeyError):
        manpages.key_descriptions()
