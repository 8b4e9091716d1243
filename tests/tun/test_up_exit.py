"""`wrapguard up --exit-node`: everything through the second peer, both endpoints bypassed.

The second peer's endpoint is made one the tunnel's own routes would swallow: it answers on
100.64.N.2 (an extra address on its veth), the client reaches 100.64.0.0/16 through a host
route via 198.19.N.2, and `--route 100.64.N.0/24` sends that /24 into the tunnel. Only the
automatic endpoint bypass keeps the handshake off the tunnel.
"""

from __future__ import annotations

import signal
from pathlib import Path

from rig.harness import KiB, Rig
from tun.tunhelp import Up, ours, route_get, snapshot

RIG_OPTIONS = {"second_peer": True, "file_sizes": {"1KiB.bin": KiB}}
TUN = "wgexit0"
BEHIND_V4, BEHIND_V6 = "203.0.113.7", "fd99::7"  # only on the second peer's loopback


def test_exit_node_carries_a_host_behind_the_second_peer(module_rig: Rig, tmp_path: Path) -> None:
    rig = module_rig
    p2 = rig.peer2
    assert p2 is not None
    n = rig.n
    hidden_ep = f"100.64.{n}.2"
    p2.ns.run(["ip", "addr", "add", f"{hidden_ep}/32", "dev", f"wgr{rig.id}d"])
    p2.ns.run(["ip", "addr", "add", f"{BEHIND_V4}/32", "dev", "lo"])
    p2.ns.run(["ip", "addr", "add", f"{BEHIND_V6}/128", "dev", "lo", "nodad"])
    rig.client.run(["ip", "route", "add", "100.64.0.0/16", "via", p2.veth_v4])
    conf = rig.write_client_config(tmp_path / "exit.conf")
    text = conf.read_text().replace(f"Endpoint = {p2.veth_v4}:", f"Endpoint = {hidden_ep}:")
    conf.write_text(text)
    before = snapshot(rig.client)
    flags = ["--exit-node", p2.tunnel_v4, "--route", f"100.64.{n}.0/24:{p2.tunnel_v4}"]
    # The exit node's /0 beats AllowedIPs (compat.md "Routing"): peer 1 keeps its range only
    # by a policy route of its own.
    flags += ["--route", f"10.150.0.0/24:{rig.peer_tunnel_v4}"]
    up = Up(rig.client, conf, tmp_path, flags, tun=TUN).wait_up()
    try:
        # The /1 halves take what the host had no better route for.
        assert f"dev {TUN}" in route_get(rig.client, "192.0.2.1")
        assert f"dev {TUN}" in route_get(rig.client, "2001:db8::1")
        assert f"dev {TUN}" in route_get(rig.client, f"100.64.{n}.9")
        line = route_get(rig.client, hidden_ep)
        assert f"via {p2.veth_v4}" in line and TUN not in line, line
        auto = {e["cidr"] for e in up.api("GET", "/bypass") if e["automatic"]}
        assert auto == {f"{rig.peer.veth_v4}/32", f"{hidden_ep}/32"}
        _, digest = rig.files["1KiB.bin"]
        for host in (BEHIND_V4, f"[{BEHIND_V6}]"):
            r = rig.client.run(
                ["sh", "-c", f"curl -sS --max-time 30 http://{host}:8080/1KiB.bin | sha256sum"],
                timeout=60,
            )
            assert r.stdout.split()[0] == digest, r.stderr + up.output()
        r = rig.client.run(["busybox", "ping", "-c", "1", "-W", "5", rig.peer_tunnel_v4])
        assert r.returncode == 0
        assert p2.wg.peer_status(rig.our_public_key).rx_bytes > 0
        assert rig.peer_status().rx_bytes > 0
        state = up.api("GET", "/state")
        assert state["peers"][1]["endpoint"] == f"{hidden_ep}:{p2.port}"
    finally:
        code = up.stop(signal.SIGINT)
        rig.client.run(["ip", "route", "del", "100.64.0.0/16"], check=False)
    assert code == 0, up.output()
    assert ours(rig.client, TUN) == []
    after = snapshot(rig.client)
    assert after == {**before, "routes4": after["routes4"]}
    assert "100.64.0.0/16" not in after["routes4"]
