"""TCP segment codec (RFC 9293 3.1) with the options the stack uses.

Options parsed: MSS (RFC 9293 3.2), window scale and timestamps (RFC 7323 2.2, 3.2),
SACK-permitted and SACK blocks (RFC 2018 2, 3); unknown options are skipped by length.
Flags are plain int bit masks (FIN, SYN, ...) because the stack tests them per segment.
`emit_tcp` computes the checksum over the IPv4 or IPv6 pseudo-header.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from wrapguard.errors import DecodeError
from wrapguard.wire.checksum import csum_partial, finish, pseudo_header_sum

__all__ = [
    "ACK",
    "CWR",
    "ECE",
    "FIN",
    "HEADER",
    "NO_OPTIONS",
    "PSH",
    "RST",
    "SYN",
    "URG",
    "TcpOptions",
    "TcpSegment",
    "emit_options",
    "emit_tcp",
    "parse_options",
    "parse_tcp",
]

FIN = 0x01
SYN = 0x02
RST = 0x04
PSH = 0x08
ACK = 0x10
URG = 0x20
ECE = 0x40
CWR = 0x80

HEADER = struct.Struct("!HHIIBBHHH")
_PROTO_TCP = 6

_OPT_EOL = 0
_OPT_NOP = 1
_OPT_MSS = 2
_OPT_WSCALE = 3
_OPT_SACK_PERM = 4
_OPT_SACK = 5
_OPT_TS = 8
# RFC 2018 3: at most 4 SACK blocks fit in 40 option bytes (3 with timestamps).
MAX_SACK_BLOCKS = 4


@dataclass(frozen=True, slots=True)
class TcpOptions:
    """The TCP options the stack understands; None/False/() when absent."""

    mss: int | None = None
    wscale: int | None = None
    sack_permitted: bool = False
    sack_blocks: tuple[tuple[int, int], ...] = ()
    timestamps: tuple[int, int] | None = None


NO_OPTIONS = TcpOptions()


@dataclass(frozen=True, slots=True)
class TcpSegment:
    """A TCP segment; `seq`/`ack` are raw 32-bit numbers, `window` the unscaled field."""

    src_port: int
    dst_port: int
    seq: int
    ack: int
    flags: int
    window: int
    payload: bytes = b""
    options: TcpOptions = NO_OPTIONS
    urgent: int = 0


def parse_options(raw: bytes) -> TcpOptions:
    """Parse the option bytes of a TCP header (RFC 9293 3.1, option kinds above)."""
    mss: int | None = None
    wscale: int | None = None
    sack_perm = False
    blocks: list[tuple[int, int]] = []
    ts: tuple[int, int] | None = None
    i, n = 0, len(raw)
    while i < n:
        kind = raw[i]
        if kind == _OPT_EOL:
            break
        if kind == _OPT_NOP:
            i += 1
            continue
        if i + 1 >= n:
            raise DecodeError("truncated TCP option")
        length = raw[i + 1]
        if length < 2 or i + length > n:
            raise DecodeError("bad TCP option length")
        body = raw[i + 2 : i + length]
        if kind == _OPT_MSS:
            if length != 4:
                raise DecodeError("bad MSS option")
            mss = int.from_bytes(body, "big")
        elif kind == _OPT_WSCALE:
            if length != 3:
                raise DecodeError("bad window scale option")
            wscale = body[0]
        elif kind == _OPT_SACK_PERM:
            if length != 2:
                raise DecodeError("bad SACK-permitted option")
            sack_perm = True
        elif kind == _OPT_SACK:
            if (length - 2) % 8 or length == 2:
                raise DecodeError("bad SACK option")
            for j in range(0, length - 2, 8):
                blocks.append(
                    (
                        int.from_bytes(body[j : j + 4], "big"),
                        int.from_bytes(body[j + 4 : j + 8], "big"),
                    )
                )
        elif kind == _OPT_TS:
            if length != 10:
                raise DecodeError("bad timestamps option")
            ts = (int.from_bytes(body[:4], "big"), int.from_bytes(body[4:], "big"))
        i += length
    return TcpOptions(mss, wscale, sack_perm, tuple(blocks), ts)


def emit_options(opts: TcpOptions) -> bytes:
    """Serialise options, NOP-padded to a multiple of 4 bytes (at most 40)."""
    out = bytearray()
    if opts.mss is not None:
        out += bytes((_OPT_MSS, 4)) + opts.mss.to_bytes(2, "big")
    if opts.sack_permitted and opts.timestamps is not None:
        out += bytes((_OPT_SACK_PERM, 2, _OPT_TS, 10))
    elif opts.timestamps is not None:
        out += bytes((_OPT_NOP, _OPT_NOP, _OPT_TS, 10))
    elif opts.sack_permitted:
        out += bytes((_OPT_NOP, _OPT_NOP, _OPT_SACK_PERM, 2))
    if opts.timestamps is not None:
        out += opts.timestamps[0].to_bytes(4, "big") + opts.timestamps[1].to_bytes(4, "big")
    if opts.wscale is not None:
        out += bytes((_OPT_NOP, _OPT_WSCALE, 3, opts.wscale))
    if opts.sack_blocks:
        out += bytes((_OPT_NOP, _OPT_NOP, _OPT_SACK, 2 + 8 * len(opts.sack_blocks)))
        for left, right in opts.sack_blocks:
            out += left.to_bytes(4, "big") + right.to_bytes(4, "big")
    if len(out) > 40:
        raise ValueError("TCP options longer than 40 bytes")
    return bytes(out)


def parse_tcp(data: bytes) -> TcpSegment:
    """Parse a TCP segment. The checksum is not verified (the tunnel AEAD already was)."""
    if len(data) < 20:
        raise DecodeError("TCP segment shorter than 20 bytes")
    sport, dport, seq, ack, off, flags, window, _csum, urgent = HEADER.unpack_from(data)
    doff = (off >> 4) * 4
    if doff < 20 or doff > len(data):
        raise DecodeError("bad TCP data offset")
    options = parse_options(bytes(data[20:doff])) if doff > 20 else NO_OPTIONS
    return TcpSegment(sport, dport, seq, ack, flags, window, bytes(data[doff:]), options, urgent)


def emit_tcp(seg: TcpSegment, src_ip: bytes, dst_ip: bytes) -> bytes:
    """Serialise a segment with its checksum over the pseudo-header of src_ip/dst_ip."""
    opts = emit_options(seg.options) if seg.options != NO_OPTIONS else b""
    hlen = 20 + len(opts)
    hdr = HEADER.pack(
        seg.src_port,
        seg.dst_port,
        seg.seq,
        seg.ack,
        (hlen // 4) << 4,
        seg.flags,
        seg.window,
        0,
        seg.urgent,
    )
    body = hdr + opts + seg.payload
    total = csum_partial(body, pseudo_header_sum(src_ip, dst_ip, _PROTO_TCP, len(body)))
    csum = finish(total)
    return body[:16] + csum.to_bytes(2, "big") + body[18:]
