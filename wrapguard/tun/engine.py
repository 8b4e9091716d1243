"""The TUN-mode engine: packets between a TUN fd and the WireGuard device, and the bypass.

Outbound, the TUN fd is drained on readability (one IP packet per read), each packet's peer is
chosen by the routing policy (`PeerChooser`, as the netstack engine does) and the batch goes to
`WgUdpRuntime.send_packets`. Inbound, decrypted packets are written to the TUN fd. The kernel
made these packets and takes them back: no netstack.

The bypass list (`TunBypass`, the control socket's /bypass) is kept as routes: each user entry
and each peer endpoint (automatic, marked) gets a route via whatever the host would use without
the tunnel. Endpoints are followed: a roaming peer (EndpointChanged) and an endpoint host name
that resolves to a new address (`Device.set_endpoint`, called by the re-resolution) move the
automatic entry at once, before the next datagram is sent there.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import time
from collections.abc import Callable, Iterable
from typing import Any

from wrapguard import log
from wrapguard.config import Config
from wrapguard.errors import UsageError
from wrapguard.routing import RoutingTable
from wrapguard.runtime.bypass import BypassList, IPNetwork
from wrapguard.runtime.engine import PeerChooser, build_device
from wrapguard.runtime.service import interface_state, peer_states
from wrapguard.runtime.udp import WgUdpRuntime
from wrapguard.tun.netconf import HostNet
from wrapguard.tunnel.device import Device
from wrapguard.tunnel.events import EndpointChanged, HandshakeCompleted, Output

READ_BATCH = 256  # packets per readable callback before yielding to the loop
READ_SIZE = 65535
ENDPOINT_REASON = "peer endpoint"


class WatchedDevice(Device):
    """A Device that says when an endpoint is set from outside (resolution, re-resolution)."""

    on_endpoint: Callable[[int], None] | None = None

    def set_endpoint(self, peer: int, addr: tuple[str, int]) -> None:
        super().set_endpoint(peer, addr)
        if self.on_endpoint is not None:
            self.on_endpoint(peer)


class TunBypass(BypassList):
    """The bypass list, applied as routes: after every change the routes match the entries
    (the union of user and automatic ones; one route per network)."""

    def __init__(self, net: HostNet) -> None:
        super().__init__()
        self.net = net
        self.routes: dict[IPNetwork, dict[str, Any]] = {}
        self.texts: dict[IPNetwork, str] = {}  # how each goes, as GET /bypass shows it
        self.log = log.get("wrapguard.tun")

    def add(self, entries: Iterable[object]) -> list[IPNetwork]:
        added = super().add(entries)
        try:
            self.sync()
        except Exception as exc:
            # All or nothing, as the list itself: take the new entries back out (the control
            # socket answers 400 with the kernel's reason).
            self._user = [n for n in self._user if n not in added]
            self.sync()
            raise UsageError(str(exc)) from None
        return added

    def clear(self) -> int:
        n = super().clear()
        self.sync()
        return n

    def wanted(self) -> list[IPNetwork]:
        return list(dict.fromkeys([*self._auto, *self._user]))

    def sync(self) -> None:
        """Make the routes match the entries: remove the stale, add the missing."""
        wanted = self.wanted()
        for net in [n for n in self.routes if n not in wanted]:
            self.texts.pop(net, None)
            self.net.remove_route(self.routes.pop(net))
        for net in wanted:
            if net in self.routes:
                continue
            via = self.net.underlying(net.network_address)
            if via is None:
                continue  # local: never in the tunnel anyway
            self.routes[net] = self.net.add_route(net, via)
            self.texts[net] = via.describe(self.net.ifname_of(via.oif))
            self.log.info("bypass route added", cidr=str(net), route=self.texts[net])

    def entries(self) -> list[dict[str, Any]]:
        out = super().entries()
        for e in out:
            e["route"] = self.texts.get(ipaddress.ip_network(e["cidr"]), "none (local)")
        return out


class TunEngine:
    """Owns the device, its UDP runtime and the TUN fd's data path."""

    def __init__(self, config: Config, routing: RoutingTable, net: HostNet) -> None:
        self.log = log.get("wrapguard.tun")
        self.config = config
        self.routing = routing
        self.net = net
        device = build_device(config, routing, factory=WatchedDevice)
        assert isinstance(device, WatchedDevice)
        self.device = device
        self.wg = WgUdpRuntime(
            device,
            listen_port=config.interface.listen_port or 0,
            on_packet=self._to_tun,
            on_event=self._tunnel_event,
        )
        self.choose = PeerChooser(routing)
        self.bypass = TunBypass(net)
        self._endpoints: dict[int, IPNetwork] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fd: int | None = None
        self.fatal: asyncio.Future[BaseException] | None = None
        self.stats = {
            "rx_packets": 0,  # TUN -> tunnel
            "tx_packets": 0,  # tunnel -> TUN
            "unrouted": 0,
            "write_errors": 0,
        }
        self.handshakes_done: set[int] = set()
        self.started = time.time()

    async def start(self, fd: int) -> None:
        """Open the UDP road (endpoint names resolve here: their bypass routes follow at
        once), bypass every endpoint, then serve the TUN fd."""
        self._loop = asyncio.get_running_loop()
        self.fatal = self._loop.create_future()
        self.device.on_endpoint = self._endpoint_moved
        await self.wg.start()
        for i in range(len(self.device.peers)):
            self._endpoint_moved(i)
        self._fd = fd
        self._loop.add_reader(fd, self._readable)

    def close(self) -> None:
        self.device.on_endpoint = None
        if self._fd is not None and self._loop is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self._fd)
        self._fd = None
        self.wg.close()

    # -- the data path ---------------------------------------------------------------------------

    def _readable(self) -> None:
        fd = self._fd
        if fd is None:
            return
        choose, read = self.choose, os.read
        batch: list[tuple[bytes, int | None]] = []
        unrouted = 0
        for _ in range(READ_BATCH):
            try:
                pkt = read(fd, READ_SIZE)
            except BlockingIOError:
                break
            except InterruptedError:
                continue
            except OSError as exc:  # the link is gone (EBADFD/EIO): nothing more to do
                self._fail(exc)
                return
            if len(pkt) < 20 or pkt[0] >> 4 not in (4, 6) or (pkt[0] >> 4 == 6 and len(pkt) < 40):
                unrouted += 1
                continue
            peer = choose(pkt)
            if peer is None:
                unrouted += 1  # the kernel routed it here, but no peer carries it
                continue
            batch.append((pkt, peer))
        if batch:
            self.stats["rx_packets"] += len(batch)
            self.wg.send_packets(batch)
        self.stats["unrouted"] += unrouted

    def _to_tun(self, _peer: int, packet: bytes) -> None:
        fd = self._fd
        if fd is None:
            return
        try:
            os.write(fd, packet)
            self.stats["tx_packets"] += 1
        except OSError:
            self.stats["write_errors"] += 1  # queue full (EAGAIN) or a packet the kernel refuses

    def _fail(self, exc: BaseException) -> None:
        if self.fatal is not None and not self.fatal.done():
            self.fatal.set_result(exc)
        if self._fd is not None and self._loop is not None:
            self._loop.remove_reader(self._fd)

    # -- endpoints and their bypass ----------------------------------------------------------------

    def _tunnel_event(self, out: Output) -> None:
        if isinstance(out, EndpointChanged):
            self._endpoint_moved(out.peer)
        elif isinstance(out, HandshakeCompleted):
            if out.peer not in self.handshakes_done:
                self.log.info("handshake completed", peer=out.peer + 1)
            self.handshakes_done.add(out.peer)

    def _endpoint_moved(self, peer: int) -> None:
        ep = self.device.peers[peer].endpoint
        try:
            net = None if ep is None else ipaddress.ip_network(ep[0].split("%")[0])
        except ValueError:
            self.log.warning("cannot bypass this endpoint", peer=peer + 1, endpoint=ep)
            return
        old = self._endpoints.get(peer)
        if net == old:
            return
        if net is None:
            self._endpoints.pop(peer, None)
        else:
            self._endpoints[peer] = net
        bypass = self.bypass
        if old is not None and old not in self._endpoints.values():
            bypass.drop_automatic(old)
        if net is not None:
            bypass.set_automatic(net, ENDPOINT_REASON)
        try:
            bypass.sync()
        except Exception as exc:  # the route could not be made: say so, keep the tunnel up
            self.log.error("cannot bypass a peer endpoint", peer=peer + 1, error=str(exc))
        if old is not None:
            self.log.info("peer endpoint bypass moved", peer=peer + 1, old=str(old), new=str(net))


class TunService:
    """What the control socket needs (`wrapguard.control.server` takes it as its service):
    `state()` and the live `bypass` list."""

    def __init__(self, engine: TunEngine, ifname: str, extra: dict[str, Any]) -> None:
        self.engine = engine
        self.bypass = engine.bypass
        self.ifname = ifname
        self.extra = extra

    def state(self) -> dict[str, Any]:
        e = self.engine
        return {
            "interface": {
                **interface_state(e.config, e.wg.port),
                "tun": self.ifname,
                **self.extra,
            },
            "peers": peer_states(e.config, e.device),
            "flows": {"tcp": 0, "udp": 0},  # the kernel's, not ours
            "frontends": [{"kind": "tun", "address": self.ifname, "auth": False, "flows": 0}],
            "bypass": self.bypass.entries(),
            "counters": {
                "wireguard_udp": dict(e.wg.stats),
                "tunnel_drops": {r.name: n for r, n in e.device.counters.items() if n},
                "tun": dict(e.stats),
            },
            "uptime_s": round(time.time() - e.started, 1),
        }


__all__ = ["TunBypass", "TunEngine", "TunService", "WatchedDevice"]
