"""`wrapguard up` (the TUN add-on) in the rig's client namespace, against wireguard-go.

Unwrapped kernel programs (curl, a UDP socket, ping) reach the peer through the TUN device;
the bypass list is routes, live; the peer endpoints are bypassed automatically and the entry
follows a roaming peer; nothing of ours survives SIGTERM, and a run after SIGKILL removes what
the killed one left; without CAP_NET_ADMIN or with a bad config nothing is touched.
"""

from __future__ import annotations

import json
import signal
import textwrap
import time
from pathlib import Path

import pytest
from rig.harness import MiB, Rig
from tun.tunhelp import Up, ours, route_get, snapshot

RIG_OPTIONS = {"file_sizes": {"64MiB.bin": 64 * MiB, "1MiB.bin": MiB}, "keepalive": 1}
TUN = "wgtun0"


@pytest.fixture
def conf(module_rig: Rig, tmp_path: Path) -> Path:
    return module_rig.write_client_config(tmp_path / "wgtun.conf")


def _py(rig: Rig, code: str) -> str:
    return rig.client.python(textwrap.dedent(code), timeout=60).stdout


def test_curl_udp_ping_v4_v6_through_the_tun(module_rig: Rig, conf: Path, tmp_path: Path) -> None:
    rig = module_rig
    before = snapshot(rig.client)
    up = Up(rig.client, conf, tmp_path, tun=TUN).wait_up()
    try:
        assert route_get(rig.client, rig.peer_tunnel_v4).split()[2] == TUN
        _, digest = rig.files["64MiB.bin"]
        r = rig.client.run(
            ["sh", "-c", f"curl -sS --max-time 120 {rig.url('64MiB.bin')} | sha256sum"],
            timeout=150,
        )
        assert r.stdout.split()[0] == digest, r.stderr + up.output()
        _, digest1 = rig.files["1MiB.bin"]
        r = rig.client.run(
            ["sh", "-c", f"curl -sS --max-time 60 '{rig.url('1MiB.bin', v6=True)}' | sha256sum"],
            timeout=90,
        )
        assert r.stdout.split()[0] == digest1, r.stderr + up.output()
        out = _py(
            rig,
            f"""
            import json, socket
            res = []
            for fam, host in ((socket.AF_INET, {rig.peer_tunnel_v4!r}),
                              (socket.AF_INET6, {rig.peer_tunnel_v6!r})):
                s = socket.socket(fam, socket.SOCK_DGRAM)
                s.settimeout(5)
                s.connect((host, {rig.udp_echo_port}))
                s.send(b"tun-echo")
                data, src = s.recvfrom(100)
                res.append([data.decode(), src[0], s.getsockname()[0]])
            print(json.dumps(res))
            """,
        )
        assert json.loads(out) == [
            ["tun-echo", rig.peer_tunnel_v4, rig.our_tunnel_v4],
            ["tun-echo", rig.peer_tunnel_v6, rig.our_tunnel_v6],
        ]
        for host in (rig.peer_tunnel_v4, rig.peer_tunnel_v6):
            r = rig.client.run(["busybox", "ping", "-c", "2", "-W", "5", host], check=False)
            assert r.returncode == 0, r.stdout + r.stderr
        state = up.api("GET", "/state")
        assert state["interface"]["tun"] == TUN
        assert state["peers"][0]["rx_bytes"] > 64 * MiB
        assert state["counters"]["tun"]["tx_packets"] > 0
    finally:
        code = up.stop(signal.SIGTERM)
    assert code == 0, up.output()
    assert ours(rig.client, TUN) == []
    assert snapshot(rig.client) == before
    assert not list((tmp_path / "state").glob("*.json"))
    assert '"down: ' in up.output()


