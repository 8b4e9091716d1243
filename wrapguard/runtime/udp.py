"""The asyncio driver of the WireGuard core: UDP sockets, the timer, endpoint resolution.

One non-blocking UDP socket per address family (bound to ListenPort, or the same ephemeral port
for both), drained with `loop.add_reader` and a `recvfrom_into` loop into one preallocated
buffer (never the stock datagram transport: performance.md). Outputs of `tunnel.Device` are
acted on here: datagrams sent with `sendto`, IP packets handed to `on_packet(peer, packet)`,
other events given to `on_event`. One `loop.call_at` timer follows `device.next_deadline()`.
Endpoint host names are looked up off the loop at start, every 2 minutes and when the peer
stops answering; `tunnel.reresolve.Reresolver` decides when, and whether an answer moves the
endpoint (a periodic lookup never undoes roaming while the peer answers).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from wrapguard.log import get as get_logger
from wrapguard.noise.reasons import DropReason
from wrapguard.runtime.timer import DeadlineTimer
from wrapguard.tunnel.device import Device
from wrapguard.tunnel.events import (
    DeliverPacket,
    EndpointChanged,
    HandshakeCompleted,
    HandshakeFailed,
    Output,
    PacketDropped,
    ResolveEndpoint,
    SendDatagram,
)
from wrapguard.wire import wgmsg

if TYPE_CHECKING:
    from wrapguard.tunnel.reresolve import Lookup, Reresolver

try:
    from wrapguard._fastpath import ffi as _ffi  # type: ignore[import-not-found]
    from wrapguard._fastpath import lib as _lib

    HAVE_MMSG = hasattr(_lib, "wg_recvmmsg") and hasattr(_lib, "wg_sendmmsg")
    HAVE_GSO = hasattr(_lib, "wg_sendmmsg_gso")
except ImportError:  # not built: one syscall per datagram
    HAVE_MMSG = HAVE_GSO = False

log = get_logger("wrapguard.wg")
MIN_TRANSPORT_LEN = wgmsg.MIN_TRANSPORT_LEN
MMSG_BATCH = 16  # datagrams per recvmmsg call (the C helper caps it at 64)
# Datagrams per sendmmsg call and per sealed batch (the C helpers cap both at 64), and per
# UDP_SEGMENT message (the kernel moves a run of equal-sized datagrams, full segments of one
# flow, as one packet through routing and the veth/loopback device). 16, not 64: a 64-datagram
# burst overflows a wireguard-go peer's socket buffer; its losses cost TCP recoveries and
# timeouts (a wrapped 32 MiB upload through the rig, 4 interleaved rounds each: 64/64 34.5
# MB/s with 2-3 RTOs a run, 32/32 58.5, 16/16 63.8-73.2 with none, 8/8 62.0).
SEND_BATCH = 16
GSO_SEGS = 16
MMSG_SLOT = 65536  # receive slot per datagram: any UDP payload fits
_TRUNCATED = 0xFFFFFFFF
_ADDR_SLOT = 28  # sizeof(struct sockaddr_in6), as in the C helper


class Road(Protocol):
    """Another way to a peer than UDP (roads/stream.py): the device sees a synthetic endpoint
    address; datagrams to it go to `send`, and the road hands back what it receives."""

    def start(self) -> None: ...

    def send(self, datagram: bytes) -> None: ...

    def close(self) -> None: ...


SocketFactory = Callable[[int, int], socket.socket]
Resolver = Callable[[str, int], Awaitable[Sequence[tuple[str, int]]]]  # addresses, best first
RECV_BUF = 65536
DRAIN_BATCH = 256  # datagrams per readable callback before yielding to the loop
SOCK_BUF = 4 << 20
UNDER_LOAD_HANDSHAKES = 128  # handshake messages per second that switch on cookies [W 5.3]


class WgUdpRuntime:
    """Drives one `Device` over UDP on the running asyncio loop.

    `await start()`, then `send_packet(ip_packet, peer=None)` from the netstack side; inbound
    packets arrive through `on_packet(peer_index, packet)`. `close()` stops everything.
    """

    def __init__(
        self,
        device: Device,
        *,
        listen_port: int = 0,
        on_packet: Callable[[int, bytes], None] | None = None,
        on_event: Callable[[Output], None] | None = None,
        on_batch_end: Callable[[], None] | None = None,
        socket_factory: SocketFactory | None = None,
        resolver: Resolver | None = None,
        bind_v4: str = "0.0.0.0",
        bind_v6: str | None = "::",
        wall_clock: Callable[[], float] = time.time,
        rng: Callable[[int], bytes] = secrets.token_bytes,
        reresolve_interval: float | None = None,  # None: reresolve.RERESOLVE_INTERVAL
    ) -> None:
        self.device = device
        self.listen_port = listen_port
        self.on_packet = on_packet
        self.on_event = on_event
        # Called after each receive batch from a socket (`receiving` is True while one
        # runs), so that the netstack side can answer at once rather than a loop turn later.
        self.on_batch_end = on_batch_end
        self.receiving = False
        self._factory: SocketFactory = socket_factory or socket.socket
        self._resolver = resolver
        self._bind_v4 = bind_v4
        self._bind_v6 = bind_v6
        self._wall = wall_clock
        self._loop: asyncio.AbstractEventLoop | None = None
        self._v4: socket.socket | None = None
        self._v6: socket.socket | None = None
        self._buf = bytearray(RECV_BUF)
        # Batched IPv4 I/O (recvmmsg/sendmmsg through the cffi helper), set up in start().
        self._mm_buf: bytearray | None = None
        self._mm_addrs = bytearray(MMSG_BATCH * _ADDR_SLOT)
        # The last source seen by _readable_mmsg, raw (port, address) and as text: one
        # peer's datagrams come from one endpoint, so it is converted once, not per call.
        self._mm_last: tuple[bytes, tuple[str, int]] = (b"", ("", 0))
        self._mm_cdata: tuple[Any, ...] = ()  # cffi pointers into the buffers above
        self._sockaddrs: dict[tuple[str, int], bytes] = {}
        self.gso_segs = GSO_SEGS if HAVE_GSO else 1  # 1: no segmentation offload
        self.seal_batches = True  # consecutive packets for one peer sealed in one call
        self.single_path = True  # a batch of one skips the batching loop (tests: off)
        self._timer: DeadlineTimer | None = None
        self._rr_timer: DeadlineTimer | None = None
        # Only for Endpoint host names (set from the config, never later): with addresses
        # alone, as most configs have, nothing asks for a lookup and tunnel/reresolve.py is
        # not even imported (start-up time, bench row 5).
        hosts = {p.index: p.endpoint_host for p in device.peers if p.endpoint_host is not None}
        self.reresolver: Reresolver | None = None
        if hosts:
            from wrapguard.tunnel.reresolve import RERESOLVE_INTERVAL, Reresolver

            interval = RERESOLVE_INTERVAL if reresolve_interval is None else reresolve_interval
            self.reresolver = Reresolver(hosts, rng=rng, interval=interval)
        self._tasks: set[asyncio.Task[None]] = set()
        self.roads: dict[tuple[str, int], Road] = {}  # synthetic endpoint -> road
        self._hs_window = 0.0
        self._hs_count = 0
        self.stats = {
            "rx_datagrams": 0, "tx_datagrams": 0, "send_errors": 0, "delivered": 0,
            "tx_syscalls": 0,
        }  # fmt: skip

    # ------------------------------------------------------------------ lifecycle

    @property
    def counters(self) -> dict[DropReason, int]:
        """Drops by reason, as counted by the device (remote garbage and local causes)."""
        return self.device.counters

    @property
    def port(self) -> int:
        sock = self._v4 or self._v6
        return 0 if sock is None else int(sock.getsockname()[1])

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._timer = DeadlineTimer(self._loop, self._on_timer, lazy=True)
        self._open_sockets()
        v4 = self._v4
        if HAVE_MMSG and v4 is not None and type(v4) is socket.socket:
            self._mm_buf = bytearray(MMSG_BATCH * MMSG_SLOT)
            self._mm_cdata = (
                _ffi.from_buffer(self._mm_buf),
                _ffi.new("uint32_t[]", MMSG_BATCH),
                _ffi.from_buffer(self._mm_addrs),
                _ffi.new("uint32_t[]", SEND_BATCH),
                _ffi.new("uint32_t[]", SEND_BATCH),
            )
            self._loop.add_reader(v4.fileno(), self._batch, self._readable_mmsg, v4)
        elif v4 is not None:
            self._loop.add_reader(v4.fileno(), self._batch, self._readable, v4)
        if self._v6 is not None:
            self._loop.add_reader(self._v6.fileno(), self._batch, self._readable, self._v6)
        for road in self.roads.values():
            road.start()
        if self.reresolver is not None:
            self._rr_timer = DeadlineTimer(self._loop, self._on_reresolve_timer)
            lookups = self.reresolver.start(self._loop.time())
            await asyncio.gather(*(self._lookup(lk) for lk in lookups))
        now, wall = self._loop.time(), self._wall()
        for p in self.device.peers:
            # wg starts a handshake at once for peers with PersistentKeepalive.
            if p.persistent_keepalive and p.endpoint is not None:
                self._dispatch(self.device.start_handshake(p.index, now, wall))
        self._rearm()

    def close(self) -> None:
        for timer in (self._timer, self._rr_timer):
            if timer is not None:
                timer.cancel()
        for task in list(self._tasks):
            task.cancel()
        for road in self.roads.values():
            road.close()
        for sock in (self._v4, self._v6):
            if sock is not None:
                if self._loop is not None:
                    self._loop.remove_reader(sock.fileno())
                sock.close()
        self._v4 = self._v6 = None

    def _prepare(self, sock: socket.socket) -> socket.socket:
        sock.setblocking(False)
        for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, opt, SOCK_BUF)
        return sock

    def _open_sockets(self) -> None:
        v4 = self._prepare(self._factory(socket.AF_INET, socket.SOCK_DGRAM))
        try:
            v4.bind((self._bind_v4, self.listen_port))
        except OSError:
            v4.close()
            raise
        self._v4 = v4
        port = v4.getsockname()[1]
        if self._bind_v6 is None:
            return
        try:
            v6 = self._prepare(self._factory(socket.AF_INET6, socket.SOCK_DGRAM))
        except OSError:
            return  # no IPv6 on this host
        try:
            v6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            v6.bind((self._bind_v6, port))
        except OSError as exc:
            v6.close()
            if self.listen_port or exc.errno not in (errno.EADDRINUSE, errno.EADDRNOTAVAIL):
                log.warning("ipv6 socket unavailable", error=str(exc))
            return
        self._v6 = v6

    # ------------------------------------------------------------------ data path

    def send_packet(self, packet: bytes, peer: int | None = None) -> None:
        """Send one IP packet into the tunnel (to `peer`, or by AllowedIPs)."""
        assert self._loop is not None, "start() first"
        outs = self.device.send_packet(packet, self._loop.time(), self._wall(), peer)
        self._dispatch(outs)
        self._rearm()

    def send_packets(self, packets: Sequence[tuple[bytes, int | None]]) -> None:
        """Send a batch of (IP packet, peer) with one clock read and one timer re-arm.

        Consecutive packets for one peer are sealed together (`Device.seal_packets`, one C
        call) when the peer's keypair can take them all; else one by one (`seal_packet`).
        """
        assert self._loop is not None, "start() first"
        now, wall = self._loop.time(), self._wall()
        if len(packets) == 1 and self._mm_cdata and self.single_path:
            # One packet (a datagram, an ACK): what the loop below does, without its batching.
            outs1: list[Output] = []
            one1 = self.device.seal_packet(packets[0][0], now, wall, packets[0][1], outs1)
            if one1 is not None:
                addr1, wire1 = one1
                if ":" in addr1[0]:
                    self._send_unbatched(addr1, wire1, [len(wire1)])
                else:
                    self._send_batch(addr1, [wire1], [len(wire1)])
            if outs1:
                self._dispatch(outs1)
            self._rearm()
            return
        seal, seal_many = self.device.seal_packet, self.device.seal_packets
        dispatch = self._dispatch
        batched = bool(self._mm_cdata)
        outs: list[Output] = []
        # Sealed datagrams for pend_addr, sent with one sendmmsg: blobs of messages back to
        # back and every message's length.
        pend: list[bytes] = []
        pend_lens: list[int] = []
        pend_addr = ("", 0)
        i, n = 0, len(packets)
        while i < n:
            packet, peer = packets[i]
            j = i + 1
            if peer is not None and self.seal_batches:
                while j < n and j - i < SEND_BATCH and packets[j][1] == peer:
                    j += 1
            got = None
            if j - i > 1:
                assert peer is not None
                got = seal_many([pkt for pkt, _ in packets[i:j]], now, wall, peer, outs)
            if got is None:
                j = i + 1
                one = seal(packet, now, wall, peer, outs)
                if one is not None:
                    got = one[0], one[1], [len(one[1])]
            i = j
            if got is not None:
                addr, blob, lens = got
                if batched and ":" not in addr[0]:
                    if addr != pend_addr or len(pend_lens) + len(lens) > SEND_BATCH:
                        if pend:
                            self._send_batch(pend_addr, pend, pend_lens)
                            pend, pend_lens = [], []
                        pend_addr = addr
                    pend.append(blob)
                    pend_lens += lens
                else:
                    self._send_unbatched(addr, blob, lens)
            if outs:
                if pend:  # keep the order the device produced
                    self._send_batch(pend_addr, pend, pend_lens)
                    pend, pend_lens = [], []
                dispatch(outs)
                outs = []
        if pend:
            self._send_batch(pend_addr, pend, pend_lens)
        self._rearm()

    def _send_unbatched(self, addr: tuple[str, int], blob: bytes, lens: list[int]) -> None:
        """Messages back to back in blob, one sendto (or road send) each."""
        sent = errors = 0
        road = self.roads.get(addr)
        sock = self._v6 if ":" in addr[0] else self._v4
        o = 0
        for ln in lens:
            data = blob[o : o + ln] if ln != len(blob) else blob
            o += ln
            if road is not None:
                road.send(data)
                sent += 1
            elif sock is None:
                errors += 1
            else:
                try:
                    sock.sendto(data, addr)
                    sent += 1
                except OSError:
                    errors += 1  # EAGAIN or an ICMP error: UDP is lossy
        self.stats["tx_datagrams"] += sent
        self.stats["send_errors"] += errors

    def _send_batch(self, addr: tuple[str, int], blobs: list[bytes], lens: list[int]) -> None:
        """Send up to SEND_BATCH datagrams (lens, their bytes back to back in blobs) to one
        IPv4 address with sendmmsg."""
        sock = self._v4
        n = len(lens)
        if sock is None:
            self.stats["send_errors"] += n
            return
        sa = self._sockaddrs.get(addr)
        if sa is None:
            # struct sockaddr_in: family (host order), port, address, zero padding
            sa = (
                socket.AF_INET.to_bytes(2, "little")
                + addr[1].to_bytes(2, "big")
                + socket.inet_aton(addr[0])
                + bytes(8)
            )
            if len(self._sockaddrs) > 64:
                self._sockaddrs.clear()
            self._sockaddrs[addr] = sa
        offs, clens = self._mm_cdata[3], self._mm_cdata[4]
        o = 0
        for i, ln in enumerate(lens):
            offs[i] = o
            clens[i] = ln
            o += ln
        blob = blobs[0] if len(blobs) == 1 else b"".join(blobs)
        done = 0
        fd = sock.fileno()
        while done < n:
            segs = self.gso_segs
            self.stats["tx_syscalls"] += 1
            if segs > 1:
                r = _lib.wg_sendmmsg_gso(
                    fd, blob, offs + done, clens + done, n - done, sa, 16, segs
                )
                if r in (-errno.EIO, -errno.EINVAL):
                    # The route cannot segment (no checksum offload, an MTU below the
                    # datagrams, a kernel before 4.18): send them one by one from now on.
                    self.gso_segs = 1
                    log.info("udp segmentation offload unavailable", error=os.strerror(-r))
                    continue
            else:
                r = _lib.wg_sendmmsg(fd, blob, offs + done, clens + done, n - done, sa, 16)
            if r <= 0:
                # EAGAIN (socket buffer full) or an ICMP error: drop the first, go on.
                r = 1
                self.stats["send_errors"] += 1
            else:
                self.stats["tx_datagrams"] += r
            done += r

    def _batch(self, read: Callable[[socket.socket], None], sock: socket.socket) -> None:
        """One readable callback: `read(sock)`, then `on_batch_end()` (even if it raised:
        the packets it delivered still get their flush)."""
        self.receiving = True
        try:
            read(sock)
        finally:
            self.receiving = False
            if self.on_batch_end is not None:
                self.on_batch_end()

    def _readable(self, sock: socket.socket) -> None:
        assert self._loop is not None
        dev = self.device
        buf = self._buf
        mv = memoryview(buf)
        now, wall = self._loop.time(), self._wall()
        v6 = sock is self._v6
        recv = sock.recvfrom_into
        receive_transport = dev.receive_transport
        on_packet = self.on_packet
        dispatch = self._dispatch
        outs: list[Output] = []
        handled = delivered = 0
        for _ in range(DRAIN_BATCH):
            try:
                n, addr = recv(buf)
            except BlockingIOError:
                break
            except OSError:
                continue  # e.g. ICMP port unreachable reported on the socket
            handled += 1
            if v6:
                addr = (addr[0], addr[1])
            if buf[0] == 4 and n >= MIN_TRANSPORT_LEN and not (buf[1] or buf[2] or buf[3]):
                # The data path: decrypt straight from the receive buffer, no output objects.
                got = receive_transport(mv[:n], addr, now, wall, outs)
                if outs:
                    dispatch(outs)
                    outs = []
                if got is not None:
                    delivered += 1
                    if on_packet is not None:
                        on_packet(got[0], got[1])
                continue
            if buf[0] in (1, 2):
                self._count_handshake(now)
            outs2 = dev.datagram_received(bytes(mv[:n]), addr, now, wall)
            if outs2:
                dispatch(outs2)
        stats = self.stats
        stats["rx_datagrams"] += handled
        stats["delivered"] += delivered
        self._rearm()

    def _readable_mmsg(self, sock: socket.socket) -> None:
        """`_readable` for the IPv4 socket with recvmmsg: up to MMSG_BATCH per syscall."""
        assert self._loop is not None and self._mm_buf is not None
        dev = self.device
        buf = self._mm_buf
        mv = memoryview(buf)
        addrs = self._mm_addrs
        bufp, lens, addrp = self._mm_cdata[:3]
        recvmmsg = _lib.wg_recvmmsg
        fd = sock.fileno()
        now, wall = self._loop.time(), self._wall()
        receive_transport = dev.receive_transport
        on_packet = self.on_packet
        dispatch = self._dispatch
        outs: list[Output] = []
        handled = delivered = 0
        last_raw, addr = self._mm_last
        for _ in range(DRAIN_BATCH // MMSG_BATCH):
            cnt = recvmmsg(fd, bufp, MMSG_SLOT, MMSG_BATCH, lens, addrp)
            if cnt == 0 or cnt in (-errno.EAGAIN, -errno.EWOULDBLOCK):
                break
            if cnt < 0:
                continue  # e.g. ICMP port unreachable reported on the socket
            handled += cnt
            for i in range(cnt):
                a = i * _ADDR_SLOT
                raw = addrs[a + 2 : a + 8]  # sockaddr_in: port, address
                if raw != last_raw:
                    last_raw = bytes(raw)
                    addr = (socket.inet_ntoa(last_raw[2:]), (raw[0] << 8) | raw[1])
                n = lens[i]
                off = i * MMSG_SLOT
                if n == _TRUNCATED:
                    n = 0  # larger than any datagram we could use: dropped as malformed
                if (
                    buf[off] == 4
                    and n >= MIN_TRANSPORT_LEN
                    and not (buf[off + 1] or buf[off + 2] or buf[off + 3])
                ):
                    got = receive_transport(mv[off : off + n], addr, now, wall, outs)
                    if outs:
                        dispatch(outs)
                        outs = []
                    if got is not None:
                        delivered += 1
                        if on_packet is not None:
                            on_packet(got[0], got[1])
                    continue
                if n and buf[off] in (1, 2):
                    self._count_handshake(now)
                outs2 = dev.datagram_received(bytes(mv[off : off + n]), addr, now, wall)
                if outs2:
                    dispatch(outs2)
            if cnt < MMSG_BATCH:
                break
        self._mm_last = (last_raw, addr)
        stats = self.stats
        stats["rx_datagrams"] += handled
        stats["delivered"] += delivered
        self._rearm()

    def add_road(self, addr: tuple[str, int], road: Road) -> None:
        """Send datagrams for endpoint `addr` (synthetic, never a real host) through `road`."""
        self.roads[addr] = road

    def road_received(self, addr: tuple[str, int], datagrams: Sequence[bytes]) -> None:
        """Datagrams a road received from its peer, handled as if `addr` had sent them."""
        if self._loop is None:
            return
        dev = self.device
        now, wall = self._loop.time(), self._wall()
        on_packet = self.on_packet
        outs: list[Output] = []
        delivered = 0
        for data in datagrams:
            if (
                data[0] == 4
                and len(data) >= MIN_TRANSPORT_LEN
                and not (data[1] or data[2] or data[3])
            ):
                got = dev.receive_transport(data, addr, now, wall, outs)
                if outs:
                    self._dispatch(outs)
                    outs = []
                if got is not None:
                    delivered += 1
                    if on_packet is not None:
                        on_packet(got[0], got[1])
                continue
            if data[0] in (1, 2):
                self._count_handshake(now)
            outs2 = dev.datagram_received(data, addr, now, wall)
            if outs2:
                self._dispatch(outs2)
        self.stats["rx_datagrams"] += len(datagrams)
        self.stats["delivered"] += delivered
        self._rearm()

    def _count_handshake(self, now: float) -> None:
        if now - self._hs_window >= 1.0:
            self.device.under_load = self._hs_count > UNDER_LOAD_HANDSHAKES
            self._hs_window = now
            self._hs_count = 0
        self._hs_count += 1
        if self._hs_count > UNDER_LOAD_HANDSHAKES:
            self.device.under_load = True

    def start_handshake(self, peer: int) -> None:
        """Initiate a handshake with `peer` now (self-test, or a peer we must reach first)."""
        assert self._loop is not None, "start() first"
        self._dispatch(self.device.start_handshake(peer, self._loop.time(), self._wall()))
        self._rearm()

    def _dispatch(self, outs: Sequence[Output]) -> None:
        for o in outs:
            if type(o) is SendDatagram:
                self._sendto(o.addr, o.data)
            elif type(o) is DeliverPacket:
                self.stats["delivered"] += 1
                if self.on_packet is not None:
                    self.on_packet(o.peer, o.packet)
            elif type(o) is PacketDropped:
                pass  # counted in device.counters
            else:
                self._event(o)

    def _sendto(self, addr: tuple[str, int], data: bytes) -> None:
        if self.roads:
            road = self.roads.get(addr)
            if road is not None:
                road.send(data)
                self.stats["tx_datagrams"] += 1
                return
        sock = self._v6 if ":" in addr[0] else self._v4
        if sock is None:
            self.stats["send_errors"] += 1
            return
        try:
            sock.sendto(data, addr)
            self.stats["tx_datagrams"] += 1
        except OSError:
            # EAGAIN (socket buffer full) or an ICMP error: UDP is lossy, WireGuard copes.
            self.stats["send_errors"] += 1

    def _event(self, o: Output) -> None:
        if isinstance(o, ResolveEndpoint):  # only for a peer with a host name
            assert self._loop is not None and self.reresolver is not None
            from wrapguard.tunnel.reresolve import Trigger

            lk = self.reresolver.request(o.peer, Trigger.UNANSWERED, self._loop.time())
            if lk is not None:
                self._spawn_lookup(lk)
        elif isinstance(o, HandshakeCompleted):
            if self._loop is not None and self.reresolver is not None:
                self.reresolver.handshake_completed(o.peer, self._loop.time())
            log.debug("handshake completed", peer=o.peer, initiator=o.initiator)
        elif isinstance(o, HandshakeFailed):
            log.warning("handshake failed: no answer", peer=o.peer)
        elif isinstance(o, EndpointChanged):
            log.debug("peer endpoint changed", peer=o.peer, endpoint=f"{o.addr[0]}:{o.addr[1]}")
        if self.on_event is not None:
            self.on_event(o)

    # ------------------------------------------------------------------ endpoint host names

    def _spawn_lookup(self, lk: Lookup) -> None:
        task = asyncio.ensure_future(self._lookup(lk))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _lookup(self, lk: Lookup) -> None:
        """Resolve one name (the Reresolver allows one lookup per peer at a time) and act."""
        from wrapguard.tunnel.reresolve import (
            KeepEndpoint,
            LookupFailing,
            LookupWorks,
            UseEndpoint,
        )

        assert self._loop is not None and self.reresolver is not None
        rr = self.reresolver
        try:
            addrs = await self._resolve(lk.host, lk.port)
        except Exception as exc:  # OSError, UnicodeError, or a broken custom resolver
            log.debug("endpoint lookup failed", peer=lk.peer, host=lk.host, error=str(exc))
            outs = rr.failed(lk.peer, str(exc) or type(exc).__name__, self._loop.time())
        else:
            ep = self.device.peers[lk.peer].endpoint
            outs = rr.answered(lk.peer, addrs, ep, self._loop.time())
        for o in outs:
            if isinstance(o, UseEndpoint):
                new = f"{o.new[0]}:{o.new[1]}"
                if o.old is None:
                    log.debug("peer endpoint resolved", peer=o.peer, host=o.host, endpoint=new)
                else:
                    log.info(
                        "peer endpoint moved: its host name resolves to a new address",
                        peer=o.peer,
                        host=o.host,
                        old=f"{o.old[0]}:{o.old[1]}",
                        new=new,
                        reason=o.trigger.value,
                    )
                now = self._loop.time()
                self._dispatch(self.device.move_endpoint(o.peer, o.new, now, self._wall()))
                self._rearm()
            elif isinstance(o, KeepEndpoint):
                log.debug(
                    "peer endpoint kept",
                    peer=o.peer,
                    host=o.host,
                    endpoint=None if o.endpoint is None else f"{o.endpoint[0]}:{o.endpoint[1]}",
                    answer=[f"{a[0]}:{a[1]}" for a in o.answer],
                    reason=o.trigger.value,
                )
            elif isinstance(o, LookupFailing):
                log.warning(
                    "endpoint host name does not resolve; trying again later",
                    peer=o.peer,
                    host=o.host,
                    error=o.error,
                )
            elif isinstance(o, LookupWorks):
                log.info("endpoint host name resolves again", peer=o.peer, host=o.host)
        if self._rr_timer is not None:
            self._rr_timer.arm(rr.next_deadline())

    async def _resolve(self, host: str, port: int) -> Sequence[tuple[str, int]]:
        if self._resolver is not None:
            return await self._resolver(host, port)
        assert self._loop is not None
        infos = await self._loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        # IPv4 first (as before), IPv6 only when we have an IPv6 socket to send from.
        v4 = [i[4] for i in infos if i[0] == socket.AF_INET]
        v6 = [i[4] for i in infos if i[0] == socket.AF_INET6] if self._v6 is not None else []
        return [(str(sa[0]), int(sa[1])) for sa in v4 + v6]

    def _on_reresolve_timer(self) -> None:
        assert self._loop is not None and self._rr_timer is not None
        assert self.reresolver is not None
        for lk in self.reresolver.handle_timeout(self._loop.time()):
            self._spawn_lookup(lk)
        self._rr_timer.arm(self.reresolver.next_deadline())

    # ------------------------------------------------------------------ timer

    def _rearm(self) -> None:
        # Lazy: the data path moves the device's deadlines on every packet, mostly later.
        if self._timer is not None:
            self._timer.arm(self.device.next_deadline())

    def _on_timer(self) -> None:
        assert self._loop is not None
        self._dispatch(self.device.handle_timeout(self._loop.time(), self._wall()))
        self._rearm()
