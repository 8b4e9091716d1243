"""Tests for wrapguard.routing: each rule and tie-break, flags, loopback, v4-mapped."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network, ip_address, ip_interface, ip_network

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wrapguard.config import (
    Config,
    InterfaceConfig,
    IPAddress,
    IPNetwork,
    PeerConfig,
    Protocol,
    RouteSpec,
    parse_config,
)
from wrapguard.errors import UsageError
from wrapguard.keys import PrivateKey
from wrapguard.routing import RoutingTable

TCP, UDP, ANY = Protocol.TCP, Protocol.UDP, Protocol.ANY
PUBS = [PrivateKey(bytes([i + 1]) * 32).public_key().to_base64() for i in range(4)]


def make(*peers: tuple[str, ...]) -> Config:
    """A config whose peers get the given extra lines (line numbers follow the text)."""
    lines = [
        "[Interface]",
        f"PrivateKey = {PrivateKey(bytes(32)).to_base64()}",
        "Address = 10.150.0.2/24",
    ]
    for i, extra in enumerate(peers):
        lines += ["[Peer]", f"PublicKey = {PUBS[i]}", *extra]
    return parse_config("\n".join(lines))


def table(
    *peers: tuple[str, ...],
    routes: list[tuple[IPNetwork, IPAddress]] | None = None,
    exit_node: str | None = None,
) -> RoutingTable:
    return RoutingTable.build(
        make(*peers), routes or [], None if exit_node is None else ip_address(exit_node)
    )


def flag(cidr: str, peer: str) -> tuple[IPNetwork, IPAddress]:
    return ip_network(cidr), ip_address(peer)


def look(
    t: RoutingTable, dst: str, protocol: Protocol = ANY, port: int | None = None
) -> int | None:
    return t.lookup(ip_address(dst), protocol, port)


# --------------------------------------------------------------------- rule 2: AllowedIPs


def test_allowed_ips_longest_prefix() -> None:
    t = table(("AllowedIPs = 10.0.0.0/8, fd00::/8",), ("AllowedIPs = 10.150.0.0/24, fd00:1::/32",))
    assert look(t, "10.150.0.5") == 1
    assert look(t, "10.1.2.3") == 0
    assert look(t, "fd00:1::5") == 1
    assert look(t, "fd00:2::5") == 0
    assert look(t, "10.150.0.5", TCP, 80) == 1


def test_allowed_ips_same_prefix_file_order() -> None:
    t = table(("AllowedIPs = 10.150.0.0/24",), ("AllowedIPs = 10.150.0.0/24, 10.150.0.7/32",))
    assert look(t, "10.150.0.5") == 0
    assert look(t, "10.150.0.7") == 1
    assert t.peer_for_address(ip_address("10.150.0.5")) == 0


def test_rule_3_not_covered_goes_direct() -> None:
    t = table(("AllowedIPs = 10.150.0.0/24",))
    assert look(t, "192.0.2.1") is None
    assert look(t, "2001:db8::1") is None
    assert look(table(), "10.150.0.1") is None


def test_full_tunnel_allowed_ips() -> None:
    t = table(("AllowedIPs = 0.0.0.0/0, ::/0",))
    assert look(t, "192.0.2.1") == 0
    assert look(t, "2001:db8::1") == 0


# ------------------------------------------------------------------ rule 1: policy routes


def test_policy_route_beats_more_specific_allowed_ips() -> None:
    t = table(("AllowedIPs = 10.150.0.0/24",), ("AllowedIPs = 10.150.0.9/32", "Route = 10.0.0.0/8"))
    assert look(t, "10.150.0.5") == 1  # rule 1 before rule 2, whatever the prefix lengths
    assert look(t, "192.0.2.1") is None


def test_policy_longest_prefix() -> None:
    t = table(("Route = 10.9.0.0/16",), ("Route = 10.9.1.0/24",), ("Route = 10.9.1.128/25",))
    assert look(t, "10.9.0.1") == 0
    assert look(t, "10.9.1.1") == 1
    assert look(t, "10.9.1.200") == 2


def test_policy_longest_prefix_beats_specificity_and_order() -> None:
    t = table(("Route = 10.9.0.0/16:tcp:443",), ("Route = 10.9.1.0/24",))
    assert look(t, "10.9.1.1", TCP, 443) == 1


def test_protocol_specificity() -> None:
    t = table(("Route = 10.9.0.0/16",), ("Route = 10.9.0.0/16:tcp",), ("Route = 10.9.0.0/16:udp",))
    assert look(t, "10.9.0.1", TCP, 80) == 1
    assert look(t, "10.9.0.1", UDP, 53) == 2
    assert look(t, "10.9.0.1") == 0  # e.g. ICMP: only protocol-any routes apply


def test_port_specificity_single_beats_range_beats_any() -> None:
    t = table(
        ("Route = 10.9.0.0/16:tcp",),
        ("Route = 10.9.0.0/16:tcp:8000-9000",),
        ("Route = 10.9.0.0/16:tcp:8080",),
        ("Route = 10.9.0.0/16:tcp:8050-8100",),
    )
    assert look(t, "10.9.0.1", TCP, 8080) == 2
    assert look(t, "10.9.0.1", TCP, 8060) == 3  # narrower range
    assert look(t, "10.9.0.1", TCP, 8500) == 1
    assert look(t, "10.9.0.1", TCP, 22) == 0
    assert look(t, "10.9.0.1", TCP) == 0  # port unknown: only port-any routes apply


def test_protocol_specificity_ranks_before_port_specificity() -> None:
    t = table(("Route = 10.9.0.0/16:any:443",), ("Route = 10.9.0.0/16:tcp",))
    assert look(t, "10.9.0.1", TCP, 443) == 1
    assert look(t, "10.9.0.1", UDP, 443) == 0


def test_non_matching_policy_route_falls_through() -> None:
    t = table(
        ("AllowedIPs = 10.9.0.0/16",),
        ("AllowedIPs = 10.150.0.9/32", "Route = 10.9.0.0/24:tcp:443"),
        ("AllowedIPs = 10.150.0.10/32", "Route = 10.0.0.0/8:udp"),
    )
    assert look(t, "10.9.0.1", TCP, 443) == 1
    assert look(t, "10.9.0.1", UDP, 443) == 2  # shorter policy prefix that matches
    assert look(t, "10.9.0.1", TCP, 80) == 0  # no policy matches: AllowedIPs
    assert look(t, "10.150.0.9") == 1


def test_equal_routes_earlier_line_wins() -> None:
    t = table(("Route = 10.9.0.0/16:tcp",), ("Route = 10.9.0.0/16:tcp",))
    assert look(t, "10.9.0.1", TCP, 1) == 0
    t = table(("Route = 10.9.0.0/16:udp", "Route = 10.9.0.0/16:any"), ("Route = 10.9.0.0/16",))
    assert look(t, "10.9.0.1", TCP, 1) == 0


def test_v6_policy_routes() -> None:
    t = table(("AllowedIPs = fd15::1/128", "Route = fd00::/8:tcp:443"), ("Route = fd00:1::/32",))
    assert look(t, "fd00:1::5", TCP, 443) == 1
    assert look(t, "fd00:2::5", TCP, 443) == 0
    assert look(t, "fd00:2::5", UDP, 443) is None


# --------------------------------------------------------------------------- --route flags


def test_route_flag_resolves_peer_by_allowed_ips() -> None:
    peers = (("AllowedIPs = 10.150.0.0/24",), ("AllowedIPs = 10.150.0.9/32, fd15::9/128",))
    t = table(*peers, routes=[flag("192.0.2.0/24", "10.150.0.9"), flag("fd00::/8", "fd15::9")])
    assert look(t, "192.0.2.77") == 1
    assert look(t, "fd00::77") == 1
    t = table(*peers, routes=[flag("192.0.2.0/24", "10.150.0.8")])
    assert look(t, "192.0.2.77") == 0
    t = table(*peers, routes=[flag("192.0.2.0/24", "::ffff:10.150.0.9")])
    assert look(t, "192.0.2.77") == 1
    assert [r.spec.source for r in t.routes] == ["--route"]


def test_route_flag_unknown_peer_ip() -> None:
    with pytest.raises(UsageError) as info:
        table(("AllowedIPs = 10.150.0.0/24",), routes=[flag("10.9.0.0/16", "10.151.0.9")])
    assert (
        str(info.value) == "--route 10.9.0.0/16:10.151.0.9: no peer's AllowedIPs contain 10.151.0.9"
    )
    assert info.value.exit_code == 2
    with pytest.raises(
        UsageError, match=r"^--route fd00::/8:fd15::9: no peer's AllowedIPs contain"
    ):
        table(("AllowedIPs = 10.150.0.0/24",), routes=[flag("fd00::/8", "fd15::9")])


def test_flags_beat_config_routes_and_keep_their_order() -> None:
    peers = (
        ("AllowedIPs = 10.150.0.1/32", "Route = 10.9.0.0/16"),
        ("AllowedIPs = 10.150.0.2/32",),
        ("AllowedIPs = 10.150.0.3/32",),
    )
    t = table(*peers, routes=[flag("10.9.0.0/16", "10.150.0.2"), flag("10.9.0.0/16", "10.150.0.3")])
    assert look(t, "10.9.0.1") == 1
    # ...but a more specific config route still wins.
    t = table(
        ("AllowedIPs = 10.150.0.1/32", "Route = 10.9.0.0/16:tcp"),
        *peers[1:],
        routes=[flag("10.9.0.0/16", "10.150.0.2")],
    )
    assert look(t, "10.9.0.1", TCP, 80) == 0
    assert look(t, "10.9.0.1", UDP, 80) == 1


def test_exit_node() -> None:
    t = table(
        ("AllowedIPs = 10.150.0.1/32", "Route = 192.0.2.0/24"),
        ("AllowedIPs = 10.150.0.2/32",),
        exit_node="10.150.0.2",
    )
    assert look(t, "198.51.100.1") == 1
    assert look(t, "2001:db8::1", TCP, 443) == 1
    assert look(t, "192.0.2.9") == 0  # a longer policy prefix beats the exit node
    assert look(t, "10.150.0.1") == 1  # policy before AllowedIPs
    assert [(str(r.spec.network), r.spec.source) for r in t.routes[:2]] == [
        ("0.0.0.0/0", "--exit-node"),
        ("::/0", "--exit-node"),
    ]
    assert t.allowed_sources(1) == (
        ip_network("10.150.0.2/32"),
        ip_network("0.0.0.0/0"),
        ip_network("::/0"),
    )


def test_exit_node_unknown_peer_ip() -> None:
    with pytest.raises(UsageError) as info:
        table(("AllowedIPs = 10.150.0.0/24",), exit_node="10.151.0.1")
    assert str(info.value) == "--exit-node 10.151.0.1: no peer's AllowedIPs contain 10.151.0.1"
    with pytest.raises(UsageError):
        table(exit_node="10.150.0.1")


# --------------------------------------------------------------------- loopback, v4-mapped


def test_loopback_never_tunnelled() -> None:
    t = table(("AllowedIPs = 0.0.0.0/0, ::/0", "Route = 127.0.0.0/8"), exit_node="10.150.0.1")
    for dst in ("127.0.0.1", "127.1.2.3", "::1", "::ffff:127.0.0.1"):
        assert look(t, dst) is None
        assert look(t, dst, TCP, 80) is None
    assert look(t, "128.0.0.1") == 0


def test_v4_mapped_looked_up_as_ipv4() -> None:
    t = table(("AllowedIPs = 10.150.0.0/24",), ("AllowedIPs = ::/0", "Route = ::/0:tcp"))
    assert look(t, "::ffff:10.150.0.5") == 0
    assert look(t, "::ffff:10.150.0.5", TCP, 80) == 0
    assert look(t, "::ffff:192.0.2.1") is None
    assert look(t, "2001:db8::1") == 1


# ------------------------------------------------------------------------- allowed sources


def test_allowed_sources() -> None:
    t = table(
        ("AllowedIPs = 10.150.0.1/32, 10.9.0.0/16", "Route = 10.9.0.0/16:tcp", "Route = fd00::/8"),
        ("AllowedIPs = 10.150.0.2/32",),
        routes=[flag("192.0.2.0/24", "10.150.0.2"), flag("192.0.2.0/24", "10.150.0.2")],
    )
    assert t.allowed_sources(0) == tuple(
        map(ip_network, ["10.150.0.1/32", "10.9.0.0/16", "fd00::/8"])
    )
    assert t.allowed_sources(1) == tuple(map(ip_network, ["10.150.0.2/32", "192.0.2.0/24"]))
    with pytest.raises(IndexError):
        t.allowed_sources(2)


# ------------------------------------------------------------ property: brute-force oracle

_PREFIX_BASE = int(IPv4Address("10.9.0.0"))


@st.composite
def _spec(draw: st.DrawFn, line: int) -> RouteSpec:
    prefixlen = draw(st.integers(26, 32))
    address = IPv4Address(_PREFIX_BASE + draw(st.integers(0, 63)))
    network = IPv4Network(f"{address}/{prefixlen}", strict=False)
    protocol = draw(st.sampled_from(Protocol))
    low = high = None
    if draw(st.booleans()):
        low = draw(st.integers(1, 8))
        high = low + draw(st.integers(0, 4))
    return RouteSpec(network, protocol, low, high, line, f"config line {line}")


@st.composite
def _case(draw: st.DrawFn) -> tuple[Config, list[tuple[IPNetwork, IPAddress]]]:
    peers = []
    line = 10
    for i in range(draw(st.integers(1, 4))):
        allowed = [IPv4Network(f"10.150.0.{i}/32")]
        lens = draw(st.lists(st.integers(24, 32), max_size=2))
        allowed += [IPv4Network(f"10.9.0.{4 * i}/{n}", strict=False) for n in lens]
        routes = []
        for _ in range(draw(st.integers(0, 4))):
            line += 1
            routes.append(draw(_spec(line)))
        line += 5
        pub = PrivateKey(bytes([i + 1]) * 32).public_key()
        peers.append(PeerConfig(pub, allowed_ips=tuple(allowed), routes=tuple(routes), line=line))
    n = len(peers)
    flags = draw(
        st.lists(
            st.tuples(
                st.integers(26, 32).flatmap(
                    lambda p: st.integers(0, 63).map(
                        lambda a: IPv4Network(f"{IPv4Address(_PREFIX_BASE + a)}/{p}", strict=False)
                    )
                ),
                st.integers(0, n - 1).map(lambda i: ip_address(f"10.150.0.{i}")),
            ),
            max_size=3,
        )
    )
    iface = InterfaceConfig(PrivateKey(bytes(32)), (ip_interface("10.150.0.200"),))
    return Config(iface, tuple(peers)), flags


def _oracle(
    config: Config,
    flags: list[tuple[IPNetwork, IPAddress]],
    dst: IPv4Address,
    proto: Protocol,
    port: int | None,
) -> int | None:
    """The policy stated plainly: rank every candidate, take the best."""
    candidates = []
    rank = 0
    for network, peer_ip in flags:
        owner = min(
            (
                (-net.prefixlen, i)
                for i, p in enumerate(config.peers)
                for net in p.allowed_ips
                if peer_ip in net
            ),
        )[1]
        if dst in network:
            candidates.append(((-network.prefixlen, 1, 65536, rank), owner))
        rank += 1
    config_routes = sorted(
        ((r, i) for i, p in enumerate(config.peers) for r in p.routes), key=lambda x: x[0].line
    )
    for r, i in config_routes:
        rank += 1
        if dst not in r.network or (r.protocol is not Protocol.ANY and r.protocol is not proto):
            continue
        width = 65536
        if r.port_low is not None and r.port_high is not None:
            if port is None or not r.port_low <= port <= r.port_high:
                continue
            width = r.port_high - r.port_low + 1
        spec = 1 if r.protocol is Protocol.ANY else 0
        candidates.append(((-r.network.prefixlen, spec, width, rank), i))
    if candidates:
        return min(candidates)[1]
    owners = [
        (-net.prefixlen, i)
        for i, p in enumerate(config.peers)
        for net in p.allowed_ips
        if dst in net
    ]
    return min(owners)[1] if owners else None


@settings(max_examples=200, deadline=None)
@given(
    _case(),
    st.lists(
        st.tuples(
            st.integers(0, 70).map(lambda a: IPv4Address(_PREFIX_BASE + a)),
            st.sampled_from(Protocol),
            st.none() | st.integers(1, 14),
        ),
        min_size=1,
        max_size=10,
    ),
)
def test_lookup_matches_oracle(
    case: tuple[Config, list[tuple[IPNetwork, IPAddress]]],
    probes: list[tuple[IPv4Address, Protocol, int | None]],
) -> None:
    config, flags = case
    t = RoutingTable.build(config, flags)
    for dst, proto, port in probes + probes:  # the second round from lookup()'s cache
        assert t.lookup(dst, proto, port) == _oracle(config, flags, dst, proto, port)


def test_lookup_cache_is_bounded_and_keeps_answering(monkeypatch: pytest.MonkeyPatch) -> None:
    import wrapguard.routing as routing

    monkeypatch.setattr(routing, "LOOKUP_CACHE_MAX", 3)
    t = table(("AllowedIPs = 10.150.0.0/24",), ("AllowedIPs = 10.151.0.0/24",))
    for _ in range(2):
        for last in range(1, 9):
            assert look(t, f"10.150.0.{last}", TCP, 80) == 0
            assert look(t, f"10.151.0.{last}") == 1
            assert look(t, f"::ffff:10.151.0.{last}") == 1
            assert look(t, f"10.152.0.{last}") is None
            assert len(t._cache) <= 3
