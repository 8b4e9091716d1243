"""Hypothesis over (state, segment sequences): never raises, memory stays bounded."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wrapguard.netstack import TcpConfig, TcpState
from wrapguard.netstack.tcp_base import SND_COMPACT
from wrapguard.wire.ip import parse_ip
from wrapguard.wire.tcp import ACK, FIN, RST, SYN, TcpOptions, parse_tcp

P = 5000
ISS = 1000
CFG = TcpConfig(rcv_buf=16 * 1024, snd_buf=8 * 1024)

STATES = [
    "SYN_SENT",
    "SYN_RECEIVED",
    "ESTABLISHED",
    "FIN_WAIT_1",
    "FIN_WAIT_2",
    "CLOSE_WAIT",
    "CLOSING",
    "LAST_ACK",
    "TIME_WAIT",
    "ESTABLISHED_BUSY",
]
OPTS = TcpOptions(mss=1460, wscale=7, sack_permitted=True)


def setup(raw, name):
    """Drive a fresh connection into the named state; returns its id (or None)."""
    st_ = raw.stack
    if name == "SYN_SENT":
        cid = st_.connect(raw.peer, 80, 0.0)
        raw.sport, raw.dport = 80, 32768 + 1000
        raw.out()
        return cid
    st_.listen(80)
    raw.send(SYN, P, options=OPTS)
    if name == "SYN_RECEIVED":
        return None
    raw.send(ACK, P + 1, ISS + 1)
    cid = raw.drain()[-1].conn
    if name == "ESTABLISHED_BUSY":
        st_.send(cid, b"d" * 6000, 0.0)
        raw.send(ACK, P + 1001, ISS + 1, payload=b"o" * 500)  # out of order data
    elif name in ("FIN_WAIT_1", "FIN_WAIT_2", "CLOSING", "TIME_WAIT"):
        st_.shutdown_write(cid, 0.0)
        if name == "FIN_WAIT_2":
            raw.send(ACK, P + 1, ISS + 2)
        elif name == "CLOSING":
            raw.send(FIN | ACK, P + 1, ISS + 1)
        elif name == "TIME_WAIT":
            raw.send(FIN | ACK, P + 1, ISS + 2)
    elif name in ("CLOSE_WAIT", "LAST_ACK"):
        raw.send(FIN | ACK, P + 1, ISS + 1)
        if name == "LAST_ACK":
            st_.close(cid, 0.0)
    raw.out()
    return cid


u32 = st.integers(0, 0xFFFFFFFF)
near = st.integers(-70000, 70000)
segment = st.fixed_dictionaries(
    {
        "flags": st.sampled_from([ACK, ACK, ACK | FIN, SYN, SYN | ACK, RST, RST | ACK, 0, FIN])
        | st.integers(0, 255),
        "seq": st.one_of(near.map(lambda d: P + 1 + d), u32),
        "ack": st.one_of(near.map(lambda d: ISS + 1 + d), u32),
        "payload": st.sampled_from([0, 0, 1, 100, 1380, 3000]),
        "window": st.sampled_from([0, 1, 100, 65535]),
        "sack": st.lists(st.tuples(near, st.integers(1, 5000)), max_size=4),
    }
)
action = st.one_of(
    segment.map(lambda s: ("seg", s)),
    st.floats(0.0, 3.0).map(lambda t: ("time", t)),
    st.sampled_from(["send", "recv", "shutdown", "close", "abort"]).map(lambda a: ("app", a)),
)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.sampled_from(STATES), st.lists(action, max_size=25))
def test_any_segment_in_any_state(make_raw, name, actions):
    raw = make_raw(config=CFG)
    cid = setup(raw, name)
    stack = raw.stack
    for kind, arg in actions:
        if kind == "seg":
            sack = tuple(
                ((ISS + 1 + d) & 0xFFFFFFFF, (ISS + 1 + d + n) & 0xFFFFFFFF) for d, n in arg["sack"]
            )
            opts = TcpOptions(sack_blocks=sack)
            raw.stack.receive_packet(
                raw.packet(
                    arg["flags"], arg["seq"], arg["ack"], b"p" * arg["payload"], arg["window"], opts
                ),
                raw.now,
            )
        elif kind == "time":
            raw.now += arg
            stack.handle_timeout(raw.now)
        elif cid is not None:
            try:
                if arg == "send":
                    stack.send(cid, b"s" * 5000, raw.now)
                elif arg == "recv":
                    stack.recv(cid, 3000)
                elif arg == "shutdown":
                    stack.shutdown_write(cid, raw.now)
                elif arg == "close":
                    stack.close(cid, raw.now)
                else:
                    stack.abort(cid, raw.now)
            except OSError:
                pass  # local misuse after the connection ended (EPIPE/EBADF) is allowed
        for pkt in stack.take_outgoing():
            parse_tcp(parse_ip(pkt).payload)  # everything we emit parses
        raw.drain()
        for conn in stack._conns.values():
            assert len(conn.rcv_buf) + sum(len(b) for _s, b in conn.ooo) <= CFG.rcv_buf
            assert len(conn.snd_buf) - conn.snd_dead <= CFG.snd_buf
            # Acked bytes linger at the front only while fewer than the live ones or 64 KiB.
            assert conn.snd_dead < max(SND_COMPACT, len(conn.snd_buf) - conn.snd_dead)
            assert len(conn.ooo) <= 64 and len(conn.sacked) <= 64
            assert conn.snd_una <= conn.snd_nxt <= conn.snd_max
            assert conn.state is not TcpState.CLOSED
        d = stack.next_deadline()
        assert d is None or d >= 0
    # Whatever happened, time alone eventually empties the flow table.
    for _ in range(200):
        d = stack.next_deadline()
        if d is None:
            break
        raw.now = max(raw.now, d)
        stack.handle_timeout(raw.now)
        stack.take_outgoing()
    # (A half-closed FIN-WAIT-2 the app still holds, or a peer with a closed window that
    # keeps answering probes, may stay: that is what TCP does.)
    for c in stack._conns.values():
        assert c.state in (TcpState.ESTABLISHED, TcpState.CLOSE_WAIT, TcpState.FIN_WAIT_2)
        assert not c.app_closed
