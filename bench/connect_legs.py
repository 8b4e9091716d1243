"""The launcher's two Python legs of one blocking connect through the preload door, in process.

A fake peer (a responder `Device`, sans-IO) stands for the far side; the launcher's UDP socket is
a stub, so nothing leaves the process. Per connect, in CPU microseconds (thread time):
  legA   the CONNECT frame into a control connection -> its TUNNEL reply written (toSYN: until
         the sealed SYN is handed to the socket);
  legB   the SYN-ACK datagram read from the socket -> the outcome written to the shim;
  all    the whole cycle, the fake peer's work included.
Run by hand: `python bench/connect_legs.py [N]` (PYTHONPATH picks the checkout; WRAPGUARD_NOGC=1
turns the garbage collector off, which shows how much of a leg is its collections; else it
is tuned as in the launcher, runtime/launcher.py tune_gc).
"""

from __future__ import annotations

import asyncio
import gc
import ipaddress
import os
import socket
import sys
import tempfile
import time
from types import SimpleNamespace
from typing import Any

from wrapguard import log
from wrapguard.config import parse_config
from wrapguard.doors.preload import channel as ch
from wrapguard.doors.preload.door import PreloadDoor
from wrapguard.keys import PrivateKey
from wrapguard.routing import RoutingTable
from wrapguard.runtime.bypass import BypassList
from wrapguard.runtime.engine import Engine, PooledRandom
from wrapguard.runtime.launcher import tune_gc
from wrapguard.runtime.service import TunnelService
from wrapguard.tunnel.device import Device
from wrapguard.tunnel.events import DeliverPacket, SendDatagram
from wrapguard.tunnel.peer import PeerSpec
from wrapguard.wire.ip import PROTO_TCP, IPv4Packet, emit_ip, parse_ip
from wrapguard.wire.ipc import TOKEN_LEN, Address, ConnectRequest, Proto, emit_request
from wrapguard.wire.tcp import ACK, FIN, SYN, TcpSegment, emit_tcp, parse_tcp

CLIENT, PEER_KEY = PrivateKey(bytes(32)), PrivateKey(bytes([1]) * 32)
US, PEER, PEER_EP = "10.150.0.2", "10.150.0.1", ("127.0.0.1", 51820)
CONFIG = f"""
[Interface]
PrivateKey = {CLIENT.to_base64()}
Address = {US}/24
[Peer]
PublicKey = {PEER_KEY.public_key().to_base64()}
Endpoint = {PEER_EP[0]}:{PEER_EP[1]}
AllowedIPs = 10.150.0.0/24
"""
WARMUP = 300


class FakeSock:
    """The launcher's UDP socket: sendto() records, recvfrom_into() plays a queue."""

    def __init__(self) -> None:
        self.out: list[bytes] = []
        self.inq: list[bytes] = []
        self.first = 0.0  # thread time of the first send since `out` was emptied

    def sendto(self, data: bytes, addr: object) -> None:
        if not self.out:
            self.first = time.thread_time()
        self.out.append(bytes(data))

    def recvfrom_into(self, buf: bytearray) -> tuple[int, tuple[str, int]]:
        if not self.inq:
            raise BlockingIOError
        d = self.inq.pop(0)
        buf[: len(d)] = d
        return len(d), PEER_EP

    def fileno(self) -> int:
        return -1


class FakeTransport:
    def __init__(self) -> None:
        self.out: list[bytes] = []

    def write(self, b: bytes) -> None:
        self.out.append(bytes(b))

    def close(self) -> None:
        pass

    def get_extra_info(self, _key: str, default: Any = None) -> Any:
        return default


