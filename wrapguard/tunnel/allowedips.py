"""Cryptokey routing table: AllowedIPs longest-prefix match for IPv4 and IPv6 [W 2, 3].

One dict per prefix length, keyed by the address integer shifted right to that length; a lookup
walks the lengths in use from longest to shortest, so a table with few distinct lengths costs a
few dict probes per packet. When two peers list the same prefix, the first one inserted (file
order) keeps it.
"""

from __future__ import annotations

import ipaddress
from typing import Generic, TypeVar

T = TypeVar("T")
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class _Family(Generic[T]):
    __slots__ = ("bits", "lens", "tables")

    def __init__(self, bits: int) -> None:
        self.bits = bits
        self.tables: dict[int, dict[int, T]] = {}
        self.lens: tuple[int, ...] = ()

    def insert(self, prefix: int, length: int, value: T) -> bool:
        table = self.tables.setdefault(length, {})
        key = prefix >> (self.bits - length)
        if key in table:
            return False
        table[key] = value
        self.lens = tuple(sorted(self.tables, reverse=True))
        return True

    def lookup(self, addr: int) -> T | None:
        bits = self.bits
        tables = self.tables
        for length in self.lens:
            v = tables[length].get(addr >> (bits - length))
            if v is not None:
                return v
        return None


class AllowedIPs(Generic[T]):
    """Maps networks to values; `lookup(packed_address)` returns the longest match or None."""

    __slots__ = ("_v4", "_v6")

    def __init__(self) -> None:
        self._v4: _Family[T] = _Family(32)
        self._v6: _Family[T] = _Family(128)

    def insert(self, network: Network | str, value: T) -> bool:
        """Add a route; False when the exact prefix already belongs to another value."""
        net = ipaddress.ip_network(network, strict=False)
        fam = self._v4 if net.version == 4 else self._v6
        return fam.insert(int(net.network_address), net.prefixlen, value)

    def lookup(self, addr: bytes) -> T | None:
        """Longest-prefix match of a 4- or 16-byte packed address."""
        if len(addr) == 4:
            return self._v4.lookup(int.from_bytes(addr, "big"))
        if len(addr) == 16:
            return self._v6.lookup(int.from_bytes(addr, "big"))
        return None

    def entries(self) -> list[tuple[Network, T]]:
        out: list[tuple[Network, T]] = []
        for fam, cls in ((self._v4, ipaddress.IPv4Network), (self._v6, ipaddress.IPv6Network)):
            for length, table in fam.tables.items():
                for key, value in table.items():
                    out.append((cls((key << (fam.bits - length), length)), value))
        return out
