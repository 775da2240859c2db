"""The control socket's protocol and its kept state, without sockets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nbdserver.config import ExportConfig, ServerConfig
from nbdserver.control import protocol, state


def test_requests_split_anywhere_come_out_whole():
    wire = protocol.encode_request("status", {}) + protocol.encode_request("export.remove", {"name": "a"})
    decoder = protocol.Decoder()
    got = []
    for byte in wire:
        decoder.feed(bytes([byte]))
        while (request := decoder.next()) is not None:
            got.append(request)
    assert got == [protocol.Request("status", {}), protocol.Request("export.remove", {"name": "a"})]


@pytest.mark.parametrize(
    "line", [b"garbage", b"[]", b"{}", b'{"command": 1}', b'{"command": ""}', b'{"command": "x", "args": 1}', b"\xff"]
)
def test_a_bad_line_is_refused_and_the_next_one_read(line):
    decoder = protocol.Decoder()
    decoder.feed(line + b"\n" + protocol.encode_request("status", {}))
    with pytest.raises(protocol.BadRequest):
        decoder.next()
    assert decoder.next() == protocol.Request("status", {})


def test_an_over_long_line_is_refused_before_it_ends():
    decoder = protocol.Decoder(limit=100)
    decoder.feed(b"x" * 99)
    assert decoder.next() is None
    decoder.feed(b"x")
    with pytest.raises(protocol.TooLong):
        decoder.next()


@given(st.lists(st.binary(max_size=300), max_size=20))
def test_any_bytes_give_requests_or_refusals_within_the_bound(chunks):
    decoder = protocol.Decoder(limit=256)
    for chunk in chunks:
        decoder.feed(chunk)
        while True:
            try:
                request = decoder.next()
            except protocol.BadRequest:
                continue
            except protocol.TooLong:
                return  # the connection is closed
            if request is None:
                break
            assert isinstance(request.command, str) and isinstance(request.args, dict)
        assert decoder.buffered < 256 + 300


def test_replies():
    assert protocol.parse_reply(protocol.ok(a=1)) == {"ok": True, "a": 1}
    assert protocol.parse_reply(protocol.error("no")) == {"ok": False, "error": "no"}
    with pytest.raises(protocol.BadRequest):
        protocol.parse_reply(b'{"a": 1}\n')


def config(*names: str) -> ServerConfig:
    return ServerConfig(exports=[ExportConfig(name, Path(f"/srv/{name}.img")) for name in names], default_export="a")


def test_changes_apply_over_the_configuration():
    changes = state.Changes()
    changes.add(ExportConfig("c", Path("/srv/c.img"), read_only=True))
    changes.remove("a")  # configured: kept as removed
    changes.add(ExportConfig("d", Path("/srv/d.img")))
    changes.remove("d")  # added at run time: forgotten
    applied = changes.apply(config("a", "b"))
    assert [(e.name, e.read_only) for e in applied.exports] == [("b", False), ("c", True)]
    assert applied.default_export is None  # it named a removed export
    changes.add(ExportConfig("a", Path("/srv/other.img")))  # added again: no longer removed
    assert [e.name for e in changes.apply(config("a", "b")).exports] == ["b", "c", "a"]


def test_changes_are_kept_atomically(tmp_path):
    changes = state.Changes()
    changes.add(ExportConfig("c", Path("/srv/c.img"), create_size=4096, description="x"))
    changes.remove("a")
    state.save(tmp_path / "state", changes)
    assert [p.name for p in (tmp_path / "state").iterdir()] == [state.FILE]
    again = state.initial(tmp_path / "state", {})
    assert again == changes
    handed = state.initial(None, dict(state.for_successor(changes)))  # an upgrade's successor
    assert handed == changes
    (tmp_path / "state" / state.FILE).write_text(json.dumps({"version": 99}))
    with pytest.raises(state.ConfigError, match="cannot read the state"):
        state.initial(tmp_path / "state", {})
