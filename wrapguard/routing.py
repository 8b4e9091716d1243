"""Which peer (if any) carries traffic to a destination: the policy of compat.md "Routing".

1. Policy routes (config `Route =` lines, each belonging to its own [Peer]; `--route`;
   `--exit-node` = 0.0.0.0/0 and ::/0 via that peer): longest prefix, then protocol
   specificity (tcp/udp beats any), then port specificity (one port beats a range beats any;
   a narrower range beats a wider one), then rank: command-line flags before config lines
   (the command line overrides the file), flags in command-line order, lines in file order.
2. Otherwise AllowedIPs, longest prefix, then file order. 3. Otherwise None: not tunnelled.
Loopback is never tunnelled; v4-mapped IPv6 is looked up as IPv4. Pure and sans-IO; this is
the connect-time decision, not the per-packet path (the tunnel has its own trie).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from wrapguard.config import Config, IPAddress, IPNetwork, Protocol, RouteSpec
from wrapguard.errors import UsageError

_PORT_ANY_WIDTH = 65536
_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class PolicyRoute:
    """A policy route resolved to a peer (an index into `config.peers`)."""

    spec: RouteSpec
    peer_index: int
    rank: int  # position in the tie-break order: lower wins

    def matches(self, protocol: Protocol, port: int | None) -> bool:
        if self.spec.protocol is not Protocol.ANY and self.spec.protocol is not protocol:
            return False
        if self.spec.port_low is None or self.spec.port_high is None:
            return True
        return port is not None and self.spec.port_low <= port <= self.spec.port_high

    def sort_key(self) -> tuple[int, int, int]:
        spec = self.spec
        proto = 1 if spec.protocol is Protocol.ANY else 0
        if spec.port_low is None or spec.port_high is None:
            width = _PORT_ANY_WIDTH
        else:
            width = spec.port_high - spec.port_low + 1
        return proto, width, self.rank


class _PrefixTable(Generic[_T]):
    """Exact-match buckets per prefix length, probed from the longest length down."""

    __slots__ = ("_levels",)

    def __init__(self, items: Iterable[tuple[IPNetwork, _T]]) -> None:
        buckets: dict[int, dict[int, list[_T]]] = {}
        for network, item in items:
            level = buckets.setdefault(network.prefixlen, {})
            level.setdefault(int(network.network_address), []).append(item)
        self._levels = sorted(buckets.items(), reverse=True)

    def candidates(self, address: int, bits: int) -> Iterable[list[_T]]:
        """Yield the bucket of every prefix containing `address`, longest prefix first."""
        full = (1 << bits) - 1
        for prefixlen, level in self._levels:
            mask = full ^ (full >> prefixlen)
            bucket = level.get(address & mask)
            if bucket is not None:
                yield bucket


LOOKUP_CACHE_MAX = 65536  # cached lookup() answers; the cache starts over when full


def _normalize(ip: IPAddress) -> IPAddress:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


class RoutingTable:
    """Immutable after `build`; `lookup` answers which peer carries a destination."""

    __slots__ = ("_allowed", "_cache", "_peer_count", "_policy", "_sources", "routes")

    def __init__(self, routes: Sequence[PolicyRoute], allowed: Sequence[Sequence[IPNetwork]]):
        self.routes = tuple(routes)
        self._peer_count = len(allowed)
        # lookup()'s answers (the table never changes): a connect asks once or twice per
        # connection, mostly for the same few destinations.
        self._cache: dict[tuple[IPAddress, Protocol, int | None], int | None] = {}
        # AllowedIPs: per family, per network the first peer in file order.
        self._allowed = {
            v: _PrefixTable(
                (net, i) for i, nets in enumerate(allowed) for net in nets if net.version == v
            )
            for v in (4, 6)
        }
        self._policy = {
            v: _PrefixTable(
                (r.spec.network, r)
                for r in sorted(self.routes, key=PolicyRoute.sort_key)
                if r.spec.network.version == v
            )
            for v in (4, 6)
        }
        sources: list[list[IPNetwork]] = [list(nets) for nets in allowed]
        for r in self.routes:
            if r.spec.network not in sources[r.peer_index]:
                sources[r.peer_index].append(r.spec.network)
        self._sources = tuple(tuple(s) for s in sources)

    @classmethod
    def build(
        cls,
        config: Config,
        cli_routes: Sequence[tuple[IPNetwork, IPAddress]] = (),
        exit_node: IPAddress | None = None,
    ) -> RoutingTable:
        """Resolve flags to peers (UsageError if no peer's AllowedIPs hold the peer IP)."""
        allowed = [peer.allowed_ips for peer in config.peers]
        owners = cls((), allowed)
        flags: list[tuple[RouteSpec, int]] = []

        for network, peer_ip in cli_routes:
            index = owners.peer_for_address(peer_ip)
            if index is None:
                raise UsageError(
                    f"--route {network}:{peer_ip}: no peer's AllowedIPs contain {peer_ip}"
                )
            flags.append((RouteSpec(network, source="--route"), index))
        if exit_node is not None:
            index = owners.peer_for_address(exit_node)
            if index is None:
                raise UsageError(
                    f"--exit-node {exit_node}: no peer's AllowedIPs contain {exit_node}"
                )
            for default in (ipaddress.IPv4Network("0.0.0.0/0"), ipaddress.IPv6Network("::/0")):
                flags.append((RouteSpec(default, source="--exit-node"), index))
        # Config routes rank in file order across all peers, after every flag.
        lines = sorted(
            ((spec, index) for index, peer in enumerate(config.peers) for spec in peer.routes),
            key=lambda pair: pair[0].line,
        )
        ranked = [
            PolicyRoute(spec, index, rank) for rank, (spec, index) in enumerate(flags + lines)
        ]
        return cls(ranked, allowed)

    def peer_for_address(self, ip: IPAddress) -> int | None:
        """The peer whose AllowedIPs hold `ip` (longest prefix, then file order), or None."""
        ip = _normalize(ip)
        for bucket in self._allowed[ip.version].candidates(int(ip), ip.max_prefixlen):
            return min(bucket)
        return None

    def lookup(
        self, dst: IPAddress, protocol: Protocol = Protocol.ANY, port: int | None = None
    ) -> int | None:
        """Index into `config.peers` of the peer that carries `dst`, or None (goes direct)."""
        key = (dst, protocol, port)
        try:
            return self._cache[key]
        except KeyError:
            pass
        peer = self._lookup(_normalize(dst), protocol, port)
        if len(self._cache) >= LOOKUP_CACHE_MAX:
            self._cache.clear()
        self._cache[key] = peer
        return peer

    def _lookup(self, dst: IPAddress, protocol: Protocol, port: int | None) -> int | None:
        if dst.is_loopback:
            return None
        table = self._policy[dst.version]
        for bucket in table.candidates(int(dst), dst.max_prefixlen):
            for route in bucket:  # already in specificity order
                if route.matches(protocol, port):
                    return route.peer_index
        return self.peer_for_address(dst)

    def allowed_sources(self, peer_index: int) -> tuple[IPNetwork, ...]:
        """Source networks accepted from a peer: its AllowedIPs plus its policy routes."""
        if not 0 <= peer_index < self._peer_count:
            raise IndexError(f"no peer with index {peer_index}")
        return self._sources[peer_index]
