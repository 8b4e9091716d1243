"""SOCKS5 server protocol, sans-IO: RFC 1928 and RFC 1929 codecs and one connection's states.

Codecs: method selection (RFC 1928 3), requests and replies (4, 5, 6), the UDP datagram
header (7) and the username/password sub-negotiation (RFC 1929 2). Parsers are incremental
(None = need more bytes) and raise `DecodeError` on garbage; each `emit_*` mirrors its
`parse_*`. `ServerConn` is the state machine of one TCP connection up to the point where the
door decides what to do with a request: bytes and `now` in, `Send`/`Requested`/`Close` out,
`next_deadline()`/`handle_timeout(now)` for the handshake time limit. No I/O here.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
from dataclasses import dataclass, field
from enum import Enum, IntEnum
from ipaddress import IPv4Address, IPv6Address, ip_address

from wrapguard.errors import DecodeError

VERSION = 5  # RFC 1928 3: VER X'05'
AUTH_VERSION = 1  # RFC 1929 2: "The VER field contains the current version of the
# subnegotiation, which is X'01'"
HANDSHAKE_TIMEOUT = 10.0  # s from accept to a complete request
EARLY_MAX = 64 * 1024  # bytes a client may send after its request, before our reply

Host = IPv4Address | IPv6Address | str  # an IP, or a domain name (ATYP X'03')
Buffer = bytes | bytearray | memoryview
ANY_V4 = IPv4Address(0)  # BND.ADDR of a failure reply


class Method(IntEnum):
    """RFC 1928 3: authentication methods."""

    NO_AUTH = 0x00
    GSSAPI = 0x01
    USERPASS = 0x02  # RFC 1929
    NO_ACCEPTABLE = 0xFF


class Cmd(IntEnum):
    """RFC 1928 4: CMD."""

    CONNECT = 0x01
    BIND = 0x02
    UDP_ASSOCIATE = 0x03


class Atyp(IntEnum):
    """RFC 1928 5: address types."""

    IPV4 = 0x01
    DOMAIN = 0x03
    IPV6 = 0x04


class Rep(IntEnum):
    """RFC 1928 6: the REP field of a reply."""

    SUCCEEDED = 0x00
    GENERAL_FAILURE = 0x01
    NOT_ALLOWED = 0x02
    NETWORK_UNREACHABLE = 0x03
    HOST_UNREACHABLE = 0x04
    CONNECTION_REFUSED = 0x05
    TTL_EXPIRED = 0x06
    COMMAND_NOT_SUPPORTED = 0x07
    ADDRESS_TYPE_NOT_SUPPORTED = 0x08


_REP_FOR_ERRNO = {
    errno.ENETUNREACH: Rep.NETWORK_UNREACHABLE,
    errno.ENETDOWN: Rep.NETWORK_UNREACHABLE,
    errno.EAFNOSUPPORT: Rep.NETWORK_UNREACHABLE,
    errno.EADDRNOTAVAIL: Rep.NETWORK_UNREACHABLE,
    errno.EHOSTUNREACH: Rep.HOST_UNREACHABLE,
    errno.EHOSTDOWN: Rep.HOST_UNREACHABLE,
    errno.ECONNREFUSED: Rep.CONNECTION_REFUSED,
    errno.ETIMEDOUT: Rep.TTL_EXPIRED,
    errno.EACCES: Rep.NOT_ALLOWED,
    errno.EPERM: Rep.NOT_ALLOWED,
}


def rep_for_errno(err: int) -> Rep:
    """The reply code that says what a failed connect met (compat.md: refused 0x05, host
    unreachable 0x04, network unreachable 0x03, TTL expired 0x06); anything else 0x01."""
    return _REP_FOR_ERRNO.get(err, Rep.GENERAL_FAILURE)


# -- codecs ------------------------------------------------------------------------------------


class RequestError(DecodeError):
    """A request we understood well enough to answer with a reply code (RFC 1928 6)."""

    def __init__(self, rep: Rep, message: str) -> None:
        super().__init__(message)
        self.rep = rep


@dataclass(frozen=True, slots=True)
class Greeting:
    """RFC 1928 3: VER NMETHODS METHODS."""

    methods: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class UserPass:
    """RFC 1929 2: VER ULEN UNAME PLEN PASSWD (the password never shows in a repr)."""

    username: bytes
    password: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class Request:
    """RFC 1928 4: VER CMD RSV ATYP DST.ADDR DST.PORT (cmd kept raw: unknown ones get 0x07)."""

    cmd: int
    host: Host
    port: int


@dataclass(frozen=True, slots=True)
class Reply:
    """RFC 1928 6: VER REP RSV ATYP BND.ADDR BND.PORT."""

    rep: int
    host: Host
    port: int


@dataclass(frozen=True, slots=True)
class UdpDatagram:
    """RFC 1928 7: RSV(2) FRAG ATYP DST.ADDR DST.PORT DATA."""

    frag: int
    host: Host
    port: int
    payload: bytes


def emit_address(host: Host, port: int) -> bytes:
    """ATYP DST.ADDR DST.PORT (RFC 1928 5)."""
    if isinstance(host, IPv4Address):
        return bytes([Atyp.IPV4]) + host.packed + port.to_bytes(2, "big")
    if isinstance(host, IPv6Address):
        return bytes([Atyp.IPV6]) + host.packed + port.to_bytes(2, "big")
    name = host.encode()
    if not 0 < len(name) < 256:
        raise ValueError(f"domain name of {len(name)} bytes")
    return bytes([Atyp.DOMAIN, len(name)]) + name + port.to_bytes(2, "big")


def parse_address(buf: Buffer, at: int) -> tuple[Host, int, int] | None:
    """(host, port, end offset) of the address at `at`, or None for more bytes.
    RequestError(0x08) for an unknown ATYP; RequestError(0x04) for a name that cannot be
    one (empty, not UTF-8)."""
    if len(buf) <= at:
        return None
    atyp = buf[at]
    if atyp == Atyp.IPV4:
        end = at + 1 + 4
    elif atyp == Atyp.IPV6:
        end = at + 1 + 16
    elif atyp == Atyp.DOMAIN:
        if len(buf) <= at + 1:
            return None
        end = at + 2 + buf[at + 1]
    else:
        raise RequestError(Rep.ADDRESS_TYPE_NOT_SUPPORTED, f"address type {atyp:#04x}")
    if len(buf) < end + 2:
        return None
    port = int.from_bytes(buf[end : end + 2], "big")
    host: Host
    if atyp == Atyp.IPV4:
        host = IPv4Address(bytes(buf[at + 1 : end]))
    elif atyp == Atyp.IPV6:
        host = IPv6Address(bytes(buf[at + 1 : end]))
    else:
        raw = bytes(buf[at + 2 : end])
        try:
            host = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise RequestError(Rep.HOST_UNREACHABLE, "domain name is not UTF-8") from None
        if not host or "\x00" in host:
            raise RequestError(Rep.HOST_UNREACHABLE, "empty domain name or one with a NUL")
    return host, port, end + 2


def parse_greeting(buf: Buffer) -> tuple[Greeting, int] | None:
    if not buf:
        return None
    if buf[0] != VERSION:
        raise DecodeError(f"not SOCKS5 (version byte {buf[0]:#04x})")
    if len(buf) < 2 or len(buf) < 2 + buf[1]:
        return None
    n = buf[1]
    return Greeting(tuple(buf[2 : 2 + n])), 2 + n


def emit_greeting(greeting: Greeting) -> bytes:
    return bytes([VERSION, len(greeting.methods), *greeting.methods])


def emit_method(method: int) -> bytes:
    """RFC 1928 3: VER METHOD."""
    return bytes([VERSION, method])


def parse_userpass(buf: Buffer) -> tuple[UserPass, int] | None:
    if not buf:
        return None
    if buf[0] != AUTH_VERSION:
        raise DecodeError(f"username/password version {buf[0]:#04x}")
    if len(buf) < 2:
        return None
    ulen = buf[1]
    if len(buf) < 3 + ulen:
        return None
    plen = buf[2 + ulen]
    end = 3 + ulen + plen
    if len(buf) < end:
        return None
    return UserPass(bytes(buf[2 : 2 + ulen]), bytes(buf[3 + ulen : end])), end


def emit_userpass(up: UserPass) -> bytes:
    if len(up.username) > 255 or len(up.password) > 255:
        raise ValueError("RFC 1929: username and password are at most 255 bytes")
    return (
        bytes([AUTH_VERSION, len(up.username)])
        + up.username
        + bytes([len(up.password)])
        + up.password
    )


def emit_auth_status(ok: bool) -> bytes:
    """RFC 1929 2: VER STATUS; X'00' success, anything else failure."""
    return bytes([AUTH_VERSION, 0 if ok else 1])


def _parse_frame(buf: Buffer, what: str) -> tuple[int, Host, int, int] | None:
    """VER CODE RSV ADDRESS (requests and replies share the shape): (code, host, port, end),
    None while incomplete."""
    if not buf:
        return None
    if buf[0] != VERSION:
        raise DecodeError(f"{what} version {buf[0]:#04x}")
    if len(buf) < 4:
        return None
    # RSV (buf[2]) is X'00' by the RFC; like most servers we do not insist.
    got = parse_address(buf, 3)
    if got is None:
        return None
    host, port, end = got
    return buf[1], host, port, end


def parse_request(buf: Buffer) -> tuple[Request, int] | None:
    got = _parse_frame(buf, "request")
    return None if got is None else (Request(got[0], got[1], got[2]), got[3])


def emit_request(req: Request) -> bytes:
    return bytes([VERSION, req.cmd, 0]) + emit_address(req.host, req.port)


def emit_reply(rep: int, host: Host = ANY_V4, port: int = 0) -> bytes:
    return bytes([VERSION, rep, 0]) + emit_address(host, port)


def parse_reply(buf: Buffer) -> tuple[Reply, int] | None:
    """A client's view (tests, tools): the mirror of `emit_reply`."""
    got = _parse_frame(buf, "reply")
    return None if got is None else (Reply(got[0], got[1], got[2]), got[3])


