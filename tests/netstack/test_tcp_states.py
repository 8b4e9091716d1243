"""Per-state TCP tests: one segment in, the exact reply out (RFC 9293 3.10.7)."""

from __future__ import annotations

import errno

from wrapguard.netstack import (
    Accepted,
    Closed,
    Connected,
    ConnectFailed,
    PeerClosed,
    Readable,
    Reset,
    TcpConfig,
    TcpState,
)
from wrapguard.wire.tcp import ACK, FIN, PSH, RST, SYN, TcpOptions

P = 5000  # the raw peer's ISN
SYN_OPTS = TcpOptions(mss=1460, wscale=7, sack_permitted=True)
EPHEMERAL = 32768 + 1000  # const RNG: 1000 % span


def passive(raw, opts=SYN_OPTS):
    """LISTEN -> ESTABLISHED through a handshake; returns the connection id."""
    raw.stack.listen(80)
    replies = raw.send(SYN, P, options=opts)
    assert [s.flags for s in replies] == [SYN | ACK]
    assert raw.send(ACK, P + 1, ISS + 1) == []
    acc = [e for e in raw.drain() if isinstance(e, Accepted)]
    assert len(acc) == 1
    raw.events.clear()
    return acc[0].conn


def active(raw, opts=SYN_OPTS):
    """CLOSED -> SYN-SENT -> ESTABLISHED; the peer is port 80, we are EPHEMERAL."""
    cid = raw.stack.connect(raw.peer, 80, raw.now)
    (syn,) = raw.out()
    assert syn.flags == SYN and syn.seq == ISS
    raw.sport, raw.dport = 80, EPHEMERAL
    (ack,) = raw.send(SYN | ACK, P, ISS + 1, options=opts)
    assert (ack.flags, ack.seq, ack.ack) == (ACK, ISS + 1, P + 1)
    assert Connected(cid) in raw.drain()
    raw.events.clear()
    return cid


ISS = 1000


def state(raw, cid):
    return raw.stack.conn_info(cid).state


# ---------------------------------------------------------------- LISTEN / CLOSED


def test_listen_syn_gets_synack_with_options(make_raw):
    raw = make_raw()
    raw.stack.listen(80)
    (sa,) = raw.send(SYN, P, options=SYN_OPTS)
    assert sa.flags == SYN | ACK
    assert (sa.seq, sa.ack, sa.src_port, sa.dst_port) == (ISS, P + 1, 80, 40000)
    assert sa.window == 65535  # a SYN's window is never scaled (RFC 7323 2.2)
    assert sa.options == TcpOptions(mss=1380, wscale=7, sack_permitted=True)


def test_listen_syn_without_options_gets_plain_synack_v6(make_raw):
    raw = make_raw(v6=True)
    raw.stack.listen(80)
    (sa,) = raw.send(SYN, P)
    assert sa.options == TcpOptions(mss=1360)  # MTU 1420 - 60, no WS/SACK echoed


def test_syn_to_closed_port_gets_rst_ack(make_raw):
    raw = make_raw()
    (rst,) = raw.send(SYN, P, dport=81)
    assert (rst.flags, rst.seq, rst.ack) == (RST | ACK, 0, P + 1)


def test_ack_to_closed_port_gets_rst_with_seq_of_ack(make_raw):
    raw = make_raw()
    (rst,) = raw.send(ACK, P, 777, payload=b"x", dport=81)
    assert (rst.flags, rst.seq) == (RST, 777)


def test_rst_to_closed_port_gets_nothing(make_raw):
    raw = make_raw()
    assert raw.send(RST, P, dport=81) == []


def test_listen_ack_gets_rst(make_raw):
    raw = make_raw()
    raw.stack.listen(80)
    (rst,) = raw.send(ACK, P, 4242)
    assert (rst.flags, rst.seq) == (RST, 4242)


# ---------------------------------------------------------------- SYN-RECEIVED


def test_syn_received_bad_ack_gets_rst(make_raw):
    raw = make_raw()
    raw.stack.listen(80)
    raw.send(SYN, P, options=SYN_OPTS)
    (rst,) = raw.send(ACK, P + 1, ISS + 50)
    assert (rst.flags, rst.seq) == (RST, ISS + 50)
    assert not any(isinstance(e, Accepted) for e in raw.drain())


