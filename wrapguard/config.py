"""Parse wg-quick configuration files into frozen dataclasses.

Reads the INI dialect of wg-quick(8) and wg(8): sections and keys are case-insensitive, `#`
starts a comment anywhere on a line, `;` starts a full-line comment, and repeated Address, DNS,
AllowedIPs and Route lines accumulate. Adds wrapguard's `Route = CIDR[:proto[:ports]]`
extension. Everything is validated up front: every problem is a ConfigError naming the file,
the line and the key; a single-valued key given twice is an error naming both lines. Parsing
is pure (no logging): advisory messages come back in `Config.notices` for the CLI to log.
Also parses the values of the CLI's `--route CIDR:PEER_IP` and `--exit-node IP`.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import select
import stat
import urllib.parse
from dataclasses import dataclass, field
from enum import Enum, StrEnum

from wrapguard.errors import ConfigError, UsageError, WrapguardError
from wrapguard.frontends import ProxySpec, make_spec, parse_hostport
from wrapguard.keys import KeyFormatError, PresharedKey, PrivateKey, PublicKey
from wrapguard.roads.proto import check_key, read_key_file

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface

MAX_CONFIG_BYTES = 1 << 20
READ_IDLE = 1.0  # seconds a FIFO or terminal may keep us waiting for the config
_KEY_NAME = re.compile(r"[A-Za-z][A-Za-z0-9]*")
DEFAULT_MTU = 1420
MTU_MIN_V4 = 576  # RFC 791: every IPv4 host must accept 576-byte datagrams
MTU_MIN_V6 = 1280  # RFC 8200 5: the IPv6 minimum link MTU
MTU_MAX = 9000

_KEY_HELP = "is not a valid key: must be 44 characters of base64"


class NoticeLevel(StrEnum):
    DEBUG = "debug"
    WARNING = "warning"


@dataclass(frozen=True, slots=True)
class ConfigNotice:
    """Something the user may want to know that does not stop the run; the CLI logs it."""

    level: NoticeLevel
    message: str
    path: str
    line: int | None = None
    key: str | None = None

    def __str__(self) -> str:
        where = self.path if self.line is None else f"{self.path}:{self.line}"
        key = f"{self.key}: " if self.key else ""
        return f"{where}: {key}{self.message}"


class Protocol(Enum):
    ANY = "any"
    TCP = "tcp"
    UDP = "udp"


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A peer's UDP endpoint; `host` is an IP literal (IPv6 without brackets) or a DNS name."""

    host: str
    port: int

    @property
    def ip(self) -> IPAddress | None:
        try:
            return ipaddress.ip_address(self.host)
        except ValueError:
            return None

    @property
    def is_literal(self) -> bool:
        return self.ip is not None

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class StreamEndpoint:
    """A peer reached over HTTP(S) streams through `wrapguard relay` (docs/streams.md)."""

    url: str  # as written (it holds no secret: the key is never in the URL)
    scheme: str  # "http" or "https"
    host: str  # a DNS name or an IP literal (IPv6 without brackets)
    port: int
    target: str  # path and query, e.g. "/wg"
    key: str = field(repr=False)
    ca_file: str | None = None  # TransportCA, an absolute path; None: the system store
    line: int = 0  # the Endpoint line

    def __str__(self) -> str:
        return self.url


@dataclass(frozen=True, slots=True)
class RouteSpec:
    """A policy route. `port_low`/`port_high` are None for any port; `line` is 0 for flags."""

    network: IPNetwork
    protocol: Protocol = Protocol.ANY
    port_low: int | None = None
    port_high: int | None = None
    line: int = 0
    source: str = "--route"


@dataclass(frozen=True, slots=True)
class InterfaceConfig:
    """The [Interface] section: our key, tunnel addresses, DNS=, MTU, ListenPort."""

    private_key: PrivateKey
    addresses: tuple[IPInterface, ...]
    dns_servers: tuple[IPAddress, ...] = ()
    dns_search: tuple[str, ...] = ()
    mtu: int = DEFAULT_MTU
    listen_port: int | None = None  # None: absent or 0, both mean "any free port"


@dataclass(frozen=True, slots=True)
class PeerConfig:
    """One [Peer] section."""

    public_key: PublicKey
    preshared_key: PresharedKey | None = None
    endpoint: Endpoint | None = None
    allowed_ips: tuple[IPNetwork, ...] = ()
    persistent_keepalive: int | None = None  # seconds; None when off
    routes: tuple[RouteSpec, ...] = ()
    line: int = 0  # line of the [Peer] header
    stream: StreamEndpoint | None = None  # Endpoint = http(s)://...; then `endpoint` is None


