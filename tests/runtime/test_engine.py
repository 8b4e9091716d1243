"""Tests for the engine's flush (runtime/engine.py), in memory: no sockets, no I/O."""

from __future__ import annotations

import asyncio
import socket
from ipaddress import ip_address
from types import SimpleNamespace

import pytest

from wrapguard.config import parse_config
from wrapguard.doors.preload.outbound import PreloadOutbound
from wrapguard.keys import PrivateKey
from wrapguard.netstack import Stack
from wrapguard.netstack.events import Connected, Event, PeerClosed
from wrapguard.routing import RoutingTable
from wrapguard.runtime.bypass import BypassList
from wrapguard.runtime.engine import Engine
from wrapguard.runtime.service import FrontEnd, TunnelService
from wrapguard.wire.ip import PROTO_TCP, IPv4Packet, emit_ip, parse_ip
from wrapguard.wire.ipc import Address
from wrapguard.wire.tcp import ACK, FIN, SYN, TcpSegment, emit_tcp, parse_tcp
from wrapguard.wire.udp import UdpDatagram, emit_udp

US, PEER = "10.150.0.2", "10.150.0.1"
CONFIG = f"""
[Interface]
PrivateKey = {PrivateKey(bytes(32)).to_base64()}
Address = {US}/24

[Peer]
PublicKey = {PrivateKey(bytes([1]) * 32).public_key().to_base64()}
AllowedIPs = 10.150.0.0/24
"""


class Recorder:
    """Stands for the UDP runtime and a flow: what left, what arrived, in order."""

    def __init__(self) -> None:
        self.log: list[tuple[str, object]] = []
        self.sent: list[bytes] = []

    def send_packets(self, batch: list[tuple[bytes, int | None]]) -> None:
        for pkt, _peer in batch:
            self.sent.append(pkt)
            self.log.append(("sent", parse_tcp(parse_ip(pkt).payload).flags))

    def on_event(self, event: Event) -> None:
        self.log.append(("event", type(event)))


def engine_with_recorder() -> tuple[Engine, Recorder]:
    config = parse_config(CONFIG)
    engine = Engine(config, RoutingTable.build(config))
    rec = Recorder()
    engine.wg.send_packets = rec.send_packets  # type: ignore[method-assign]
    return engine, rec


def from_peer(syn: TcpSegment, flags: int, payload: bytes = b"", seq_off: int = 0) -> bytes:
    src, dst = ip_address(PEER).packed, ip_address(US).packed
    seg = TcpSegment(syn.dst_port, syn.src_port, 5000 + seq_off, syn.seq + 1, flags, 65535, payload)
    return emit_ip(IPv4Packet(src, dst, PROTO_TCP, emit_tcp(seg, src, dst)))


def test_the_outcome_reaches_its_flow_before_the_ack_of_the_syn_ack_is_sent() -> None:
    """A door answers its program's connect() from the Connected event: that must not wait
    for the ACK's seal and send (issue 14). Other events still follow the round's packets."""
    engine, rec = engine_with_recorder()
    engine.connect(ip_address(PEER), 9000, rec)
    engine.flush()
    syn = parse_tcp(parse_ip(rec.sent[0]).payload)
    assert syn.flags == SYN and rec.log == [("sent", SYN)]
    rec.log.clear()
    now = engine.now()
    engine.stack.receive_packet(from_peer(syn, SYN | ACK), now)
    engine.flush()
    assert rec.log == [("event", Connected), ("sent", ACK)]
    rec.log.clear()
    # The peer's FIN: its ACK goes out before the flow hears of it, as before.
    engine.stack.receive_packet(from_peer(syn, FIN | ACK, seq_off=1), now)
    engine.flush()
    assert rec.log == [("sent", ACK), ("event", PeerClosed)]


