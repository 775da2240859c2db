"""The control socket's protocol, sans I/O: one JSON object per line each way.

    request   {"command": "export.add", "args": {"name": "x", "path": "/srv/x.img"}}
    reply     {"ok": true, ...}  or  {"ok": false, "error": "what went wrong"}

A line longer than MAX_LINE ends that client's connection (after an error reply): nothing a
client sends makes the server hold more than that.  A line that is no request gets an error
reply, and the client may go on.  Commands are names with arguments, so that new ones (bitmaps,
snapshots, checkpoints) need no change here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

MAX_LINE = 64 * 1024  # bytes of one request or reply, newline included


class BadRequest(Exception):
    """A line that is no request: answered with an error, the connection goes on."""


class TooLong(Exception):
    """More than MAX_LINE bytes without a newline: answered with an error, then closed."""


@dataclass(frozen=True)
class Request:
    command: str
    args: dict[str, Any] = field(default_factory=dict)


class Decoder:
    """Bytes in, requests out."""

    def __init__(self, limit: int = MAX_LINE) -> None:
        self._limit = limit
        self._buffer = bytearray()

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def next(self) -> Request | None:
        """The next whole request, None until one has arrived; BadRequest (that line is dropped)
        or TooLong (the decoder stays broken: close the connection)."""
        end = self._buffer.find(b"\n", 0, self._limit)
        if end < 0:
            if len(self._buffer) >= self._limit:
                raise TooLong(f"a request is at most {self._limit} bytes")
            return None
        line = bytes(self._buffer[:end])
        del self._buffer[: end + 1]
        return parse_request(line)

    @property
    def buffered(self) -> int:
        return len(self._buffer)


def parse_request(line: bytes) -> Request:
    try:
        data = json.loads(line)
    except (UnicodeDecodeError, ValueError):
        raise BadRequest("not a JSON object") from None
    if not isinstance(data, dict):
        raise BadRequest("not a JSON object")
    command, args = data.get("command"), data.get("args", {})
    if not isinstance(command, str) or not command:
        raise BadRequest('no "command" (a string)')
    if not isinstance(args, dict):
        raise BadRequest('"args" is not an object')
    return Request(command, args)


def encode_request(command: str, args: dict[str, Any]) -> bytes:
    return _line({"command": command, "args": args})


def ok(**fields: Any) -> bytes:
    return _line({"ok": True, **fields})


def error(message: str) -> bytes:
    return _line({"ok": False, "error": message})


def parse_reply(line: bytes) -> dict[str, Any]:
    """A reply as the client reads it; BadRequest if it is none."""
    try:
        data = json.loads(line)
    except (UnicodeDecodeError, ValueError):
        raise BadRequest("the server's reply is not JSON") from None
    if not isinstance(data, dict) or not isinstance(data.get("ok"), bool):
        raise BadRequest("the server's reply is not a reply")
    return data


def _line(data: dict[str, Any]) -> bytes:
    return json.dumps(data, separators=(",", ":")).encode() + b"\n"
