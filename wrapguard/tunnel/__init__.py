"""The WireGuard per-peer engine, sans-IO [W 3, 6]: `Device`, `PeerSpec`, `TimerConfig`, outputs.

dev = Device(private_key, [PeerSpec(pub, psk, ("192.0.2.1", 51820), ["10.0.0.0/24"], 25)],
             rng=os.urandom)
outs = dev.send_packet(ip_packet, now, wall_time)        # or peer=i to bypass AllowedIPs
outs = dev.datagram_received(data, (ip, port), now, wall_time)
outs = dev.handle_timeout(now, wall_time)                # at dev.next_deadline()
"""

from wrapguard.noise.reasons import DropReason
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
from wrapguard.tunnel.peer import PeerSpec
from wrapguard.tunnel.timers import TimerConfig

__all__ = [
    "DeliverPacket",
    "Device",
    "DropReason",
    "EndpointChanged",
    "HandshakeCompleted",
    "HandshakeFailed",
    "Output",
    "PacketDropped",
    "PeerSpec",
    "ResolveEndpoint",
    "SendDatagram",
    "TimerConfig",
]
