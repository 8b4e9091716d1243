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
    "FLAG_CONNECT_LO4",
    "FLAG_CONNECT_WAIT",
    "FLAG_GATE",
    "FLAG_V6ONLY",
    "FLAG_WAIT",
    "MAX_BODY",
    "MAX_RESOLVE_ADDRS",
    "PREFIX_LEN",
    "RESOLVE_ADDRCONFIG",
    "SECRET_LEN",
    "TOKEN_LEN",
    "UDP_DATA_ACK",
    "UDP_DATA_SOCKET",
    "UDP_HDR_LEN",
    "VERSION",
    "Action",
    "Address",
    "ConnectReply",
    "ConnectRequest",
    "GateReply",
    "GateRequest",
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
    "ResolveAction",
    "ResolveReply",
    "ResolveRequest",
    "StatusAction",
    "StatusReply",
    "StatusRequest",
    "UdpAssocReply",
    "UdpAssocRequest",
    "UdpHeader",
    "UdpKind",
    "UdpReleaseReply",
    "UdpReleaseRequest",
    "UnlistenReply",
    "UnlistenRequest",
    "emit_address",
    "emit_relay_datagram",
    "emit_reply",
    "emit_request",
    "emit_udp_header",
    "frame_body_len",
    "parse_address",
    "parse_relay_datagram",
    "parse_reply",
    "parse_request",
    "parse_udp_header",
    "secret_matches",
]

VERSION = 1
MAX_BODY = 512
PREFIX_LEN = 4
SECRET_LEN = 32
TOKEN_LEN = 16
ADDR_LEN = 19
FLAG_WAIT = 0x0001  # STATUS: hold the reply until the outcome is known
FLAG_V6ONLY = 0x0001  # LISTEN: the socket has IPV6_V6ONLY set
FLAG_GATE = 0x0001  # CONNECT: a non-blocking socket; a GATE request follows (docs/channel.md)
# CONNECT: a blocking socket; after a TUNNEL reply the launcher sends the STATUS reply (as to
# STATUS with WAIT) on the same connection once the outcome is known.
FLAG_CONNECT_WAIT = 0x0002
# CONNECT: the program's socket is AF_INET: its data connection comes to 127.0.0.1, never to
# ::1 (the launcher then lets its port in at the IPv4 data listener alone).
FLAG_CONNECT_LO4 = 0x0004
MAX_VERSION_TEXT = 255
MAX_NAME_TEXT = 255
MAX_RESOLVE_ADDRS = 12  # 12 addresses + a 255-byte name fit in MAX_BODY
RESOLVE_ADDRCONFIG = 0x01  # AI_ADDRCONFIG: only families we have a tunnel address of
# UDP data connections (docs/channel.md, "UDP"): SOCK_SEQPACKET to this name beside the control
# socket; the first record is an association's token, answered by this one-byte record.
UDP_DATA_SOCKET = "udp.sock"
UDP_DATA_ACK = b"\x00"

_PREFIX = struct.Struct("!I")
_REQ_HDR = struct.Struct("!BBH32s")  # version, op, flags, secret
_REP_HDR = struct.Struct("!BBHi")  # version, op, action, errno
_ADDR = struct.Struct("!B16sH")
_HELLO = struct.Struct("!IB")
_UDP_HDR = struct.Struct("!BB")
UDP_HDR_LEN = _UDP_HDR.size + ADDR_LEN
_E = TypeVar("_E", bound=IntEnum)


class Op(IntEnum):
    HELLO = 1
    CONNECT = 2
    STATUS = 3
    LISTEN = 4
    UNLISTEN = 5
    PEER = 6
    UDP_ASSOC = 7
    UDP_RELEASE = 8
    RESOLVE = 9
    GATE = 10


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


class UdpKind(IntEnum):
    """What a relayed datagram's header announces (docs/channel.md, "UDP")."""

    DATA = 0  # the payload is one datagram to / from `addr`
    ERROR = 1  # the payload is a u32 errno: an ICMP error about a datagram sent to `addr`


class ResolveAction(IntEnum):
    FOUND = 0
    FAIL = 2  # errno is the magnitude of a getaddrinfo EAI_* code (EAI_NONAME -2 -> 2)


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
    """A control connection's first request: the program's pid, the shim's version."""

    pid: int
    version: str


