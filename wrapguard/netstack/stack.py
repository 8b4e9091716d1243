"""The userspace IP stack: demultiplexing, listeners, UDP sockets, ICMP, timers, the API.

The runtime feeds decrypted packets to `receive_packet(packet, now)`, hands the packets from
`take_outgoing()` to the tunnel, drains `next_event()`, and calls `handle_timeout(now)` at
`next_deadline()`. Flows are found by a (remote ip, remote port, local ip, local port) dict.
Packets for other addresses, fragments and malformed packets are dropped and counted
(`drops`, plus a `PacketDropped` event). ICMP: echo replies (RFC 792, RFC 4443 4.2), port
unreachable for closed UDP ports (RFC 1122 4.1.3.1), unreachables mapped to errnos.
Randomness (ISNs, ephemeral ports) comes from the injected `rng(bits) -> int`.
"""

from __future__ import annotations

import errno
import heapq
import struct
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address

from wrapguard.errors import DecodeError
from wrapguard.netstack.events import (
    Closed,
    ConnId,
    DatagramReceived,
    DropReason,
    Event,
    IPAddress,
    ListenerId,
    PacketDropped,
    SockId,
    TcpConfig,
    UdpError,
)
from wrapguard.netstack.icmp import echo_reply, parse_quote, port_unreachable, unreach_errno
from wrapguard.netstack.packet import FlowOut
from wrapguard.netstack.tcp import Seg, TcpConn, TcpState, rst_for
from wrapguard.wire.checksum import csum_bytes, finish
from wrapguard.wire.icmp import parse_icmp
from wrapguard.wire.ip import (
    PROTO_ICMP,
    PROTO_ICMPV6,
    PROTO_TCP,
    PROTO_UDP,
    Fragmented,
    IPv4Packet,
    IPv6Packet,
    emit_ip,
    parse_ip,
)
from wrapguard.wire.tcp import ACK, NO_OPTIONS, PSH, RST, SYN, parse_options, parse_tcp
from wrapguard.wire.tcp import HEADER as TCP_HEADER
from wrapguard.wire.udp import UdpDatagram, emit_udp, parse_udp

__all__ = ["ConnInfo", "Stack"]

# RFC 6335 6 / Linux ip_local_port_range.
EPHEMERAL_LOW = 32768
EPHEMERAL_HIGH = 60999
MAX_QUEUED_DROP_EVENTS = 1024
IP_CACHE = 4096  # address objects kept per packed address (UDP sources and destinations)
_V4_UDP = struct.Struct("!BBHHHBBH4s4sHHHH")  # a minimal IPv4 header (DF set) + UDP header
_V6_UDP = struct.Struct("!IHBB16s16sHHHH")  # the fixed IPv6 header + UDP header
_UDP_PORTS = struct.Struct("!HHH")

FlowKey = tuple[bytes, int, bytes, int]


@dataclass(frozen=True, slots=True)
class ConnInfo:
    """Addresses and state of a connection."""

    local: tuple[IPAddress, int]
    remote: tuple[IPAddress, int]
    state: TcpState


_NO_DST = object()  # what udp_send's one-entry cache holds before its first datagram


def _loss_counters(conn: TcpConn) -> dict[str, int]:
    return {
        "retransmits": conn.n_retransmits,
        "recoveries": conn.n_recoveries,
        "timeouts": conn.n_timeouts,
        "lost_retransmits": conn.n_lost_retransmits,
    }


