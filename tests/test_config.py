"""Tests for wrapguard.config: every key, every error (exact file:line: key: message shape)."""

from __future__ import annotations

import base64
import os
import string
import threading
import time
from ipaddress import IPv4Address, IPv6Address, ip_address, ip_interface, ip_network
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wrapguard.config import (
    Config,
    Endpoint,
    NoticeLevel,
    Protocol,
    RouteSpec,
    load_config,
    parse_config,
    parse_ip,
    parse_route_flag,
)
from wrapguard.errors import ConfigError, UsageError
from wrapguard.keys import PresharedKey, PrivateKey

PRIV = PrivateKey(bytes(range(32)))
PRIV_B64 = PRIV.to_base64()
PUB1 = PrivateKey(bytes([1]) * 32).public_key()
PUB2 = PrivateKey(bytes([2]) * 32).public_key()
PSK_B64 = base64.b64encode(bytes([7]) * 32).decode()


def cfg(*lines: str) -> str:
    return "\n".join(lines) + "\n"


# Line 1-3: a minimal interface; peers start at line 4.
IFACE = ("[Interface]", f"PrivateKey = {PRIV_B64}", "Address = 10.150.0.2/24")


def peer(*extra: str, key: str | None = None) -> tuple[str, ...]:
    return ("[Peer]", f"PublicKey = {key or PUB1.to_base64()}", *extra)


def parse(*lines: str) -> Config:
    return parse_config(cfg(*lines), "wg0.conf")


