"""Self-test of the real-peer rig: wireguard-go on both sides, the kernel's TCP/UDP in between.

Our side is played by a second wireguard-go in the client namespace (`start_kernel_client`),
so every server, the relay and the teardown are proven before wrapguard itself is put there.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from rig import harness
from rig.harness import MiB, Rig, build_rig, leftovers
from rig.netns import NETNS_DIR, WG_SOCK_DIR, Netns, new_id, rig_namespaces, sweep_stale
from rig.servers import dns_parse_reply, dns_query

pytestmark = [pytest.mark.root, pytest.mark.interop]


def fetch(rig: Rig, url: str, timeout: float = 60) -> tuple[bytes, float]:
    t0 = time.monotonic()
    r = rig.client.run(["curl", "-sS", "--fail", "--max-time", str(timeout), url], text=False)
    return r.stdout, time.monotonic() - t0


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def assert_file(rig: Rig, name: str, v6: bool = False) -> float:
    """Download `name` through the tunnel, check length and sha256; return MB/s."""
    body, secs = fetch(rig, rig.url(name, v6=v6))
    size, digest = rig.files[name]
    assert len(body) == size
    assert sha(body) == digest
    return size / secs / 1e6


@pytest.mark.parametrize("rig", [{"file_sizes": (MiB, 64 * MiB)}], indirect=True)
def test_download_over_real_wireguard(rig: Rig) -> None:
    rig.start_kernel_client()
    assert_file(rig, "1MiB.bin")
    speed = assert_file(rig, "64MiB.bin")
    print(f"64 MiB over wireguard-go pair: {speed:.1f} MB/s")
    st = rig.peer_status()
    assert st.latest_handshake > 0
    assert st.endpoint is not None and st.endpoint.startswith(f"{rig.client_veth_v4}:")
    assert st.tx_bytes > 64 * MiB


def test_client_namespace_has_no_way_out(rig: Rig) -> None:
    for fam in ("-4", "-6"):
        assert rig.client.run(["ip", fam, "route", "show", "default"]).stdout.strip() == ""
    assert rig.client.run(["ip", "-4", "route"]).stdout.count("via") == 0
    for family, addr in ((socket.AF_INET, "192.0.2.1"), (socket.AF_INET6, "2001:db8::1")):
        for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
            with rig.client.socket(family, kind) as s, pytest.raises(OSError) as e:
                s.connect((addr, 80))
            assert e.value.errno == errno.ENETUNREACH
    # The tunnel addresses are unreachable too until something (wrapguard) provides them.
    with rig.client.socket(socket.AF_INET, socket.SOCK_STREAM) as s, pytest.raises(OSError) as e:
        s.connect((rig.peer_tunnel_v4, rig.http_port))
    assert e.value.errno == errno.ENETUNREACH


def test_ipv6_tunnel_over_ipv6_endpoint(rig: Rig) -> None:
    rig.start_kernel_client(endpoint_v6=True)
    assert_file(rig, "1MiB.bin", v6=True)
    assert_file(rig, "1KiB.bin", v6=False)  # IPv4 inside, IPv6 outside
    st = rig.peer_status()
    assert st.endpoint == f"[{rig.client_veth_v6}]:{rig.kernel_client.listen_port}"  # type: ignore[union-attr]


@pytest.mark.parametrize("rig", [{"psk": True}], indirect=True)
def test_preshared_key(rig: Rig, tmp_path: Path) -> None:
    assert rig.psk is not None
    rig.start_kernel_client()
    assert_file(rig, "1KiB.bin")
    text = rig.write_client_config(tmp_path / "wg0.conf").read_text()
    assert "PresharedKey = " in text
    assert "PresharedKey" not in rig.write_client_config(tmp_path / "n.conf", psk=False).read_text()


@pytest.mark.parametrize("rig", [{"psk": True, "second_peer": True}], indirect=True)
def test_client_config_is_one_wg_accepts(rig: Rig, tmp_path: Path) -> None:
    """The config written for our side, minus wg-quick-only keys, drives a real wireguard-go."""
    kc = rig.start_kernel_client(endpoint="127.0.0.1:9")  # a wrong endpoint, replaced below
    conf = rig.write_client_config(tmp_path / "wg0.conf", dns=True, keepalive=25, mtu=1420)
    text = conf.read_text()
    assert "DNS = 10.150.0.1" in text and text.count("[Peer]") == 2
    assert "Address = 10.150.0.2/32, fd15::2/128" in text
    assert (conf.stat().st_mode & 0o777) == 0o600
    quick_only = ("Address", "DNS", "MTU")
    stripped = tmp_path / "wg0.setconf"
    stripped.write_text(
        "\n".join(ln for ln in text.splitlines() if not ln.startswith(quick_only)) + "\n"
    )
    kc.wg(["setconf", kc.ifname, str(stripped)])
    assert_file(rig, "1KiB.bin")
    assert rig.peer2 is not None
    body, _ = fetch(rig, f"http://[{rig.peer2.tunnel_v6}]:{rig.http_port}/1KiB.bin")
    assert sha(body) == rig.files["1KiB.bin"][1]
    relay_conf = rig.write_client_config(
        tmp_path / "r.conf", endpoint="127.0.0.1:5555", extra_lines=["# end"], second_peer=False
    ).read_text()
    assert "Endpoint = 127.0.0.1:5555" in relay_conf and relay_conf.endswith("# end\n")
    assert relay_conf.count("[Peer]") == 1


@pytest.mark.parametrize("rig", [{"peer_endpoint_for_us": 51999, "keepalive": 1}], indirect=True)
def test_peer_initiates_when_it_knows_our_endpoint(rig: Rig) -> None:
    st = rig.peer_status()
    assert st.endpoint == f"{rig.client_veth_v4}:51999" and st.keepalive == 1
    kc = rig.start_kernel_client(listen_port=51999)
    # The peer's first initiation went out before anyone listened, and it retries only after
    # Rekey-Timeout (5 s) [W 6.4]; reloading its config as a fresh peer makes it send at once.
    rig.reset_peer()
    deadline = time.monotonic() + 10
    while kc.peer_status(rig.peer_public_key).latest_handshake == 0:  # we send nothing
        assert time.monotonic() < deadline, "the peer never initiated a handshake"
        time.sleep(0.05)
    assert kc.peer_status(rig.peer_public_key).rx_bytes > 0


def test_echo_servers_see_tunnel_address(rig: Rig) -> None:
    rig.start_kernel_client()
    for family, host, ours in (
        (socket.AF_INET, rig.peer_tunnel_v4, rig.our_tunnel_v4),
        (socket.AF_INET6, rig.peer_tunnel_v6, rig.our_tunnel_v6),
    ):
        with rig.client.socket(family, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect((host, rig.tcp_echo_port))
            f = s.makefile("rb")
            ip, port = f.readline().decode().split()
            assert (ip, int(port)) == (ours, s.getsockname()[1])
            payload = os.urandom(200_000)
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            assert f.read() == payload
        with rig.client.socket(family, socket.SOCK_DGRAM) as u:
            u.settimeout(5)
            u.connect((host, rig.udp_echo_port))  # connected: replies must come from `host`
            for size in (1, 1200, 1380):
                msg = os.urandom(size)
                u.send(msg)
                assert u.recv(2048) == msg


def test_dns_server_answers_and_logs(rig: Rig) -> None:
    rig.start_kernel_client()
    with rig.client.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
        u.settimeout(5)
        u.connect((rig.peer_tunnel_v4, rig.dns_port))
        for name, qtype, want in (
            ("web.wg.test", "A", (0, ["10.150.0.1"])),
            ("WEB.wg.test.", "AAAA", (0, ["fd15::1"])),
            ("v4only.wg.test", "AAAA", (0, [])),
            ("nowhere.wg.test", "A", (3, [])),
        ):
            u.send(dns_query(name, qtype))
            assert dns_parse_reply(u.recv(1500)) == want, name
    with rig.client.socket(socket.AF_INET6, socket.SOCK_STREAM) as t:
        t.settimeout(5)
        t.connect((rig.peer_tunnel_v6, rig.dns_port))
        q = dns_query("web.wg.test", "A")
        t.sendall(len(q).to_bytes(2, "big") + q)
        f = t.makefile("rb")
        assert dns_parse_reply(f.read(int.from_bytes(f.read(2), "big"))) == (0, ["10.150.0.1"])
    log = rig.dns_log()
    assert [(e["name"], e["qtype"], e["transport"]) for e in log] == [
        ("web.wg.test", "A", "udp"),
        ("web.wg.test", "AAAA", "udp"),
        ("v4only.wg.test", "AAAA", "udp"),
        ("nowhere.wg.test", "A", "udp"),
        ("web.wg.test", "A", "tcp"),
    ]
    assert {e["client"] for e in log} == {rig.our_tunnel_v4, rig.our_tunnel_v6}
    assert log[3]["rcode"] == "NXDOMAIN"
    assert rig.client_dns_log() == []


def test_client_resolver_catches_host_lookups(rig: Rig) -> None:
    """A name resolved the host's way inside the client namespace lands in client_dns_log."""
    r = rig.client.run(["getent", "ahosts", "web.wg.test"], check=False)
    assert r.returncode != 0  # the client namespace's own resolver knows no names
    assert "web.wg.test" in {e.get("name") for e in rig.client_dns_log()}
    assert rig.dns_log() == []