@dataclass(frozen=True, slots=True)
class ConnectRequest:
    """Route a connect() of the program's socket to `dst` (op 2, docs/channel.md)."""

    proto: Proto
    dst: Address
    gate: bool = False  # non-blocking: the shim holds writability back with filler bytes
    src_port: int = 0  # the port the program bound before connect(), 0 for any
    # The loopback source port the program's socket connects to the data listener from, 0 if
    # unknown: the listener drops connections from any other port (docs/channel.md, Security).
    lo_port: int = 0
    wait: bool = False  # blocking: a TUNNEL reply is followed by the STATUS reply (WAIT)
    lo4: bool = False  # an AF_INET socket: the data connection comes to 127.0.0.1 alone


@dataclass(frozen=True, slots=True)
class GateRequest:
    """After the token, the shim wrote `filler` bytes to hold the socket unwritable until the
    tunnel's outcome; the launcher discards exactly that many before relaying."""

    token: bytes
    filler: int


@dataclass(frozen=True, slots=True)
class StatusRequest:
    """The outcome of the tunnel connection `token` stands for (`wait`: once known)."""

    token: bytes
    wait: bool


@dataclass(frozen=True, slots=True)
class ListenRequest:
    """The program listens on `addr`: the tunnel's connections to it come to it."""

    proto: Proto
    addr: Address
    v6only: bool = False  # an AF_INET6 socket with IPV6_V6ONLY: no IPv4 clients


@dataclass(frozen=True, slots=True)
class UnlistenRequest:
    """The last fd of a listener on `addr` was closed: stop taking its connections."""

    proto: Proto
    addr: Address


@dataclass(frozen=True, slots=True)
class PeerRequest:
    """Who the loopback peer `addr` of an accepted socket is (the tunnel client)."""

    addr: Address


@dataclass(frozen=True, slots=True)
class UdpAssocRequest:
    """Route `dst` for the UDP socket whose loopback side is `local`; associate it if TUNNEL."""

    local: Address
    dst: Address


@dataclass(frozen=True, slots=True)
class UdpReleaseRequest:
    """The UDP socket whose loopback side is `local` closed: end its association."""

    local: Address


@dataclass(frozen=True, slots=True)
class ResolveRequest:
    """Resolve `name` (family 0: both, 4, 6) through the launcher (docs/channel.md, "DNS")."""

    name: str
    family: int = 0
    flags: int = 0


Request = (
    HelloRequest
    | ConnectRequest
    | StatusRequest
    | ListenRequest
    | UnlistenRequest
    | PeerRequest
    | UdpAssocRequest
    | UdpReleaseRequest
    | ResolveRequest
    | GateRequest
)


@dataclass(frozen=True, slots=True)
class HelloReply:
    """HELLO's answer: errno 0 when the shim may go on."""

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
    """STATUS's answer: DONE with the outcome's errno, or PENDING (only without WAIT)."""

    action: StatusAction
    errno: int = 0


@dataclass(frozen=True, slots=True)
class ListenReply:
    """For UDP (proto 17), `token` is the association's token (see UdpAssocReply)."""

    errno: int = 0
    token: bytes | None = None


@dataclass(frozen=True, slots=True)
class UnlistenReply:
    """UNLISTEN's answer (errno 0)."""

    errno: int = 0


@dataclass(frozen=True, slots=True)
class PeerReply:
    """The tunnel client behind a loopback connection and, when known, the tunnel address it
    connected to (what the accepted socket's getsockname() reports)."""

    action: PeerAction
    peer: Address | None = None
    local: Address | None = None


@dataclass(frozen=True, slots=True)
class UdpAssocReply:
    """DIRECT, FAIL(errno), or TUNNEL with our tunnel source (address and port) for `dst`."""

    action: Action
    errno: int = 0
    source: Address | None = None
    # Every datagram the program sends to the relay carries this token (docs/channel.md, UDP):
    # the relay's loopback port is open to every local user; the token is not.
    token: bytes = bytes(TOKEN_LEN)


@dataclass(frozen=True, slots=True)
class UdpReleaseReply:
    """UDP_RELEASE's answer (errno 0)."""

    errno: int = 0


@dataclass(frozen=True, slots=True)
class GateReply:
    """A reply to GATE in the codec; the launcher sends none (docs/channel.md, op 10)."""

    errno: int = 0


