"""The WireGuard device: our static key, several peers, cryptokey routing and timers [W 3-6].

Theory of operation. Three entry points take input and return a list of outputs (events.py):
`datagram_received` (a UDP datagram from the network), `send_packet` (an IP packet from our
side) and `handle_timeout` (the runtime calls it at `next_deadline()`). `now` is a monotonic
clock in seconds, `wall_time` a Unix time used only for TAI64N. Randomness (indices, ephemeral
keys, jitter, cookie secrets) comes from the injected `rng(n) -> bytes`. Bad remote input is
dropped with a `DropReason` and changes no state; local misuse (bad peer index) raises.
Timers [W 6] are per-peer deadlines: the send/receive paths arm and disarm them (comments
name the rule), and `_timers_fire` is the one function that compares them with `now`.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Callable, Sequence

from wrapguard.keys import PrivateKey
from wrapguard.noise.cookie import CookieChecker
from wrapguard.noise.crypto import tai64n
from wrapguard.noise.handshake import (
    InitiationConsumed,
    LocalStatic,
    RemoteStatic,
    consume_initiation,
    consume_response,
    create_initiation,
    create_response,
)
from wrapguard.noise.reasons import DropReason
from wrapguard.noise.session import Keypair
from wrapguard.tunnel.allowedips import AllowedIPs, Network
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
from wrapguard.tunnel.peer import Peer, PeerSpec, endpoint_bytes, normalize_endpoint
from wrapguard.tunnel.timers import TimerConfig
from wrapguard.wire import wgmsg

Rng = Callable[[int], bytes]
_RX_HDR = struct.Struct("<IIQ")  # [W 5.4.6] type+reserved, receiver, counter


class Device:
    """A WireGuard interface without I/O. See the module docstring for the contract."""

    def __init__(
        self,
        private_key: PrivateKey,
        peers: Sequence[PeerSpec],
        *,
        rng: Rng,
        timers: TimerConfig | None = None,
        mtu: int = 1420,
    ) -> None:
        self.timers = timers if timers is not None else TimerConfig()
        self._rekey_rx_age = self.timers.rekey_on_receive_age  # hot path: a property
        self.mtu = mtu
        self.under_load = False  # set by the runtime; enables mac2 checks [W 5.3]
        self.counters: dict[DropReason, int] = dict.fromkeys(DropReason, 0)
        self._rng = rng
        self._local = LocalStatic(private_key.raw)
        self._checker = CookieChecker(self._local.public, rng)
        self.peers: list[Peer] = []
        self._by_key: dict[bytes, Peer] = {}
        self._index: dict[int, tuple[Peer, Keypair | None]] = {}
        self._routes: AllowedIPs[Peer] = AllowedIPs()
        for i, spec in enumerate(peers):
            if spec.public_key.raw in self._by_key:
                raise ValueError(f"peer {i} repeats the public key of an earlier peer")
            peer = Peer(i, spec, self._local, self.timers.staged_queue_len)
            self.peers.append(peer)
            self._by_key[spec.public_key.raw] = peer
            for net in spec.allowed_ips:
                self._routes.insert(net, peer)

    # ------------------------------------------------------------------ public API

    @property
    def public_key(self) -> bytes:
        return self._local.public

    def route(self, dst: bytes) -> int | None:
        """The peer whose AllowedIPs hold `dst` (packed address), longest prefix first."""
        peer = self._routes.lookup(dst)
        return None if peer is None else peer.index

    def add_allowed_source(self, peer: int, network: Network | str) -> None:
        """Also accept inner packets from `network` out of `peer` (policy routes)."""
        self.peers[peer].extra_sources.append(ipaddress.ip_network(network, strict=False))

    def set_endpoint(self, peer: int, addr: tuple[str, int]) -> None:
        """Set the endpoint, e.g. after the runtime resolved a hostname."""
        norm = normalize_endpoint(addr)
        if norm is None:
            raise ValueError(f"endpoint host must be an IP literal, got {addr[0]!r}")
        self.peers[peer].endpoint = norm

    def move_endpoint(
        self, peer: int, addr: tuple[str, int], now: float, wall_time: float
    ) -> list[Output]:
        """Set an endpoint found by resolving the peer's host name again. A handshake under
        way (retry timer armed) sends its initiation there now: the earlier ones went where
        nobody answers, and the next retry is up to Rekey-Timeout away [W 6.4]."""
        self.set_endpoint(peer, addr)
        p = self.peers[peer]
        out: list[Output] = []
        if p.t_retransmit is not None:
            self._initiate(p, now, wall_time, True, out)
        return out

    def start_handshake(self, peer: int, now: float, wall_time: float) -> list[Output]:
        """Initiate now (as wg does at start for peers with PersistentKeepalive)."""
        out: list[Output] = []
        self._initiate(self.peers[peer], now, wall_time, False, out)
        return out

    def next_deadline(self) -> float | None:
        best: float | None = None
        for p in self.peers:
            t = p.next_deadline()
            if t is not None and (best is None or t < best):
                best = t
        return best

    def handle_timeout(self, now: float, wall_time: float) -> list[Output]:
        out: list[Output] = []
        for p in self.peers:
            t = p.next_deadline()
            if t is not None and t <= now:
                self._timers_fire(p, now, wall_time, out)
        return out

    def send_packet(
        self, packet: bytes, now: float, wall_time: float, peer: int | None = None
    ) -> list[Output]:
        """Encrypt an IP packet to `peer`, or to the AllowedIPs match of its destination."""
        if peer is None:
            v = packet[0] >> 4 if packet else 0
            dst = packet[16:20] if v == 4 else packet[24:40] if v == 6 else b""
            p = self._routes.lookup(dst)
            if p is None:
                return [self._drop(DropReason.NO_ROUTE, None)]
        else:
            p = self.peers[peer]
        out: list[Output] = []
        self._send(p, packet, now, wall_time, out)
        return out

    def seal_packet(
        self,
        packet: bytes,
        now: float,
        wall_time: float,
        peer: int | None,
        out: list[Output],
    ) -> tuple[tuple[str, int], bytes] | None:
        """The per-packet send path: `send_packet` without an output object for the datagram.

        Returns (endpoint, transport message) to send when the packet could be sealed at
        once; other outputs (a rekey initiation, drops, staging) go to `out` and must be
        acted on after the returned datagram is sent, as `send_packet` orders them.
        """
        if peer is None:
            b0 = packet[0] >> 4 if packet else 0
            dst = packet[16:20] if b0 == 4 else packet[24:40] if b0 == 6 else b""
            p = self._routes.lookup(dst)
            if p is None:
                out.append(self._drop(DropReason.NO_ROUTE, None))
                return None
        else:
            p = self.peers[peer]
        ready = self._sealable(p, now, 1)
        if ready is None:
            self._send(p, packet, now, wall_time, out)  # staging and handshakes
            return None
        kp, ep = ready
        wire = kp.seal(packet, self.mtu)
        assert wire is not None
        self._sent(p, kp, len(wire), bool(packet), now, wall_time, out)
        return ep, wire

    def seal_packets(
        self,
        packets: Sequence[bytes],
        now: float,
        wall_time: float,
        peer: int,
        out: list[Output],
    ) -> tuple[tuple[str, int], bytes, list[int]] | None:
        """`seal_packet` for several packets to one peer at once, when its current keypair
        can seal them all: (endpoint, the transport messages back to back, their lengths).
        None, with nothing done, when it cannot (no session, staging, a keypair too old or
        short of counters): the caller then sends them one by one with `seal_packet`.
        """
        p = self.peers[peer]
        ready = self._sealable(p, now, len(packets))
        if ready is None:
            return None
        kp, ep = ready
        blob, lens = kp.seal_batch(packets, self.mtu)
        self._sent(p, kp, len(blob), any(packets), now, wall_time, out)
        return ep, blob, lens

    def _sealable(self, p: Peer, now: float, n: int) -> tuple[Keypair, tuple[str, int]] | None:
        """The keypair and endpoint to seal n packets to p with at once, or None when they
        must wait for a handshake or be staged."""
        kp = p.current
        ep = p.endpoint
        if (
            kp is None
            or ep is None
            or p.staged
            or now - kp.created >= self.timers.reject_after_time  # [W 6.1]
            or kp.send_counter + n > kp.reject_after_messages
        ):
            return None
        return kp, ep

    def datagram_received(
        self, data: bytes, addr: tuple[str, int], now: float, wall_time: float
    ) -> list[Output]:
        """Handle one UDP datagram from `addr` (canonical IP text, port)."""
        n = len(data)
        if n < 4 or data[1] or data[2] or data[3]:
            return [self._drop(DropReason.MALFORMED, None)]
        kind = data[0]
        if kind == wgmsg.MSG_TRANSPORT and n >= wgmsg.MIN_TRANSPORT_LEN:
            return self._on_transport(data, addr, now, wall_time)
        if kind == wgmsg.MSG_INITIATION and n == wgmsg.INITIATION_LEN:
            return self._on_initiation(data, addr, now, wall_time)
        if kind == wgmsg.MSG_RESPONSE and n == wgmsg.RESPONSE_LEN:
            return self._on_response(data, addr, now, wall_time)
        if kind == wgmsg.MSG_COOKIE_REPLY and n == wgmsg.COOKIE_REPLY_LEN:
            return self._on_cookie_reply(data, now)
        return [self._drop(DropReason.MALFORMED, None)]

    # ------------------------------------------------------------------ receive paths

    def _drop(self, reason: DropReason, peer: Peer | None) -> PacketDropped:
        self.counters[reason] += 1
        return PacketDropped(reason, None if peer is None else peer.index)

    def _on_transport(
        self, data: bytes, addr: tuple[str, int], now: float, wall_time: float
    ) -> list[Output]:
        out: list[Output] = []
        got = self.receive_transport(data, addr, now, wall_time, out)
        if got is not None:
            out.append(DeliverPacket(got[0], got[1]))
        return out

    def receive_transport(
        self,
        data: bytes | memoryview,
        addr: tuple[str, int],
        now: float,
        wall_time: float,
        out: list[Output],
    ) -> tuple[int, bytes] | None:
        """The per-packet receive path for one transport message [W 5.4.6].

        `data` is the whole datagram (bytes or a memoryview the caller may reuse afterwards:
        nothing keeps a reference to it); its length and type byte must already be checked
        (type 4, zero reserved bytes, >= 32 bytes). Returns (peer index, inner packet) to
        deliver, or None. Other outputs (drops, endpoint changes, handshakes) go to `out`,
        in the order `datagram_received` would return them, before the delivery.
        """
        _, receiver, counter = _RX_HDR.unpack_from(data)
        entry = self._index.get(receiver)
        if entry is None:
            out.append(self._drop(DropReason.UNKNOWN_INDEX, None))
            return None
        p, kp = entry
        if kp is None:  # the index of a pending handshake, not of a keypair
            out.append(self._drop(DropReason.UNKNOWN_INDEX, p))
            return None
        t = self.timers
        if now - kp.created >= t.reject_after_time:  # [W 6.1] Reject-After-Time
            out.append(self._drop(DropReason.KEYPAIR_EXPIRED, p))
            return None
        if not kp.check_counter(counter):
            if counter >= kp.reject_after_messages:
                out.append(self._drop(DropReason.KEYPAIR_EXPIRED, p))
            else:
                out.append(self._drop(DropReason.REPLAYED_COUNTER, p))
            return None
        plain = kp.open(data, counter)
        if plain is None:
            out.append(self._drop(DropReason.DECRYPT_FAILED, p))
            return None
        # Authenticated from here on.
        p.rx_bytes += len(data)
        if addr != p.endpoint:  # [W 6.5] roaming: follow the latest authenticated source
            p.endpoint = addr
            out.append(EndpointChanged(p.index, addr))
        if kp is not p.current:
            if kp is p.next:
                self._confirm_next(p, now, wall_time, out)
        elif kp.is_initiator and now - kp.created >= self._rekey_rx_age:
            self._initiate(p, now, wall_time, False, out)  # [W 6.2] keep key fresh
        p.t_new_handshake = None  # any authenticated packet received
        if p.persistent_keepalive:
            p.t_persistent = now + p.persistent_keepalive
        if not plain:
            return None  # keepalive
        # [W 6.3] passive keepalive: answer data with a keepalive if we stay silent
        if p.t_send_keepalive is None:
            p.t_send_keepalive = now + t.keepalive_timeout
        else:
            p.need_another_keepalive = True
        n = len(plain)
        b0 = plain[0]
        if b0 >> 4 == 4 and n >= 20:
            total = (plain[2] << 8) | plain[3]
            src = plain[12:16]
            ok = 20 <= total <= n
        elif b0 >> 4 == 6 and n >= 40:
            total = 40 + ((plain[4] << 8) | plain[5])
            src = plain[8:24]
            ok = total <= n
        else:
            ok = False
        if not ok:
            out.append(self._drop(DropReason.INVALID_INNER_PACKET, p))
            return None
        # [W 3] cryptokey routing. Routes never change after construction and extra sources
        # are only ever added, so a source once allowed for a peer stays allowed: remember
        # the last one (one flow's packets all carry the same source).
        if src != p.src_ok:
            if self._routes.lookup(src) is not p and not p.source_allowed_extra(src):
                out.append(self._drop(DropReason.DISALLOWED_SOURCE, p))
                return None
            p.src_ok = src
        return p.index, (plain if total == n else plain[:total])

    def _check_macs(
        self, data: bytes, sender: int, addr: tuple[str, int], now: float
    ) -> list[Output] | None:
        """[W 5.3] mac1 always; under load, mac2 too, or answer with a cookie reply."""
        if not self._checker.mac1_ok(data):
            return [self._drop(DropReason.INVALID_MAC1, None)]
        if self.under_load:
            src = endpoint_bytes(addr)
            if not self._checker.mac2_ok(data, src, now):
                reply = self._checker.make_reply(data, sender, src, now)
                return [SendDatagram(addr, reply), self._drop(DropReason.UNDER_LOAD, None)]
        return None

    def _find_remote(self, public: bytes) -> RemoteStatic | None:
        p = self._by_key.get(public)
        return None if p is None else p.remote

    def _on_initiation(
        self, data: bytes, addr: tuple[str, int], now: float, wall_time: float
    ) -> list[Output]:
        msg = wgmsg.parse(data)
        assert isinstance(msg, wgmsg.Initiation)
        early = self._check_macs(data, msg.sender, addr, now)
        if early is not None:
            return early
        res = consume_initiation(self._local, msg, self._find_remote)
        if isinstance(res, DropReason):
            return [self._drop(res, None)]
        p = self._by_key[res.remote.public]
        if res.timestamp <= p.last_timestamp:  # [W 5.1] replay: TAI64N must grow
            return [self._drop(DropReason.REPLAYED_TIMESTAMP, p)]
        if now - p.last_initiation_consumed < self.timers.handshake_initiation_rate:
            return [self._drop(DropReason.HANDSHAKE_FLOOD, p)]
        out: list[Output] = []
        self._respond(p, res, addr, now, wall_time, out)
        return out

    def _respond(
        self,
        p: Peer,
        res: InitiationConsumed,
        addr: tuple[str, int],
        now: float,
        wall_time: float,
        out: list[Output],
    ) -> None:
        local_index = self._new_index()
        made = create_response(self._local, res, local_index, self._rng(32))
        if isinstance(made, DropReason):
            out.append(self._drop(made, p))
            return
        msg, keys = made
        p.last_timestamp = res.timestamp
        p.last_initiation_consumed = now
        kp = Keypair(keys, now, self.timers.reject_after_messages)
        # [W 5.4.6] the responder may not send with the new keypair before the initiator's
        # first data message confirms it: it waits in `next`.
        self._forget(p.next)
        self._forget(p.previous)
        p.previous = None
        p.next = kp
        self._index[local_index] = (p, kp)
        if addr != p.endpoint:
            p.endpoint = addr
            out.append(EndpointChanged(p.index, addr))
        out.append(SendDatagram(addr, p.cookie.add_macs(wgmsg.emit(msg), now)))
        p.last_sent_handshake = now
        p.t_send_keepalive = None
        p.t_new_handshake = None
        self._session_derived(p, now, wall_time)
        out.append(HandshakeCompleted(p.index, False))

    def _on_response(
        self, data: bytes, addr: tuple[str, int], now: float, wall_time: float
    ) -> list[Output]:
        msg = wgmsg.parse(data)
        assert isinstance(msg, wgmsg.Response)
        early = self._check_macs(data, msg.sender, addr, now)
        if early is not None:
            return early
        entry = self._index.get(msg.receiver)
        if entry is None:
            return [self._drop(DropReason.UNKNOWN_INDEX, None)]
        p, kp = entry
        pending = p.pending
        if kp is not None or pending is None or pending.local_index != msg.receiver:
            return [self._drop(DropReason.UNEXPECTED_RESPONSE, p)]
        keys = consume_response(self._local, p.remote, pending, msg)
        if isinstance(keys, DropReason):
            return [self._drop(keys, p)]
        out: list[Output] = []
        p.pending = None
        new = Keypair(keys, now, self.timers.reject_after_messages)
        self._index[keys.local_index] = (p, new)
        # [W 5.4.6] rotate: the initiator may send at once; the old current still receives.
        if p.next is not None:
            self._forget(p.previous)
            p.previous = p.next
            p.next = None
        else:
            self._forget(p.previous)
            p.previous = p.current
        p.current = new
        if addr != p.endpoint:
            p.endpoint = addr
            out.append(EndpointChanged(p.index, addr))
        p.t_retransmit = None  # handshake complete
        p.handshake_attempts = 0
        p.t_new_handshake = None
        self._session_derived(p, now, wall_time)
        out.append(HandshakeCompleted(p.index, True))
        # [W 6.5] send staged packets, or a keepalive so the responder can confirm the keypair.
        if not p.staged:
            p.staged.append(b"")
        self._flush(p, now, wall_time, out)
        return out

    def _on_cookie_reply(self, data: bytes, now: float) -> list[Output]:
        msg = wgmsg.parse(data)
        assert isinstance(msg, wgmsg.CookieReply)
        entry = self._index.get(msg.receiver)
        if entry is None:
            return [self._drop(DropReason.UNKNOWN_INDEX, None)]
        p = entry[0]
        # [W 5.4.7] store the cookie; the retry timer, not this reply, resends the initiation.
        if not p.cookie.consume_reply(msg, now):
            return [self._drop(DropReason.INVALID_COOKIE_REPLY, p)]
        return []

    # ------------------------------------------------------------------ send paths

    def _usable(self, kp: Keypair | None, now: float) -> bool:
        return (
            kp is not None
            and now - kp.created < self.timers.reject_after_time
            and kp.send_counter < kp.reject_after_messages
        )

    def _send(
        self, p: Peer, packet: bytes, now: float, wall_time: float, out: list[Output]
    ) -> None:
        # The per-packet path: the usability checks are inlined on purpose.
        kp = p.current
        ep = p.endpoint
        t = self.timers
        if (
            kp is None
            or ep is None
            or p.staged
            or now - kp.created >= t.reject_after_time  # [W 6.1] Reject-After-Time
            or kp.send_counter >= kp.reject_after_messages
        ):
            if packet or not p.staged:  # a keepalive is only queued when nothing else is
                self._stage(p, packet, out)
            if self._usable(kp, now) and ep is not None:
                self._flush(p, now, wall_time, out)
            else:
                self._initiate(p, now, wall_time, False, out)
            return
        wire = kp.seal(packet, self.mtu)
        assert wire is not None
        out.append(SendDatagram(ep, wire))
        self._sent(p, kp, len(wire), bool(packet), now, wall_time, out)

    def _sent(
        self,
        p: Peer,
        kp: Keypair,
        size: int,
        is_data: bool,
        now: float,
        wall_time: float,
        out: list[Output],
    ) -> None:
        p.tx_bytes += size
        p.t_send_keepalive = None  # any authenticated packet sent
        if p.persistent_keepalive:
            p.t_persistent = now + p.persistent_keepalive
        t = self.timers
        if is_data and p.t_new_handshake is None:
            # [W 6.2] data sent and nothing heard for Keepalive + Rekey-Timeout: rehandshake
            p.t_new_handshake = now + t.keepalive_timeout + t.rekey_timeout + self._jitter()
        if kp.send_counter >= t.rekey_after_messages or (
            kp.is_initiator and now - kp.created >= t.rekey_after_time
        ):
            self._initiate(p, now, wall_time, False, out)  # [W 6.2] keep key fresh

    def _stage(self, p: Peer, packet: bytes, out: list[Output]) -> None:
        if len(p.staged) >= self.timers.staged_queue_len:
            p.staged.popleft()
            out.append(self._drop(DropReason.STAGED_QUEUE_FULL, p))
        p.staged.append(packet)

    def _flush(self, p: Peer, now: float, wall_time: float, out: list[Output]) -> None:
        kp = p.current
        while p.staged and p.endpoint is not None and self._usable(kp, now):
            assert kp is not None
            packet = p.staged.popleft()
            wire = kp.seal(packet, self.mtu)
            assert wire is not None
            out.append(SendDatagram(p.endpoint, wire))
            self._sent(p, kp, len(wire), bool(packet), now, wall_time, out)

    def _jitter(self) -> float:
        ms = int(self.timers.rekey_timeout_jitter * 1000)
        if ms <= 0:
            return 0.0
        return (int.from_bytes(self._rng(2), "little") % (ms + 1)) / 1000.0

    def _new_index(self) -> int:
        for _ in range(64):
            i = int.from_bytes(self._rng(4), "little")
            if i not in self._index:
                return i
        raise RuntimeError("the injected rng keeps returning sender indices already in use")

    def _forget(self, kp: Keypair | None) -> None:
        if kp is not None:
            self._index.pop(kp.local_index, None)

    def _initiate(
        self, p: Peer, now: float, wall_time: float, retry: bool, out: list[Output]
    ) -> None:
        """[W 6.4] send a handshake initiation, at most once per Rekey-Timeout unless retrying."""
        t = self.timers
        if not retry:
            if p.t_retransmit is not None or now - p.last_sent_handshake < t.rekey_timeout:
                return
            p.handshake_started = now
            p.handshake_attempts = 0
        if p.endpoint is None:
            out.append(self._drop(DropReason.NO_ENDPOINT, p))
            if p.endpoint_host is not None:
                out.append(ResolveEndpoint(p.index, *p.endpoint_host))
                p.t_retransmit = now + t.rekey_timeout + self._jitter()
            return
        if p.pending is not None:
            self._index.pop(p.pending.local_index, None)
            p.pending = None
        local_index = self._new_index()
        made = create_initiation(
            self._local, p.remote, local_index, self._rng(32), tai64n(wall_time)
        )
        if isinstance(made, DropReason):
            out.append(self._drop(made, p))
            return
        msg, pending = made
        p.pending = pending
        self._index[local_index] = (p, None)
        out.append(SendDatagram(p.endpoint, p.cookie.add_macs(wgmsg.emit(msg), now)))
        p.last_sent_handshake = now
        p.t_send_keepalive = None
        if p.persistent_keepalive:
            p.t_persistent = now + p.persistent_keepalive
        p.t_retransmit = now + t.rekey_timeout + self._jitter()

    def _session_derived(self, p: Peer, now: float, wall_time: float) -> None:
        p.t_zero_keys = now + self.timers.zero_keys_after  # [W 6.3]
        p.last_handshake_wall = wall_time
        if p.persistent_keepalive:
            p.t_persistent = now + p.persistent_keepalive

    def _confirm_next(self, p: Peer, now: float, wall_time: float, out: list[Output]) -> None:
        """[W 5.4.6] the initiator used our responder keypair: it becomes current."""
        self._forget(p.previous)
        p.previous = p.current
        p.current = p.next
        p.next = None
        self._flush(p, now, wall_time, out)

    # ------------------------------------------------------------------ timers [W 6]

    def _timers_fire(self, p: Peer, now: float, wall_time: float, out: list[Output]) -> None:
        t = self.timers
        if p.t_zero_keys is not None and now >= p.t_zero_keys:
            # [W 6.3] no new session for 3 x Reject-After-Time: erase all key material
            p.t_zero_keys = None
            for kp in p.keypairs():
                self._forget(kp)
            p.current = p.previous = p.next = None
            if p.pending is not None:
                self._index.pop(p.pending.local_index, None)
                p.pending = None
        if p.t_retransmit is not None and now >= p.t_retransmit:
            p.t_retransmit = None
            if now - p.handshake_started >= t.rekey_attempt_time:
                # [W 6.4] give up after Rekey-Attempt-Time; drop what waited for it
                if p.pending is not None:
                    self._index.pop(p.pending.local_index, None)
                    p.pending = None
                while p.staged:
                    p.staged.popleft()
                    out.append(self._drop(DropReason.HANDSHAKE_GAVE_UP, p))
                out.append(HandshakeFailed(p.index))
                if p.endpoint_host is not None:
                    out.append(ResolveEndpoint(p.index, *p.endpoint_host))
                if p.t_zero_keys is None:
                    p.t_zero_keys = now + t.zero_keys_after
            else:
                p.handshake_attempts += 1
                every = t.resolve_every_attempts
                if p.endpoint_host is not None and every and p.handshake_attempts % every == 0:
                    out.append(ResolveEndpoint(p.index, *p.endpoint_host))
                self._initiate(p, now, wall_time, True, out)
        if p.t_send_keepalive is not None and now >= p.t_send_keepalive:
            p.t_send_keepalive = None
            self._send(p, b"", now, wall_time, out)
            if p.need_another_keepalive:
                p.need_another_keepalive = False
                p.t_send_keepalive = now + t.keepalive_timeout
        if p.t_new_handshake is not None and now >= p.t_new_handshake:
            p.t_new_handshake = None
            if p.endpoint_host is not None:
                # The peer fell silent: the first sign that its address may have changed.
                out.append(ResolveEndpoint(p.index, *p.endpoint_host))
            self._initiate(p, now, wall_time, False, out)
        if p.t_persistent is not None and now >= p.t_persistent:
            p.t_persistent = None
            self._send(p, b"", now, wall_time, out)