@dataclass(frozen=True, slots=True)
class Config:
    """A parsed config: the interface, its peers, notices for the user, proxy sections."""

    interface: InterfaceConfig
    peers: tuple[PeerConfig, ...]
    path: str = "<config>"
    notices: tuple[ConfigNotice, ...] = ()
    proxies: tuple[ProxySpec, ...] = ()  # [Socks5] / [http] sections (wireproxy style)


class _Bad(Exception):
    """A value problem; the caller adds the file, line and key (or the flag)."""


# Canonical spellings, looked up by lower-cased key.
_INTERFACE_KEYS = {k.lower(): k for k in ("PrivateKey", "Address", "DNS", "MTU", "ListenPort")}
_PEER_KEYS = {
    k.lower(): k
    for k in (
        "PublicKey",
        "PresharedKey",
        "Endpoint",
        "AllowedIPs",
        "PersistentKeepalive",
        "Route",
        "TransportKey",
        "TransportKeyFile",
        "TransportCA",
    )
}
_PROXY_KEYS = {k.lower(): k for k in ("BindAddress", "Username", "Password")}
_PROXY_SECTIONS = {"socks5": "Socks5", "http": "http"}  # wireproxy's spellings
_WG_QUICK_ONLY = {
    k.lower(): k
    for k in ("Table", "PreUp", "PostUp", "PreDown", "PostDown", "SaveConfig", "FwMark")
}
_SINGLE_VALUED = frozenset(
    {"PrivateKey", "MTU", "ListenPort", "PublicKey", "PresharedKey", "Endpoint"}
    | {"PersistentKeepalive", "TransportKey", "TransportKeyFile", "TransportCA"}
)
_TRANSPORT_KEYS = ("TransportKey", "TransportKeyFile", "TransportCA")
_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)\Z")


# ---------------------------------------------------------------------------- value parsers


def _show(text: str) -> str:
    """Quote a (non-secret) value for an error message, shortened if long."""
    return repr(text if len(text) <= 60 else text[:57] + "...")


def _uint(text: str, what: str) -> int:
    # isascii() too: int() would accept other scripts' digits, wg does not.
    if not (text.isascii() and text.isdigit()):
        raise _Bad(f"{_show(text)} is not {what}")
    return int(text)


def _port(text: str, low: int) -> int:
    port = _uint(text, "a port number")
    if not low <= port <= 65535:
        raise _Bad(f"port {port} is out of range ({low}-65535)")
    return port


def _ip(text: str) -> IPAddress:
    if "%" in text:
        raise _Bad(f"{_show(text)}: scoped addresses (with %) are not supported here")
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise _Bad(f"{_show(text)} is not an IPv4 or IPv6 address") from None


def _interface(text: str) -> IPInterface:
    if "%" in text:
        raise _Bad(f"{_show(text)}: scoped addresses (with %) are not supported here")
    try:
        return ipaddress.ip_interface(text)
    except ValueError:
        raise _Bad(
            f"{_show(text)} is not an IPv4 or IPv6 address with an optional /prefix length"
        ) from None


def _is_hostname(text: str) -> bool:
    name = text[:-1] if text.endswith(".") else text
    if not name or len(name) > 253:
        return False
    labels = name.split(".")
    # A numeric last label would be read as an IPv4 shorthand by the resolver, not a name.
    return all(_LABEL.match(label) for label in labels) and not labels[-1].isdigit()


