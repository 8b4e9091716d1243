"""Sans-IO DNS messages (RFC 1035 4.1): queries out, responses in.

`emit_query` builds a recursive query for one name; `parse_message` reads any message (header,
questions, answer / authority / additional records), following name compression pointers
(RFC 1035 4.1.4) and raising `DecodeError` on anything malformed (loops, overruns, bad
lengths). A, AAAA (RFC 3596 2.2) and name-valued records (CNAME, NS, PTR) are decoded, other
record data stays raw bytes. `answer_addresses` follows a CNAME chain to the addresses of one
name. `emit_message` writes without compression; parse and emit round-trip.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from ipaddress import IPv4Address, IPv6Address

from wrapguard.errors import DecodeError

__all__ = [
    "CLASS_IN",
    "FLAG_QR",
    "FLAG_RD",
    "FLAG_TC",
    "MAX_NAME",
    "Message",
    "Question",
    "RType",
    "Rcode",
    "Record",
    "RecordValue",
    "answer_addresses",
    "emit_message",
    "emit_query",
    "encode_name",
    "parse_message",
]

CLASS_IN = 1
FLAG_QR = 0x8000  # a response [RFC 1035 4.1.1]
FLAG_TC = 0x0200  # truncated: retry over TCP
FLAG_RD = 0x0100  # recursion desired
MAX_NAME = 255  # octets on the wire, including the length octets and the root [RFC 1035 2.3.4]
MAX_LABEL = 63
MAX_POINTERS = 64  # a name following more compression pointers than this is a loop

_HEADER = struct.Struct("!HHHHHH")
_QFIXED = struct.Struct("!HH")
_RFIXED = struct.Struct("!HHIH")


class RType(IntEnum):
    A = 1
    NS = 2
    CNAME = 5
    SOA = 6
    PTR = 12
    AAAA = 28


class Rcode(IntEnum):
    NOERROR = 0
    FORMERR = 1
    SERVFAIL = 2
    NXDOMAIN = 3
    NOTIMP = 4
    REFUSED = 5


_NAME_TYPES = (RType.CNAME, RType.NS, RType.PTR)
RecordValue = IPv4Address | IPv6Address | str | bytes


@dataclass(frozen=True, slots=True)
class Question:
    name: str  # dotted, without the trailing root dot; "" is the root
    qtype: int
    qclass: int = CLASS_IN


@dataclass(frozen=True, slots=True)
class Record:
    """A resource record; `value` is an address (A/AAAA), a name (CNAME/NS/PTR) or raw rdata."""

    name: str
    rtype: int
    rclass: int
    ttl: int
    value: RecordValue


@dataclass(frozen=True, slots=True)
class Message:
    ident: int
    flags: int
    questions: tuple[Question, ...] = ()
    answers: tuple[Record, ...] = ()
    authority: tuple[Record, ...] = ()
    additional: tuple[Record, ...] = ()

    @property
    def is_response(self) -> bool:
        return bool(self.flags & FLAG_QR)

    @property
    def truncated(self) -> bool:
        return bool(self.flags & FLAG_TC)

    @property
    def rcode(self) -> int:
        return self.flags & 0x000F


# -- names -------------------------------------------------------------------------------------


def encode_name(name: str) -> bytes:
    """Dotted name -> wire labels. ValueError for an empty label or a label/name too long."""
    name = name.removesuffix(".")
    out = bytearray()
    if name:
        for label in name.split("."):
            raw = label.encode("latin-1")
            if not 0 < len(raw) <= MAX_LABEL:
                raise ValueError(f"dns: bad label length in {name!r}")
            out += bytes([len(raw)]) + raw
    out.append(0)
    if len(out) > MAX_NAME:
        raise ValueError(f"dns: name longer than {MAX_NAME} octets")
    return bytes(out)


def _parse_name(data: bytes, offset: int) -> tuple[str, int]:
    """A (possibly compressed) name at `offset` -> (name, offset after it in the message)."""
    labels: list[str] = []
    end = -1
    pos = offset
    wire_len = 0
    for _ in range(MAX_POINTERS + MAX_NAME):
        if pos >= len(data):
            raise DecodeError("dns: name runs past the message")
        n = data[pos]
        if n & 0xC0 == 0xC0:  # compression pointer [RFC 1035 4.1.4]
            if pos + 1 >= len(data):
                raise DecodeError("dns: truncated compression pointer")
            target = (n & 0x3F) << 8 | data[pos + 1]
            if end < 0:
                end = pos + 2
            if target >= pos:  # only backwards: forward or self pointers may loop
                raise DecodeError("dns: compression pointer does not point backwards")
            pos = target
            continue
        if n & 0xC0:
            raise DecodeError("dns: unknown label type")
        if n == 0:
            if wire_len + 1 > MAX_NAME:
                raise DecodeError("dns: name too long")
            return ".".join(labels), end if end >= 0 else pos + 1
        if pos + 1 + n > len(data):
            raise DecodeError("dns: label runs past the message")
        wire_len += 1 + n
        if wire_len > MAX_NAME:
            raise DecodeError("dns: name too long")
        label = data[pos + 1 : pos + 1 + n].decode("latin-1")
        if "." in label:
            raise DecodeError("dns: label contains a dot")
        labels.append(label)
        pos += 1 + n
    raise DecodeError("dns: name too long or compression loop")


# -- messages ----------------------------------------------------------------------------------


def emit_query(ident: int, name: str, qtype: int, *, recursion: bool = True) -> bytes:
    """One standard query for (name, qtype, IN)."""
    flags = FLAG_RD if recursion else 0
    return emit_message(Message(ident, flags, (Question(name, qtype),)))


def _emit_record(rec: Record) -> bytes:
    value = rec.value
    if isinstance(value, IPv4Address | IPv6Address):
        rdata = value.packed
    elif isinstance(value, str):
        rdata = encode_name(value)
    else:
        rdata = value
    return encode_name(rec.name) + _RFIXED.pack(rec.rtype, rec.rclass, rec.ttl, len(rdata)) + rdata


def emit_message(msg: Message) -> bytes:
    sections = (msg.answers, msg.authority, msg.additional)
    out = bytearray(
        _HEADER.pack(msg.ident, msg.flags, len(msg.questions), *(len(s) for s in sections))
    )
    for q in msg.questions:
        out += encode_name(q.name) + _QFIXED.pack(q.qtype, q.qclass)
    for section in sections:
        for rec in section:
            out += _emit_record(rec)
    return bytes(out)


def _parse_record(data: bytes, offset: int) -> tuple[Record, int]:
    name, pos = _parse_name(data, offset)
    if pos + _RFIXED.size > len(data):
        raise DecodeError("dns: truncated record")
    rtype, rclass, ttl, rdlen = _RFIXED.unpack_from(data, pos)
    pos += _RFIXED.size
    end = pos + rdlen
    if end > len(data):
        raise DecodeError("dns: record data runs past the message")
    rdata = data[pos:end]
    value: RecordValue
    if rtype == RType.A and rclass == CLASS_IN:
        if rdlen != 4:
            raise DecodeError("dns: A record is not 4 bytes")
        value = IPv4Address(rdata)
    elif rtype == RType.AAAA and rclass == CLASS_IN:
        if rdlen != 16:
            raise DecodeError("dns: AAAA record is not 16 bytes")  # [RFC 3596 2.2]
        value = IPv6Address(rdata)
    elif rtype in _NAME_TYPES:
        value, name_end = _parse_name(data, pos)
        if name_end != end:
            raise DecodeError("dns: name record data length mismatch")
    else:
        value = bytes(rdata)
    return Record(name, rtype, rclass, ttl, value), end


def parse_message(data: bytes) -> Message:
    """A whole DNS message -> Message; DecodeError if malformed or with trailing bytes."""
    if len(data) < _HEADER.size:
        raise DecodeError("dns: short header")
    ident, flags, qd, an, ns, ar = _HEADER.unpack_from(data)
    pos = _HEADER.size
    questions = []
    for _ in range(qd):
        name, pos = _parse_name(data, pos)
        if pos + _QFIXED.size > len(data):
            raise DecodeError("dns: truncated question")
        qtype, qclass = _QFIXED.unpack_from(data, pos)
        pos += _QFIXED.size
        questions.append(Question(name, qtype, qclass))
    sections: list[tuple[Record, ...]] = []
    for count in (an, ns, ar):
        records = []
        for _ in range(count):
            rec, pos = _parse_record(data, pos)
            records.append(rec)
        sections.append(tuple(records))
    if pos != len(data):
        raise DecodeError("dns: trailing bytes after the message")
    return Message(ident, flags, tuple(questions), sections[0], sections[1], sections[2])


def answer_addresses(
    msg: Message, name: str, rtype: int
) -> tuple[str, list[IPv4Address | IPv6Address]]:
    """Follow CNAMEs from `name` through the answer section; (canonical name, its addresses of
    `rtype`). Names compare case-insensitively [RFC 4343]."""
    canon = name.removesuffix(".")
    for _ in range(16):  # a CNAME chain longer than this is a loop
        target = canon.lower()
        nxt = next(
            (
                r.value
                for r in msg.answers
                if r.rtype == RType.CNAME and r.name.lower() == target and isinstance(r.value, str)
            ),
            None,
        )
        if nxt is None:
            break
        canon = nxt
    target = canon.lower()
    addrs = [
        r.value
        for r in msg.answers
        if r.rtype == rtype
        and r.name.lower() == target
        and isinstance(r.value, IPv4Address | IPv6Address)
    ]
    return canon, addrs