def test_syn_received_retransmitted_syn_gets_synack_again(make_raw):
    raw = make_raw()
    raw.stack.listen(80)
    raw.send(SYN, P, options=SYN_OPTS)
    (sa,) = raw.send(SYN, P, options=SYN_OPTS)
    assert (sa.flags, sa.seq, sa.ack) == (SYN | ACK, ISS, P + 1)


def test_syn_received_retransmits_synack_on_timeout_then_gives_up(make_raw):
    raw = make_raw(config=TcpConfig(synack_retries=2))
    raw.stack.listen(80)
    raw.send(SYN, P, options=SYN_OPTS)
    assert [s.flags for s in raw.advance(1.0)] == [SYN | ACK]
    assert [s.flags for s in raw.advance(2.0)] == [SYN | ACK]
    assert raw.advance(4.0) == []
    assert raw.stack.connection_count() == 0


def test_ack_with_data_completes_handshake_and_delivers(make_raw):
    raw = make_raw()
    raw.stack.listen(80)
    raw.send(SYN, P, options=SYN_OPTS)
    raw.send(ACK | PSH, P + 1, ISS + 1, payload=b"hello")
    ev = raw.drain()
    acc = next(e for e in ev if isinstance(e, Accepted))
    assert Readable(acc.conn) in ev
    assert raw.stack.recv(acc.conn) == b"hello"


# ---------------------------------------------------------------- SYN-SENT


def test_syn_sent_synack_gets_ack_and_connected(make_raw):
    raw = make_raw()
    cid = active(raw)
    assert state(raw, cid) is TcpState.ESTABLISHED
    info = raw.stack.conn_info(cid)
    assert str(info.local[0]) == "10.150.0.1" and info.local[1] == EPHEMERAL


def test_syn_sent_syn_has_our_options(make_raw):
    raw = make_raw()
    raw.stack.connect(raw.peer, 80, 0.0)
    (syn,) = raw.out()
    assert syn.options == TcpOptions(mss=1380, wscale=7, sack_permitted=True)
    assert syn.window == 65535


def test_syn_sent_rst_ack_is_refused(make_raw):
    raw = make_raw()
    cid = raw.stack.connect(raw.peer, 80, 0.0)
    raw.out()
    raw.sport, raw.dport = 80, EPHEMERAL
    assert raw.send(RST | ACK, 0, ISS + 1) == []
    assert raw.drain() == [ConnectFailed(cid, errno.ECONNREFUSED), Closed(cid)]


def test_syn_sent_rst_with_bad_ack_is_ignored(make_raw):
    raw = make_raw()
    cid = raw.stack.connect(raw.peer, 80, 0.0)
    raw.out()
    raw.sport, raw.dport = 80, EPHEMERAL
    assert raw.send(RST | ACK, 0, ISS + 7) == []
    assert raw.drain() == []
    assert state(raw, cid) is TcpState.SYN_SENT


def test_syn_sent_bad_ack_gets_rst(make_raw):
    raw = make_raw()
    raw.stack.connect(raw.peer, 80, 0.0)
    raw.out()
    raw.sport, raw.dport = 80, EPHEMERAL
    (rst,) = raw.send(SYN | ACK, P, ISS + 9)
    assert (rst.flags, rst.seq) == (RST, ISS + 9)


def test_syn_sent_retries_then_times_out(make_raw):
    raw = make_raw(config=TcpConfig(connect_timeout=7.0))
    cid = raw.stack.connect(raw.peer, 80, 0.0)
    raw.out()
    times = []
    while raw.stack.next_deadline() is not None and not raw.drain():
        t = raw.stack.next_deadline()
        segs = raw.advance(t - raw.now)
        if segs:
            assert segs[0].flags == SYN and segs[0].seq == ISS
            times.append(raw.now)
    assert times == [1.0, 3.0]  # RFC 6298 5.5: 1 s, then doubled
    assert raw.now == 7.0
    assert raw.drain() == [ConnectFailed(cid, errno.ETIMEDOUT), Closed(cid)]


