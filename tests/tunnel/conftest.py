"""An in-memory network of two WireGuard devices with a fake clock (no sockets at all).

`make_net(...)` returns a `Net`: devices `a` (10.0.0.1, at 192.0.2.1:51820 - an address that
exists only inside this dict) and `b` (10.0.0.2, 192.0.2.2:51820). `a` knows b's endpoint;
`b` learns a's from the handshake unless told otherwise. Datagrams are queued and moved by
`pump()`; `advance(dt)` moves the fake clock, firing both devices' timers at their deadlines.
`drop_a_to_b` / `drop_b_to_a` simulate loss; every datagram is logged with its time.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from wrapguard.keys import PresharedKey, PrivateKey
from wrapguard.tunnel.device import Device
from wrapguard.tunnel.events import DeliverPacket, Output, PacketDropped, SendDatagram
from wrapguard.tunnel.peer import PeerSpec
from wrapguard.tunnel.timers import TimerConfig

ADDR_A = ("192.0.2.1", 51820)
ADDR_B = ("192.0.2.2", 51820)
WALL0 = 1_700_000_000.0


def ipv4(src: str, dst: str, payload: bytes = b"payload") -> bytes:
    s = bytes(int(x) for x in src.split("."))
    d = bytes(int(x) for x in dst.split("."))
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0, 0, 64, 17, 0, s, d) + payload


def ipv6(src: bytes, dst: bytes, payload: bytes = b"payload6") -> bytes:
    return struct.pack("!IHBB16s16s", 6 << 28, len(payload), 17, 64, src, dst) + payload


def a_to_b(payload: bytes = b"payload") -> bytes:
    return ipv4("10.0.0.1", "10.0.0.2", payload)


def b_to_a(payload: bytes = b"payload") -> bytes:
    return ipv4("10.0.0.2", "10.0.0.1", payload)


@dataclass
class Logged:
    t: float
    src: str
    dst_addr: tuple[str, int]
    data: bytes

    @property
    def kind(self) -> int:
        return self.data[0]


@dataclass
class Net:
    a: Device
    b: Device
    now: float = 0.0
    addr_a: tuple[str, int] = ADDR_A
    queue: list[tuple[str, tuple[str, int], bytes]] = field(default_factory=list)
    log: list[Logged] = field(default_factory=list)
    got: dict[str, list[bytes]] = field(default_factory=lambda: {"a": [], "b": []})
    events: dict[str, list[Output]] = field(default_factory=lambda: {"a": [], "b": []})
    drop_a_to_b: bool = False
    drop_b_to_a: bool = False
    # A lossy link (RFC-free, like the userspace relay of testing.md): probabilities per datagram.
    loss: float = 0.0
    dup: float = 0.0
    reorder: float = 0.0
    rnd: random.Random = field(default_factory=lambda: random.Random(0))
    wall_offset: float = 0.0

    ADDR_A = ADDR_A
    ADDR_B = ADDR_B
    ipv4 = staticmethod(ipv4)
    ipv6 = staticmethod(ipv6)
    a_to_b = staticmethod(a_to_b)
    b_to_a = staticmethod(b_to_a)
    build = staticmethod(lambda **kw: build_net(**kw))

    @property
    def wall(self) -> float:
        return WALL0 + self.now + self.wall_offset

    def dev(self, name: str) -> Device:
        return self.a if name == "a" else self.b

    def take(self, name: str, outs: list[Output]) -> list[Output]:
        for o in outs:
            if isinstance(o, SendDatagram):
                self.log.append(Logged(self.now, name, o.addr, o.data))
                lost = self.drop_a_to_b if name == "a" else self.drop_b_to_a
                if lost or (self.loss and self.rnd.random() < self.loss):
                    continue
                item = (name, o.addr, o.data)
                if self.reorder and self.queue and self.rnd.random() < self.reorder:
                    self.queue.insert(self.rnd.randrange(len(self.queue)), item)
                else:
                    self.queue.append(item)
                if self.dup and self.rnd.random() < self.dup:
                    self.queue.append(item)
            elif isinstance(o, DeliverPacket):
                self.got[name].append(o.packet)
            else:
                self.events[name].append(o)
        return outs

    def send(self, name: str, packet: bytes, peer: int | None = None) -> list[Output]:
        return self.take(name, self.dev(name).send_packet(packet, self.now, self.wall, peer))

    def inject(self, to: str, data: bytes, src: tuple[str, int] | None = None) -> list[Output]:
        """Hand one datagram to a device now (bypassing the queue)."""
        if src is None:
            src = ADDR_B if to == "a" else self.addr_a
        return self.take(to, self.dev(to).datagram_received(data, src, self.now, self.wall))

    def pump(self, limit: int = 1000) -> None:
        for _ in range(limit):
            if not self.queue:
                return
            src_name, dst, data = self.queue.pop(0)
            to = "b" if dst == ADDR_B else "a" if dst == self.addr_a else None
            if to is None:
                continue  # sent to an address nobody has (e.g. a's old address after roaming)
            src = self.addr_a if src_name == "a" else ADDR_B
            self.inject(to, data, src)
        raise AssertionError("datagram storm")

    def advance(self, dt: float) -> None:
        target = self.now + dt
        while True:
            ds = [d for d in (self.a.next_deadline(), self.b.next_deadline()) if d is not None]
            nxt = min(ds) if ds else None
            if nxt is None or nxt > target:
                break
            self.now = max(self.now, nxt)
            for name in ("a", "b"):
                self.take(name, self.dev(name).handle_timeout(self.now, self.wall))
            self.pump()
        self.now = target
        self.pump()

    def handshake(self) -> None:
        self.send("a", a_to_b(b"hello"))
        self.pump()
        assert self.got["b"], "handshake did not deliver the staged packet"

    def sent(self, src: str, kind: int, since: float = float("-inf")) -> list[Logged]:
        return [x for x in self.log if x.src == src and x.kind == kind and x.t >= since]

    def drops(self, name: str) -> list[PacketDropped]:
        return [e for e in self.events[name] if isinstance(e, PacketDropped)]


def seeded(seed: int) -> Callable[[int], bytes]:
    return random.Random(seed).randbytes


def build_net(
    *,
    timers: TimerConfig | None = None,
    psk: bool = False,
    keepalive_a: int = 0,
    b_knows_a: bool = False,
    seed: int = 1,
    key_seed: int = 100,
) -> Net:
    r = random.Random(key_seed)
    ka, kb = PrivateKey(r.randbytes(32)), PrivateKey(r.randbytes(32))
    shared = PresharedKey(r.randbytes(32)) if psk else None
    a = Device(
        ka,
        [
            PeerSpec(
                kb.public_key(),
                shared,
                ADDR_B,
                ("10.0.0.2/32", "fd00::2/128"),
                keepalive_a,
            )
        ],
        rng=seeded(seed),
        timers=timers,
    )
    b = Device(
        kb,
        [
            PeerSpec(
                ka.public_key(),
                shared,
                ADDR_A if b_knows_a else None,
                ("10.0.0.1/32", "fd00::1/128"),
            )
        ],
        rng=seeded(seed + 1),
        timers=timers,
    )
    return Net(a, b)


@pytest.fixture
def make_net() -> Callable[..., Net]:
    return build_net


@pytest.fixture
def net() -> Net:
    return build_net()
