"""End to end, the SOCKS5 door (issue 12): `wrapguard --config F --socks5 HOST:PORT` as a
daemon in the rig's client namespace, real clients beside it.

curl `--socks5-hostname` by name with DNS= set (the name resolves through the tunnel: the
client namespace's own resolver sees nothing), `--socks5` to IPv4 and IPv6, 64 MiB with
sha256, a refused port and an unknown name answered with the reply codes that say so (checked
byte for byte by a small client of the test's own), UDP ASSOCIATE echo (IPv4, IPv6, by name;
the association ends with its TCP connection; other sources are ignored), username/password
(required, wrong, right), ssh through a ProxyCommand to an sshd in the peer namespace, and a
clean exit 0 on SIGTERM.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import ipaddress
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from rig.harness import MiB, Rig
from rig.sshd import SSH_PORT
from runtime.wraphelp import explain

from wrapguard.doors import ProxySpec, socks5
from wrapguard.runtime.service import FrontEnd, Route, Way

RIG_OPTIONS = {"file_sizes": (100_000, 64 * MiB)}  # "100000B.bin", "64MiB.bin"
SMALL = "100000B.bin"
OPEN_PORT = 1080  # the no-auth proxy (the client namespace is ours: fixed ports are fine)
AUTH_PORT = 1081  # the proxy with USER:PASSWORD
DUAL_PORT = 1083  # the same on [::] (IPv4 clients too)
USER, PASSWORD = "alice", "s3cret-pa55"


@dataclass
class Proxy:
    proc: subprocess.Popen[str]
    port: int
    log: Path

    def lines(self) -> list[dict[str, object]]:
        return [json.loads(x) for x in self.log.read_text().splitlines() if x.strip()]


def _wait_for(cond: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(cond) and cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _start_proxy(rig: Rig, conf: Path, arg: str, port: int, log: Path) -> Iterator[Proxy]:
    argv = [
        sys.executable, "-m", "wrapguard", "--config", str(conf), "--socks5", arg,
        "--log-level", "debug", "--log-file", str(log),
    ]  # fmt: skip
    proc = rig.client.popen(
        argv, env=rig.client.python_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    proxy = Proxy(proc, port, log)

    def listening() -> bool:
        assert proc.poll() is None, proc.communicate()
        return log.exists() and '"socks5 proxy listening"' in log.read_text()

    _wait_for(listening, 20, "the SOCKS5 proxy to listen")
    yield proxy
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(20)
        assert rc == 0, f"daemon exit {rc}: {proc.communicate()}\n{log.read_text()[-3000:]}"


@pytest.fixture(scope="module")
def conf(module_rig: Rig, tmp_path_factory: pytest.TempPathFactory) -> Path:
    # DNS= the peer's resolver: names resolve through the tunnel, never on the host.
    return module_rig.write_client_config(tmp_path_factory.mktemp("s5") / "c.conf", dns=True)


class Daemons:
    """One proxy daemon at a time: two launchers with the same private key would take the
    peer's session from each other (the peer keeps one endpoint per key)."""

    def __init__(self, rig: Rig, conf: Path, workdir: Path) -> None:
        self.rig, self.conf, self.workdir = rig, conf, workdir
        self.current: tuple[str, Iterator[Proxy], Proxy] | None = None
        self.started = 0

    def ensure(self, arg: str, port: int) -> Proxy:
        cur = self.current
        if cur is not None and cur[0] == arg and cur[2].proc.poll() is None:
            return cur[2]
        self.stop()
        self.started += 1
        log = self.workdir / f"wg{self.started}.log"
        gen = _start_proxy(self.rig, self.conf, arg, port, log)
        self.current = (arg, gen, next(gen))
        return self.current[2]

    def stop(self) -> None:
        if self.current is not None:
            gen = self.current[1]
            self.current = None
            next(gen, None)  # SIGTERM; asserts a clean exit 0


@pytest.fixture(scope="module")
def daemons(
    module_rig: Rig, conf: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Daemons]:
    d = Daemons(module_rig, conf, tmp_path_factory.mktemp("s5log"))
    yield d
    d.stop()


