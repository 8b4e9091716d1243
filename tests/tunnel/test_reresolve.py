"""Re-resolving Endpoint host names: the Reresolver rule on a fake clock, and the Device signals.

The rule table pins every (trigger, name moved?, endpoint roamed?, endpoint in the answer?,
handshake recent?) case; the Device tests check when `ResolveEndpoint` is emitted and that
`move_endpoint` sends the pending handshake to the new address at once.
"""

from __future__ import annotations

import itertools
import random

import pytest

from wrapguard.keys import PrivateKey
from wrapguard.tunnel.device import Device
from wrapguard.tunnel.events import ResolveEndpoint, SendDatagram
from wrapguard.tunnel.peer import PeerSpec
from wrapguard.tunnel.reresolve import (
    STALE_AFTER,
    KeepEndpoint,
    Lookup,
    LookupFailing,
    LookupWorks,
    Reresolver,
    Trigger,
    UseEndpoint,
)
from wrapguard.tunnel.timers import TimerConfig
from wrapguard.wire.wgmsg import MSG_INITIATION

HOST = ("peer.wg.test", 51820)
A, B, C, X = ((f"192.0.2.{i}", 51820) for i in (1, 2, 3, 9))  # X: where the peer roamed to
P, U, S = Trigger.PERIODIC, Trigger.UNANSWERED, Trigger.START


def rr(**kw) -> Reresolver:  # type: ignore[no-untyped-def]
    return Reresolver({0: HOST}, rng=random.Random(1).randbytes, **kw)


def kinds(outs) -> list[type]:  # type: ignore[no-untyped-def]
    return [type(o) for o in outs]


def test_start_asks_for_host_name_peers_only_and_first_answer_is_used() -> None:
    r = Reresolver({1: HOST}, rng=random.Random(1).randbytes)
    assert r.start(0.0) == [Lookup(1, *HOST, S)]
    assert r.request(0, U, 0.0) is None  # peer 0 has an IP literal: nothing to look up
    assert r.answered(1, [A, B], None, 0.5) == [UseEndpoint(1, HOST[0], None, A, S)]


def test_one_lookup_per_peer_and_unanswered_upgrades_the_one_in_flight() -> None:
    r = rr()
    r.start(0.0)
    r.answered(0, [A], None, 0.0)
    deadline = r.next_deadline()
    assert deadline is not None
    assert r.handle_timeout(deadline) == [Lookup(0, *HOST, P)]
    assert r.next_deadline() is None  # nothing armed while a lookup is out: no busy timer
    assert r.request(0, U, deadline + 1) is None
    assert r.request(0, P, deadline + 1) is None
    # The answer is judged as an unanswered-handshake lookup: E=X roamed, R == L, still moves.
    assert r.answered(0, [A], X, deadline + 2) == [UseEndpoint(0, HOST[0], X, A, U)]
    assert r.request(0, U, deadline + 3) == Lookup(0, *HOST, U)


def test_periodic_lookups_follow_interval_plus_jitter_from_each_answer() -> None:
    r = rr(interval=120.0, jitter=12.0)
    r.start(0.0)
    assert r.next_deadline() is None
    r.answered(0, [A], None, 1.0)
    dues = []
    t = 1.0
    for _ in range(20):
        due = r.next_deadline()
        assert due is not None
        assert r.handle_timeout(due - 0.001) == []
        dues.append(due - t)
        t = due
        assert r.handle_timeout(t) == [Lookup(0, *HOST, P)]
        if len(dues) % 2:  # a failed lookup re-arms the periodic one as an answer does
            r.failed(0, "timed out", t)
        else:
            r.answered(0, [A], A, t)
    assert all(120.0 <= d <= 132.0 for d in dues), dues
    assert len(set(dues)) > 1  # jittered


def test_failures_are_reported_once_per_change_of_state() -> None:
    r = rr()
    r.start(0.0)
    assert r.failed(0, "no such host", 0.0) == [LookupFailing(0, HOST[0], "no such host")]
    for t in range(1, 5):
        r.request(0, U, float(t))
        assert r.failed(0, "no such host", float(t)) == []
    r.request(0, U, 6.0)
    assert kinds(r.answered(0, [A], None, 6.0)) == [LookupWorks, UseEndpoint]
    r.request(0, U, 7.0)
    assert r.answered(0, [A], A, 7.0) == [KeepEndpoint(0, HOST[0], A, (A,), U)]
    r.request(0, U, 8.0)
    assert kinds(r.failed(0, "again", 8.0)) == [LookupFailing]


def test_an_answer_without_usable_addresses_is_a_failure() -> None:
    r = rr()
    r.start(0.0)
    assert kinds(r.answered(0, [("not-an-ip", 1)], None, 0.0)) == [LookupFailing]
    r.request(0, U, 1.0)
    assert kinds(r.answered(0, [], None, 1.0)) == []  # still failing: said already


def test_endpoint_in_a_reordered_answer_is_kept() -> None:
    """Round-robin names answer in another order each time: that is no move, on any trigger."""
    r = rr()
    r.start(0.0)
    r.answered(0, [A, B], None, 0.0)
    for trigger, t in ((P, 200.0), (U, 201.0)):
        assert r.request(0, trigger, t) is not None
        assert kinds(r.answered(0, [B, A], A, t)) == [KeepEndpoint]