def test_icmp_port_unreachable_fails_connect(make_raw):
    from ipaddress import ip_address

    from wrapguard.wire.icmp import ICMP_DEST_UNREACH, IcmpMessage, emit_icmp
    from wrapguard.wire.ip import PROTO_ICMP, IPv4Packet, emit_ip

    raw = make_raw()
    cid = raw.stack.connect(raw.peer, 80, 0.0)
    (syn_pkt,) = raw.stack.take_outgoing()
    msg = emit_icmp(IcmpMessage(ICMP_DEST_UNREACH, 3, payload=syn_pkt[:28]))
    pkt = emit_ip(
        IPv4Packet(ip_address(raw.peer).packed, ip_address(raw.us).packed, PROTO_ICMP, msg)
    )
    raw.stack.receive_packet(pkt, 0.1)
    assert raw.drain() == [ConnectFailed(cid, errno.ECONNREFUSED), Closed(cid)]


# ---------------------------------------------------------------- ESTABLISHED


def test_established_one_segment_is_acked_after_delay(make_raw):
    raw = make_raw()
    cid = passive(raw)
    assert raw.send(ACK | PSH, P + 1, ISS + 1, payload=b"a" * 100) == []
    assert raw.drain() == [Readable(cid)]
    raw.now += 0.039
    assert raw.advance(0.0) == []
    (ack,) = raw.advance(0.002)  # the 40 ms delayed-ACK timer
    assert (ack.flags, ack.seq, ack.ack) == (ACK, ISS + 1, P + 101)
    assert ack.window == (4 << 20) - 100 >> 7


def test_established_second_full_segment_is_acked_at_once(make_raw):
    raw = make_raw()
    passive(raw)
    assert raw.send(ACK, P + 1, ISS + 1, payload=b"a" * 1380) == []
    (ack,) = raw.send(ACK, P + 1381, ISS + 1, payload=b"b" * 1380)
    assert ack.ack == P + 2761 and ack.options.sack_blocks == ()


def test_established_out_of_order_gets_dup_ack_with_sack(make_raw):
    raw = make_raw()
    cid = passive(raw)
    (dup,) = raw.send(ACK, P + 101, ISS + 1, payload=b"b" * 100)
    assert dup.ack == P + 1
    assert dup.options.sack_blocks == ((P + 101, P + 201),)
    (ack,) = raw.send(ACK, P + 1, ISS + 1, payload=b"a" * 100)  # fills the hole: ACK at once
    assert ack.ack == P + 201 and ack.options.sack_blocks == ()
    assert raw.stack.recv(cid) == b"a" * 100 + b"b" * 100


def test_established_sack_blocks_latest_first(make_raw):
    raw = make_raw()
    passive(raw)
    raw.send(ACK, P + 101, ISS + 1, payload=b"b" * 100)
    (dup,) = raw.send(ACK, P + 301, ISS + 1, payload=b"c" * 100)
    assert dup.options.sack_blocks == ((P + 301, P + 401), (P + 101, P + 201))


def test_established_out_of_window_segment_gets_ack(make_raw):
    raw = make_raw()
    cid = passive(raw)
    (ack,) = raw.send(ACK, P + 1 + (8 << 20), ISS + 1, payload=b"z" * 10)
    assert (ack.flags, ack.seq, ack.ack) == (ACK, ISS + 1, P + 1)
    assert raw.stack.recv(cid) == b""


def test_established_old_duplicate_gets_ack(make_raw):
    raw = make_raw()
    passive(raw)
    raw.send(ACK, P + 1, ISS + 1, payload=b"a" * 100)
    (ack,) = raw.send(ACK, P + 1, ISS + 1, payload=b"a" * 100)
    assert ack.ack == P + 101


def test_established_exact_rst_resets(make_raw):
    raw = make_raw()
    cid = passive(raw)
    assert raw.send(RST, P + 1) == []
    assert raw.drain() == [Reset(cid, errno.ECONNRESET), Closed(cid)]
    assert raw.stack.connection_count() == 0


