"""Stack-level behaviour: demux, drops, UDP sockets, ICMP echo and unreachables."""

from __future__ import annotations

import errno
import random
from ipaddress import ip_address

import pytest
from netstack.lossy_link import Pair

from wrapguard.netstack import (
    DatagramReceived,
    DropReason,
    Event,
    PacketDropped,
    Stack,
    UdpError,
)
from wrapguard.wire.icmp import (
    ICMP_DEST_UNREACH,
    ICMP_ECHO_REPLY,
    ICMP_ECHO_REQUEST,
    ICMPV6_DEST_UNREACH,
    ICMPV6_ECHO_REPLY,
    ICMPV6_ECHO_REQUEST,
    IcmpMessage,
    emit_icmp,
    parse_icmp,
)
from wrapguard.wire.ip import (
    PROTO_ICMP,
    PROTO_ICMPV6,
    PROTO_TCP,
    IPv4Packet,
    IPv6Packet,
    emit_ip,
    parse_ip,
)
from wrapguard.wire.udp import UdpDatagram, emit_udp

A4, B4, A6, B6 = "10.150.0.1", "10.150.0.2", "fd15::1", "fd15::2"


def P(a: str) -> bytes:
    return ip_address(a).packed


def stack(*addrs: str, seed: int = 1) -> Stack:
    return Stack(addrs or (A4, A6), rng=random.Random(seed).getrandbits)


def events(st: Stack) -> list[Event]:
    """Every event the stack has queued, in order (next_event() until None)."""
    out = []
    ev = st.next_event()
    while ev is not None:
        out.append(ev)
        ev = st.next_event()
    return out


def drops(st: Stack) -> list[DropReason]:
    out = []
    ev = st.next_event()
    while ev is not None:
        if isinstance(ev, PacketDropped):
            out.append(ev.reason)
        ev = st.next_event()
    return out


def test_packet_for_other_address_dropped():
    st = stack()
    st.receive_packet(emit_ip(IPv4Packet(P(B4), P("10.150.0.9"), PROTO_TCP, b"\0" * 20)), 0.0)
    assert drops(st) == [DropReason.NOT_OUR_ADDRESS]
    assert st.take_outgoing() == []
    assert st.drops[DropReason.NOT_OUR_ADDRESS] == 1


def test_malformed_fragment_unknown_protocol_counted():
    st = stack()
    st.receive_packet(b"\x45garbage", 0.0)
    frag = bytearray(emit_ip(IPv4Packet(P(B4), P(A4), PROTO_TCP, b"\0" * 20)))
    frag[6] |= 0x20
    st.receive_packet(bytes(frag), 0.0)
    st.receive_packet(emit_ip(IPv4Packet(P(B4), P(A4), 99, b"x")), 0.0)
    st.receive_packet(emit_ip(IPv4Packet(P(B4), P(A4), PROTO_TCP, b"short")), 0.0)
    assert drops(st) == [
        DropReason.MALFORMED,
        DropReason.FRAGMENT,
        DropReason.UNKNOWN_PROTOCOL,
        DropReason.MALFORMED,
    ]


@pytest.mark.parametrize("v6", [False, True])
def test_icmp_echo_reply(v6):
    st = stack()
    req = IcmpMessage(
        ICMPV6_ECHO_REQUEST if v6 else ICMP_ECHO_REQUEST, 0, b"\x00\x2a\x00\x01", b"ping!"
    )
    if v6:
        pkt = emit_ip(IPv6Packet(P(B6), P(A6), PROTO_ICMPV6, emit_icmp(req, P(B6), P(A6))))
    else:
        pkt = emit_ip(IPv4Packet(P(B4), P(A4), PROTO_ICMP, emit_icmp(req)))
    st.receive_packet(pkt, 0.0)
    (out,) = st.take_outgoing()
    ip = parse_ip(out)
    assert (ip.src, ip.dst) == ((P(A6), P(B6)) if v6 else (P(A4), P(B4)))
    rep = parse_icmp(ip.payload)
    assert rep.type == (ICMPV6_ECHO_REPLY if v6 else ICMP_ECHO_REPLY)
    assert (rep.ident, rep.sequence, rep.payload) == (42, 1, b"ping!")


