"""End to end, outbound TCP: `wrapguard --config X -- CMD` against a real wireguard-go peer.

Real programs (curl, blocking and asyncio Python, node) run under the shim in the rig's client
namespace and reach the servers behind the peer through our userspace tunnel: bulk transfers
checked by sha256, the echo server's view of our address, refused and unreachable
destinations, IPv6, policy routes to a second peer, direct (unrouted) destinations, and the
privacy of the launcher's control socket.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from rig.harness import MiB, Rig
from rig.netns import Netns
from runtime.wraphelp import (
    LEAK_PROBES,
    RST_CLIENT,
    RST_SERVER,
    SEMANTICS,
    UDP_WHOAMI,
    echo_client,
    explain,
    last_json,
    popen_wrapped,
    py,
    read_line,
    rig_echo_client,
    run_wrapped,
    start_tcpecho,
    wrap_argv,
)

pytestmark = [pytest.mark.root, pytest.mark.interop]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(MiB):
            h.update(chunk)
    return h.hexdigest()


def test_curl_download_and_upload_64mib(make_rig: Callable[..., Rig], tmp_path: Path) -> None:
    rig = make_rig(file_sizes={"64MiB.bin": 64 * MiB})
    conf = rig.write_client_config(tmp_path / "c.conf")
    out = tmp_path / "64MiB.out"
    t0 = time.monotonic()
    r = run_wrapped(
        rig.client,
        conf,
        ["curl", "-sS", "--max-time", "60", "-o", str(out), "-w", "%{http_code}",
         rig.url("64MiB.bin")],
        timeout=90,
    )  # fmt: skip
    took = time.monotonic() - t0
    assert r.returncode == 0, explain(r)
    assert r.stdout == "200", explain(r)
    size, sha = rig.files["64MiB.bin"]
    assert out.stat().st_size == size
    assert sha256_file(out) == sha
    print(f"64 MiB download: {took:.1f} s ({size / MiB / took:.1f} MiB/s)")

    up = tmp_path / "64MiB.up"
    data = os.urandom(64 * MiB)
    up.write_bytes(data)
    t0 = time.monotonic()
    r = run_wrapped(
        rig.client,
        conf,
        ["curl", "-sS", "--max-time", "150", "-T", str(up), rig.url("upload")],
        timeout=180,
    )
    took = time.monotonic() - t0
    assert r.returncode == 0, explain(r)
    reply = last_json(r.stdout)
    assert reply == {"sha256": hashlib.sha256(data).hexdigest(), "length": 64 * MiB}
    print(f"64 MiB upload: {took:.1f} s ({64 / took:.1f} MiB/s)")


def test_python_blocking_socket_sees_tunnel_addresses(rig: Rig, tmp_path: Path) -> None:
    conf = rig.write_client_config(tmp_path / "c.conf")
    r = run_wrapped(rig.client, conf, rig_echo_client(rig))
    assert r.returncode == 0, explain(r)
    out = last_json(r.stdout)
    assert out["first"].split()[0] == rig.our_tunnel_v4, out
    assert out["echo"] == "wrapguard-e2e"
    assert out["peer"] == [rig.peer_tunnel_v4, rig.tcp_echo_port]
    assert out["sock"][0] == rig.our_tunnel_v4
    # The port the echo server saw is the one getsockname() reports.
    assert int(out["first"].split()[1]) == out["sock"][1], out


def test_a_writer_whose_peer_does_not_read_is_held_back(rig: Rig, tmp_path: Path) -> None:
    """Backpressure end to end: the echo server stops reading once its replies are not read,
    so the program's send() must stall after a bounded amount (buffers and windows), and the
    launcher must not buffer the rest in memory."""
    conf = rig.write_client_config(tmp_path / "c.conf")
    code = f"""
        import json, os, socket, time
        s = socket.create_connection(({rig.peer_tunnel_v4!r}, {rig.tcp_echo_port}), timeout=10)
        s.makefile("rb").readline()
        s.settimeout(3)
        buf, n = b"x" * 65536, 0
        try:
            while n < 256 * 2**20:
                n += s.send(buf)
        except TimeoutError:
            pass
        status = open(f"/proc/{{os.getppid()}}/status").read()  # the launcher
        rss = int(status.split("VmRSS:")[1].split()[0]) // 1024
        print(json.dumps({{"sent_mib": n / 2**20, "launcher_rss_mib": rss}}))
    """
    r = run_wrapped(rig.client, conf, py(code), timeout=90)
    assert r.returncode == 0, explain(r)
    out = last_json(r.stdout)
    print(f"backpressure: {out}")
    assert 1 < out["sent_mib"] < 100, out
    assert out["launcher_rss_mib"] < 200, out


def test_transfers_survive_a_lossy_path(make_rig: Callable[..., Rig], tmp_path: Path) -> None:
    """Loss, duplication and reordering of WireGuard packets both ways (a userspace relay):
    TCP retransmission end to end keeps both directions intact."""
    rig = make_rig(file_sizes={"4MiB.bin": 4 * MiB})
    relay = rig.start_relay(loss=0.03, dup=0.02, reorder=0.05, seed=7)
    conf = rig.write_client_config(tmp_path / "c.conf", endpoint=relay.endpoint)
    out = tmp_path / "4MiB.out"
    up = tmp_path / "2MiB.up"
    data = os.urandom(2 * MiB)
    up.write_bytes(data)
    script = (
        f"curl -sS --max-time 60 -o {out} {rig.url('4MiB.bin')} && "
        f"curl -sS --max-time 60 -T {up} {rig.url('upload')}"
    )
    t0 = time.monotonic()
    r = run_wrapped(rig.client, conf, ["sh", "-c", script], timeout=90)
    took = time.monotonic() - t0
    assert r.returncode == 0, explain(r)
    assert sha256_file(out) == rig.files["4MiB.bin"][1]
    assert last_json(r.stdout) == {"sha256": hashlib.sha256(data).hexdigest(), "length": 2 * MiB}
    st = relay.stats
    print(f"lossy path: 4 MiB down + 2 MiB up in {took:.1f} s, relay {st.as_dict()}")
    assert st.up.dropped > 0 and st.down.dropped > 0, st  # the path really was lossy


def test_python_socket_semantics(rig: Rig, tmp_path: Path) -> None:
    conf = rig.write_client_config(tmp_path / "c.conf")
    cmd = [sys.executable, "-c", SEMANTICS, rig.peer_tunnel_v4, str(rig.tcp_echo_port)]
    r = run_wrapped(rig.client, conf, cmd, timeout=60)
    assert r.returncode == 0, explain(r)
    out = last_json(r.stdout)
    us, peer = rig.our_tunnel_v4, rig.peer_tunnel_v4
    early = out.pop("nonblocking_early_write")
    assert early in (
        ["EINPROGRESS", "EAGAIN", 0, us, ["early"]],  # not open yet: refused, as the kernel
        ["EINPROGRESS", "sent", 0, us, ["too early", "early"]],  # already open: in order
    ), early
    assert out == {
        "half_close": 300000,
        "v4_mapped": [us, [f"::ffff:{peer}", rig.tcp_echo_port], f"::ffff:{us}"],
        "dup_then_close": [us, "dup", [peer, rig.tcp_echo_port]],
        "asyncio_refused": "ConnectionRefusedError",
        "sequential": 0,
    }


def test_v6_destination_without_a_v6_address_fails_closed(rig: Rig, tmp_path: Path) -> None:
    """Our config has no IPv6 address: fd15::1 (in AllowedIPs) is ENETUNREACH, never direct."""
    conf = rig.write_client_config(tmp_path / "c.conf", address=f"{rig.our_tunnel_v4}/32")
    code = f"""
        import errno, socket
        s = socket.socket(socket.AF_INET6)
        s.settimeout(5)
        try:
            s.connect(({rig.peer_tunnel_v6!r}, {rig.tcp_echo_port}))
            print("connected")
        except OSError as e:
            print(errno.errorcode.get(e.errno, e.errno))
    """
    r = run_wrapped(rig.client, conf, py(code), timeout=30)
    assert r.returncode == 0, explain(r)
    assert r.stdout.strip() == "ENETUNREACH", explain(r)


def test_resets_pass_both_ways(rig: Rig, tmp_path: Path) -> None:
    """The server's abortive close reaches the program as ECONNRESET after the data it sent;
    the program's abortive close reaches the server as a reset too."""
    server = rig.peer.ns.python_popen(
        ["-c", RST_SERVER], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    assert read_line(server, 10) == "READY"
    conf = rig.write_client_config(tmp_path / "c.conf")
    r = run_wrapped(rig.client, conf, [sys.executable, "-c", RST_CLIENT, rig.peer_tunnel_v4])
    assert r.returncode == 0, explain(r)
    assert last_json(r.stdout) == {"read": "ConnectionResetError", "bytes": 1000}
    assert read_line(server, 10) == "ConnectionResetError"


def test_asyncio_300_concurrent_connections(rig: Rig, tmp_path: Path) -> None:
    conf = rig.write_client_config(tmp_path / "c.conf")
    code = f"""
        import asyncio, json, time

        async def one(i):
            r, w = await asyncio.open_connection({rig.peer_tunnel_v4!r}, {rig.tcp_echo_port})
            first = (await r.readline()).decode().split()
            payload = (f"conn-{{i}}-" * (40 + i % 50)).encode() + b"\\n"
            w.write(payload)
            await w.drain()
            echoed = await r.readexactly(len(payload))
            w.close()
            await w.wait_closed()
            return first[0], echoed == payload

        async def main():
            t = time.monotonic()
            res = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(300))), 60)
            print(json.dumps({{"n": len(res), "ok": sum(ok for _, ok in res),
                              "sources": sorted({{src for src, _ in res}}),
                              "took": time.monotonic() - t}}))

        asyncio.run(main())
    """
    r = run_wrapped(rig.client, conf, py(code), timeout=90)
    assert r.returncode == 0, explain(r)
    out = last_json(r.stdout)
    assert out["n"] == 300 and out["ok"] == 300, out
    assert out["sources"] == [rig.our_tunnel_v4], out
    print(f"300 concurrent echo connections: {out['took']:.2f} s")


def test_node_http_get(make_rig: Callable[..., Rig], tmp_path: Path) -> None:
    rig = make_rig(file_sizes={"4MiB.bin": 4 * MiB})
    conf = rig.write_client_config(tmp_path / "c.conf")
    script = textwrap.dedent(
        f"""
        const http = require("http"), crypto = require("crypto");
        http.get({json.dumps(rig.url("4MiB.bin"))}, (res) => {{
          const h = crypto.createHash("sha256"); let n = 0; const remote = res.socket.remoteAddress;
          res.on("data", (c) => {{ h.update(c); n += c.length; }});
          res.on("end", () => {{
            console.log(JSON.stringify({{status: res.statusCode, length: n,
              clen: Number(res.headers["content-length"]), sha: h.digest("hex"),
              remote}}));
          }});
        }}).on("error", (e) => {{ console.error("ERR", e.message); process.exit(3); }});
        const net = require("net");
        net.connect(9999, {json.dumps(rig.peer_tunnel_v4)})
          .on("connect", () => console.log(JSON.stringify({{refused: "connected"}})))
          .on("error", (e) => console.log(JSON.stringify({{refused: e.code}})));
        """
    )
    r = run_wrapped(rig.client, conf, ["node", "-e", script], timeout=60)
    assert r.returncode == 0, explain(r)
    lines = [json.loads(ln) for ln in r.stdout.splitlines() if ln.strip()]
    assert {"refused": "ECONNREFUSED"} in lines, explain(r)
    out = next(x for x in lines if "status" in x)
    size, sha = rig.files["4MiB.bin"]
    assert out["status"] == 200
    assert out["length"] == out["clen"] == size
    assert out["sha"] == sha
    assert out["remote"] == rig.peer_tunnel_v4


def test_many_wrapped_processes_at_once(rig: Rig, tmp_path: Path) -> None:
    """20 curl processes started by one wrapped shell, all at once (a HELLO and channel
    requests from each)."""
    conf = rig.write_client_config(tmp_path / "c.conf")
    script = (
        f"for i in $(seq 20); do (curl -sS --max-time 30 {rig.url('1MiB.bin')} | sha256sum) & "
        "done; wait"
    )
    r = run_wrapped(rig.client, conf, ["sh", "-c", script], timeout=60)
    assert r.returncode == 0, explain(r)
    shas = [ln.split()[0] for ln in r.stdout.splitlines()]
    assert shas == [rig.files["1MiB.bin"][1]] * 20, explain(r)


def test_refused_port_fails_fast(rig: Rig, tmp_path: Path) -> None:
    conf = rig.write_client_config(tmp_path / "c.conf")
    t0 = time.monotonic()
    r = run_wrapped(
        rig.client, conf, ["curl", "-sS", "--max-time", "20", f"http://{rig.peer_tunnel_v4}:9999/"]
    )
    took = time.monotonic() - t0
    assert r.returncode == 7, explain(r)  # CURLE_COULDNT_CONNECT
    assert took < 5.0, f"curl took {took:.1f} s to see a refusal"
    code = f"""
        import json, socket, time
        s = socket.socket()
        t = time.monotonic()
        try:
            s.connect(({rig.peer_tunnel_v4!r}, 9999))
            err = "connected"
        except OSError as e:
            err = type(e).__name__
        print(json.dumps({{"err": err, "took": time.monotonic() - t}}))
    """
    r = run_wrapped(rig.client, conf, py(code))
    assert r.returncode == 0, explain(r)
    out = last_json(r.stdout)
    assert out["err"] == "ConnectionRefusedError", out
    assert out["took"] < 1.0, out


def _dead_endpoint_config(rig: Rig, path: Path) -> Path:
    """Our config with the peer's endpoint moved to a UDP port nobody listens on (its veth)."""
    return rig.write_client_config(path, endpoint=f"{rig.peer.veth_v4}:9")


def run_bounded(
    rig: Rig, conf: Path, cmd: list[str], bound: float, extra: Sequence[str] = ()
) -> subprocess.CompletedProcess[Any]:
    """A wrapped run that must end within `bound` seconds (a hang is a failure, not a wait)."""
    try:
        return run_wrapped(rig.client, conf, cmd, timeout=bound, extra=extra)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"still running after {bound} s: {exc.cmd[-3:]}") from None