def test_bypass_add_list_clear_changes_route_get_live(
    module_rig: Rig, conf: Path, tmp_path: Path
) -> None:
    """A host route to 10.150.0.0/16 via the peer's veth exists (not ours); the tunnel's
    10.150.0.0/24 wins until 10.150.0.1 is bypassed, then the host route answers again."""
    rig = module_rig
    rig.client.run(["ip", "route", "add", "10.150.0.0/16", "via", rig.peer.veth_v4])
    try:
        up = Up(rig.client, conf, tmp_path, tun=TUN).wait_up()
        try:
            target = rig.peer_tunnel_v4
            assert f"dev {TUN}" in route_get(rig.client, target)
            auto = up.api("GET", "/bypass")
            assert [(e["cidr"], e["reason"]) for e in auto if e["automatic"]] == [
                (f"{rig.peer.veth_v4}/32", "peer endpoint")
            ]
            got = up.api("POST", "/bypass", [target, "fd15::1"])
            assert {e["cidr"] for e in got if not e["automatic"]} == {
                f"{target}/32",
                "fd15::1/128",
            }
            line = route_get(rig.client, target)
            assert f"via {rig.peer.veth_v4}" in line and TUN not in line, line
            # No route outside the tunnel for fd15::1: bypassed means unreachable, not tunnelled.
            assert TUN not in route_get(rig.client, "fd15::1")
            assert f"dev {TUN}" in route_get(rig.client, "10.150.0.7")  # the rest: still ours
            after = up.api("DELETE", "/bypass")
            assert [e for e in after if not e["automatic"]] == []
            assert any(e["automatic"] for e in after)
            assert f"dev {TUN}" in route_get(rig.client, target)
            assert f"dev {TUN}" in route_get(rig.client, "fd15::1")
            post = ["curl", "-sS", "--unix-socket", str(up.control), "-X", "POST"]
            bad = rig.client.run([*post, "--data", '["nope"]', "http://localhost/bypass"])
            assert "nope" in json.loads(bad.stdout)["error"]
        finally:
            assert up.stop() == 0, up.output()
    finally:
        rig.client.run(["ip", "route", "del", "10.150.0.0/16"])
    assert ours(rig.client, TUN) == []


def test_endpoint_bypass_follows_a_roaming_peer(
    module_rig: Rig, conf: Path, tmp_path: Path
) -> None:
    """The peer's address changes; its keepalives then come from the new one (WireGuard
    roaming): the automatic entry and its route move there."""
    rig = module_rig
    old = rig.peer.veth_v4
    up = Up(rig.client, conf, tmp_path, tun=TUN).wait_up()
    try:
        r = rig.client.run(["busybox", "ping", "-c", "1", "-W", "5", rig.peer_tunnel_v4])
        assert r.returncode == 0
        routes = rig.client.run(["ip", "route", "show", "proto", "87"]).stdout
        assert f"{old} dev" in routes, routes
        new = f"198.18.{rig.n}.77"
        rig.move_peer(new)
        try:
            deadline = time.monotonic() + 20
            entries: list[dict[str, object]] = []
            while time.monotonic() < deadline:
                entries = [e for e in up.api("GET", "/bypass") if e["automatic"]]
                if [e["cidr"] for e in entries] == [f"{new}/32"]:
                    break
                time.sleep(0.3)
            assert [e["cidr"] for e in entries] == [f"{new}/32"], (entries, up.output())
            routes = rig.client.run(["ip", "route", "show", "proto", "87"]).stdout
            assert f"{new} dev" in routes and f"{old} dev" not in routes, routes
            assert up.api("GET", "/state")["peers"][0]["endpoint"].startswith(new)
        finally:
            rig.move_peer(old)
    finally:
        assert up.stop() == 0, up.output()
    assert ours(rig.client, TUN) == []


def test_after_sigkill_the_next_run_cleans_up(module_rig: Rig, conf: Path, tmp_path: Path) -> None:
    rig = module_rig
    before = snapshot(rig.client)
    state = tmp_path / "state"
    up = Up(rig.client, conf, tmp_path, tun=TUN, state_dir=state).wait_up()
    up.api("POST", "/bypass", ["192.0.2.0/24"])
    up.stop(signal.SIGKILL)
    left = ours(rig.client, TUN)
    # The TUN link went with the process; its bypass routes (on other links) did not.
    assert any(rig.peer.veth_v4 in x for x in left), left
    assert any("192.0.2.0/24" in x for x in left), left
    assert list(state.glob("*.json"))
    again = Up(rig.client, conf, tmp_path, tun=TUN, state_dir=state).wait_up()
    assert "removed what an earlier run left behind" in again.output()
    assert again.api("GET", "/bypass") and not [
        e for e in again.api("GET", "/bypass") if not e["automatic"]
    ]
    assert again.stop() == 0, again.output()
    assert ours(rig.client, TUN) == []
    assert snapshot(rig.client) == before
    assert not list(state.glob("*.json"))


