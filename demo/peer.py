"""An embedded WireGuard peer with a tiny HTTP server, for `make demo`, tests and benchmarks.

It is the product's own engine (`wrapguard.runtime.engine.Engine`: Device, UDP road, netstack)
with a responder config (its clients have no Endpoint; it learns theirs from their handshake
[W 6.5]), bound to 127.0.0.1, and one door: a tunnel listener on 10.150.0.1 / fd15::1 (through
the flow API, `TunnelService.listen`) whose connections are joined to an HTTP server on
loopback (h11). `GET /` names the client's tunnel address, `GET /bytes/N` streams N bytes
(byte i is i % 256), a request body is read and counted. One request per connection
(Connection: close). `python -m demo.peer` runs one standalone and prints a client config.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import os
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import h11

from wrapguard import log
from wrapguard.config import Config, InterfaceConfig, PeerConfig
from wrapguard.keys import PrivateKey, PublicKey
from wrapguard.routing import RoutingTable
from wrapguard.runtime.bypass import BypassList
from wrapguard.runtime.engine import Engine
from wrapguard.runtime.relay import TcpRelay
from wrapguard.runtime.service import TunnelService

TUNNEL_V4 = ipaddress.IPv4Interface("10.150.0.1/24")
TUNNEL_V6 = ipaddress.IPv6Interface("fd15::1/64")
MAX_HEADER = 16384
STREAM_PIECE = 65536  # bytes per write of a /bytes/N stream
_CHUNK = bytes(range(256)) * (STREAM_PIECE // 256 + 1)  # byte i is i % 256
MAX_BYTES = 1 << 40
_TEXT = b"text/plain"
_REASON = {200: b"OK", 400: b"Bad Request", 404: b"Not Found", 405: b"Method Not Allowed"}


@dataclass(frozen=True, slots=True)
class Visit:
    """One HTTP request the peer answered; `client` is the tunnel address it came from."""

    client: str
    client_port: int
    method: str
    path: str
    status: int
    request_bytes: int  # the request body's length
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


class _Session:
    """What the flow API needs of a session: the engine, a bypass list, the config."""

    def __init__(self, engine: Engine, config: Config) -> None:
        self.engine = engine
        self.config = config
        self.bypass = BypassList()

    def stats(self) -> dict[str, object]:
        return {"wireguard_udp": dict(self.engine.wg.stats)}


class EmbeddedPeer:
    """A responder WireGuard peer on `bind` (127.0.0.1) with HTTP on its tunnel addresses.

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
        peers = []
        for i, pub in enumerate(clients):
            v4, v6 = client_addresses(i)
            peers.append(PeerConfig(public_key=pub, allowed_ips=(v4.network, v6.network)))
        config = Config(
            InterfaceConfig(
                private_key=self.private_key,
                addresses=(TUNNEL_V4, TUNNEL_V6),
                mtu=mtu,
                listen_port=listen_port or None,
            ),
            tuple(peers),
            path="<demo peer>",
        )
        routing = RoutingTable([], [p.allowed_ips for p in peers])
        self.engine = Engine(config, routing, bind=(bind, None))
        self.service = TunnelService(_Session(self.engine, config))  # type: ignore[arg-type]
        self.visits: list[Visit] = []
        self._server: asyncio.Server | None = None
        self._stop_listening: Callable[[], None] | None = None
        self._clients: dict[int, tuple[str, int]] = {}  # loopback port -> tunnel client
        self._tasks: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------------ lifecycle

    @property
    def public_key(self) -> PublicKey:
        return self.private_key.public_key()

    @property
    def endpoint(self) -> tuple[str, int]:
        """Where clients send their handshake: (bind address, UDP port)."""
        return (self.bind, self.engine.wg.port)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        await self.engine.start()
        self._stop_listening = self.service.listen(self.http_port, self._accepted)

    def close(self) -> None:
        if self._stop_listening is not None:
            self._stop_listening()
            self._stop_listening = None
        for task in list(self._tasks):
            task.cancel()
        if self._server is not None:
            self._server.close()
            self._server = None
        self.engine.close()

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

    # ------------------------------------------------------------------ tunnel -> HTTP server

    def _accepted(self, relay: TcpRelay) -> None:
        task = asyncio.ensure_future(self._join(relay))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _join(self, relay: TcpRelay) -> None:
        remote = relay.remote()
        if remote is None or self._server is None:
            relay.abort()
            return
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        port = 0
        try:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
            self._clients[port] = remote
            server = self._server.sockets[0].getsockname()
            await asyncio.get_running_loop().sock_connect(sock, server)
        except BaseException as exc:  # OSError, or cancelled by close()
            self._clients.pop(port, None)
            sock.close()
            relay.abort()
            if not isinstance(exc, OSError):
                raise
            return
        relay.attach_socket(sock)

    # ------------------------------------------------------------------ HTTP (h11)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")  # None: reset before we got here
        client, client_port = self._clients.pop(peer[1], ("?", 0)) if peer else ("?", 0)
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER)
        request: h11.Request | None = None
        received = 0
        eof = False
        try:
            while True:
                try:
                    event = conn.next_event()
                except h11.RemoteProtocolError:
                    if request is None and not eof:
                        visit = Visit(client, client_port, "", "", 400, 0, 0)
                        await self._respond(writer, conn, visit, 400, b"bad request\n")
                    return  # a request cut short by the client's FIN: no answer
                if event is h11.NEED_DATA:
                    data = await reader.read(STREAM_PIECE)
                    eof = not data
                    conn.receive_data(data)
                elif isinstance(event, h11.Request):
                    request = event
                elif isinstance(event, h11.Data):
                    received += len(event.data)
                elif isinstance(event, h11.EndOfMessage) and request is not None:
                    method = request.method.decode("latin-1")
                    path = request.target.decode("latin-1")
                    visit = Visit(client, client_port, method, path, 0, received, 0)
                    await self._answer(writer, conn, visit)
                    return
                else:  # ConnectionClosed, PAUSED
                    return
        except (ConnectionError, h11.LocalProtocolError):
            return
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    async def _answer(self, writer: asyncio.StreamWriter, conn: h11.Connection, v: Visit) -> None:
        if v.method not in ("GET", "HEAD", "POST", "PUT"):
            await self._respond(writer, conn, v, 405, b"method not allowed\n")
        elif v.method in ("POST", "PUT"):
            await self._respond(
                writer, conn, v, 200, f"received {v.request_bytes} bytes\n".encode()
            )
        elif v.path == "/":
            await self._respond(writer, conn, v, 200, page(v.client, v.client_port), b"text/html")
        elif v.path.startswith("/bytes/") and v.path[7:].isdigit() and int(v.path[7:]) < MAX_BYTES:
            await self._respond(writer, conn, v, 200, b"", stream=int(v.path[7:]))
        else:
            await self._respond(writer, conn, v, 404, b"not found\n")

    async def _respond(
        self,
        writer: asyncio.StreamWriter,
        conn: h11.Connection,
        v: Visit,
        status: int,
        body: bytes,
        ctype: bytes = _TEXT,
        stream: int = 0,
    ) -> None:
        length = stream or len(body)
        headers = [
            (b"content-type", b"application/octet-stream" if stream else ctype),
            (b"content-length", str(length).encode()),
            (b"connection", b"close"),
            (b"server", b"wrapguard-demo-peer"),
        ]
        done = Visit(v.client, v.client_port, v.method, v.path, status, v.request_bytes, length)
        self.visits.append(done)
        if self.on_visit is not None:
            self.on_visit(done)
        writer.write(
            conn.send(
                h11.Response(status_code=status, headers=headers, reason=_REASON.get(status, b""))
            )
            or b""
        )
        if v.method != "HEAD":
            if body:
                writer.write(conn.send(h11.Data(data=body)) or b"")
            sent = 0
            while sent < stream:
                # Each piece starts at the stream's offset mod 256: the pattern stays continuous.
                off, want = sent & 255, min(stream - sent, STREAM_PIECE)
                writer.write(conn.send(h11.Data(data=_CHUNK[off : off + want])) or b"")
                sent += want
                await writer.drain()
        writer.write(conn.send(h11.EndOfMessage()) or b"")
        await writer.drain()


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
        prog="python -m demo.peer",
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
