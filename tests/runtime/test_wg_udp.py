"""The asyncio UDP driver: two runtimes talking over loopback (127.0.0.1 and ::1 only)."""

from __future__ import annotations

import asyncio
import random
import socket
import struct
from collections.abc import Callable

import pytest

from wrapguard import log
from wrapguard.keys import PrivateKey
from wrapguard.runtime.udp import UNDER_LOAD_HANDSHAKES, WgUdpRuntime
from wrapguard.tunnel.device import Device
from wrapguard.tunnel.events import HandshakeCompleted, Output
from wrapguard.tunnel.peer import PeerSpec
from wrapguard.tunnel.timers import TimerConfig

KA, KB = PrivateKey(bytes([1]) * 32), PrivateKey(bytes([2]) * 32)


def ipv4(src: str, dst: str, payload: bytes) -> bytes:
    s, d = socket.inet_aton(src), socket.inet_aton(dst)
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0, 0, 64, 17, 0, s, d) + payload


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


async def wait_for(cond: Callable[[], bool], timeout: float = 5.0) -> bool:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while loop.time() < end:
        if cond():
            return True
        await asyncio.sleep(0.005)
    return cond()


class Side:
    def __init__(self, key: PrivateKey, peer_key: PrivateKey, endpoint, allowed, **kw) -> None:  # type: ignore[no-untyped-def]
        timers = kw.pop("timers", None)
        self.device = Device(
            key,
            [PeerSpec(peer_key.public_key(), endpoint=endpoint, allowed_ips=allowed, **kw)],
            rng=random.Random(key.raw).randbytes,
            timers=timers,
        )
        self.packets: list[bytes] = []
        self.events: list[Output] = []
        self.rt = WgUdpRuntime(
            self.device,
            on_packet=lambda peer, pkt: self.packets.append(pkt),
            on_event=self.events.append,
            bind_v4="127.0.0.1",
            bind_v6="::1",
        )


@pytest.mark.parametrize("v6", [False, True])
def test_two_runtimes_exchange_packets(v6: bool) -> None:
    if v6 and not has_ipv6_loopback():
        pytest.skip("no IPv6 loopback on this host")

    async def main() -> None:
        b = Side(KB, KA, None, ("10.0.0.1/32",))
        await b.rt.start()
        a = Side(KA, KB, ("::1" if v6 else "127.0.0.1", b.rt.port), ("10.0.0.0/24",))
        await a.rt.start()
        try:
            for i in range(50):
                a.rt.send_packet(ipv4("10.0.0.1", "10.0.0.2", b"ping %d" % i))
            assert await wait_for(lambda: len(b.packets) == 50), b.device.counters
            assert b.packets[0] == ipv4("10.0.0.1", "10.0.0.2", b"ping 0")
            b.rt.send_packet(ipv4("10.0.0.2", "10.0.0.1", b"pong"))
            assert await wait_for(lambda: len(a.packets) == 1)
            assert any(isinstance(e, HandshakeCompleted) and e.initiator for e in a.events)
            assert a.rt.stats["rx_datagrams"] >= 2 and b.rt.stats["delivered"] == 50
            assert not any(a.device.counters.values()) and not any(b.device.counters.values())
        finally:
            a.rt.close()
            b.rt.close()

    asyncio.run(main())


def test_hostname_endpoint_resolved_by_runtime_and_timers_armed() -> None:
    async def main() -> None:
        fast = TimerConfig(keepalive_timeout=0.2)
        b = Side(KB, KA, None, ("10.0.0.1/32",), timers=fast)
        await b.rt.start()
        asked: list[tuple[str, int]] = []

        async def resolver(host: str, port: int) -> list[tuple[str, int]]:
            asked.append((host, port))
            return [("127.0.0.1", b.rt.port)]

        a = Side(KA, KB, ("peer.wg.invalid", 51820), ("10.0.0.0/24",), timers=fast,
                 persistent_keepalive=1)  # fmt: skip
        a.rt._resolver = resolver
        await a.rt.start()
        try:
            assert asked == [("peer.wg.invalid", 51820)]
            # PersistentKeepalive: the runtime starts the handshake by itself, as wg does.
            assert await wait_for(lambda: any(isinstance(e, HandshakeCompleted) for e in a.events))
            a.rt.send_packet(ipv4("10.0.0.1", "10.0.0.2", b"data"))
            before = b.rt.stats["tx_datagrams"]
            # b stays silent, so its passive keepalive timer (0.2 s here) must fire.
            assert await wait_for(lambda: b.rt.stats["tx_datagrams"] > before, 2.0)
        finally:
            a.rt.close()
            b.rt.close()

    asyncio.run(main())


