"""UDP and ICMP/ICMPv6 codecs: round trips, checksums, garbage in."""

from __future__ import annotations

import contextlib

from hypothesis import given
from hypothesis import strategies as st

from wrapguard.errors import DecodeError
from wrapguard.wire.checksum import csum_partial, pseudo_header_sum
from wrapguard.wire.icmp import (
    ICMP_ECHO_REQUEST,
    ICMPV6_ECHO_REQUEST,
    IcmpMessage,
    emit_icmp,
    parse_icmp,
)
from wrapguard.wire.udp import UdpDatagram, emit_udp, parse_udp

S4, D4 = bytes([10, 150, 0, 1]), bytes([10, 150, 0, 2])
S6, D6 = b"\xfd\x15" + b"\0" * 13 + b"\1", b"\xfd\x15" + b"\0" * 13 + b"\2"
ports = st.integers(0, 0xFFFF)


@given(st.builds(UdpDatagram, ports, ports, st.binary(max_size=300)), st.booleans())
def test_udp_round_trip(d, v6):
    src, dst = (S6, D6) if v6 else (S4, D4)
    raw = emit_udp(d, src, dst)
    assert parse_udp(raw) == d
    assert csum_partial(raw, pseudo_header_sum(src, dst, 17, len(raw))) == 0xFFFF
    assert raw[6:8] != b"\0\0"  # zero would mean "no checksum" (RFC 768)


def test_udp_known_vector():
    raw = emit_udp(UdpDatagram(53, 40000, b"abc"), S4, D4)
    assert raw[:6] == bytes.fromhex("00359c40000b")
    # RFC 768 by hand: pseudo 0a96+0001+0a96+0002+0011+000b, header 0035+9c40+000b, data 6162+6300
    total = 0x0A96 + 0x0001 + 0x0A96 + 0x0002 + 0x0011 + 0x000B + 0x0035 + 0x9C40 + 0x000B
    total += 0x6162 + 0x6300
    total = (total & 0xFFFF) + (total >> 16)
    assert int.from_bytes(raw[6:8], "big") == ~total & 0xFFFF


@given(st.binary(max_size=40))
def test_udp_garbage(raw):
    with contextlib.suppress(DecodeError):
        parse_udp(raw)


@given(
    st.integers(0, 255),
    st.integers(0, 255),
    st.binary(min_size=4, max_size=4),
    st.binary(max_size=200),
)
def test_icmp_round_trip_v4_and_v6(t, c, rest, payload):
    msg = IcmpMessage(t, c, rest, payload)
    raw4 = emit_icmp(msg)
    assert parse_icmp(raw4) == msg and csum_partial(raw4) == 0xFFFF
    raw6 = emit_icmp(msg, S6, D6)
    assert parse_icmp(raw6) == msg
    assert csum_partial(raw6, pseudo_header_sum(S6, D6, 58, len(raw6))) == 0xFFFF


def test_icmp_echo_fields():
    msg = parse_icmp(emit_icmp(IcmpMessage(ICMP_ECHO_REQUEST, 0, b"\x12\x34\x00\x07", b"hi")))
    assert (msg.ident, msg.sequence, msg.payload) == (0x1234, 7, b"hi")
    raw = emit_icmp(IcmpMessage(ICMPV6_ECHO_REQUEST, 0, b"\0\1\0\2"), S6, D6)
    assert raw[0] == 128


@given(st.binary(max_size=20))
def test_icmp_garbage(raw):
    with contextlib.suppress(DecodeError):
        parse_icmp(raw)
