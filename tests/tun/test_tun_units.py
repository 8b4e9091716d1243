"""The TUN add-on's pure parts (no root): which routes, names, the ledger, the bypass as routes."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Any

import pytest

from wrapguard.config import load_config
from wrapguard.errors import UsageError
from wrapguard.keys import PrivateKey
from wrapguard.routing import RoutingTable
from wrapguard.tun.engine import TunBypass
from wrapguard.tun.netconf import Ledger, Via, split_default
from wrapguard.tun.tundev import valid_ifname
from wrapguard.tun.up import tunnel_routes

N = ipaddress.ip_network


def _config(tmp_path: Path, allowed: str = "10.150.0.0/24, fd15::/64") -> Path:
    p = tmp_path / "wg0.conf"
    p.write_text(
        f"[Interface]\nPrivateKey = {PrivateKey.generate().to_base64()}\n"
        "Address = 10.150.0.2/32\n\n"
        f"[Peer]\nPublicKey = {PrivateKey.generate().public_key().to_base64()}\n"
        f"Endpoint = 192.0.2.1:51820\nAllowedIPs = {allowed}\n\n"
        f"[Peer]\nPublicKey = {PrivateKey.generate().public_key().to_base64()}\n"
        "Endpoint = 192.0.2.2:51820\nAllowedIPs = 10.150.1.0/24\nRoute = 172.16.0.0/12\n"
    )
    return p


def test_default_routes_become_two_halves() -> None:
    assert split_default(N("0.0.0.0/0")) == [N("0.0.0.0/1"), N("128.0.0.0/1")]
    assert split_default(N("::/0")) == [N("::/1"), N("8000::/1")]
    assert split_default(N("10.0.0.0/8")) == [N("10.0.0.0/8")]


def test_tunnel_routes_cover_allowed_ips_and_policy_routes(tmp_path: Path) -> None:
    config = load_config(str(_config(tmp_path)))
    routing = RoutingTable.build(
        config, [(N("198.51.100.0/24"), ipaddress.ip_address("10.150.1.1"))], None
    )
    assert tunnel_routes(config, routing) == tuple(
        N(x)
        for x in ("10.150.0.0/24", "fd15::/64", "10.150.1.0/24", "198.51.100.0/24", "172.16.0.0/12")
    )
    exit_node = RoutingTable.build(config, [], ipaddress.ip_address("10.150.1.1"))
    got = tunnel_routes(config, exit_node)
    assert {N("0.0.0.0/1"), N("128.0.0.0/1"), N("::/1"), N("8000::/1")} <= set(got)
    assert not [n for n in got if n.prefixlen == 0]


def test_allowed_ips_default_is_split_and_deduplicated(tmp_path: Path) -> None:
    config = load_config(str(_config(tmp_path, allowed="0.0.0.0/0, 0.0.0.0/1")))
    got = tunnel_routes(config, RoutingTable.build(config))
    assert got[:2] == (N("0.0.0.0/1"), N("128.0.0.0/1"))
    assert len(got) == len(set(got))


@pytest.mark.parametrize(
    ("name", "ok"),
    [("wg0", True), ("a" * 15, True), ("a" * 16, False), ("", False), ("a/b", False),
     ("a b", False), ("a:1", False), ("..", False)],
)  # fmt: skip
def test_interface_names(name: str, ok: bool) -> None:
    assert valid_ifname(name) is ok


def test_ledger_knows_a_live_run_from_a_dead_one(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setenv("WRAPGUARD_STATE_DIR", str(tmp_path / "st"))
    led = Ledger.for_link("wgx")
    assert led.alive()
    led.save()
    assert (tmp_path / "st").stat().st_mode & 0o777 == 0o700
    assert led.path.stat().st_mode & 0o777 == 0o600
    led.data["start"] = "1"  # the same pid, another process (pid reuse)
    assert not led.alive()
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    led.data.update(pid=pid, start="1")
    assert not led.alive()


class FakeNet:
    """HostNet's route calls, recorded; `refuse` makes add_route fail for those networks."""

    def __init__(self) -> None:
        self.routes: list[tuple[str, Via]] = []
        self.refuse: set[str] = set()

    def underlying(self, ip: Any) -> Via | None:
        return None if ip.is_loopback else Via(oif=2, gateway="198.18.0.1")

    def add_route(self, net: Any, via: Via) -> dict[str, Any]:
        if str(net) in self.refuse:
            raise RuntimeError(f"kernel says no to {net}")
        self.routes.append((str(net), via))
        return {"dst": str(net)}

    def remove_route(self, rec: dict[str, Any]) -> None:
        self.routes = [r for r in self.routes if r[0] != rec["dst"]]

    def ifname_of(self, index: int | None) -> str:
        return f"eth{index}"


def test_bypass_entries_are_routes_add_clear_automatic() -> None:
    net = FakeNet()
    bp = TunBypass(net)  # type: ignore[arg-type]
    bp.set_automatic(N("192.0.2.1/32"), "peer endpoint")
    bp.sync()
    bp.add(["203.0.113.0/24", "192.0.2.1", "127.0.0.1"])
    assert sorted(r[0] for r in net.routes) == ["192.0.2.1/32", "203.0.113.0/24"]
    shown = {e["cidr"]: e for e in bp.entries()}
    assert shown["203.0.113.0/24"]["route"] == "via 198.18.0.1 dev eth2"
    assert shown["127.0.0.1/32"]["route"] == "none (local)"
    bp.clear()
    assert [r[0] for r in net.routes] == ["192.0.2.1/32"]  # the automatic one stays
    bp.drop_automatic(N("192.0.2.1/32"))
    bp.sync()
    assert net.routes == []


def test_a_refused_route_adds_none_of_the_entries() -> None:
    net = FakeNet()
    net.refuse.add("198.51.100.0/24")
    bp = TunBypass(net)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="kernel says no"):
        bp.add(["203.0.113.0/24", "198.51.100.0/24"])
    assert net.routes == []
    assert bp.entries() == []


def _cli(*args: str) -> Any:
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "wrapguard", *args], capture_output=True, text=True, timeout=60
    )


def test_cli_lists_up_and_refuses_usage_errors_in_one_line() -> None:
    assert "wrapguard up --config" in _cli("--help").stdout
    r = _cli("up")
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "--config" in r.stderr, r.stderr
    r = _cli("up", "--config", "x.conf", "--exit-node", "nope")
    assert r.returncode == 2 and "--exit-node" in r.stderr, r.stderr
    r = _cli("up", "--help")
    assert r.returncode == 0 and "--tun NAME" in r.stdout
