"""The manual pages, nbdserver(8) and nbdserver.toml(5), made from the argument parser and the
configuration file's keys, so that they cannot drift from what the program accepts.

    python3 -m nbdserver.manpages DIR    # writes DIR/nbdserver.8 and DIR/nbdserver.toml.5

The pages are kept in man/ (the Debian package installs them from there: making them needs the
server's dependencies, which a package build does not have); the tests check that they are what
this module makes now.

A configuration key is described by the help of the ``serve`` flag spelled like it; the few keys
without one are described here (KEYS_WITHOUT_FLAGS, EXPORT_KEYS): a key described nowhere is an
error, which the tests catch.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from . import __version__, configfile
from .cli import build_parser

SIGNALS = [
    ("SIGTERM, SIGINT", "Stop: take no new connection, answer the requests in flight, flush, exit 0."),
    (
        "SIGHUP",
        "Reload the configuration file (and the changes made through the control socket): exports added, "
        "read-only flags, descriptions and the default export change at once; the rest is logged as needing "
        "a restart.",
    ),
    (
        "SIGUSR2",
        "Upgrade: start the installed program again as a successor, and hand it the listening sockets, "
        "every connection in the transmission phase (with its requests in flight answered) and the control "
        "socket; clients see a pause, not a disconnection. Under systemd the successor becomes the main "
        "process (MAINPID).",
    ),
]
FILES = [
    (str(configfile.DEFAULT_PATH), "The configuration file: see nbdserver.toml(5)."),
    ("/run/nbdserver/control", "The control socket of the packaged unit (serve --control), mode 0600."),
    (
        "/var/lib/nbdserver",
        "The state directory of the packaged unit (serve --state-dir): exports.json (exports added and removed "
        "through the control socket, snapshots among them) and bitmaps/ (the dirty bitmaps, a file each).",
    ),
    ("FILE@NAME", "Snapshot NAME of the export whose file is FILE, beside it (nbdserver ctl snapshot)."),
]
EXIT_STATUS = [
    ("0", "serve: a clean stop (or an upgrade handed over); ctl, check-config: success."),
    ("1", "serve: the server could not start (an address in use, a worker that did not start); ctl: refused."),
    ("2", "serve: the configuration cannot work (a bad option, an export that cannot be opened); usage errors."),
]
KEYS_WITHOUT_FLAGS = {
    "merge": "Plug and merge adjacent requests into one submission (default true; false as --no-merge).",
    "gather": "Let a deep queue's requests gather in the socket before they are received (default true; "
    "false as --no-gather).",
}
EXPORT_KEYS = {
    "name": "The export's name, as clients ask for it (required; the empty name is allowed).",
    "path": "Its backing file or block device (relative to this file), or a Ceph RBD image: rbd:POOL/IMAGE.",
    "description": "Shown by nbdinfo --list.",
    "read-only": "Export it read-only (default false).",
    "size": 'Create a sparse image of this size (e.g. "10G") if the file does not exist.',
    "cache": "buffered (through the page cache, the default) or direct (O_DIRECT).",
    "max-export-inflight": "READ/WRITE bytes in flight across its connections (default: the server's).",
    "tls": '"require": reachable only through TLS, whatever the server\'s tls says.',
    "allow": 'The TCP clients it serves, e.g. "10.0.0.0/8+::1" (default: the server\'s allow).',
    "rbd-conf": "The ceph.conf of its RBD image (default: the server's rbd-conf).",
    "rbd-id": "The cephx user its RBD image is opened as (default: the server's rbd-id).",
    "rbd-exclusive": "Take its RBD image's exclusive lock for good (default: the server's rbd-exclusive).",
    "dirty-bitmap": "A dirty bitmap made at start if missing (a name, or a list); needs state-dir.",
}
METRICS_KEYS = {
    "listen": "HOST:PORT of http://HOST:PORT/metrics (default 127.0.0.1:10810).",
    "enabled": "false: serve no metrics.",
}


def escape(text: str) -> str:
    """Text as roff takes it: backslashes and hyphens escaped, no line read as a request."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    text = re.sub(r"([,\]])(?=\S)", "\\1\\:", text)  # places to break a long list with no spaces
    return "\n".join("\\&" + line if line.startswith((".", "'")) else line for line in text.split("\n"))


