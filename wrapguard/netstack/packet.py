"""Builds the IP+TCP packets of one flow, with the fixed parts of both checksums precomputed.

A `FlowOut` knows the flow's addresses and ports, so a segment costs two `struct` packs, one
C checksum call over the payload and one join. IPv4 packets carry DF and identification 0,
which RFC 6864 4.1 allows for atomic datagrams; TTL and hop limit are 64.
"""

from __future__ import annotations

import struct

from wrapguard.wire.checksum import csum_bytes, pseudo_header_sum
from wrapguard.wire.tcp import ACK

__all__ = ["FlowOut"]

_TCP = struct.Struct("!HHIIBBHHH")
_IP4 = struct.Struct("!BBHHHBBH4s4s")
_IP6 = struct.Struct("!IHBB16s16s")
_PROTO_TCP = 6


class FlowOut:
    """Serialises segments of one TCP flow and appends the IP packets to `out`."""

    __slots__ = ("_ip_const", "_ph", "_tcp_const", "dport", "dst", "out", "sport", "src", "v6")

    def __init__(self, out: list[bytes], src: bytes, dst: bytes, sport: int, dport: int) -> None:
        self.out = out
        self.src = src
        self.dst = dst
        self.sport = sport
        self.dport = dport
        self.v6 = len(src) == 16
        self._ph = pseudo_header_sum(src, dst, _PROTO_TCP, 0)
        # The pseudo-header plus the ports: the part of the TCP checksum fixed per flow.
        self._tcp_const = self._ph + sport + dport
        # IPv4 header words that never change: version/IHL, flags (DF), TTL/protocol, addresses.
        self._ip_const = (
            0x4500
            + 0x4000
            + ((64 << 8) | _PROTO_TCP)
            + (int.from_bytes(src + dst, "big") % 0xFFFF if not self.v6 else 0)
        )

    def _ip_header(self, tlen: int) -> bytes:
        """The IPv4 or IPv6 header for a TCP segment of tlen bytes."""
        if self.v6:
            return _IP6.pack(0x60000000, tlen, _PROTO_TCP, 64, self.src, self.dst)
        total = 20 + tlen
        s = self._ip_const + total
        s = (s & 0xFFFF) + (s >> 16)
        s = (s & 0xFFFF) + (s >> 16)
        return _IP4.pack(0x45, 0, total, 0, 0x4000, 64, _PROTO_TCP, ~s & 0xFFFF, self.src, self.dst)

    def tcp(self, seq: int, ack: int, flags: int, window: int, opts: bytes, payload: bytes) -> None:
        """Emit one segment (RFC 9293 3.1 header, checksum over the pseudo-header)."""
        hlen = 20 + len(opts)
        tlen = hlen + len(payload)
        # One's complement sum of the header words, built arithmetically (RFC 1071 2(1)).
        s = (
            self._tcp_const
            + tlen
            + (seq >> 16)
            + (seq & 0xFFFF)
            + (ack >> 16)
            + (ack & 0xFFFF)
            + ((hlen << 10) | flags)
            + window
        )
        if opts:
            s += int.from_bytes(opts, "big") % 0xFFFF  # options are whole 32-bit words
        s = csum_bytes(payload, s)
        hdr = _TCP.pack(self.sport, self.dport, seq, ack, hlen << 2, flags, window, ~s & 0xFFFF, 0)
        iph = self._ip_header(tlen)
        self.out.append(b"".join((iph, hdr, opts, payload)))

    def tcp_run(
        self, seq: int, ack: int, window: int, buf: bytearray, start: int, count: int, mss: int
    ) -> None:
        """Emit `count` segments of `mss` bytes from buf[start:], flags ACK and no options:
        what `count` calls of `tcp` would emit, with the parts they share computed once."""
        tlen = 20 + mss
        s0 = self._tcp_const + tlen + (ack >> 16) + (ack & 0xFFFF) + ((20 << 10) | ACK) + window
        iph = self._ip_header(tlen)
        pack, append, join = _TCP.pack, self.out.append, b"".join
        sport, dport = self.sport, self.dport
        mv = memoryview(buf)
        try:
            for i in range(start, start + count * mss, mss):
                payload = bytes(mv[i : i + mss])
                s = csum_bytes(payload, s0 + (seq >> 16) + (seq & 0xFFFF))
                append(join((iph, pack(sport, dport, seq, ack, 80, ACK, window, ~s & 0xFFFF, 0),
                             payload)))  # fmt: skip
                seq = (seq + mss) & 0xFFFFFFFF
        finally:
            mv.release()