# The program's own connect timeout must work: a non-blocking connect's socket stays
# unwritable until the tunnel's outcome (the gate, docs/channel.md), so poll() times out.


def test_unreachable_python_times_out(rig: Rig, tmp_path: Path) -> None:
    conf = _dead_endpoint_config(rig, tmp_path / "c.conf")
    code = f"""
        import json, socket, time
        s = socket.socket()
        s.settimeout(5)
        t = time.monotonic()
        try:
            s.connect(({rig.peer_tunnel_v4!r}, {rig.tcp_echo_port}))
            err = "connected"
        except OSError as e:
            err = type(e).__name__
        print(json.dumps({{"err": err, "took": time.monotonic() - t}}))
    """
    r = run_bounded(rig, conf, py(code), 10)
    assert r.returncode == 0, explain(r)
    out = last_json(r.stdout)
    assert out["err"] in ("TimeoutError", "timeout"), out
    assert 4.5 <= out["took"] < 8.0, out


def test_unreachable_asyncio_wait_for_times_out(rig: Rig, tmp_path: Path) -> None:
    conf = _dead_endpoint_config(rig, tmp_path / "c.conf")
    code = f"""
        import asyncio, json, time
        async def main():
            t = time.monotonic()
            try:
                await asyncio.wait_for(
                    asyncio.open_connection({rig.peer_tunnel_v4!r}, {rig.tcp_echo_port}), 3)
                err = "connected"
            except (OSError, asyncio.TimeoutError) as e:
                err = type(e).__name__
            print(json.dumps({{"err": err, "took": time.monotonic() - t}}))
        asyncio.run(main())
    """
    r = run_bounded(rig, conf, py(code), 10)
    assert r.returncode == 0, explain(r)
    out = last_json(r.stdout)
    assert out["err"] == "TimeoutError", out
    assert 2.5 <= out["took"] < 6.0, out


