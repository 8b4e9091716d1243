"""Interop: our WireGuard core + UDP runtime against wireguard-go in network namespaces.

Our runtime runs in the test process with its UDP sockets created inside the rig's client
namespace (no default route, so nothing can leave the machine). Data is checked at the IP
layer: hand-built ICMP echo requests to the peer's tunnel addresses and the peer kernel's echo
replies coming back decrypted. Both roles, PSK, IPv4/IPv6 endpoints, fast rekeys, a restart of
wireguard-go and a wrong key are covered.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import struct
import time
from collections.abc import Callable
from typing import Any

import pytest
from rig.harness import Rig

from wrapguard.keys import PresharedKey, PrivateKey
from wrapguard.noise.reasons import DropReason
from wrapguard.runtime.udp import WgUdpRuntime
from wrapguard.tunnel.device import Device
from wrapguard.tunnel.events import HandshakeCompleted, HandshakeFailed, Output
from wrapguard.tunnel.peer import PeerSpec
from wrapguard.tunnel.timers import TimerConfig

pytestmark = [pytest.mark.root, pytest.mark.interop]

OURS_V4, PEER_V4 = "10.150.0.2", "10.150.0.1"
OURS_V6, PEER_V6 = "fd15::2", "fd15::1"


def csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def icmp4_echo(ident: int, seq: int, payload: bytes = b"wrapguard-ping") -> bytes:
    """IPv4 header (RFC 791) + ICMP echo request (RFC 792), both checksums by hand."""
    icmp = struct.pack("!BBHHH", 8, 0, 0, ident, seq) + payload
    icmp = icmp[:2] + struct.pack("!H", csum(icmp)) + icmp[4:]
    src = ipaddress.IPv4Address(OURS_V4).packed
    dst = ipaddress.IPv4Address(PEER_V4).packed
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), ident, 0, 64, 1, 0, src, dst)
    hdr = hdr[:10] + struct.pack("!H", csum(hdr)) + hdr[12:]
    return hdr + icmp


def icmp6_echo(ident: int, seq: int, payload: bytes = b"wrapguard-ping6") -> bytes:
    """IPv6 header (RFC 8200) + ICMPv6 echo request (RFC 4443) with the pseudo-header sum."""
    src = ipaddress.IPv6Address(OURS_V6).packed
    dst = ipaddress.IPv6Address(PEER_V6).packed
    icmp = struct.pack("!BBHHH", 128, 0, 0, ident, seq) + payload
    pseudo = src + dst + struct.pack("!I3xB", len(icmp), 58)
    icmp = icmp[:2] + struct.pack("!H", csum(pseudo + icmp)) + icmp[4:]
    hdr = struct.pack("!IHBB16s16s", 6 << 28, len(icmp), 58, 64, src, dst)
    return hdr + icmp


def is_echo_reply(packet: bytes, seq: int) -> bool:
    if packet[0] >> 4 == 4:
        ihl = (packet[0] & 0xF) * 4
        return (
            packet[9] == 1
            and packet[ihl] == 0
            and struct.unpack_from("!H", packet, ihl + 6)[0] == seq
        )
    return packet[6] == 58 and packet[40] == 129 and struct.unpack_from("!H", packet, 46)[0] == seq


class Ours:
    """Our device + runtime on a fresh event loop, sockets in the client namespace."""

    def __init__(
        self,
        rig: Rig,
        *,
        private_key: PrivateKey | None = None,
        endpoint: tuple[str, int] | None = None,
        psk: bool | PresharedKey = False,
        keepalive: int = 0,
        timers: TimerConfig | None = None,
        listen_port: int = 0,
    ) -> None:
        spec = PeerSpec(
            public_key=rig.peer_public_key,
            preshared_key=psk if isinstance(psk, PresharedKey) else rig.psk if psk else None,
            endpoint=endpoint,
            allowed_ips=("10.150.0.0/24", "fd15::/64"),
            persistent_keepalive=keepalive,
        )
        self.device = Device(
            private_key or rig.our_key, [spec], rng=os.urandom, timers=timers or TimerConfig()
        )
        self.packets: list[bytes] = []
        self.events: list[Output] = []
        self.loop = asyncio.new_event_loop()
        self.rt = WgUdpRuntime(
            self.device,
            listen_port=listen_port,
            on_packet=lambda peer, pkt: self.packets.append(pkt),
            on_event=self.events.append,
            socket_factory=rig.client.socket,
        )
        self.loop.run_until_complete(self.rt.start())

    def close(self) -> None:
        self.rt.close()
        self.loop.close()

    def run_until(self, cond: Callable[[], bool], timeout: float) -> bool:
        async def wait() -> bool:
            end = time.monotonic() + timeout
            while time.monotonic() < end:
                if cond():
                    return True
                await asyncio.sleep(0.01)
            return cond()

        return self.loop.run_until_complete(wait())

    def ping(self, seq: int, v6: bool = False, timeout: float = 5.0) -> bool:
        """Send one echo request through the tunnel; True when the reply came back."""
        pkt = icmp6_echo(0x77, seq) if v6 else icmp4_echo(0x77, seq)
        self.rt.send_packet(pkt)
        return self.run_until(lambda: any(is_echo_reply(p, seq) for p in self.packets), timeout)

    def completed(self) -> int:
        return sum(isinstance(e, HandshakeCompleted) for e in self.events)


@pytest.fixture
def ours_factory() -> Any:
    made: list[Ours] = []

    def factory(rig: Rig, **kw: Any) -> Ours:
        o = Ours(rig, **kw)
        made.append(o)
        return o

    yield factory
    for o in made:
        o.close()


@pytest.mark.parametrize("psk", [False, True])
@pytest.mark.parametrize("v6_endpoint", [False, True])
def test_we_initiate(make_rig: Any, ours_factory: Any, psk: bool, v6_endpoint: bool) -> None:
    rig = make_rig(psk=psk, servers=False, file_sizes=())
    ours = ours_factory(
        rig, endpoint=rig.peer_endpoint_v6 if v6_endpoint else rig.peer_endpoint, psk=psk
    )
    assert ours.ping(1), f"no IPv4 echo reply; drops={ours.device.counters}"
    assert ours.ping(2, v6=True), "no IPv6 echo reply"
    assert ours.completed() == 1
    assert next(e for e in ours.events if isinstance(e, HandshakeCompleted)).initiator
    status = rig.peer_status()
    assert status.latest_handshake > 0 and status.rx_bytes > 0
    assert not any(ours.device.counters.values()), ours.device.counters


@pytest.mark.parametrize(("psk", "v6_endpoint"), [(False, False), (True, False), (True, True)])
def test_wireguard_go_initiates(
    make_rig: Any, ours_factory: Any, psk: bool, v6_endpoint: bool
) -> None:
    rig = make_rig(psk=psk, servers=False, file_sizes=())
    ours = ours_factory(rig, endpoint=None, psk=psk)  # we know no endpoint: we must be found
    host = f"[{rig.client_veth_v6}]" if v6_endpoint else rig.client_veth_v4
    rig.set_peer_endpoint_for_us(f"{host}:{ours.rt.port}", keepalive=1)
    assert ours.run_until(lambda: ours.completed() >= 1, 10), ours.device.counters
    first = next(e for e in ours.events if isinstance(e, HandshakeCompleted))
    assert not first.initiator
    # Roaming: we learnt the endpoint from the authenticated initiation.
    expected = rig.peer_endpoint_v6 if v6_endpoint else rig.peer_endpoint
    assert ours.device.peers[0].endpoint == (str(ipaddress.ip_address(expected[0])), expected[1])
    assert ours.ping(1), f"no echo reply as responder; drops={ours.device.counters}"
    assert ours.ping(2, v6=True)
    assert not any(ours.device.counters.values()), ours.device.counters


def test_rekeys_keep_traffic_flowing(make_rig: Any, ours_factory: Any) -> None:
    rig = make_rig(servers=False, file_sizes=())
    fast = TimerConfig(rekey_after_time=1.0, reject_after_time=3.0, rekey_timeout=0.5)
    ours = ours_factory(rig, endpoint=rig.peer_endpoint, timers=fast)
    seq = 0
    end = time.monotonic() + 5.0
    while time.monotonic() < end:
        seq += 1
        assert ours.ping(seq, v6=seq % 2 == 0, timeout=3.0), f"lost at seq {seq}"
        ours.run_until(lambda: False, 0.1)
    assert ours.completed() >= 3, ours.completed()
    assert ours.device.counters[DropReason.DECRYPT_FAILED] == 0


def test_survives_wireguard_go_restart(make_rig: Any, ours_factory: Any) -> None:
    rig = make_rig(servers=False, file_sizes=())
    fast = TimerConfig(rekey_timeout=0.5, keepalive_timeout=1.0)
    ours = ours_factory(rig, endpoint=rig.peer_endpoint, timers=fast)
    assert ours.ping(1)
    wg = rig.peer.wg
    wg.stop()
    wg.start()  # same private key and listen port, new sessions
    # The first pings die on the restarted peer (unknown index); our "no reply for
    # Keepalive + Rekey-Timeout" rule starts a new handshake and traffic resumes.
    ok = False
    for seq in range(2, 40):
        if ours.ping(seq, timeout=0.5):
            ok = True
            break
    assert ok, f"no reply after restart; drops={ours.device.counters}"
    assert ours.completed() >= 2


def test_wrong_key_never_completes(make_rig: Any, ours_factory: Any) -> None:
    rig = make_rig(servers=False, file_sizes=())
    fast = TimerConfig(rekey_timeout=0.3, rekey_attempt_time=1.5, rekey_timeout_jitter=0.05)
    ours = ours_factory(
        rig, private_key=PrivateKey.generate(), endpoint=rig.peer_endpoint, timers=fast
    )
    ours.rt.send_packet(icmp4_echo(1, 1))
    assert ours.run_until(lambda: any(isinstance(e, HandshakeFailed) for e in ours.events), 5)
    assert ours.completed() == 0
    assert ours.device.counters[DropReason.HANDSHAKE_GAVE_UP] == 1
    assert rig.peer_status().latest_handshake == 0
    assert ours.rt.stats["tx_datagrams"] >= 4  # the initiation and its retries were sent


def test_wrong_psk_never_completes(make_rig: Any, ours_factory: Any) -> None:
    rig = make_rig(psk=True, servers=False, file_sizes=())
    fast = TimerConfig(rekey_timeout=0.3, rekey_attempt_time=1.2, rekey_timeout_jitter=0.05)
    ours = ours_factory(
        rig, endpoint=rig.peer_endpoint, psk=PresharedKey(bytes(range(32))), timers=fast
    )
    ours.rt.send_packet(icmp4_echo(1, 1))
    assert ours.run_until(lambda: any(isinstance(e, HandshakeFailed) for e in ours.events), 5)
    assert ours.completed() == 0
    # wireguard-go answered (the PSK only enters the response), but the answer never opens.
    assert ours.device.counters[DropReason.HANDSHAKE_DECRYPT_FAILED] >= 1
