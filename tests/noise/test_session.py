"""Transport keypairs: seal/open, padding, counters and the sliding replay window [W 5.4.6]."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wrapguard.noise.handshake import SessionKeys
from wrapguard.noise.session import REPLAY_WINDOW, Keypair
from wrapguard.wire.wgmsg import Transport, parse

K1, K2 = bytes([1]) * 32, bytes([2]) * 32


def pair(limit: int | None = None) -> tuple[Keypair, Keypair]:
    kw = {} if limit is None else {"reject_after_messages": limit}
    a = Keypair(SessionKeys(K1, K2, 10, 20, True), 0.0, **kw)
    b = Keypair(SessionKeys(K2, K1, 20, 10, False), 0.0, **kw)
    return a, b


def deliver(rx: Keypair, wire: bytes) -> bytes | None:
    counter = int.from_bytes(wire[8:16], "little")
    if not rx.check_counter(counter):
        return None
    return rx.open(wire, counter)


@pytest.mark.parametrize(("n", "padded"), [(0, 0), (1, 16), (16, 16), (17, 32), (1419, 1420)])
def test_seal_pads_to_16_within_mtu(n: int, padded: int) -> None:
    a, b = pair()
    wire = a.seal(b"x" * n, 1420)
    assert wire is not None
    msg = parse(wire)
    assert isinstance(msg, Transport) and msg.receiver == 20 and msg.counter == 0
    assert len(wire) == 16 + padded + 16
    plain = deliver(b, wire)
    assert plain == b"x" * n + bytes(padded - n)


def test_counters_increase_and_replays_are_refused() -> None:
    a, b = pair()
    wires = [a.seal(b"p%d" % i, 1420) for i in range(5)]
    assert [int.from_bytes(w[8:16], "little") for w in wires if w] == [0, 1, 2, 3, 4]
    assert all(deliver(b, w) is not None for w in wires if w)
    assert all(deliver(b, w) is None for w in wires if w)


def test_out_of_order_within_window_is_accepted_once() -> None:
    a, b = pair()
    wires = [a.seal(b"", 1420) for _ in range(REPLAY_WINDOW + 10)]
    assert deliver(b, wires[-1]) is not None  # counter REPLAY_WINDOW + 9
    assert deliver(b, wires[10]) is not None  # exactly at the window's back edge
    assert deliver(b, wires[10]) is None
    assert deliver(b, wires[9]) is None  # behind the window
    assert deliver(b, wires[500]) is not None


def test_forged_packet_does_not_move_the_window() -> None:
    a, b = pair()
    wire = a.seal(b"data", 1420)
    assert wire is not None
    forged = wire[:8] + (10**6).to_bytes(8, "little") + wire[16:]  # counter outside the AEAD
    assert deliver(b, forged) is None
    assert deliver(b, wire) is not None  # counter 0 still acceptable


def test_send_counter_limit() -> None:
    a, b = pair(limit=3)
    wires = [a.seal(b"", 1420) for _ in range(3)]
    assert all(w is not None for w in wires)
    assert a.seal(b"", 1420) is None  # Reject-After-Messages reached
    assert not b.check_counter(3)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 5000), max_size=60))
def test_window_matches_a_reference_set(counters: list[int]) -> None:
    """Property: accept iff not seen and not more than REPLAY_WINDOW-1 behind the top."""
    _, b = pair()
    seen: set[int] = set()
    top = -1
    for c in counters:
        expect = c not in seen and (c > top or top - c < REPLAY_WINDOW)
        assert b.check_counter(c) == expect
        if expect:
            b._top, b._bitmap = _mark(b, c)
            seen.add(c)
            top = max(top, c)


def _mark(kp: Keypair, counter: int) -> tuple[int, int]:
    # Drive the private window update without AEAD by opening a sealed message with that counter.
    a, _ = pair()
    a.send_counter = counter
    wire = a.seal(b"", 1420)
    assert wire is not None
    assert kp.open(wire, counter) is not None
    return kp._top, kp._bitmap


def test_window_random_reordering() -> None:
    a, b = pair()
    wires = [a.seal(b"", 1420) for _ in range(300)]
    order = list(range(300))
    random.Random(7).shuffle(order)
    got = [deliver(b, wires[i]) is not None for i in order]
    assert all(got)  # 300 < REPLAY_WINDOW: every distinct counter is accepted once


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 1440), min_size=1, max_size=64),
    mtu=st.sampled_from([1280, 1419, 1420]),
    start=st.sampled_from([0, 1, 255, 1 << 32, (1 << 56) + 3]),
)
def test_seal_batch_c_matches_python(sizes: list[int], mtu: int, start: int) -> None:
    """libcrypto from C (one call for the batch) seals the same bytes as the Python path,
    including padding at the MTU, counters above 32 bits, and zero-length keepalives."""
    from wrapguard.noise.session import HAVE_SEAL_BATCH

    assert HAVE_SEAL_BATCH, "the cffi helper lacks wg_seal_batch: rebuild it"
    rnd = random.Random(len(sizes) * 7 + mtu)
    packets = [rnd.randbytes(n) for n in sizes]
    (a, _b), (c, d) = pair(), pair()
    a.send_counter = c.send_counter = start
    assert a.seal_batch(packets, mtu) == c.seal_batch(packets, mtu, fast=False)
    assert a.send_counter == c.send_counter == start + len(packets)
    blob, lens = a.seal_batch(packets, mtu)
    o = 0
    for p, ln in zip(packets, lens, strict=True):
        assert deliver(d, blob[o : o + ln]) == p + bytes(ln - 32 - len(p))
        o += ln


def test_seal_batch_refuses_past_the_counter_limit() -> None:
    a, _ = pair(limit=5)
    a.seal_batch([b"x"] * 3, 1420)
    with pytest.raises(ValueError):
        a.seal_batch([b"x"] * 3, 1420)  # the caller must check: 3 + 3 > 5
    assert a.send_counter == 3
    a.seal_batch([b"x"] * 2, 1420)
    assert a.send_counter == 5