def test_unreachable_curl_connect_timeout(rig: Rig, tmp_path: Path) -> None:
    conf = _dead_endpoint_config(rig, tmp_path / "c.conf")
    t0 = time.monotonic()
    r = run_bounded(rig, conf, ["curl", "-sS", "--connect-timeout", "3", rig.url("1KiB.bin")], 10)
    took = time.monotonic() - t0
    assert r.returncode == 28, explain(r)  # CURLE_OPERATION_TIMEDOUT
    assert took < 8.0, f"curl --connect-timeout 3 took {took:.1f} s"


def test_ipv6_through_the_tunnel(rig: Rig, tmp_path: Path) -> None:
    conf = rig.write_client_config(tmp_path / "c.conf")
    out = tmp_path / "1MiB.out"
    r = run_wrapped(
        rig.client,
        conf,
        ["curl", "-g", "-sS", "--max-time", "30", "-o", str(out), rig.url("1MiB.bin", v6=True)],
    )
    assert r.returncode == 0, explain(r)
    assert sha256_file(out) == rig.files["1MiB.bin"][1]
    r = run_wrapped(rig.client, conf, echo_client(rig.peer_tunnel_v6, rig.tcp_echo_port))
    assert r.returncode == 0, explain(r)
    out_json = last_json(r.stdout)
    assert out_json["first"].split()[0] == rig.our_tunnel_v6
    assert out_json["peer"] == [rig.peer_tunnel_v6, rig.tcp_echo_port]
    assert out_json["sock"][0] == rig.our_tunnel_v6