def parse_udp_datagram(data: Buffer) -> UdpDatagram:
    """RFC 1928 7 header + payload of one whole datagram."""
    if len(data) < 4:
        raise DecodeError("UDP datagram shorter than its header")
    got = parse_address(data, 3)
    if got is None:
        raise DecodeError("UDP datagram header cut short")
    host, port, end = got
    return UdpDatagram(data[2], host, port, bytes(data[end:]))


def emit_udp_datagram(host: Host, port: int, payload: bytes, frag: int = 0) -> bytes:
    return bytes([0, 0, frag]) + emit_address(host, port) + payload


def host_ip(host: Host) -> IPv4Address | IPv6Address | None:
    """The IP a host stands for when it is one (a name may be an IP literal, too)."""
    if not isinstance(host, str):
        return host
    try:
        return ip_address(host.strip("[]"))
    except ValueError:
        return None


# -- one connection ------------------------------------------------------------------------------


class State(Enum):
    GREETING = "greeting"
    AUTH = "auth"  # RFC 1929 sub-negotiation
    REQUEST = "request"
    WAITING = "waiting"  # the request is out; the door's reply is due
    RELAY = "relay"  # CONNECT succeeded: the bytes are the flow's, not ours
    ASSOCIATED = "associated"  # UDP ASSOCIATE succeeded: the TCP side only says "still here"
    CLOSED = "closed"


