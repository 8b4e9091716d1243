"""Frames of the local channel between the preload shim and the launcher (docs/channel.md).

Sans-IO codec: `parse_request`/`emit_request` and `parse_reply`/`emit_reply` mirror each other
and round-trip; any malformed frame (bad length, version, op, short or trailing body, bad
address family) raises `DecodeError`. A frame is `u32 body_len` then the body (at most
`MAX_BODY` bytes); `frame_body_len()` tells a stream reader how much to read after the prefix.
The secret is compared in constant time (`secret_matches`).
"""

from __future__ import annotations

import hmac
import struct
from dataclasses import dataclass
from enum import IntEnum
from ipaddress import IPv4Address, IPv6Address
from typing import TypeVar

from wrapguard.errors import DecodeError

__all__ = [
    "ADDR_LEN",
    "FLAG_WAIT",
    "MAX_BODY",
    "PREFIX_LEN",
    "SECRET_LEN",
    "TOKEN_LEN",
    "VERSION",
    "Action",
    "Address",
    "ConnectReply",
    "ConnectRequest",
    "HelloReply",
    "HelloRequest",
    "ListenReply",
    "ListenRequest",
    "Op",
    "PeerAction",
    "PeerReply",
    "PeerRequest",
    "Proto",
    "Reply",
    "Request",
    "StatusAction",
    "StatusReply",
    "StatusRequest",
    "UnlistenReply",
    "UnlistenRequest",
    "emit_address",
    "emit_reply",
    "emit_request",
    "frame_body_len",
    "parse_address",
    "parse_reply",
    "parse_request",
    "secret_matches",
]

VERSION = 1
MAX_BODY = 512
PREFIX_LEN = 4
SECRET_LEN = 32
TOKEN_LEN = 16
ADDR_LEN = 19
FLAG_WAIT = 0x0001
MAX_VERSION_TEXT = 255

_PREFIX = struct.Struct("!I")
_REQ_HDR = struct.Struct("!BBH32s")  # version, op, flags, secret
_REP_HDR = struct.Struct("!BBHi")  # version, op, action, errno
_ADDR = struct.Struct("!B16sH")
_HELLO = struct.Struct("!IB")
_E = TypeVar("_E", bound=IntEnum)


class Op(IntEnum):
    HELLO = 1
    CONNECT = 2
    STATUS = 3
    LISTEN = 4
    UNLISTEN = 5
    PEER = 6


class Proto(IntEnum):
    TCP = 6
    UDP = 17


class Action(IntEnum):
    """CONNECT reply actions (docs/channel.md, op table)."""

    DIRECT = 0  # call the real connect
    TUNNEL = 1  # connect to the loopback data address, send the token
    FAIL = 2  # fail with errno


class StatusAction(IntEnum):
    DONE = 0  # errno is the outcome: 0 = the tunnel connection is open
    PENDING = 1  # only without WAIT


class PeerAction(IntEnum):
    FOUND = 0
    UNKNOWN = 2


@dataclass(frozen=True, slots=True)
class Address:
    """An IP endpoint; IPv4 on the wire is the first 4 of 16 address bytes, family 4."""

    ip: IPv4Address | IPv6Address
    port: int

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 0xFFFF:
            raise ValueError(f"port out of range: {self.port}")

    @property
    def family(self) -> int:
        return self.ip.version


@dataclass(frozen=True, slots=True)
class HelloRequest:
    pid: int
    version: str


@dataclass(frozen=True, slots=True)
class ConnectRequest:
    proto: Proto
    dst: Address


@dataclass(frozen=True, slots=True)
class StatusRequest:
    token: bytes
    wait: bool


@dataclass(frozen=True, slots=True)
class ListenRequest:
    proto: Proto
    addr: Address


@dataclass(frozen=True, slots=True)
class UnlistenRequest:
    proto: Proto
    addr: Address


@dataclass(frozen=True, slots=True)
class PeerRequest:
    addr: Address


Request = (
    HelloRequest | ConnectRequest | StatusRequest | ListenRequest | UnlistenRequest | PeerRequest
)


@dataclass(frozen=True, slots=True)
class HelloReply:
    errno: int = 0


@dataclass(frozen=True, slots=True)
class ConnectReply:
    """DIRECT, FAIL(errno), or TUNNEL with the loopback data address, the token and, when the
    launcher knows it, our tunnel source address (what getsockname() reports)."""

    action: Action
    errno: int = 0
    loopback: Address | None = None
    token: bytes = b""
    source: Address | None = None


@dataclass(frozen=True, slots=True)
class StatusReply:
    action: StatusAction
    errno: int = 0