def error(*lines: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse(*lines)
    return str(info.value)


# ----------------------------------------------------------------------- happy path, all keys


def test_full_config_every_key() -> None:
    c = parse(
        "# a comment",
        "; another comment",
        "",
        "[Interface]",
        f"PrivateKey = {PRIV_B64}",
        "Address = 10.150.0.2/24, fd15::2",
        "Address = 10.151.0.2",
        "DNS = 10.150.0.1, corp.example",
        "DNS = fd15::1, lab.example.",
        "MTU = 1380",
        "ListenPort = 51821",
        "",
        "[Peer]",
        f"PublicKey = {PUB1.to_base64()}",
        f"PresharedKey = {PSK_B64}",
        "Endpoint = 192.0.2.1:51820",
        "AllowedIPs = 10.150.0.0/24, fd15::/64",
        "AllowedIPs = 10.9.0.0/16",
        "PersistentKeepalive = 25",
        "Route = 10.20.0.0/16",
        "Route = 10.30.0.0/16:tcp",
        "Route = 10.40.0.0/16:udp:53",
        "Route = 10.50.0.0/16:any:8000-8100",
        "Route = fd00::/8:tcp:443",
        "Route = 10.60.0.7:tcp:any",
    )
    i = c.interface
    assert i.private_key == PRIV
    assert i.addresses == (
        ip_interface("10.150.0.2/24"),
        ip_interface("fd15::2/128"),
        ip_interface("10.151.0.2/32"),
    )
    assert i.dns_servers == (ip_address("10.150.0.1"), ip_address("fd15::1"))
    assert i.dns_search == ("corp.example", "lab.example.")
    assert i.mtu == 1380
    assert i.listen_port == 51821
    assert c.path == "wg0.conf"
    assert c.notices == ()
    (p,) = c.peers
    assert p.public_key == PUB1
    assert p.preshared_key == PresharedKey(bytes([7]) * 32)
    assert p.endpoint == Endpoint("192.0.2.1", 51820)
    assert p.endpoint.is_literal
    assert p.allowed_ips == (
        ip_network("10.150.0.0/24"),
        ip_network("fd15::/64"),
        ip_network("10.9.0.0/16"),
    )
    assert p.persistent_keepalive == 25
    assert p.line == 13
    assert p.routes == (
        RouteSpec(ip_network("10.20.0.0/16"), Protocol.ANY, None, None, 20, "config line 20"),
        RouteSpec(ip_network("10.30.0.0/16"), Protocol.TCP, None, None, 21, "config line 21"),
        RouteSpec(ip_network("10.40.0.0/16"), Protocol.UDP, 53, 53, 22, "config line 22"),
        RouteSpec(ip_network("10.50.0.0/16"), Protocol.ANY, 8000, 8100, 23, "config line 23"),
        RouteSpec(ip_network("fd00::/8"), Protocol.TCP, 443, 443, 24, "config line 24"),
        RouteSpec(ip_network("10.60.0.7/32"), Protocol.TCP, None, None, 25, "config line 25"),
    )


def test_defaults() -> None:
    c = parse(*IFACE, *peer())
    assert c.interface.mtu == 1420
    assert c.interface.listen_port is None
    assert c.interface.dns_servers == () and c.interface.dns_search == ()
    p = c.peers[0]
    assert p.preshared_key is None and p.endpoint is None and p.persistent_keepalive is None
    assert p.allowed_ips == () and p.routes == ()


def test_no_peers_is_fine() -> None:
    assert parse(*IFACE).peers == ()


def test_case_insensitive_sections_and_keys() -> None:
    c = parse(
        "[INTERFACE]",
        f"privatekey = {PRIV_B64}",
        "ADDRESS = 10.150.0.2/24",
        "mtu=1400",
        "[peer]",
        f"PUBLICKEY={PUB1.to_base64()}",
        "allowedips = 10.150.0.0/24",
        "ROUTE = 10.9.0.0/16:TCP:Any",
        "persistentkeepalive = OFF",
    )
    assert c.interface.mtu == 1400
    assert c.peers[0].allowed_ips == (ip_network("10.150.0.0/24"),)
    assert c.peers[0].routes[0].protocol is Protocol.TCP
    assert c.peers[0].routes[0].port_low is None
    assert c.peers[0].persistent_keepalive is None


def test_inline_comments_and_whitespace() -> None:
    c = parse(
        "  [Interface]   # the interface",
        f"PrivateKey = {PRIV_B64} # secret",
        "Address = 10.150.0.2/24#no space before",
        "\tMTU\t=\t1400\t",
        "   ; indented semicolon comment",
        "   # indented hash comment",
        "[Peer]",
        f"PublicKey = {PUB1.to_base64()}   # laptop",
        "AllowedIPs = 10.150.0.0/24, # trailing comma and comment",
        "Endpoint = vpn.example.com:51820 # the server",
    )
    assert c.interface.addresses == (ip_interface("10.150.0.2/24"),)
    assert c.interface.mtu == 1400
    assert c.peers[0].allowed_ips == (ip_network("10.150.0.0/24"),)
    assert c.peers[0].endpoint == Endpoint("vpn.example.com", 51820)


def test_crlf_and_bom() -> None:
    text = "\ufeff" + cfg(*IFACE, *peer("AllowedIPs = 10.150.0.0/24")).replace("\n", "\r\n")
    c = parse_config(text)
    assert c.peers[0].allowed_ips == (ip_network("10.150.0.0/24"),)
    with pytest.raises(ConfigError, match=r"^<config>:4: "):
        parse_config("\r\n".join([*IFACE, "MTU = x"]))


def test_multiple_peers_and_lines() -> None:
    c = parse(*IFACE, *peer(), "", *peer(key=PUB2.to_base64()))
    assert [p.line for p in c.peers] == [4, 7]
    assert [p.public_key for p in c.peers] == [PUB1, PUB2]


def test_repeated_allowed_ips_and_routes_accumulate_in_order() -> None:
    c = parse(
        *IFACE,
        *peer(
            "AllowedIPs = 10.1.0.0/16",
            "Route = 10.5.0.0/16",
            "AllowedIPs = 10.2.0.0/16, 10.3.0.0/16",
            "Route = fd00::/8",
            "AllowedIPs = fd15::/64",
        ),
    )
    p = c.peers[0]
    assert p.allowed_ips == tuple(
        map(ip_network, ["10.1.0.0/16", "10.2.0.0/16", "10.3.0.0/16", "fd15::/64"])
    )
    assert [(str(r.network), r.line) for r in p.routes] == [("10.5.0.0/16", 7), ("fd00::/8", 9)]


def test_allowed_ips_host_bits_masked_with_warning() -> None:
    c = parse(*IFACE, *peer("AllowedIPs = 10.150.0.9/24, fd15::9/64, 10.1.2.3"))
    assert c.peers[0].allowed_ips == tuple(
        map(ip_network, ["10.150.0.0/24", "fd15::/64", "10.1.2.3/32"])
    )
    warnings = [str(n) for n in c.notices if n.level is NoticeLevel.WARNING]
    assert warnings == [
        "wg0.conf:6: AllowedIPs: 10.150.0.9/24 has host bits set; using 10.150.0.0/24",
        "wg0.conf:6: AllowedIPs: fd15::9/64 has host bits set; using fd15::/64",
    ]


def test_route_host_bits_masked_with_warning() -> None:
    c = parse(*IFACE, *peer("Route = 10.9.0.1/16:tcp"))
    assert c.peers[0].routes[0].network == ip_network("10.9.0.0/16")
    assert [str(n) for n in c.notices] == [
        "wg0.conf:6: Route: 10.9.0.1/16 has host bits set; using 10.9.0.0/16"
    ]


def test_wg_quick_only_keys_debug_and_unknown_keys_warning() -> None:
    c = parse(
        *IFACE,
        "Table = off",
        "PreUp = x",
        "PostUp = iptables -A FORWARD -i %i -j ACCEPT; echo hi",
        "PreDown = x",
        "postdown = x",
        "SaveConfig = true",
        "FwMark = 0x1234",
        "Colour = blue",
        *peer("Flavour = mint"),
    )
    debug = [(n.line, n.key) for n in c.notices if n.level is NoticeLevel.DEBUG]
    assert debug == [
        (4, "Table"),
        (5, "PreUp"),
        (6, "PostUp"),
        (7, "PreDown"),
        (8, "PostDown"),
        (9, "SaveConfig"),
        (10, "FwMark"),
    ]
    warnings = [str(n) for n in c.notices if n.level is NoticeLevel.WARNING]
    assert warnings == [
        "wg0.conf:11: Colour: unknown key in [Interface]; ignored",
        "wg0.conf:14: Flavour: unknown key in [Peer]; ignored",
    ]
    assert all(n.level == "debug" or n.level == "warning" for n in c.notices)


def test_endpoint_forms() -> None:
    cases = {
        "192.0.2.1:51820": ("192.0.2.1", 51820, True),
        "[fd00::1]:1": ("fd00::1", 1, True),
        "vpn.example.com:65535": ("vpn.example.com", 65535, False),
        "localhost:51820": ("localhost", 51820, False),
        "my_host-1.example.:9": ("my_host-1.example.", 9, False),
    }
    for text, (host, port, literal) in cases.items():
        e = parse(*IFACE, *peer(f"Endpoint = {text}")).peers[0].endpoint
        assert e is not None
        assert (e.host, e.port, e.is_literal) == (host, port, literal)
        assert str(e) == text
    assert Endpoint("fd00::1", 5).ip == IPv6Address("fd00::1")
    assert Endpoint("example.com", 5).ip is None


def test_keepalive_values() -> None:
    for text, want in [("1", 1), ("65535", 65535), ("0", None), ("off", None), ("Off", None)]:
        c = parse(*IFACE, *peer(f"PersistentKeepalive = {text}"))
        assert c.peers[0].persistent_keepalive == want


def test_mtu_and_listen_port_bounds_accepted() -> None:
    assert parse(*IFACE, "MTU = 576").interface.mtu == 576
    assert parse(*IFACE, "MTU = 9000").interface.mtu == 9000
    assert parse(*IFACE, "Address = fd15::2", "MTU = 1280").interface.mtu == 1280
    assert parse(*IFACE, "ListenPort = 0").interface.listen_port is None
    assert parse(*IFACE, "ListenPort = 65535").interface.listen_port == 65535


def test_overlapping_allowed_ips_allowed_with_debug_notice() -> None:
    c = parse(
        *IFACE,
        *peer("AllowedIPs = 10.150.0.0/24"),
        *peer("AllowedIPs = 10.150.0.0/24, 10.0.0.0/8", key=PUB2.to_base64()),
    )
    assert len(c.peers) == 2
    assert [str(n) for n in c.notices] == [
        "wg0.conf:7: AllowedIPs: 10.150.0.0/24 is also in the [Peer] on line 4, "
        "which wins (file order breaks ties)"
    ]


def test_reprs_never_show_keys() -> None:
    c = parse(*IFACE, *peer(f"PresharedKey = {PSK_B64}"))
    text = repr(c) + str(c)
    assert PRIV_B64 not in text and PSK_B64 not in text
    assert PRIV_B64[:8] not in text


# ------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        # structure
        ((), "wg0.conf: has no [Interface] section (one is required)"),
        (peer(), "wg0.conf: has no [Interface] section (one is required)"),
        (
            (*IFACE, "[Interface]"),
            "wg0.conf:4: [Interface] appears again (first on line 1); a config has exactly one",
        ),
        (
            ("Address = 10.0.0.1", *IFACE),
            "wg0.conf:1: Address: comes before any [Interface] or [Peer] section",
        ),
        ((*IFACE, "MTU 1400"), "wg0.conf:4: expected 'Key = Value' or a [Section] header"),
        ((*IFACE, "= 1400"), "wg0.conf:4: expected 'Key = Value' or a [Section] header"),
        (
            (*IFACE, "[Peer"),
            "wg0.conf:4: a section header must look like [Interface] or [Peer]",
        ),
        (
            (*IFACE, "[Server]"),
            "wg0.conf:4: unknown section [Server] "
            "(expected [Interface], [Peer], [Socks5] or [http])",
        ),
        (
            (*IFACE, "PublicKey = x"),
            "wg0.conf:4: PublicKey: belongs in a [Peer] section, not [Interface]",
        ),
        (
            (*IFACE, *peer("address = 10.0.0.1")),
            "wg0.conf:6: Address: belongs in a [Interface] section, not [Peer]",
        ),
        # duplicates of single-valued keys
        (
            (*IFACE, "mtu = 1400", "MTU = 1300"),
            "wg0.conf:5: MTU: is set twice in this section (first on line 4)",
        ),
        (
            (*IFACE, *peer("Endpoint = 192.0.2.1:1", "Endpoint = 192.0.2.1:2")),
            "wg0.conf:7: Endpoint: is set twice in this section (first on line 6)",
        ),
        (
            (*IFACE, *peer(f"PublicKey = {PUB2.to_base64()}")),
            "wg0.conf:6: PublicKey: is set twice in this section (first on line 5)",
        ),
        ((*IFACE, "ListenPort ="), "wg0.conf:4: ListenPort: has no value"),
        # PrivateKey / Address
        (
            ("[Interface]", "PrivateKey = c2VjcmV0", "Address = 10.0.0.1"),
            "wg0.conf:2: PrivateKey: is not a valid key: must be 44 characters of base64",
        ),
        (
            ("[Interface]", "Address = 10.0.0.1"),
            "wg0.conf:1: PrivateKey: is missing from [Interface] (required)",
        ),
        (
            ("[Interface]", f"PrivateKey = {PRIV_B64}"),
            "wg0.conf:1: Address: is missing from [Interface] "
            "(required: the tunnel address(es) of this end)",
        ),
        (
            (*IFACE, "Address = 10.0.0.1/33"),
            "wg0.conf:4: Address: '10.0.0.1/33' is not an IPv4 or IPv6 address "
            "with an optional /prefix length",
        ),
        (
            (*IFACE, "Address = fe80::1%eth0"),
            "wg0.conf:4: Address: 'fe80::1%eth0': scoped addresses (with %) are not supported here",
        ),
        # DNS
        (
            (*IFACE, "DNS = 10.0.0.1, not a name"),
            "wg0.conf:4: DNS: 'not a name' is neither an IP address (a DNS server) "
            "nor a domain name (a search domain)",
        ),
        # MTU
        ((*IFACE, "MTU = big"), "wg0.conf:4: MTU: 'big' is not a number"),
        ((*IFACE, "MTU = 575"), "wg0.conf:4: MTU: 575 is out of range (576-9000)"),
        ((*IFACE, "MTU = 9001"), "wg0.conf:4: MTU: 9001 is out of range (576-9000)"),
        (
            (*IFACE, "Address = fd15::2/64", "MTU = 1279"),
            "wg0.conf:5: MTU: 1279 is too small for IPv6 (an IPv6 Address needs at least 1280)",
        ),
        ((*IFACE, "MTU = ١٤٠٠"), "wg0.conf:4: MTU: '١٤٠٠' is not a number"),
        # ListenPort
        (
            (*IFACE, "ListenPort = 65536"),
            "wg0.conf:4: ListenPort: port 65536 is out of range (0-65535)",
        ),
        ((*IFACE, "ListenPort = -1"), "wg0.conf:4: ListenPort: '-1' is not a port number"),
        # PublicKey / PresharedKey
        (
            (*IFACE, "[Peer]", "AllowedIPs = 10.0.0.0/8"),
            "wg0.conf:4: PublicKey: is missing from this [Peer] (required)",
        ),
        (
            (*IFACE, "[Peer]", "PublicKey = AAAA"),
            "wg0.conf:5: PublicKey: is not a valid key: must be 44 characters of base64",
        ),
        (
            (*IFACE, *peer("PresharedKey = " + "!" * 43 + "=")),
            "wg0.conf:6: PresharedKey: is not a valid key: must be 44 characters of base64",
        ),
        (
            (*IFACE, *peer(), *peer(key=PUB1.to_base64())),
            "wg0.conf:6: PublicKey: the same peer is already defined in the [Peer] on line 4",
        ),
        (
            (*IFACE, *peer(key=PRIV.public_key().to_base64())),
            "wg0.conf:4: PublicKey: is this interface's own public key "
            "(a peer must be another machine)",
        ),
        # Endpoint
        (
            (*IFACE, *peer("Endpoint = 192.0.2.1:99999")),
            "wg0.conf:6: Endpoint: port 99999 is out of range (1-65535)",
        ),
        (
            (*IFACE, *peer("Endpoint = 192.0.2.1:0")),
            "wg0.conf:6: Endpoint: port 0 is out of range (1-65535)",
        ),
        (
            (*IFACE, *peer("Endpoint = 192.0.2.1")),
            "wg0.conf:6: Endpoint: '192.0.2.1' has no port: write host:port, e.g. 192.0.2.1:51820",
        ),
        (
            (*IFACE, *peer("Endpoint = 192.0.2.1:http")),
            "wg0.conf:6: Endpoint: 'http' is not a port number",
        ),
        (
            (*IFACE, *peer("Endpoint = fd00::1:51820")),
            "wg0.conf:6: Endpoint: 'fd00::1:51820': write an IPv6 endpoint in brackets, "
            "e.g. [fd00::1]:51820",
        ),
        (
            (*IFACE, *peer("Endpoint = [fd00::1]51820")),
            "wg0.conf:6: Endpoint: '[fd00::1]51820': write an IPv6 endpoint as [address]:port",
        ),
        (
            (*IFACE, *peer("Endpoint = [10.0.0.1]:51820")),
            "wg0.conf:6: Endpoint: '10.0.0.1' in brackets is not an IPv6 address",
        ),
        (
            (*IFACE, *peer("Endpoint = bad host:51820")),
            "wg0.conf:6: Endpoint: 'bad host' is not an IPv4 address or a host name",
        ),
        (
            (*IFACE, *peer("Endpoint = 1.2.3:51820")),
            "wg0.conf:6: Endpoint: '1.2.3' is not an IPv4 address or a host name",
        ),
        # AllowedIPs
        (
            (*IFACE, *peer("AllowedIPs = 10.0.0.0/8, 10.1.0.0/40")),
            "wg0.conf:6: AllowedIPs: '10.1.0.0/40' is not an IPv4 or IPv6 address "
            "with an optional /prefix length",
        ),
        # PersistentKeepalive
        (
            (*IFACE, *peer("PersistentKeepalive = 65536")),
            "wg0.conf:6: PersistentKeepalive: 65536 is out of range "
            "(1-65535 seconds, or 0 or off to disable)",
        ),
        (
            (*IFACE, *peer("PersistentKeepalive = 25s")),
            "wg0.conf:6: PersistentKeepalive: '25s' is not a number of seconds or 'off'",
        ),
        # Route
        (
            (*IFACE, *peer("Route = fd00::1:tcp")),
            "wg0.conf:6: Route: 'fd00::1:tcp': an IPv6 network needs a /prefix length "
            "(e.g. fd00::1/128), since ':' also separates the fields",
        ),
        (
            (*IFACE, *peer("Route = fd00::1")),
            "wg0.conf:6: Route: 'fd00::1': an IPv6 network needs a /prefix length "
            "(e.g. fd00::1/128), since ':' also separates the fields",
        ),
        (
            (*IFACE, *peer("Route = 10.0.0.0/:tcp")),
            "wg0.conf:6: Route: '10.0.0.0/:tcp': the prefix length after '/' must be a number",
        ),
        (
            (*IFACE, *peer("Route = 10.0.0.0/8tcp")),
            "wg0.conf:6: Route: '10.0.0.0/8tcp': the prefix length after '/' must be a number",
        ),
        (
            (*IFACE, *peer("Route = 10.0.0.0/33")),
            "wg0.conf:6: Route: '10.0.0.0/33' is not an IPv4 or IPv6 address "
            "with an optional /prefix length",
        ),
        (
            (*IFACE, *peer("Route = example.com:tcp")),
            "wg0.conf:6: Route: 'example.com' is not an IPv4 or IPv6 network (CIDR)",
        ),
        (
            (*IFACE, *peer("Route = 10.0.0.0/8:sctp")),
            "wg0.conf:6: Route: 'sctp' is not a protocol (tcp, udp or any)",
        ),
        (
            (*IFACE, *peer("Route = 10.0.0.0/8:443")),
            "wg0.conf:6: Route: '443' is not a protocol (tcp, udp or any)",
        ),
        (
            (*IFACE, *peer("Route = 10.0.0.0/8:tcp:70000")),
            "wg0.conf:6: Route: port 70000 is out of range (1-65535)",
        ),
        (
            (*IFACE, *peer("Route = 10.0.0.0/8:tcp:0")),
            "wg0.conf:6: Route: port 0 is out of range (1-65535)",
        ),
        (
            (*IFACE, *peer("Route = 10.0.0.0/8:tcp:2000-1000")),
            "wg0.conf:6: Route: port range 2000-1000 is backwards (write LOW-HIGH)",
        ),
        (
            (*IFACE, *peer("Route = 10.0.0.0/8:tcp:80:90")),
            "wg0.conf:6: Route: '10.0.0.0/8:tcp:80:90': "
            "expected CIDR[:tcp|udp|any[:PORT|LOW-HIGH|any]]",
        ),
        (
            (*IFACE, *peer("Route = 10.0.0.0/8:tcp:")),
            "wg0.conf:6: Route: '' is not a port number",
        ),
    ],
)
def test_errors(lines: tuple[str, ...], message: str) -> None:
    assert error(*lines) == message


