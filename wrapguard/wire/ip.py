"""IPv4 (RFC 791) and IPv6 (RFC 8200) packet codecs for the userspace stack.

`parse_ip` dispatches on the version nibble. IPv4 options are skipped; fragments of either
family raise `Fragmented` (a DecodeError) so the stack can count them as a distinct drop.
IPv6 hop-by-hop, destination-options and routing headers are skipped (RFC 8200 4.3-4.6).
`emit_*` always write a minimal header (no options, no extension headers) with DF set on v4.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from wrapguard.errors import DecodeError
from wrapguard.wire.checksum import checksum

__all__ = [
    "PROTO_ICMP",
    "PROTO_ICMPV6",
    "PROTO_TCP",
    "PROTO_UDP",
    "Fragmented",
    "IPv4Packet",
    "IPv6Packet",
    "emit_ip",
    "emit_ipv4",
    "emit_ipv6",
    "parse_ip",
    "parse_ipv4",
    "parse_ipv6",
]

PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17
PROTO_ICMPV6 = 58

# RFC 8200 4.1: extension headers we step over (hop-by-hop 0, routing 43, dest-opts 60).
_SKIPPABLE_EXT = frozenset({0, 43, 60})
_EXT_FRAGMENT = 44

_V4 = struct.Struct("!BBHHHBBH4s4s")
_V6 = struct.Struct("!IHBB16s16s")


class Fragmented(DecodeError):
    """An IP fragment: the stack does not reassemble and counts it as a drop."""


@dataclass(frozen=True, slots=True)
class IPv4Packet:
    """An IPv4 packet: header fields we keep and the payload after the options."""

    src: bytes
    dst: bytes
    proto: int
    payload: bytes
    ttl: int = 64
    ident: int = 0
    tos: int = 0
    dont_fragment: bool = True

    version = 4


@dataclass(frozen=True, slots=True)
class IPv6Packet:
    """An IPv6 packet; `proto` is the upper-layer protocol after skipped extension headers."""

    src: bytes
    dst: bytes
    proto: int
    payload: bytes
    ttl: int = 64  # the hop limit, named like IPv4's for the stack's sake
    traffic_class: int = 0
    flow_label: int = 0

    version = 6


def parse_ipv4(data: bytes) -> IPv4Packet:
    """Parse an IPv4 packet (RFC 791 3.1); trailing bytes past Total Length are ignored."""
    if len(data) < 20:
        raise DecodeError("IPv4 packet shorter than 20 bytes")
    vihl, tos, total, ident, frag, ttl, proto, _csum, src, dst = _V4.unpack_from(data)
    if vihl >> 4 != 4:
        raise DecodeError("not an IPv4 packet")
    ihl = (vihl & 0x0F) * 4
    if ihl < 20 or total < ihl or total > len(data):
        raise DecodeError("bad IPv4 header or total length")
    # MF set or a non-zero fragment offset: a fragment (RFC 791 3.2).
    if frag & 0x3FFF:
        raise Fragmented("IPv4 fragment")
    return IPv4Packet(src, dst, proto, bytes(data[ihl:total]), ttl, ident, tos, bool(frag & 0x4000))


def parse_ipv6(data: bytes) -> IPv6Packet:
    """Parse an IPv6 packet (RFC 8200 3), stepping over skippable extension headers."""
    if len(data) < 40:
        raise DecodeError("IPv6 packet shorter than 40 bytes")
    vtcfl, plen, nxt, hlim, src, dst = _V6.unpack_from(data)
    if vtcfl >> 28 != 6:
        raise DecodeError("not an IPv6 packet")
    end = 40 + plen
    if end > len(data):
        raise DecodeError("IPv6 payload length beyond the packet")
    off = 40
    while nxt in _SKIPPABLE_EXT or nxt == _EXT_FRAGMENT:
        if nxt == _EXT_FRAGMENT:
            raise Fragmented("IPv6 fragment")
        if off + 8 > end:
            raise DecodeError("truncated IPv6 extension header")
        nxt, hdr_len = data[off], (data[off + 1] + 1) * 8
        off += hdr_len
        if off > end:
            raise DecodeError("IPv6 extension header beyond the payload")
    return IPv6Packet(
        src, dst, nxt, bytes(data[off:end]), hlim, (vtcfl >> 20) & 0xFF, vtcfl & 0xFFFFF
    )


def parse_ip(data: bytes) -> IPv4Packet | IPv6Packet:
    """Parse an IPv4 or IPv6 packet by its version nibble."""
    if not data:
        raise DecodeError("empty packet")
    version = data[0] >> 4
    if version == 4:
        return parse_ipv4(data)
    if version == 6:
        return parse_ipv6(data)
    raise DecodeError(f"unknown IP version {version}")


def emit_ipv4(pkt: IPv4Packet) -> bytes:
    """Serialise an IPv4 packet with a 20-byte header and its header checksum."""
    if len(pkt.src) != 4 or len(pkt.dst) != 4:
        raise ValueError("IPv4 addresses must be 4 bytes")
    total = 20 + len(pkt.payload)
    if total > 0xFFFF:
        raise ValueError("IPv4 packet too long")
    frag = 0x4000 if pkt.dont_fragment else 0
    hdr = _V4.pack(0x45, pkt.tos, total, pkt.ident, frag, pkt.ttl, pkt.proto, 0, pkt.src, pkt.dst)
    csum = checksum(hdr)
    return hdr[:10] + csum.to_bytes(2, "big") + hdr[12:] + pkt.payload


def emit_ipv6(pkt: IPv6Packet) -> bytes:
    """Serialise an IPv6 packet with a fixed header and no extension headers."""
    if len(pkt.src) != 16 or len(pkt.dst) != 16:
        raise ValueError("IPv6 addresses must be 16 bytes")
    if len(pkt.payload) > 0xFFFF:
        raise ValueError("IPv6 payload too long (no jumbograms)")
    vtcfl = (6 << 28) | (pkt.traffic_class << 20) | pkt.flow_label
    return _V6.pack(vtcfl, len(pkt.payload), pkt.proto, pkt.ttl, pkt.src, pkt.dst) + pkt.payload


def emit_ip(pkt: IPv4Packet | IPv6Packet) -> bytes:
    """Serialise either family."""
    if isinstance(pkt, IPv4Packet):
        return emit_ipv4(pkt)
    return emit_ipv6(pkt)
