"""Stream framing: round trips under any split, bounds, garbage gives a clear error."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wrapguard.wire.stream import (
    KEEPALIVE,
    MAGIC,
    MAX_DATAGRAM,
    StreamDecoder,
    StreamError,
    encode,
    start,
)

datagrams = st.lists(st.binary(min_size=1, max_size=2000), max_size=20)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, prev = [], 0
    for p in points:
        out.append(data[prev:p])
        prev = p
    out.append(data[prev:])
    return out


@given(datagrams, datagrams, st.lists(st.integers(min_value=0), max_size=30), st.integers(0, 3))
def test_round_trip_under_any_split(
    first: list[bytes], second: list[bytes], cuts: list[int], keepalives: int
) -> None:
    wire = start(first) + KEEPALIVE * keepalives + encode(second)
    dec = StreamDecoder()
    got: list[bytes] = []
    for piece in split(wire, cuts):
        got.extend(dec.feed(piece))
        assert dec.pending <= MAX_DATAGRAM + 2
    dec.at_end()
    assert got == first + second
    assert dec.keepalives == keepalives
    assert dec.datagrams == len(first) + len(second)


def test_byte_at_a_time_and_largest_datagram() -> None:
    big = bytes(range(256)) * 255 + b"x" * 255  # 65535 bytes
    assert len(big) == MAX_DATAGRAM
    wire = start([b"\x01", big, b"\x04" * 32])
    dec = StreamDecoder()
    got = [d for i in range(len(wire)) for d in dec.feed(wire[i : i + 1])]
    assert got == [b"\x01", big, b"\x04" * 32]


def test_html_error_page_is_named() -> None:
    dec = StreamDecoder()
    with pytest.raises(StreamError, match=r"not a wrapguard stream: it starts with b'<html>"):
        dec.feed(b"<html><body>502 Bad Gateway</body></html>")


def test_wrong_magic_detected_before_four_bytes() -> None:
    with pytest.raises(StreamError, match="not a wrapguard stream"):
        StreamDecoder().feed(b"WX")
    assert StreamDecoder().feed(b"WG") == []


def test_frame_over_the_limit_is_refused_without_buffering_it() -> None:
    dec = StreamDecoder(max_datagram=1500)
    dec.feed(MAGIC + encode([b"a" * 1500]))
    with pytest.raises(StreamError, match="1501 bytes is larger than the limit of 1500"):
        dec.feed((1501).to_bytes(2, "big") + b"b" * 10)


def test_truncated_stream_is_an_error_at_end() -> None:
    dec = StreamDecoder()
    dec.feed(start([b"abc"])[:-1])
    with pytest.raises(StreamError, match="ended inside a frame"):
        dec.at_end()
    with pytest.raises(StreamError, match="ended before it began"):
        StreamDecoder().at_end()


def test_encoder_refuses_what_cannot_be_framed() -> None:
    with pytest.raises(ValueError, match="65536 bytes"):
        encode([b"x" * 65536])
    with pytest.raises(ValueError, match="0 bytes"):
        encode([b""])
    with pytest.raises(ValueError):
        StreamDecoder(max_datagram=0)
