"""Helpers for netstack tests: a scripted raw peer that feeds crafted segments to a Stack."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from ipaddress import ip_address

import pytest

from wrapguard.netstack import Stack, TcpConfig
from wrapguard.netstack.events import DropReason, Event, PacketDropped
from wrapguard.wire.ip import PROTO_TCP, IPv4Packet, IPv6Packet, emit_ip, parse_ip
from wrapguard.wire.tcp import NO_OPTIONS, TcpOptions, TcpSegment, emit_tcp, parse_tcp

US4, PEER4 = "10.150.0.1", "10.150.0.2"
US6, PEER6 = "fd15::1", "fd15::2"
ISS = 1000  # what the constant RNG below gives the stack as its ISN


@dataclass
class Raw:
    """A hand-driven peer: `send()` crafts one segment, `out()` parses the stack's replies."""

    stack: Stack
    now: float = 0.0
    us: str = US4
    peer: str = PEER4
    sport: int = 40000
    dport: int = 80
    events: list[Event] = field(default_factory=list)
    dropped: list[DropReason] = field(default_factory=list)

    def packet(
        self,
        flags: int,
        seq: int,
        ack: int = 0,
        payload: bytes = b"",
        window: int = 65535,
        options: TcpOptions = NO_OPTIONS,
        sport: int | None = None,
        dport: int | None = None,
    ) -> bytes:
        src, dst = ip_address(self.peer).packed, ip_address(self.us).packed
        seg = TcpSegment(
            self.sport if sport is None else sport,
            self.dport if dport is None else dport,
            seq & 0xFFFFFFFF,
            ack & 0xFFFFFFFF,
            flags,
            window,
            payload,
            options,
        )
        body = emit_tcp(seg, src, dst)
        if len(src) == 4:
            return emit_ip(IPv4Packet(src, dst, PROTO_TCP, body))
        return emit_ip(IPv6Packet(src, dst, PROTO_TCP, body))

    def send(self, *args: object, **kw: object) -> list[TcpSegment]:
        """Feed one segment; return the segments the stack sends back (ACKs flushed)."""
        self.stack.receive_packet(self.packet(*args, **kw), self.now)  # type: ignore[arg-type]
        return self.out()

    def out(self) -> list[TcpSegment]:
        segs = []
        for raw in self.stack.take_outgoing():
            ip = parse_ip(raw)
            assert ip.proto == PROTO_TCP
            assert ip.src == ip_address(self.us).packed
            segs.append(parse_tcp(ip.payload))
        self.drain()
        return segs

    def drain(self) -> list[Event]:
        ev = self.stack.next_event()
        while ev is not None:
            if isinstance(ev, PacketDropped):
                self.dropped.append(ev.reason)
            else:
                self.events.append(ev)
            ev = self.stack.next_event()
        return self.events

    def advance(self, dt: float) -> list[TcpSegment]:
        """Move the clock and run the stack's timers."""
        self.now += dt
        self.stack.handle_timeout(self.now)
        return self.out()


def const_rng(value: int = ISS) -> Callable[[int], int]:
    return lambda bits: value & ((1 << bits) - 1)


@pytest.fixture
def make_raw() -> Callable[..., Raw]:
    def make(v6: bool = False, config: TcpConfig | None = None, mtu: int = 1420) -> Raw:
        stack = Stack([US4, US6], rng=const_rng(), mtu=mtu, config=config)
        if v6:
            return Raw(stack, us=US6, peer=PEER6)
        return Raw(stack)

    return make