async def main(n: int) -> None:
    loop = asyncio.get_running_loop()
    config = parse_config(CONFIG)
    engine = Engine(config, RoutingTable.build(config))
    engine._loop = loop
    wg: Any = engine.wg
    wg._loop = loop
    sock = FakeSock()
    wg._v4, wg._mm_cdata = sock, None
    spec = PeerSpec(
        public_key=CLIENT.public_key(),
        preshared_key=None,
        endpoint=None,
        allowed_ips=(ipaddress.ip_network(US + "/32"),),
    )
    peer = Device(PEER_KEY, [spec], rng=os.urandom)

    def to_peer() -> tuple[list[bytes], list[bytes]]:
        """What the launcher sent, through the peer: (its packets, the peer's replies)."""
        pkts, replies = [], []
        out, sock.out = sock.out, []
        for d in out:
            for o in peer.datagram_received(d, ("127.0.0.1", 40000), loop.time(), time.time()):
                if isinstance(o, SendDatagram):
                    replies.append(o.data)
                elif isinstance(o, DeliverPacket):
                    pkts.append(o.packet)
        return pkts, replies

    def from_peer(datagrams: list[bytes]) -> None:
        sock.inq.extend(datagrams)
        wg._readable(sock)

    def peer_seal(pkt: bytes) -> list[bytes]:
        outs = peer.send_packet(pkt, loop.time(), time.time())
        return [o.data for o in outs if isinstance(o, SendDatagram)]

    session = SimpleNamespace(engine=engine, bypass=BypassList(), config=config, preload=None)
    door = PreloadDoor(TunnelService(session))  # type: ignore[arg-type]
    server = ch.ChannelServer(
        door, secret=bytes(32), uid=os.getuid(), token_source=PooledRandom(small=TOKEN_LEN)
    )  # as the launcher makes it
    await server.start(tempfile.mkdtemp())
    conn = ch._CtlConnection(server)
    transport = FakeTransport()
    conn._transport = transport  # type: ignore[assignment]
    dst = Address(ipaddress.IPv4Address(PEER), 9000)
    src_b, dst_b = ipaddress.ip_address(PEER).packed, ipaddress.ip_address(US).packed
    lo4 = {"lo4": True} if "lo4" in ConnectRequest.__dataclass_fields__ else {}

    def segment(syn: TcpSegment, flags: int, seq: int, ack: int) -> bytes:
        s = TcpSegment(syn.dst_port, syn.src_port, seq, ack, flags, 65535, b"")
        return emit_ip(IPv4Packet(src_b, dst_b, PROTO_TCP, emit_tcp(s, src_b, dst_b)))

    totals = {"legA": 0.0, "toSYN": 0.0, "legB": 0.0}

    def one(i: int, timed: bool) -> None:
        lo_port = 20000 + i % 20000
        frame = emit_request(
            ConnectRequest(Proto.TCP, dst, False, 0, lo_port, True, **lo4), bytes(32)
        )
        t0 = time.thread_time()
        conn.data_received(frame)  # leg A
        t1 = time.thread_time()
        t_syn = sock.first
        pkts, replies = to_peer()
        if replies:  # the handshake (first connect only)
            from_peer(replies)
            engine.flush()
            pkts += to_peer()[0]
        syn = [s for s in map(lambda p: parse_tcp(parse_ip(p).payload), pkts) if s.flags == SYN][-1]
        synack = peer_seal(segment(syn, SYN | ACK, 7000, syn.seq + 1))
        transport.out.clear()
        t2 = time.thread_time()
        from_peer(synack)  # leg B
        engine.flush()
        t3 = time.thread_time()
        assert transport.out, "no outcome written"
        # The program's data connection presents the token and closes; the peer closes too.
        token = list(server._tokens)[-1]
        a, b = socket.socketpair()
        a.setblocking(False)
        b.setblocking(False)
        server._token_arrived(b, token, lo_port)
        a.close()
        engine.flush()
        to_peer()
        from_peer(peer_seal(segment(syn, FIN | ACK, 7001, syn.seq + 2)))
        engine.flush()
        to_peer()
        conn._busy = False
        if timed:
            totals["legA"] += t1 - t0
            totals["toSYN"] += t_syn - t0
            totals["legB"] += t3 - t2

    for i in range(WARMUP):
        one(i, False)
    await asyncio.sleep(0)
    started = time.thread_time()
    for i in range(n):
        one(i, True)
        if i % 50 == 0:
            await asyncio.sleep(0)  # the relays see their program's EOF
    whole = time.thread_time() - started
    figures = "  ".join(f"{k} {v / n * 1e6:.1f} us" for k, v in totals.items())
    print(f"{figures}  all {whole / n * 1e6:.1f} us  (CPU per connect, N={n})")
    server.close()


if __name__ == "__main__":
    log.setup("warn")
    if os.environ.get("WRAPGUARD_NOGC"):
        gc.disable()
    else:
        tune_gc()  # as the launcher does
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 2000))