class Stack:
    """A sans-IO IPv4/IPv6 host with TCP, UDP and ICMP echo for our tunnel addresses."""

    def __init__(
        self,
        addresses: Iterable[IPAddress | str],
        *,
        rng: Callable[[int], int],
        mtu: int = 1420,
        config: TcpConfig | None = None,
    ) -> None:
        addrs = [ip_address(a) if isinstance(a, str) else a for a in addresses]
        self.addr4 = [a.packed for a in addrs if isinstance(a, IPv4Address)]
        self.addr6 = [a.packed for a in addrs if isinstance(a, IPv6Address)]
        self._ours = frozenset(self.addr4 + self.addr6)
        if mtu < 1280 and self.addr6:
            raise ValueError("IPv6 needs an MTU of at least 1280")
        self.mtu = mtu
        self.rng = rng
        self.config = config or TcpConfig()
        self.drops: Counter[DropReason] = Counter()
        self._tcp_done: Counter[str] = Counter()  # loss counters of connections gone
        self._out: list[bytes] = []
        self._events: deque[Event] = deque()
        # Datagrams the receive hot path took for bound ports, as plain tuples (sock, source,
        # payload, our address), queued only while _events is empty: so they always precede
        # every queued event, and next_event() (which hands them out first, as
        # DatagramReceived) sees the same order as if they were events. take_datagrams()
        # takes them without an event object each.
        self._dgrams: list[tuple[SockId, tuple[IPAddress, int], bytes, IPAddress]] = []
        self._conns: dict[FlowKey, TcpConn] = {}
        self._by_id: dict[int, TcpConn] = {}
        self._listeners: dict[int, ListenerId] = {}
        self._listen_filters: dict[int, Callable[[bytes], bool]] = {}
        self._udp: dict[int, SockId] = {}
        self._udp_ports: dict[int, int] = {}
        # Per (source, destination) address pair: the pseudo-header's address sum, and for
        # IPv4 the header words' sum without Total Length (udp_send's hot path).
        self._udp_sums: dict[tuple[bytes, bytes], tuple[int, int]] = {}
        self._ips: dict[bytes, IPAddress] = {}  # packed -> address object (DatagramReceived)
        self._last_dst: tuple[object, bytes] = (_NO_DST, b"")  # udp_send's last (dst, packed)
        self._ack_list: list[TcpConn] = []
        self._timers: list[tuple[float, int, TcpConn]] = []
        self._next_id = 1
        self._timer_seq = 0
        self._drop_events = 0

    # ---------------------------------------------------------------- inbound

    def receive_packet(self, packet: bytes, now: float) -> None:
        """Process one IP packet from the tunnel."""
        # Hot path: TCP right after a plain IPv4 or IPv6 header, for one of our addresses.
        n = len(packet)
        if n >= 40:
            b0 = packet[0]
            if b0 == 0x45 and packet[9] == PROTO_TCP and not packet[6] & 0x3F and not packet[7]:
                total = (packet[2] << 8) | packet[3]
                dst = packet[16:20]
                if 40 <= total <= n and dst in self._ours:
                    self._rx_tcp_fast(packet[12:16], dst, packet, 20, total, now)
                    return
            elif b0 >> 4 == 6 and packet[6] == PROTO_TCP and n >= 60:
                total = 40 + ((packet[4] << 8) | packet[5])
                dst = packet[24:40]
                if 60 <= total <= n and dst in self._ours:
                    self._rx_tcp_fast(packet[8:24], dst, packet, 40, total, now)
                    return
        if n >= 28 and self._udp:
            # Hot path: UDP right after a plain IPv4 or IPv6 header, to a bound port.
            b0 = packet[0]
            if b0 == 0x45:
                if (
                    packet[9] == PROTO_UDP
                    and not packet[6] & 0x3F
                    and not packet[7]
                    and self._rx_udp_fast(packet, 12, 16, 20, (packet[2] << 8) | packet[3])
                ):
                    return
            elif (
                b0 >> 4 == 6
                and packet[6] == PROTO_UDP
                and n >= 48
                and self._rx_udp_fast(packet, 8, 24, 40, 40 + ((packet[4] << 8) | packet[5]))
            ):
                return
        try:
            pkt = parse_ip(packet)
        except Fragmented:
            self._drop(DropReason.FRAGMENT)
            return
        except DecodeError:
            self._drop(DropReason.MALFORMED)
            return
        if pkt.dst not in self._ours:
            self._drop(DropReason.NOT_OUR_ADDRESS)
            return
        proto = pkt.proto
        if proto == PROTO_TCP:
            self._rx_tcp(pkt.src, pkt.dst, pkt.payload, now)
        elif proto == PROTO_UDP:
            self._rx_udp(pkt)
        elif proto == (PROTO_ICMP if pkt.version == 4 else PROTO_ICMPV6):
            self._rx_icmp(pkt)
        else:
            self._drop(DropReason.UNKNOWN_PROTOCOL)

    def _drop(self, reason: DropReason) -> None:
        self.drops[reason] += 1
        if self._drop_events < MAX_QUEUED_DROP_EVENTS:
            self._drop_events += 1
            self._events.append(PacketDropped(reason))

    def _rx_tcp_fast(
        self, src: bytes, dst: bytes, packet: bytes, off: int, total: int, now: float
    ) -> None:
        sport, dport, seq, ack, doff, flags, window, _c, _u = TCP_HEADER.unpack_from(packet, off)
        doff = (doff >> 4) * 4
        conn = self._conns.get((src, sport, dst, dport))
        if conn is None or doff < 20 or off + doff > total:
            self._rx_tcp(src, dst, packet[off:total], now)
            return
        if doff == 20 and flags & ~PSH == ACK:
            if total == off + 20:
                # A pure ACK of data we sent (the sender's common case), without a Seg.
                if conn.rx_pure_ack(seq, ack, window, now):
                    self._after(conn)
                    return
            else:
                # In-order data on an established flow: header prediction without a Seg.
                delack = conn.t_delack
                if conn.rx_predicted(seq, ack, window, packet[off + 20 : total], now):
                    if conn.t_delack is not delack:
                        self._after(conn)  # a new deadline: the only state _after looks at
                    elif conn.ack_due and not conn.queued_ack:
                        conn.queued_ack = True
                        self._ack_list.append(conn)
                    return
        try:
            opts = parse_options(packet[off + 20 : off + doff]) if doff > 20 else NO_OPTIONS
        except DecodeError:
            self._drop(DropReason.MALFORMED)
            return
        seg = Seg(seq, ack, flags, window, packet[off + doff : total], opts)
        if conn.state is TcpState.TIME_WAIT and flags & (SYN | ACK) == SYN:
            self._rx_tcp(src, dst, packet[off:total], now)
            return
        if not conn.on_segment(seg, now):
            self._drop(DropReason.OUT_OF_WINDOW)
        self._after(conn)

    def _rx_tcp(self, src: bytes, dst: bytes, body: bytes, now: float) -> None:
        try:
            tseg = parse_tcp(body)
        except DecodeError:
            self._drop(DropReason.MALFORMED)
            return
        seg = Seg.of(tseg)
        key = (src, tseg.src_port, dst, tseg.dst_port)
        conn = self._conns.get(key)
        if conn is not None:
            if conn.state is TcpState.TIME_WAIT and seg.flags & (SYN | ACK) == SYN:
                # A new SYN for a flow in TIME-WAIT (RFC 9293 3.10.7.4 fourth, as Linux
                # does): forget the old incarnation and let the listener take it.
                self._remove(conn)
            else:
                if not conn.on_segment(seg, now):
                    self._drop(DropReason.OUT_OF_WINDOW)
                self._after(conn)
                return
        port = tseg.dst_port
        lst = self._listeners.get(port)
        if lst is not None:
            accepts = self._listen_filters.get(port)
            if accepts is not None and not accepts(dst):
                lst = None  # the listener does not take this address: as if closed
        flags = seg.flags
        if flags & RST:
            self._drop(DropReason.NO_LISTENER if lst is None else DropReason.BAD_FLAGS)
            return
        if lst is None or flags & ACK or not flags & SYN:
            # RFC 9293 3.10.7.1 (CLOSED) and 3.10.7.2 (LISTEN, an ACK): answer with a RST.
            if lst is None or flags & ACK:
                seq, ack, rflags = rst_for(seg)
                FlowOut(self._out, dst, src, port, tseg.src_port).tcp(seq, ack, rflags, 0, b"", b"")
            self._drop(DropReason.NO_LISTENER if lst is None else DropReason.BAD_FLAGS)
            return
        pending = (
            sum(
                1
                for c in self._by_id.values()
                if c.listener == lst and c.state is TcpState.SYN_RECEIVED
            )
            if len(self._by_id) >= self.config.backlog
            else 0
        )
        if pending >= self.config.backlog:
            self._drop(DropReason.BACKLOG_FULL)
            return
        conn = self._new_conn(dst, port, src, tseg.src_port, lst)
        conn.open_passive(seg, now)
        self._after(conn)

    def _new_conn(
        self, lip: bytes, lport: int, rip: bytes, rport: int, listener: ListenerId | None
    ) -> TcpConn:
        cid = ConnId(self._alloc_id())
        out = FlowOut(self._out, lip, rip, lport, rport)
        conn = TcpConn(cid, out, self._events, self.config, self.mtu, self.rng(32), listener)
        self._conns[(rip, rport, lip, lport)] = conn
        self._by_id[cid] = conn
        return conn

    def _alloc_id(self) -> int:
        n = self._next_id
        self._next_id += 1
        return n

    def _after(self, conn: TcpConn) -> None:
        """Bookkeeping after the stack called into a connection."""
        if conn.state is TcpState.CLOSED:
            self._remove(conn)
            return
        if conn.ack_due and not conn.queued_ack:
            conn.queued_ack = True
            self._ack_list.append(conn)
        d = conn.next_deadline()
        if d is not None and (conn.sched is None or d < conn.sched):
            conn.sched = d
            self._timer_seq += 1
            heapq.heappush(self._timers, (d, self._timer_seq, conn))

    def _remove(self, conn: TcpConn) -> None:
        key = (conn.out.dst, conn.out.dport, conn.out.src, conn.out.sport)
        if self._conns.get(key) is conn:
            del self._conns[key]
            self._tcp_done.update(_loss_counters(conn))
        if not conn.reported:
            self._by_id.pop(conn.id, None)
        conn.sched = None

    def tcp_counters(self) -> dict[str, int]:
        """Retransmitted segments, fast recoveries, timeouts and the times retransmissions
        were found lost (one such finding may resend several segments) of all connections
        so far."""
        total = Counter(self._tcp_done)
        for conn in self._conns.values():
            total.update(_loss_counters(conn))
        keys = ("retransmits", "recoveries", "timeouts", "lost_retransmits")
        return {k: total[k] for k in keys}

    def _ip(self, packed: bytes) -> IPAddress:
        ip = self._ips.get(packed)
        if ip is None:
            if len(self._ips) >= IP_CACHE:
                self._ips.clear()
            ip = self._ips[packed] = ip_address(packed)
        return ip

    def _rx_udp_fast(self, packet: bytes, s: int, d: int, off: int, total: int) -> bool:
        """`_rx_udp` for a datagram to a bound port of ours: True when delivered, False to
        take the general path (anything else, including what that path drops)."""
        alen = d - s
        if total > len(packet) or total < off + 8:
            return False
        dst = packet[d : d + alen]
        sport, dport, length = _UDP_PORTS.unpack_from(packet, off)
        sock = self._udp.get(dport)
        if sock is None or dst not in self._ours or length < 8 or off + length > total:
            return False
        src = (self._ip(packet[s:d]), sport)
        data = bytes(packet[off + 8 : off + length])
        if self._events:
            self._events.append(DatagramReceived(sock, src, data, self._ip(dst)))
        else:
            self._dgrams.append((sock, src, data, self._ip(dst)))
        return True

    def _rx_udp(self, pkt: IPv4Packet | IPv6Packet) -> None:
        try:
            d = parse_udp(pkt.payload)
        except DecodeError:
            self._drop(DropReason.MALFORMED)
            return
        sock = self._udp.get(d.dst_port)
        if sock is None:
            self._drop(DropReason.NO_SOCKET)
            self._out.append(port_unreachable(pkt))
            return
        self._events.append(
            DatagramReceived(sock, (self._ip(pkt.src), d.src_port), d.payload, self._ip(pkt.dst))
        )

    def _rx_icmp(self, pkt: IPv4Packet | IPv6Packet) -> None:
        try:
            msg = parse_icmp(pkt.payload)
        except DecodeError:
            self._drop(DropReason.MALFORMED)
            return
        reply = echo_reply(pkt, msg)
        if reply is not None:
            self._out.append(reply)
            return
        err = unreach_errno(pkt.version == 4, msg)
        if err is not None and self._deliver_icmp_error(msg.payload, pkt.version == 4, err):
            return
        self._drop(DropReason.UNMATCHED_ICMP)

    def _deliver_icmp_error(self, q: bytes, v4: bool, err: int) -> bool:
        """Hand an ICMP error to the flow whose header it quotes."""
        quote = parse_quote(q, v4)
        if quote is None or quote.src not in self._ours:
            return False
        if quote.proto == PROTO_TCP:
            conn = self._conns.get((quote.dst, quote.dport, quote.src, quote.sport))
            if conn is None:
                return False
            conn.on_icmp_error(err, quote.seq)
            self._after(conn)
            return True
        if quote.proto == PROTO_UDP:
            sock = self._udp.get(quote.sport)
            if sock is None:
                return False
            self._events.append(UdpError(sock, (ip_address(quote.dst), quote.dport), err))
            return True
        return False

    # --------------------------------------------------------------- outbound

    def take_outgoing(self) -> list[bytes]:
        """IP packets to hand to the tunnel; pending ACKs are flushed here, batched."""
        if self._ack_list:
            for conn in self._ack_list:
                conn.queued_ack = False
                if conn.ack_due and conn.state is not TcpState.CLOSED:
                    conn.send_ack()
                    self._after(conn)
            self._ack_list = []
        out = self._out
        if not out:
            return []
        taken = out[:]
        out.clear()  # the FlowOuts keep appending to this same list
        return taken

    def quiet(self) -> bool:
        """Nothing waits to be taken but outgoing packets: no event, no datagram and no
        delayed ACK (take_outgoing() then produces no event)."""
        return not (self._events or self._dgrams or self._ack_list)

    def idle(self) -> bool:
        """quiet(), and no outgoing packet either: nothing at all to take."""
        return not (self._out or self._events or self._dgrams or self._ack_list)

    def take_datagrams(self) -> list[tuple[SockId, tuple[IPAddress, int], bytes, IPAddress]]:
        """The datagrams received for bound ports that precede every queued event, as
        (sock, source, payload, our address): what next_event() would return first as
        DatagramReceived, without an event object each. Take these, then the events."""
        got = self._dgrams
        if not got:
            return []
        self._dgrams = []
        return got

    def next_event(self) -> Event | None:
        """The next event, or None."""
        if self._dgrams:  # they precede every queued event: in front of them, as events
            got, self._dgrams = self._dgrams, []
            self._events.extendleft(DatagramReceived(*d) for d in reversed(got))
        if self._events:
            ev = self._events.popleft()
            if isinstance(ev, PacketDropped):
                self._drop_events -= 1
            elif isinstance(ev, Closed):
                self._by_id.pop(ev.conn, None)  # the id stays valid until its Closed is taken
            return ev
        return None

    # ----------------------------------------------------------------- timers

    def next_deadline(self) -> float | None:
        """When `handle_timeout` should be called next (possibly early), or None."""
        timers = self._timers
        while timers:
            d, _seq, conn = timers[0]
            if conn.sched == d and conn.state is not TcpState.CLOSED:
                return d
            heapq.heappop(timers)
        return None

    def handle_timeout(self, now: float) -> None:
        """Run every timer due at `now`."""
        timers = self._timers
        while timers and timers[0][0] <= now:
            d, _seq, conn = heapq.heappop(timers)
            if conn.sched != d or conn.state is TcpState.CLOSED:
                continue
            conn.sched = None
            conn.on_timeout(now)
            self._after(conn)

    # -------------------------------------------------------------------- TCP

    def _conn(self, cid: ConnId) -> TcpConn:
        conn = self._by_id.get(cid)
        if conn is None:
            raise OSError(errno.EBADF, f"no such connection {cid}")
        return conn

    def connect(self, dst: IPAddress | str, port: int, now: float, local_port: int = 0) -> ConnId:
        """Start an active open (from `local_port`, or an ephemeral one); `Connected` or
        `ConnectFailed` follows. EADDRINUSE if that exact flow exists."""
        rip = (ip_address(dst) if isinstance(dst, str) else dst).packed
        if not 0 < port < 65536 or not 0 <= local_port < 65536:
            raise ValueError(f"bad port {port}")
        srcs = self.addr4 if len(rip) == 4 else self.addr6
        if not srcs:
            raise OSError(errno.ENETUNREACH, "no tunnel address of that family")
        lip = srcs[0]
        if local_port:
            if (rip, port, lip, local_port) in self._conns:
                raise OSError(errno.EADDRINUSE, "that flow already exists")
            conn = self._new_conn(lip, local_port, rip, port, None)
            conn.open_active(now)
            self._after(conn)
            return conn.id
        span = EPHEMERAL_HIGH - EPHEMERAL_LOW + 1
        start = self.rng(16) % span
        for i in range(span):
            lport = EPHEMERAL_LOW + (start + i) % span
            if (rip, port, lip, lport) not in self._conns:
                break
        else:
            raise OSError(errno.EADDRNOTAVAIL, "no free ephemeral port")
        conn = self._new_conn(lip, lport, rip, port, None)
        conn.open_active(now)
        self._after(conn)
        return conn.id

    def listen(self, port: int, accepts: Callable[[bytes], bool] | None = None) -> ListenerId:
        """Accept connections to `port` on all our addresses, or on those (packed) for which
        `accepts` is true; a SYN to any other gets a RST, as a closed port does."""
        if port in self._listeners:
            raise OSError(errno.EADDRINUSE, f"port {port} already listening")
        if not 0 < port < 65536:
            raise ValueError(f"bad port {port}")
        lid = ListenerId(self._alloc_id())
        self._listeners[port] = lid
        if accepts is not None:
            self._listen_filters[port] = accepts
        return lid

    def unlisten(self, port: int) -> None:
        """Stop listening; half-open connections of that listener are reset."""
        lid = self._listeners.pop(port, None)
        self._listen_filters.pop(port, None)
        for conn in list(self._by_id.values()):
            if conn.listener == lid and conn.state is TcpState.SYN_RECEIVED:
                conn.abort()
                self._after(conn)

    def send(self, cid: ConnId, data: bytes | bytearray | memoryview, now: float) -> int:
        """Queue data; returns how many bytes the send buffer took (0 when full)."""
        conn = self._conn(cid)
        n = conn.send(data, now)
        self._after(conn)
        return n

    def recv(self, cid: ConnId, max_bytes: int = 1 << 20) -> bytes:
        """Up to max_bytes of received data; b"" if none is waiting."""
        conn = self._conn(cid)
        data = conn.recv(max_bytes)
        self._after(conn)
        return data

    def shutdown_write(self, cid: ConnId, now: float) -> None:
        """Half-close: a FIN follows the queued data."""
        conn = self._conn(cid)
        conn.shutdown_write(now)
        self._after(conn)

    def close(self, cid: ConnId, now: float) -> None:
        """Close both directions (FIN; RST if unread data remains); `Closed` follows."""
        conn = self._conn(cid)
        conn.close(now)
        self._after(conn)

    def abort(self, cid: ConnId, now: float) -> None:
        """Reset the connection at once; `Closed` follows."""
        conn = self._conn(cid)
        conn.abort()
        self._after(conn)

    def conn_info(self, cid: ConnId) -> ConnInfo:
        """Local and remote address of a connection."""
        conn = self._conn(cid)
        o = conn.out
        return ConnInfo((ip_address(o.src), o.sport), (ip_address(o.dst), o.dport), conn.state)

    def buffered(self, cid: ConnId) -> tuple[int, int]:
        """(bytes waiting to be read, bytes queued or unacked in the send buffer)."""
        conn = self._conn(cid)
        return len(conn.rcv_buf), conn.snd_queued()

    # -------------------------------------------------------------------- UDP

    def udp_bind(self, port: int = 0) -> SockId:
        """Bind a UDP port on all our addresses (0: an ephemeral one)."""
        if port == 0:
            span = EPHEMERAL_HIGH - EPHEMERAL_LOW + 1
            start = self.rng(16) % span
            for i in range(span):
                port = EPHEMERAL_LOW + (start + i) % span
                if port not in self._udp:
                    break
            else:
                raise OSError(errno.EADDRNOTAVAIL, "no free UDP port")
        elif port in self._udp or not 0 < port < 65536:
            raise OSError(errno.EADDRINUSE, f"UDP port {port} in use")
        sid = SockId(self._alloc_id())
        self._udp[port] = sid
        self._udp_ports[sid] = port
        return sid

    def udp_port(self, sock: SockId) -> int:
        """The local port of a UDP socket."""
        return self._udp_ports[sock]

    def udp_send(
        self, sock: SockId, dst: tuple[IPAddress | str, int], data: bytes, now: float
    ) -> None:
        """Send one datagram from our address of dst's family."""
        port, src, rip, dport = self._udp_check(sock, dst, len(data))
        sums = self._udp_sums.get((src, rip))
        if sums is None:
            sums = self._udp_pair_sums(src, rip)
        length = 8 + len(data)
        # The UDP checksum over the pseudo-header, the UDP header and the payload: the same
        # bytes as emit_udp() + emit_ip() (tests/netstack compare the two).
        csum = finish(csum_bytes(data, sums[0] + PROTO_UDP + length + port + dport + length))
        if len(rip) == 4:
            total = 20 + length
            ipsum = finish(sums[1] + total)
            hdr = _V4_UDP.pack(
                0x45, 0, total, 0, 0x4000, 64, PROTO_UDP, ipsum, src, rip,
                port, dport, length, csum or 0xFFFF,
            )  # fmt: skip
        else:
            hdr = _V6_UDP.pack(
                6 << 28, length, PROTO_UDP, 64, src, rip, port, dport, length, csum or 0xFFFF
            )
        self._out.append(hdr + bytes(data))

    def _udp_pair_sums(self, src: bytes, dst: bytes) -> tuple[int, int]:
        """The address sums udp_send needs for one source/destination pair (cached)."""
        addr_sum = int.from_bytes(src + dst, "big") % 0xFFFF
        ip_sum = 0
        if len(dst) == 4:  # version/IHL, DF, TTL/protocol and the addresses (RFC 791 3.1)
            ip_sum = 0x4500 + 0x4000 + ((64 << 8) | PROTO_UDP) + addr_sum
        if len(self._udp_sums) >= IP_CACHE:
            self._udp_sums.clear()
        self._udp_sums[(src, dst)] = sums = (addr_sum, ip_sum)
        return sums

    def udp_send_generic(
        self, sock: SockId, dst: tuple[IPAddress | str, int], data: bytes, now: float
    ) -> None:
        """`udp_send` through the general codecs (emit_udp, emit_ip): the reference the
        tests compare the hot path's packets with."""
        port, src, rip, dport = self._udp_check(sock, dst, len(data))
        body = emit_udp(UdpDatagram(port, dport, bytes(data)), src, rip)
        pkt: IPv4Packet | IPv6Packet
        if len(rip) == 4:
            pkt = IPv4Packet(src, rip, PROTO_UDP, body)
        else:
            pkt = IPv6Packet(src, rip, PROTO_UDP, body)
        self._out.append(emit_ip(pkt))

    def _udp_check(
        self, sock: SockId, dst: tuple[IPAddress | str, int], size: int
    ) -> tuple[int, bytes, bytes, int]:
        """(local port, our source, destination, its port) for a datagram of `size` bytes;
        OSError: no such socket, no tunnel address of that family, larger than the MTU."""
        port = self._udp_ports.get(sock)
        if port is None:
            raise OSError(errno.EBADF, f"no such UDP socket {sock}")
        addr, dport = dst
        last = self._last_dst
        if addr is last[0]:  # a flow sends to one address object again and again
            rip = last[1]
        else:
            rip = (ip_address(addr) if isinstance(addr, str) else addr).packed
            self._last_dst = (addr, rip)
        srcs = self.addr4 if len(rip) == 4 else self.addr6
        if not srcs:
            raise OSError(errno.ENETUNREACH, "no tunnel address of that family")
        if size + 8 + (20 if len(rip) == 4 else 40) > self.mtu:
            raise OSError(errno.EMSGSIZE, "datagram larger than the tunnel MTU")
        return port, srcs[0], rip, dport

    def udp_close(self, sock: SockId) -> None:
        """Release a UDP socket."""
        port = self._udp_ports.pop(sock, None)
        if port is not None:
            del self._udp[port]

    # ---------------------------------------------------------------- helpers

    def connection_count(self) -> int:
        """Connections in the flow table (including TIME-WAIT)."""
        return len(self._conns)