def test_handshake_burst_switches_on_under_load() -> None:
    async def main() -> None:
        b = Side(KB, KA, None, ("10.0.0.1/32",))
        await b.rt.start()
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                for _ in range(UNDER_LOAD_HANDSHAKES + 5):
                    s.sendto(b"\x01\x00\x00\x00" + bytes(144), ("127.0.0.1", b.rt.port))
            assert await wait_for(lambda: b.device.under_load, 2.0)
        finally:
            b.rt.close()

    asyncio.run(main())


class MovingName:
    """A fake resolver: answers `addr` (the test changes it) after `delay`, counting overlaps."""

    def __init__(self, addr: tuple[str, int], delay: float = 0.0) -> None:
        self.addr = addr
        self.delay = delay
        self.calls = 0
        self.running = 0
        self.most_at_once = 0

    async def __call__(self, host: str, port: int) -> list[tuple[str, int]]:
        self.calls += 1
        self.running += 1
        self.most_at_once = max(self.most_at_once, self.running)
        try:
            await asyncio.sleep(self.delay)
            return [self.addr]
        finally:
            self.running -= 1


def moved_lines(logs: list[dict]) -> list[dict]:  # type: ignore[type-arg]
    return [e for e in logs if e["event"].startswith("peer endpoint moved")]


def test_unanswered_handshakes_re_resolve_and_find_the_moved_peer() -> None:
    """The name first points where nobody answers; once it points at b, a finds b."""

    async def main() -> None:
        fast = TimerConfig(rekey_timeout=0.3, rekey_timeout_jitter=0.0, keepalive_timeout=0.2)
        b = Side(KB, KA, None, ("10.0.0.1/32",), timers=fast)
        await b.rt.start()
        new = ("127.0.0.1", b.rt.port)
        dead = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # bound, never answers
        dead.bind(("127.0.0.1", 0))
        old = ("127.0.0.1", dead.getsockname()[1])
        name = MovingName(old, delay=0.5)  # slower than the retries: requests pile up
        a = Side(KA, KB, ("peer.wg.invalid", 51820), ("10.0.0.0/24",), timers=fast)
        a.rt._resolver = name
        with log.capture() as logs:
            await a.rt.start()
            try:
                assert a.device.peers[0].endpoint == old
                name.addr = new
                a.rt.send_packet(ipv4("10.0.0.1", "10.0.0.2", b"after the move"))
                assert await wait_for(lambda: len(b.packets) == 1, 5.0), a.device.counters
            finally:
                a.rt.close()
                b.rt.close()
                dead.close()
        assert name.calls >= 2 and name.most_at_once == 1
        (line,) = moved_lines(logs)
        assert line["log_level"] == "info" and line["host"] == "peer.wg.invalid"
        assert line["old"] == f"127.0.0.1:{old[1]}" and line["new"] == f"127.0.0.1:{new[1]}"
        assert line["reason"] == "unanswered"

    asyncio.run(main())


def test_periodic_re_resolve_moves_the_endpoint_but_not_away_from_a_roam() -> None:
    """An idle tunnel follows the name; a peer that roamed to an address the name does not
    give keeps that address while the name stays the same."""

    async def main() -> None:
        b = Side(KB, KA, None, ("10.0.0.1/32",))
        await b.rt.start()
        b2 = Side(KB, KA, None, ("10.0.0.1/32",))  # the same peer, moved to another port
        await b2.rt.start()
        name = MovingName(("127.0.0.1", b.rt.port))
        a = Side(KA, KB, ("peer.wg.invalid", 51820), ("10.0.0.0/24",))
        a.rt = WgUdpRuntime(
            a.device,
            on_packet=lambda peer, pkt: a.packets.append(pkt),
            on_event=a.events.append,
            bind_v4="127.0.0.1",
            bind_v6=None,
            resolver=name,
            reresolve_interval=0.1,
        )
        a.rt.reresolver.jitter = 0.0
        with log.capture() as logs:
            await a.rt.start()
            try:
                a.rt.send_packet(ipv4("10.0.0.1", "10.0.0.2", b"one"))
                assert await wait_for(lambda: len(b.packets) == 1)
                name.addr = ("127.0.0.1", b2.rt.port)
                ep = ("127.0.0.1", b2.rt.port)
                assert await wait_for(lambda: a.device.peers[0].endpoint == ep, 2.0)
                # Now the peer roams back to b's address: the name (b2) must not undo it.
                b.rt.send_packet(ipv4("10.0.0.2", "10.0.0.1", b"from b"))
                assert await wait_for(lambda: len(a.packets) == 1)
                assert a.device.peers[0].endpoint == ("127.0.0.1", b.rt.port)
                calls = name.calls
                assert await wait_for(lambda: name.calls >= calls + 3, 2.0)
                assert a.device.peers[0].endpoint == ("127.0.0.1", b.rt.port)
            finally:
                for side in (a, b, b2):
                    side.rt.close()
        reasons = [e["reason"] for e in moved_lines(logs)]
        assert reasons == ["periodic"]

    asyncio.run(main())