def test_error_carries_path_line_key() -> None:
    with pytest.raises(ConfigError) as info:
        parse(*IFACE, *peer("Endpoint = 192.0.2.1:99999"))
    assert (info.value.path, info.value.line, info.value.key) == ("wg0.conf", 6, "Endpoint")
    assert info.value.exit_code == 1


def test_secret_values_never_in_errors() -> None:
    bad_private = PRIV_B64[:-2] + "=="  # right length, wrong padding
    bad_psk = PSK_B64[:30]
    msg = error("[Interface]", f"PrivateKey = {bad_private}", "Address = 10.0.0.1")
    assert bad_private not in msg and bad_private[:10] not in msg
    msg = error(*IFACE, *peer(f"PresharedKey = {bad_psk}"))
    assert bad_psk not in msg and bad_psk[:10] not in msg
    # A private key pasted without '=' is not echoed either.
    msg = error("[Interface]", f"PrivateKey {PRIV_B64}", "Address = 10.0.0.1")
    assert PRIV_B64[:10] not in msg


# ------------------------------------------------------------------------------ load_config


def _write(tmp_path: os.PathLike[str], text: str, mode: int) -> str:
    path = os.path.join(tmp_path, "wg0.conf")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(path, mode)
    return path


def test_load_config_private_file_no_warning(tmp_path: os.PathLike[str]) -> None:
    path = _write(tmp_path, cfg(*IFACE, *peer()), 0o600)
    c = load_config(path)
    assert c.path == path and c.notices == ()
    assert c.peers[0].public_key == PUB1


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620])
def test_load_config_world_accessible_warning(tmp_path: os.PathLike[str], mode: int) -> None:
    path = _write(tmp_path, cfg(*IFACE, "Colour = red"), mode)
    c = load_config(path)
    first = c.notices[0]
    assert first.level is NoticeLevel.WARNING
    assert first.path == path and first.line is None
    assert f"{path} is world accessible (mode {mode:04o})" in first.message
    assert c.notices[1].key == "Colour"  # parse notices follow


