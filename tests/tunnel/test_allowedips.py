"""AllowedIPs longest-prefix match [W 3] against a brute-force reference."""

from __future__ import annotations

import ipaddress

from hypothesis import given, settings
from hypothesis import strategies as st

from wrapguard.tunnel.allowedips import AllowedIPs


def nets(version: int) -> st.SearchStrategy[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    bits = 32 if version == 4 else 128
    return st.tuples(st.integers(0, 2**bits - 1), st.integers(0, bits)).map(
        lambda t: (
            ipaddress.ip_network((t[0], t[1]), strict=False)
            if version == 4
            else ipaddress.IPv6Network((t[0] >> (bits - t[1]) << (bits - t[1]), t[1]))
        )
    )


def brute(entries, addr):  # type: ignore[no-untyped-def]
    ip = ipaddress.ip_address(addr)
    best = None
    for net, value in entries:
        if ip in net and (best is None or net.prefixlen > best[0].prefixlen):
            best = (net, value)
    return None if best is None else best[1]


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.one_of(nets(4), nets(6)), max_size=20),
    st.lists(st.one_of(st.binary(min_size=4, max_size=4), st.binary(min_size=16, max_size=16))),
)
def test_matches_brute_force(networks, addrs) -> None:  # type: ignore[no-untyped-def]
    table: AllowedIPs[int] = AllowedIPs()
    kept = []
    for i, net in enumerate(networks):
        if table.insert(net, i):
            kept.append((net, i))
        else:
            assert any(n == net for n, _ in kept)  # only exact duplicates are refused
    for net, _i in kept:
        probe = net.network_address.packed
        assert table.lookup(probe) == brute(kept, probe)
        assert table.lookup(net.broadcast_address.packed) == brute(
            kept, net.broadcast_address.packed
        )
    for a in addrs:
        assert table.lookup(a) == brute(kept, a)
    assert sorted(table.entries(), key=lambda e: e[1]) == kept


def test_first_inserted_keeps_an_exact_duplicate() -> None:
    t: AllowedIPs[str] = AllowedIPs()
    assert t.insert("10.0.0.0/8", "a")
    assert not t.insert("10.1.2.3/8", "b")  # host bits are masked: same prefix
    assert t.lookup(bytes([10, 2, 3, 4])) == "a"
    assert t.lookup(b"\x00") is None
    assert t.lookup(bytes(16)) is None
