"""TCP codec: options, round trips, the captured segment, garbage in."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wrapguard.errors import DecodeError
from wrapguard.wire.checksum import csum_partial, pseudo_header_sum
from wrapguard.wire.tcp import (
    ACK,
    SYN,
    TcpOptions,
    TcpSegment,
    emit_options,
    emit_tcp,
    parse_options,
    parse_tcp,
)

SEGMENT = bytes.fromhex("af1f0050e8338b62fc13da668010005c37a600000101080a04b866f74add9045")
SRC, DST = bytes.fromhex("ac16686d"), bytes.fromhex("4a7d9f67")

u32 = st.integers(0, 0xFFFFFFFF)
options = st.builds(
    TcpOptions,
    st.none() | st.integers(0, 0xFFFF),
    st.none() | st.integers(0, 255),
    st.booleans(),
    st.lists(st.tuples(u32, u32), max_size=4).map(tuple),
    st.none() | st.tuples(u32, u32),
)


def fits(opts: TcpOptions) -> bool:
    try:
        emit_options(opts)
    except ValueError:
        return False
    return True


segments = st.builds(
    TcpSegment,
    st.integers(0, 0xFFFF),
    st.integers(0, 0xFFFF),
    u32,
    u32,
    st.integers(0, 255),
    st.integers(0, 0xFFFF),
    st.binary(max_size=200),
    options.filter(fits),
    st.integers(0, 0xFFFF),
)


def test_captured_segment():
    seg = parse_tcp(SEGMENT)
    assert (seg.src_port, seg.dst_port, seg.flags, seg.window) == (44831, 80, ACK, 92)
    assert (seg.seq, seg.ack) == (0xE8338B62, 0xFC13DA66)
    assert seg.options == TcpOptions(timestamps=(0x04B866F7, 0x4ADD9045))
    assert emit_tcp(seg, SRC, DST) == SEGMENT


def test_syn_options_layout():
    raw = emit_options(TcpOptions(mss=1380, wscale=7, sack_permitted=True))
    assert raw == bytes.fromhex("020405640101040201030307")
    assert parse_options(raw) == TcpOptions(mss=1380, wscale=7, sack_permitted=True)


def test_sack_blocks_layout():
    raw = emit_options(TcpOptions(sack_blocks=((1, 2), (3, 4))))
    assert raw[:4] == bytes((1, 1, 5, 18)) and len(raw) == 20


def test_too_many_options_is_local_error():
    with pytest.raises(ValueError):
        emit_options(TcpOptions(sack_blocks=((1, 2),) * 4, timestamps=(1, 2)))


def test_unknown_option_skipped():
    raw = bytes((30, 4, 0xAA, 0xBB, 2, 4, 5, 0xB4, 0))
    assert parse_options(raw) == TcpOptions(mss=1460)


@pytest.mark.parametrize(
    "raw",
    [
        bytes((2,)),
        bytes((2, 3, 0)),
        bytes((2, 1)),
        bytes((5, 6) + (0,) * 4),
        bytes((3, 4, 0, 0)),
        bytes((8, 9) + (0,) * 7),
        bytes((4, 3, 0)),
    ],
)
def test_bad_options(raw):
    with pytest.raises(DecodeError):
        parse_options(raw)


@given(segments)
def test_round_trip_and_checksum(seg):
    raw = emit_tcp(seg, SRC, DST)
    assert parse_tcp(raw) == seg
    assert csum_partial(raw, pseudo_header_sum(SRC, DST, 6, len(raw))) == 0xFFFF


def test_round_trip_ipv6_checksum():
    src, dst = b"\xfd" + b"\1" * 15, b"\xfd" + b"\2" * 15
    raw = emit_tcp(TcpSegment(1, 2, 3, 4, SYN, 5, b"odd"), src, dst)
    assert csum_partial(raw, pseudo_header_sum(src, dst, 6, len(raw))) == 0xFFFF


@given(st.binary(max_size=80))
def test_garbage_gives_decode_error_only(raw):
    with contextlib.suppress(DecodeError):
        parse_tcp(raw)


@given(st.binary(max_size=40))
def test_garbage_options(raw):
    with contextlib.suppress(DecodeError):
        parse_options(raw)