@dataclass(frozen=True, slots=True)
class ListenReply:
    errno: int = 0


@dataclass(frozen=True, slots=True)
class UnlistenReply:
    errno: int = 0


@dataclass(frozen=True, slots=True)
class PeerReply:
    action: PeerAction
    peer: Address | None = None


Reply = HelloReply | ConnectReply | StatusReply | ListenReply | UnlistenReply | PeerReply


def secret_matches(expected: bytes, got: bytes) -> bool:
    """Constant-time secret comparison (never `==` on secrets)."""
    return hmac.compare_digest(expected, got)


def frame_body_len(prefix: bytes) -> int:
    """The body length announced by a 4-byte frame prefix; DecodeError if out of range."""
    if len(prefix) != PREFIX_LEN:
        raise DecodeError("ipc: short length prefix")
    (n,) = _PREFIX.unpack(prefix)
    if n > MAX_BODY:
        raise DecodeError(f"ipc: body length {n} > {MAX_BODY}")
    return int(n)


# -- addresses -------------------------------------------------------------------------------


def emit_address(addr: Address) -> bytes:
    raw = addr.ip.packed.ljust(16, b"\0")
    return _ADDR.pack(addr.family, raw, addr.port)


def parse_address(data: bytes, offset: int = 0) -> Address:
    if len(data) - offset < ADDR_LEN:
        raise DecodeError("ipc: short address")
    family, raw, port = _ADDR.unpack_from(data, offset)
    ip: IPv4Address | IPv6Address
    if family == 4:
        if any(raw[4:]):
            raise DecodeError("ipc: IPv4 address with non-zero padding")
        ip = IPv4Address(raw[:4])
    elif family == 6:
        ip = IPv6Address(raw)
    else:
        raise DecodeError(f"ipc: unknown address family {family}")
    return Address(ip, port)


def _proto(value: int) -> Proto:
    try:
        return Proto(value)
    except ValueError:
        raise DecodeError(f"ipc: unknown protocol {value}") from None


def _op(value: int) -> Op:
    try:
        return Op(value)
    except ValueError:
        raise DecodeError(f"ipc: unknown op {value}") from None


def _frame(payload: bytes) -> bytes:
    if len(payload) > MAX_BODY:
        raise ValueError(f"ipc: frame body {len(payload)} > {MAX_BODY}")
    return _PREFIX.pack(len(payload)) + payload


def _split(data: bytes, header: struct.Struct) -> bytes:
    """Check the prefix against the data and return what follows the fixed header."""
    n = frame_body_len(data[:PREFIX_LEN])
    if len(data) != PREFIX_LEN + n:
        raise DecodeError("ipc: frame length does not match its prefix")
    if n < header.size:
        raise DecodeError("ipc: short header")
    return data[PREFIX_LEN + header.size :]


def _exact(body: bytes, size: int, what: str) -> None:
    if len(body) != size:
        raise DecodeError(f"ipc: {what} body is {len(body)} bytes, expected {size}")


# -- requests --------------------------------------------------------------------------------


def emit_request(req: Request, secret: bytes) -> bytes:
    if len(secret) != SECRET_LEN:
        raise ValueError("ipc: the secret is 32 bytes")
    flags = 0
    match req:
        case HelloRequest(pid, version):
            text = version.encode("utf-8")
            if len(text) > MAX_VERSION_TEXT:
                raise ValueError("ipc: version text too long")
            op, body = Op.HELLO, _HELLO.pack(pid, len(text)) + text
        case ConnectRequest(proto, dst):
            op, body = Op.CONNECT, bytes([proto]) + emit_address(dst)
        case StatusRequest(token, wait):
            if len(token) != TOKEN_LEN:
                raise ValueError("ipc: a token is 16 bytes")
            op, body, flags = Op.STATUS, token, FLAG_WAIT if wait else 0
        case ListenRequest(proto, addr):
            op, body = Op.LISTEN, bytes([proto]) + emit_address(addr)
        case UnlistenRequest(proto, addr):
            op, body = Op.UNLISTEN, bytes([proto]) + emit_address(addr)
        case PeerRequest(addr):
            op, body = Op.PEER, emit_address(addr)
    return _frame(_REQ_HDR.pack(VERSION, op, flags, secret) + body)


