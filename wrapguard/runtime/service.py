"""The engine as a service: the narrow flow API every door builds on (architecture.md,
"Where it grows"; issue 12).

A door (the SOCKS5 and HTTP proxies, the control socket, later the seccomp and TUN doors)
never touches the netstack or schedules a flush: it asks `TunnelService` to decide a route
(policy routes, AllowedIPs and the bypass list), to open a TCP flow (a `TcpRelay` the door
then joins to its own socket), to open a UDP flow, to resolve a name through the tunnel DNS,
and reports itself for `/state`. Every call that queues packets flushes by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

from wrapguard import log
from wrapguard.netstack.events import DatagramReceived, Event, SockId, UdpError
from wrapguard.runtime.bypass import BypassList
from wrapguard.runtime.relay import TcpRelay

if TYPE_CHECKING:
    from wrapguard.runtime.engine import Engine
    from wrapguard.runtime.launcher import TunnelSession

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
TCP, UDP = 6, 17
DNS_PORT = 53


class Way(Enum):
    """Where a destination goes."""

    TUNNEL = "tunnel"
    DIRECT = "direct"  # not routed into the tunnel, bypassed, or loopback: the host network
    FAIL = "fail"  # routed into the tunnel but impossible (no address of that family, port 0)


@dataclass(frozen=True, slots=True)
class Route:
    way: Way
    errno: int = 0
    peer: int | None = None  # the peer's index when TUNNEL


def plain(ip: IPAddress) -> IPAddress:
    """An IPv4-mapped IPv6 address as the IPv4 address it stands for."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


@dataclass
class FrontEnd:
    """A door, as /state shows it."""

    kind: str  # "preload", "socks5", "http"
    address: str = ""  # where it listens, if it does
    auth: bool = False
    flows: int = 0  # flows opened through it so far
    extra: dict[str, Any] = field(default_factory=dict)


class UdpFlow:
    """One netstack UDP socket for a door: `send()` datagrams into the tunnel; the handler
    gets `(source, payload)` for each datagram back and `(destination, errno)` for ICMP
    errors. `close()` when done."""

    def __init__(
        self,
        service: TunnelService,
        on_datagram: Callable[[tuple[IPAddress, int], bytes], None],
        on_error: Callable[[tuple[IPAddress, int], int], None] | None = None,
        port: int = 0,
    ) -> None:
        self._service = service
        self._engine: Engine = service.engine
        self._on_datagram = on_datagram
        self._on_error = on_error
        self.sock: SockId = self._engine.stack.udp_bind(port)
        self._engine.handlers[self.sock] = self
        self.closed = False

    @property
    def port(self) -> int:
        return int(self._engine.stack.udp_port(self.sock))

    def send(self, dst: tuple[IPAddress, int], payload: bytes) -> None:
        """Into the tunnel (the caller decided the route). Raises OSError (EMSGSIZE, no
        address of dst's family)."""
        engine = self._engine
        engine.stack.udp_send(self.sock, (plain(dst[0]), dst[1]), payload, engine.now())
        engine.schedule_flush()

    def on_event(self, event: Event) -> None:
        if isinstance(event, DatagramReceived):
            self._on_datagram(event.src, event.data)
        elif isinstance(event, UdpError) and self._on_error is not None:
            self._on_error(event.dst, event.errno)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._engine.handlers.pop(self.sock, None)
            self._engine.stack.udp_close(self.sock)


