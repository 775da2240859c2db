"""``nbdserver ctl``: one request to a server's control socket, its reply printed."""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path
from typing import Any

from . import protocol

TIMEOUT = 300.0  # seconds for a reply: opening an RBD image may take the cluster's timeout, per process


class ControlError(Exception):
    """The server could not be asked; the message names the socket."""


def ask(path: Path, command: str, args: dict[str, Any], timeout: float = TIMEOUT) -> dict[str, Any]:
    """Send one request and return the reply (ok or not); ControlError if there is none."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(str(path))
        except FileNotFoundError:
            raise ControlError(f"{path}: no such control socket (is a server running with --control {path}?)") from None
        except ConnectionRefusedError:
            raise ControlError(f"{path}: nothing listens on this control socket (its server is gone)") from None
        except OSError as exc:
            raise ControlError(f"{path}: cannot connect: {exc.strerror or exc}") from None
        try:
            sock.sendall(protocol.encode_request(command, args))
            line = _read_line(sock)
        except TimeoutError:
            raise ControlError(f"{path}: no reply within {timeout:.0f} s") from None
        except OSError as exc:
            raise ControlError(f"{path}: {exc.strerror or exc}") from None
    finally:
        sock.close()
    try:
        return protocol.parse_reply(line)
    except protocol.BadRequest as exc:
        raise ControlError(f"{path}: {exc}") from None


def _read_line(sock: socket.socket) -> bytes:
    data = bytearray()
    while not data.endswith(b"\n"):
        chunk = sock.recv(65536)
        if not chunk:
            raise ControlError("the server closed the connection without a reply")
        data += chunk
    return bytes(data)


def run(path: Path, command: str, args: dict[str, Any], as_json: bool) -> int:
    """Ask, print the reply (a table, a line, or with ``as_json`` the reply itself); 0 if it was ok."""
    try:
        reply = ask(path, command, args)
    except ControlError as exc:
        print(f"nbdserver ctl: {exc}", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps(reply, indent=2))
    elif not reply["ok"]:
        print(f"nbdserver ctl: {reply.get('error', 'failed')}", file=sys.stderr)
    elif command == "status":
        print(format_status(reply))
    elif command == "bitmap.list":
        print(format_bitmaps(reply["bitmaps"]))
    elif command == "snapshot.list":
        print(format_snapshots(reply["snapshots"]))
    else:
        print(reply.get("message", "done"))
    return 0 if reply["ok"] else 1


def format_status(reply: dict[str, Any]) -> str:
    exports = [
        [
            e["name"] or '""',
            _size(e["size"]),
            e["engine"],
            "ro" if e["read_only"] else "rw",
            str(e["connections"]),
            e["backing"],
        ]
        for e in reply["exports"]
    ]
    lines = _table(["EXPORT", "SIZE", "ENGINE", "MODE", "CLIENTS", "BACKING"], exports)
    clients = [
        [c["peer"], '""' if c["export"] == "" else c["export"] or "(handshake)", str(c["in_flight"])]
        for c in reply["connections"]
    ]
    bitmaps = [dict(b, export=e["name"]) for e in reply["exports"] for b in e.get("bitmaps", [])]
    if bitmaps:
        lines += ["", format_bitmaps(bitmaps)]
    lines.append("")
    lines += _table(["CONNECTION", "EXPORT", "IN FLIGHT"], clients) if clients else ["no connections"]
    return "\n".join(lines)


def format_bitmaps(bitmaps: list[dict[str, Any]]) -> str:
    """Dirty bitmaps as a table; one whose marks may have been lost says so."""
    if not bitmaps:
        return "no bitmaps"
    rows = [
        [
            b["export"] or '""',
            b["name"],
            _size(b["granularity"]),
            _size(b["dirty"]),
            "yes" if b["trusted"] else "NO: reports all dirty until cleared",
        ]
        for b in bitmaps
    ]
    return "\n".join(_table(["EXPORT", "BITMAP", "GRANULARITY", "DIRTY", "TRUSTED"], rows))


def format_snapshots(snapshots: list[dict[str, Any]]) -> str:
    if not snapshots:
        return "no snapshots"
    rows = [
        [
            s["served_as"],
            _size(s["size"]),
            "yes" if s["checkpoint"] else "no",
            _size(s["bitmap"]["dirty"]) if s["bitmap"] else "-",
            s["path"],
        ]
        for s in snapshots
    ]
    return "\n".join(_table(["SNAPSHOT", "SIZE", "CHECKPOINT", "CHANGED", "FILE"], rows))


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in [header, *rows]]


def _size(size: int) -> str:
    for unit in ("", "K", "M", "G", "T", "P"):
        if size < 1024 or size % 1024 or unit == "P":
            return f"{size}{unit}"
        size //= 1024
    return str(size)
