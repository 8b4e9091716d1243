"""`wrapguard up` with `Endpoint = NAME:PORT`: when the name moves to a new address (and the
peer's packets no longer find us, as behind a filtering NAT), the re-resolution moves the
endpoint and its automatic bypass route with it (the roaming case is in test_up.py)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
from rig.harness import Rig
from tun.tunhelp import Up, ours

NAME = "peer.wg.test"
TUN = "wgres0"


def _hosts(rig: Rig) -> str:
    return f"127.0.0.1 localhost\n{rig.peer.veth_v4} {NAME}\n"


@pytest.mark.timeout(180)
def test_endpoint_bypass_follows_the_name_to_its_new_address(
    make_rig: Callable[..., Rig], tmp_path: Path
) -> None:
    rig = make_rig(file_sizes=())
    rig.client.hosts(_hosts(rig))  # before `up` starts: ip netns exec binds it then
    conf = rig.write_client_config(tmp_path / "c.conf", endpoint=f"{NAME}:{rig.peer.port}")
    up = Up(rig.client, conf, tmp_path, tun=TUN).wait_up()
    pinger = None
    try:
        old = rig.peer.veth_v4
        auto = [e["cidr"] for e in up.api("GET", "/bypass") if e["automatic"]]
        assert auto == [f"{old}/32"]
        r = rig.client.run(["busybox", "ping", "-c", "1", "-W", "5", rig.peer_tunnel_v4])
        assert r.returncode == 0
        rig.set_peer_endpoint_for_us(f"{rig.client_veth_v4}:9")  # no roaming to mend it
        new = f"198.18.{rig.n}.3"
        rig.move_peer(new)
        rig.client.hosts(_hosts(rig))
        # Traffic that waits on the silent peer: its handshakes go unanswered, the name is
        # looked up again.
        pinger = rig.client.popen(["busybox", "ping", "-i", "0.5", "-W", "1", rig.peer_tunnel_v4])
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            auto = [e["cidr"] for e in up.api("GET", "/bypass") if e["automatic"]]
            if auto == [f"{new}/32"]:
                break
            time.sleep(0.5)
        assert auto == [f"{new}/32"], up.output()
        routes = rig.client.run(["ip", "route", "show", "proto", "87"]).stdout
        assert f"{new} dev" in routes and f"{old} dev" not in routes, routes
        assert "peer endpoint moved" in up.output()
    finally:
        if pinger is not None:
            pinger.terminate()
            pinger.wait(10)
        assert up.stop() == 0, up.output()
    assert ours(rig.client, TUN) == []