@pytest.fixture
def proxy(daemons: Daemons) -> Proxy:
    return daemons.ensure(f"127.0.0.1:{OPEN_PORT}", OPEN_PORT)


@pytest.fixture
def auth_proxy(daemons: Daemons) -> Proxy:
    return daemons.ensure(f"{USER}:{PASSWORD}@127.0.0.1:{AUTH_PORT}", AUTH_PORT)


def curl(rig: Rig, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return rig.client.run(
        ["curl", "-sS", "--max-time", str(int(timeout - 5)), *args], check=False, timeout=timeout
    )


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


# -- a small SOCKS5 client of the test's own (raw bytes: independent of our codec) ---------------


def _addr(host: str, port: int) -> bytes:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        name = host.encode()
        return b"\x03" + bytes([len(name)]) + name + struct.pack("!H", port)
    return (b"\x01" if ip.version == 4 else b"\x04") + ip.packed + struct.pack("!H", port)


def _read_addr(data: bytes, at: int = 0) -> tuple[str, int, int]:
    atyp = data[at]
    n = {1: 4, 4: 16}.get(atyp)
    assert n is not None, data
    ip = ipaddress.ip_address(data[at + 1 : at + 1 + n])
    (port,) = struct.unpack("!H", data[at + 1 + n : at + 3 + n])
    return str(ip), port, at + 3 + n


def _recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise EOFError(f"closed after {buf!r}")
        buf += chunk
    return buf


def socks_request(
    rig: Rig, port: int, cmd: int, host: str, dport: int, creds: tuple[str, str] | None = None
) -> tuple[socket.socket, int, str, int]:
    """Greeting (+ RFC 1929), one request; (socket, REP, BND.ADDR, BND.PORT)."""
    s = rig.client.socket()
    s.settimeout(30)
    s.connect(("127.0.0.1", port))
    s.sendall(b"\x05\x01" + (b"\x02" if creds else b"\x00"))
    assert _recv_exact(s, 2) == (b"\x05\x02" if creds else b"\x05\x00")
    if creds:
        u, p = (c.encode() for c in creds)
        s.sendall(b"\x01" + bytes([len(u)]) + u + bytes([len(p)]) + p)
        assert _recv_exact(s, 2) == b"\x01\x00"
    s.sendall(b"\x05" + bytes([cmd, 0]) + _addr(host, dport))
    head = _recv_exact(s, 4)
    assert head[0] == 5 and head[2] == 0, head
    rest = _recv_exact(s, (4 if head[3] == 1 else 16) + 2)
    ip, bport, _ = _read_addr(head[3:4] + rest)
    return s, head[1], ip, bport


# -- CONNECT ------------------------------------------------------------------------------------


def test_curl_socks5_hostname_resolves_through_the_tunnel(
    module_rig: Rig, proxy: Proxy, tmp_path: Path
) -> None:
    out = tmp_path / SMALL
    url = f"http://web.wg.test:{module_rig.http_port}/{SMALL}"
    r = curl(module_rig, "--socks5-hostname", f"127.0.0.1:{proxy.port}", "-o", str(out), url)
    assert r.returncode == 0, r.stderr + proxy.log.read_text()[-3000:]
    assert _sha(out) == module_rig.files[SMALL][1]
    assert module_rig.client_dns_log() == [], "a name leaked to the host's resolver"
    asked = {(q["name"], q["qtype"]) for q in module_rig.dns_log()}
    assert ("web.wg.test", "A") in asked, asked  # ... and went to the tunnel's DNS= server
    flows = [x for x in proxy.lines() if x["message"] == "socks5 flow"]
    assert any(f["target"] == f"web.wg.test:{module_rig.http_port}" for f in flows), flows


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_curl_socks5_to_ip_literals(
    module_rig: Rig, proxy: Proxy, tmp_path: Path, v6: bool
) -> None:
    out = tmp_path / SMALL
    url = module_rig.url(SMALL, v6=v6)
    r = curl(module_rig, "--socks5", f"127.0.0.1:{proxy.port}", "-o", str(out), url)
    assert r.returncode == 0, r.stderr
    assert _sha(out) == module_rig.files[SMALL][1]


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_connect_reply_names_our_tunnel_end(module_rig: Rig, proxy: Proxy, v6: bool) -> None:
    """The TCP echo server's first line is the source it saw: our tunnel address and the
    port the reply named as BND.PORT."""
    peer = module_rig.peer_tunnel_v6 if v6 else module_rig.peer_tunnel_v4
    s, rep, bnd, bport = socks_request(module_rig, proxy.port, 1, peer, module_rig.tcp_echo_port)
    with s:
        assert rep == 0
        first = s.makefile("rb").readline().decode().split()
        ours = module_rig.our_tunnel_v6 if v6 else module_rig.our_tunnel_v4
        assert [bnd, str(bport)] == [ours, first[1]] and first[0] == ours, (bnd, bport, first)
        s.sendall(b"hello through socks\n")
        assert s.makefile("rb").readline() == b"hello through socks\n"


def test_64_mib_through_socks5(module_rig: Rig, proxy: Proxy, tmp_path: Path) -> None:
    out = tmp_path / "big.bin"
    url = f"http://web.wg.test:{module_rig.http_port}/64MiB.bin"
    r = curl(
        module_rig, "--socks5-hostname", f"127.0.0.1:{proxy.port}", "-o", str(out), url,
        timeout=240,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    size, sha = module_rig.files["64MiB.bin"]
    assert out.stat().st_size == size and _sha(out) == sha


def test_refused_port_and_unknown_name_say_so(module_rig: Rig, proxy: Proxy) -> None:
    r = curl(
        module_rig,
        "--socks5",
        f"127.0.0.1:{proxy.port}",
        f"http://{module_rig.peer_tunnel_v4}:9999/",
    )
    assert r.returncode == 97, explain(r)  # CURLE_PROXY: the proxy answered with a failure
    # curl 7.x prints the reply code "(5)", curl 8 says "Connection refused".
    assert "(5)" in r.stderr or "refused" in r.stderr.lower(), r.stderr
    s, rep, _, _ = socks_request(module_rig, proxy.port, 1, module_rig.peer_tunnel_v6, 9999)
    s.close()
    assert rep == 0x05  # connection refused (the peer's RST through the tunnel)
    s, rep, _, _ = socks_request(module_rig, proxy.port, 1, "nothere.wg.test", 80)
    s.close()
    assert rep == 0x04  # host unreachable: the name does not exist
    s, rep, _, _ = socks_request(module_rig, proxy.port, 2, module_rig.peer_tunnel_v4, 80)
    s.close()
    assert rep == 0x07  # BIND: command not supported
    assert module_rig.client_dns_log() == []


def test_direct_destinations_go_out_on_the_host(module_rig: Rig, proxy: Proxy) -> None:
    """Loopback is not routed into the tunnel: the door connects on the host (split tunnel)."""
    srv = module_rig.client.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    srv.settimeout(10)
    with srv:
        s, rep, bnd, bport = socks_request(
            module_rig, proxy.port, 1, "127.0.0.1", srv.getsockname()[1]
        )
        conn, addr = srv.accept()
        with s, conn:
            assert rep == 0 and (bnd, bport) == addr[:2]
            s.sendall(b"ping")
            assert _recv_exact(conn, 4) == b"ping"
            conn.sendall(b"pong" * 1000)
            conn.shutdown(socket.SHUT_WR)  # half-close reaches the client ...
            got = b""
            while chunk := s.recv(65536):
                got += chunk
            assert got == b"pong" * 1000
            s.sendall(b"after")  # ... and its direction to the server still works
            s.shutdown(socket.SHUT_WR)
            assert _recv_exact(conn, 5) == b"after" and conn.recv(10) == b""


# -- UDP ASSOCIATE ------------------------------------------------------------------------------


def _udp_roundtrip(
    u: socket.socket, relay: tuple[str, int], host: str, port: int, payload: bytes
) -> tuple[str, int, bytes]:
    u.sendto(b"\x00\x00\x00" + _addr(host, port) + payload, relay)
    data, src = u.recvfrom(65535)
    assert src[:2] == relay, src
    assert data[:3] == b"\x00\x00\x00", data
    ip, sport, end = _read_addr(data, 3)
    return ip, sport, data[end:]


@pytest.mark.parametrize("listen", ["loopback", "dual-stack"])
def test_udp_associate_echo(module_rig: Rig, daemons: Daemons, listen: str) -> None:
    """On 127.0.0.1, and on [::] (credentials needed there) reached over IPv4: the
    association's socket and the client's address are IPv4-mapped on our side."""
    rig = module_rig
    if listen == "loopback":
        proxy, creds = daemons.ensure(f"127.0.0.1:{OPEN_PORT}", OPEN_PORT), None
    else:
        proxy = daemons.ensure(f"{USER}:{PASSWORD}@[::]:{DUAL_PORT}", DUAL_PORT)
        creds = (USER, PASSWORD)
    ctl, rep, bnd, bport = socks_request(rig, proxy.port, 3, "0.0.0.0", 0, creds)
    assert rep == 0 and bnd == "127.0.0.1" and bport > 0
    relay = (bnd, bport)
    u = rig.client.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.settimeout(10)
    u.bind(("127.0.0.1", 0))
    with ctl, u:
        echo = rig.udp_echo_port
        assert _udp_roundtrip(u, relay, rig.peer_tunnel_v4, echo, b"ping4") == (
            rig.peer_tunnel_v4, echo, b"ping4",
        )  # fmt: skip
        assert _udp_roundtrip(u, relay, rig.peer_tunnel_v6, echo, b"ping6") == (
            rig.peer_tunnel_v6, echo, b"ping6",
        )  # fmt: skip
        # By name: resolved through the tunnel; the reply names the real source (an IP).
        big = os.urandom(1200)
        assert _udp_roundtrip(u, relay, "v4only.wg.test", echo, big) == (
            rig.peer_tunnel_v4, echo, big,
        )  # fmt: skip
        # A fragment (FRAG != 0) is dropped, and so is a datagram from another port.
        u.sendto(b"\x00\x00\x01" + _addr(rig.peer_tunnel_v4, echo) + b"frag", relay)
        other = rig.client.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with other:
            other.settimeout(1)
            other.sendto(b"\x00\x00\x00" + _addr(rig.peer_tunnel_v4, echo) + b"intruder", relay)
            with pytest.raises(TimeoutError):
                other.recvfrom(100)
        u.settimeout(1)
        with pytest.raises(TimeoutError):
            u.recvfrom(100)  # neither the fragment nor the intruder's datagram came back
        u.settimeout(10)
        assert _udp_roundtrip(u, relay, rig.peer_tunnel_v4, echo, b"still")[2] == b"still"
        # The association ends with its TCP connection: its UDP port closes.
        ctl.close()
        u.connect(relay)

        def closed() -> bool:
            try:
                u.send(b"\x00\x00\x00" + _addr(rig.peer_tunnel_v4, echo) + b"late")
                u.settimeout(0.3)
                u.recv(100)
            except ConnectionRefusedError:
                return True
            except TimeoutError:
                pass
            return False

        _wait_for(closed, 10, "the association's UDP port to close")
    assert rig.client_dns_log() == []
    drops = [x for x in proxy.lines() if x["message"] == "socks5 flow" and x.get("cmd") == "udp"]
    assert drops and drops[-1]["to_destination"] >= 4, drops


def test_udp_associate_with_the_client_port_named(module_rig: Rig, proxy: Proxy) -> None:
    """DST.PORT of the request names the client's UDP port: datagrams from any other port
    are ignored, even before the first one from the right port arrives."""
    rig = module_rig
    u = rig.client.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.bind(("127.0.0.1", 0))
    other = rig.client.socket(socket.AF_INET, socket.SOCK_DGRAM)
    other.settimeout(1)
    ctl, rep, bnd, bport = socks_request(rig, proxy.port, 3, "127.0.0.1", u.getsockname()[1])
    with ctl, u, other:
        assert rep == 0
        probe = b"\x00\x00\x00" + _addr(rig.peer_tunnel_v4, rig.udp_echo_port)
        other.sendto(probe + b"first, from elsewhere", (bnd, bport))
        with pytest.raises(TimeoutError):
            other.recvfrom(100)
        u.settimeout(10)
        got = _udp_roundtrip(u, (bnd, bport), rig.peer_tunnel_v4, rig.udp_echo_port, b"named")
        assert got[2] == b"named"


# -- username/password (RFC 1929) ---------------------------------------------------------------


def test_auth_required_wrong_and_right(module_rig: Rig, auth_proxy: Proxy, tmp_path: Path) -> None:
    rig = module_rig
    url = rig.url(SMALL)
    where = f"127.0.0.1:{auth_proxy.port}"
    r = curl(rig, "--socks5", where, "-o", os.devnull, url)
    # No credentials offered: X'FF', "no acceptable methods" (RFC 1928 3).
    assert r.returncode == 97 and "no authentication method" in r.stderr.lower(), explain(r)
    r = curl(rig, "--socks5", f"{USER}:wrong@{where}", "-o", os.devnull, url)
    assert r.returncode == 97 and "rejected" in r.stderr.lower(), explain(r)  # STATUS 1
    r = curl(rig, "--socks5", f"bob:{PASSWORD}@{where}", "-o", os.devnull, url)
    assert r.returncode == 97, explain(r)
    out = tmp_path / "ok.bin"
    r = curl(rig, "--socks5", where, "--proxy-user", f"{USER}:{PASSWORD}", "-o", str(out), url)
    assert r.returncode == 0, r.stderr
    assert _sha(out) == rig.files[SMALL][1]
    r = curl(rig, "-x", f"socks5h://{USER}:{PASSWORD}@{where}", "-o", str(out), url)
    assert r.returncode == 0, r.stderr
    # Our own client too: the right pair gets STATUS 0 and a working CONNECT.
    s, rep, _, _ = socks_request(
        rig, auth_proxy.port, 1, rig.peer_tunnel_v4, rig.tcp_echo_port, (USER, PASSWORD)
    )
    with s:
        assert rep == 0 and s.makefile("rb").readline().split()[0] == rig.our_tunnel_v4.encode()
    text = auth_proxy.log.read_text()
    assert PASSWORD not in text and f"{USER}:wrong" not in text


# -- a real non-curl client: ssh through a ProxyCommand -----------------------------------------

CONNECTOR = textwrap.dedent(
    """
    import os, selectors, socket, struct, sys
    proxy, host, port = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    s = socket.create_connection(("127.0.0.1", proxy))
    s.sendall(b"\\x05\\x01\\x00")
    assert s.recv(2) == b"\\x05\\x00"
    name = host.encode()
    s.sendall(b"\\x05\\x01\\x00\\x03" + bytes([len(name)]) + name + struct.pack("!H", port))
    head = s.recv(4)
    if head[1] != 0:
        sys.exit(f"socks5 reply {head[1]}")
    s.recv({1: 4, 4: 16}[head[3]] + 2)
    sel = selectors.DefaultSelector()
    sel.register(0, selectors.EVENT_READ)
    sel.register(s, selectors.EVENT_READ)
    while True:
        for key, _ in sel.select():
            if key.fileobj == 0:
                data = os.read(0, 65536)
                if not data:
                    s.shutdown(socket.SHUT_WR)
                    sel.unregister(0)
                else:
                    s.sendall(data)
            else:
                data = s.recv(65536)
                if not data:
                    sys.exit(0)
                os.write(1, data)
    """
)


def test_ssh_through_a_socks5_proxycommand(
    module_rig: Rig, proxy: Proxy, sshd: Path, tmp_path: Path
) -> None:
    connector = tmp_path / "connector.py"
    connector.write_text(CONNECTOR)
    # The hosts file is the client's: the name goes to the proxy unresolved (socks5h).
    argv = [
        "ssh", "-i", str(sshd), "-p", str(SSH_PORT),
        "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
        "-o", "BatchMode=yes",
        "-o", f"ProxyCommand={sys.executable} {connector} {proxy.port} %h %p",
        "root@web.wg.test", "echo ssh-through-socks; head -c 300000 /dev/zero | sha256sum",
    ]  # fmt: skip
    r = module_rig.client.run(argv, check=False, timeout=60)
    assert r.returncode == 0, explain(r) + proxy.log.read_text()[-3000:]
    lines = r.stdout.split("\n")
    assert lines[0] == "ssh-through-socks", r.stdout
    assert lines[1].split()[0] == hashlib.sha256(b"\0" * 300000).hexdigest()
    assert module_rig.client_dns_log() == []


# -- lifetime -----------------------------------------------------------------------------------


def test_daemon_stops_cleanly_on_sigterm(
    module_rig: Rig, conf: Path, daemons: Daemons, tmp_path: Path
) -> None:
    daemons.stop()
    log = tmp_path / "wg.log"
    gen = _start_proxy(module_rig, conf, "127.0.0.1:1082", 1082, log)
    p = next(gen)
    ctl, rep, _, _ = socks_request(module_rig, 1082, 3, "0.0.0.0", 0)  # an association open
    with ctl:
        assert rep == 0
        p.proc.send_signal(signal.SIGTERM)
        assert p.proc.wait(20) == 0, log.read_text()[-3000:]
        ctl.settimeout(5)
        assert ctl.recv(10) == b""  # the door closed its connections
    with pytest.raises(StopIteration):
        next(gen)
    probe = module_rig.client.socket()
    with probe, pytest.raises(ConnectionRefusedError):
        probe.connect(("127.0.0.1", 1082))


# -- the door's glue in this process, against a stand-in service (no root, no tunnel) ------------


class LoopbackService:
    """The part of TunnelService the door uses: loopback goes DIRECT, everything else FAILs
    (this runs on the host's network: nothing may leave it, whatever garbage asks for)."""

    def __init__(self) -> None:
        self.frontends: list[FrontEnd] = []

    def route(
        self, proto: int, ip: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int
    ) -> Route:
        if ip.is_loopback:
            return Route(Way.DIRECT)
        return Route(Way.FAIL, errno.ENETUNREACH)

    async def resolve(self, name: str, family: int = 0) -> list[object]:
        if name == "localhost":
            return [ipaddress.ip_address("127.0.0.1")]
        raise OSError(113, f"{name}: not found")

    def add_frontend(self, fe: FrontEnd) -> FrontEnd:
        self.frontends.append(fe)
        return fe


async def _door(**attrs: object) -> socks5.Socks5Door:
    door = await socks5.start(LoopbackService(), ProxySpec("socks5", "127.0.0.1", 0))  # type: ignore[arg-type]
    for k, v in attrs.items():
        setattr(door, k, v)
    return door


async def _talk(port: int, data: bytes, timeout: float = 5) -> bytes:
    """Send data, then read until the door closes; what came back."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(data)
    got = b""
    try:
        async with asyncio.timeout(timeout):
            while chunk := await r.read(4096):
                got += chunk
    except ConnectionResetError:
        got += b"<reset>"
    except TimeoutError:
        got += b"<open>"
    w.close()
    return got


def test_glue_garbage_gets_a_reply_code_or_a_close() -> None:
    async def main() -> None:
        door = await _door()
        port = int(door.address.rsplit(":", 1)[1])
        try:
            assert await _talk(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n") == b""
            assert await _talk(port, b"\x04\x01\x00\x50\x7f\x00\x00\x01\x00") == b""
            assert await _talk(port, b"\x05\x01\x02") == b"\x05\xff"
            assert await _talk(port, b"\x05\x01\x00\x05\x02\x09\x00") == (
                b"\x05\x00" + b"\x05\x08\x00\x01" + bytes(6)
            )
            assert (await _talk(port, b"\x05\x01\x00\x05\x02\x00\x01" + bytes(6)))[
                2:4
            ] == b"\x05\x07"
            # A name that does not resolve: 0x04; the early data after it does not turn the
            # reply into a reset (we read it before closing).
            name = b"nothere.test"
            req = b"\x05\x01\x00\x03" + bytes([len(name)]) + name + b"\x00\x50"
            assert (await _talk(port, b"\x05\x01\x00" + req + b"x" * 3000))[2:4] == b"\x05\x04"
            # A refused loopback port: 0x05.
            probe = socket.socket()
            probe.bind(("127.0.0.1", 0))
            closed_port = probe.getsockname()[1]
            probe.close()
            req = b"\x05\x01\x00\x01\x7f\x00\x00\x01" + struct.pack("!H", closed_port)
            assert (await _talk(port, b"\x05\x01\x00" + req))[2:4] == b"\x05\x05"
            # Random garbage: never a traceback, the door goes on. (Half a message waits for
            # the handshake deadline; a lucky UDP ASSOCIATE stays open: both are fine.)
            door.handshake_timeout = 0.3
            for _ in range(4):
                await asyncio.gather(
                    *(
                        _talk(port, b"\x05" + os.urandom(int.from_bytes(os.urandom(1)) + 1), 1)
                        for _ in range(50)
                    )
                )
            assert (await _talk(port, b"\x05\x01\x00" + req))[2:4] == b"\x05\x05"
            assert door.drops.get("internal_error", 0) == 0, door.drops
            assert door.drops["bad_request"] >= 2 and door.drops["no_acceptable_method"] >= 1
        finally:
            await door.close()

    asyncio.run(main())


def test_glue_handshake_timeout_and_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socks5, "MAX_HANDSHAKES", 2)

    async def main() -> None:
        door = await _door(handshake_timeout=0.5)
        port = int(door.address.rsplit(":", 1)[1])
        try:
            idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
            await asyncio.sleep(0.1)
            # Two are negotiating (silently): a third is turned away at once.
            assert await _talk(port, b"\x05\x01\x00", 2) in (b"", b"<reset>")
            assert door.drops["busy"] == 1
            for r, w in idle:  # the silent ones are closed at the deadline
                async with asyncio.timeout(3):
                    assert await r.read(10) == b""
                w.close()
            assert door.drops["handshake_timeout"] == 2
            # Room again: a well-behaved client is served.
            assert await _talk(port, b"\x05\x01\x00" + b"\x05\x02\x00\x01" + bytes(6)) == (
                b"\x05\x00\x05\x07\x00\x01" + bytes(6)
            )
        finally:
            await door.close()

    asyncio.run(main())


def test_udp_dns_capture_maps_only_the_captured_replies_back() -> None:
    """A query to an outside resolver goes to the tunnel DNS server; only its reply (same
    server, same message id) comes back as from the address asked: a reply to a query the
    client sent to that server itself keeps its real source (a review finding)."""
    server = ipaddress.ip_address("10.150.0.53")

    class Flow:
        def __init__(self) -> None:
            self.sent: list[tuple[object, bytes]] = []

        def send(self, dst: object, payload: bytes) -> None:
            self.sent.append((dst, payload))

        def close(self) -> None:
            pass

    class Service:
        def route(self, proto: int, ip: Any, port: int) -> Route:
            if ip.is_loopback and port == 53:
                return Route(Way.TUNNEL, target=(server, 53))
            return Route(Way.TUNNEL)

        def open_udp(self, on_datagram: object) -> Flow:
            return Flow()

    class Door:
        service = Service()

        def drop(self, reason: str) -> None:
            raise AssertionError(reason)

    async def main() -> list[tuple[str, int, bytes]]:
        a = socks5._Association(Door(), ipaddress.ip_address("127.0.0.1"), 5555, "127.0.0.1")  # type: ignore[arg-type]
        got: list[tuple[str, int, bytes]] = []
        a._to_client = lambda ip, port, p: got.append((str(ip), port, p))  # type: ignore[method-assign]
        a._send(ipaddress.ip_address("127.0.0.53"), 53, b"\x00\x01q")  # captured
        a._send(server, 53, b"\x00\x02q")  # asked directly
        assert a.flow is not None and [d for d, _ in a.flow.sent] == [(server, 53)] * 2  # type: ignore[attr-defined]
        a._from_tunnel((server, 53), b"\x00\x02direct")
        a._from_tunnel((server, 53), b"\x00\x01captured")
        a._from_tunnel((server, 53), b"\x00\x01again")  # answered once: the next is as it is
        a.close()
        return got

    assert asyncio.run(main()) == [
        ("10.150.0.53", 53, b"\x00\x02direct"),
        ("127.0.0.53", 53, b"\x00\x01captured"),
        ("10.150.0.53", 53, b"\x00\x01again"),
    ]
