"""The per-packet entry points `receive_transport` and `seal_packet` against the generic API.

Both must behave exactly like `datagram_received` / `send_packet` (same state changes, same
outputs in the same order), take a reusable buffer, and keep cryptokey routing intact with
the per-peer source cache.
"""

from __future__ import annotations

from wrapguard.tunnel.events import DeliverPacket, EndpointChanged, PacketDropped, SendDatagram
from wrapguard.wire.wgmsg import MSG_TRANSPORT

from .conftest import a_to_b


def _transport(net, payload: bytes = b"x" * 100) -> bytes:  # type: ignore[no-untyped-def]
    """A fresh transport message from a to b (after a handshake)."""
    (o,) = net.a.send_packet(net.a_to_b(payload), net.now, net.wall)
    assert isinstance(o, SendDatagram) and o.data[0] == MSG_TRANSPORT
    return o.data


def test_receive_transport_from_a_reused_buffer(net) -> None:  # type: ignore[no-untyped-def]
    net.handshake()
    buf = bytearray(2048)
    view = memoryview(buf)
    wires = [_transport(net, b"%03d" % i * 30) for i in range(5)]
    got = []
    for w in wires:
        buf[: len(w)] = w
        out: list[object] = []
        r = net.b.receive_transport(view[: len(w)], net.ADDR_A, net.now, net.wall, out)
        assert out == []
        assert r is not None
        got.append(r)
        buf[:] = bytes(len(buf))  # the caller reuses its buffer: the packet must not change
    assert [p for _, p in got] == [net.a_to_b(b"%03d" % i * 30) for i in range(5)]
    assert {peer for peer, _ in got} == {0}
    # A replay of the last one (same buffer again) is dropped and counted.
    buf[: len(wires[-1])] = wires[-1]
    out = []
    assert (
        net.b.receive_transport(view[: len(wires[-1])], net.ADDR_A, net.now, net.wall, out) is None
    )
    assert [type(o) for o in out] == [PacketDropped]


def test_receive_transport_matches_datagram_received(net) -> None:  # type: ignore[no-untyped-def]
    net.handshake()
    w = _transport(net)
    outs = net.b.datagram_received(w, ("192.0.2.99", 4000), net.now, net.wall)
    # Roaming is reported before the delivery, in both APIs.
    assert [type(o) for o in outs] == [EndpointChanged, DeliverPacket]
    w2 = _transport(net)
    out: list[object] = []
    r = net.b.receive_transport(w2, net.ADDR_A, net.now, net.wall, out)
    assert [type(o) for o in out] == [EndpointChanged]
    assert r == (0, net.a_to_b(b"x" * 100))


def test_source_cache_does_not_widen_cryptokey_routing(net) -> None:  # type: ignore[no-untyped-def]
    net.handshake()
    ok = _transport(net)
    assert net.b.receive_transport(ok, net.ADDR_A, net.now, net.wall, []) is not None
    # a may send only from 10.0.0.1: a spoofed inner source is dropped, also after a cache hit.
    for _ in range(2):
        (o,) = net.a.send_packet(net.ipv4("10.0.0.9", "10.0.0.2"), net.now, net.wall)
        out: list[object] = []
        assert net.b.receive_transport(o.data, net.ADDR_A, net.now, net.wall, out) is None
        assert isinstance(out[0], PacketDropped) and out[0].reason.name == "DISALLOWED_SOURCE"
    assert net.b.receive_transport(_transport(net), net.ADDR_A, net.now, net.wall, []) is not None


