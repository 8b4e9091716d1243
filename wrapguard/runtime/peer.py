"""An embedded WireGuard peer with a tiny HTTP server, for `make demo`, tests and benchmarks.

`EmbeddedPeer` joins our own cores on one asyncio loop: a `tunnel.Device` (responder: its
clients have no Endpoint, it learns theirs from their handshake [W 6.5]), a `WgUdpRuntime`
bound to 127.0.0.1 (ephemeral port) and a `netstack.Stack` at 10.150.0.1 / fd15::1 serving
HTTP/1.1 straight on the netstack: `GET /` names the client's tunnel address, `GET /bytes/N`
streams N bytes (byte i is i % 256), a request body (Content-Length) is read and discarded.
One request per connection (Connection: close). `python -m wrapguard.runtime.peer` runs one
standalone and prints a matching client config.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import os
import secrets
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from wrapguard import log
from wrapguard.keys import PrivateKey, PublicKey
from wrapguard.netstack.events import (
    Accepted,
    Closed,
    ConnId,
    Event,
    PeerClosed,
    Readable,
    Reset,
    Writable,
)
from wrapguard.netstack.stack import Stack
from wrapguard.runtime.timer import DeadlineTimer
from wrapguard.runtime.udp import WgUdpRuntime
from wrapguard.tunnel.device import Device
from wrapguard.tunnel.peer import PeerSpec

TUNNEL_V4 = ipaddress.IPv4Interface("10.150.0.1/24")
TUNNEL_V6 = ipaddress.IPv6Interface("fd15::1/64")
MAX_HEADER = 16384
STREAM_PIECE = 65536  # bytes per send() of a /bytes/N stream
_CHUNK_VIEW = memoryview(bytes(range(256)) * (STREAM_PIECE // 256 + 1))  # byte i is i % 256
MAX_BYTES = 1 << 40


@dataclass(frozen=True, slots=True)
class Visit:
    """One HTTP request the peer answered; `client` is the tunnel address it came from."""

    client: str
    client_port: int
    method: str
    path: str
    status: int  # 0 until answered
    request_bytes: int  # the request body's Content-Length
    response_bytes: int  # the response body's length (Content-Length)


def client_addresses(index: int) -> tuple[ipaddress.IPv4Interface, ipaddress.IPv6Interface]:
    """The tunnel addresses of client `index` (0 -> 10.150.0.2 and fd15::2)."""
    if not 0 <= index < 250:
        raise ValueError("client index must be in 0..249")
    return (
        ipaddress.IPv4Interface(f"{TUNNEL_V4.ip + 1 + index}/32"),
        ipaddress.IPv6Interface(f"{TUNNEL_V6.ip + 1 + index}/128"),
    )


def page(client: str, port: int) -> bytes:
    """The HTML of `GET /`."""
    return (
        "<!doctype html>\n<html><head><title>wrapguard demo peer</title></head><body>\n"
        "<h1>Hello through WireGuard!</h1>\n"
        f"<p>Served by the wrapguard demo peer at {TUNNEL_V4.ip} over its userspace TCP.</p>\n"
        f"<p>You are {client} (port {port}).</p>\n"
        "</body></html>\n"
    ).encode()


class _Http:
    """One HTTP connection: read a request (and its body), write one response, close."""

    __slots__ = (
        "body_left",
        "cid",
        "head",
        "out",
        "out_off",
        "stream_left",
        "stream_sent",
        "visit",
    )

    def __init__(self, cid: ConnId) -> None:
        self.cid = cid
        self.head = bytearray()
        self.body_left = -1  # -1 while the header is incomplete
        self.out = b""  # the response header (and a small body) still to send
        self.out_off = 0
        self.stream_left = 0  # /bytes/N bytes still to send after `out`
        self.stream_sent = 0
        self.visit: Visit | None = None


class EmbeddedPeer:
    """A responder WireGuard peer on 127.0.0.1 with an HTTP server on its tunnel address.

    `clients` are the public keys allowed in; client i owns `client_addresses(i)`. Use
    `async with EmbeddedPeer(...)` or `await start()` / `close()` on the running loop.
    """

    def __init__(
        self,
        private_key: PrivateKey | None = None,
        clients: Sequence[PublicKey] = (),
        *,
        bind: str = "127.0.0.1",
        listen_port: int = 0,
        http_port: int = 80,
        mtu: int = 1420,
        on_visit: Callable[[Visit], None] | None = None,
    ) -> None:
        self.private_key = private_key or PrivateKey.generate()
        self.bind = bind
        self.http_port = http_port
        self.on_visit = on_visit
        specs = []
        self._peer_of: dict[bytes, int] = {}  # client tunnel address (packed) -> peer index
        for i, pub in enumerate(clients):
            v4, v6 = client_addresses(i)
            specs.append(PeerSpec(public_key=pub, allowed_ips=(v4.network, v6.network)))
            self._peer_of[v4.ip.packed] = self._peer_of[v6.ip.packed] = i
        self.device = Device(self.private_key, specs, rng=secrets.token_bytes, mtu=mtu)
        self.stack = Stack([TUNNEL_V4.ip, TUNNEL_V6.ip], rng=secrets.randbits, mtu=mtu)
        self.wg = WgUdpRuntime(
            self.device,
            listen_port=listen_port,
            on_packet=self._from_tunnel,
            bind_v4=bind,
            bind_v6=None,
        )
        self.visits: list[Visit] = []
        self._conns: dict[int, _Http] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._flush_scheduled = False
        self._timer: DeadlineTimer | None = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def public_key(self) -> PublicKey:
        return self.private_key.public_key()

    @property
    def endpoint(self) -> tuple[str, int]:
        """Where clients send their handshake: (bind address, UDP port)."""
        return (self.bind, self.wg.port)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._timer = DeadlineTimer(self._loop, self._on_timer)
        self.stack.listen(self.http_port)
        await self.wg.start()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.wg.close()
        self._loop = None

    async def __aenter__(self) -> EmbeddedPeer:
        await self.start()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        self.close()

    def client_config(self, client_key: PrivateKey, index: int = 0) -> str:
        """A wg-quick config for client `index` that reaches this peer (call after start)."""
        v4, v6 = client_addresses(index)
        host, port = self.endpoint
        return (
            "[Interface]\n"
            f"PrivateKey = {client_key.to_base64()}\n"
            f"Address = {v4.ip}/{TUNNEL_V4.network.prefixlen}, "
            f"{v6.ip}/{TUNNEL_V6.network.prefixlen}\n"
            "\n[Peer]\n"
            f"PublicKey = {self.public_key.to_base64()}\n"
            f"Endpoint = {host}:{port}\n"
            f"AllowedIPs = {TUNNEL_V4.network}, {TUNNEL_V6.network}\n"
        )

    # ------------------------------------------------------------------ data path

    def _now(self) -> float:
        assert self._loop is not None
        return self._loop.time()

    def _from_tunnel(self, _peer: int, packet: bytes) -> None:
        if self._loop is None:
            return
        self.stack.receive_packet(packet, self._loop.time())
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._loop is None:
            return
        stack, send, peer_of = self.stack, self.wg.send_packet, self._peer_of
        for _ in range(64):  # events make packets and packets make events: bounded rounds
            event = stack.next_event()
            while event is not None:
                self._on_event(event)
                event = stack.next_event()
            out = stack.take_outgoing()
            if not out:
                break
            for pkt in out:
                # Our clients' addresses are known: skip the AllowedIPs lookup per packet.
                dst = pkt[16:20] if pkt[0] >> 4 == 4 else pkt[24:40]
                send(pkt, peer_of.get(dst))
        self._rearm()

    def _rearm(self) -> None:
        assert self._timer is not None
        self._timer.arm(self.stack.next_deadline())

    def _on_timer(self) -> None:
        if self._loop is None:
            return
        self.stack.handle_timeout(self._loop.time())
        self._flush()

    # ------------------------------------------------------------------ HTTP

    def _on_event(self, event: Event) -> None:
        if isinstance(event, Writable):
            if (c := self._conns.get(event.conn)) is not None:
                self._write(c)
        elif isinstance(event, Readable):
            if (c := self._conns.get(event.conn)) is not None:
                self._read(c)
        elif isinstance(event, Accepted):
            self._conns[event.conn] = _Http(event.conn)
        elif isinstance(event, PeerClosed):
            if (c := self._conns.get(event.conn)) is not None:
                self._read(c)  # whatever came with the FIN
                if not c.out and c.cid in self._conns:
                    # The client stopped sending before its request was complete.
                    del self._conns[c.cid]
                    self.stack.close(c.cid, self._now())
        elif isinstance(event, (Closed, Reset)):
            self._conns.pop(event.conn, None)

    def _read(self, c: _Http) -> None:
        data = self.stack.recv(c.cid)
        if c.body_left < 0:
            c.head += data
            end = c.head.find(b"\r\n\r\n")
            if end < 0:
                if len(c.head) > MAX_HEADER:
                    self._respond(c, "", "", 431, b"request header too large\n")
                return
            extra = len(c.head) - end - 4
            self._request(c, bytes(c.head[:end]), extra)
        else:
            c.body_left -= len(data)
            if c.body_left <= 0 and c.visit is not None and not c.out:
                self._finish_body(c)

    def _request(self, c: _Http, head: bytes, extra: int) -> None:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            self._respond(c, "", "", 400, b"bad request\n")
            return
        method, path = parts[0], parts[1]
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                try:
                    length = int(value.strip())
                except ValueError:
                    self._respond(c, method, path, 400, b"bad content-length\n")
                    return
        c.body_left = length - extra
        info = self.stack.conn_info(c.cid)
        # Remember the request until its body is in; then answer.
        c.visit = Visit(str(info.remote[0]), info.remote[1], method, path, 0, max(length, 0), 0)
        if c.body_left <= 0:
            self._finish_body(c)

    def _finish_body(self, c: _Http) -> None:
        v = c.visit
        assert v is not None
        if v.method not in ("GET", "HEAD", "POST", "PUT"):
            self._respond(c, v.method, v.path, 405, b"method not allowed\n")
        elif v.method in ("POST", "PUT"):
            self._respond(c, v.method, v.path, 200, f"received {v.request_bytes} bytes\n".encode())
        elif v.path == "/":
            self._respond(c, v.method, v.path, 200, page(v.client, v.client_port), "text/html")
        elif v.path.startswith("/bytes/") and v.path[7:].isdigit() and int(v.path[7:]) < MAX_BYTES:
            self._respond(c, v.method, v.path, 200, b"", stream=int(v.path[7:]))
        else:
            self._respond(c, v.method, v.path, 404, b"not found\n")

    def _respond(
        self,
        c: _Http,
        method: str,
        path: str,
        status: int,
        body: bytes,
        ctype: str = "text/plain",
        stream: int = 0,
    ) -> None:
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}
        length = stream or len(body)
        if stream:
            ctype = "application/octet-stream"
        head = (
            f"HTTP/1.1 {status} {reason.get(status, 'Error')}\r\n"
            f"Content-Type: {ctype}\r\nContent-Length: {length}\r\n"
            "Connection: close\r\nServer: wrapguard-demo-peer\r\n\r\n"
        ).encode()
        if method == "HEAD":
            body, stream = b"", 0
        c.out = head + body
        c.out_off = 0
        c.stream_left = stream
        v = c.visit
        if v is None:  # answered before the request line made sense
            info = self.stack.conn_info(c.cid)
            v = Visit(str(info.remote[0]), info.remote[1], method, path, status, 0, 0)
        c.visit = Visit(v.client, v.client_port, v.method, v.path, status, v.request_bytes, length)
        self.visits.append(c.visit)
        if self.on_visit is not None:
            self.on_visit(c.visit)
        c.body_left = max(c.body_left, 0)
        self._write(c)

    def _write(self, c: _Http) -> None:
        stack, now, cid = self.stack, self._now(), c.cid
        if c.out_off < len(c.out):
            c.out_off += stack.send(cid, memoryview(c.out)[c.out_off :], now)
            if c.out_off < len(c.out):
                return  # Writable follows
        view = _CHUNK_VIEW
        while c.stream_left:
            # Start each piece at the stream's offset mod 256 so the pattern stays continuous.
            off = c.stream_sent & 255
            want = min(c.stream_left, STREAM_PIECE)
            n = stack.send(cid, view[off : off + want], now)
            c.stream_left -= n
            c.stream_sent += n
            if n < want:
                return  # Writable follows
        c.out = b""
        del self._conns[cid]  # nothing more to do for it; `Closed` follows
        stack.close(cid, now)


# ---------------------------------------------------------------------- command line


async def _serve(args: argparse.Namespace) -> None:
    client = PrivateKey.generate()
    peer = EmbeddedPeer(
        clients=[client.public_key()],
        bind=args.bind,
        listen_port=args.port,
        http_port=args.http_port,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await peer.start()
    try:
        text = peer.client_config(client)
        if args.config_out:
            fd = os.open(args.config_out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(text)
        else:
            sys.stdout.write(text)
            sys.stdout.flush()
        host, port = peer.endpoint
        print(
            f"peer up at {host}:{port}, HTTP on {TUNNEL_V4.ip}:{args.http_port} "
            f"and [{TUNNEL_V6.ip}]:{args.http_port}; Ctrl-C stops it",
            file=sys.stderr,
            flush=True,
        )
        await stop.wait()
    finally:
        peer.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m wrapguard.runtime.peer",
        description="Run an embedded WireGuard peer with an HTTP server on 10.150.0.1 and "
        "print a client config for it (a fresh key pair per run).",
    )
    parser.add_argument("--bind", default="127.0.0.1", help="UDP address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="UDP port (default: any free one)")
    parser.add_argument("--http-port", type=int, default=80, help="HTTP port in the tunnel")
    parser.add_argument(
        "--config-out", metavar="PATH", help="write the client config here (0600), not stdout"
    )
    parser.add_argument(
        "--log-level", default="warn", choices=sorted(log.LEVELS), help="default warn"
    )
    args = parser.parse_args(argv)
    log.setup(args.log_level)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