def parse_request(data: bytes) -> tuple[bytes, Request]:
    """One whole request frame (prefix included) -> (secret, request)."""
    body = _split(data, _REQ_HDR)
    version, op_num, flags, secret = _REQ_HDR.unpack_from(data, PREFIX_LEN)
    if version != VERSION:
        raise DecodeError(f"ipc: unknown version {version}")
    op = _op(op_num)
    if op is not Op.STATUS and flags != 0:
        raise DecodeError("ipc: unknown flags")
    req: Request
    match op:
        case Op.HELLO:
            if len(body) < _HELLO.size:
                raise DecodeError("ipc: short HELLO")
            pid, n = _HELLO.unpack_from(body)
            _exact(body, _HELLO.size + n, "HELLO")
            try:
                text = body[_HELLO.size :].decode("utf-8")
            except UnicodeDecodeError:
                raise DecodeError("ipc: HELLO version is not UTF-8") from None
            req = HelloRequest(pid, text)
        case Op.CONNECT | Op.LISTEN | Op.UNLISTEN:
            _exact(body, 1 + ADDR_LEN, op.name)
            proto, addr = _proto(body[0]), parse_address(body, 1)
            if op is Op.CONNECT:
                req = ConnectRequest(proto, addr)
            elif op is Op.LISTEN:
                req = ListenRequest(proto, addr)
            else:
                req = UnlistenRequest(proto, addr)
        case Op.STATUS:
            _exact(body, TOKEN_LEN, "STATUS")
            if flags & ~FLAG_WAIT:
                raise DecodeError("ipc: unknown STATUS flags")
            req = StatusRequest(bytes(body), bool(flags & FLAG_WAIT))
        case Op.PEER:
            _exact(body, ADDR_LEN, "PEER")
            req = PeerRequest(parse_address(body))
    return bytes(secret), req


# -- replies ---------------------------------------------------------------------------------


def emit_reply(rep: Reply) -> bytes:
    body = b""
    action, err = 0, 0
    match rep:
        case HelloReply(err):
            op = Op.HELLO
        case ConnectReply(act, err, loopback, token, source):
            op, action = Op.CONNECT, act
            if act is Action.TUNNEL:
                if loopback is None or len(token) != TOKEN_LEN:
                    raise ValueError("ipc: TUNNEL needs a loopback address and a 16-byte token")
                body = emit_address(loopback) + token
                if source is not None:
                    body += emit_address(source)
        case StatusReply(act, err):
            op, action = Op.STATUS, act
        case ListenReply(err):
            op = Op.LISTEN
        case UnlistenReply(err):
            op = Op.UNLISTEN
        case PeerReply(act, peer):
            op, action = Op.PEER, act
            if act is PeerAction.FOUND:
                if peer is None:
                    raise ValueError("ipc: PEER FOUND needs the peer address")
                body = emit_address(peer)
    return _frame(_REP_HDR.pack(VERSION, op, action, err) + body)


def _enum(cls: type[_E], value: int, what: str) -> _E:
    try:
        return cls(value)
    except ValueError:
        raise DecodeError(f"ipc: bad {what} action {value}") from None


def parse_reply(data: bytes) -> Reply:
    """One whole reply frame (prefix included) -> the reply of its op."""
    body = _split(data, _REP_HDR)
    version, op_num, action, err = _REP_HDR.unpack_from(data, PREFIX_LEN)
    if version != VERSION:
        raise DecodeError(f"ipc: unknown version {version}")
    op = _op(op_num)
    if err < 0:
        raise DecodeError("ipc: negative errno")
    match op:
        case Op.CONNECT:
            act = _enum(Action, action, "CONNECT")
            if act is not Action.TUNNEL:
                _exact(body, 0, "CONNECT reply")
                return ConnectReply(act, err)
            if len(body) not in (ADDR_LEN + TOKEN_LEN, 2 * ADDR_LEN + TOKEN_LEN):
                raise DecodeError("ipc: bad TUNNEL body length")
            loopback = parse_address(body)
            token = bytes(body[ADDR_LEN : ADDR_LEN + TOKEN_LEN])
            source = None
            if len(body) > ADDR_LEN + TOKEN_LEN:
                source = parse_address(body, ADDR_LEN + TOKEN_LEN)
            return ConnectReply(act, err, loopback, token, source)
        case Op.PEER:
            pact = _enum(PeerAction, action, "PEER")
            if pact is PeerAction.FOUND:
                _exact(body, ADDR_LEN, "PEER reply")
                return PeerReply(pact, parse_address(body))
            _exact(body, 0, "PEER reply")
            return PeerReply(pact)
        case Op.STATUS:
            _exact(body, 0, "STATUS reply")
            return StatusReply(_enum(StatusAction, action, "STATUS"), err)
    _exact(body, 0, f"{op.name} reply")
    if action != 0:
        raise DecodeError(f"ipc: bad {op.name} action {action}")
    if op is Op.HELLO:
        return HelloReply(err)
    if op is Op.LISTEN:
        return ListenReply(err)
    return UnlistenReply(err)
