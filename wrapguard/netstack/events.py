"""Events the netstack reports to the runtime, identifiers, drop reasons and tunables.

Every connection the stack hands out (from `connect()` or in `Accepted`) gets exactly one
final `Closed(conn)`; once the runtime has taken it from `next_event()` the id is invalid.
After a graceful end, Closed waits until buffered data has been read (or close()/abort());
`ConnectFailed` and `Reset` come just before it. `Readable` is reported once per arrival of
data until the next `recv()`; `Writable` once after a `send()` that could not take all.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from typing import NewType

__all__ = [
    "Accepted",
    "Closed",
    "ConnId",
    "ConnectFailed",
    "Connected",
    "DatagramReceived",
    "DropReason",
    "Event",
    "IPAddress",
    "ListenerId",
    "PacketDropped",
    "PeerClosed",
    "Readable",
    "Reset",
    "SockId",
    "TcpConfig",
    "UdpError",
    "Writable",
]

ConnId = NewType("ConnId", int)
ListenerId = NewType("ListenerId", int)
SockId = NewType("SockId", int)
IPAddress = IPv4Address | IPv6Address


class DropReason(enum.Enum):
    """Why an inbound packet was dropped (counted in `Stack.drops`)."""

    MALFORMED = "malformed"
    FRAGMENT = "fragment"
    NOT_OUR_ADDRESS = "not_our_address"
    UNKNOWN_PROTOCOL = "unknown_protocol"
    NO_LISTENER = "no_listener"
    NO_SOCKET = "no_socket"
    BACKLOG_FULL = "backlog_full"
    OUT_OF_WINDOW = "out_of_window"
    BAD_ACK = "bad_ack"
    BAD_FLAGS = "bad_flags"
    UNMATCHED_ICMP = "unmatched_icmp"


@dataclass(frozen=True, slots=True)
class TcpConfig:
    """TCP tunables; times in seconds, sizes in bytes.

    rto_min 200 ms as Linux (RFC 6298 2.4 asks 1 s; Linux's 200 ms is the practical norm);
    time_wait 2 s instead of 2*MSL (the tunnel is one hop: old duplicates cannot linger);
    max_retries bounds both unanswered retransmissions and unanswered zero-window probes.
    """

    rcv_buf: int = 4 << 20
    snd_buf: int = 2 << 20
    rto_initial: float = 1.0
    rto_min: float = 0.2
    rto_max: float = 60.0
    delayed_ack: float = 0.04
    time_wait: float = 2.0
    connect_timeout: float = 60.0
    max_retries: int = 12
    synack_retries: int = 5
    backlog: int = 128


class Event:
    """Base class of everything `Stack.next_event()` returns."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class Connected(Event):
    """An active open completed (SYN-SENT -> ESTABLISHED)."""

    conn: ConnId


@dataclass(frozen=True, slots=True)
class ConnectFailed(Event):
    """An active open failed: ECONNREFUSED, ETIMEDOUT, EHOSTUNREACH, ENETUNREACH, ..."""

    conn: ConnId
    errno: int


@dataclass(frozen=True, slots=True)
class Accepted(Event):
    """A passive open on `listener` completed; `conn` is established."""

    listener: ListenerId
    conn: ConnId


@dataclass(frozen=True, slots=True)
class Readable(Event):
    """New in-order data is waiting in `recv()`."""

    conn: ConnId


@dataclass(frozen=True, slots=True)
class Writable(Event):
    """The send buffer has room again after a short `send()`."""

    conn: ConnId


@dataclass(frozen=True, slots=True)
class PeerClosed(Event):
    """The peer's FIN arrived: after the buffered data, the stream is at its end."""

    conn: ConnId


@dataclass(frozen=True, slots=True)
class Reset(Event):
    """An established connection died: ECONNRESET (RST in), ETIMEDOUT (retries)."""

    conn: ConnId
    errno: int


@dataclass(frozen=True, slots=True)
class Closed(Event):
    """The connection is finished and nothing is left to read; the id is then retired."""

    conn: ConnId


@dataclass(frozen=True, slots=True)
class DatagramReceived(Event):
    """A UDP datagram for a bound socket."""

    sock: SockId
    src: tuple[IPAddress, int]
    data: bytes
    dst: IPAddress | None = None


@dataclass(frozen=True, slots=True)
class UdpError(Event):
    """An ICMP error about a datagram this socket sent to `dst`."""

    sock: SockId
    dst: tuple[IPAddress, int]
    errno: int


@dataclass(frozen=True, slots=True)
class PacketDropped(Event):
    """An inbound packet was dropped (bad remote input is never an exception)."""

    reason: DropReason