def test_world_accessible_config_keeps_everything_else(tmp_path: os.PathLike[str]) -> None:
    """The warning is added to what was parsed; nothing parsed is dropped ([Socks5] was)."""
    text = cfg(*IFACE, *peer(), "[Socks5]", "BindAddress = 127.0.0.1:1080")
    private = load_config(_write(tmp_path, text, 0o600))
    os.rename(private.path, os.path.join(tmp_path, "private.conf"))
    shared = load_config(_write(tmp_path, text, 0o644))
    assert shared.notices[0].level is NoticeLevel.WARNING
    assert shared.proxies == private.proxies and len(shared.proxies) == 1
    assert shared.peers == private.peers and shared.interface == private.interface


def test_load_config_errors_name_the_path(tmp_path: os.PathLike[str]) -> None:
    missing = os.path.join(tmp_path, "nope.conf")
    with pytest.raises(ConfigError) as info:
        load_config(missing)
    assert str(info.value) == f"{missing}: no such file"
    with pytest.raises(ConfigError) as info:
        load_config(str(tmp_path))
    assert str(info.value) == f"{tmp_path}: is a directory, not a config file"
    path = os.path.join(tmp_path, "latin1.conf")
    with open(path, "wb") as f:
        f.write(cfg(*IFACE).encode() + b"# caf\xe9\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}:4: is not UTF-8 text"
    bad = _write(tmp_path, cfg(*IFACE, "MTU = 1"), 0o600)
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    assert str(info.value) == f"{bad}:4: MTU: 1 is out of range (576-9000)"


def test_load_config_fifo_is_an_error_not_a_hang(tmp_path: os.PathLike[str]) -> None:
    """A named FIFO with no writer (issue 11): one clear error within about a second."""
    fifo = os.path.join(tmp_path, "wg0.conf")
    os.mkfifo(fifo, 0o600)
    t0 = time.monotonic()
    with pytest.raises(ConfigError) as info:
        load_config(fifo)
    assert time.monotonic() - t0 < 1.5
    assert str(info.value).startswith(f"{fifo}: ") and "FIFO" in str(info.value)


def test_load_config_from_a_pipe_that_delivers(tmp_path: os.PathLike[str]) -> None:
    """Process substitution (`--config <(...)`) still works: a pipe with a writer."""
    r, w = os.pipe()
    text = cfg(*IFACE, *peer("AllowedIPs = 10.0.0.0/8"))

    def writer() -> None:
        time.sleep(0.2)
        os.write(w, text.encode())
        os.close(w)

    t = threading.Thread(target=writer)
    t.start()
    try:
        c = load_config(f"/proc/self/fd/{r}")
    finally:
        t.join()
        os.close(r)
    assert len(c.peers) == 1


# ---------------------------------------------------------------------------- CLI values


def test_parse_route_flag() -> None:
    assert parse_route_flag("10.9.0.0/16:10.150.0.9") == (
        ip_network("10.9.0.0/16"),
        IPv4Address("10.150.0.9"),
    )
    assert parse_route_flag("fd00::/8:fd15::1") == (ip_network("fd00::/8"), ip_address("fd15::1"))
    assert parse_route_flag("fd00::/8:[fd15::1]") == (ip_network("fd00::/8"), ip_address("fd15::1"))
    assert parse_route_flag("192.0.2.7:10.150.0.9") == (
        ip_network("192.0.2.7/32"),
        ip_address("10.150.0.9"),
    )
    assert parse_route_flag("0.0.0.0/0:fd15::1") == (ip_network("0.0.0.0/0"), ip_address("fd15::1"))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "10.9.0.0/16",
            "--route 10.9.0.0/16: expected CIDR:PEER_IP, e.g. 10.9.0.0/16:10.150.0.9 "
            "or fd00::/8:fd15::1",
        ),
        (
            "10.9.0.0/16:",
            "--route 10.9.0.0/16:: expected CIDR:PEER_IP, e.g. 10.9.0.0/16:10.150.0.9 "
            "or fd00::/8:fd15::1",
        ),
        ("10.9.0.0/16:peer", "--route 10.9.0.0/16:peer: 'peer' is not an IPv4 or IPv6 address"),
        (
            "fd00::1:fd15::1",
            "--route fd00::1:fd15::1: 'fd00::1:fd15::1': an IPv6 network needs a /prefix length "
            "(e.g. fd00::1/128), since ':' also separates the fields",
        ),
        (
            "10.9.0.1/16:10.150.0.9",
            "--route 10.9.0.1/16:10.150.0.9: 10.9.0.1/16 has host bits set; "
            "did you mean 10.9.0.0/16?",
        ),
        (
            "10.9.0.0/99:10.150.0.9",
            "--route 10.9.0.0/99:10.150.0.9: '10.9.0.0/99' is not an IPv4 or IPv6 address "
            "with an optional /prefix length",
        ),
    ],
)
def test_parse_route_flag_errors(text: str, message: str) -> None:
    with pytest.raises(UsageError) as info:
        parse_route_flag(text)
    assert str(info.value) == message
    assert info.value.exit_code == 2


