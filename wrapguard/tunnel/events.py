"""Outputs of the tunnel core: frozen dataclasses the runtime acts on.

`Device` methods return lists of these. Peers are named by their index in the `PeerSpec`
sequence given to the device. `PacketDropped` carries a `DropReason` (re-exported here);
the device also counts every drop in `Device.counters`.
"""

from __future__ import annotations

from dataclasses import dataclass

from wrapguard.noise.reasons import DropReason

__all__ = [
    "DeliverPacket",
    "DropReason",
    "EndpointChanged",
    "HandshakeCompleted",
    "HandshakeFailed",
    "Output",
    "PacketDropped",
    "ResolveEndpoint",
    "SendDatagram",
]


@dataclass(frozen=True, slots=True)
class SendDatagram:
    """Send `data` over UDP to `addr` = (ip_literal, port); IPv6 when ':' is in the host."""

    addr: tuple[str, int]
    data: bytes


@dataclass(frozen=True, slots=True)
class DeliverPacket:
    """An authenticated inner IP packet from `peer`, padding removed, source checked."""

    peer: int
    packet: bytes


@dataclass(frozen=True, slots=True)
class PacketDropped:
    """A datagram or packet was dropped for `reason` (the runtime counts it)."""

    reason: DropReason
    peer: int | None = None


@dataclass(frozen=True, slots=True)
class HandshakeCompleted:
    """A new session was derived with `peer` (as initiator or responder)."""

    peer: int
    initiator: bool


@dataclass(frozen=True, slots=True)
class HandshakeFailed:
    """No response from `peer` for Rekey-Attempt-Time: staged packets were discarded [W 6.4]."""

    peer: int


@dataclass(frozen=True, slots=True)
class ResolveEndpoint:
    """The peer stopped answering: resolve `host` again (policy: tunnel/reresolve.py)."""

    peer: int
    host: str
    port: int


@dataclass(frozen=True, slots=True)
class EndpointChanged:
    """`peer` roamed: an authenticated packet came from a new address [W 6.5]."""

    peer: int
    addr: tuple[str, int]


Output = (
    SendDatagram
    | DeliverPacket
    | PacketDropped
    | HandshakeCompleted
    | HandshakeFailed
    | ResolveEndpoint
    | EndpointChanged
)
