"""End to end, inbound TCP: a wrapped server in the client namespace, reached from the peer.

Our config sets PersistentKeepalive, so the launcher handshakes at start and wireguard-go
learns our endpoint; the peer's own kernel clients (curl, Python) then connect to our tunnel
address. Checked: the server sees the peer's tunnel address as its client (accept() and the
access log), and once the program closes its listener the peer's connections are refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from rig.harness import MiB, Rig
from rig.netns import Netns
from runtime.wraphelp import popen_wrapped, py, read_line

pytestmark = [pytest.mark.root, pytest.mark.interop]


def peer_fetch(ns: Netns, url: str, deadline_s: float = 15.0) -> subprocess.CompletedProcess[str]:
    """curl from the peer namespace, retried until the wrapped server answers (or deadline)."""
    end = time.monotonic() + deadline_s
    while True:
        r = ns.run(["curl", "-sS", "-g", "--max-time", "5", url], check=False, timeout=20)
        if r.returncode == 0 or time.monotonic() > end:
            return r
        time.sleep(0.3)


@pytest.mark.parametrize(
    ("bind", "v6"),
    [("0.0.0.0", False), ("::", True), ("10.150.0.2", False), ("fd15::2", True)],
    ids=["v4-wildcard", "v6-wildcard", "v4-tunnel-address", "v6-tunnel-address"],
)
def test_wrapped_http_server_is_reached_from_the_peer(
    rig: Rig, tmp_path: Path, bind: str, v6: bool
) -> None:
    conf = rig.write_client_config(tmp_path / "c.conf", keepalive=25)
    site = tmp_path / "site"
    site.mkdir()
    (site / "hello.txt").write_text("hello from inside the tunnel\n")
    log = tmp_path / "server.log"
    with open(log, "wb") as logf:
        proc = popen_wrapped(
            rig.client,
            conf,
            [sys.executable, "-m", "http.server", "8081", "--bind", bind, "--directory", str(site)],
            stdout=logf,
            stderr=subprocess.STDOUT,
        )
    try:
        host = f"[{rig.our_tunnel_v6}]" if v6 else rig.our_tunnel_v4
        r = peer_fetch(rig.peer.ns, f"http://{host}:8081/hello.txt")
        assert r.returncode == 0, f"{r}\nserver log:\n{log.read_text()[-3000:]}"
        assert r.stdout == "hello from inside the tunnel\n"
        assert proc.poll() is None
        access = [ln for ln in log.read_text().splitlines() if "GET /hello.txt" in ln]
        assert access, log.read_text()[-3000:]
        want = rig.peer_tunnel_v6 if v6 else rig.peer_tunnel_v4
        # http.server logs the client address first; a v4 client of a "::" socket may show
        # up v4-mapped (docs/channel.md), anything else (loopback!) is wrong.
        client = access[0].split()[0]
        assert client in (want, f"::ffff:{want}"), access
    finally:
        proc.terminate()
        proc.wait(15)


def test_closed_listener_refuses_peer_connections(rig: Rig, tmp_path: Path) -> None:
    conf = rig.write_client_config(tmp_path / "c.conf", keepalive=25)
    server = """
        import socket, sys, time
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", 8082))
        s.listen()
        print("listening", flush=True)
        c, addr = s.accept()
        c.sendall(b"hello " + addr[0].encode() + b"\\n")
        print("accepted", addr[0], c.getpeername()[0], flush=True)
        c.close()
        s.close()
        print("closed", flush=True)
        sys.stdin.readline()  # listen again on the same port when told
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", 8082))
        s.listen()
        print("listening", flush=True)
        c, addr = s.accept()
        c.sendall(b"again " + addr[0].encode() + b"\\n")
        c.close()
        time.sleep(60)
    """
    proc = popen_wrapped(
        rig.client,
        conf,
        py(server),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    client = textwrap.dedent(
        f"""
        import json, socket, sys, time
        end = time.monotonic() + float(sys.argv[1])
        while True:
            t = time.monotonic()
            try:
                s = socket.create_connection(({rig.our_tunnel_v4!r}, 8082), timeout=5)
                print(json.dumps({{"got": s.makefile().readline().strip()}}))
                break
            except OSError as e:
                if time.monotonic() > end:
                    print(json.dumps({{"err": type(e).__name__, "took": time.monotonic() - t}}))
                    break
                time.sleep(0.3)
        """
    )
    try:
        assert read_line(proc, 10) == "listening"
        r = rig.peer.ns.run([sys.executable, "-c", client, "15"], check=False, timeout=40)
        assert json.loads(r.stdout) == {"got": f"hello {rig.peer_tunnel_v4}"}, r
        assert read_line(proc, 10) == f"accepted {rig.peer_tunnel_v4} {rig.peer_tunnel_v4}"
        assert read_line(proc, 10) == "closed"
        time.sleep(0.5)  # the shim's UNLISTEN is sent on close(); give the launcher a moment
        r = rig.peer.ns.run([sys.executable, "-c", client, "0"], check=False, timeout=40)
        out = json.loads(r.stdout)
        assert out["err"] == "ConnectionRefusedError", out
        assert out["took"] < 2.0, out
        assert proc.poll() is None
        # A new listener on the same port is announced again and reachable.
        assert proc.stdin is not None
        proc.stdin.write(b"again\n")
        proc.stdin.flush()
        assert read_line(proc, 10) == "listening"
        r = rig.peer.ns.run([sys.executable, "-c", client, "15"], check=False, timeout=40)
        assert json.loads(r.stdout) == {"got": f"again {rig.peer_tunnel_v4}"}, r
    finally:
        proc.kill()
        proc.wait(10)


def test_loopback_listener_is_not_exposed_to_the_peer(rig: Rig, tmp_path: Path) -> None:
    """A server bound to 127.0.0.1 is not announced: the peer is refused, locals still get in."""
    conf = rig.write_client_config(tmp_path / "c.conf", keepalive=25)
    server = """
        import socket, time
        s = socket.socket()
        s.bind(("127.0.0.1", 8083))
        s.listen()
        print("listening", flush=True)
        time.sleep(60)
    """
    proc = popen_wrapped(
        rig.client, conf, py(server), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    try:
        assert read_line(proc, 10) == "listening"
        # The tunnel is up once the peer has a handshake with us (keepalive at start).
        end = time.monotonic() + 10
        while rig.peer_status().latest_handshake == 0:
            assert time.monotonic() < end, "no handshake with the peer"
            time.sleep(0.2)
        r = rig.peer.ns.run(
            ["curl", "-sS", "--max-time", "5", f"http://{rig.our_tunnel_v4}:8083/"],
            check=False,
            timeout=20,
        )
        assert r.returncode == 7, r  # refused (our stack answers RST), not served nor timed out
        local = socket_probe(rig.client, "127.0.0.1", 8083)
        assert local == "connected"
    finally:
        proc.kill()
        proc.wait(10)


def socket_probe(ns: Netns, host: str, port: int) -> str:
    code = textwrap.dedent(
        f"""
        import socket
        try:
            socket.create_connection(({host!r}, {port}), timeout=5)
            print("connected")
        except OSError as e:
            print(type(e).__name__)
        """
    )
    return str(ns.run([sys.executable, "-c", code], check=False, timeout=20).stdout.strip())


def test_peer_downloads_from_wrapped_server_concurrently(rig: Rig, tmp_path: Path) -> None:
    """Bulk data in our sending direction on inbound connections: 10 parallel 4 MiB GETs."""
    conf = rig.write_client_config(tmp_path / "c.conf", keepalive=25)
    site = tmp_path / "site"
    site.mkdir()
    data = os.urandom(4 * MiB)
    (site / "blob.bin").write_bytes(data)
    proc = popen_wrapped(
        rig.client,
        conf,
        [
            sys.executable,
            "-m",
            "http.server",
            "8088",
            "--bind",
            "0.0.0.0",
            "--directory",
            str(site),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = textwrap.dedent(
        f"""
        import concurrent.futures, hashlib, json, time, urllib.request
        url = "http://{rig.our_tunnel_v4}:8088/blob.bin"
        end = time.monotonic() + 15
        while True:  # until the wrapped server is up
            try:
                urllib.request.urlopen("http://{rig.our_tunnel_v4}:8088/", timeout=3).read()
                break
            except OSError:
                if time.monotonic() > end:
                    raise
                time.sleep(0.3)
        def get(_):
            return hashlib.sha256(urllib.request.urlopen(url, timeout=60).read()).hexdigest()
        t = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(10) as ex:
            shas = list(ex.map(get, range(10)))
        print(json.dumps({{"shas": sorted(set(shas)), "n": len(shas),
                          "took": time.monotonic() - t}}))
        """
    )
    try:
        r = rig.peer.ns.run([sys.executable, "-c", client], check=False, timeout=90)
        assert r.returncode == 0, r
        out = json.loads(r.stdout)
        assert out["n"] == 10
        assert out["shas"] == [hashlib.sha256(data).hexdigest()]
        print(f"inbound 10 x 4 MiB: {out['took']:.1f} s ({40 / out['took']:.1f} MiB/s)")
    finally:
        proc.kill()
        proc.wait(10)


FAMILY_SERVER = """
    import socket, sys, threading, time
    def serve(family, port, v6only=None):
        s = socket.socket(family)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if v6only is not None:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, v6only)
        s.bind(("0.0.0.0" if family == socket.AF_INET else "::", port))
        s.listen()
        def loop():
            while True:
                c, a = s.accept()
                c.sendall(f"{port} {a[0]}\\n".encode())
                c.close()
        threading.Thread(target=loop, daemon=True).start()
    serve(socket.AF_INET, 8084)                # v4 only
    serve(socket.AF_INET6, 8085, v6only=1)     # v6 only
    serve(socket.AF_INET, 8087)                # the same port, one socket per family
    serve(socket.AF_INET6, 8087, v6only=1)
    print("ready", flush=True)
    time.sleep(60)