def test_a_preload_connect_is_told_its_outcome_before_the_ack_is_sent() -> None:
    """The whole way from the engine to the channel's teller (PreloadOutbound.tell): the
    callback runs inside the flush, before the ACK leaves (the future's callbacks would run
    a loop turn later)."""
    engine, rec = engine_with_recorder()

    async def main() -> None:
        session = SimpleNamespace(engine=engine, bypass=BypassList())
        service = TunnelService(session)  # type: ignore[arg-type]
        out = PreloadOutbound(service, FrontEnd("preload"), lambda: None)
        token = bytes(range(16))
        out.open_tcp(Address(ip_address(PEER), 9000), token)
        assert out.tell(token, lambda st: rec.log.append(("told", st)))
        fut = out.status(token)
        assert fut is not None and not fut.done()
        syn = parse_tcp(parse_ip(rec.sent[0]).payload)
        rec.log.clear()
        engine.stack.receive_packet(from_peer(syn, SYN | ACK), engine.now())
        engine.flush()
        assert rec.log == [("told", 0), ("sent", ACK)] and fut.result() == 0
        assert not out.tell(token, lambda st: None)  # known already: nothing to wait for

    asyncio.run(main())


def test_a_failing_status_callback_does_not_stop_the_flow() -> None:
    engine, rec = engine_with_recorder()

    def broken(status: int) -> None:
        raise RuntimeError("a door's bug")

    async def main() -> None:
        session = SimpleNamespace(engine=engine, bypass=BypassList())
        service = TunnelService(session)  # type: ignore[arg-type]
        relay, fut = service.open_tcp(ip_address(PEER), 9000, on_status=broken)
        program, ours = socket.socketpair()
        relay.attach_socket(ours)
        program.sendall(b"sent before the tunnel was open")
        syn = parse_tcp(parse_ip(rec.sent[0]).payload)
        engine.stack.receive_packet(from_peer(syn, SYN | ACK), engine.now())
        engine.flush()
        assert fut.result() == 0
        for _ in range(50):  # the relay reads the program's bytes and sends them on
            await asyncio.sleep(0.01)
            engine.flush()  # (not started: nothing schedules it)
            if any(parse_tcp(parse_ip(p).payload).payload for p in rec.sent):
                break
        assert b"".join(parse_tcp(parse_ip(p).payload).payload for p in rec.sent) == (
            b"sent before the tunnel was open"
        )
        program.close()

    asyncio.run(main())


def test_running_loop_is_the_engines_while_it_runs_else_the_callers() -> None:
    engine, _ = engine_with_recorder()

    async def current() -> asyncio.AbstractEventLoop:
        return engine.running_loop()

    async def started() -> None:
        engine._loop = asyncio.get_running_loop()
        assert engine.running_loop() is engine._loop

    first = asyncio.new_event_loop()
    assert first.run_until_complete(current()) is first  # not started: the caller's loop
    first.run_until_complete(started())
    first.close()
    second = asyncio.new_event_loop()
    assert second.run_until_complete(current()) is second  # the engine's loop is not running
    second.close()


