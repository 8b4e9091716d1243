"""What an HTTP proxy request asks for, without I/O: the pure half of the HTTP proxy door
(httpproxy.py owns the sockets; h11 parses every byte).

`plan()` turns a request head into a `Tunnel` (CONNECT host:port, RFC 9110 9.3.6), a `Forward`
(an absolute-URI request rewritten to origin form, RFC 9112 3.2.2, its hop-by-hop fields gone,
RFC 9110 7.6.1) or raises `Refusal(status, text)`; `authorized()` checks Basic proxy
credentials (RFC 9110 11.7.2, RFC 7617); `refusal_for()` maps a dial errno to 502/504.
"""

from __future__ import annotations

import base64
import binascii
import errno
import hmac
import ipaddress
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

import h11

REALM = b'Basic realm="wrapguard"'
VIA = (b"via", b"1.1 wrapguard")  # RFC 9110 7.6.3: a proxy adds itself
# RFC 9110 7.6.1 (and 11.7.1-2 for the Proxy-* fields): meaningful for one hop only. h11 frames
# each side's body itself, so Transfer-Encoding goes too and comes back where h11 needs it.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"proxy-connection",
        b"keep-alive",
        b"proxy-authorization",
        b"proxy-authenticate",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
_HOSTNAME = re.compile(rb"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,251}[A-Za-z0-9_.])?")
Headers = list[tuple[bytes, bytes]]
HeaderList = Sequence[tuple[bytes, bytes]]


# -- what a request asks for (pure) --------------------------------------------------------------


class Refusal(Exception):
    """A request we answer with an error status instead of doing it."""

    def __init__(self, status: int, text: str, headers: Headers | None = None) -> None:
        super().__init__(text)
        self.status = status
        self.text = text
        self.headers = headers or []


@dataclass(frozen=True, slots=True)
class Tunnel:
    """CONNECT host:port."""

    host: str
    port: int


@dataclass(frozen=True, slots=True)
class Forward:
    """A request to send on to the origin host:port, already in origin form."""

    host: str
    port: int
    request: h11.Request


def split_authority(text: bytes, default_port: int | None = None) -> tuple[str, int]:
    """host:port, [v6]:port or (with a default) a bare host, as (host, port) with the brackets
    gone (RFC 3986 3.2.2); Refusal(400) for anything else."""
    if text.startswith(b"["):
        host, sep, rest = text[1:].partition(b"]")
        if not sep:
            raise Refusal(400, "an IPv6 literal needs its closing bracket")
        if b"%" in host:  # a zone (RFC 6874) names one of our interfaces: not for a client
            raise Refusal(400, "no zone index in an IPv6 literal")
        try:
            ipaddress.IPv6Address(host.decode("ascii"))
        except (UnicodeError, ValueError):
            raise Refusal(400, "not an IPv6 address between the brackets") from None
        port_text = rest[1:] if rest.startswith(b":") else None if not rest else b"bad"
    else:
        host, sep, port_text_ = text.rpartition(b":")
        if not sep:
            host, port_text_ = text, b""
        if b":" in host:
            raise Refusal(400, "an IPv6 address goes in brackets: [addr]:port")
        if not _HOSTNAME.fullmatch(host):
            raise Refusal(400, "not a host name or IP address")
        port_text = port_text_ if sep else None
    if port_text is None or port_text == b"":
        if default_port is None:
            raise Refusal(400, "the destination needs a port (host:port)")
        return host.decode("ascii"), default_port
    if not port_text.isdigit() or len(port_text) > 5 or not 0 < int(port_text) < 65536:
        raise Refusal(400, "the port must be a number from 1 to 65535")
    return host.decode("ascii"), int(port_text)


def authorized(headers: HeaderList, expected: bytes) -> bool:
    """Proxy-Authorization: Basic (RFC 9110 11.7.2, RFC 7617) against user:password, in
    constant time for a given length (hmac.compare_digest)."""
    for name, value in headers:
        if name.lower() != b"proxy-authorization":
            continue
        scheme, _, token = value.strip().partition(b" ")
        if scheme.lower() != b"basic":
            return False
        try:
            given = base64.b64decode(token.strip(), validate=True)
        except (binascii.Error, ValueError):
            return False
        return hmac.compare_digest(given, expected)
    return False


def end_to_end(headers: HeaderList) -> Headers:
    """The headers without the hop-by-hop ones, including those the Connection field names.
    A chunked message loses its Content-Length too (RFC 9112 6.3: chunked wins; forwarding
    both would let the next hop frame the body differently)."""
    named = {b"content-length"} if _chunked(headers) else set()
    named |= {
        token.strip().lower()
        for name, value in headers
        if name.lower() in (b"connection", b"proxy-connection")
        for token in value.split(b",")
    }
    return [(n, v) for n, v in headers if n.lower() not in HOP_BY_HOP and n.lower() not in named]


def _chunked(headers: HeaderList) -> bool:
    return any(n.lower() == b"transfer-encoding" and b"chunked" in v.lower() for n, v in headers)


def plan(request: h11.Request) -> Tunnel | Forward:
    """What an authenticated request head asks for; Refusal when we will not do it."""
    target = request.target
    if request.method == b"CONNECT":
        return Tunnel(*split_authority(target))
    low = target[:8].lower()
    if low.startswith(b"https://"):
        raise Refusal(501, "an https:// URL goes through CONNECT (curl -p, HTTPS_PROXY)")
    if not low.startswith(b"http://"):
        raise Refusal(400, "this is a proxy: ask for http://host/path or CONNECT host:port")
    rest = target[7:]
    end = min((i for i in (rest.find(c) for c in (b"/", b"?", b"#")) if i >= 0), default=len(rest))
    authority, path = rest[:end], rest[end:].partition(b"#")[0]
    authority = authority.rpartition(b"@")[2]  # userinfo in a URL is deprecated (RFC 9110 4.2.4)
    host, port = split_authority(authority, 80)
    if not path.startswith(b"/"):
        path = b"/" + path
    # RFC 9112 3.2.2: the request-target's authority replaces any Host the client sent.
    headers = [(b"host", authority)]
    headers += [(n, v) for n, v in end_to_end(request.headers) if n.lower() != b"host"]
    if _chunked(request.headers):
        headers.append((b"transfer-encoding", b"chunked"))  # h11 re-chunks the decoded body
    headers += [VIA, (b"connection", b"close")]  # one upstream connection per request
    forward = h11.Request(method=request.method, target=path, headers=headers)
    return Forward(host, port, forward)


def client_response(response: h11.Response | h11.InformationalResponse) -> Headers:
    """The origin's response headers as the client gets them (h11 adds the framing)."""
    return [*end_to_end(response.headers), VIA]


def refusal_for(err: int, where: str) -> Refusal:
    """A dial failure as a status: the gateway timed out (504) or failed (502)."""
    if err == errno.ETIMEDOUT:
        return Refusal(504, f"timed out connecting to {where}")
    what = {
        errno.ECONNREFUSED: "connection refused",
        errno.EHOSTUNREACH: "host unreachable",
        errno.ENETUNREACH: "network unreachable",
        errno.ECONNRESET: "connection reset",
    }.get(err) or os.strerror(err).lower()
    return Refusal(502, f"cannot connect to {where}: {what}")


def hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


__all__ = [
    "HOP_BY_HOP",
    "REALM",
    "Forward",
    "Refusal",
    "Tunnel",
    "authorized",
    "client_response",
    "end_to_end",
    "hostport",
    "plan",
    "refusal_for",
    "split_authority",
]
