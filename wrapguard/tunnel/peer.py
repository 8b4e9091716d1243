"""Per-peer state of the tunnel engine: keypairs, handshake, staging queue, timer deadlines.

A `PeerSpec` is what the config says about a peer; a `Peer` is the engine's mutable record for
it. Keypairs follow [W 5.4.6, 6.x]: `current` sends, `previous` still receives, `next` is a
responder's keypair waiting for the initiator's first data message (keypair confirmation).
Timers are plain deadlines (monotonic seconds or None) compared in `Device.handle_timeout`.
"""

from __future__ import annotations

import ipaddress
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from wrapguard.keys import PresharedKey, PublicKey
from wrapguard.noise.cookie import CookieState
from wrapguard.noise.handshake import InitiatorPending, LocalStatic, RemoteStatic
from wrapguard.noise.session import Keypair

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class PeerSpec:
    """A configured peer. `endpoint` host may be an IP literal or a hostname (resolved by the
    runtime, see `ResolveEndpoint`); `persistent_keepalive` is in seconds, 0 = off."""

    public_key: PublicKey
    preshared_key: PresharedKey | None = None
    endpoint: tuple[str, int] | None = None
    allowed_ips: Sequence[Network | str] = field(default_factory=tuple)
    persistent_keepalive: int = 0


def normalize_endpoint(addr: tuple[str, int]) -> tuple[str, int] | None:
    """(ip, port) with the IP in canonical text form, or None if the host is not an IP literal."""
    host = addr[0].strip("[]")
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return (str(ip), int(addr[1]))


def endpoint_bytes(addr: tuple[str, int]) -> bytes:
    """A_m' of [W 5.4.7]: the packed source IP followed by the port, for cookies."""
    try:
        packed = ipaddress.ip_address(addr[0].split("%", 1)[0]).packed
    except ValueError:
        packed = addr[0].encode()
    return packed + (addr[1] & 0xFFFF).to_bytes(2, "big")


class Peer:
    """The engine's state for one peer; owned and mutated only by `Device`."""

    __slots__ = (
        "cookie",
        "current",
        "endpoint",
        "endpoint_host",
        "extra_sources",
        "handshake_attempts",
        "handshake_started",
        "index",
        "last_handshake_wall",
        "last_initiation_consumed",
        "last_sent_handshake",
        "last_timestamp",
        "need_another_keepalive",
        "next",
        "pending",
        "persistent_keepalive",
        "previous",
        "remote",
        "rx_bytes",
        "spec",
        "src_ok",
        "staged",
        "t_new_handshake",
        "t_persistent",
        "t_retransmit",
        "t_send_keepalive",
        "t_zero_keys",
        "tx_bytes",
    )

    def __init__(self, index: int, spec: PeerSpec, local: LocalStatic, queue_len: int) -> None:
        self.index = index
        self.spec = spec
        psk = spec.preshared_key.raw if spec.preshared_key is not None else None
        self.remote = RemoteStatic(local, spec.public_key.raw, psk)
        self.cookie = CookieState(spec.public_key.raw)
        self.endpoint: tuple[str, int] | None = None
        self.endpoint_host: tuple[str, int] | None = None
        if spec.endpoint is not None:
            self.endpoint = normalize_endpoint(spec.endpoint)
            if self.endpoint is None:
                self.endpoint_host = (spec.endpoint[0], int(spec.endpoint[1]))
        self.persistent_keepalive = float(spec.persistent_keepalive)
        self.extra_sources: list[Network] = []
        self.current: Keypair | None = None
        self.previous: Keypair | None = None
        self.next: Keypair | None = None
        self.pending: InitiatorPending | None = None
        self.last_timestamp = b""  # greatest TAI64N accepted from this peer [W 5.1]
        self.last_initiation_consumed = float("-inf")
        self.last_sent_handshake = float("-inf")
        self.handshake_started = 0.0
        self.handshake_attempts = 0
        self.staged: deque[bytes] = deque()
        self.need_another_keepalive = False
        self.last_handshake_wall: float | None = None
        self.rx_bytes = 0
        self.tx_bytes = 0
        self.src_ok = b""  # the last inner source address found allowed (cache, [W 3])
        # Timer deadlines [W 6]; None = not armed.
        self.t_retransmit: float | None = None
        self.t_send_keepalive: float | None = None
        self.t_new_handshake: float | None = None
        self.t_zero_keys: float | None = None
        self.t_persistent: float | None = None

    def keypairs(self) -> list[Keypair]:
        return [kp for kp in (self.current, self.previous, self.next) if kp is not None]

    def next_deadline(self) -> float | None:
        # Unrolled (no tuple and loop): the UDP runtime asks after every receive and send.
        best = self.t_retransmit
        t = self.t_send_keepalive
        if t is not None and (best is None or t < best):
            best = t
        t = self.t_new_handshake
        if t is not None and (best is None or t < best):
            best = t
        t = self.t_zero_keys
        if t is not None and (best is None or t < best):
            best = t
        t = self.t_persistent
        if t is not None and (best is None or t < best):
            best = t
        return best

    def source_allowed_extra(self, src: bytes) -> bool:
        """True if `src` falls in one of the networks added by `add_allowed_source`."""
        if not self.extra_sources:
            return False
        ip = ipaddress.ip_address(src)
        return any(ip in net for net in self.extra_sources)