"""


def test_listener_family_is_respected(rig: Rig, tmp_path: Path) -> None:
    conf = rig.write_client_config(tmp_path / "c.conf", keepalive=25)
    log = tmp_path / "wg.log"
    proc = popen_wrapped(
        rig.client, conf, py(FAMILY_SERVER), extra=["--log-file", str(log)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    client = textwrap.dedent(
        """
        import json, socket, sys, time
        out = {}
        for host, port in json.loads(sys.argv[1]):
            try:
                s = socket.create_connection((host, port), timeout=4)
                out[f"{host} {port}"] = s.makefile().readline().strip()
            except OSError as e:
                out[f"{host} {port}"] = type(e).__name__
        print(json.dumps(out))
        """
    )
    v4, v6 = rig.our_tunnel_v4, rig.our_tunnel_v6
    targets = [[v4, 8084], [v6, 8084], [v4, 8085], [v6, 8085], [v4, 8087], [v6, 8087]]
    try:
        assert read_line(proc, 10) == "ready"
        time.sleep(0.5)
        r = rig.peer.ns.run(
            [sys.executable, "-c", client, json.dumps(targets)], check=False, timeout=60
        )
        assert r.returncode == 0, r
        got = json.loads(r.stdout)
        p4, p6 = rig.peer_tunnel_v4, rig.peer_tunnel_v6
        assert got == {
            f"{v4} 8084": f"8084 {p4}",
            f"{v6} 8084": "ConnectionRefusedError",
            f"{v4} 8085": "ConnectionRefusedError",
            f"{v6} 8085": f"8085 {p6}",
            f"{v4} 8087": f"8087 {p4}",
            f"{v6} 8087": f"8087 {p6}",
        }
        # The log names only the addresses each listener takes (last line per port).
        said = {
            e["port"]: e["addresses"]
            for e in map(json.loads, log.read_text().splitlines())
            if e["message"] == "listening on the tunnel"
        }
        assert said == {8084: [v4], 8085: [v6], 8087: [v4, v6]}, said
    finally:
        proc.kill()
        proc.wait(10)


def test_accepted_socket_reports_tunnel_addresses(rig: Rig, tmp_path: Path) -> None:
    conf = rig.write_client_config(tmp_path / "c.conf", keepalive=25)
    server = """
        import json, socket
        s = socket.socket()
        s.bind(("0.0.0.0", 8089))
        s.listen()
        print("listening", flush=True)
        c, addr = s.accept()
        print(json.dumps({"accept": list(addr), "peer": list(c.getpeername()),
                          "sock": list(c.getsockname())}), flush=True)
    """
    proc = popen_wrapped(
        rig.client, conf, py(server), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    client = textwrap.dedent(
        f"""
        import json, socket
        s = socket.create_connection(({rig.our_tunnel_v4!r}, 8089), timeout=5)
        print(json.dumps(list(s.getsockname())))
        """
    )
    try:
        assert read_line(proc, 10) == "listening"
        r = rig.peer.ns.run([sys.executable, "-c", client], check=False, timeout=30)
        assert r.returncode == 0, r
        peer_side = json.loads(r.stdout)
        ours = json.loads(read_line(proc, 10))
        assert ours["accept"] == peer_side == ours["peer"]
        assert ours["sock"] == [rig.our_tunnel_v4, 8089]
    finally:
        proc.kill()
        proc.wait(10)