def test_established_inexact_rst_gets_challenge_ack(make_raw):
    raw = make_raw()
    cid = passive(raw)
    (ack,) = raw.send(RST, P + 50)
    assert (ack.flags, ack.ack) == (ACK, P + 1)  # RFC 5961 3.2
    assert state(raw, cid) is TcpState.ESTABLISHED


def test_established_syn_gets_challenge_ack(make_raw):
    raw = make_raw()
    cid = passive(raw)
    (ack,) = raw.send(SYN, P + 10, options=SYN_OPTS)
    assert (ack.flags, ack.ack) == (ACK, P + 1)  # RFC 5961 4.2
    assert state(raw, cid) is TcpState.ESTABLISHED


def test_established_ack_for_unsent_data_gets_ack(make_raw):
    raw = make_raw()
    passive(raw)
    (ack,) = raw.send(ACK, P + 1, ISS + 500)
    assert (ack.seq, ack.ack) == (ISS + 1, P + 1)


def test_established_send_emits_data_with_psh(make_raw):
    raw = make_raw()
    cid = passive(raw)
    assert raw.stack.send(cid, b"x" * 3000, 0.0) == 3000
    segs = raw.out()
    assert [(s.seq, len(s.payload)) for s in segs] == [
        (ISS + 1, 1380),
        (ISS + 1381, 1380),
        (ISS + 2761, 240),
    ]
    assert segs[-1].flags == ACK | PSH and segs[0].flags == ACK


def test_established_three_dup_acks_fast_retransmit(make_raw):
    raw = make_raw()
    cid = passive(raw)
    raw.stack.send(cid, b"x" * 1380 * 6, 0.0)
    assert len(raw.out()) == 6
    for _ in range(2):
        assert raw.send(ACK, P + 1, ISS + 1) == []
    (rexmit,) = raw.send(ACK, P + 1, ISS + 1)
    assert rexmit.seq == ISS + 1 and len(rexmit.payload) == 1380


def test_established_sack_retransmits_only_the_hole(make_raw):
    raw = make_raw()
    cid = passive(raw)
    raw.stack.send(cid, b"x" * 1380 * 6, 0.0)
    raw.out()
    sacked = TcpOptions(sack_blocks=((ISS + 1381, ISS + 1 + 1380 * 5),))
    (rexmit,) = raw.send(ACK, P + 1, ISS + 1, options=sacked)
    assert rexmit.seq == ISS + 1 and len(rexmit.payload) == 1380


def test_established_rto_retransmits_and_backs_off(make_raw):
    raw = make_raw()
    cid = passive(raw)  # handshake RTT 0: RTO = rto_min 200 ms
    raw.stack.send(cid, b"x" * 100, 0.0)
    raw.out()
    (r1,) = raw.advance(0.2)
    (r2,) = raw.advance(0.4)
    assert r1.seq == r2.seq == ISS + 1 and r2.payload == b"x" * 100
    assert raw.advance(0.79) == []


def test_established_fin_gets_ack_and_peer_closed(make_raw):
    raw = make_raw()
    cid = passive(raw)
    (ack,) = raw.send(FIN | ACK, P + 1, ISS + 1)
    assert (ack.flags, ack.ack) == (ACK, P + 2)
    assert raw.drain() == [PeerClosed(cid)]
    assert state(raw, cid) is TcpState.CLOSE_WAIT
    raw.events.clear()
    raw.stack.close(cid, 0.0)
    (fin,) = raw.out()
    assert (fin.flags, fin.seq) == (FIN | ACK, ISS + 1)
    assert state(raw, cid) is TcpState.LAST_ACK
    assert raw.send(ACK, P + 2, ISS + 2) == []
    assert raw.drain() == [Closed(cid)]
    assert raw.stack.connection_count() == 0


def test_out_of_order_fin_waits_for_data(make_raw):
    raw = make_raw()
    cid = passive(raw)
    raw.send(FIN | ACK, P + 11, ISS + 1)
    assert PeerClosed(cid) not in raw.drain()
    raw.send(ACK, P + 1, ISS + 1, payload=b"0123456789")
    assert PeerClosed(cid) in raw.drain()
    assert raw.stack.recv(cid) == b"0123456789"


