"""Two Stacks in memory through a clean or lossy link (seeded RNG, fake clock)."""

from __future__ import annotations

import errno
import hashlib
import random

import pytest
from netstack.lossy_link import LinkModel, Pair, run_transfer

from wrapguard.netstack import (
    Accepted,
    Closed,
    Connected,
    ConnectFailed,
    PeerClosed,
    Readable,
    Reset,
    Stack,
    TcpConfig,
    TcpState,
    Writable,
)

MiB = 1 << 20
LOSSY = LinkModel(delay=0.005, loss=0.02, duplicate=0.01, reorder=0.05)


def make_pair(seed: int, model: LinkModel | None = None, config: TcpConfig | None = None) -> Pair:
    rng = random.Random(seed)
    a = Stack(["10.150.0.1", "fd15::1"], rng=rng.getrandbits, config=config)
    b = Stack(["10.150.0.2", "fd15::2"], rng=rng.getrandbits, config=config)
    return Pair(a, b, rng, model, model)


def payload(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def check_transfer(pair: Pair, size: int, dst: str = "10.150.0.2") -> None:
    a_data, b_data = payload(size, 1), payload(size, 2)
    res = run_transfer(pair, a_data, b_data, dst=dst)
    assert res.errors == ()
    assert (res.a_count, res.b_count) == (size, size)
    assert res.b_received == hashlib.sha256(a_data).digest()
    assert res.a_received == hashlib.sha256(b_data).digest()


def test_clean_link_16mib_both_ways():
    pair = make_pair(1)
    check_transfer(pair, 16 * MiB)
    assert pair.sent < 16 * MiB // 1380 * 2 * 1.6  # data plus one ACK per ~2 segments


def test_lossy_link_16mib_both_ways():
    pair = make_pair(2, LOSSY)
    check_transfer(pair, 16 * MiB)
    conns = list(pair.a._conns.values()) + list(pair.b._conns.values())
    # The loss was real and recovered mostly by fast retransmit, not timeouts.
    assert sum(c.n_retransmits for c in conns) > 100
    assert sum(c.n_recoveries for c in conns) > sum(c.n_timeouts for c in conns)


def test_lossy_link_ipv6_other_seed():
    pair = make_pair(3, LinkModel(loss=0.05, duplicate=0.05, reorder=0.2))
    check_transfer(pair, 2 * MiB, dst="fd15::2")


def test_very_lossy_link_small_transfer():
    pair = make_pair(4, LinkModel(loss=0.2, duplicate=0.1, reorder=0.3))
    check_transfer(pair, 256 * 1024)


def drive(pair: Pair, handler, until: float) -> None:
    """Run the pair, handing every event to handler(side, stack, event), up to `until`."""
    while pair.now < until:
        for side, ev in pair.events():
            handler(side, pair.a if side == "a" else pair.b, ev)
        if not pair.step(limit=until):
            for side, ev in pair.events():
                handler(side, pair.a if side == "a" else pair.b, ev)
            return


def test_half_close_end_to_end():
    pair = make_pair(5, LOSSY)
    pair.b.listen(80)
    ca = pair.a.connect("10.150.0.2", 80, 0.0)
    log: list[tuple[str, str]] = []
    got = {"a": b"", "b": b""}
    cb = []

    def on(side, st, ev):
        if isinstance(ev, Connected):
            st.send(ev.conn, b"request", pair.now)
            st.shutdown_write(ev.conn, pair.now)  # a is done writing but keeps reading
        elif isinstance(ev, Accepted):
            cb.append(ev.conn)
        elif isinstance(ev, Readable):
            got[side] += st.recv(ev.conn)
        elif isinstance(ev, PeerClosed):
            log.append((side, "eof"))
            if side == "b":
                # b saw a's FIN and still answers with a large response.
                assert st.send(ev.conn, b"R" * 300_000, pair.now) == 300_000
                st.close(ev.conn, pair.now)
            else:
                st.close(ev.conn, pair.now)
        elif isinstance(ev, Closed):
            log.append((side, "closed"))
        elif isinstance(ev, Reset | ConnectFailed):
            raise AssertionError(ev)

    drive(pair, on, 30.0)
    assert got == {"a": b"R" * 300_000, "b": b"request"}
    assert ("b", "eof") in log and ("a", "eof") in log
    assert sorted(log).count(("a", "closed")) == 1 and sorted(log).count(("b", "closed")) == 1
    assert log.index(("b", "eof")) < log.index(("a", "eof"))
    del ca


def test_simultaneous_close():
    pair = make_pair(6)
    pair.b.listen(80)
    ca = pair.a.connect("10.150.0.2", 80, 0.0)
    conns = {}

    def on(side, st, ev):
        if isinstance(ev, Accepted | Connected):
            conns[side] = ev.conn

    drive(pair, on, 0.1)
    assert set(conns) == {"a", "b"}
    # Both FINs leave before either arrives.
    pair.a.close(ca, pair.now)
    pair.b.close(conns["b"], pair.now)
    assert pair.a.conn_info(ca).state is TcpState.FIN_WAIT_1
    seen = []
    drive(pair, lambda side, st, ev: seen.append((side, type(ev).__name__)), pair.now + 0.5)
    assert sorted(seen) == [("a", "Closed"), ("b", "Closed")]  # no PeerClosed after close()
    # Both sides went FIN-WAIT-1 -> CLOSING -> TIME-WAIT: only then do both keep a tombstone.
    assert pair.a.connection_count() == 1 and pair.b.connection_count() == 1
    drive(pair, lambda *a: None, pair.now + 2.5)
    assert pair.a.connection_count() == 0 and pair.b.connection_count() == 0


def test_connect_refused():
    pair = make_pair(7)
    cid = pair.a.connect("10.150.0.2", 81, 0.0)
    seen = []
    drive(pair, lambda side, st, ev: seen.append((side, ev)), 1.0)
    assert [e for s, e in seen if s == "a"] == [ConnectFailed(cid, errno.ECONNREFUSED), Closed(cid)]


def test_connect_timeout_on_dead_link():
    pair = make_pair(8, LinkModel(loss=1.0), TcpConfig(connect_timeout=20.0))
    pair.b.listen(80)
    cid = pair.a.connect("10.150.0.2", 80, 0.0)
    seen = []
    drive(pair, lambda side, st, ev: seen.append((pair.now, ev)), 60.0)
    assert [e for t, e in seen] == [ConnectFailed(cid, errno.ETIMEDOUT), Closed(cid)]
    assert seen[0][0] == 20.0
    assert pair.sent == 5  # SYN at 0, 1, 3, 7, 15 s


def test_reset_mid_connection_reports_econnreset():
    pair = make_pair(9)
    pair.b.listen(80)
    ca = pair.a.connect("10.150.0.2", 80, 0.0)
    seen = []
    drive(pair, lambda side, st, ev: seen.append((side, ev)), 0.1)
    pair.a.abort(ca, pair.now)
    drive(pair, lambda side, st, ev: seen.append((side, ev)), 0.2)
    b_events = [e for s, e in seen if s == "b"]
    assert isinstance(b_events[-2], Reset) and b_events[-2].errno == errno.ECONNRESET
    assert isinstance(b_events[-1], Closed)


def test_dead_peer_times_out_with_etimedout():
    cfg = TcpConfig(max_retries=4)
    pair = make_pair(10, None, cfg)
    pair.b.listen(80)
    ca = pair.a.connect("10.150.0.2", 80, 0.0)
    drive(pair, lambda *a: None, 0.1)
    pair.models[id(pair.a)] = LinkModel(loss=1.0)
    pair.a.send(ca, b"into the void", pair.now)
    seen = []
    drive(pair, lambda side, st, ev: seen.append((side, ev)), 60.0)
    assert ("a", Reset(ca, errno.ETIMEDOUT)) in seen


def test_flow_control_bounded_memory():
    cfg = TcpConfig(rcv_buf=256 * 1024, snd_buf=128 * 1024)
    pair = make_pair(11, None, cfg)
    pair.b.listen(80)
    ca = pair.a.connect("10.150.0.2", 80, 0.0)
    conns = {}
    writable = []

    def on(side, st, ev):
        if isinstance(ev, Accepted | Connected):
            conns[side] = ev.conn
        elif isinstance(ev, Writable):
            writable.append(ev)

    drive(pair, on, 0.1)
    data = payload(4 * MiB, 3)
    sent = 0
    last_progress = pair.now
    # b never reads: a's send() must hit 0 and stay there; buffers stay bounded.
    while pair.now - last_progress < 5.0:
        n = pair.a.send(ca, data[sent : sent + 65536], pair.now)
        if n:
            sent += n
            last_progress = pair.now
        if not pair.step(limit=pair.now + 0.05):
            pair.now += 0.05
        r_b, _w_b = pair.b.buffered(conns["b"])
        _r_a, w_a = pair.a.buffered(ca)
        assert r_b <= cfg.rcv_buf and w_a <= cfg.snd_buf
        assert pair.now < 30
    r_b, w_a = pair.b.buffered(conns["b"])[0], pair.a.buffered(ca)[1]
    assert cfg.rcv_buf - 128 < r_b <= cfg.rcv_buf  # the window closed at the limit (1 << 7)
    assert w_a == cfg.snd_buf  # and the sender's buffer filled behind it
    assert sent == r_b + w_a
    assert pair.a.send(ca, b"more", pair.now) == 0
    # Zero-window probes keep the connection alive while the receiver sleeps.
    assert pair.a.conn_info(ca).state is TcpState.ESTABLISHED
    # b starts reading: the window reopens, a gets Writable, everything arrives intact.
    got = bytearray()
    while pair.now < 60 and len(got) < len(data):
        got += pair.b.recv(conns["b"], 1 << 20)
        for side, ev in pair.events():
            on(side, pair.a if side == "a" else pair.b, ev)
        while sent < len(data):
            n = pair.a.send(ca, data[sent : sent + 65536], pair.now)
            if n == 0:
                break
            sent += n
        if not pair.step():
            break
    assert writable
    assert bytes(got) == data


@pytest.mark.parametrize("seed", range(12))
def test_random_links_and_buffers(seed):
    """Random delay/loss/duplication/reordering and buffer sizes; one side may send nothing."""
    r = random.Random(1000 + seed)
    model = LinkModel(
        delay=r.choice([0.0005, 0.005, 0.05]),
        loss=r.choice([0.0, 0.01, 0.1, 0.3]),
        duplicate=r.choice([0.0, 0.05]),
        reorder=r.choice([0.0, 0.1, 0.5]),
        reorder_delay=r.choice([0.001, 0.02]),
    )
    cfg = TcpConfig(rcv_buf=r.choice([8192, 65536, 1 << 20]), snd_buf=r.choice([4096, 1 << 20]))
    a = Stack(["10.150.0.1"], rng=r.getrandbits, config=cfg)
    b = Stack(["10.150.0.2"], rng=r.getrandbits, config=cfg)
    pair = Pair(a, b, r, model, model)
    size = r.choice([1, 1000, 100_000])
    a_data, b_data = r.randbytes(size), r.randbytes(r.choice([0, size]))
    res = run_transfer(pair, a_data, b_data, limit=3000)
    assert res.errors == ()
    assert res.b_received == hashlib.sha256(a_data).digest()
    assert res.a_received == hashlib.sha256(b_data).digest()
    assert res.max_buffered <= cfg.rcv_buf + cfg.snd_buf