@pytest.mark.parametrize(
    "drop",
    [
        ["setpriv", "--inh-caps=-all", "--bounding-set=-all", "--"],  # root without caps
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"],  # nobody
    ],
    ids=["root-without-caps", "nobody"],
)
def test_without_cap_net_admin_one_line_and_nothing_touched(
    module_rig: Rig, conf: Path, tmp_path: Path, drop: list[str]
) -> None:
    rig = module_rig
    before = snapshot(rig.client)
    up = Up(rig.client, conf, tmp_path, tun=TUN, prefix=drop)
    assert up.proc.wait(30) == 1
    lines = up.output().strip().splitlines()
    assert len(lines) == 1 and "CAP_NET_ADMIN" in lines[0], lines
    assert lines[0].startswith("wrapguard: ")
    assert snapshot(rig.client) == before


@pytest.mark.parametrize(
    ("extra_lines", "flags", "code", "needle"),
    [
        (["PersistentKeepalive = often"], [], 1, "PersistentKeepalive"),
        (["AllowedIPs = 10.160.0.0/33"], [], 1, "10.160.0.0/33"),
        ([], ["--route", "10.170.0.0/24:10.99.9.9"], 2, "10.99.9.9"),
        ([], ["--tun", "bad/name"], 1, "bad/name"),
    ],
)
def test_bad_config_leaves_the_namespace_untouched(
    module_rig: Rig,
    tmp_path: Path,
    extra_lines: list[str],
    flags: list[str],
    code: int,
    needle: str,
) -> None:
    rig = module_rig
    before = snapshot(rig.client)
    conf = rig.write_client_config(tmp_path / "bad.conf", extra_lines=extra_lines)
    tun = "wgtun0"
    if "--tun" in flags:
        tun = flags[1]
        flags = []
    up = Up(rig.client, conf, tmp_path, flags, tun=tun)
    assert up.proc.wait(30) == code, up.output()
    lines = up.output().strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], lines
    assert snapshot(rig.client) == before
    assert not (tmp_path / "state").exists()


def test_a_stream_road_peer_is_refused_and_nothing_is_touched(
    module_rig: Rig, tmp_path: Path
) -> None:
    rig = module_rig
    before = snapshot(rig.client)
    conf = rig.write_client_config(
        tmp_path / "stream.conf",
        endpoint="https://relay.wg.test/wg",
        extra_lines=["TransportKey = not-a-real-key-0123456789"],
        second_peer=False,
    )
    up = Up(rig.client, conf, tmp_path, [], tun="wgtun0")
    assert up.proc.wait(30) == 1, up.output()
    lines = up.output().strip().splitlines()
    assert len(lines) == 1 and "not available in TUN mode" in lines[0], lines
    assert snapshot(rig.client) == before


def test_link_deleted_under_it_is_fatal_and_the_rest_is_cleaned(
    module_rig: Rig, conf: Path, tmp_path: Path
) -> None:
    rig = module_rig
    before = snapshot(rig.client)
    up = Up(rig.client, conf, tmp_path, tun=TUN).wait_up()
    up.api("POST", "/bypass", ["192.0.2.0/24"])
    rig.client.run(["ip", "link", "del", TUN])
    rig.client.run(["busybox", "ping", "-c", "1", "-W", "1", rig.peer_tunnel_v4], check=False)
    try:
        code = up.proc.wait(20)
    finally:
        up.stop()
    assert code == 1, up.output()
    assert "the TUN device failed" in up.output()
    assert ours(rig.client, TUN) == []
    assert snapshot(rig.client) == before