def _split_list(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def _network(text: str) -> tuple[IPNetwork, bool]:
    """Parse a CIDR (a bare address means /32 or /128); also say whether host bits were set."""
    iface = _interface(text)
    return iface.network, iface.ip != iface.network.network_address


def _split_cidr(text: str) -> tuple[str, str | None]:
    """Split `CIDR[:rest]`: the CIDR ends at its /len, so IPv6 colons are unambiguous."""
    slash = text.find("/")
    if slash >= 0:
        end = slash + 1
        while end < len(text) and text[end] in "0123456789":
            end += 1
        cidr, rest = text[:end], text[end:]
        if end == slash + 1 or (rest and not rest.startswith(":")):
            raise _Bad(f"{_show(text)}: the prefix length after '/' must be a number")
        return cidr, (rest[1:] if rest else None)
    head, sep, tail = text.partition(":")
    try:
        ipaddress.IPv4Address(head)
    except ValueError:
        if text.count(":") >= 2:
            raise _Bad(
                f"{_show(text)}: an IPv6 network needs a /prefix length (e.g. fd00::1/128), "
                "since ':' also separates the fields"
            ) from None
        raise _Bad(f"{_show(head)} is not an IPv4 or IPv6 network (CIDR)") from None
    return head, (tail if sep else None)


def _parse_endpoint(text: str) -> Endpoint:
    """Parse `1.2.3.4:51820`, `[fd00::1]:51820` or `host.name:51820` (raises _Bad)."""
    if text.startswith("["):
        host, close, rest = text[1:].partition("]")
        if not close or not rest.startswith(":"):
            raise _Bad(f"{_show(text)}: write an IPv6 endpoint as [address]:port")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise _Bad(f"{_show(host)} in brackets is not an IPv6 address") from None
        return Endpoint(host, _port(rest[1:], 1))
    host, sep, port_text = text.rpartition(":")
    if not sep:
        raise _Bad(f"{_show(text)} has no port: write host:port, e.g. 192.0.2.1:51820")
    if ":" in host:
        raise _Bad(f"{_show(text)}: write an IPv6 endpoint in brackets, e.g. [fd00::1]:51820")
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        if not _is_hostname(host):
            raise _Bad(f"{_show(host)} is not an IPv4 address or a host name") from None
    return Endpoint(host, _port(port_text, 1))


def _parse_route_spec(
    text: str, *, line: int = 0, source: str = "--route"
) -> tuple[RouteSpec, bool]:
    """Parse `CIDR[:tcp|udp|any[:PORT|LOW-HIGH|any]]`; also say whether host bits were masked."""
    cidr, rest = _split_cidr(text)
    network, host_bits = _network(cidr)
    fields = [] if rest is None else rest.split(":")
    if len(fields) > 2:
        raise _Bad(f"{_show(text)}: expected CIDR[:tcp|udp|any[:PORT|LOW-HIGH|any]]")
    proto_text = fields[0].strip().lower() if fields else "any"
    try:
        protocol = Protocol(proto_text)
    except ValueError:
        raise _Bad(f"{_show(fields[0])} is not a protocol (tcp, udp or any)") from None
    low: int | None = None
    high: int | None = None
    ports = fields[1].strip().lower() if len(fields) == 2 else "any"
    if ports != "any":
        low_text, dash, high_text = ports.partition("-")
        low = _port(low_text.strip(), 1)
        high = _port(high_text.strip(), 1) if dash else low
        if low > high:
            raise _Bad(f"port range {low}-{high} is backwards (write LOW-HIGH)")
    return RouteSpec(network, protocol, low, high, line, source), host_bits


# ------------------------------------------------------------------------------ the parser


def _parse_stream_url(text: str) -> tuple[str, str, int, str]:
    """`https://host[:port]/path` -> (scheme, host, port, target); raises _Bad."""
    try:
        parts = urllib.parse.urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise _Bad(f"{_show(text)} is not a valid URL ({exc})") from None
    scheme = parts.scheme.lower()
    if parts.username is not None or parts.password is not None:
        raise _Bad("the URL must not hold credentials: put the key in TransportKey")
    host = parts.hostname or ""
    if not host:
        raise _Bad(f"{_show(text)} has no host name")
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise _Bad(f"{_show(host)} in brackets is not an IPv6 address") from None
    else:
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            if not _is_hostname(host):
                raise _Bad(f"{_show(host)} is not an IP address or a host name") from None
    if port == 0:
        raise _Bad(f"{_show(text)}: port 0 is not a port")
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    return scheme, host, port or (443 if scheme == "https" else 80), target


def _check_ca(path: str) -> None:
    """TransportCA must hold at least one PEM certificate ssl can use (raises _Bad)."""
    import ssl  # only for a stream road's TransportCA (start-up time)

    try:
        ctx = ssl.create_default_context(cafile=path)
    except FileNotFoundError:
        raise _Bad(f"{path}: no such file") from None
    except IsADirectoryError:
        raise _Bad(f"{path}: is a directory, not a PEM file") from None
    except PermissionError:
        raise _Bad(f"{path}: cannot read it: permission denied") from None
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise _Bad(f"{path}: holds no usable PEM certificate ({exc})") from None
    del ctx


@dataclass(frozen=True, slots=True)
class _Entry:
    """One `Key = value` line."""

    line: int
    key: str  # canonical spelling
    value: str


@dataclass(slots=True)
class _Section:
    """One section's entries, in file order."""

    name: str  # "Interface" or "Peer"
    line: int
    entries: list[_Entry]


class _Parser:
    def __init__(self, path: str) -> None:
        self.path = path
        self.notices: list[ConfigNotice] = []

    def error(self, message: str, line: int | None = None, key: str | None = None) -> ConfigError:
        return ConfigError(message, path=self.path, line=line, key=key)

    def notice(self, level: NoticeLevel, message: str, line: int | None, key: str | None) -> None:
        self.notices.append(ConfigNotice(level, message, self.path, line, key))

    def parse(self, text: str) -> Config:
        sections = self.split_sections(text)
        interfaces = [s for s in sections if s.name == "Interface"]
        if not interfaces:
            raise self.error("has no [Interface] section (one is required)")
        if len(interfaces) > 1:
            raise self.error(
                f"[Interface] appears again (first on line {interfaces[0].line}); "
                "a config has exactly one",
                interfaces[1].line,
            )
        interface, mtu_line = self.build_interface(interfaces[0])
        peers = tuple(self.build_peer(s) for s in sections if s.name == "Peer")
        proxies = tuple(self.build_proxy(s) for s in sections if s.name in _PROXY_SECTIONS.values())
        self.check_mtu(interface, mtu_line)
        self.check_peers(interface, peers)
        return Config(interface, peers, self.path, tuple(self.notices), proxies)

    def build_proxy(self, section: _Section) -> ProxySpec:
        """[Socks5] / [http]: BindAddress (required), Username and Password (both or none)."""
        kind = "socks5" if section.name == "Socks5" else "http"
        values = {e.key: e for e in section.entries}
        bind = values.get("BindAddress")
        if bind is None:
            raise self.error(
                f"is missing from [{section.name}] (required)", section.line, "BindAddress"
            )
        what = f"[{section.name}]"
        try:
            host, port = parse_hostport(bind.value, "BindAddress")
            user, pw = values.get("Username"), values.get("Password")
            return make_spec(
                kind,
                host,
                port,
                None if user is None else user.value,
                None if pw is None else pw.value,
                what,
            )
        except UsageError as exc:
            raise self.error(str(exc), bind.line, "BindAddress") from None

    def split_sections(self, text: str) -> list[_Section]:
        sections: list[_Section] = []
        text = text.removeprefix("\ufeff")
        # split("\n"), not splitlines(): line numbers must match what an editor shows.
        for lineno, raw in enumerate(text.split("\n"), 1):
            line = raw.split("#", 1)[0].strip()  # wg-quick: '#' starts a comment anywhere
            if not line or line.startswith(";"):
                continue
            if line.startswith("["):
                if not line.endswith("]"):
                    raise self.error(
                        "a section header must look like [Interface] or [Peer]", lineno
                    )
                name = line[1:-1].strip().lower()
                if name in _PROXY_SECTIONS:
                    sections.append(_Section(_PROXY_SECTIONS[name], lineno, []))
                    continue
                if name not in ("interface", "peer"):
                    raise self.error(
                        f"unknown section [{line[1:-1].strip()}] (expected [Interface], "
                        "[Peer], [Socks5] or [http])",
                        lineno,
                    )
                sections.append(_Section(name.capitalize(), lineno, []))
                continue
            key_text, eq, value = line.partition("=")
            key_text, value = key_text.strip(), value.strip()
            if not eq or not _KEY_NAME.fullmatch(key_text):
                # The line is not echoed: it might be a mistyped or pasted private key (keys
                # end in '=', so "PrivateKey <key>" would otherwise split at the padding).
                raise self.error("expected 'Key = Value' or a [Section] header", lineno)
            if not sections:
                raise self.error("comes before any [Interface] or [Peer] section", lineno, key_text)
            entry = self.classify(sections[-1], lineno, key_text, value)
            if entry is not None:
                sections[-1].entries.append(entry)
        return sections

    def classify(self, section: _Section, lineno: int, key_text: str, value: str) -> _Entry | None:
        low = key_text.lower()
        if section.name in _PROXY_SECTIONS.values():
            if low not in _PROXY_KEYS:
                self.notice(
                    NoticeLevel.WARNING,
                    f"unknown key in [{section.name}]; ignored",
                    lineno,
                    key_text,
                )
                return None
            key = _PROXY_KEYS[low]
            if any(e.key == key for e in section.entries):
                raise self.error("is set twice in this section", lineno, key)
            if not value:
                raise self.error("has no value", lineno, key)
            return _Entry(lineno, key, value)
        own, other = (
            (_INTERFACE_KEYS, _PEER_KEYS)
            if section.name == "Interface"
            else (_PEER_KEYS, _INTERFACE_KEYS)
        )
        if low in own:
            key = own[low]
            if key in _SINGLE_VALUED:
                for previous in section.entries:
                    if previous.key == key:
                        raise self.error(
                            f"is set twice in this section (first on line {previous.line})",
                            lineno,
                            key,
                        )
                if not value:
                    raise self.error("has no value", lineno, key)
            return _Entry(lineno, key, value)
        if low in other:
            other_name = "Peer" if section.name == "Interface" else "Interface"
            raise self.error(
                f"belongs in a [{other_name}] section, not [{section.name}]", lineno, other[low]
            )
        if low in _WG_QUICK_ONLY:
            self.notice(
                NoticeLevel.DEBUG,
                "is a wg-quick setting that wrapguard does not use; ignored",
                lineno,
                _WG_QUICK_ONLY[low],
            )
        else:
            self.notice(
                NoticeLevel.WARNING, f"unknown key in [{section.name}]; ignored", lineno, key_text
            )
        return None

    def build_interface(self, section: _Section) -> tuple[InterfaceConfig, int]:
        private_key: PrivateKey | None = None
        addresses: list[IPInterface] = []
        servers: list[IPAddress] = []
        search: list[str] = []
        mtu, mtu_line, listen_port = DEFAULT_MTU, 0, None
        for e in section.entries:
            try:
                if e.key == "PrivateKey":
                    private_key = PrivateKey.from_base64(e.value)
                elif e.key == "Address":
                    addresses.extend(_interface(item) for item in _split_list(e.value))
                elif e.key == "DNS":
                    for item in _split_list(e.value):
                        try:
                            servers.append(_ip(item))
                        except _Bad:
                            if not _is_hostname(item):
                                raise _Bad(
                                    f"{_show(item)} is neither an IP address (a DNS server) "
                                    "nor a domain name (a search domain)"
                                ) from None
                            search.append(item)
                elif e.key == "MTU":
                    mtu, mtu_line = _uint(e.value, "a number"), e.line
                elif e.key == "ListenPort":
                    listen_port = _port(e.value, 0) or None
            except KeyFormatError:
                raise self.error(_KEY_HELP, e.line, e.key) from None
            except _Bad as bad:
                raise self.error(str(bad), e.line, e.key) from None
        if private_key is None:
            raise self.error("is missing from [Interface] (required)", section.line, "PrivateKey")
        if not addresses:
            raise self.error(
                "is missing from [Interface] (required: the tunnel address(es) of this end)",
                section.line,
                "Address",
            )
        iface = InterfaceConfig(
            private_key, tuple(addresses), tuple(servers), tuple(search), mtu, listen_port
        )
        return iface, mtu_line

    def build_peer(self, section: _Section) -> PeerConfig:
        public_key: PublicKey | None = None
        psk: PresharedKey | None = None
        endpoint: Endpoint | None = None
        allowed: list[IPNetwork] = []
        keepalive: int | None = None
        routes: list[RouteSpec] = []
        url: tuple[_Entry, tuple[str, str, int, str]] | None = None
        transport: dict[str, _Entry] = {}
        for e in section.entries:
            try:
                if e.key == "Endpoint" and e.value.lower().startswith(("http://", "https://")):
                    url = (e, _parse_stream_url(e.value))
                elif e.key in _TRANSPORT_KEYS:
                    transport[e.key] = e
                elif e.key == "PublicKey":
                    public_key = PublicKey.from_base64(e.value)
                elif e.key == "PresharedKey":
                    psk = PresharedKey.from_base64(e.value)
                elif e.key == "Endpoint":
                    endpoint = _parse_endpoint(e.value)
                elif e.key == "AllowedIPs":
                    for item in _split_list(e.value):
                        network, host_bits = _network(item)
                        if host_bits:
                            self.masked(item, network, e)
                        allowed.append(network)
                elif e.key == "PersistentKeepalive":
                    keepalive = self.keepalive(e.value)
                elif e.key == "Route":
                    route, host_bits = _parse_route_spec(
                        e.value, line=e.line, source=f"config line {e.line}"
                    )
                    if host_bits:
                        self.masked(_split_cidr(e.value)[0], route.network, e)
                    routes.append(route)
            except KeyFormatError:
                raise self.error(_KEY_HELP, e.line, e.key) from None
            except _Bad as bad:
                raise self.error(str(bad), e.line, e.key) from None
        if public_key is None:
            raise self.error("is missing from this [Peer] (required)", section.line, "PublicKey")
        stream = self.build_stream(section, url, transport)
        return PeerConfig(
            public_key,
            psk,
            endpoint,
            tuple(allowed),
            keepalive,
            tuple(routes),
            section.line,
            stream,
        )

    def relative(self, path: str) -> str:
        """A path from the config, relative to the config file's directory."""
        path = os.path.expanduser(path)
        if os.path.isabs(path) or self.path.startswith("<"):
            return os.path.abspath(path)
        return os.path.abspath(os.path.join(os.path.dirname(self.path), path))

    def build_stream(
        self,
        section: _Section,
        url: tuple[_Entry, tuple[str, str, int, str]] | None,
        transport: dict[str, _Entry],
    ) -> StreamEndpoint | None:
        if url is None:
            for name in _TRANSPORT_KEYS:
                if name in transport:
                    raise self.error(
                        "is only for a peer whose Endpoint is an http:// or https:// URL",
                        transport[name].line,
                        name,
                    )
            return None
        entry, (scheme, host, port, target) = url
        key_e, file_e = transport.get("TransportKey"), transport.get("TransportKeyFile")
        if key_e is not None and file_e is not None:
            raise self.error(
                f"and TransportKey (line {key_e.line}) are both set; use one",
                file_e.line,
                "TransportKeyFile",
            )
        if key_e is not None:
            why = check_key(key_e.value)
            if why is not None:
                raise self.error(f"the key {why}", key_e.line, "TransportKey")
            key = key_e.value
        elif file_e is not None:
            try:
                key = read_key_file(self.relative(file_e.value), many=False)[0]
            except WrapguardError as exc:
                raise self.error(str(exc), file_e.line, "TransportKeyFile") from None
        else:
            raise self.error(
                "is an http(s) URL: this [Peer] needs TransportKey or TransportKeyFile too "
                "(the relay's API key)",
                entry.line,
                "Endpoint",
            )
        ca: str | None = None
        ca_e = transport.get("TransportCA")
        if ca_e is not None:
            if scheme != "https":
                raise self.error("is only for an https:// Endpoint", ca_e.line, "TransportCA")
            ca = self.relative(ca_e.value)
            try:
                _check_ca(ca)
            except _Bad as bad:
                raise self.error(str(bad), ca_e.line, "TransportCA") from None
        return StreamEndpoint(entry.value, scheme, host, port, target, key, ca, entry.line)

    def masked(self, text: str, network: IPNetwork, e: _Entry) -> None:
        # wg(8) silently masks host bits; we do the same but say so.
        self.notice(
            NoticeLevel.WARNING, f"{text} has host bits set; using {network}", e.line, e.key
        )

    @staticmethod
    def keepalive(value: str) -> int | None:
        if value.lower() == "off":
            return None
        seconds = _uint(value, "a number of seconds or 'off'")
        if seconds > 65535:
            raise _Bad(f"{seconds} is out of range (1-65535 seconds, or 0 or off to disable)")
        return seconds or None

    def check_mtu(self, interface: InterfaceConfig, line: int) -> None:
        mtu = interface.mtu
        has_v6 = any(a.version == 6 for a in interface.addresses)
        if not MTU_MIN_V4 <= mtu <= MTU_MAX:
            raise self.error(f"{mtu} is out of range ({MTU_MIN_V4}-{MTU_MAX})", line, "MTU")
        if has_v6 and mtu < MTU_MIN_V6:
            raise self.error(
                f"{mtu} is too small for IPv6 (an IPv6 Address needs at least {MTU_MIN_V6})",
                line,
                "MTU",
            )

    def check_peers(self, interface: InterfaceConfig, peers: tuple[PeerConfig, ...]) -> None:
        own = interface.private_key.public_key()
        first_by_key: dict[bytes, int] = {}
        owner: dict[IPNetwork, int] = {}
        for peer in peers:
            if peer.public_key == own:
                raise self.error(
                    "is this interface's own public key (a peer must be another machine)",
                    peer.line,
                    "PublicKey",
                )
            first = first_by_key.setdefault(peer.public_key.raw, peer.line)
            if first != peer.line:
                raise self.error(
                    f"the same peer is already defined in the [Peer] on line {first}",
                    peer.line,
                    "PublicKey",
                )
            for network in peer.allowed_ips:
                claimed = owner.setdefault(network, peer.line)
                if claimed != peer.line:
                    self.notice(
                        NoticeLevel.DEBUG,
                        f"{network} is also in the [Peer] on line {claimed}, which wins "
                        "(file order breaks ties)",
                        peer.line,
                        "AllowedIPs",
                    )


def parse_config(text: str, path: str = "<config>") -> Config:
    """Parse the text of a wg-quick config; raises ConfigError naming path, line and key."""
    return _Parser(path).parse(text)


def load_config(path: str) -> Config:
    """Read and parse a config file; warns (as a notice) if group or others can read it."""
    try:
        st, data = _read_bounded(path)
    except FileNotFoundError:
        raise ConfigError("no such file", path=path) from None
    except IsADirectoryError:
        raise ConfigError("is a directory, not a config file", path=path) from None
    except PermissionError:
        raise ConfigError("cannot read it: permission denied", path=path) from None
    except OSError as exc:
        raise ConfigError(f"cannot read it: {exc.strerror or exc}", path=path) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError("is not UTF-8 text", path=path, line=line) from None
    config = parse_config(text, path)
    if stat.S_ISREG(st.st_mode) and st.st_mode & 0o077:
        warning = ConfigNotice(
            NoticeLevel.WARNING,
            f"{path} is world accessible (mode {stat.S_IMODE(st.st_mode):04o}); "
            f"it holds a private key: chmod 600 {path}",
            path,
        )
        config = dataclasses.replace(config, notices=(warning, *config.notices))
    return config


def _read_bounded(path: str) -> tuple[os.stat_result, bytes]:
    """The file's bytes, at most MAX_CONFIG_BYTES + 1 of them, without ever blocking for long:
    a FIFO or terminal (process substitution `<(...)` is fine) must deliver within
    READ_IDLE seconds, and a FIFO nobody writes to is an error, not a hang."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise ConfigError("is a directory, not a config file", path=path)
        chunks: list[bytes] = []
        size = 0
        while size <= MAX_CONFIG_BYTES:
            try:
                chunk = os.read(fd, MAX_CONFIG_BYTES + 1 - size)
            except BlockingIOError:
                if not select.select([fd], [], [], READ_IDLE)[0]:
                    raise ConfigError(
                        f"nothing to read within {READ_IDLE:g} s (a FIFO or terminal?); "
                        "give the path of a config file",
                        path=path,
                    ) from None
                continue
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(
            f"is larger than {MAX_CONFIG_BYTES // 1024} KiB; not a WireGuard config", path=path
        )
    if not data and stat.S_ISFIFO(st.st_mode):
        raise ConfigError("is a FIFO with no writer: give the path of a config file", path=path)
    return st, data


# ------------------------------------------------------------------------------ CLI values


def _strip_brackets(text: str) -> str:
    text = text.strip()
    return text[1:-1] if text.startswith("[") and text.endswith("]") else text


def parse_ip(text: str, flag: str = "--exit-node") -> IPAddress:
    """Parse an IP address given on the command line (IPv6 may be in brackets)."""
    try:
        return _ip(_strip_brackets(text))
    except _Bad:
        raise UsageError(f"{flag} {text}: not an IPv4 or IPv6 address") from None


def parse_route_flag(text: str) -> tuple[IPNetwork, IPAddress]:
    """Parse `--route CIDR:PEER_IP`, e.g. `10.9.0.0/16:10.150.0.9` or `fd00::/8:fd15::1`."""
    example = "expected CIDR:PEER_IP, e.g. 10.9.0.0/16:10.150.0.9 or fd00::/8:fd15::1"
    try:
        cidr, peer_text = _split_cidr(text.strip())
        if not peer_text:
            raise _Bad(example)
        network, host_bits = _network(cidr)
        if host_bits:
            raise _Bad(f"{cidr} has host bits set; did you mean {network}?")
        peer = _ip(_strip_brackets(peer_text))
    except _Bad as bad:
        raise UsageError(f"--route {text}: {bad}") from None
    return network, peer
