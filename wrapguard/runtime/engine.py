"""The tunnel engine: the WireGuard device, the netstack and the routing policy on one loop.

Inbound, `WgUdpRuntime` hands decrypted packets to `Stack.receive_packet`; a flush scheduled
once per batch then sends the stack's outgoing packets into the tunnel (choosing the peer by
the routing policy, cached per destination) and dispatches the stack's events to the flows
that own the connections (`FlowHandler`). One `call_at` timer follows the stack's deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import os
import secrets
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from wrapguard import log
from wrapguard.config import Config
from wrapguard.config import Protocol as RouteProto
from wrapguard.errors import DecodeError
from wrapguard.netstack.events import (
    Accepted,
    Closed,
    Connected,
    ConnectFailed,
    ConnId,
    DatagramReceived,
    Event,
    ListenerId,
    SockId,
    TcpConfig,
)
from wrapguard.netstack.stack import Stack
from wrapguard.routing import RoutingTable
from wrapguard.runtime.timer import DeadlineTimer
from wrapguard.runtime.udp import WgUdpRuntime
from wrapguard.tunnel.device import Device
from wrapguard.tunnel.events import HandshakeCompleted, HandshakeFailed, Output
from wrapguard.tunnel.peer import PeerSpec
from wrapguard.tunnel.timers import TimerConfig
from wrapguard.wire.icmp import (
    ICMP_ECHO_REPLY,
    ICMP_ECHO_REQUEST,
    ICMPV6_ECHO_REPLY,
    ICMPV6_ECHO_REQUEST,
    IcmpMessage,
    emit_icmp,
    parse_icmp,
)
from wrapguard.wire.ip import IPv4Packet, IPv6Packet, emit_ip, parse_ip

if TYPE_CHECKING:
    from wrapguard.config import PeerConfig
    from wrapguard.roads.stream import StreamRoad

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_PROTO = {6: RouteProto.TCP, 17: RouteProto.UDP}
HANDSHAKE_WARN_AFTER = 5.0  # seconds: one REKEY_TIMEOUT without an answer
FLUSH_EVERY = 32  # inbound packets between flushes within one receive batch


class FlowHandler(Protocol):
    """What owns a netstack connection: the relay to the program's socket."""

    def on_event(self, event: Event) -> None: ...


class PooledRandom:
    """`secrets.token_bytes` for the device, with requests of up to SMALL bytes served from
    a pool drawn POOL bytes at a time. The device takes 2 bytes of rekey jitter [W 6.1] for
    nearly every packet it sends after one it received (a UDP request and its reply, data
    and its ACKs): one getrandom() syscall each otherwise. Larger requests (keys) as asked."""

    SMALL, POOL = 8, 512

    __slots__ = ("__weakref__", "_pool", "_pos", "_small")

    def __init__(self, small: int = SMALL) -> None:
        self._pool = b""
        self._pos = 0
        self._small = small
        _POOLS.add(self)

    def forget(self) -> None:
        """Drop what is left (a fork()ed child must not reuse its parent's bytes)."""
        self._pool, self._pos = b"", 0

    def __call__(self, n: int) -> bytes:
        if n > self._small:
            return secrets.token_bytes(n)
        pos = self._pos
        if pos + n > len(self._pool):
            self._pool, pos = secrets.token_bytes(self.POOL), 0
        self._pos = pos + n
        return self._pool[pos : pos + n]

    def randbits(self, bits: int) -> int:
        """`secrets.randbits` from the pool (the netstack's ISNs and ephemeral ports: one
        getrandom() each per connect otherwise)."""
        n = (bits + 7) >> 3
        if n > self._small:
            return secrets.randbits(bits)
        return int.from_bytes(self(n), "big") >> ((n << 3) - bits)


def _tcp_config() -> TcpConfig:
    """The netstack's TCP settings; WRAPGUARD_TEST_TCP_RETRIES is a test knob (docs/testing.md)
    that shortens how long unanswered retransmissions and zero-window probes go on."""
    retries = os.environ.get("WRAPGUARD_TEST_TCP_RETRIES")
    if retries is None or not retries.isdigit():
        return TcpConfig()
    return TcpConfig(max_retries=int(retries))


