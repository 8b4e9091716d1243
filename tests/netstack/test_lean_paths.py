"""The lean paths of the sender (pure ACKs, full-segment runs) against the general ones.

The same seeded transfer runs twice, lean paths on and off: every packet both stacks sent
must be identical, byte for byte and in order, and so must what each side read. The links
lose, duplicate and reorder, so recovery, SACK and window updates are mixed in.
"""

from __future__ import annotations

import random

import pytest
from netstack.lossy_link import LinkModel, Pair, TransferResult, run_transfer

from wrapguard.netstack import Stack, TcpConfig
from wrapguard.netstack.tcp_send import TcpSender

CASES = [
    (1, LinkModel(delay=0.002), 1 << 20, 3000),
    (2, LinkModel(delay=0.005, loss=0.02, duplicate=0.01, reorder=0.05), 600_000, 0),
    (3, LinkModel(delay=0.001, loss=0.05, duplicate=0.05, reorder=0.2), 300_000, 200_000),
    (4, LinkModel(delay=0.003, loss=0.01), 2 << 20, 5),
]


def transcript(
    seed: int, model: LinkModel, up: int, down: int, lean: bool, v6: bool = False
) -> tuple[list[tuple[str, bytes]], TransferResult, int]:
    rng = random.Random(seed)
    cfg = TcpConfig(snd_buf=256 * 1024, rcv_buf=512 * 1024)
    a = Stack(["10.150.0.1", "fd15::1"], rng=rng.getrandbits, config=cfg)
    b = Stack(["10.150.0.2", "fd15::2"], rng=rng.getrandbits, config=cfg)
    pair = Pair(a, b, rng, model, model)
    pair.taps = []
    data = random.Random(seed + 100)
    taken = 0
    real = TcpSender.rx_pure_ack

    def counted(self: TcpSender, seq: int, ack: int, window: int, now: float) -> bool:
        nonlocal taken
        ok = real(self, seq, ack, window, now)
        taken += ok
        return ok

    TcpSender.LEAN_PATHS = lean
    TcpSender.rx_pure_ack = counted  # type: ignore[method-assign]
    try:
        res = run_transfer(
            pair, data.randbytes(up), data.randbytes(down), dst="fd15::2" if v6 else "10.150.0.2"
        )
    finally:
        TcpSender.LEAN_PATHS = True
        TcpSender.rx_pure_ack = real  # type: ignore[method-assign]
    return pair.taps, res, taken


@pytest.mark.parametrize(("seed", "model", "up", "down"), CASES)
def test_lean_paths_send_exactly_what_the_general_paths_send(
    seed: int, model: LinkModel, up: int, down: int
) -> None:
    lean_taps, lean_res, lean_taken = transcript(seed, model, up, down, lean=True)
    gen_taps, gen_res, gen_taken = transcript(seed, model, up, down, lean=False)
    assert lean_taken > 0 and gen_taken == 0  # each run took the path it was meant to
    assert gen_res.errors == () and (gen_res.a_count, gen_res.b_count) == (down, up)
    assert lean_res == gen_res
    assert len(lean_taps) == len(gen_taps)
    for i, (x, y) in enumerate(zip(lean_taps, gen_taps, strict=True)):
        assert x == y, f"packet {i} differs"


def test_lean_paths_match_over_ipv6() -> None:
    model = LinkModel(delay=0.002, loss=0.02, reorder=0.05)
    lean = transcript(7, model, 500_000, 1000, lean=True, v6=True)
    gen = transcript(7, model, 500_000, 1000, lean=False, v6=True)
    assert lean[2] > 0
    assert lean[:2] == gen[:2]


def clocked(seed: int, lean: bool) -> tuple[list[bytes], int, int]:
    """a sends 400 kB to b, which ACKs every 1-4 segments as they arrive (an ACK-clocked
    sender, like an upload to a kernel TCP); a few segments are lost. Returns what a sent,
    the bytes b read, and how often the lean ACK path ran."""
    rng = random.Random(seed)
    a = Stack(["10.150.0.1"], rng=rng.getrandbits)
    b = Stack(["10.150.0.2"], rng=rng.getrandbits)
    pair = Pair(a, b, rng, LinkModel(delay=0.001), LinkModel(delay=0.001))
    b.listen(80)
    ca = a.connect("10.150.0.2", 80, pair.now)
    cb = None
    while cb is None and pair.step():
        cb = next((ev.conn for side, ev in pair.events() if side == "b"), None)
    assert cb is not None
    TcpSender.LEAN_PATHS = lean
    sent: list[bytes] = []
    got = 0
    now = pair.now
    data = rng.randbytes(400_000)
    off = 0
    queue: list[bytes] = []
    try:
        for _ in range(20000):
            if off < len(data):
                off += a.send(ca, data[off : off + 65536], now)
            while a.next_event() is not None:
                pass
            out = a.take_outgoing()
            sent += out
            queue += [p for p in out if rng.random() > 0.01]
            if not queue:
                now += 0.05
                a.handle_timeout(now)
                b.handle_timeout(now)
            k = rng.randint(1, 4)
            for p in queue[:k]:
                b.receive_packet(p, now)
            del queue[:k]
            while (ev := b.next_event()) is not None:
                if ev.__class__.__name__ == "Readable":
                    got += len(b.recv(cb, 1 << 22))
            now += 0.0001
            for p in b.take_outgoing():
                a.receive_packet(p, now)
            if got == len(data):
                break
    finally:
        TcpSender.LEAN_PATHS = True
    return sent, got, a._conn(ca).n_retransmits


@pytest.mark.parametrize("seed", [11, 12, 13])
def test_lean_paths_match_on_an_ack_clocked_upload(seed: int) -> None:
    lean_sent, lean_got, lean_rx = clocked(seed, lean=True)
    gen_sent, gen_got, gen_rx = clocked(seed, lean=False)
    assert gen_got == 400_000 and gen_rx > 0  # complete, with some recovery in it
    assert (lean_got, lean_rx) == (gen_got, gen_rx)
    assert lean_sent == gen_sent
