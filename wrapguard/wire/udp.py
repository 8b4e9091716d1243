"""UDP datagram codec (RFC 768) with the pseudo-header checksum.

A computed checksum of zero is sent as 0xFFFF (RFC 768; mandatory over IPv6, RFC 8200 8.1).
The checksum is not verified on input: the tunnel's AEAD already authenticated the packet.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from wrapguard.errors import DecodeError
from wrapguard.wire.checksum import csum_partial, finish, pseudo_header_sum

__all__ = ["UdpDatagram", "emit_udp", "parse_udp"]

_HDR = struct.Struct("!HHHH")
_PROTO_UDP = 17


@dataclass(frozen=True, slots=True)
class UdpDatagram:
    """A UDP datagram."""

    src_port: int
    dst_port: int
    payload: bytes


def parse_udp(data: bytes) -> UdpDatagram:
    """Parse a UDP datagram; bytes beyond the UDP length field are ignored."""
    if len(data) < 8:
        raise DecodeError("UDP datagram shorter than 8 bytes")
    sport, dport, length, _csum = _HDR.unpack_from(data)
    if length < 8 or length > len(data):
        raise DecodeError("bad UDP length")
    return UdpDatagram(sport, dport, bytes(data[8:length]))


def emit_udp(dgram: UdpDatagram, src_ip: bytes, dst_ip: bytes) -> bytes:
    """Serialise a datagram with its checksum over the pseudo-header of src_ip/dst_ip."""
    length = 8 + len(dgram.payload)
    if length > 0xFFFF:
        raise ValueError("UDP datagram too long")
    hdr = _HDR.pack(dgram.src_port, dgram.dst_port, length, 0)
    total = csum_partial(hdr + dgram.payload, pseudo_header_sum(src_ip, dst_ip, _PROTO_UDP, length))
    csum = finish(total) or 0xFFFF
    return hdr[:6] + csum.to_bytes(2, "big") + dgram.payload