def device_endpoint(peer: int, config: PeerConfig) -> tuple[str, int] | None:
    """The endpoint the device starts with for a configured peer."""
    if config.stream is not None:
        from wrapguard.roads.stream import road_address  # only for http(s) Endpoints

        return road_address(peer, config.stream)
    return None if config.endpoint is None else (config.endpoint.host, config.endpoint.port)


_POOLS: weakref.WeakSet[PooledRandom] = weakref.WeakSet()
os.register_at_fork(after_in_child=lambda: [p.forget() for p in list(_POOLS)])


def build_device(
    config: Config,
    routing: RoutingTable,
    *,
    timers: TimerConfig | None = None,
    factory: Callable[..., Device] = Device,
) -> Device:
    """The WireGuard device of a config: its peers, and the sources their policy routes let
    in (compat.md "Routing"). Shared by the netstack engine and the TUN add-on."""
    iface = config.interface
    specs = [
        PeerSpec(
            public_key=p.public_key,
            preshared_key=p.preshared_key,
            endpoint=device_endpoint(i, p),
            allowed_ips=tuple(p.allowed_ips),
            persistent_keepalive=p.persistent_keepalive or 0,
        )
        for i, p in enumerate(config.peers)
    ]
    device = factory(iface.private_key, specs, rng=PooledRandom(), timers=timers, mtu=iface.mtu)
    for i in range(len(config.peers)):
        for net in routing.allowed_sources(i):
            if net not in config.peers[i].allowed_ips:
                device.add_allowed_source(i, net)
    return device


class PeerChooser:
    """The peer for an outgoing IP packet by the routing policy (None: unrouted), cached per
    (destination, protocol, port): `chooser(packet)`."""

    __slots__ = ("_cache", "routing")

    def __init__(self, routing: RoutingTable) -> None:
        self.routing = routing
        self._cache: dict[tuple[bytes, int, int], int | None] = {}

    def __call__(self, pkt: bytes) -> int | None:
        if pkt[0] >> 4 == 4:
            ihl = (pkt[0] & 15) * 4
            dst, proto = pkt[16:20], pkt[9]
        else:
            ihl, dst, proto = 40, pkt[24:40], pkt[6]
        port = int.from_bytes(pkt[ihl + 2 : ihl + 4], "big") if proto in (6, 17) else 0
        key = (dst, proto, port)
        try:
            return self._cache[key]
        except KeyError:
            pass
        peer = self.routing.lookup(
            ipaddress.ip_address(dst), _PROTO.get(proto, RouteProto.ANY), port or None
        )
        if len(self._cache) > 65536:
            self._cache.clear()
        self._cache[key] = peer
        return peer