@pytest.mark.parametrize("how", ["--route", "Route=", "--exit-node"])
def test_policy_route_steers_to_second_peer(
    make_rig: Callable[..., Rig], tmp_path: Path, how: str
) -> None:
    """198.19.N.2 (peer2's veth) is in nobody's AllowedIPs: direct unless a policy route sends
    it through peer2, whose echo server then sees our tunnel address."""
    rig = make_rig(second_peer=True)
    assert rig.peer2 is not None
    target = rig.peer2.veth_v4
    extra: list[str] = []
    lines: list[str] = []
    if how == "--route":
        extra = ["--route", f"{target}/32:{rig.peer2.tunnel_v4}"]
    elif how == "--exit-node":
        extra = ["--exit-node", rig.peer2.tunnel_v4]
    else:
        lines = [f"Route = {target}/32"]  # the last [Peer] section is peer2's
    conf = rig.write_client_config(tmp_path / "c.conf")
    conf_with = rig.write_client_config(tmp_path / "p.conf", extra_lines=lines)
    # Without the policy it goes direct: the echo server sees our veth address.
    r = run_wrapped(rig.client, conf, echo_client(target, rig.tcp_echo_port))
    assert r.returncode == 0, explain(r)
    assert last_json(r.stdout)["first"].split()[0] == rig.client_veth2_v4
    if how != "--exit-node":  # (an exit node takes everything: policy beats AllowedIPs)
        # Peer 1's own addresses still go to peer 1.
        r = run_wrapped(rig.client, conf_with, rig_echo_client(rig), extra=extra)
        assert r.returncode == 0, explain(r)
        assert last_json(r.stdout)["first"].split()[0] == rig.our_tunnel_v4
    r = run_wrapped(rig.client, conf_with, echo_client(target, rig.tcp_echo_port), extra=extra)
    assert r.returncode == 0, explain(r)
    out = last_json(r.stdout)
    assert out["first"].split()[0] == rig.our_tunnel_v4, out
    assert out["peer"] == [target, rig.tcp_echo_port]
    # peer2 counted our traffic.
    assert rig.peer2.wg.peer_status(rig.our_public_key).rx_bytes > 0


