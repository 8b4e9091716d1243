"""WireGuard message codecs [W 5.4]: sizes, round trips, and garbage giving DecodeError only."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wrapguard.errors import DecodeError
from wrapguard.wire import wgmsg
from wrapguard.wire.wgmsg import CookieReply, Initiation, Response, Transport, emit, parse

u32 = st.integers(0, 2**32 - 1)


def b(n: int) -> st.SearchStrategy[bytes]:
    return st.binary(min_size=n, max_size=n)


messages = st.one_of(
    st.builds(Initiation, u32, b(32), b(48), b(28), b(16), b(16)),
    st.builds(Response, u32, u32, b(32), b(16), b(16), b(16)),
    st.builds(CookieReply, u32, b(24), b(32)),
    st.builds(Transport, u32, st.integers(0, 2**64 - 1), st.binary(min_size=16, max_size=200)),
)


@settings(max_examples=300)
@given(messages)
def test_round_trip(msg: wgmsg.Message) -> None:
    data = emit(msg)
    assert parse(data) == msg
    assert emit(parse(data)) == data


def test_sizes_and_layout() -> None:
    init = emit(Initiation(0x01020304, bytes(32), bytes(48), bytes(28)))
    assert len(init) == 148 and init[:8] == b"\x01\x00\x00\x00\x04\x03\x02\x01"
    resp = emit(Response(1, 2, bytes(32), bytes(16)))
    assert len(resp) == 92 and resp[4:12] == b"\x01\x00\x00\x00\x02\x00\x00\x00"
    assert len(emit(CookieReply(5, bytes(24), bytes(32)))) == 64
    data = emit(Transport(7, 0x0102, bytes(16)))
    assert data[:16] == b"\x04\x00\x00\x00\x07\x00\x00\x00\x02\x01\x00\x00\x00\x00\x00\x00"
    assert wgmsg.macs_offset(init) == 116


@settings(max_examples=500)
@given(st.binary(max_size=300))
def test_garbage_raises_decode_error_only(data: bytes) -> None:
    try:
        msg = parse(data)
    except DecodeError:
        return
    assert emit(msg) == data


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x01\x00\x00",
        b"\x01\x00\x00\x00" + bytes(143),  # initiation one byte short
        b"\x02\x00\x00\x00" + bytes(89),  # response one byte long
        b"\x03\x00\x00\x00" + bytes(59),
        b"\x04\x00\x00\x00" + bytes(27),  # transport shorter than header + tag
        b"\x05\x00\x00\x00" + bytes(100),  # unknown type
        b"\x01\x00\x01\x00" + bytes(144),  # reserved byte set
    ],
)
def test_malformed_examples(data: bytes) -> None:
    with pytest.raises(DecodeError):
        parse(data)


def test_emit_refuses_wrong_field_sizes() -> None:
    with pytest.raises(ValueError):
        emit(Initiation(1, bytes(31), bytes(48), bytes(28)))
    with pytest.raises(ValueError):
        emit(Transport(1, 1, bytes(15)))