class Engine:
    """Owns the device, its UDP runtime and the stack; routes events to flow handlers."""

    def __init__(
        self,
        config: Config,
        routing: RoutingTable,
        *,
        timers: TimerConfig | None = None,
        socket_factory: Callable[[int, int], object] | None = None,
        bind: tuple[str, str | None] = ("0.0.0.0", "::"),
    ) -> None:
        self.log = log.get("wrapguard.engine")
        self.config = config
        self.routing = routing
        iface = config.interface
        self.device = build_device(config, routing, timers=timers)
        self.addresses: list[IPAddress] = [a.ip for a in iface.addresses]
        self.stack = Stack(
            self.addresses, rng=PooledRandom().randbits, mtu=iface.mtu, config=_tcp_config()
        )
        self.wg = WgUdpRuntime(
            self.device,
            listen_port=iface.listen_port or 0,
            on_packet=self._from_tunnel,
            on_event=self._tunnel_event,
            on_batch_end=self._rx_batch_end,
            socket_factory=socket_factory,  # type: ignore[arg-type]
            bind_v4=bind[0],
            bind_v6=bind[1],
        )
        self.roads: dict[int, StreamRoad] = {}  # peers over HTTP(S) streams
        if any(p.stream is not None for p in config.peers):
            # h11, ssl and urllib are for these alone: not imported for a plain UDP config
            from wrapguard.roads.stream import attach_roads

            self.roads = attach_roads(self.wg, config.peers)
        self.handlers: dict[int, FlowHandler] = {}
        # Per UDP socket: a callback (source, payload) for its datagrams, taking the place of
        # its handler's on_event(DatagramReceived) (UdpFlow; Engine._deliver).
        self.datagram_sinks: dict[int, Callable[[tuple[IPAddress, int], bytes], None]] = {}
        self.listeners: dict[int, Callable[[ConnId], None]] = {}
        self._peer_for_packet = PeerChooser(routing)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._flush_handle: asyncio.Handle | None = None  # a flush scheduled for this turn
        self._rx_pending = 0
        self._hs_watched: set[int] = set()
        self._timer: DeadlineTimer | None = None
        self.unrouted_drops = 0
        self.handshakes_done: set[int] = set()
        self.handshake_event = asyncio.Event()
        self._pings: dict[tuple[bytes, int, int], asyncio.Future[float]] = {}

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._timer = DeadlineTimer(self._loop, self._on_timer)
        await self.wg.start()
        self.log.info(
            "tunnel up",
            listen_port=self.wg.port,
            addresses=[str(a) for a in self.addresses],
            peers=len(self.config.peers),
        )

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self.wg.close()

    def now(self) -> float:
        return self._loop.time() if self._loop is not None else time.monotonic()

    def running_loop(self) -> asyncio.AbstractEventLoop:
        """The loop the engine runs on (asyncio.get_running_loop() costs a getpid() per call
        on Python 3.11; flows ask for it on every connect)."""
        loop = self._loop
        return loop if loop is not None and loop.is_running() else asyncio.get_running_loop()

    # ------------------------------------------------------------------ routing

    def route(self, dst: IPAddress, proto: int, port: int | None) -> int | None:
        """The peer for a destination, or None: not tunnelled (goes direct)."""
        return self.routing.lookup(dst, _PROTO.get(proto, RouteProto.ANY), port)

    # ------------------------------------------------------------------ data path

    def _from_tunnel(self, _peer: int, packet: bytes) -> None:
        if self._pings and self._take_echo_reply(packet):
            return
        self.stack.receive_packet(packet, self.now())
        self._rx_pending += 1
        if self._rx_pending >= FLUSH_EVERY:
            # Do not hold ACKs (and window updates) for a whole receive batch: the sender's
            # clock runs on them.
            self.flush()
        elif not self.wg.receiving:
            self.schedule_flush()
        # else: in a receive batch, which ends with _rx_batch_end(): no loop turn between
        # the last packet and what answers it (a UDP reply, an ACK).

    def _rx_batch_end(self) -> None:
        if self._rx_pending:
            self.flush()

    # ------------------------------------------------------------------ ping (self-test)

    async def ping(self, dst: IPAddress, peer: int, timeout: float, ident: int = 0x5767) -> float:
        """Send one ICMP echo request into the tunnel; returns the round trip in seconds.

        Raises TimeoutError when no reply comes back in time."""
        src = next((a for a in self.addresses if a.version == dst.version), None)
        if src is None:
            raise OSError(errno.ENETUNREACH, f"no tunnel address of IPv{dst.version}")
        seq = len(self._pings) + 1
        rest = ident.to_bytes(2, "big") + seq.to_bytes(2, "big")
        payload = b"wrapguard self-test"
        if dst.version == 4:
            msg = emit_icmp(IcmpMessage(ICMP_ECHO_REQUEST, 0, rest, payload))
            pkt = emit_ip(IPv4Packet(src.packed, dst.packed, 1, msg))
        else:
            msg = emit_icmp(
                IcmpMessage(ICMPV6_ECHO_REQUEST, 0, rest, payload), src.packed, dst.packed
            )
            pkt = emit_ip(IPv6Packet(src.packed, dst.packed, 58, msg))
        assert self._loop is not None
        waiter: asyncio.Future[float] = self._loop.create_future()
        self._pings[(dst.packed, ident, seq)] = waiter
        started = self._loop.time()
        self.wg.send_packet(pkt, peer)
        try:
            async with asyncio.timeout(timeout):
                await waiter
        finally:
            self._pings.pop((dst.packed, ident, seq), None)
        return self._loop.time() - started

    def _take_echo_reply(self, packet: bytes) -> bool:
        try:
            ip = parse_ip(packet)
            if ip.proto not in (1, 58):
                return False
            msg = parse_icmp(ip.payload)
        except DecodeError:
            return False
        if msg.type not in (ICMP_ECHO_REPLY, ICMPV6_ECHO_REPLY):
            return False
        waiter = self._pings.get((ip.src, msg.ident, msg.sequence))
        if waiter is None or waiter.done():
            return False
        waiter.set_result(0.0)
        return True

    def schedule_flush(self) -> None:
        if self._flush_handle is None and self._loop is not None:
            self._flush_handle = self._loop.call_soon(self._scheduled_flush)

    def _scheduled_flush(self) -> None:
        self._flush_handle = None
        self.flush()

    def flush(self) -> None:
        """Send what the stack produced and hand its events to their owners."""
        handle, self._flush_handle = self._flush_handle, None
        if handle is not None:  # flushed now: the scheduled one would find nothing to do
            handle.cancel()
        self._rx_pending = 0
        try:
            self._flush()
        finally:
            self._rearm()

    def _flush(self) -> None:
        stack = self.stack
        dispatch = self._dispatch_guarded
        for _ in range(64):  # events may produce packets and packets events: bounded rounds
            # A connection's outcome reaches its flow before this round's packets are built,
            # sealed and sent: the door answers its program's connect() at once, and the ACK
            # of the SYN-ACK follows it (issue 14). Every other event waits for the packets,
            # as before (ACKs first keep the peer's clock running). Datagrams for bound
            # ports come first among those (the stack queues them ahead of every event).
            dgrams = stack.take_datagrams()
            held: list[Event] = []
            event = stack.next_event()
            while event is not None:
                if isinstance(event, Connected | ConnectFailed):
                    dispatch(event)  # what it queues leaves with this round's packets
                else:
                    held.append(event)
                event = stack.next_event()
            batch = self._routed_outgoing()
            if batch:
                self.wg.send_packets(batch)
            if dgrams:
                self._deliver(dgrams)
                if not held and stack.idle():
                    break  # the sinks queued nothing: no round to look for it
            elif not held:
                break
            for event in held:
                dispatch(event)
            event = stack.next_event()
            while event is not None:
                dispatch(event)
                event = stack.next_event()

    def _deliver(
        self, dgrams: list[tuple[SockId, tuple[IPAddress, int], bytes, IPAddress]]
    ) -> None:
        """Datagrams (Stack.take_datagrams) to their sockets' sinks (`datagram_sinks`: a
        UdpFlow's callback, no event object); to a handler without one as DatagramReceived
        events, as _dispatch_guarded would."""
        sinks = self.datagram_sinks
        for d in dgrams:
            sink = sinks.get(d[0])
            try:
                if sink is not None:
                    sink(d[1], d[2])
                else:
                    self._dispatch(DatagramReceived(*d))
            except Exception as exc:  # one flow's bug must not stop the others
                self.log.error("flow event failed", event="DatagramReceived", error=repr(exc))

    def send_out(self) -> None:
        """`flush()` for a flow that just queued datagrams: when nothing else waits in the
        stack (no event, no delayed ACK, no flush due), its packets are routed and sent
        without flush()'s event rounds; else flush()."""
        stack = self.stack
        if self._flush_handle is not None or self._rx_pending or not stack.quiet():
            self.flush()
            return
        batch = self._routed_outgoing()
        try:
            if batch:
                self.wg.send_packets(batch)
        finally:
            self._rearm()

    def _routed_outgoing(self) -> list[tuple[bytes, int]]:
        """The stack's outgoing packets, each with the peer (index) cryptokey routing gives (a
        packet no peer takes is counted and dropped)."""
        batch = []
        for pkt in self.stack.take_outgoing():
            peer = self._peer_for_packet(pkt)
            if peer is None:
                self.unrouted_drops += 1
                continue
            batch.append((pkt, peer))
        return batch

    def _dispatch_guarded(self, event: Event) -> None:
        try:
            self._dispatch(event)
        except Exception as exc:  # one flow's bug must not stop the others
            self.log.error("flow event failed", event=type(event).__name__, error=repr(exc))

    def _dispatch(self, event: Event) -> None:
        if isinstance(event, Accepted):
            accept = self.listeners.get(event.listener)
            if accept is None:
                with contextlib.suppress(OSError):
                    self.stack.abort(event.conn, self.now())
                return
            accept(event.conn)
            return
        conn = getattr(event, "conn", None)
        if conn is None:
            conn = getattr(event, "sock", None)
        if conn is None:
            return  # PacketDropped: counted by the stack
        handler = self.handlers.get(conn)
        if handler is not None:
            handler.on_event(event)
        if isinstance(event, Closed):
            self.handlers.pop(conn, None)

    def _rearm(self) -> None:
        if self._timer is not None:
            self._timer.arm(self.stack.next_deadline())

    def _on_timer(self) -> None:
        try:
            self.stack.handle_timeout(self.now())
        finally:
            self.flush()

    def _tunnel_event(self, out: Output) -> None:
        if isinstance(out, HandshakeCompleted):
            self.handshakes_done.add(out.peer)
            self.handshake_event.set()
        elif isinstance(out, HandshakeFailed):
            self.log.warning("handshake failed: no answer from peer", peer=out.peer)

    # ------------------------------------------------------------------ flows

    def connect(
        self, dst: IPAddress, port: int, handler: FlowHandler, local_port: int = 0
    ) -> ConnId:
        cid = self.stack.connect(dst, port, self.now(), local_port)
        self.handlers[cid] = handler
        self.schedule_flush()
        if len(self.handshakes_done | self._hs_watched) < len(self.device.peers):
            peer = self.route(dst, 6, port)  # (else every peer is answering or watched)
            if peer is not None:
                self.watch_handshake(peer)
        return cid

    def abort(self, cid: ConnId) -> None:
        """Reset a connection (RST to the peer) and send it; a connection already gone is
        fine. The one way doors end a flow abortively."""
        with contextlib.suppress(OSError, KeyError):
            self.stack.abort(cid, self.now())
        self.schedule_flush()

    def watch_handshake(self, peer: int) -> None:
        """Say so, once, when traffic waits on a peer that does not answer our handshake: the
        user otherwise sees nothing until the program's connect times out."""
        if peer in self.handshakes_done or peer in self._hs_watched or self._loop is None:
            return
        self._hs_watched.add(peer)

        def check() -> None:
            if peer in self.handshakes_done:
                return
            ep = self.device.peers[peer].endpoint
            road = self.roads.get(peer)
            self.log.warning(
                "no handshake response from peer yet: wrong keys, peer down, or UDP blocked?"
                if road is None
                else f"no handshake response from peer yet (stream road {road.state})",
                peer=peer + 1,
                endpoint=road.target.url
                if road is not None
                else (None if ep is None else f"{ep[0]}:{ep[1]}"),
                waited_s=HANDSHAKE_WARN_AFTER,
            )

        self._loop.call_later(HANDSHAKE_WARN_AFTER, check)

    def listen(
        self,
        port: int,
        on_accept: Callable[[ConnId], None],
        accepts: Callable[[bytes], bool] | None = None,
    ) -> ListenerId:
        lid = self.stack.listen(port, accepts)
        self.listeners[lid] = on_accept
        return lid

    def unlisten(self, port: int, lid: ListenerId) -> None:
        self.listeners.pop(lid, None)
        with contextlib.suppress(OSError, KeyError):
            self.stack.unlisten(port)


__all__ = ["Engine", "FlowHandler", "IPAddress", "PeerChooser", "PooledRandom", "build_device"]
