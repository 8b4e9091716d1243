"""The embedded peer (demo/peer.py) answers HTTP through the tunnel.

The client is built from our own cores (Device + Stack + WgUdpRuntime on 127.0.0.1, as the
launcher's engine joins them) and talks to the peer over loopback UDP: a handshake, a TCP
connection through the tunnel, HTTP. Only loopback traffic: no namespace needed.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from demo.peer import EmbeddedPeer, Visit, client_addresses
from wrapguard.config import parse_config
from wrapguard.keys import PrivateKey
from wrapguard.netstack.events import Closed, Connected, ConnectFailed, PeerClosed, Readable, Reset
from wrapguard.netstack.stack import Stack
from wrapguard.runtime.udp import WgUdpRuntime
from wrapguard.tunnel.device import Device
from wrapguard.tunnel.peer import PeerSpec

pytestmark = pytest.mark.timeout(60)


class Client:
    """A tunnel client from our cores, driven by hand: one HTTP exchange per `fetch`."""

    def __init__(self, key: PrivateKey, peer: EmbeddedPeer, index: int = 0) -> None:
        v4, v6 = client_addresses(index)
        spec = PeerSpec(
            public_key=peer.public_key,
            endpoint=peer.endpoint,
            allowed_ips=("10.150.0.0/24", "fd15::/64"),
        )
        self.device = Device(key, [spec], rng=secrets.token_bytes)
        self.stack = Stack([v4.ip, v6.ip], rng=secrets.randbits)
        self.wg = WgUdpRuntime(self.device, on_packet=self._rx, bind_v4="127.0.0.1", bind_v6=None)
        self.loop = asyncio.get_running_loop()
        self.wake = asyncio.Event()
        self.timer: asyncio.TimerHandle | None = None

    def _rx(self, _peer: int, pkt: bytes) -> None:
        self.stack.receive_packet(pkt, self.loop.time())
        self.wake.set()

    def pump(self) -> None:
        for pkt in self.stack.take_outgoing():
            self.wg.send_packet(pkt)
        if self.timer is not None:
            self.timer.cancel()
        d = self.stack.next_deadline()
        if d is not None:
            self.timer = self.loop.call_at(d, self._timeout)

    def _timeout(self) -> None:
        self.stack.handle_timeout(self.loop.time())
        self.wake.set()

    async def fetch(
        self, request: bytes, dst: str = "10.150.0.1", port: int = 80, half_close: bool = False
    ) -> bytes:
        cid = self.stack.connect(ipaddress.ip_address(dst), port, self.loop.time())
        got = bytearray()
        while True:
            self.pump()
            await self.wake.wait()
            self.wake.clear()
            while (ev := self.stack.next_event()) is not None:
                if isinstance(ev, Connected):
                    self.stack.send(cid, request, self.loop.time())
                    if half_close:
                        self.stack.shutdown_write(cid, self.loop.time())
                elif isinstance(ev, Readable):
                    got += self.stack.recv(cid)
                elif isinstance(ev, PeerClosed):
                    got += self.stack.recv(cid)
                    self.stack.close(cid, self.loop.time())
                elif isinstance(ev, (ConnectFailed, Reset)):
                    raise ConnectionError(f"errno {ev.errno}")
                elif isinstance(ev, Closed):
                    self.pump()
                    return bytes(got)


def split(response: bytes) -> tuple[str, dict[str, str], bytes]:
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    fields = dict(line.split(": ", 1) for line in lines[1:])
    return lines[0], {k.lower(): v for k, v in fields.items()}, body


async def _with_peer(body, clients: int = 1):  # type: ignore[no-untyped-def]
    keys = [PrivateKey.generate() for _ in range(clients)]
    visits: list[Visit] = []
    async with EmbeddedPeer(clients=[k.public_key() for k in keys], on_visit=visits.append) as p:
        assert p.endpoint[0] == "127.0.0.1" and p.endpoint[1] > 0
        made = [Client(k, p, i) for i, k in enumerate(keys)]
        for c in made:
            await c.wg.start()
        try:
            return await body(p, made, visits)
        finally:
            for c in made:
                c.wg.close()


def test_page_names_the_client_tunnel_address() -> None:
    async def body(peer, clients, visits):  # type: ignore[no-untyped-def]
        resp = await clients[0].fetch(b"GET / HTTP/1.1\r\nHost: 10.150.0.1\r\n\r\n")
        status, fields, html = split(resp)
        assert status == "HTTP/1.1 200 OK"
        assert fields["content-type"] == "text/html"
        assert int(fields["content-length"]) == len(html)
        assert b"You are 10.150.0.2 (port " in html
        assert [(v.client, v.method, v.path, v.status) for v in visits] == [
            ("10.150.0.2", "GET", "/", 200)
        ]
        assert peer.visits == visits

    asyncio.run(_with_peer(body))


def test_bytes_stream_is_exact_and_two_clients_are_told_apart() -> None:
    n = 3_000_003  # several times the send buffer: exercises Writable and the pattern's offset

    async def body(peer, clients, visits):  # type: ignore[no-untyped-def]
        resp = await clients[1].fetch(f"GET /bytes/{n} HTTP/1.1\r\nHost: peer\r\n\r\n".encode())
        status, fields, data = split(resp)
        assert status == "HTTP/1.1 200 OK"
        assert int(fields["content-length"]) == n
        expected = (bytes(range(256)) * (n // 256 + 1))[:n]
        assert hashlib.sha256(data).hexdigest() == hashlib.sha256(expected).hexdigest()
        html = split(await clients[0].fetch(b"GET / HTTP/1.1\r\nHost: peer\r\n\r\n"))[2]
        assert b"You are 10.150.0.2 " in html
        html6 = split(
            await clients[1].fetch(b"GET / HTTP/1.1\r\nHost: peer\r\n\r\n", dst="fd15::1")
        )[2]
        assert b"You are fd15::3 " in html6
        assert [v.client for v in visits] == ["10.150.0.3", "10.150.0.2", "fd15::3"]

    asyncio.run(_with_peer(body, clients=2))


def test_upload_body_is_counted_and_errors_are_answered() -> None:
    async def body(peer, clients, visits):  # type: ignore[no-untyped-def]
        c = clients[0]
        payload = b"x" * 200_000
        req = (
            f"POST /sink HTTP/1.1\r\nHost: peer\r\nContent-Length: {len(payload)}\r\n\r\n".encode()
        )
        status, _, text = split(await c.fetch(req + payload))
        assert (status, text) == ("HTTP/1.1 200 OK", b"received 200000 bytes\n")
        assert (
            split(await c.fetch(b"GET /nope HTTP/1.1\r\nHost: peer\r\n\r\n"))[0]
            == "HTTP/1.1 404 Not Found"
        )
        assert split(await c.fetch(b"garbage\r\n\r\n"))[0] == "HTTP/1.1 400 Bad Request"
        status, fields, empty = split(
            await c.fetch(b"HEAD /bytes/10 HTTP/1.1\r\nHost: peer\r\n\r\n")
        )
        assert (status, fields["content-length"], empty) == ("HTTP/1.1 200 OK", "10", b"")
        # A client that gives up mid-request (FIN) is closed without an answer...
        assert await c.fetch(b"GET / HTTP/1.1\r\nHost:", half_close=True) == b""
        # ...while a complete request followed by a FIN is still answered.
        done = await c.fetch(b"GET / HTTP/1.1\r\nHost: peer\r\n\r\n", half_close=True)
        assert split(done)[0] == "HTTP/1.1 200 OK"
        assert [(v.path, v.status, v.request_bytes, v.response_bytes) for v in visits] == [
            ("/sink", 200, 200_000, len(b"received 200000 bytes\n")),
            ("/nope", 404, 0, 10),
            ("", 400, 0, 12),
            ("/bytes/10", 200, 0, 10),
            ("/", 200, 0, len(done) - done.index(b"\r\n\r\n") - 4),
        ]

    asyncio.run(_with_peer(body))


def test_unknown_key_gets_no_answer() -> None:
    async def body(peer, clients, visits):  # type: ignore[no-untyped-def]
        stranger = Client(PrivateKey.generate(), peer)
        await stranger.wg.start()
        try:
            stranger.stack.connect(ipaddress.ip_address("10.150.0.1"), 80, stranger.loop.time())
            stranger.pump()
            await asyncio.sleep(0.5)
            assert stranger.device.peers[0].current is None  # no session: handshake ignored
            assert stranger.wg.stats["rx_datagrams"] == 0
            assert visits == []
        finally:
            stranger.wg.close()

    asyncio.run(_with_peer(body))


def test_config_is_accepted_by_our_parser() -> None:
    async def body(peer, clients, visits):  # type: ignore[no-untyped-def]
        key = PrivateKey.generate()
        cfg = parse_config(peer.client_config(key), "demo.conf")
        assert [str(a) for a in cfg.interface.addresses] == ["10.150.0.2/24", "fd15::2/64"]
        (p,) = cfg.peers
        assert p.public_key == peer.public_key
        assert (p.endpoint.host, p.endpoint.port) == peer.endpoint  # type: ignore[union-attr]
        assert [str(n) for n in p.allowed_ips] == ["10.150.0.0/24", "fd15::/64"]

    asyncio.run(_with_peer(body))


def test_cli_prints_a_config_and_stops_on_sigterm(tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "c.conf"
    proc = subprocess.Popen(
        [sys.executable, "-m", "demo.peer", "--config-out", str(out)],
        cwd=Path(__file__).resolve().parents[2],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        assert line.startswith("peer up at 127.0.0.1:"), line
        assert out.stat().st_mode & 0o777 == 0o600
        cfg = parse_config(out.read_text())
        assert cfg.peers[0].endpoint is not None
        assert str(cfg.peers[0].endpoint.port) in line
        proc.terminate()
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.root
def test_real_launcher_downloads_exact_bytes(make_netns, tmp_path) -> None:  # type: ignore[no-untyped-def]
    # The wrapped curl targets 10.150.0.1: in a namespace with only lo, a leak fails.
    ns = make_netns("peer")
    conf, out = tmp_path / "c.conf", tmp_path / "out.bin"
    peer = ns.python_popen(
        ["-m", "demo.peer", "--config-out", str(conf)],
        stderr=subprocess.PIPE,
        text=True,
    )
    assert peer.stderr is not None
    assert peer.stderr.readline().startswith("peer up at 127.0.0.1:")
    n = 2_000_000
    curl = ["curl", "-sS", "--max-time", "30", "-o", str(out), f"http://10.150.0.1/bytes/{n}"]
    r = ns.python(
        ["-m", "wrapguard", "--config", str(conf), "--log-level", "warn", "--", *curl],
        check=False,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    expected = (bytes(range(256)) * (n // 256 + 1))[:n]
    assert out.read_bytes() == expected
    peer.terminate()
    assert peer.wait(timeout=10) == 0