def test_udp_between_two_stacks_v4_and_v6():
    rng = random.Random(3)
    a, b = stack(A4, A6), stack(B4, B6)
    pair = Pair(a, b, rng)
    sa, sb = a.udp_bind(0), b.udp_bind(5353)
    a.udp_send(sa, (B4, 5353), b"hello v4", 0.0)
    a.udp_send(sa, (ip_address(B6), 5353), b"hello v6", 0.0)
    pair.step()
    got = [ev for _s, ev in pair.events()]
    port = a.udp_port(sa)
    assert got == [
        DatagramReceived(sb, (ip_address(A4), port), b"hello v4", ip_address(B4)),
        DatagramReceived(sb, (ip_address(A6), port), b"hello v6", ip_address(B6)),
    ]
    b.udp_send(sb, (ip_address(A4), port), b"reply", pair.now)
    pair.step()
    assert [ev for _s, ev in pair.events()] == [
        DatagramReceived(sa, (ip_address(B4), 5353), b"reply", ip_address(A4))
    ]


@pytest.mark.parametrize("v6", [False, True])
def test_udp_to_closed_port_icmp_unreachable_reaches_sender(v6):
    a, b = stack(A4, A6), stack(B4, B6)
    pair = Pair(a, b, random.Random(4))
    sa = a.udp_bind(0)
    dst = B6 if v6 else B4
    a.udp_send(sa, (dst, 9999), b"anyone?", 0.0)
    pair.step()  # b answers with port unreachable
    b_drops = [ev for s, ev in pair.events() if s == "b"]
    assert b_drops == [PacketDropped(DropReason.NO_SOCKET)]
    pair.step()
    assert [ev for _s, ev in pair.events()] == [
        UdpError(sa, (ip_address(dst), 9999), errno.ECONNREFUSED)
    ]


def test_icmp_unreachable_quote_format_v4():
    st = stack()
    orig = emit_ip(
        IPv4Packet(P(B4), P(A4), 17, emit_udp(UdpDatagram(1111, 2222, b"x" * 1000), P(B4), P(A4)))
    )
    st.receive_packet(orig, 0.0)
    (out,) = st.take_outgoing()
    assert len(out) == 576  # RFC 1812 4.3.2.3: as much as fits in 576 bytes
    ip = parse_ip(out)
    assert (ip.src, ip.dst) == (P(A4), P(B4))
    msg = parse_icmp(ip.payload)
    assert (msg.type, msg.code) == (ICMP_DEST_UNREACH, 3)
    assert msg.payload == orig[:548]  # the original header and the start of its data


def test_icmpv6_unreachable_host_maps_to_ehostunreach():
    a, b = stack(A4, A6), stack(B4, B6)
    cid = a.connect(B6, 80, 0.0)
    (syn,) = a.take_outgoing()
    msg = emit_icmp(IcmpMessage(ICMPV6_DEST_UNREACH, 3, payload=syn), P(B6), P(A6))
    a.receive_packet(emit_ip(IPv6Packet(P(B6), P(A6), PROTO_ICMPV6, msg)), 0.1)
    evs = []
    ev = a.next_event()
    while ev is not None:
        evs.append(ev)
        ev = a.next_event()
    assert evs[0].conn == cid and evs[0].errno == errno.EHOSTUNREACH
    del b


def test_unmatched_icmp_dropped():
    st = stack()
    msg = emit_icmp(IcmpMessage(ICMP_DEST_UNREACH, 1, payload=b"\x45" + b"\0" * 30))
    st.receive_packet(emit_ip(IPv4Packet(P(B4), P(A4), PROTO_ICMP, msg)), 0.0)
    assert drops(st) == [DropReason.UNMATCHED_ICMP]