def test_dns_without_resolved_is_one_line_and_resolv_conf_stays(
    module_rig: Rig, tmp_path: Path
) -> None:
    rig = module_rig
    conf = rig.write_client_config(tmp_path / "dns.conf", dns=True)
    resolv = rig.client.run(["cat", "/etc/resolv.conf"]).stdout
    up = Up(rig.client, conf, tmp_path, tun=TUN).wait_up()
    try:
        notes = [ln for ln in up.output().splitlines() if "DNS=" in ln]
        assert len(notes) == 1 and "not applied" in notes[0], notes
        assert json.loads(notes[0])["level"] in ("warn", "warning")
        assert rig.client.run(["cat", "/etc/resolv.conf"]).stdout == resolv
    finally:
        assert up.stop() == 0, up.output()
    assert rig.client.run(["cat", "/etc/resolv.conf"]).stdout == resolv


def test_a_route_the_host_already_has_fails_and_undoes_the_rest(
    module_rig: Rig, conf: Path, tmp_path: Path
) -> None:
    """Setup fails half-way (the kernel refuses a tunnel route: the host has exactly that
    route): one line, exit 1, and the link and endpoint bypass made before it are gone."""
    rig = module_rig
    rig.client.run(["ip", "route", "add", "10.150.0.0/24", "via", rig.peer.veth_v4])
    try:
        before = snapshot(rig.client)
        up = Up(rig.client, conf, tmp_path, tun=TUN)
        assert up.proc.wait(30) == 1, up.output()
        last = up.output().strip().splitlines()[-1]
        assert last.startswith("wrapguard: ") and "10.150.0.0/24" in last, last
        assert ours(rig.client, TUN) == []
        assert snapshot(rig.client) == before
    finally:
        rig.client.run(["ip", "route", "del", "10.150.0.0/24"])


def test_wrapguard_show_reads_the_tun_state(module_rig: Rig, conf: Path, tmp_path: Path) -> None:
    rig = module_rig
    up = Up(rig.client, conf, tmp_path, tun=TUN).wait_up()
    try:
        r = rig.client.python(["-m", "wrapguard", "show", "--control", str(up.control)])
        assert rig.peer_public_key.to_base64() in r.stdout, r.stdout
        assert f"tun {TUN}" in r.stdout, r.stdout
        assert f"{rig.peer.veth_v4}/32 (automatic: peer endpoint)" in r.stdout, r.stdout
    finally:
        assert up.stop() == 0, up.output()


def test_ipv6_endpoint_is_bypassed_too(module_rig: Rig, tmp_path: Path) -> None:
    rig = module_rig
    conf = rig.write_client_config(tmp_path / "v6.conf", endpoint_v6=True)
    up = Up(rig.client, conf, tmp_path, tun=TUN).wait_up()
    try:
        auto = [e["cidr"] for e in up.api("GET", "/bypass") if e["automatic"]]
        assert auto == [f"{rig.peer.veth_v6}/128"]
        routes = rig.client.run(["ip", "-6", "route", "show", "proto", "87"]).stdout
        assert f"{rig.peer.veth_v6} dev" in routes, routes
        r = rig.client.run(["busybox", "ping", "-c", "1", "-W", "5", rig.peer_tunnel_v6])
        assert r.returncode == 0
    finally:
        assert up.stop() == 0, up.output()
    assert ours(rig.client, TUN) == []


def test_a_second_run_on_the_same_link_name_is_refused(
    module_rig: Rig, conf: Path, tmp_path: Path
) -> None:
    rig = module_rig
    state = tmp_path / "state"
    first = Up(rig.client, conf, tmp_path, tun=TUN, state_dir=state).wait_up()
    try:
        ledgers = sorted(state.glob("*.json"))
        (tmp_path / "x").mkdir()
        second = Up(rig.client, conf, tmp_path / "x", tun=TUN, state_dir=state)
        assert second.proc.wait(30) == 1, second.output()
        last = second.output().strip().splitlines()[-1]
        assert "in use by another wrapguard up" in last, last
        assert sorted(state.glob("*.json")) == ledgers  # the first run's record is intact
        assert f"dev {TUN}" in route_get(rig.client, rig.peer_tunnel_v4)
    finally:
        assert first.stop() == 0, first.output()
    assert ours(rig.client, TUN) == []