def test_pooled_randbits_spans_its_range_and_serves_tokens_from_the_pool(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The netstack's ISNs and ephemeral ports, and the channel's 16-byte tokens, come from
    one getrandom() per pool, not one each; every value of a width still comes out."""
    from wrapguard.runtime import engine

    draws: list[int] = []
    real = engine.secrets.token_bytes

    def counted(n: int) -> bytes:
        draws.append(n)
        return real(n)

    monkeypatch.setattr(engine.secrets, "token_bytes", counted)
    pool = engine.PooledRandom()
    assert {pool.randbits(3) for _ in range(500)} == set(range(8))
    assert all(0 <= pool.randbits(16) < 1 << 16 for _ in range(500))
    assert max(pool.randbits(32) for _ in range(500)) >= 1 << 24
    tokens = engine.PooledRandom(small=16)
    assert len({tokens(16) for _ in range(64)}) == 64
    assert draws and all(n == engine.PooledRandom.POOL for n in draws)
    assert len(draws) < 20  # 500 * (1 + 2 + 4) + 64 * 16 bytes: a dozen pools


def _udp_from_peer(dport: int, data: bytes, sport: int = 7000) -> bytes:
    src, dst = ip_address(PEER).packed, ip_address(US).packed
    return emit_ip(IPv4Packet(src, dst, 17, emit_udp(UdpDatagram(sport, dport, data), src, dst)))


def _udp_flow_transcript(sinks: bool) -> list[tuple[object, ...]]:
    """What two UdpFlows hear of datagrams, ICMP errors and a broken callback, delivered
    through the engine's datagram sinks (sinks=True) or as DatagramReceived events."""
    config = parse_config(CONFIG)
    engine = Engine(config, RoutingTable.build(config))
    sent: list[bytes] = []
    engine.wg.send_packets = lambda batch: sent.extend(p for p, _ in batch)  # type: ignore[method-assign]
    service = TunnelService(SimpleNamespace(engine=engine, bypass=BypassList()))  # type: ignore[arg-type]
    heard: list[tuple[object, ...]] = []

    def broken(src: object, data: bytes) -> None:
        heard.append(("broken", src, data))
        if data == b"raise":
            raise RuntimeError("a door's bug")

    a = service.open_udp(
        lambda src, d: heard.append(("a", src, d)), lambda dst, e: heard.append(("a err", dst, e))
    )
    b = service.open_udp(broken)
    if not sinks:
        engine.datagram_sinks.clear()
    peer = Stack([PEER], rng=lambda bits: 7)  # no socket bound: answers port unreachable
    a.send_many([((ip_address(PEER), 9), b"to a closed port")])
    for pkt in sent:
        peer.receive_packet(pkt, 0.0)
    (unreach,) = peer.take_outgoing()
    now = engine.now()
    for pkt in [
        _udp_from_peer(a.port, b"one"),
        _udp_from_peer(b.port, b"raise"),
        _udp_from_peer(b.port, b"after the bug"),
        unreach,
        _udp_from_peer(a.port, b"after the error", sport=7001),
    ]:
        engine.stack.receive_packet(pkt, now)
    engine.flush()
    engine.stack.receive_packet(_udp_from_peer(a.port, b"alone"), now)
    engine.flush()
    return heard


def test_datagram_sinks_hear_what_the_flows_events_say() -> None:
    """UdpFlow's datagrams through Engine.datagram_sinks (no event object) against the
    general way (DatagramReceived to its on_event): the same calls in the same order, a
    flow's ICMP error between its datagrams, and one callback's exception stops nothing."""
    fast, general = _udp_flow_transcript(True), _udp_flow_transcript(False)
    assert fast == general
    peer = ip_address(PEER)
    assert [h[0] for h in fast] == ["a", "broken", "broken", "a err", "a", "a"]
    assert fast[0] == ("a", (peer, 7000), b"one") and fast[3][1:] == ((peer, 9), 111)


def test_send_out_sends_what_flush_sends() -> None:
    """Engine.send_out (a flow's datagrams routed and sent without flush()'s rounds) sends
    what flush() would; with an event waiting in the stack it is flush() (the event is
    delivered)."""
    got = []
    for use_send_out in (False, True):
        config = parse_config(CONFIG)
        engine = Engine(config, RoutingTable.build(config))
        sent: list[tuple[bytes, int | None]] = []
        engine.wg.send_packets = sent.extend  # type: ignore[method-assign]
        service = TunnelService(SimpleNamespace(engine=engine, bypass=BypassList()))  # type: ignore[arg-type]
        heard: list[bytes] = []
        flow = service.open_udp(lambda _src, d, heard=heard: heard.append(d), port=40000)
        out = engine.send_out if use_send_out else engine.flush
        for n in (1, 3):
            for i in range(n):
                engine.stack.udp_send(flow.sock, (ip_address(PEER), 9 + i), b"%d" % i, 0.0)
            out()
        engine.stack.receive_packet(_udp_from_peer(flow.port, b"waiting"), engine.now())
        engine.stack.udp_send(flow.sock, (ip_address(PEER), 9), b"last", 0.0)
        out()
        got.append((sent, heard))
    assert got[0] == got[1]
    sent, heard = got[1]
    assert len(sent) == 5 and heard == [b"waiting"] and all(peer == 0 for _, peer in sent)
