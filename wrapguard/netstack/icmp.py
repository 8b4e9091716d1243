"""ICMP for the stack: echo replies, port unreachables we send, and errors we receive.

Pure functions over parsed packets: `echo_reply` (RFC 792 echo, RFC 4443 4.2),
`port_unreachable` quoting the offending packet (RFC 1122 4.1.3.1, RFC 1812 4.3.2.3,
RFC 4443 3.1), `unreach_errno` (codes mapped the way Linux reports them to sockets) and
`parse_quote`, which finds the flow an ICMP error talks about (RFC 1122 3.2.2.1, RFC 5927 4).
"""

from __future__ import annotations

import errno
from typing import NamedTuple

from wrapguard.wire import icmp as ic
from wrapguard.wire.ip import PROTO_ICMP, PROTO_ICMPV6, IPv4Packet, IPv6Packet, emit_ip

__all__ = ["Quote", "echo_reply", "parse_quote", "port_unreachable", "unreach_errno"]

_UNREACH_V4 = {
    0: errno.ENETUNREACH,
    1: errno.EHOSTUNREACH,
    2: errno.ENOPROTOOPT,
    3: errno.ECONNREFUSED,
    9: errno.ENETUNREACH,
    10: errno.EHOSTUNREACH,
    13: errno.EHOSTUNREACH,
}
_UNREACH_V6 = {
    0: errno.ENETUNREACH,
    1: errno.EACCES,
    3: errno.EHOSTUNREACH,
    4: errno.ECONNREFUSED,
}


class Quote(NamedTuple):
    """The flow named by the header an ICMP error quotes (src is ours)."""

    proto: int
    src: bytes
    dst: bytes
    sport: int
    dport: int
    seq: int


def _wrap(src: bytes, dst: bytes, v4: bool, msg: ic.IcmpMessage) -> bytes:
    if v4:
        return emit_ip(IPv4Packet(src, dst, PROTO_ICMP, ic.emit_icmp(msg)))
    return emit_ip(IPv6Packet(src, dst, PROTO_ICMPV6, ic.emit_icmp(msg, src, dst)))


def echo_reply(pkt: IPv4Packet | IPv6Packet, msg: ic.IcmpMessage) -> bytes | None:
    """The reply to an echo request addressed to us, or None if `msg` is not one."""
    v4 = pkt.version == 4
    if msg.type != (ic.ICMP_ECHO_REQUEST if v4 else ic.ICMPV6_ECHO_REQUEST):
        return None
    kind = ic.ICMP_ECHO_REPLY if v4 else ic.ICMPV6_ECHO_REPLY
    return _wrap(pkt.dst, pkt.src, v4, ic.IcmpMessage(kind, 0, msg.rest, msg.payload))


def port_unreachable(pkt: IPv4Packet | IPv6Packet) -> bytes:
    """A destination unreachable (port) quoting as much of `pkt` as the rules allow."""
    quoted = emit_ip(pkt)[: ic.quote_limit(pkt.version)]
    v4 = pkt.version == 4
    kind = ic.ICMP_DEST_UNREACH if v4 else ic.ICMPV6_DEST_UNREACH
    return _wrap(pkt.dst, pkt.src, v4, ic.IcmpMessage(kind, 3 if v4 else 4, payload=quoted))


def unreach_errno(v4: bool, msg: ic.IcmpMessage) -> int | None:
    """The errno a destination unreachable means, or None for other messages."""
    if msg.type != (ic.ICMP_DEST_UNREACH if v4 else ic.ICMPV6_DEST_UNREACH):
        return None
    return (_UNREACH_V4 if v4 else _UNREACH_V6).get(msg.code, errno.EHOSTUNREACH)


def parse_quote(q: bytes, v4: bool) -> Quote | None:
    """The quoted IP header and first 8 transport bytes (ports, TCP sequence number)."""
    if v4:
        if len(q) < 20 or q[0] >> 4 != 4:
            return None
        ihl = (q[0] & 0x0F) * 4
        proto, src, dst = q[9], q[12:16], q[16:20]
    else:
        if len(q) < 40 or q[0] >> 4 != 6:
            return None
        ihl, proto, src, dst = 40, q[6], q[8:24], q[24:40]
    t = q[ihl : ihl + 8]
    if len(t) < 8:
        return None
    return Quote(
        proto,
        src,
        dst,
        int.from_bytes(t[0:2], "big"),
        int.from_bytes(t[2:4], "big"),
        int.from_bytes(t[4:8], "big"),
    )