def test_icmp_unreachable_from_behind_the_peer_fails_fast(
    make_rig: Callable[..., Rig], tmp_path: Path
) -> None:
    """Through an exit node that forwards but has no route to the destination, its kernel
    answers our SYN with ICMP net unreachable (RFC 792 type 3): connect() fails at once with
    ENETUNREACH, as Linux does in SYN-SENT, instead of waiting out the connect timeout."""
    rig = make_rig(second_peer=True)
    assert rig.peer2 is not None
    rig.peer2.ns.run(["sysctl", "-qw", "net.ipv4.ip_forward=1"])
    conf = rig.write_client_config(tmp_path / "c.conf")
    code = f"""
        import errno, json, socket, time
        s = socket.socket()
        t = time.monotonic()
        try:
            s.connect(({rig.peer_tunnel_v4!r}, {rig.tcp_echo_port}))
            err = "connected"
        except OSError as e:
            err = errno.errorcode.get(e.errno, str(e.errno))
        print(json.dumps({{"err": err, "took": time.monotonic() - t}}))
    """
    r = run_bounded(rig, conf, py(code), 30, extra=["--exit-node", rig.peer2.tunnel_v4])
    assert r.returncode == 0, explain(r)
    out = last_json(r.stdout)
    assert out["err"] == "ENETUNREACH", out
    assert out["took"] < 2.0, out