def test_local_misuse_raises():
    st = stack(A4)
    with pytest.raises(OSError) as e:
        st.connect(B6, 80, 0.0)
    assert e.value.errno == errno.ENETUNREACH
    st.listen(80)
    with pytest.raises(OSError):
        st.listen(80)
    s = st.udp_bind(53)
    with pytest.raises(OSError):
        st.udp_bind(53)
    with pytest.raises(OSError) as e:
        st.udp_send(s, (B4, 53), b"x" * 1500, 0.0)
    assert e.value.errno == errno.EMSGSIZE
    with pytest.raises(OSError):
        st.send(12345, b"x", 0.0)


def test_many_connections_distinct_ports_and_ids():
    st = stack(A4)
    ids = {st.connect(B4, 80, 0.0) for _ in range(200)}
    ports = {st.conn_info(c).local[1] for c in ids}
    assert len(ids) == len(ports) == 200
    assert len(st.take_outgoing()) == 200


@pytest.mark.parametrize("v6", [False, True])
def test_udp_send_hot_path_builds_the_codecs_packets(v6):
    """udp_send's hot path (cached address sums, one struct pack) against udp_send_generic
    (emit_udp + emit_ip): byte for byte, for even and odd payloads, one whose checksum sums
    to zero (sent as 0xFFFF), and for ports and addresses that change."""
    fast, slow = stack(A4, A6), stack(A4, A6)
    sf, ss = fast.udp_bind(40000), slow.udp_bind(40000)
    rng = random.Random(7)
    payloads = [b"", b"x", b"\xff" * 64, bytes(1000), rng.randbytes(1371)]
    payloads += [rng.randbytes(rng.randrange(0, 1300)) for _ in range(40)]
    dsts = ["fd15::2", "fd15::9"] if v6 else ["10.150.0.2", "10.150.0.77"]
    for i, data in enumerate(payloads):
        dst = (ip_address(dsts[i % 2]), 53 + i)
        fast.udp_send(sf, dst, data, 0.0)
        slow.udp_send_generic(ss, dst, data, 0.0)
        (got,), (want,) = fast.take_outgoing(), slow.take_outgoing()
        assert got == want
    # A sum of zero is sent as 0xFFFF: with the payload's last word zero the field is C (the
    # complement of the sum S); making that word C brings the sum to 0xFFFF, complemented 0.
    off = 40 if v6 else 20
    base = rng.randbytes(18) + bytes(2)
    fast.udp_send(sf, (ip_address(dsts[0]), 7), base, 0.0)
    (first,) = fast.take_outgoing()
    data = base[:-2] + first[off + 6 : off + 8]
    fast.udp_send(sf, (ip_address(dsts[0]), 7), data, 0.0)
    slow.udp_send_generic(ss, (ip_address(dsts[0]), 7), data, 0.0)
    (got,), (want,) = fast.take_outgoing(), slow.take_outgoing()
    assert got == want and got[off + 6 : off + 8] == b"\xff\xff"


@pytest.mark.parametrize("v6", [False, True])
def test_udp_receive_hot_path_matches_the_general_path(v6):
    """Datagrams to a bound port take the hot path; what it must not take (a closed port,
    a bad UDP length, options, not our address) goes the general way and is answered or
    dropped as before."""
    st = stack(A4, A6)
    sock = st.udp_bind(5353)
    src, dst = (P(B6), P(A6)) if v6 else (P(B4), P(A4))
    mk = IPv6Packet if v6 else IPv4Packet

    def pkt(data: bytes, dport: int = 5353, to: bytes = dst) -> bytes:
        return emit_ip(mk(src, to, 17, emit_udp(UdpDatagram(999, dport, data), src, to)))

    st.receive_packet(pkt(b"hello"), 0.0)
    st.receive_packet(pkt(b"x" * 1001), 0.0)
    bad = bytearray(pkt(b"short"))
    off = 40 if v6 else 20
    bad[off + 4 : off + 6] = (200).to_bytes(2, "big")  # UDP length beyond the packet
    st.receive_packet(bytes(bad), 0.0)
    st.receive_packet(pkt(b"closed", dport=9), 0.0)
    other = P("fd15::99") if v6 else P("10.150.0.99")
    st.receive_packet(pkt(b"not ours", to=other), 0.0)
    evs = events(st)
    me = ip_address(A6 if v6 else A4)
    peer = ip_address(B6 if v6 else B4)
    assert evs == [
        DatagramReceived(sock, (peer, 999), b"hello", me),
        DatagramReceived(sock, (peer, 999), b"x" * 1001, me),
        PacketDropped(DropReason.MALFORMED),
        PacketDropped(DropReason.NO_SOCKET),
        PacketDropped(DropReason.NOT_OUR_ADDRESS),
    ]
    assert len(st.take_outgoing()) == 1  # the port unreachable


