"""Interop: our Stack against the Linux kernel's TCP/UDP/ICMP over a veth pair.

Two namespaces created per run: the kernel side (addresses 198.18.77.1, fd15:77::1 on a
veth) and the stack side, where kernel_peer.py drives a Stack over an AF_PACKET socket on
the other veth end (no addresses, IPv6 off, so that namespace's kernel stays silent). The
kernel side gets static neighbour entries for the stack's addresses, so no ARP/ND is needed.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
]

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
K4, K6, S4, S6 = "198.18.77.1", "fd15:77::1", "198.18.77.2", "fd15:77::2"

ECHO_SERVER = textwrap.dedent(
    """
    import socket, threading
    srv = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    srv.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("::", 7000)); srv.listen(16); print("ready", flush=True)
    def echo(c):
        while True:
            d = c.recv(65536)
            if not d:
                break
            c.sendall(d)
        c.shutdown(socket.SHUT_WR); c.recv(1); c.close()
    while True:
        c, _ = srv.accept()
        threading.Thread(target=echo, args=(c,), daemon=True).start()
    """
)

# ping(8) is not installed: an ICMP "ping socket" echo request/reply in Python.
PING = textwrap.dedent(
    """
    import socket, sys
    host = sys.argv[1]
    v6 = ":" in host
    fam, proto = (socket.AF_INET6, 58) if v6 else (socket.AF_INET, 1)
    s = socket.socket(fam, socket.SOCK_DGRAM, proto)
    s.settimeout(3)
    s.sendto(bytes([128 if v6 else 8, 0, 0, 0, 0, 0, 0, 7]) + b"wrapguard-ping", (host, 0))
    reply = s.recv(2000)
    assert reply[0] == (129 if v6 else 0), reply
    assert reply[6:] == bytes([0, 7]) + b"wrapguard-ping", reply
    print("pong")
    """
)

KERNEL_CLIENT = textwrap.dedent(
    """
    import hashlib, json, random, socket, sys, threading
    host, n = sys.argv[1], int(sys.argv[2])
    data = random.Random(n).randbytes(n)
    c = socket.create_connection((host, 8000), timeout=20)
    peer = c.getsockname()[0]
    def writer():
        c.sendall(data); c.shutdown(socket.SHUT_WR)
    t = threading.Thread(target=writer); t.start()
    got = bytearray()
    while True:
        d = c.recv(1 << 20)
        if not d:
            break
        got += d
    t.join(); c.close()
    print(json.dumps({"ok": hashlib.sha256(got).digest() == hashlib.sha256(data).digest(),
                      "len": len(got), "me": peer}))
    """
)


def sh(*args: str) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True, timeout=30).stdout


@pytest.fixture(scope="module")
def rig():
    tag = secrets.token_hex(3)
    nsk, nss = f"nsk-{os.getpid()}-{tag}", f"nss-{os.getpid()}-{tag}"
    vk, vs = f"vk{tag}", f"vs{tag}"
    procs: list[subprocess.Popen[str]] = []
    try:
        sh("ip", "netns", "add", nsk)
        sh("ip", "netns", "add", nss)
        sh("ip", "link", "add", vk, "netns", nsk, "type", "veth", "peer", "name", vs, "netns", nss)
        sh("ip", "netns", "exec", nss, "sysctl", "-qw", f"net.ipv6.conf.{vs}.disable_ipv6=1")
        sh("ip", "netns", "exec", nsk, "sysctl", "-qw", "net.ipv4.ping_group_range=0 0")
        sh("ip", "-n", nsk, "addr", "add", f"{K4}/24", "dev", vk)
        sh("ip", "-n", nsk, "addr", "add", f"{K6}/64", "dev", vk, "nodad")
        for ns, dev in ((nsk, vk), (nsk, "lo"), (nss, vs)):
            sh("ip", "-n", ns, "link", "set", dev, "up")
        mac_s = json.loads(sh("ip", "-n", nss, "-j", "link", "show", vs))[0]["address"]
        mac_k = json.loads(sh("ip", "-n", nsk, "-j", "link", "show", vk))[0]["address"]
        for addr in (S4, S6):
            sh(
                "ip",
                "-n",
                nsk,
                "neigh",
                "add",
                addr,
                "lladdr",
                mac_s,
                "dev",
                vk,
                "nud",
                "permanent",
            )
        echo = subprocess.Popen(
            ["ip", "netns", "exec", nsk, sys.executable, "-c", ECHO_SERVER],
            stdout=subprocess.PIPE,
            text=True,
        )
        procs.append(echo)
        assert echo.stdout is not None and echo.stdout.readline().strip() == "ready"

        def peer(*args: str, timeout: float = 90) -> dict[str, object]:
            env = dict(os.environ, PYTHONPATH=str(ROOT))
            out = subprocess.run(
                [
                    "ip",
                    "netns",
                    "exec",
                    nss,
                    sys.executable,
                    str(HERE / "kernel_peer.py"),
                    vs,
                    mac_k,
                    S4,
                    S6,
                    *args,
                ],
                capture_output=True,
                text=True,
                timeout=timeout,
                env=env,
            )
            assert out.returncode == 0, out.stderr
            res: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
            if out.stderr:
                res["stderr"] = out.stderr
            return res

        def popen_peer(*args: str) -> subprocess.Popen[str]:
            env = dict(os.environ, PYTHONPATH=str(ROOT))
            p = subprocess.Popen(
                [
                    "ip",
                    "netns",
                    "exec",
                    nss,
                    sys.executable,
                    str(HERE / "kernel_peer.py"),
                    vs,
                    mac_k,
                    S4,
                    S6,
                    *args,
                ],
                stdout=subprocess.PIPE,
                text=True,
                env=env,
            )
            procs.append(p)
            return p

        def kernel(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                ["ip", "netns", "exec", nsk, *args], capture_output=True, text=True, timeout=timeout
            )

        yield peer, popen_peer, kernel
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for ns in (nsk, nss):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@pytest.mark.parametrize("host", [K4, K6])
def test_stack_client_to_kernel_echo_server(rig, host):
    peer, _popen, _kernel = rig
    res = peer("client", host, "7000", str(4 << 20))
    assert res == {"ok": True, "count": 4 << 20, "peer_closed": True, "closed": True, "errors": []}


def test_kernel_clients_to_stack_server_and_ping(rig):
    _peer, popen_peer, kernel = rig
    srv = popen_peer("server", "8000", "30", "2")
    assert srv.stdout is not None and srv.stdout.readline().strip() == "ready"
    try:
        # Ping before and alongside the TCP clients: ICMP/ICMPv6 echo from the stack.
        for host in (S4, S6):
            r = kernel(sys.executable, "-c", PING, host)
            assert r.stdout.strip() == "pong", r.stdout + r.stderr
        for host in (S4, S6):
            r = kernel(sys.executable, "-c", KERNEL_CLIENT, host, str(2 << 20))
            assert r.returncode == 0, r.stderr
            res = json.loads(r.stdout)
            assert res["ok"] and res["len"] == 2 << 20
    finally:
        out, _ = srv.communicate(timeout=30)
    res = json.loads(out.strip().splitlines()[-1])
    assert res["accepted"] == 2 and res["closed"] == 2
    assert res["peers"] == [K4, K6]


@pytest.mark.parametrize("host", [K4, K6])
def test_refused_by_kernel_rst(rig, host):
    peer, _popen, _kernel = rig
    assert peer("refused", host, "7999") == {"errno": 111, "refused": True}


@pytest.mark.parametrize("host", [K4, K6])
def test_udp_port_unreachable_from_kernel(rig, host):
    peer, _popen, _kernel = rig
    assert peer("udp", host, "7999") == {"errno": 111}