HANDSHAKING = frozenset({State.GREETING, State.AUTH, State.REQUEST})


@dataclass(frozen=True, slots=True)
class Send:
    data: bytes


@dataclass(frozen=True, slots=True)
class Requested:
    """A complete request the door must act on, then answer with `ServerConn.reply()`."""

    cmd: Cmd
    host: Host
    port: int


@dataclass(frozen=True, slots=True)
class Close:
    """Close the connection (after the `Send` outputs before it). `reason` names a drop."""

    reason: str


Output = Send | Requested | Close


def _digest(b: bytes) -> bytes:
    return hashlib.sha256(b).digest()


class ServerConn:
    """One client connection's SOCKS5 negotiation, server side.

    Theory of operation: `receive()` buffers bytes and parses, in `GREETING`, a method
    selection (we pick no-auth without credentials, else only username/password, RFC 1928 3:
    X'FF' and close when nothing offered fits); in `AUTH`, RFC 1929 credentials (compared in
    constant time; a wrong pair gets STATUS 1 and a close, RFC 1929 2); in `REQUEST`, a
    request. CONNECT and UDP ASSOCIATE come out as `Requested`; BIND gets 0x07, an unknown
    address type 0x08. The door answers with `reply()`: success moves to `RELAY` or
    `ASSOCIATED`, failure closes (RFC 1928 6: the server closes after a failure reply).
    Bytes the client sends after its request are kept (`take_early()`) for the flow.
    """

    def __init__(
        self,
        credentials: tuple[bytes, bytes] | None,
        now: float,
        timeout: float = HANDSHAKE_TIMEOUT,
    ) -> None:
        self._creds = None if credentials is None else tuple(_digest(c) for c in credentials)
        self._deadline = now + timeout
        self._buf = bytearray()
        self.state = State.GREETING
        self.request: Requested | None = None

    def _set_state(self, state: State) -> None:
        self.state = state
        if state not in HANDSHAKING:
            self._deadline = float("inf")

    def next_deadline(self) -> float | None:
        return self._deadline if self.state in HANDSHAKING else None

    def handle_timeout(self, now: float) -> list[Output]:
        if self.state in HANDSHAKING and now >= self._deadline:
            self._set_state(State.CLOSED)
            return [Close("handshake_timeout")]
        return []

    def take_early(self) -> bytes:
        """Bytes the client sent after its request (optimistic data), handed to the flow."""
        data = bytes(self._buf)
        self._buf.clear()
        return data

    def receive(self, data: bytes, now: float) -> list[Output]:
        if self.state is State.CLOSED:
            return []
        if self.state is State.ASSOCIATED:
            return []  # RFC 1928 7: the TCP connection only marks the association's life
        if self.state is State.RELAY:
            raise RuntimeError("receive() after CONNECT succeeded: the bytes are the flow's")
        self._buf += data
        if self.state is State.WAITING:
            if len(self._buf) > EARLY_MAX:
                self._set_state(State.CLOSED)
                return [Close("early_data_overflow")]
            return []
        if now >= self._deadline:
            return self.handle_timeout(now)
        out: list[Output] = []
        while self.state in HANDSHAKING:
            was = self.state
            try:
                step = self._step()
            except RequestError as exc:
                self._set_state(State.CLOSED)
                return [*out, Send(emit_reply(exc.rep)), Close("bad_request")]
            except DecodeError:
                self._set_state(State.CLOSED)
                return [*out, Close(f"bad_{was.value}")]
            if step is None:
                break
            out += step
            if any(isinstance(o, Close) for o in step):
                break
        if self.state in (*HANDSHAKING, State.WAITING) and len(self._buf) > EARLY_MAX:
            self._set_state(State.CLOSED)  # one message is < 600 bytes: a bound on the rest
            out.append(Close("oversized"))
        return out

    def _step(self) -> list[Output] | None:
        """One message in the current state, or None when it is not complete yet. The one
        place where the negotiation moves on."""
        buf = self._buf
        match self.state:
            case State.GREETING:
                got = parse_greeting(buf)
                if got is None:
                    return None
                greeting, n = got
                del buf[:n]
                want = Method.NO_AUTH if self._creds is None else Method.USERPASS
                if want not in greeting.methods:
                    self._set_state(State.CLOSED)
                    return [Send(emit_method(Method.NO_ACCEPTABLE)), Close("no_acceptable_method")]
                self._set_state(State.AUTH if want == Method.USERPASS else State.REQUEST)
                return [Send(emit_method(want))]
            case State.AUTH:
                got_up = parse_userpass(buf)
                if got_up is None:
                    return None
                up, n = got_up
                del buf[:n]
                assert self._creds is not None
                # Both compared, always, in constant time (no early exit on the user name).
                ok_user = hmac.compare_digest(_digest(up.username), self._creds[0])
                ok_pass = hmac.compare_digest(_digest(up.password), self._creds[1])
                if not (ok_user & ok_pass):
                    self._set_state(State.CLOSED)
                    return [Send(emit_auth_status(False)), Close("auth_failed")]
                self._set_state(State.REQUEST)
                return [Send(emit_auth_status(True))]
            case State.REQUEST:
                got_req = parse_request(buf)
                if got_req is None:
                    return None
                req, n = got_req
                del buf[:n]
                if req.cmd not in (Cmd.CONNECT, Cmd.UDP_ASSOCIATE):
                    self._set_state(State.CLOSED)  # BIND and unknown commands
                    return [Send(emit_reply(Rep.COMMAND_NOT_SUPPORTED)), Close("unsupported_cmd")]
                self.request = Requested(Cmd(req.cmd), req.host, req.port)
                self._set_state(State.WAITING)
                return [self.request]
            case _:
                return None

    def reply(self, rep: Rep, host: Host = ANY_V4, port: int = 0) -> list[Output]:
        """The door's answer to the request: what to send, and a Close on failure."""
        if self.state is not State.WAITING or self.request is None:
            raise RuntimeError(f"reply() in state {self.state.value}")
        if rep == Rep.SUCCEEDED:
            ok = State.RELAY if self.request.cmd == Cmd.CONNECT else State.ASSOCIATED
            self._set_state(ok)
            if ok is State.ASSOCIATED:
                self._buf.clear()
            return [Send(emit_reply(rep, host, port))]
        self._set_state(State.CLOSED)
        return [Send(emit_reply(rep, host, port)), Close(f"rep_{rep.name.lower()}")]


__all__ = [
    "Atyp",
    "Close",
    "Cmd",
    "Greeting",
    "Method",
    "Rep",
    "Reply",
    "Request",
    "RequestError",
    "Requested",
    "Send",
    "ServerConn",
    "State",
    "UdpDatagram",
    "UserPass",
    "emit_address",
    "emit_greeting",
    "emit_reply",
    "emit_request",
    "emit_udp_datagram",
    "emit_userpass",
    "host_ip",
    "parse_greeting",
    "parse_reply",
    "parse_request",
    "parse_udp_datagram",
    "parse_userpass",
    "rep_for_errno",
]