# ---------------------------------------------------------------- closing states


def test_fin_wait_1_fin_is_simultaneous_close(make_raw):
    raw = make_raw()
    cid = passive(raw)
    raw.stack.shutdown_write(cid, 0.0)
    (fin,) = raw.out()
    assert fin.flags == FIN | ACK and state(raw, cid) is TcpState.FIN_WAIT_1
    (ack,) = raw.send(FIN | ACK, P + 1, ISS + 1)  # the peer's FIN, ours not acked yet
    assert ack.ack == P + 2
    assert state(raw, cid) is TcpState.CLOSING
    assert raw.send(ACK, P + 2, ISS + 2) == []
    assert Closed(cid) in raw.drain()
    assert raw.stack.connection_count() == 1  # TIME-WAIT
    raw.advance(2.0)
    assert raw.stack.connection_count() == 0


def test_fin_wait_2_then_fin_enters_time_wait(make_raw):
    raw = make_raw()
    cid = passive(raw)
    raw.stack.shutdown_write(cid, 0.0)
    raw.out()
    assert raw.send(ACK, P + 1, ISS + 2) == []
    assert state(raw, cid) is TcpState.FIN_WAIT_2
    raw.send(ACK, P + 1, ISS + 2, payload=b"still talking")  # half-close: data still flows
    assert raw.stack.recv(cid) == b"still talking"
    (ack,) = raw.send(FIN | ACK, P + 14, ISS + 2)
    assert ack.ack == P + 15
    assert raw.drain()[-2:] == [PeerClosed(cid), Closed(cid)]
    # TIME-WAIT answers a retransmitted FIN with an ACK.
    (again,) = raw.send(FIN | ACK, P + 14, ISS + 2)
    assert again.ack == P + 15


def test_fin_wait_1_fin_ack_goes_to_time_wait(make_raw):
    raw = make_raw()
    cid = passive(raw)
    raw.stack.close(cid, 0.0)
    raw.out()
    (ack,) = raw.send(FIN | ACK, P + 1, ISS + 2)
    assert ack.ack == P + 2
    assert Closed(cid) in raw.drain()


def test_close_with_unread_data_sends_rst(make_raw):
    raw = make_raw()
    cid = passive(raw)
    raw.send(ACK, P + 1, ISS + 1, payload=b"unread")
    raw.stack.close(cid, 0.0)
    (rst,) = raw.out()
    assert rst.flags == RST and rst.seq == ISS + 1
    assert Closed(cid) in raw.drain()


def test_abort_sends_rst(make_raw):
    raw = make_raw()
    cid = active(raw)
    raw.stack.abort(cid, 0.0)
    (rst,) = raw.out()
    assert (rst.flags, rst.seq) == (RST, ISS + 1)
    assert raw.drain() == [Closed(cid)]


def test_last_ack_rst_closes_quietly(make_raw):
    raw = make_raw()
    cid = passive(raw)
    raw.send(FIN | ACK, P + 1, ISS + 1)
    raw.stack.close(cid, 0.0)
    raw.out()
    raw.events.clear()
    raw.send(RST, P + 2)
    assert raw.drain() == [Closed(cid)]


# ---------------------------------------------------------------- windows


def test_zero_window_probe(make_raw):
    raw = make_raw()
    cid = passive(raw)
    raw.send(ACK, P + 1, ISS + 1, window=0)  # the peer closes its window
    assert raw.stack.send(cid, b"y" * 500, 0.0) == 500
    assert raw.out() == []
    (probe,) = raw.advance(0.2)
    assert (probe.flags, probe.seq, probe.payload) == (ACK, ISS, b"")  # SND.UNA - 1
    (probe2,) = raw.advance(0.4)  # backed off
    assert probe2.seq == ISS
    (data,) = raw.send(ACK, P + 1, ISS + 1, window=1)  # window reopens: 1 << 7 bytes
    assert data.seq == ISS + 1 and len(data.payload) == 128