def rule_cases() -> list[tuple[Trigger, bool, bool, bool, bool, bool]]:
    """(trigger, name moved, E roamed, E in answer, handshake recent, the endpoint moves)."""
    cases = []
    for trigger, moved, roamed, e_in_r, recent in itertools.product(
        (P, U), (False, True), (False, True), (False, True), (False, True)
    ):
        if (not moved and not roamed and not e_in_r) or (not moved and roamed and e_in_r):
            continue  # impossible: E = A is in an unmoved {A}; a roamed X is not in it
        if e_in_r:
            want = False  # E is one of the name's addresses: nothing to fix
        elif trigger is U:
            want = True  # the endpoint in use does not answer: try the name's address
        elif not moved:
            want = False  # the name did not move and E is not in it: E roamed; keep it
        else:
            want = not roamed or not recent  # follow the name unless a roamed E works
        cases.append((trigger, moved, roamed, e_in_r, recent, want))
    return cases


@pytest.mark.parametrize(("trigger", "moved", "roamed", "e_in_r", "recent", "want"), rule_cases())
def test_rule(
    trigger: Trigger, moved: bool, roamed: bool, e_in_r: bool, recent: bool, want: bool
) -> None:
    r = rr()
    r.start(0.0)
    r.answered(0, [A], None, 0.0)  # L = {A}, E = A
    now = 1000.0
    r.handshake_completed(0, now - (10.0 if recent else STALE_AFTER + 1))
    endpoint = X if roamed else A
    answer = [B] if moved else [A]
    if e_in_r and endpoint not in answer:
        answer.append(endpoint)
    assert r.request(0, trigger, now) is not None
    outs = r.answered(0, answer, endpoint, now)
    assert kinds(outs) == [UseEndpoint if want else KeepEndpoint], outs
    if want:
        assert outs[0] == UseEndpoint(0, HOST[0], endpoint, answer[0], trigger)


def test_start_answer_after_the_peer_reached_us_keeps_its_address() -> None:
    r = rr()
    r.start(0.0)
    r.handshake_completed(0, 0.1)  # the peer's initiation came in while we looked it up
    assert kinds(r.answered(0, [A], X, 0.2)) == [KeepEndpoint]


def test_periodic_lookup_after_start_failure_and_roaming_keeps_roamed_endpoint() -> None:
    """The peer reached us before the name ever resolved: its address is a working roam."""
    r = rr()
    r.start(0.0)
    r.failed(0, "no such host", 0.0)
    r.handshake_completed(0, 50.0)
    r.request(0, P, 100.0)
    assert kinds(r.answered(0, [A], X, 100.0)) == [LookupWorks, KeepEndpoint]


# -- the Device side: when it asks, and move_endpoint ------------------------------------------

KEY_A, KEY_B = PrivateKey(bytes([7]) * 32), PrivateKey(bytes([8]) * 32)
PKT = bytes([0x45]) + bytes(19)


def host_device(**timers: float) -> Device:
    spec = PeerSpec(KEY_B.public_key(), endpoint=HOST, allowed_ips=("10.0.0.0/24",))
    return Device(KEY_A, [spec], rng=random.Random(5).randbytes, timers=TimerConfig(**timers))  # type: ignore[arg-type]


def initiations(outs, addr) -> int:  # type: ignore[no-untyped-def]
    return sum(
        isinstance(o, SendDatagram) and o.addr == addr and o.data[0] == MSG_INITIATION for o in outs
    )


def test_first_unanswered_attempt_asks_for_a_lookup() -> None:
    d = host_device(rekey_timeout_jitter=0.0)
    d.set_endpoint(0, A)
    outs = d.send_packet(PKT, 0.0, 1e9, peer=0)
    assert initiations(outs, A) == 1 and not any(isinstance(o, ResolveEndpoint) for o in outs)
    outs = d.handle_timeout(5.0, 1e9 + 5)  # Rekey-Timeout without an answer
    assert ResolveEndpoint(0, *HOST) in outs
    assert initiations(outs, A) == 1


def test_move_endpoint_sends_the_pending_handshake_there_at_once() -> None:
    d = host_device(rekey_timeout_jitter=0.0)
    d.set_endpoint(0, A)
    d.send_packet(PKT, 0.0, 1e9, peer=0)
    d.handle_timeout(5.0, 1e9 + 5)
    outs = d.move_endpoint(0, B, 5.1, 1e9 + 5.1)
    assert initiations(outs, B) == 1
    assert d.peers[0].endpoint == B
    assert d.next_deadline() == pytest.approx(10.1)  # the retry timer restarts from now
    # No handshake under way: the endpoint changes, nothing is sent.
    idle = host_device()
    assert idle.move_endpoint(0, C, 0.0, 1e9) == []
    assert idle.peers[0].endpoint == C


def test_silent_peer_after_data_asks_for_a_lookup_before_rehandshaking() -> None:
    """[W 6.2] data sent, nothing heard for Keepalive + Rekey-Timeout: the first sign."""
    d = host_device(rekey_timeout_jitter=0.0)
    d.set_endpoint(0, A)
    p = d.peers[0]
    p.t_new_handshake = 15.0  # as _sent() arms it after data with no reply (tested in pairs)
    outs = d.handle_timeout(15.0, 1e9 + 15)
    assert outs.index(ResolveEndpoint(0, *HOST)) < next(
        i for i, o in enumerate(outs) if isinstance(o, SendDatagram)
    )