def test_seal_packet_matches_send_packet(net) -> None:  # type: ignore[no-untyped-def]
    net.handshake()
    out: list[object] = []
    r = net.a.seal_packet(net.a_to_b(b"fast"), net.now, net.wall, None, out)
    assert out == [] and r is not None
    addr, wire = r
    assert addr == net.ADDR_B and wire[0] == MSG_TRANSPORT
    (o,) = net.a.send_packet(net.a_to_b(b"slow"), net.now, net.wall)
    assert isinstance(o, SendDatagram) and o.addr == addr
    # Consecutive counters, both open at b, in order.
    for data, want in ((wire, b"fast"), (o.data, b"slow")):
        got = net.b.receive_transport(data, net.ADDR_A, net.now, net.wall, [])
        assert got == (0, net.a_to_b(want))
    # Explicit peer index, and no route: a drop in `out`, nothing to send.
    assert net.a.seal_packet(net.a_to_b(b"p"), net.now, net.wall, 0, []) is not None
    out = []
    assert net.a.seal_packet(net.ipv4("10.0.0.1", "10.9.9.9"), net.now, net.wall, None, out) is None
    assert isinstance(out[0], PacketDropped) and out[0].reason.name == "NO_ROUTE"


def test_seal_packet_before_handshake_stages_and_initiates(net) -> None:  # type: ignore[no-untyped-def]
    out: list[object] = []
    assert net.a.seal_packet(net.a_to_b(b"early"), net.now, net.wall, None, out) is None
    # The packet waits for the handshake; the initiation goes out through `out`.
    assert len(out) == 1 and isinstance(out[0], SendDatagram) and out[0].data[0] == 1
    net.take("a", out)
    net.pump()
    assert net.got["b"] == [net.a_to_b(b"early")]


def _peer_state(dev):  # type: ignore[no-untyped-def]
    p = dev.peers[0]
    return (p.current.send_counter, p.tx_bytes, p.t_new_handshake, p.t_persistent)


def test_seal_packets_matches_seal_packet(make_net) -> None:  # type: ignore[no-untyped-def]
    """One batch call seals exactly what per-packet calls seal (same bytes, counters,
    timers), with the C sealer and with the pure-Python one, and b opens every message."""
    sizes = [1420] * 20 + [40, 21, 35, 36, 37, 1419, 1405, 1404, 1280]
    packets = [net_a_to_b(n) for n in sizes]
    batch_net, one_net = make_net(keepalive_a=25), make_net(keepalive_a=25)
    for n in (batch_net, one_net):
        n.handshake()
    out: list[object] = []
    got = batch_net.a.seal_packets(packets, batch_net.now, batch_net.wall, 0, out)
    assert got is not None and out == []
    ep, blob, lens = got
    singles = []
    for p in packets:
        r = one_net.a.seal_packet(p, one_net.now, one_net.wall, 0, out)
        assert r is not None and out == []
        singles.append(r[1])
    assert ep == one_net.ADDR_B
    assert (blob, lens) == (b"".join(singles), [len(w) for w in singles])
    assert _peer_state(batch_net.a) == _peer_state(one_net.a)
    # The pure-Python path of the keypair gives the same bytes for the next counters.
    kp_c, kp_py = batch_net.a.peers[0].current, one_net.a.peers[0].current
    assert kp_c.seal_batch(packets, 1420) == kp_py.seal_batch(packets, 1420, fast=False)
    o = 0
    opened = []
    for ln in lens:
        r = batch_net.b.receive_transport(blob[o : o + ln], batch_net.ADDR_A, 0.0, 0.0, out)
        assert r is not None
        opened.append(r[1])
        o += ln
    assert opened == packets and out == []


def test_seal_packets_leaves_staging_to_seal_packet(net) -> None:  # type: ignore[no-untyped-def]
    """Without a session nothing is sealed, staged or initiated: the caller falls back."""
    out: list[object] = []
    assert net.a.seal_packets([net.a_to_b(b"x"), net.a_to_b(b"y")], 0.0, net.wall, 0, out) is None
    assert out == [] and not net.a.peers[0].staged


def net_a_to_b(n: int) -> bytes:
    """An IPv4 packet of n bytes (n >= 20) from a to b."""
    return a_to_b(bytes(i & 0xFF for i in range(n - 20)))