def test_zero_window_probes_to_a_dead_peer_end_with_etimedout(make_raw):
    """RFC 9293 3.8.6.1: open while probes are answered; unanswered ones are limited."""
    raw = make_raw(config=TcpConfig(max_retries=3))
    cid = passive(raw)
    raw.send(ACK, P + 1, ISS + 1, window=0)
    raw.stack.send(cid, b"y" * 500, 0.0)
    for _ in range(5):  # an answered probe (the window still zero) resets the count
        assert len(raw.advance(61.0)) == 1
        raw.send(ACK, P + 1, ISS + 1, window=0)
    raw.drain()
    raw.events.clear()
    probes = 0
    for _ in range(10):  # the peer is gone: three more probes, then the connection ends
        probes += len(raw.advance(61.0))
    assert probes == 3
    assert raw.drain() == [Reset(cid, errno.ETIMEDOUT), Closed(cid)]


def test_receive_window_closes_and_reopens(make_raw):
    raw = make_raw(config=TcpConfig(rcv_buf=4 * 1380))
    cid = passive(raw, opts=TcpOptions(mss=1380))  # no window scaling
    for i in range(4):
        raw.send(ACK, P + 1 + i * 1380, ISS + 1, payload=b"w" * 1380)
    raw.advance(0.05)
    (ack,) = raw.send(ACK, P + 1 + 4 * 1380, ISS + 1, payload=b"overflow")
    assert (ack.ack, ack.window) == (P + 1 + 4 * 1380, 0)
    assert raw.stack.recv(cid, 2 * 1380) == b"w" * 2760
    (upd,) = raw.out()  # a window update once the app reads
    assert upd.window == 2 * 1380 and upd.ack == P + 1 + 4 * 1380


def test_send_buffer_limit(make_raw):
    raw = make_raw(config=TcpConfig(snd_buf=10_000))
    cid = passive(raw)
    assert raw.stack.send(cid, b"a" * 25_000, 0.0) == 10_000
    assert raw.stack.send(cid, b"a", 0.0) == 0


# ---------------------------------------------------------------- more edges


def test_peer_window_is_scaled(make_raw):
    raw = make_raw()
    cid = passive(raw)
    raw.send(ACK, P + 1, ISS + 1, window=10)  # 10 << 7 = 1280 bytes
    raw.stack.send(cid, b"q" * 3000, 0.0)
    (seg,) = raw.out()
    assert len(seg.payload) == 1280


def test_time_wait_accepts_new_syn_on_listener(make_raw):
    raw = make_raw()
    cid = passive(raw)
    raw.stack.close(cid, 0.0)
    raw.out()
    raw.send(FIN | ACK, P + 1, ISS + 2)  # -> TIME-WAIT
    assert raw.stack.connection_count() == 1
    (sa,) = raw.send(SYN, P + 100_000, options=SYN_OPTS)
    assert (sa.flags, sa.ack) == (SYN | ACK, P + 100_001)


def test_backlog_full_drops_syn(make_raw):
    from wrapguard.netstack import DropReason

    raw = make_raw(config=TcpConfig(backlog=2))
    raw.stack.listen(80)
    for sport in (1001, 1002):
        assert [s.flags for s in raw.send(SYN, P, options=SYN_OPTS, sport=sport)] == [SYN | ACK]
    assert raw.send(SYN, P, options=SYN_OPTS, sport=1003) == []
    assert raw.dropped == [DropReason.BACKLOG_FULL]


def test_unlisten_resets_half_open(make_raw):
    raw = make_raw()
    raw.stack.listen(80)
    raw.send(SYN, P, options=SYN_OPTS)
    raw.stack.unlisten(80)
    (rst,) = raw.out()
    assert rst.flags == RST and rst.seq == ISS + 1
    (rst2,) = raw.send(SYN, P, options=SYN_OPTS, sport=1234)  # nobody listens now
    assert rst2.flags == RST | ACK


def test_orphaned_fin_wait_2_times_out(make_raw):
    raw = make_raw()
    cid = passive(raw)
    raw.stack.close(cid, 0.0)
    raw.out()
    raw.send(ACK, P + 1, ISS + 2)
    assert raw.stack.connection_count() == 1  # FIN-WAIT-2, the peer never closes
    raw.advance(59.0)
    assert raw.stack.connection_count() == 1
    raw.advance(1.0)
    assert raw.stack.connection_count() == 0
    assert raw.drain()[-1] == Closed(cid)


