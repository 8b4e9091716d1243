"""FlowOut builds the same bytes as the wire codecs, checksums included."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from wrapguard.netstack.packet import FlowOut
from wrapguard.wire.checksum import csum_partial, pseudo_header_sum
from wrapguard.wire.ip import PROTO_TCP, IPv4Packet, IPv6Packet, emit_ip, parse_ip
from wrapguard.wire.tcp import TcpOptions, TcpSegment, emit_options, emit_tcp

u32 = st.integers(0, 0xFFFFFFFF)
u16 = st.integers(0, 0xFFFF)
opts = st.sampled_from(
    [
        TcpOptions(),
        TcpOptions(mss=1380, wscale=7, sack_permitted=True),
        TcpOptions(sack_blocks=((1, 2), (0xFFFFFFF0, 0xFFFFFFFF))),
    ]
)


@given(st.booleans(), u16, u16, u32, u32, st.integers(0, 255), u16, opts, st.binary(max_size=1500))
def test_flowout_matches_codecs(v6, sport, dport, seq, ack, flags, window, options, payload):
    src, dst = (
        (b"\xfd" + b"\x01" * 15, b"\xfd" + b"\x02" * 15)
        if v6
        else (b"\x0a\x96\0\1", b"\x0a\x96\0\2")
    )
    out: list[bytes] = []
    raw_opts = emit_options(options) if options != TcpOptions() else b""
    FlowOut(out, src, dst, sport, dport).tcp(seq, ack, flags, window, raw_opts, payload)
    (pkt,) = out
    seg = emit_tcp(TcpSegment(sport, dport, seq, ack, flags, window, payload, options), src, dst)
    if v6:
        assert pkt == emit_ip(IPv6Packet(src, dst, PROTO_TCP, seg))
    else:
        assert pkt == emit_ip(IPv4Packet(src, dst, PROTO_TCP, seg))
        assert csum_partial(pkt[:20]) == 0xFFFF
    body = parse_ip(pkt).payload
    assert csum_partial(body, pseudo_header_sum(src, dst, PROTO_TCP, len(body))) == 0xFFFF
