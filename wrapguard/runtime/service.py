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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

from wrapguard import log
from wrapguard.netstack.events import ConnId, DatagramReceived, Event, SockId, UdpError
from wrapguard.runtime.bypass import BypassList
from wrapguard.runtime.relay import TcpRelay

if TYPE_CHECKING:
    from wrapguard.config import Config
    from wrapguard.roads.stream import StreamRoad
    from wrapguard.runtime.dns import DnsResolver
    from wrapguard.runtime.engine import Engine
    from wrapguard.runtime.launcher import TunnelSession
    from wrapguard.tunnel.device import Device

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
TCP, UDP = 6, 17
DNS_PORT = 53
DNS_ASKED_LOGGED = 64  # outside resolvers named in the log (a proxy client may try millions)


class Way(Enum):
    """Where a destination goes."""

    TUNNEL = "tunnel"
    DIRECT = "direct"  # not routed into the tunnel, bypassed, or loopback: the host network
    FAIL = "fail"  # routed into the tunnel but impossible (no address of that family, port 0)


@dataclass(frozen=True, slots=True)
class Route:
    """Where a flow goes: into the tunnel (to which peer), direct, or refused."""

    way: Way
    errno: int = 0
    peer: int | None = None  # the peer's index when TUNNEL
    # Where a TUNNEL destination really goes when not where it was asked to: a DNS query to
    # a server outside the tunnel, with DNS= set, goes to the tunnel's DNS server.
    target: tuple[IPAddress, int] | None = None


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
        self.sock: SockId = self._engine.stack.udp_bind(port)  # OSError: EADDRINUSE
        self._engine.handlers[self.sock] = self
        self._engine.datagram_sinks[self.sock] = on_datagram  # on_event's, without the event
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

    def send_many(self, datagrams: Sequence[tuple[tuple[IPAddress, int], bytes]]) -> int:
        """A batch into the tunnel, flushed at once (so that the staged queues are current
        when the caller looks at `TunnelService.backlogged()`); the number the netstack took
        (the rest it refused: EMSGSIZE, no address of that family)."""
        engine = self._engine
        send, sock, now = engine.stack.udp_send, self.sock, engine.now()
        taken = 0
        for dst, payload in datagrams:
            try:
                send(sock, (plain(dst[0]), dst[1]), payload, now)
            except OSError:
                continue
            taken += 1
        if taken:
            engine.send_out()
        return taken

    def on_event(self, event: Event) -> None:
        if isinstance(event, DatagramReceived):
            self._on_datagram(event.src, event.data)
        elif isinstance(event, UdpError) and self._on_error is not None:
            self._on_error(event.dst, event.errno)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._engine.handlers.pop(self.sock, None)
            self._engine.datagram_sinks.pop(self.sock, None)
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
        self.resolver: DnsResolver | None = None  # with DNS=: the tunnel's resolver
        self.dns_forwarded: set[IPAddress] = set()  # servers asked whose queries we answered

    @property
    def addresses(self) -> list[IPAddress]:
        """Our tunnel addresses."""
        return self.engine.addresses

    def has_family(self, version: int) -> bool:
        return any(a.version == version for a in self.engine.addresses)

    # -- routing -------------------------------------------------------------------------------

    def route(self, proto: int, ip: IPAddress, port: int) -> Route:
        """The one routing decision every door uses: with DNS= set, a DNS query to a server
        outside the tunnel goes to the tunnel's DNS server (or fails: never the host's
        resolver); loopback and bypassed destinations go direct; then policy routes and
        AllowedIPs (routing.py); unrouted goes direct."""
        ip = plain(ip)
        if self._dns_captured(ip, port, proto):
            target = self.dns_target(ip, port, proto)
            if target is None or not self.has_family(target[0].version):
                return Route(Way.FAIL, errno.ENETUNREACH)
            return Route(Way.TUNNEL, peer=self.engine.route(target[0], proto, port), target=target)
        if ip.is_loopback or ip.is_unspecified or self.bypass.contains(ip):
            return Route(Way.DIRECT)
        peer = self.engine.route(ip, proto, port)
        if peer is None:
            return Route(Way.DIRECT)
        if port == 0:
            return Route(Way.FAIL, errno.ECONNREFUSED)  # as the kernel answers port 0
        if not self.has_family(ip.version):
            return Route(Way.FAIL, errno.ENETUNREACH)
        return Route(Way.TUNNEL, peer=peer)

    def _dns_captured(self, ip: IPAddress, port: int, proto: int) -> bool:
        """A DNS query (port 53, TCP or UDP) to a server outside the tunnel, with DNS= set."""
        if self.resolver is None or port != DNS_PORT or proto not in (TCP, UDP):
            return False
        return ip.is_loopback or ip.is_unspecified or self.engine.route(ip, proto, port) is None

    def dns_target(
        self, ip: IPAddress, port: int, proto: int = UDP
    ) -> tuple[IPAddress, int] | None:
        """Where a query to `ip`:`port` really goes (docs/channel.md "DNS").

        With DNS= set, port 53 of an address not routed into the tunnel (the host's
        resolv.conf servers, such as 127.0.0.53) would reach the host's resolver: the query
        goes to the first tunnel DNS server instead, and its replies come back as if from
        the address asked. None: send it as asked."""
        ip = plain(ip)
        if not self._dns_captured(ip, port, proto):
            return None
        server = self.resolver.forward_server() if self.resolver is not None else None
        if server is None:
            return None
        if ip not in self.dns_forwarded and len(self.dns_forwarded) < DNS_ASKED_LOGGED:
            self.dns_forwarded.add(ip)  # one line per address asked, for the first few
            self.log.info(
                "DNS queries answered through the tunnel", asked=str(ip), server=str(server)
            )
        return server, DNS_PORT

    def backlogged(self, room: int) -> set[int]:
        """Peers whose staged queue (waiting for a handshake [W 6.5]) has less than `room`
        places left: a door that reads on would only push packets out of it."""
        device = self.engine.device
        limit = device.timers.staged_queue_len - room
        full = set()
        for p in device.peers:  # (a loop, not a set comprehension: no frame of its own)
            if len(p.staged) > limit:
                full.add(p.index)
        return full

    # -- flows ---------------------------------------------------------------------------------

    def open_tcp(
        self,
        ip: IPAddress,
        port: int,
        *,
        src_port: int = 0,
        on_done: Callable[[TcpRelay], None] | None = None,
        on_status: Callable[[int], None] | None = None,
    ) -> tuple[TcpRelay, asyncio.Future[int]]:
        """Connect through the tunnel (a captured DNS query to its real target, see
        `route`). The future gives 0 once open, or the errno of the failure (ECONNREFUSED,
        ETIMEDOUT, EHOSTUNREACH); the door then joins its socket with
        `relay.attach_socket(sock, initial)` (or lets the relay go on failure). `on_status`
        gets the same outcome the moment it is known (the future's callbacks run a loop turn
        later: a door that answers its program there answers sooner). `on_done` runs when the
        flow has ended. Raises OSError (EADDRINUSE for a taken `src_port`)."""
        loop = self.engine.running_loop()
        outcome: asyncio.Future[int] = loop.create_future()
        ip = plain(ip)
        target = self.dns_target(ip, port, TCP)
        if target is not None:
            ip, port = target

        def known(status: int) -> None:
            if not outcome.done():
                outcome.set_result(status)
                if on_status is not None:
                    try:
                        on_status(status)
                    except Exception as exc:  # as a future's callback: the flow goes on
                        self.log.error("flow status callback failed", error=repr(exc))

        def ended(relay: TcpRelay) -> None:
            known(relay.status or errno.ECONNRESET)
            if on_done is not None:
                on_done(relay)

        relay = TcpRelay(self.engine, on_status=known, on_done=ended)
        cid = self.engine.connect(ip, port, relay, src_port)
        relay.attach_conn(cid)
        # The SYN leaves now, before the door answers its program: the tunnel's round trip
        # overlaps the door's local steps (else it waits for the engine's next flush).
        self.engine.flush()
        return relay, outcome

    def tcp_local(self, relay: TcpRelay) -> tuple[IPAddress, int]:
        """Our tunnel address and port of an open_tcp() flow (what getsockname reports)."""
        local = relay.local()
        assert local is not None, "a flow that open_tcp() just made"
        return ipaddress.ip_address(local[0]), local[1]

    def tunnel_address(self, version: int) -> IPAddress | None:
        """Our first tunnel address of that IP version, if the config has one."""
        return next((a for a in self.engine.addresses if a.version == version), None)

    def dns_redirect(self, proto: int, ip: IPAddress, port: int) -> tuple[IPAddress, int] | None:
        """Where a DNS query the program sends itself really goes (`dns_target`); None: as
        asked. Check it before route(): such a query must never reach the host resolver."""
        return self.dns_target(plain(ip), port, proto)

    def dns_captured(self, proto: int, ip: IPAddress, port: int) -> bool:
        """A port-53 query outside the tunnel with DNS= set (even when no tunnel DNS server
        of a usable family exists: then it fails, never the host)."""
        return self._dns_captured(plain(ip), port, proto)

    def listen(
        self,
        port: int,
        on_accept: Callable[[TcpRelay], None],
        accepts: Callable[[bytes], bool] | None = None,
        on_done: Callable[[TcpRelay], None] | None = None,
    ) -> Callable[[], None]:
        """Take tunnel connections to `port` of our addresses (`accepts(local_ip_bytes)`
        may refuse some: they are reset, as the kernel would). `on_accept` gets each one as
        an open `TcpRelay` (`remote()`, `local()`; `abort()` to refuse it, `attach_socket()`
        to join it to a local socket). Returns the function that stops listening."""

        def accepted(cid: ConnId) -> None:
            relay = TcpRelay(self.engine, on_done=on_done)
            relay.attach_conn(cid, established=True)
            on_accept(relay)

        lid = self.engine.listen(port, accepted, accepts)

        def stop() -> None:
            self.engine.unlisten(port, lid)

        return stop

    # The program's own listeners, reachable from the tunnel: the seccomp door shares the
    # preload door's inbound part (doors/preload/inbound.py: tunnel connections relayed to
    # the program's loopback listening socket, checked to still be the program's).

    def listen_tcp(self, ip: IPAddress, port: int, v6only: bool = False) -> None:
        """A program listens on `port` (on `ip`: the wildcard or a tunnel address; its
        socket is reachable on loopback at that port)."""
        from wrapguard.wire.ipc import Address

        self.session.preload.inbound.listen(Address(ip, port), v6only)

    def inbound_peer(
        self, loopback: tuple[str, int]
    ) -> tuple[tuple[IPAddress, int], tuple[IPAddress, int]] | None:
        """For a connection the launcher made to a program's listener from `loopback`: the
        tunnel client it carries and our tunnel address it reached (accept()'s view)."""
        from wrapguard.wire.ipc import Address

        inbound = self.session.preload.inbound
        addr = Address(ipaddress.ip_address(loopback[0]), loopback[1])
        remote, local = inbound.peer_of(addr), inbound.local_of(addr)
        if remote is None or local is None:
            return None
        return (remote.ip, remote.port), (local.ip, local.port)

    def open_udp(
        self,
        on_datagram: Callable[[tuple[IPAddress, int], bytes], None],
        on_error: Callable[[tuple[IPAddress, int], int], None] | None = None,
        port: int = 0,
    ) -> UdpFlow:
        """A UDP socket of ours in the tunnel: on `port` of our tunnel addresses (a program's
        server reachable from the peer), or an ephemeral one. Raises OSError (EADDRINUSE)."""
        return UdpFlow(self, on_datagram, on_error, port)

    async def resolve(self, name: str, family: int = 0) -> list[IPAddress]:
        """Through the tunnel DNS (DNS=), /etc/hosts first; without DNS=, the host resolver
        (off the loop). Raises OSError(ENOENT-like) with a message when nothing is found."""
        resolver = self.resolver
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
        return self.resolver is not None

    def add_frontend(self, frontend: FrontEnd) -> FrontEnd:
        self.frontends.append(frontend)
        return frontend

    # -- state -----------------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """What /state and `wrapguard show` report."""
        engine = self.engine
        config = self.session.config
        peers = peer_states(config, engine.device, engine.roads)
        tcp = sum(1 for h in list(engine.handlers.values()) if isinstance(h, TcpRelay))
        udp = sum(1 for h in list(engine.handlers.values()) if not isinstance(h, TcpRelay))
        return {
            "interface": interface_state(config, engine.wg.port),
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


def interface_state(config: Config, listen_port: int) -> dict[str, Any]:
    """The interface as /state shows it (every mode)."""
    iface = config.interface
    return {
        "public_key": iface.private_key.public_key().to_base64(),
        "addresses": [str(a) for a in iface.addresses],
        "listen_port": listen_port,
        "mtu": iface.mtu,
        "dns": [str(d) for d in iface.dns_servers],
    }


def peer_states(
    config: Config, device: Device, roads: Mapping[int, StreamRoad] | None = None
) -> list[dict[str, Any]]:
    """The peers as /state shows them (every mode); `roads`: the stream roads by peer."""
    peers = []
    for i, p in enumerate(config.peers):
        dev = device.peers[i]
        ep = dev.endpoint
        road = None if roads is None else roads.get(i)
        peers.append(
            {
                "public_key": p.public_key.to_base64(),
                "endpoint": road.target.url
                if road is not None
                else (None if ep is None else _hostport(ep[0], ep[1])),
                "configured_endpoint": str(p.stream)
                if p.stream is not None
                else (None if p.endpoint is None else _hostport(p.endpoint.host, p.endpoint.port)),
                "allowed_ips": [str(n) for n in p.allowed_ips],
                "latest_handshake": _wall(dev.last_handshake_wall),
                "rx_bytes": dev.rx_bytes,
                "tx_bytes": dev.tx_bytes,
                "persistent_keepalive": p.persistent_keepalive or 0,
                "transport": "udp" if road is None else road.target.scheme,
                **({} if road is None else {"stream": road.describe()}),
            }
        )
    return peers


def _hostport(host: object, port: int) -> str:
    text = str(host)
    return f"[{text}]:{port}" if ":" in text else f"{text}:{port}"


def _wall(t: float | None) -> float | None:
    return None if not t else round(t, 3)


def close_quietly(closers: Sequence[Callable[[], object]]) -> None:
    for close in closers:
        with contextlib.suppress(Exception):
            close()


__all__ = ["FrontEnd", "Route", "TunnelService", "UdpFlow", "Way", "peer_states", "plain"]