def test_data_after_close_gets_rst(make_raw):
    raw = make_raw()
    cid = passive(raw)
    raw.stack.close(cid, 0.0)
    raw.out()
    (rst,) = raw.send(ACK, P + 1, ISS + 2, payload=b"too late")
    assert rst.flags == RST
    assert raw.drain()[-1] == Closed(cid)
    assert raw.stack.connection_count() == 0


def test_ipv6_active_open(make_raw):
    raw = make_raw(v6=True)
    cid = active(raw)
    info = raw.stack.conn_info(cid)
    assert str(info.local[0]) == "fd15::1" and str(info.remote[0]) == "fd15::2"
    raw.stack.send(cid, b"v6" * 1000, 0.0)
    segs = raw.out()
    assert [len(s.payload) for s in segs] == [1360, 640]  # MSS = 1420 - 60


def test_recv_returns_at_most_max_and_readable_rearms(make_raw):
    raw = make_raw()
    cid = passive(raw)
    raw.send(ACK, P + 1, ISS + 1, payload=b"0123456789")
    assert raw.drain() == [Readable(cid)]
    raw.send(ACK, P + 11, ISS + 1, payload=b"abc")
    assert raw.drain() == [Readable(cid)]  # no second Readable before recv()
    assert raw.stack.recv(cid, 4) == b"0123"
    raw.send(ACK, P + 14, ISS + 1, payload=b"!")
    assert raw.drain() == [Readable(cid), Readable(cid)]
    assert raw.stack.recv(cid) == b"456789abc!"


def test_simultaneous_open(make_raw):
    raw = make_raw()
    cid = raw.stack.connect(raw.peer, 80, 0.0)
    raw.out()
    raw.sport, raw.dport = 80, EPHEMERAL
    (sa,) = raw.send(SYN, P, options=SYN_OPTS)  # the peer's own SYN crosses ours
    assert (sa.flags, sa.seq, sa.ack) == (SYN | ACK, ISS, P + 1)
    assert state(raw, cid) is TcpState.SYN_RECEIVED
    assert raw.send(SYN | ACK, P, ISS + 1, options=SYN_OPTS) == []
    assert raw.drain() == [Connected(cid)]
    assert state(raw, cid) is TcpState.ESTABLISHED


def test_ack_far_below_snd_una_is_dropped_with_ack(make_raw):
    raw = make_raw()
    cid = passive(raw)
    (ack,) = raw.send(ACK, P + 1, ISS + 1 - (1 << 30), payload=b"injected")
    assert (ack.flags, ack.ack) == (ACK, P + 1)  # RFC 5961 5.2
    assert raw.stack.recv(cid) == b""


def test_closed_waits_until_buffered_data_is_read(make_raw):
    raw = make_raw()
    cid = passive(raw)
    raw.send(ACK, P + 1, ISS + 1, payload=b"last words")
    raw.send(FIN | ACK, P + 11, ISS + 1)
    raw.stack.shutdown_write(cid, 0.0)
    raw.out()
    raw.send(ACK, P + 12, ISS + 2)  # our FIN acked: LAST-ACK is done
    assert raw.stack.connection_count() == 0
    assert Closed(cid) not in raw.drain()  # 10 bytes are still unread
    assert raw.stack.recv(cid, 4) == b"last"
    assert Closed(cid) not in raw.drain()
    assert raw.stack.recv(cid) == b" words"
    assert raw.drain()[-1] == Closed(cid)


def test_close_flushes_a_pending_closed(make_raw):
    raw = make_raw()
    cid = passive(raw)
    raw.send(FIN | ACK, P + 1, ISS + 1, payload=b"unread")
    raw.stack.shutdown_write(cid, 0.0)
    raw.out()
    raw.send(ACK, P + 8, ISS + 2)
    assert Closed(cid) not in raw.drain()
    raw.stack.close(cid, 0.0)
    assert raw.out() == []  # the connection is over: nothing to send
    assert raw.drain()[-1] == Closed(cid)