@dataclass(frozen=True, slots=True)
class ResolveReply:
    """FOUND with the addresses (IPv4 first) and the canonical name, or FAIL(EAI code)."""

    action: ResolveAction
    errno: int = 0
    addresses: tuple[IPv4Address | IPv6Address, ...] = ()
    canonical: str = ""


Reply = (
    GateReply
    | HelloReply
    | ConnectReply
    | StatusReply
    | ListenReply
    | UnlistenReply
    | PeerReply
    | UdpAssocReply
    | UdpReleaseReply
    | ResolveReply
)


@dataclass(frozen=True, slots=True)
class UdpHeader:
    """The header in front of every datagram between the shim and the launcher's UDP relay:
    `u8 version | u8 kind | address` (21 bytes). `addr` is the real destination (shim to
    launcher) or the real source (launcher to shim)."""

    kind: UdpKind
    addr: Address


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


def _text(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise DecodeError(f"ipc: {what} is not UTF-8") from None


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
        case ConnectRequest(proto, dst, gate, src_port, lo_port, wait, lo4):
            if not 0 <= src_port <= 0xFFFF or not 0 <= lo_port <= 0xFFFF:
                raise ValueError("ipc: bad CONNECT source port")
            if gate and wait:
                raise ValueError("ipc: CONNECT is either gated or waits")
            op, body = Op.CONNECT, bytes([proto]) + emit_address(dst)
            if lo_port:
                body += src_port.to_bytes(2, "big") + lo_port.to_bytes(2, "big")
            elif src_port:
                body += src_port.to_bytes(2, "big")
            flags = (FLAG_GATE if gate else 0) | (FLAG_CONNECT_WAIT if wait else 0)
            flags |= FLAG_CONNECT_LO4 if lo4 else 0
        case GateRequest(token, filler):
            if len(token) != TOKEN_LEN or not 0 <= filler <= 0xFFFFFFFF:
                raise ValueError("ipc: bad GATE request")
            op, body = Op.GATE, token + filler.to_bytes(4, "big")
        case StatusRequest(token, wait):
            if len(token) != TOKEN_LEN:
                raise ValueError("ipc: a token is 16 bytes")
            op, body, flags = Op.STATUS, token, FLAG_WAIT if wait else 0
        case ListenRequest(proto, addr, v6only):
            op, body = Op.LISTEN, bytes([proto]) + emit_address(addr)
            flags = FLAG_V6ONLY if v6only else 0
        case UnlistenRequest(proto, addr):
            op, body = Op.UNLISTEN, bytes([proto]) + emit_address(addr)
        case PeerRequest(addr):
            op, body = Op.PEER, emit_address(addr)
        case UdpAssocRequest(local, dst):
            op, body = Op.UDP_ASSOC, emit_address(local) + emit_address(dst)
        case UdpReleaseRequest(local):
            op, body = Op.UDP_RELEASE, emit_address(local)
        case ResolveRequest(name, family, rflags):
            raw = name.encode("utf-8")
            if len(raw) > MAX_NAME_TEXT or family not in (0, 4, 6) or not 0 <= rflags <= 0xFF:
                raise ValueError("ipc: bad RESOLVE request")
            op, body = Op.RESOLVE, bytes([family, rflags, len(raw)]) + raw
    return _frame(_REQ_HDR.pack(VERSION, op, flags, secret) + body)


def parse_request(data: bytes) -> tuple[bytes, Request]:
    """One whole request frame (prefix included) -> (secret, request)."""
    body = _split(data, _REQ_HDR)
    version, op_num, flags, secret = _REQ_HDR.unpack_from(data, PREFIX_LEN)
    if version != VERSION:
        raise DecodeError(f"ipc: unknown version {version}")
    if op_num == _OP_CONNECT:  # one per connect(): first, and with no enum look-ups
        return bytes(secret), _parse_connect(body, flags)
    op = _op(op_num)
    if op not in (Op.STATUS, Op.LISTEN) and flags != 0:
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
        case Op.LISTEN | Op.UNLISTEN:
            _exact(body, 1 + ADDR_LEN, op.name)
            proto, addr = _proto(body[0]), parse_address(body, 1)
            if op is Op.LISTEN:
                if flags & ~FLAG_V6ONLY:
                    raise DecodeError("ipc: unknown LISTEN flags")
                req = ListenRequest(proto, addr, bool(flags & FLAG_V6ONLY))
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
        case Op.GATE:
            _exact(body, TOKEN_LEN + 4, "GATE")
            req = GateRequest(bytes(body[:TOKEN_LEN]), int.from_bytes(body[TOKEN_LEN:], "big"))
        case Op.UDP_ASSOC:
            _exact(body, 2 * ADDR_LEN, "UDP_ASSOC")
            req = UdpAssocRequest(parse_address(body), parse_address(body, ADDR_LEN))
        case Op.UDP_RELEASE:
            _exact(body, ADDR_LEN, "UDP_RELEASE")
            req = UdpReleaseRequest(parse_address(body))
        case Op.RESOLVE:
            if len(body) < 3:
                raise DecodeError("ipc: short RESOLVE")
            _exact(body, 3 + body[2], "RESOLVE")
            if body[0] not in (0, 4, 6):
                raise DecodeError(f"ipc: bad RESOLVE family {body[0]}")
            req = ResolveRequest(_text(body[3:], "RESOLVE name"), body[0], body[1])
    return bytes(secret), req


_OP_CONNECT = int(Op.CONNECT)


def _parse_connect(body: bytes, flags: int) -> ConnectRequest:
    """CONNECT's body: proto, address, then nothing, `u16 src_port` (non-zero), or `u16
    src_port` (0: none) and `u16 lo_port` (non-zero); one encoding per request, so frames
    round-trip."""
    if flags & ~(FLAG_GATE | FLAG_CONNECT_WAIT | FLAG_CONNECT_LO4) or (
        flags & (FLAG_GATE | FLAG_CONNECT_WAIT) == FLAG_GATE | FLAG_CONNECT_WAIT
    ):
        raise DecodeError("ipc: unknown CONNECT flags")
    src_port = lo_port = 0
    n = len(body)
    if n == 3 + ADDR_LEN:
        src_port = int.from_bytes(body[1 + ADDR_LEN :], "big")
        if src_port == 0:
            raise DecodeError("ipc: CONNECT source port 0 must be left out")
    elif n == 5 + ADDR_LEN:
        src_port = int.from_bytes(body[1 + ADDR_LEN : 3 + ADDR_LEN], "big")
        lo_port = int.from_bytes(body[3 + ADDR_LEN :], "big")
        if lo_port == 0:
            raise DecodeError("ipc: CONNECT loopback port 0 must be left out")
    else:
        _exact(body, 1 + ADDR_LEN, "CONNECT")
    return ConnectRequest(
        _proto(body[0]),
        parse_address(body, 1),
        bool(flags & FLAG_GATE),
        src_port,
        lo_port,
        bool(flags & FLAG_CONNECT_WAIT),
        bool(flags & FLAG_CONNECT_LO4),
    )


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
        case ListenReply(err, ltoken):
            op = Op.LISTEN
            if ltoken is not None:
                if len(ltoken) != TOKEN_LEN:
                    raise ValueError("ipc: a token is 16 bytes")
                body = ltoken
        case UnlistenReply(err):
            op = Op.UNLISTEN
        case PeerReply(act, peer, local):
            op, action = Op.PEER, act
            if act is PeerAction.FOUND:
                if peer is None:
                    raise ValueError("ipc: PEER FOUND needs the peer address")
                body = emit_address(peer)
                if local is not None:
                    body += emit_address(local)
        case UdpAssocReply(act, err, source, utoken):
            op, action = Op.UDP_ASSOC, act
            if act is Action.TUNNEL:
                if source is None or len(utoken) != TOKEN_LEN:
                    raise ValueError("ipc: UDP_ASSOC TUNNEL needs the source address and token")
                body = emit_address(source) + utoken
        case UdpReleaseReply(err):
            op = Op.UDP_RELEASE
        case GateReply(err):
            op = Op.GATE
        case ResolveReply(ract, err, addrs, canon):
            op, action = Op.RESOLVE, ract
            if ract is ResolveAction.FOUND:
                raw = canon.encode("utf-8")
                if not 0 < len(addrs) <= MAX_RESOLVE_ADDRS or len(raw) > MAX_NAME_TEXT:
                    raise ValueError("ipc: RESOLVE FOUND needs 1-12 addresses, a short name")
                body = bytes([len(addrs)]) + b"".join(emit_address(Address(a, 0)) for a in addrs)
                body += bytes([len(raw)]) + raw
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
                if len(body) not in (ADDR_LEN, 2 * ADDR_LEN):
                    raise DecodeError("ipc: bad PEER reply length")
                local = parse_address(body, ADDR_LEN) if len(body) > ADDR_LEN else None
                return PeerReply(pact, parse_address(body), local)
            _exact(body, 0, "PEER reply")
            return PeerReply(pact)
        case Op.UDP_ASSOC:
            act = _enum(Action, action, "UDP_ASSOC")
            if act is Action.TUNNEL:
                _exact(body, ADDR_LEN + TOKEN_LEN, "UDP_ASSOC reply")
                return UdpAssocReply(act, err, parse_address(body), bytes(body[ADDR_LEN:]))
            _exact(body, 0, "UDP_ASSOC reply")
            return UdpAssocReply(act, err)
        case Op.RESOLVE:
            ract = _enum(ResolveAction, action, "RESOLVE")
            if ract is ResolveAction.FAIL:
                _exact(body, 0, "RESOLVE reply")
                return ResolveReply(ract, err)
            if not body or not 0 < body[0] <= MAX_RESOLVE_ADDRS:
                raise DecodeError("ipc: bad RESOLVE address count")
            pos = 1 + body[0] * ADDR_LEN
            if len(body) < pos + 1:
                raise DecodeError("ipc: short RESOLVE reply")
            _exact(body, pos + 1 + body[pos], "RESOLVE reply")
            addrs = tuple(parse_address(body, 1 + i * ADDR_LEN).ip for i in range(body[0]))
            return ResolveReply(ract, err, addrs, _text(body[pos + 1 :], "RESOLVE name"))
        case Op.STATUS:
            _exact(body, 0, "STATUS reply")
            return StatusReply(_enum(StatusAction, action, "STATUS"), err)
    if op is Op.LISTEN and len(body) == TOKEN_LEN and action == 0:
        return ListenReply(err, bytes(body))
    _exact(body, 0, f"{op.name} reply")
    if action != 0:
        raise DecodeError(f"ipc: bad {op.name} action {action}")
    if op is Op.HELLO:
        return HelloReply(err)
    if op is Op.LISTEN:
        return ListenReply(err)
    if op is Op.GATE:
        return GateReply(err)
    if op is Op.UDP_RELEASE:
        return UdpReleaseReply(err)
    return UnlistenReply(err)


# -- relayed datagrams -------------------------------------------------------------------------


def emit_udp_header(header: UdpHeader) -> bytes:
    return _UDP_HDR.pack(VERSION, header.kind) + emit_address(header.addr)


def parse_udp_header(data: bytes) -> tuple[UdpHeader, bytes]:
    """A relayed datagram -> (header, payload); DecodeError if the header is malformed."""
    if len(data) < UDP_HDR_LEN:
        raise DecodeError("ipc: short UDP header")
    version, kind = _UDP_HDR.unpack_from(data)
    if version != VERSION:
        raise DecodeError(f"ipc: unknown UDP header version {version}")
    try:
        k = UdpKind(kind)
    except ValueError:
        raise DecodeError(f"ipc: unknown UDP header kind {kind}") from None
    return UdpHeader(k, parse_address(data, _UDP_HDR.size)), bytes(data[UDP_HDR_LEN:])


def emit_relay_datagram(header: UdpHeader, token: bytes, payload: bytes) -> bytes:
    """A datagram from the relay port to the program: the 21-byte header, the association's
    16-byte token (the shim drops a datagram without it: docs/channel.md "UDP"), payload."""
    if len(token) != TOKEN_LEN:
        raise ValueError("the association token is 16 bytes")
    return emit_udp_header(header) + token + payload


def parse_relay_datagram(data: bytes) -> tuple[UdpHeader, bytes, bytes]:
    """emit_relay_datagram's bytes -> (header, token, payload)."""
    header, rest = parse_udp_header(data)
    if len(rest) < TOKEN_LEN:
        raise DecodeError("ipc: short UDP token")
    return header, bytes(rest[:TOKEN_LEN]), bytes(rest[TOKEN_LEN:])