def test_parse_ip() -> None:
    assert parse_ip("10.150.0.9") == IPv4Address("10.150.0.9")
    assert parse_ip("fd15::9") == IPv6Address("fd15::9")
    assert parse_ip("[fd15::9]") == IPv6Address("fd15::9")
    with pytest.raises(UsageError) as info:
        parse_ip("peer1")
    assert str(info.value) == "--exit-node peer1: not an IPv4 or IPv6 address"


# ------------------------------------------------------------------------------- properties

_KEYS = [
    "PrivateKey",
    "Address",
    "DNS",
    "MTU",
    "ListenPort",
    "PublicKey",
    "PresharedKey",
    "Endpoint",
    "AllowedIPs",
    "PersistentKeepalive",
    "Route",
    "PostUp",
]
_TOKENS = [
    "[Interface]",
    "[Peer]",
    "[peer",
    "=",
    ",",
    ":",
    "/",
    "#",
    ";",
    " ",
    "\n",
    "\r",
    "[",
    "]",
    "-",
    "%",
    "any",
    "tcp",
    "off",
    "10.0.0.1",
    "fd00::",
    "/64",
    "/33",
    ":51820",
    "99999",
    PRIV_B64,
    PUB1.to_base64(),
    PRIV.public_key().to_base64(),
    *_KEYS,
]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.one_of(
        st.text(max_size=300),
        st.lists(st.sampled_from(_TOKENS) | st.text(max_size=6), max_size=60).map("".join),
    )
)
def test_garbage_raises_only_config_error(text: str) -> None:
    try:
        config = parse_config(text, "fuzz.conf")
    except ConfigError as exc:
        assert str(exc).startswith("fuzz.conf")
    else:
        assert isinstance(config, Config)