@pytest.mark.parametrize("v6", [False, True])
def test_taken_datagrams_then_events_come_in_the_events_order(v6):
    """take_datagrams() (the receive hot path's datagrams, no event object each) and then
    next_event() hand out exactly what next_event() alone does, in the same order: datagrams
    that arrive after an event (a drop) wait behind it. Three stacks get the same packets:
    one drained after each packet (the order of arrival), one after each burst the plain
    way, one the taking way."""
    each, plain, taking = stack(A4, A6), stack(A4, A6), stack(A4, A6)
    for st in (each, plain, taking):
        st.udp_bind(5353)
        st.udp_bind(7000)
    src, dst = (P(B6), P(A6)) if v6 else (P(B4), P(A4))
    mk = IPv6Packet if v6 else IPv4Packet

    def pkt(data: bytes, dport: int = 5353) -> bytes:
        return emit_ip(mk(src, dst, 17, emit_udp(UdpDatagram(999, dport, data), src, dst)))

    bad = bytearray(pkt(b"bad length"))
    bad[(40 if v6 else 20) + 4 : (40 if v6 else 20) + 6] = (200).to_bytes(2, "big")
    rng = random.Random(3)
    bursts = []
    for b in range(30):
        burst = [pkt(b"%d.%d" % (b, i), rng.choice([5353, 7000])) for i in range(rng.randrange(4))]
        for _ in range(rng.randrange(3)):
            at = rng.randrange(len(burst) + 1)
            burst.insert(at, rng.choice([bytes(bad), pkt(b"closed", dport=9)]))
        bursts.append(burst)
    want, got, arrived = [], [], []
    for burst in bursts:
        for p in burst:
            each.receive_packet(p, 0.0)
            arrived += events(each)
        for st in (plain, taking):
            for p in burst:
                st.receive_packet(p, 0.0)
        want += events(plain)
        got += [DatagramReceived(*d) for d in taking.take_datagrams()]
        got += events(taking)
        assert taking.take_datagrams() == [] and taking.quiet() == (not taking._ack_list)
    assert got == want == arrived
    kinds = {type(e) for e in want}
    assert kinds == {DatagramReceived, PacketDropped}
    assert sum(isinstance(e, DatagramReceived) for e in want) > 30


def test_udp_send_to_address_objects_used_again_builds_the_codecs_packets():
    """udp_send keeps the last destination object's packed form: objects used again,
    alternating, and equal objects that are not the same one all go where they say."""
    fast, slow = stack(A4, A6), stack(A4, A6)
    sf, ss = fast.udp_bind(40000), slow.udp_bind(40000)
    a, b = ip_address("10.150.0.2"), ip_address("10.150.0.77")
    dsts = [a, a, b, a, b, b, ip_address("10.150.0.2"), "10.150.0.9", a]
    for i, dst in enumerate(dsts):
        fast.udp_send(sf, (dst, 9), b"%d" % i, 0.0)
        slow.udp_send_generic(ss, (dst, 9), b"%d" % i, 0.0)
    got = fast.take_outgoing()
    assert got == slow.take_outgoing()
    assert [parse_ip(p).dst for p in got] == [ip_address(d).packed for d in dsts]
