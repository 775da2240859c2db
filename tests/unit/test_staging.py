"""The staging buffer's window: widening for batches of small requests, narrowing for large payloads."""

from __future__ import annotations

from nbdserver.serving.staging import DIRECT_RECEIVE_MIN, STAGING_MAX, STAGING_SIZE, Staging


def fill(staging: Staging, data: bytes) -> bool:
    window = staging.window()
    window[: len(data)] = data
    return staging.received(len(data))


def test_full_windows_widen_the_buffer_up_to_its_limit_keeping_what_is_unconsumed():
    staging = Staging(STAGING_SIZE, b"head")
    sizes = []
    while True:
        window = staging.window()
        sizes.append(staging.filled + len(window))
        if sizes[-1] == STAGING_MAX:
            break
        assert fill(staging, b"x" * len(window))
        staging.adapt(full=True)
        staging.keep(staging.filled - 4)  # the last 4 bytes are half a request
        assert staging.unconsumed() == b"xxxx"
    assert sizes == [STAGING_SIZE, 2 * STAGING_SIZE, STAGING_MAX]


def test_a_window_not_filled_leaves_the_buffer_as_it_is():
    staging = Staging(STAGING_SIZE)
    assert not fill(staging, b"y" * 100)
    staging.adapt(full=False)
    staging.keep(100)
    assert len(staging.window()) == STAGING_SIZE


def test_a_large_copy_narrows_the_window_until_small_requests_fill_it():
    staging = Staging(STAGING_SIZE)
    fill(staging, b"p" * STAGING_SIZE)
    staging.copied_large = True  # the consumer copied a large payload out of it
    staging.adapt(full=True)
    staging.keep(STAGING_SIZE)
    assert len(staging.window()) == DIRECT_RECEIVE_MIN  # the rest of the next payload goes in place
    assert staging.copied_large is False
    assert fill(staging, b"s" * DIRECT_RECEIVE_MIN)  # small requests fill the narrow window
    staging.adapt(full=True)
    staging.keep(DIRECT_RECEIVE_MIN)
    assert len(staging.window()) == STAGING_SIZE


def test_take_hands_over_every_unconsumed_byte():
    staging = Staging(data=b"option bytes")
    assert staging.filled == len(b"option bytes")
    assert staging.take() == b"option bytes"
    assert staging.filled == 0 and staging.unconsumed() == b""


def test_data_larger_than_the_size_asked_for_fits():
    data = bytes(range(256)) * 2048  # 512 KiB taken over, more than STAGING_SIZE
    staging = Staging(STAGING_SIZE, data)
    assert staging.unconsumed() == data
    assert len(staging.window()) == 0  # full: consume before receiving more


def test_a_window_up_to_a_header_stops_at_its_end():
    staging = Staging(STAGING_SIZE)
    window = staging.window(28)
    assert len(window) == 28  # the header alone: its payload then goes in place
    window[:10] = b"h" * 10
    assert not staging.received(10)  # a part of it
    window = staging.window(28)
    assert len(window) == 18  # the rest of the header, no further
    window[:18] = b"h" * 18
    assert staging.received(18)
    assert len(staging.window(28)) == STAGING_SIZE - 28  # a header is there already: no limit
    assert len(staging.window()) == STAGING_SIZE - 28