def _key(draw: st.DrawFn) -> bytes:
    return draw(st.binary(min_size=32, max_size=32))


_case = st.sampled_from([str.lower, str.upper, lambda s: s])
_v4 = st.integers(0, 2**32 - 1).map(IPv4Address)
_v6 = st.integers(0, 2**128 - 1).map(IPv6Address)


@st.composite
def _networks(draw: st.DrawFn, v6: bool | None = None) -> object:
    use_v6 = draw(st.booleans()) if v6 is None else v6
    ip = draw(_v6 if use_v6 else _v4)
    return ip_interface(f"{ip}/{draw(st.integers(0, 128 if use_v6 else 32))}").network


_hostname = st.lists(
    st.text(string.ascii_lowercase + string.digits, min_size=1, max_size=10), min_size=1, max_size=3
).map(lambda labels: ".".join([*labels, "example"]))


@st.composite
def _valid_config(draw: st.DrawFn) -> tuple[str, dict[str, object]]:
    """A random valid config as text, plus the fields parsing it must produce."""
    lines: list[str] = []

    def emit(key: str, value: str) -> int:
        comment = draw(st.sampled_from(["", " # note", "  #x"]))
        lines.append(
            f"{draw(_case)(key)}{draw(st.sampled_from(['=', ' = ', ' =']))}{value}{comment}"
        )
        line = len(lines)
        if draw(st.booleans()):
            lines.append(draw(st.sampled_from(["", "# c", "; c", "   "])))
        return line

    lines.append(draw(_case)("[Interface]"))
    priv = PrivateKey(_key(draw))
    emit("PrivateKey", priv.to_base64())
    addresses = draw(st.lists(st.one_of(_v4, _v6), min_size=1, max_size=4))
    ifaces = []
    for chunk in (addresses[:2], addresses[2:]):
        if chunk:
            lens = [draw(st.none() | st.integers(0, a.max_prefixlen)) for a in chunk]
            texts = [str(a) if n is None else f"{a}/{n}" for a, n in zip(chunk, lens, strict=True)]
            ifaces += [ip_interface(t) for t in texts]
            emit("Address", ", ".join(texts))
    servers = draw(st.lists(st.one_of(_v4, _v6), max_size=2))
    search = draw(st.lists(_hostname, max_size=2))
    if servers or search:
        emit("DNS", ",".join([*map(str, servers), *search]))
    has_v6 = any(a.version == 6 for a in addresses)
    mtu = draw(st.none() | st.integers(1280 if has_v6 else 576, 9000))
    if mtu is not None:
        emit("MTU", str(mtu))
    port = draw(st.none() | st.integers(1, 65535))
    if port is not None:
        emit("ListenPort", str(port))
    own = priv.public_key()
    peers = []
    seen = {own.raw}
    for _ in range(draw(st.integers(0, 3))):
        pub = PrivateKey(_key(draw)).public_key()
        if pub.raw in seen:
            continue  # astronomically unlikely; keep the config valid
        seen.add(pub.raw)
        lines.append(draw(_case)("[Peer]"))
        peer_line = len(lines)
        emit("PublicKey", pub.to_base64())
        psk = draw(st.none() | st.binary(min_size=32, max_size=32))
        if psk is not None:
            emit("PresharedKey", base64.b64encode(psk).decode())
        ep_ip = draw(st.none() | _v4 | _v6 | _hostname)
        endpoint = None
        if ep_ip is not None:
            ep_port = draw(st.integers(1, 65535))
            endpoint = Endpoint(str(ep_ip), ep_port)
            emit("Endpoint", str(endpoint))
        allowed = []
        for _ in range(draw(st.integers(0, 3))):
            nets = draw(st.lists(_networks(), min_size=1, max_size=3))
            allowed += nets
            emit("AllowedIPs", ", ".join(map(str, nets)))
        keepalive = draw(st.none() | st.integers(0, 65535))
        if keepalive is not None:
            emit("PersistentKeepalive", str(keepalive))
        routes = []
        for _ in range(draw(st.integers(0, 3))):
            net = draw(_networks())
            proto = draw(st.none() | st.sampled_from(Protocol))
            text, low, high = str(net), None, None
            if proto is not None:
                text += ":" + draw(_case)(proto.value)
                ports = draw(st.none() | st.tuples(st.integers(1, 65535), st.integers(0, 100)))
                if ports is not None:
                    low, high = ports[0], min(65535, ports[0] + ports[1])
                    text += f":{low}" if low == high else f":{low}-{high}"
            line = emit("Route", text)
            routes.append(
                RouteSpec(net, proto or Protocol.ANY, low, high, line, f"config line {line}")
            )
        peers.append((pub, psk, endpoint, allowed, keepalive or None, routes, peer_line))
    want = {
        "priv": priv,
        "addresses": tuple(ifaces),
        "servers": tuple(servers),
        "search": tuple(search),
        "mtu": mtu or 1420,
        "port": port,
        "peers": peers,
    }
    return "\n".join(lines), want


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_valid_config())
def test_valid_configs_round_trip(case: tuple[str, dict[str, object]]) -> None:
    text, want = case
    c = parse_config(text)
    i = c.interface
    assert i.private_key == want["priv"]
    assert i.addresses == want["addresses"]
    assert i.dns_servers == want["servers"]
    assert i.dns_search == want["search"]
    assert i.mtu == want["mtu"]
    assert i.listen_port == want["port"]
    peers = want["peers"]
    assert isinstance(peers, list)
    assert len(c.peers) == len(peers)
    for got, (pub, psk, endpoint, allowed, keepalive, routes, line) in zip(
        c.peers, peers, strict=True
    ):
        assert got.public_key == pub
        assert got.preshared_key == (None if psk is None else PresharedKey(psk))
        assert got.endpoint == endpoint
        assert got.allowed_ips == tuple(allowed)
        assert got.persistent_keepalive == keepalive
        assert got.routes == tuple(routes)
        assert got.line == line
    assert all(n.level is NoticeLevel.DEBUG for n in c.notices)  # only overlap notices


def test_a_pasted_key_without_equals_is_not_echoed(tmp_path: Path) -> None:
    secret = PrivateKey.generate().to_base64()
    path = tmp_path / "wg0.conf"
    path.write_text(f"[Interface]\nPrivateKey {secret}\nAddress = 10.150.0.2\n")
    path.chmod(0o600)
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert secret not in str(info.value)
    assert secret[:20] not in str(info.value)
    assert ":2:" in str(info.value)


def test_an_endless_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="larger than"):
        load_config("/dev/zero")