def _heading(name: str, section: int, summary: str) -> list[str]:
    return [
        f'.TH "{escape(name.upper())}" {section} "" "nbdserver {__version__}" "nbdserver"',
        ".ad l",  # ragged right: long flags and lists would stretch justified lines
        ".nh",  # and no hyphens: an option is searched for as it is typed
        ".SH NAME",
        f"{escape(name)} \\- {escape(summary)}",
    ]


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, tuple[argparse.ArgumentParser, str]]:
    """A parser's subcommands: name -> (parser, its one-line help)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            return {name: (sub, helps.get(name, "")) for name, sub in action.choices.items()}
    return {}


def _option(action: argparse.Action) -> str:
    """How an option is written: its flags and what it takes."""
    if not action.option_strings:
        return f"\\fI{escape(str(action.metavar or action.dest))}\\fR"
    flags = ", ".join(f"\\fB{escape(flag)}\\fR" for flag in action.option_strings)
    if action.nargs == 0:
        return flags
    takes = action.metavar or (("{" + ",".join(map(str, action.choices)) + "}") if action.choices else action.dest)
    return f"{flags} \\fI{escape(str(takes).upper() if takes == action.dest else str(takes))}\\fR"


def _options(parser: argparse.ArgumentParser) -> list[str]:
    lines = []
    formatter = parser._get_formatter()
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)) or action.help == argparse.SUPPRESS:
            continue
        text = formatter._expand_help(action) if action.help else ""  # as --help says it: %(default)s filled
        lines += [".TP", _option(action), escape(text)]
    return lines


def _command(words: list[str], parser: argparse.ArgumentParser, summary: str) -> list[str]:
    """A (sub)command's section, then its subcommands'."""
    lines = [".SS " + escape(" ".join(words)), escape(parser.description or summary)]
    lines += _options(parser)
    if parser.epilog:
        lines += [".PP", ".nf", escape(parser.epilog), ".fi"]
    for name, (sub, text) in _subcommands(parser).items():
        lines += _command([*words, name], sub, text)
    return lines


def nbdserver_8() -> str:
    parser = build_parser()
    lines = _heading("nbdserver", 8, "Network Block Device server")
    lines += [".SH SYNOPSIS"]
    for name in _subcommands(parser):
        lines += [f"\\fBnbdserver {escape(name)}\\fR [\\fIOPTIONS\\fR]", ".br"]
    lines += [
        ".SH DESCRIPTION",
        escape(
            "nbdserver exports files, block devices and Ceph RBD images over the Network Block Device "
            "protocol (fixed newstyle, structured replies, extended headers, block status, multi-conn, "
            "TLS) to the kernel's nbd-client, libnbd's tools, QEMU and fio. Requests from all the "
            "connections of an export are merged into large submissions; the server upgrades, restarts "
            "and survives the crash of a serving process with its clients connected; it is driven at run "
            "time through a control socket (nbdserver ctl), and keeps dirty bitmaps, snapshots and "
            "checkpoints for incremental backup."
        ),
        ".SH COMMANDS",
        ".TP",
        "\\fB\\-\\-help\\fR, \\fB\\-h\\fR",
        "Show a command's options and exit (every command and subcommand takes it).",
    ]
    lines += _options(parser)
    for name, (sub, text) in _subcommands(parser).items():
        lines += _command(["nbdserver", name], sub, text)
    lines += [".SH SIGNALS"]
    for name, text in SIGNALS:
        lines += [".TP", f"\\fB{escape(name)}\\fR", escape(text)]
    lines += [".SH FILES"]
    for name, text in FILES:
        lines += [".TP", f"\\fI{escape(name)}\\fR", escape(text)]
    lines += [".SH EXIT STATUS"]
    for code, text in EXIT_STATUS:
        lines += [".TP", code, escape(text)]
    lines += [
        ".SH SEE ALSO",
        "\\fBnbdserver.toml\\fR(5), \\fBnbd-client\\fR(8), \\fBnbdinfo\\fR(1), \\fBqemu-img\\fR(1)",
    ]
    return "\n".join(lines) + "\n"


def key_descriptions() -> dict[str, str]:
    """Each server key of the configuration file and what it means: KeyError if one is described nowhere."""
    serve = _subcommands(build_parser())["serve"][0]
    flags = {flag: action for action in serve._actions for flag in action.option_strings}
    described = {}
    for key in configfile._SERVER_KEYS:
        action = flags.get(f"--{key}")
        described[key] = KEYS_WITHOUT_FLAGS[key] if action is None else action.help or ""
    return described


def nbdserver_toml_5() -> str:
    lines = _heading("nbdserver.toml", 5, "configuration file of nbdserver")
    lines += [
        ".SH SYNOPSIS",
        f"\\fI{escape(str(configfile.DEFAULT_PATH))}\\fR",
        ".SH DESCRIPTION",
        escape(
            "A TOML file, read by nbdserver serve --config FILE (and again at SIGHUP). Its keys are spelled "
            "like the command-line flags of nbdserver serve, which override them. Relative paths are "
            "relative to the file. Sizes take K, M, G and T suffixes; durations are seconds."
        ),
        ".SH SERVER KEYS",
    ]
    for key, text in key_descriptions().items():
        lines += [".TP", f"\\fB{escape(key)}\\fR", escape(text)]
    lines += [".SH [metrics]"]
    for key, text in METRICS_KEYS.items():
        lines += [".TP", f"\\fB{escape(key)}\\fR", escape(text)]
    lines += [".SH [[export]]", escape("One table per export.")]
    for key in configfile._EXPORT_KEYS:
        lines += [".TP", f"\\fB{escape(key)}\\fR", escape(EXPORT_KEYS[key])]
    lines += [".SH EXAMPLE", ".nf", escape(_example()), ".fi", ".SH SEE ALSO", "\\fBnbdserver\\fR(8)"]
    return "\n".join(lines) + "\n"


def _example() -> str:
    """The example in configfile.py's docstring: its indented lines after "::"."""
    lines = (configfile.__doc__ or "").split("::", 1)[1].split("\n")
    kept = [line for line in lines[1:] if not line or line.startswith("    ")]
    body = lines[1 : 1 + len(kept)] if kept else []
    for i, line in enumerate(lines[1:]):
        if line and not line.startswith("    "):
            body = lines[1 : 1 + i]
            break
    return "\n".join(line[4:] for line in body).strip("\n")


def write(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    pages = {"nbdserver.8": nbdserver_8(), "nbdserver.toml.5": nbdserver_toml_5()}
    for name, text in pages.items():
        (directory / name).write_text(text)
    return [directory / name for name in pages]


if __name__ == "__main__":
    for path in write(Path(sys.argv[1] if len(sys.argv) > 1 else ".")):
        print(path)