class TunnelService:
    """The flow API over one running TunnelSession (runtime/launcher.py)."""

    def __init__(self, session: TunnelSession) -> None:
        self.session = session
        self.engine = session.engine
        self.bypass: BypassList = session.bypass
        self.frontends: list[FrontEnd] = []
        self.started = time.time()
        self.log = log.get("wrapguard.service")

    # -- routing -------------------------------------------------------------------------------

    def route(self, proto: int, ip: IPAddress, port: int) -> Route:
        """The one routing decision every door uses: loopback and bypassed destinations go
        direct; then policy routes and AllowedIPs (routing.py); unrouted goes direct."""
        ip = plain(ip)
        if ip.is_loopback or ip.is_unspecified or self.bypass.contains(ip):
            return Route(Way.DIRECT)
        peer = self.engine.route(ip, proto, port)
        if peer is None:
            return Route(Way.DIRECT)
        if port == 0 and proto == TCP:
            return Route(Way.FAIL, errno.ECONNREFUSED)
        if not any(a.version == ip.version for a in self.engine.addresses):
            return Route(Way.FAIL, errno.ENETUNREACH)
        return Route(Way.TUNNEL, peer=peer)

    # -- flows ---------------------------------------------------------------------------------

    def open_tcp(
        self, ip: IPAddress, port: int, on_done: Callable[[TcpRelay], None] | None = None
    ) -> tuple[TcpRelay, asyncio.Future[int]]:
        """Connect through the tunnel. The future gives 0 once open, or the errno of the
        failure (ECONNREFUSED, ETIMEDOUT, EHOSTUNREACH); the door then joins its socket with
        `relay.attach_socket(sock, initial)` (or lets the relay go on failure)."""
        loop = asyncio.get_running_loop()
        outcome: asyncio.Future[int] = loop.create_future()

        def on_status(status: int) -> None:
            if not outcome.done():
                outcome.set_result(status)

        def done(relay: TcpRelay) -> None:
            if not outcome.done():
                outcome.set_result(relay.status or errno.ECONNRESET)
            if on_done is not None:
                on_done(relay)

        relay = TcpRelay(self.engine, on_status=on_status, on_done=done)
        cid = self.engine.connect(plain(ip), port, relay)
        relay.attach_conn(cid)
        return relay, outcome

    def tcp_local(self, relay: TcpRelay) -> tuple[IPAddress, int]:
        """Our tunnel address and port of an open_tcp() flow (what getsockname reports)."""
        assert relay.cid is not None
        local = self.engine.stack.conn_info(relay.cid).local
        return local[0], local[1]

    def tunnel_address(self, version: int) -> IPAddress | None:
        """Our first tunnel address of that IP version, if the config has one."""
        return next((a for a in self.engine.addresses if a.version == version), None)

    def dns_redirect(self, proto: int, ip: IPAddress, port: int) -> tuple[IPAddress, int] | None:
        """Where a DNS query the program sends itself really goes: with DNS= set, port 53 of
        an address outside the tunnel (the host's resolv.conf servers) is answered by the
        first tunnel DNS server (as the preload door does, docs/channel.md "DNS"). None: as
        asked. Check it before route(): such a query must never reach the host resolver."""
        return self.session.backend.dns_target(plain(ip), port, proto)

    def dns_captured(self, proto: int, ip: IPAddress, port: int) -> bool:
        """A port-53 query outside the tunnel with DNS= set (even when no tunnel DNS server
        of a usable family exists: then it fails, never the host)."""
        return self.session.backend.dns_captured(plain(ip), port, proto)

    def listen_tcp(self, ip: IPAddress, port: int, v6only: bool = False) -> None:
        """A program listens on `port` (on `ip`: the wildcard or a tunnel address, and its
        loopback socket is there to be reached): tunnel connections to it are relayed to
        that loopback port, as the preload door does (TunnelBackend.listen)."""
        from wrapguard.wire.ipc import Address, Proto

        self.session.backend.listen(Proto.TCP, Address(ip, port), v6only)

    def inbound_peer(
        self, loopback: tuple[str, int]
    ) -> tuple[tuple[IPAddress, int], tuple[IPAddress, int]] | None:
        """For a connection the launcher made to a program's listener from `loopback`: the
        tunnel client it carries and our tunnel address it reached (accept()'s view)."""
        from wrapguard.wire.ipc import Address

        backend = self.session.backend
        addr = Address(ipaddress.ip_address(loopback[0]), loopback[1])
        remote, local = backend.peer_of(addr), backend.local_of(addr)
        if remote is None or local is None:
            return None
        return (remote.ip, remote.port), (local.ip, local.port)

    def open_udp(
        self,
        on_datagram: Callable[[tuple[IPAddress, int], bytes], None],
        on_error: Callable[[tuple[IPAddress, int], int], None] | None = None,
        port: int = 0,
    ) -> UdpFlow:
        """A UDP socket in the tunnel: on `port` of our tunnel addresses (a program's server
        reachable from the peer), or an ephemeral one. Raises OSError (EADDRINUSE)."""
        return UdpFlow(self, on_datagram, on_error, port)

    async def resolve(self, name: str, family: int = 0) -> list[IPAddress]:
        """Through the tunnel DNS (DNS=), /etc/hosts first; without DNS=, the host resolver
        (off the loop). Raises OSError(ENOENT-like) with a message when nothing is found."""
        resolver = self.session.backend.resolver
        if resolver is not None:
            from wrapguard.runtime.dns import ResolveError

            try:
                addrs, _ = await resolver.resolve(name, family)
            except ResolveError as exc:
                raise OSError(errno.EHOSTUNREACH, f"{name}: not found (EAI {exc.eai})") from None
            return list(addrs)
        import socket

        fam = {4: socket.AF_INET, 6: socket.AF_INET6}.get(family, socket.AF_UNSPEC)
        infos = await asyncio.get_running_loop().getaddrinfo(name, None, family=fam)
        out: list[IPAddress] = []
        for info in infos:
            ip = ipaddress.ip_address(info[4][0])
            if ip not in out:
                out.append(ip)
        if not out:
            raise OSError(errno.EHOSTUNREACH, f"{name}: not found")
        return out

    @property
    def resolves_in_tunnel(self) -> bool:
        return self.session.backend.resolver is not None

    def add_frontend(self, frontend: FrontEnd) -> FrontEnd:
        self.frontends.append(frontend)
        return frontend

    # -- state -----------------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """What /state and `wrapguard show` report."""
        engine = self.engine
        config = self.session.config
        iface = config.interface
        peers = []
        for i, p in enumerate(config.peers):
            dev = engine.device.peers[i]
            ep = dev.endpoint
            peers.append(
                {
                    "public_key": p.public_key.to_base64(),
                    "endpoint": None if ep is None else _hostport(ep[0], ep[1]),
                    "configured_endpoint": None
                    if p.endpoint is None
                    else _hostport(p.endpoint.host, p.endpoint.port),
                    "allowed_ips": [str(n) for n in p.allowed_ips],
                    "latest_handshake": _wall(dev.last_handshake_wall),
                    "rx_bytes": dev.rx_bytes,
                    "tx_bytes": dev.tx_bytes,
                    "persistent_keepalive": p.persistent_keepalive or 0,
                    "transport": "udp",
                }
            )
        tcp = sum(1 for h in list(engine.handlers.values()) if isinstance(h, TcpRelay))
        udp = sum(1 for h in list(engine.handlers.values()) if not isinstance(h, TcpRelay))
        return {
            "interface": {
                "public_key": iface.private_key.public_key().to_base64(),
                "addresses": [str(a) for a in iface.addresses],
                "listen_port": engine.wg.port,
                "mtu": iface.mtu,
                "dns": [str(d) for d in iface.dns_servers],
            },
            "peers": peers,
            "flows": {"tcp": tcp, "udp": udp},
            "frontends": [
                {"kind": f.kind, "address": f.address, "auth": f.auth, "flows": f.flows, **f.extra}
                for f in self.frontends
            ],
            "bypass": self.bypass.entries(),
            "counters": self.session.stats(),
            "uptime_s": round(time.time() - self.started, 1),
        }


def _hostport(host: object, port: int) -> str:
    text = str(host)
    return f"[{text}]:{port}" if ":" in text else f"{text}:{port}"


def _wall(t: float | None) -> float | None:
    return None if not t else round(t, 3)


def close_quietly(closers: Sequence[Callable[[], object]]) -> None:
    for close in closers:
        with contextlib.suppress(Exception):
            close()


__all__ = ["FrontEnd", "Route", "TunnelService", "UdpFlow", "Way", "plain"]
