"""Userspace TCP/UDP/ICMP stack for IPv4/IPv6, sans-IO: the runtime drives a `Stack`.

Loop: `receive_packet(pkt, now)` for each decrypted packet; hand `take_outgoing()` to the
tunnel; drain `next_event()` (Connected, Accepted, Readable, Writable, PeerClosed, Reset,
ConnectFailed, Closed, DatagramReceived, UdpError, PacketDropped); call
`handle_timeout(now)` at `next_deadline()`. App side: connect/listen/send/recv/
shutdown_write/close/abort, udp_bind/udp_send. Tests and benches join two stacks in memory
with `Pair` in tests/netstack/lossy_link.py.
"""

from wrapguard.netstack.events import (
    Accepted,
    Closed,
    Connected,
    ConnectFailed,
    ConnId,
    DatagramReceived,
    DropReason,
    Event,
    ListenerId,
    PacketDropped,
    PeerClosed,
    Readable,
    Reset,
    SockId,
    TcpConfig,
    UdpError,
    Writable,
)
from wrapguard.netstack.stack import ConnInfo, Stack
from wrapguard.netstack.tcp import TcpState

__all__ = [
    "Accepted",
    "Closed",
    "ConnId",
    "ConnInfo",
    "ConnectFailed",
    "Connected",
    "DatagramReceived",
    "DropReason",
    "Event",
    "ListenerId",
    "PacketDropped",
    "PeerClosed",
    "Readable",
    "Reset",
    "SockId",
    "Stack",
    "TcpConfig",
    "TcpState",
    "UdpError",
    "Writable",
]