def test_route_to_unknown_peer_is_refused_with_one_line(rig: Rig, tmp_path: Path) -> None:
    conf = rig.write_client_config(tmp_path / "c.conf")
    r = run_wrapped(
        rig.client, conf, ["sh", "-c", "echo RAN"], extra=["--route", "10.150.9.0/24:10.150.7.7"]
    )
    assert r.returncode in (1, 2), explain(r)
    assert "RAN" not in r.stdout
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, explain(r)
    assert "10.150.7.7" in lines[0], explain(r)


def test_unrouted_destination_goes_direct(rig: Rig, tmp_path: Path) -> None:
    """A server on the client's own veth address (in no AllowedIPs) is reached directly."""
    start_tcpecho(rig.client, rig.client_veth_v4, 9100)
    conf = rig.write_client_config(tmp_path / "c.conf")
    r = run_wrapped(rig.client, conf, echo_client(rig.client_veth_v4, 9100))
    assert r.returncode == 0, explain(r)
    out = last_json(r.stdout)
    assert out["first"].split()[0] == rig.client_veth_v4, out
    assert out["echo"] == "wrapguard-e2e"
    assert out["peer"] == [rig.client_veth_v4, 9100]
    assert out["sock"][0] == rig.client_veth_v4


@pytest.mark.parametrize("probe", sorted(LEAK_PROBES))
def test_implicit_connects_never_leak(rig: Rig, tmp_path: Path, probe: str) -> None:
    """With a real route to 10.150.0.0/24 in the client namespace (as a host with a default
    route has), traffic to a tunnelled destination must still never go out directly."""
    rig.client.run(["ip", "route", "add", "10.150.0.0/24", "via", rig.peer.veth_v4])
    server = rig.peer.ns.python_popen(
        ["-c", UDP_WHOAMI], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    assert read_line(server, 10) == "READY"
    conf = rig.write_client_config(tmp_path / "c.conf")
    code = f"PEER, ECHO = {rig.peer_tunnel_v4!r}, {rig.tcp_echo_port}\n"
    code += textwrap.dedent(LEAK_PROBES[probe])
    r = run_wrapped(rig.client, conf, [sys.executable, "-c", code], timeout=30)
    assert r.returncode == 0, explain(r)
    seen = r.stdout.strip()
    assert seen != rig.client_veth_v4, f"{probe} left the tunnel: the peer saw {seen}"
    # Either through the tunnel or failed closed; nothing else.
    assert seen == rig.our_tunnel_v4 or seen.endswith("Error"), seen


def test_connect_after_the_launcher_is_gone_fails_closed(rig: Rig, tmp_path: Path) -> None:
    """A grandchild outliving its launcher (killed with SIGKILL while it serves in the
    background) must not reach a tunnelled destination directly, even with a real route to
    it (as a host with a default route has)."""
    rig.client.run(["ip", "route", "add", "10.150.0.0/24", "via", rig.peer.veth_v4])
    conf = rig.write_client_config(tmp_path / "c.conf")
    out, go, log = tmp_path / "late.txt", tmp_path / "go", tmp_path / "wg.log"
    late = textwrap.dedent(
        f"""
        import os, socket, time

        def attempt():
            end = time.monotonic() + 20
            while not os.path.exists({str(go)!r}):  # until the test killed the launcher
                if time.monotonic() > end:
                    return "no go from the test"
                time.sleep(0.05)
            try:
                addr = ({rig.peer_tunnel_v4!r}, {rig.tcp_echo_port})
                return socket.create_connection(addr, timeout=5).makefile().readline().split()[0]
            except OSError as e:
                return type(e).__name__

        res = attempt()
        open({str(out)!r} + ".tmp", "w").write(res)
        os.rename({str(out)!r} + ".tmp", {str(out)!r})
        """
    )
    script = f'{sys.executable} -c "$LATE" </dev/null >/dev/null 2>&1 & exit 0'
    proc = rig.client.popen(
        wrap_argv(conf, ["sh", "-c", script], ["--log-file", str(log)]),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**Netns.python_env(), "LATE": late},
    )
    assert proc.wait(30) == 0, log.read_text()
    bg = [json.loads(ln) for ln in log.read_text().splitlines() if "background" in ln]
    assert bg, log.read_text()
    os.kill(int(bg[0]["launcher_pid"]), signal.SIGKILL)
    time.sleep(0.3)
    go.write_text("go")
    end = time.monotonic() + 15
    while not out.exists() and time.monotonic() < end:
        time.sleep(0.2)
    seen = out.read_text()
    assert seen != rig.client_veth_v4, "the grandchild's connection left the tunnel"
    assert seen.endswith("Error"), seen


