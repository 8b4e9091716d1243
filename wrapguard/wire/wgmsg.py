"""Codecs for the four WireGuard message types [W 5.4.2-5.4.7].

Initiation (type 1, 148 bytes), response (type 2, 92 bytes), cookie reply (type 3, 64 bytes)
and transport data (type 4, 16-byte header + AEAD payload). All integers are little-endian and
the three reserved bytes after the type must be zero. `parse()` and `emit()` mirror each other
and round-trip; malformed input raises `DecodeError`. The per-packet transport path in
wrapguard.tunnel reads the data header inline for speed; this module stays the reference.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from wrapguard.errors import DecodeError

MSG_INITIATION: Final = 1
MSG_RESPONSE: Final = 2
MSG_COOKIE_REPLY: Final = 3
MSG_TRANSPORT: Final = 4

INITIATION_LEN: Final = 148
RESPONSE_LEN: Final = 92
COOKIE_REPLY_LEN: Final = 64
TRANSPORT_HEADER_LEN: Final = 16
AEAD_TAG_LEN: Final = 16
MIN_TRANSPORT_LEN: Final = TRANSPORT_HEADER_LEN + AEAD_TAG_LEN  # a keepalive [W 5.4.6]
MAC_LEN: Final = 16

_INIT = struct.Struct("<I I 32s 48s 28s 16s 16s")
_RESP = struct.Struct("<I I I 32s 16s 16s 16s")
_COOKIE = struct.Struct("<I I 24s 32s")
_DATA_HDR = struct.Struct("<I I Q")


@dataclass(frozen=True, slots=True)
class Initiation:
    """[W 5.4.2] msg.sender, msg.ephemeral, msg.static (AEAD), msg.timestamp (AEAD), macs."""

    sender: int
    ephemeral: bytes
    encrypted_static: bytes
    encrypted_timestamp: bytes
    mac1: bytes = bytes(MAC_LEN)
    mac2: bytes = bytes(MAC_LEN)


@dataclass(frozen=True, slots=True)
class Response:
    """[W 5.4.3] msg.sender, msg.receiver, msg.ephemeral, msg.empty (AEAD of nothing), macs."""

    sender: int
    receiver: int
    ephemeral: bytes
    encrypted_nothing: bytes
    mac1: bytes = bytes(MAC_LEN)
    mac2: bytes = bytes(MAC_LEN)


@dataclass(frozen=True, slots=True)
class CookieReply:
    """[W 5.4.7] msg.receiver, msg.nonce (24 bytes), msg.cookie (XAEAD, 16 + 16)."""

    receiver: int
    nonce: bytes
    encrypted_cookie: bytes


@dataclass(frozen=True, slots=True)
class Transport:
    """[W 5.4.6] msg.receiver, msg.counter, msg.packet (AEAD ciphertext with tag)."""

    receiver: int
    counter: int
    encrypted: bytes


Message = Initiation | Response | CookieReply | Transport


def _check_len(name: str, value: bytes, n: int) -> None:
    if len(value) != n:
        raise ValueError(f"{name} must be {n} bytes, got {len(value)}")


def parse(data: bytes) -> Message:
    """Decode one datagram; raise DecodeError on anything malformed."""
    n = len(data)
    if n < 4:
        raise DecodeError("datagram shorter than a message header")
    if data[1] | data[2] | data[3]:
        raise DecodeError("reserved bytes are not zero")
    kind = data[0]
    if kind == MSG_INITIATION:
        if n != INITIATION_LEN:
            raise DecodeError(f"initiation must be {INITIATION_LEN} bytes, got {n}")
        _, sender, eph, static, ts, mac1, mac2 = _INIT.unpack(data)
        return Initiation(sender, eph, static, ts, mac1, mac2)
    if kind == MSG_RESPONSE:
        if n != RESPONSE_LEN:
            raise DecodeError(f"response must be {RESPONSE_LEN} bytes, got {n}")
        _, sender, receiver, eph, empty, mac1, mac2 = _RESP.unpack(data)
        return Response(sender, receiver, eph, empty, mac1, mac2)
    if kind == MSG_COOKIE_REPLY:
        if n != COOKIE_REPLY_LEN:
            raise DecodeError(f"cookie reply must be {COOKIE_REPLY_LEN} bytes, got {n}")
        _, receiver, nonce, cookie = _COOKIE.unpack(data)
        return CookieReply(receiver, nonce, cookie)
    if kind == MSG_TRANSPORT:
        if n < MIN_TRANSPORT_LEN:
            raise DecodeError(f"transport message shorter than {MIN_TRANSPORT_LEN} bytes")
        _, receiver, counter = _DATA_HDR.unpack_from(data)
        return Transport(receiver, counter, bytes(data[TRANSPORT_HEADER_LEN:]))
    raise DecodeError(f"unknown message type {kind}")


def emit(msg: Message) -> bytes:
    """Encode a message; raise ValueError if a field has the wrong size (local misuse)."""
    if isinstance(msg, Initiation):
        _check_len("ephemeral", msg.ephemeral, 32)
        _check_len("encrypted_static", msg.encrypted_static, 48)
        _check_len("encrypted_timestamp", msg.encrypted_timestamp, 28)
        _check_len("mac1", msg.mac1, MAC_LEN)
        _check_len("mac2", msg.mac2, MAC_LEN)
        return _INIT.pack(
            MSG_INITIATION,
            msg.sender,
            msg.ephemeral,
            msg.encrypted_static,
            msg.encrypted_timestamp,
            msg.mac1,
            msg.mac2,
        )
    if isinstance(msg, Response):
        _check_len("ephemeral", msg.ephemeral, 32)
        _check_len("encrypted_nothing", msg.encrypted_nothing, 16)
        _check_len("mac1", msg.mac1, MAC_LEN)
        _check_len("mac2", msg.mac2, MAC_LEN)
        return _RESP.pack(
            MSG_RESPONSE,
            msg.sender,
            msg.receiver,
            msg.ephemeral,
            msg.encrypted_nothing,
            msg.mac1,
            msg.mac2,
        )
    if isinstance(msg, CookieReply):
        _check_len("nonce", msg.nonce, 24)
        _check_len("encrypted_cookie", msg.encrypted_cookie, 32)
        return _COOKIE.pack(MSG_COOKIE_REPLY, msg.receiver, msg.nonce, msg.encrypted_cookie)
    if len(msg.encrypted) < AEAD_TAG_LEN:
        raise ValueError("transport payload must hold at least the 16-byte tag")
    return transport_header(msg.receiver, msg.counter) + msg.encrypted


def transport_header(receiver: int, counter: int) -> bytes:
    """The 16-byte header of a transport data message [W 5.4.6]."""
    return _DATA_HDR.pack(MSG_TRANSPORT, receiver, counter)


def macs_offset(data: bytes) -> int:
    """Offset of mac1 in an initiation or response: mac1 covers everything before it [W 5.4.4]."""
    return len(data) - 2 * MAC_LEN