def test_many_concurrent_connections(rig: Rig) -> None:
    rig.start_kernel_client()
    n = 320
    socks = []
    try:
        for _ in range(n):
            s = rig.client.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(s)
            s.settimeout(20)
            s.connect((rig.peer_tunnel_v4, rig.tcp_echo_port))
        for i, s in enumerate(socks):  # every connection is open before any is used
            s.sendall(b"%d\n" % i)
        for i, s in enumerate(socks):
            f = s.makefile("rb")
            assert f.readline().startswith(b"10.150.0.2 ")
            assert f.readline() == b"%d\n" % i
        http = []
        for _ in range(n):
            s = rig.client.socket(socket.AF_INET, socket.SOCK_STREAM)
            http.append(s)
            s.settimeout(20)
            s.connect((rig.peer_tunnel_v4, rig.http_port))
        socks += http
        for s in http:
            s.sendall(b"GET /1KiB.bin HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        for s in http:
            body = s.makefile("rb").read()
            assert body.startswith(b"HTTP/1.1 200")
            assert sha(body.split(b"\r\n\r\n", 1)[1]) == rig.files["1KiB.bin"][1]
    finally:
        for s in socks:
            s.close()


def test_upload_endpoint(rig: Rig) -> None:
    rig.start_kernel_client()
    data = os.urandom(3 * MiB + 17)
    for extra in ([], ["-H", "Transfer-Encoding: chunked"]):
        r = rig.client.run(
            ["curl", "-sS", "--fail", "-T", "-", *extra, rig.url("upload")], input=data
        )
        assert json.loads(r.stdout) == {"sha256": sha(data), "length": len(data)}


def test_relay_without_loss_forwards_everything(rig: Rig) -> None:
    relay = rig.start_relay(v6=True)
    rig.start_kernel_client(endpoint=relay.endpoint)
    assert_file(rig, "1MiB.bin")
    # Stopped first: the relay's thread may be between counting a datagram received and
    # sent (a keepalive after the transfer). A send the kernel refused is its own count.
    st = relay.stop()
    for d in (st.up, st.down):
        assert d.received > 0
        assert d.sent + d.send_failed == d.received
        assert d.dropped == d.duplicated == d.reordered == 0
    assert rig.peer_status().endpoint.startswith(f"[{rig.client_veth_v6}]:")  # type: ignore[union-attr]


@pytest.mark.parametrize("rig", [{"file_sizes": (8 * MiB,)}], indirect=True)
def test_lossy_relay_download_still_completes(rig: Rig) -> None:
    relay = rig.start_relay(loss=0.03, dup=0.01, reorder=0.03, seed=7)
    rig.start_kernel_client(endpoint=relay.endpoint)
    speed = assert_file(rig, "8MiB.bin")
    st = relay.stats
    print(f"8 MiB through relay (3% loss, 1% dup, 3% reorder): {speed:.1f} MB/s; {st.as_dict()}")
    assert st.total("dropped") > 0
    assert st.total("duplicated") > 0
    assert st.total("reordered") > 0
    assert 0.01 < st.total("dropped") / st.total("received") < 0.06


def test_socket_and_python_helpers(rig: Rig) -> None:
    with rig.client.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((rig.client_veth_v4, 0))  # only exists inside the client namespace
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s, pytest.raises(OSError):
        s.bind((rig.client_veth_v4, 0))
    code = "import socket, wrapguard.keys; print(sorted(n for _, n in socket.if_nameindex()))"
    out = rig.client.python(code).stdout
    assert f"wgr{rig.id}a" in out and "lo" in out
    here = os.readlink("/proc/thread-self/ns/net")
    assert rig.client.call(os.readlink, "/proc/thread-self/ns/net") != here
    assert os.readlink("/proc/thread-self/ns/net") == here  # the caller never moved


def test_teardown_leaves_nothing(rig_files: harness.FileStore, tmp_path: Path) -> None:
    r = build_rig(tmp_path / "w", rig_files, second_peer=True, psk=True)
    try:
        r.start_kernel_client()
        relay = r.start_relay()
        assert_file(r, "1KiB.bin")
        assert r.peer2 is not None
        body, _ = fetch(r, f"http://{r.peer2.tunnel_v4}:{r.http_port}/1KiB.bin")
        assert sha(body) == r.files["1KiB.bin"][1]
        found = leftovers(r.id)
        assert len([f for f in found if f.startswith(str(NETNS_DIR))]) == 3
        assert len([f for f in found if f.startswith(str(WG_SOCK_DIR))]) == 3
        assert len([f for f in found if "wireguard-go" in f]) == 3
        assert len([f for f in found if "servers.py" in f]) == 3
    finally:
        assert r.close() == []
    assert leftovers(r.id) == []
    assert relay._thread is not None and not relay._thread.is_alive()


def test_failed_setup_is_undone(
    rig_files: harness.FileStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rig_id = new_id()
    monkeypatch.setattr(harness, "new_id", lambda: rig_id)

    def boom(rig: Rig) -> None:
        assert len(leftovers(rig_id)) > 4  # namespaces, wireguard-go, socket exist by now
        raise RuntimeError("setup failed halfway")

    monkeypatch.setattr(harness, "_start_all_servers", boom)
    with pytest.raises(RuntimeError, match="halfway"):
        build_rig(tmp_path / "w", rig_files, second_peer=True)
    assert leftovers(rig_id) == []


def test_sweep_removes_only_dead_runs() -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale_id, live = new_id(), Netns("c")
    stale = f"wgrig-{dead.pid}-{stale_id}-c"
    sock = WG_SOCK_DIR / f"wgr{stale_id}p.sock"
    try:
        subprocess.run(["ip", "netns", "add", stale], check=True)
        WG_SOCK_DIR.mkdir(parents=True, exist_ok=True)
        sock.touch()
        assert stale in {name for name, _, _ in rig_namespaces()}
        removed = sweep_stale()
        assert stale in removed
        assert not (NETNS_DIR / stale).exists() and not sock.exists()
        assert (NETNS_DIR / live.name).exists()
    finally:
        subprocess.run(["ip", "netns", "del", stale], capture_output=True, check=False)
        sock.unlink(missing_ok=True)
        assert live.close() == []


def test_make_netns_fixture(make_netns: Callable[[str], Netns]) -> None:
    a, b = make_netns("a"), make_netns("b")
    assert a.name != b.name and a.id != b.id
    assert (NETNS_DIR / a.name).exists() and (NETNS_DIR / b.name).exists()


def test_bare_netns_and_its_teardown() -> None:
    ns = Netns("t")
    try:
        assert ns.run(["ip", "-o", "link"]).stdout.count("\n") == 1  # just lo
        assert ns.run(["ip", "route"]).stdout == ""
        with ns.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))  # lo is up
        sleeper = ns.popen(["sleep", "60"])
        orphan = ns.run(["sh", "-c", "setsid sleep 61 >/dev/null 2>&1 & echo $!"]).stdout
    finally:
        assert ns.close() == []
    assert sleeper.returncode is not None
    assert (
        not Path(f"/proc/{int(orphan)}").exists()
        or "Z" in Path(f"/proc/{int(orphan)}/stat").read_text().split(")")[-1][:3]
    )
    assert not (NETNS_DIR / ns.name).exists()


def test_sweep_cleans_up_after_a_crashed_run(tmp_path: Path) -> None:
    tests, checkout = Path(__file__).parents[1], Path(__file__).parents[2]
    code = (
        f"import sys, time; sys.path[:0] = [{str(tests)!r}, {str(checkout)!r}]\n"
        "from pathlib import Path\n"
        "from rig.harness import FileStore, build_rig\n"
        f"r = build_rig(Path({str(tmp_path)!r}) / 'w', FileStore(Path({str(tmp_path)!r})))\n"
        "print(r.id, flush=True)\n"
        "time.sleep(60)\n"
    )
    crashed = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    rid = "?"
    try:
        assert crashed.stdout is not None
        rid = crashed.stdout.readline().strip()
        assert len(leftovers(rid)) >= 5  # 2 namespaces, wireguard-go, its socket, servers
    finally:
        crashed.kill()
        crashed.wait()
        removed = sweep_stale()  # also when an assertion above failed
    assert len([name for name in removed if f"-{rid}-" in name]) == 2
    assert leftovers(rid) == []