def test_bound_source_port_is_kept(rig: Rig, tmp_path: Path) -> None:
    conf = rig.write_client_config(tmp_path / "c.conf")
    code = f"""
        import json, socket
        s = socket.socket()
        s.bind(({rig.our_tunnel_v4!r}, 0))
        bound = list(s.getsockname())
        s.settimeout(10)
        s.connect(({rig.peer_tunnel_v4!r}, {rig.tcp_echo_port}))
        seen = s.makefile().readline().split()
        print(json.dumps({{"bound": bound, "seen": [seen[0], int(seen[1])],
                          "sock": list(s.getsockname())}}))
    """
    r = run_wrapped(rig.client, conf, py(code))
    assert r.returncode == 0, explain(r)
    out = last_json(r.stdout)
    assert out["bound"][0] == rig.our_tunnel_v4
    assert out["seen"] == out["sock"] == out["bound"], out


def _children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(p) for p in text.split()]


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(kv.split("=", 1) for kv in raw.decode(errors="replace").split("\0") if "=" in kv)


def test_control_socket_is_private_to_our_user(rig: Rig, tmp_path: Path) -> None:
    conf = rig.write_client_config(tmp_path / "c.conf")
    proc = popen_wrapped(
        rig.client,
        conf,
        ["sh", "-c", "echo started; sleep 5"],
        extra=["--log-level", "debug"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert read_line(proc, 10) == "started"
        launchers = _children(proc.pid)  # wrapguard -> its launcher -> the program
        assert len(launchers) == 1, launchers
        kids = _children(launchers[0])
        assert len(kids) == 1, kids
        env = _environ(kids[0])
        ctl = env["WRAPGUARD_CTL"]
        assert len(env["WRAPGUARD_SECRET"]) == 64
        probe = textwrap.dedent(
            f"""
            import errno, os, socket, sys
            if len(sys.argv) > 1:
                os.setgroups([]); os.setgid(65534); os.setuid(65534)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect({ctl!r})
                print("connected")
            except OSError as e:
                print(errno.errorcode[e.errno])
            """
        )
        # As root (control: the path is right and the launcher listens) ...
        r = rig.client.run([sys.executable, "-c", probe], check=False, timeout=20)
        assert r.stdout.strip() == "connected", r
        # ... and as nobody: EACCES, the directory is 0700 and the socket 0600.
        r = rig.client.run([sys.executable, "-c", probe, "nobody"], check=False, timeout=20)
        assert r.stdout.strip() == "EACCES", r
        # SIGTERM: forwarded, the program ends, and the private directory goes with it.
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 128 + signal.SIGTERM
        assert not Path(ctl).exists()
        assert not Path(ctl).parent.exists()
        # The secret is never logged, not even at debug level.
        assert proc.stderr is not None
        log = proc.stderr.read().decode()
        assert '"level": "debug"' in log
        assert env["WRAPGUARD_SECRET"] not in log
    finally:
        proc.kill()
        proc.wait(10)
