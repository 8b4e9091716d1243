"""Proxy front-ends as the user asks for them: `--socks5` / `--http-proxy`
`[USER:PASS@]HOST:PORT`, or wireproxy-style `[Socks5]` / `[http]` config sections with
`BindAddress`, `Username`, `Password` (compat.md "One engine, several doors").

A bind outside loopback without credentials is refused: any host on that network could use
the tunnel. An unauthenticated loopback proxy is still open to every local user (README says
how to avoid that).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from wrapguard.errors import UsageError

KINDS = {"socks5": "--socks5", "http": "--http-proxy"}
DEFAULT_HOST = "127.0.0.1"


@dataclass(frozen=True, slots=True)
class ProxySpec:
    """Where a proxy door listens and whom it lets in."""

    kind: str  # "socks5" or "http"
    host: str  # an IP literal (IPv6 without brackets) or "localhost"
    port: int
    username: str | None = None
    password: str | None = None

    @property
    def auth(self) -> bool:
        return self.username is not None

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def __repr__(self) -> str:  # never shows the password
        who = f"{self.username}:***@" if self.username is not None else ""
        return f"ProxySpec({self.kind} {who}{self.address})"

    __str__ = __repr__


def parse_hostport(text: str, what: str) -> tuple[str, int]:
    """`HOST:PORT`, `[v6]:PORT` or `:PORT` (loopback); UsageError naming `what`."""
    text = text.strip()
    if text.startswith("["):
        host, close, rest = text[1:].partition("]")
        if not close or not rest.startswith(":"):
            raise UsageError(f"{what} {text!r}: write an IPv6 address as [address]:port")
        port_text = rest[1:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise UsageError(f"{what} {text!r}: expected HOST:PORT, e.g. 127.0.0.1:1080")
        if ":" in host:
            raise UsageError(f"{what} {text!r}: write an IPv6 address in brackets, [::1]:1080")
    host = host or DEFAULT_HOST
    if host != "localhost":
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise UsageError(f"{what} {text!r}: {host!r} is not an IP address") from None
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise UsageError(f"{what} {text!r}: the port must be 1-65535")
    return host, int(port_text)


def is_loopback(host: str) -> bool:
    return host == "localhost" or ipaddress.ip_address(host).is_loopback


def make_spec(
    kind: str, host: str, port: int, username: str | None, password: str | None, what: str
) -> ProxySpec:
    """The spec, refusing an unsafe one (UsageError naming `what`)."""
    if (username is None) != (password is None):
        raise UsageError(f"{what}: give both a user name and a password, or neither")
    if username is not None and (not username or ":" in username):
        raise UsageError(f"{what}: the user name must be non-empty and have no ':'")
    if username is None and not is_loopback(host):
        raise UsageError(
            f"{what}: listening on {host} without credentials would let anyone on that "
            "network use the tunnel; bind to 127.0.0.1 or set a user name and password"
        )
    return ProxySpec(kind, host, port, username, password)


def parse_proxy_flag(kind: str, text: str) -> ProxySpec:
    """`--socks5 [USER:PASS@]HOST:PORT` (the password may contain ':' and '@')."""
    flag = KINDS[kind]
    userinfo, at, hostport = text.rpartition("@")
    username = password = None
    if at:
        username, colon, password = userinfo.partition(":")
        if not colon:
            raise UsageError(f"{flag}: write credentials as USER:PASS@HOST:PORT")
    host, port = parse_hostport(hostport, flag)
    return make_spec(kind, host, port, username, password, flag)


__all__ = ["KINDS", "ProxySpec", "is_loopback", "make_spec", "parse_hostport", "parse_proxy_flag"]
