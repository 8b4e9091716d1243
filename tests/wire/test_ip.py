"""IPv4/IPv6 codec: round trips, extension headers, fragments, garbage in."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wrapguard.errors import DecodeError
from wrapguard.wire.checksum import csum_partial
from wrapguard.wire.ip import (
    Fragmented,
    IPv4Packet,
    IPv6Packet,
    emit_ip,
    parse_ip,
    parse_ipv4,
    parse_ipv6,
)

CAPTURED = bytes.fromhex(
    "45000034eda5400040064eb6ac16686d4a7d9f67"
    "af1f0050e8338b62fc13da668010005c37a600000101080a04b866f74add9045"
)

v4 = st.builds(
    IPv4Packet,
    st.binary(min_size=4, max_size=4),
    st.binary(min_size=4, max_size=4),
    st.integers(0, 255),
    st.binary(max_size=300),
    st.integers(0, 255),
    st.integers(0, 0xFFFF),
    st.integers(0, 255),
    st.booleans(),
)
v6 = st.builds(
    IPv6Packet,
    st.binary(min_size=16, max_size=16),
    st.binary(min_size=16, max_size=16),
    st.integers(0, 255).filter(lambda p: p not in (0, 43, 44, 60)),
    st.binary(max_size=300),
    st.integers(0, 255),
    st.integers(0, 255),
    st.integers(0, 0xFFFFF),
)


def test_captured_ipv4_packet():
    pkt = parse_ip(CAPTURED)
    assert isinstance(pkt, IPv4Packet)
    assert (pkt.src, pkt.dst, pkt.proto, pkt.ttl, pkt.ident) == (
        bytes([172, 22, 104, 109]),
        bytes([74, 125, 159, 103]),
        6,
        64,
        0xEDA5,
    )
    assert pkt.dont_fragment and len(pkt.payload) == 32
    assert emit_ip(pkt) == CAPTURED


@given(v4)
def test_ipv4_round_trip(pkt):
    raw = emit_ip(pkt)
    assert csum_partial(raw[:20]) == 0xFFFF
    assert parse_ip(raw) == pkt


@given(v6)
def test_ipv6_round_trip(pkt):
    assert parse_ip(emit_ip(pkt)) == pkt


def test_ipv4_options_skipped_and_trailing_ignored():
    base = emit_ip(IPv4Packet(b"\1\2\3\4", b"\5\6\7\10", 17, b"payload"))
    hdr = bytearray(base[:20])
    hdr[0] = 0x46  # IHL 6: one word of options
    hdr[2:4] = (24 + 7).to_bytes(2, "big")
    raw = bytes(hdr) + b"\x01\x01\x01\x00" + b"payload" + b"pad"
    assert parse_ipv4(raw).payload == b"payload"


@pytest.mark.parametrize("frag", [0x2000, 0x0001, 0x2010])
def test_ipv4_fragments_raise_fragmented(frag):
    raw = bytearray(emit_ip(IPv4Packet(b"\1\2\3\4", b"\5\6\7\10", 6, b"x" * 20)))
    raw[6:8] = frag.to_bytes(2, "big")
    with pytest.raises(Fragmented):
        parse_ip(bytes(raw))


def test_ipv6_extension_headers_skipped():
    inner = b"upper-layer"
    hop = bytes([60, 0]) + b"\x01\x04\0\0\0\0"  # hop-by-hop -> dest-opts, 8 bytes (PadN)
    dst = bytes([43, 0]) + b"\x01\x04\0\0\0\0"  # dest-opts -> routing
    rt = bytes([17, 0]) + b"\0" * 6  # routing -> UDP
    body = hop + dst + rt + inner
    raw = bytearray(emit_ip(IPv6Packet(b"\1" * 16, b"\2" * 16, 0, body)))
    pkt = parse_ipv6(bytes(raw))
    assert (pkt.proto, pkt.payload) == (17, inner)


def test_ipv6_fragment_header_raises_fragmented():
    frag = bytes([6, 0, 0, 0, 0, 0, 0, 1])
    raw = emit_ip(IPv6Packet(b"\1" * 16, b"\2" * 16, 44, frag + b"data"))
    with pytest.raises(Fragmented):
        parse_ip(raw)


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\x45",
        b"\x45" + b"\0" * 18,
        b"\x75" + b"\0" * 40,
        b"\x44" + b"\0" * 30,
        b"\x60" + b"\0" * 30,
        bytes.fromhex("4500ffff") + b"\0" * 30,
    ],
)
def test_bad_packets(raw):
    with pytest.raises(DecodeError):
        parse_ip(raw)


@given(st.binary(max_size=120))
def test_garbage_gives_decode_error_only(raw):
    with contextlib.suppress(DecodeError):
        parse_ip(raw)


@given(st.binary(max_size=80))
def test_garbage_ipv6_extension_chain(tail):
    raw = emit_ip(IPv6Packet(b"\1" * 16, b"\2" * 16, 0, tail))
    with contextlib.suppress(DecodeError):
        parse_ip(raw)
