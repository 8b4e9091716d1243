"""The bypass list: destinations that never enter the tunnel, for every door.

Entries are IPs or CIDRs, added and cleared at run time through the control socket
(`POST /bypass`, `DELETE /bypass`, compat.md "Control socket"); automatic entries (the TUN
add-on's peer endpoints) are marked and survive a clear. A lookup is a longest-prefix-free
membership test: a destination inside any entry is bypassed, from the next connection on.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Any

from wrapguard.errors import UsageError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
MAX_ENTRIES = 4096


def parse_entry(text: object) -> IPNetwork:
    """An IP or CIDR (host bits allowed, as `ip route` does); UsageError naming it."""
    if not isinstance(text, str) or not text.strip():
        raise UsageError(f"bypass entry {text!r}: expected an IP address or CIDR string")
    try:
        net = ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise UsageError(f"bypass entry {text!r}: not an IP address or CIDR") from None
    if isinstance(net, ipaddress.IPv6Network) and net.network_address.ipv4_mapped is not None:
        mapped = net.network_address.ipv4_mapped
        net = ipaddress.ip_network(f"{mapped}/{max(net.prefixlen - 96, 0)}", strict=False)
    return net


class BypassList:
    """User entries (added/cleared live) and automatic ones (marked, kept on clear)."""

    def __init__(self) -> None:
        self._user: list[IPNetwork] = []
        self._auto: dict[IPNetwork, str] = {}  # network -> why ("peer endpoint", ...)

    def add(self, entries: Iterable[object]) -> list[IPNetwork]:
        """Add user entries (all or none: a bad one raises UsageError); returns the new ones."""
        nets = [parse_entry(e) for e in entries]
        added = [n for n in dict.fromkeys(nets) if n not in self._user]
        if len(self._user) + len(added) > MAX_ENTRIES:
            raise UsageError(f"bypass list: at most {MAX_ENTRIES} entries")
        self._user.extend(added)
        return added

    def clear(self) -> int:
        """Remove every user entry; returns how many there were."""
        n = len(self._user)
        self._user.clear()
        return n

    def set_automatic(self, net: IPNetwork, why: str) -> None:
        self._auto[net] = why

    def drop_automatic(self, net: IPNetwork) -> None:
        self._auto.pop(net, None)

    def contains(self, ip: IPAddress) -> bool:
        if not self._user and not self._auto:
            return False
        return any(ip in n for n in self._user) or any(ip in n for n in self._auto)

    def entries(self) -> list[dict[str, Any]]:
        """As GET /bypass shows them."""
        out: list[dict[str, Any]] = [
            {"cidr": str(n), "automatic": True, "reason": why} for n, why in self._auto.items()
        ]
        out += [{"cidr": str(n), "automatic": False} for n in self._user]
        return out


__all__ = ["BypassList", "parse_entry"]
