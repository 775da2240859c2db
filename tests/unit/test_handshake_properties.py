"""Properties of the handshake over generated client byte streams."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from nbdserver.protocol import ExportCatalog, ExportInfo, OptionSeen, ProtocolViolation, ServerHandshake
from nbdserver.protocol.constants import BASE_ALLOCATION, Info, Option
from nbdserver.protocol.constants import TransmissionFlag as TF
from nbdserver.protocol.handshake import MAX_OPTION_DATA, Event

from .wire import client_flags, info_request, meta_request, option, parse_option_replies

CATALOG = ExportCatalog(
    [
        ExportInfo("disk", 1 << 20, TF.HAS_FLAGS | TF.SEND_FLUSH, description="main disk"),
        ExportInfo("ro", 4096, TF.HAS_FLAGS | TF.READ_ONLY),
    ]
)
NAMES = st.sampled_from(["disk", "ro", "", "nope"])
PROPERTY_SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Options a client may send before the last one: valid, invalid and unknown.
MIDDLE_OPTIONS = st.one_of(
    st.sampled_from(
        [
            option(Option.LIST),
            option(Option.LIST, b"x"),
            option(Option.STRUCTURED_REPLY),
            option(Option.STARTTLS),
            option(Option.INFO, b"\x00"),
            option(Option.SET_META_CONTEXT, meta_request("disk", "nocolon")),
            option(99, bytes(MAX_OPTION_DATA + 1)),
        ]
    ),
    NAMES.map(lambda name: option(Option.INFO, info_request(name, Info.NAME, Info.DESCRIPTION))),
    NAMES.map(lambda name: option(Option.SET_META_CONTEXT, meta_request(name, BASE_ALLOCATION))),
    NAMES.map(lambda name: option(Option.LIST_META_CONTEXT, meta_request(name, "base:"))),
    st.builds(option, st.integers(12, 2**32 - 1), st.binary(max_size=16)),
)
LAST_OPTIONS = st.one_of(
    st.just(b""),
    st.just(option(Option.ABORT)),
    st.just(b"IHAVEOPS" + bytes(8)),  # bad magic
    NAMES.map(lambda name: option(Option.GO, info_request(name))),
    NAMES.map(lambda name: option(Option.EXPORT_NAME, name.encode())),
)


@st.composite
def client_streams(draw: st.DrawFn) -> bytes:
    flags = client_flags(draw(st.sampled_from([1, 3])))
    middle = b"".join(draw(st.lists(MIDDLE_OPTIONS, max_size=6)))
    return flags + middle + draw(LAST_OPTIONS) + draw(st.binary(max_size=32))


@dataclass
class Outcome:
    output: bytes = b""
    events: list[Event] = field(default_factory=list)
    trailing: bytes = b""
    violation: bool = False
    done: bool = False


def feed(chunks: list[bytes]) -> Outcome:
    """Feed chunks until the handshake ends; bytes after its end count as trailing data."""
    hs = ServerHandshake(CATALOG)
    result = Outcome(output=hs.data_to_send())
    for chunk in chunks:
        if hs.done:
            result.trailing += chunk
            continue
        try:
            result.events += hs.receive_data(chunk)
        except ProtocolViolation:
            result.violation = True
            break
        finally:
            result.output += hs.data_to_send()
        if hs.done:
            result.trailing = hs.trailing_data
    result.done = hs.done
    return result


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted(set(cuts)), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


@PROPERTY_SETTINGS
@given(stream=client_streams(), data=st.data())
def test_chunking_does_not_change_the_outcome(stream: bytes, data: st.DataObject) -> None:
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=24))
    whole = feed([stream])
    pieces = feed(split(stream, cuts))
    assert pieces.output == whole.output
    assert pieces.violation == whole.violation
    assert pieces.done == whole.done
    if not whole.violation:  # events of the call that raised are lost; they do not matter then
        assert pieces.events == whole.events
        assert pieces.trailing == whole.trailing


@PROPERTY_SETTINGS
@given(stream=client_streams())
def test_byte_at_a_time_matches_at_once(stream: bytes) -> None:
    assume(len(stream) < 4096)
    whole = feed([stream])
    single = feed([stream[i : i + 1] for i in range(len(stream))])
    assert single.output == whole.output
    assert single.violation == whole.violation
    if not whole.violation:
        assert single.events == whole.events
        assert single.trailing == whole.trailing


RANDOM_OPTIONS = st.builds(option, st.integers(0, 16), st.binary(max_size=48))
RANDOM_STREAMS = st.one_of(
    st.binary(max_size=256),
    st.builds(lambda tail: client_flags(3) + tail, st.binary(max_size=256)),
    st.builds(
        lambda flags, options, tail: client_flags(flags) + b"".join(options) + tail,
        st.sampled_from([0, 1, 2, 3]),
        st.lists(RANDOM_OPTIONS, max_size=8),
        st.binary(max_size=32),
    ),
)


@PROPERTY_SETTINGS
@given(stream=RANDOM_STREAMS)
def test_random_streams_raise_only_protocol_violation(stream: bytes) -> None:
    hs = ServerHandshake(CATALOG)
    greeting = hs.data_to_send()
    try:
        events = hs.receive_data(stream)
    except ProtocolViolation:
        return
    output = hs.data_to_send()
    assert greeting == b"NBDMAGICIHAVEOPT\x00\x03"
    seen = [e for e in events if isinstance(e, OptionSeen)]
    if seen and seen[-1].option == Option.EXPORT_NAME:  # ends with the export's size and flags
        tail = 10 if hs.no_zeroes else 134
        output, export = output[:-tail], output[-tail:]
        assert any(export[:8] == info.size.to_bytes(8, "big") for info in CATALOG)
    replies = parse_option_replies(output)
    assert {r.option for r in replies} <= {e.option for e in seen}
