"""ICMP (RFC 792) and ICMPv6 (RFC 4443) codecs: echo, destination unreachable.

An `IcmpMessage` keeps the type, code, the 4-byte "rest of header" (identifier and sequence
for echo, unused for unreachable) and the body. ICMPv6 checksums cover the IPv6
pseudo-header (RFC 4443 2.3); ICMPv4 checksums cover the message only (RFC 792).
Error messages quote the offending packet: RFC 1812 4.3.2.3 (v4, up to 576 bytes in all)
and RFC 4443 2.4(c) (v6, up to the minimum MTU of 1280).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from wrapguard.errors import DecodeError
from wrapguard.wire.checksum import csum_partial, finish, pseudo_header_sum

__all__ = [
    "ICMPV6_DEST_UNREACH",
    "ICMPV6_ECHO_REPLY",
    "ICMPV6_ECHO_REQUEST",
    "ICMPV6_PACKET_TOO_BIG",
    "ICMP_DEST_UNREACH",
    "ICMP_ECHO_REPLY",
    "ICMP_ECHO_REQUEST",
    "IcmpMessage",
    "emit_icmp",
    "parse_icmp",
    "quote_limit",
]

ICMP_ECHO_REPLY = 0
ICMP_DEST_UNREACH = 3
ICMP_ECHO_REQUEST = 8
ICMPV6_DEST_UNREACH = 1
ICMPV6_PACKET_TOO_BIG = 2
ICMPV6_ECHO_REQUEST = 128
ICMPV6_ECHO_REPLY = 129

_HDR = struct.Struct("!BBH4s")
_PROTO_ICMPV6 = 58


@dataclass(frozen=True, slots=True)
class IcmpMessage:
    """An ICMP or ICMPv6 message."""

    type: int
    code: int
    rest: bytes = b"\x00\x00\x00\x00"
    payload: bytes = b""

    @property
    def ident(self) -> int:
        """Echo identifier (RFC 792 echo, RFC 4443 4.1)."""
        return int.from_bytes(self.rest[:2], "big")

    @property
    def sequence(self) -> int:
        """Echo sequence number."""
        return int.from_bytes(self.rest[2:], "big")


def parse_icmp(data: bytes) -> IcmpMessage:
    """Parse an ICMP or ICMPv6 message (same 8-byte layout); checksum not verified."""
    if len(data) < 8:
        raise DecodeError("ICMP message shorter than 8 bytes")
    typ, code, _csum, rest = _HDR.unpack_from(data)
    return IcmpMessage(typ, code, rest, bytes(data[8:]))


def emit_icmp(msg: IcmpMessage, src_ip: bytes | None = None, dst_ip: bytes | None = None) -> bytes:
    """Serialise a message; give src_ip/dst_ip (16 bytes) for ICMPv6's pseudo-header."""
    if len(msg.rest) != 4:
        raise ValueError("ICMP rest-of-header must be 4 bytes")
    body = _HDR.pack(msg.type, msg.code, 0, msg.rest) + msg.payload
    initial = 0
    if src_ip is not None and dst_ip is not None:
        initial = pseudo_header_sum(src_ip, dst_ip, _PROTO_ICMPV6, len(body))
    csum = finish(csum_partial(body, initial))
    return body[:2] + csum.to_bytes(2, "big") + body[4:]


def quote_limit(version: int) -> int:
    """How many bytes of the offending packet an error message may quote."""
    # v4: 576 total minus 20 (IP) and 8 (ICMP); v6: 1280 minus 40 and 8.
    return 548 if version == 4 else 1232
