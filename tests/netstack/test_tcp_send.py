"""The TCP sender's congestion control and loss recovery against a scripted peer."""

from __future__ import annotations

from netstack.conftest import ISS

from wrapguard.netstack.events import Accepted
from wrapguard.wire.tcp import ACK, SYN, TcpOptions

P = 5000  # the raw peer's ISN
MSS = 1380  # what the stack sends with MTU 1420


def passive(raw, window=0xFFFF):
    """A connection accepted on port 80 with window scaling and SACK; its id."""
    raw.stack.listen(80)
    raw.send(SYN, P, options=TcpOptions(mss=1460, wscale=7, sack_permitted=True))
    raw.send(ACK, P + 1, ISS + 1, window=window)
    (acc,) = [e for e in raw.drain() if isinstance(e, Accepted)]
    raw.events.clear()
    return acc.conn


def seg(k: int) -> int:
    """The sequence number of our k-th data segment (1-based)."""
    return ISS + 1 + (k - 1) * MSS


def conn_of(raw):
    (conn,) = raw.stack._conns.values()
    return conn


def test_slow_start_does_not_grow_cwnd_beyond_twice_the_flight(make_raw):
    # A peer whose window holds 4 segments (window field 44 << wscale 7 = 5632 bytes):
    # acking flight after flight must not inflate cwnd, or the whole inflated cwnd
    # goes out in one burst the moment the window opens.
    raw = make_raw()
    cid = passive(raw, window=44)
    raw.stack.send(cid, b"x" * 200 * MSS, 0.0)
    sent = raw.out()
    assert len(sent) == 4
    nxt = sent[-1].seq + len(sent[-1].payload)
    for _ in range(20):
        raw.now += 0.001
        sent = raw.send(ACK, P + 1, nxt, window=44)
        assert sent
        nxt = sent[-1].seq + len(sent[-1].payload)
    assert conn_of(raw).cwnd == 10 * MSS  # the initial window, never grown
    raw.now += 0.001
    burst = raw.send(ACK, P + 1, nxt, window=0xFFFF)  # the window opens wide
    assert len(burst) == 10


def test_lost_retransmission_is_resent_when_later_data_is_sacked(make_raw):
    raw = make_raw()
    cid = passive(raw)
    raw.stack.send(cid, b"x" * 40 * MSS, 0.0)
    assert len(raw.out()) == 10  # the initial window
    # Segment 1 is lost: SACKs for 2..10 start fast recovery; 1 is resent, then new data.
    out = raw.send(ACK, P + 1, ISS + 1, options=TcpOptions(sack_blocks=((seg(2), seg(11)),)))
    assert out[0].seq == seg(1)
    assert [s.seq for s in out[1:]] == [seg(k) for k in range(11, 11 + len(out) - 1)]
    assert len(out) >= 4
    last = len(out) + 9  # the highest segment sent so far
    # The retransmission is lost too: the peer SACKs everything sent after it, which it
    # could not have if segment 1 had arrived. Segment 1 goes out again at once, not
    # after an RTO.
    raw.now += 0.002
    out = raw.send(ACK, P + 1, ISS + 1, options=TcpOptions(sack_blocks=((seg(2), seg(last + 1)),)))
    assert seg(1) in [s.seq for s in out]
    conn = conn_of(raw)
    assert conn.n_lost_retransmits == 1 and conn.n_timeouts == 0


def test_lost_retransmission_found_behind_one_that_arrived(make_raw):
    # Segments 1 and 3 are lost and both resent; the resent 1 arrives (a partial ACK up
    # to 3), the resent 3 does not while the new data sent after it is SACKed: 3 goes out
    # again at once. (The scan must not stop at the retransmission of 1, acked by now.)
    raw = make_raw()
    cid = passive(raw)
    raw.stack.send(cid, b"x" * 40 * MSS, 0.0)
    assert len(raw.out()) == 10
    blocks = ((seg(2), seg(3)), (seg(4), seg(11)))
    out = raw.send(ACK, P + 1, ISS + 1, options=TcpOptions(sack_blocks=blocks))
    assert [s.seq for s in out[:2]] == [seg(1), seg(3)]
    last = len(out) + 8  # the highest segment sent so far
    assert last >= 13
    raw.now += 0.002
    out = raw.send(ACK, P + 1, seg(3), options=TcpOptions(sack_blocks=((seg(4), seg(last + 1)),)))
    assert seg(3) in [s.seq for s in out]
    assert conn_of(raw).n_lost_retransmits == 1


def test_only_the_retransmission_deemed_lost_is_sent_again(make_raw):
    # Segment 1 is lost, and its retransmissions are lost too; segment 12 is lost once and
    # its retransmission is still in flight. When the SACKs say the retransmission of 1 is
    # lost, 1 goes out again, but 12 does not (nothing sent after its retransmission has
    # been SACKed yet), and the pipe still counts 12's retransmission: one new segment for
    # the one newly SACKed.
    raw = make_raw()
    cid = passive(raw)
    raw.stack.send(cid, b"x" * 200 * MSS, 0.0)
    assert len(raw.out()) == 10

    def ack(*blocks: tuple[int, int]) -> list[int]:
        raw.now += 0.001
        out = raw.send(ACK, P + 1, ISS + 1, options=TcpOptions(sack_blocks=blocks))
        return [(s.seq - ISS - 1) // MSS + 1 for s in out]

    assert ack((seg(2), seg(11)))[0] == 1  # fast recovery: 1 resent, then new data to 14
    assert ack((seg(2), seg(12)), (seg(13), seg(15)))[0] == 1  # 11, 13, 14 SACKed: lost again
    assert ack((seg(2), seg(12)), (seg(13), seg(16)))[0] == 12  # 12 deemed lost: resent
    ack((seg(2), seg(12)), (seg(13), seg(17)))
    assert ack((seg(2), seg(12)), (seg(13), seg(18))) == [1, 20]
    conn = conn_of(raw)
    assert conn.n_timeouts == 0 and conn.n_lost_retransmits == 2
