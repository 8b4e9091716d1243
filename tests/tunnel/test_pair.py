"""Two devices joined in memory with a fake clock: the rules of [W 6], one test each.

The `net` fixture (conftest.py) holds device `a` (knows b's endpoint) and `b`; every datagram
is logged with its time, so the tests read as "at time t, who sent what".
"""

from __future__ import annotations

import hashlib
import itertools
from random import Random

from wrapguard.keys import PrivateKey
from wrapguard.noise.reasons import DropReason
from wrapguard.tunnel.device import Device
from wrapguard.tunnel.events import (
    EndpointChanged,
    HandshakeCompleted,
    HandshakeFailed,
    ResolveEndpoint,
    SendDatagram,
)
from wrapguard.tunnel.peer import PeerSpec
from wrapguard.tunnel.timers import TimerConfig
from wrapguard.wire.wgmsg import MSG_COOKIE_REPLY, MSG_INITIATION, MSG_RESPONSE, MSG_TRANSPORT

INIT, RESP, COOKIE, DATA = MSG_INITIATION, MSG_RESPONSE, MSG_COOKIE_REPLY, MSG_TRANSPORT


def test_handshake_then_data_both_ways_v4_and_v6(net) -> None:
    net.handshake()
    assert net.got["b"] == [net.a_to_b(b"hello")]
    net.send("b", net.b_to_a(b"back"))
    net.pump()
    assert net.got["a"] == [net.b_to_a(b"back")]
    assert [type(e) for e in net.events["a"]] == [HandshakeCompleted]
    assert isinstance(net.events["b"][0], EndpointChanged)  # b learnt a's endpoint
    assert net.b.peers[0].endpoint == net.ADDR_A
    # IPv6 inner packets route by AllowedIPs too (fd00::2/128 is b's).
    v6 = net.ipv6(b"\xfd" + bytes(14) + b"\x01", b"\xfd" + bytes(14) + b"\x02")
    net.send("a", v6)
    net.pump()
    assert net.got["b"][-1] == v6
    assert not any(net.a.counters.values()) and not any(net.b.counters.values())


def test_staged_packets_are_flushed_in_order(net) -> None:
    for i in range(3):
        net.send("a", net.a_to_b(b"p%d" % i))
    assert len(net.sent("a", INIT)) == 1  # one initiation for all three
    net.pump()
    assert net.got["b"] == [net.a_to_b(b"p%d" % i) for i in range(3)]


def test_staged_queue_is_bounded(make_net) -> None:
    net = make_net(timers=TimerConfig(staged_queue_len=4))
    net.drop_a_to_b = True
    for i in range(6):
        net.send("a", net.a_to_b(b"p%d" % i))
    assert net.a.counters[DropReason.STAGED_QUEUE_FULL] == 2
    net.drop_a_to_b = False
    net.advance(6)  # the retry gets through
    assert net.got["b"] == [net.a_to_b(b"p%d" % i) for i in range(2, 6)]


def test_responder_waits_for_keypair_confirmation(net) -> None:
    net.send("a", net.a_to_b())
    _, _, init = net.queue.pop(0)
    net.inject("b", init)  # b answers and derives its keypair...
    peer_b = net.b.peers[0]
    assert peer_b.next is not None and peer_b.current is None
    net.send("b", net.b_to_a(b"early"))  # ...but may not use it yet [W 5.4.6]
    assert not net.sent("b", DATA)
    net.pump()  # response reaches a; a sends the staged data, which confirms b's keypair
    assert peer_b.current is not None and peer_b.next is None
    assert net.got["a"] == [net.b_to_a(b"early")]  # b's staged packet followed at once


def test_initiator_sends_keepalive_when_nothing_staged(net) -> None:
    out = net.a.start_handshake(0, net.now, net.wall)
    net.take("a", out)
    net.pump()
    keepalives = [x for x in net.sent("a", DATA) if len(x.data) == 32]
    assert len(keepalives) == 1
    assert net.b.peers[0].current is not None  # confirmed by the keepalive


def test_rekey_after_time_by_initiator_only(net) -> None:
    net.handshake()
    first = net.a.peers[0].current
    net.advance(119)
    net.send("b", net.b_to_a())  # the responder never rekeys on time
    net.pump()
    net.advance(2)  # t = 121 > Rekey-After-Time
    net.send("b", net.b_to_a())
    assert not net.sent("b", INIT)
    net.send("a", net.a_to_b())
    assert len(net.sent("a", INIT, since=120)) == 1
    net.pump()
    peer = net.a.peers[0]
    assert peer.current is not first and peer.previous is first
    assert sum(isinstance(e, HandshakeCompleted) for e in net.events["a"]) == 2


def test_old_keypair_still_receives_after_rekey(net) -> None:
    net.handshake()
    net.send("b", net.b_to_a(b"old"))
    _, _, late = net.queue.pop(0)  # sealed with the first session, delivered late
    net.advance(121)
    net.send("a", net.a_to_b())
    net.pump()
    assert net.a.peers[0].previous is not None
    net.inject("a", late)
    assert net.got["a"][-1] == net.b_to_a(b"old")


def test_rekey_after_messages(make_net) -> None:
    net = make_net(timers=TimerConfig(rekey_after_messages=5))
    net.handshake()  # counter 0 used by the staged packet
    net.advance(6)  # past the one-initiation-per-Rekey-Timeout limit
    for _ in range(3):
        net.send("a", net.a_to_b())
    assert len(net.sent("a", INIT)) == 1
    net.send("a", net.a_to_b())  # send counter reaches 5
    assert len(net.sent("a", INIT)) == 2


def test_reject_after_messages(make_net) -> None:
    net = make_net(timers=TimerConfig(reject_after_messages=3, rekey_after_messages=100))
    net.handshake()
    net.drop_a_to_b = True
    net.send("a", net.a_to_b())
    net.send("a", net.a_to_b())
    data_before = len(net.sent("a", DATA))
    net.advance(6)
    net.send("a", net.a_to_b())  # counter exhausted: staged, handshake instead of data
    assert len(net.sent("a", DATA)) == data_before
    assert net.a.peers[0].staged


def test_reject_after_time(net) -> None:
    net.handshake()
    net.send("b", net.b_to_a(b"stale"))
    _, _, stale = net.queue.pop(0)
    net.drop_a_to_b = net.drop_b_to_a = True  # b's rehandshake attempts all fail
    net.advance(181)
    net.inject("a", stale)
    assert net.a.counters[DropReason.KEYPAIR_EXPIRED] == 1
    n_data = len(net.sent("a", DATA))
    net.send("a", net.a_to_b())
    assert len(net.sent("a", DATA)) == n_data  # never sent with the expired keypair
    assert net.sent("a", INIT, since=181)


def test_retry_every_rekey_timeout_with_jitter_then_give_up(net) -> None:
    net.drop_a_to_b = True
    net.send("a", net.a_to_b())
    net.advance(120)
    times = [x.t for x in net.sent("a", INIT)]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(5.0 <= g <= 5.334 for g in gaps), gaps
    assert len(set(round(g, 3) for g in gaps)) > 1  # jitter drawn from the injected rng
    assert times[-1] < 90 and len(times) >= 17
    failed = [e for e in net.events["a"] if isinstance(e, HandshakeFailed)]
    assert len(failed) == 1
    assert net.a.counters[DropReason.HANDSHAKE_GAVE_UP] == 1  # the staged packet
    assert not net.a.peers[0].staged and net.a.peers[0].pending is None
    net.drop_a_to_b = False
    net.send("a", net.a_to_b(b"again"))  # new traffic starts a new attempt
    net.pump()
    assert net.got["b"] == [net.a_to_b(b"again")]


def test_initiations_rate_limited_to_one_per_rekey_timeout(net) -> None:
    net.drop_a_to_b = True
    for _ in range(10):
        net.send("a", net.a_to_b())
        net.advance(0.4)
    assert len(net.sent("a", INIT)) == 1


def test_passive_keepalive_after_keepalive_timeout(net) -> None:
    net.handshake()
    t0 = net.now
    net.send("a", net.a_to_b(b"one way"))
    net.pump()
    net.advance(9.9)
    assert not [x for x in net.sent("b", DATA, since=t0) if len(x.data) == 32]
    net.advance(0.2)
    keepalives = [x for x in net.sent("b", DATA, since=t0) if len(x.data) == 32]
    assert len(keepalives) == 1 and abs(keepalives[0].t - (t0 + 10)) < 1e-9
    net.advance(30)
    # Two data packets arrived (hello, one way) within one keepalive period, so wg's
    # "need another keepalive" rule sends exactly one more, 10 s later, and then stops.
    ka = [x.t - t0 for x in net.sent("b", DATA, since=t0) if len(x.data) == 32]
    assert ka == [10.0, 20.0]


def test_no_keepalive_when_we_answered(net) -> None:
    net.handshake()
    t0 = net.now
    net.send("a", net.a_to_b())
    net.pump()
    net.advance(3)
    net.send("b", net.b_to_a())
    net.pump()
    net.advance(20)
    assert not [x for x in net.sent("b", DATA, since=t0) if len(x.data) == 32]


def test_persistent_keepalive(make_net) -> None:
    net = make_net(keepalive_a=25)
    net.take("a", net.a.start_handshake(0, net.now, net.wall))
    net.pump()
    t0 = net.now
    net.advance(80)
    ka = [x.t - t0 for x in net.sent("a", DATA, since=t0) if len(x.data) == 32]
    assert [round(t) for t in ka] == [0, 25, 50, 75], ka


def test_new_handshake_when_data_gets_no_answer(net) -> None:
    net.handshake()
    net.advance(1)
    net.send("b", net.b_to_a())  # b answers the first data: a's timer is disarmed
    net.pump()
    net.drop_b_to_a = True
    t0 = net.now
    net.send("a", net.a_to_b())
    net.advance(14.9)
    assert not net.sent("a", INIT, since=t0)
    net.advance(0.5)  # Keepalive-Timeout + Rekey-Timeout + jitter (<= 333 ms)
    inits = net.sent("a", INIT, since=t0)
    assert len(inits) == 1 and 15.0 <= inits[0].t - t0 <= 15.334


def test_keys_zeroed_after_three_reject_after_time(net) -> None:
    net.handshake()
    net.drop_a_to_b = net.drop_b_to_a = True
    net.advance(539)
    assert net.a.peers[0].current is not None
    net.advance(2)
    for dev in (net.a, net.b):
        p = dev.peers[0]
        assert p.current is None and p.previous is None and p.next is None
        assert p.pending is None
        assert dev._index == {}
    assert net.a.next_deadline() is None


def test_cookie_under_load(net) -> None:
    net.b.under_load = True
    net.send("a", net.a_to_b())
    net.pump()
    assert len(net.sent("b", COOKIE)) == 1 and not net.sent("b", RESP)
    assert net.b.counters[DropReason.UNDER_LOAD] == 1
    assert net.a.peers[0].cookie.has_cookie
    assert not net.got["b"]
    net.advance(5.4)  # the retry carries mac2 = MAC(cookie, ...) and is answered
    assert len(net.sent("b", RESP)) == 1
    assert net.got["b"] == [net.a_to_b()]


def test_roaming_follows_authenticated_source(net) -> None:
    net.handshake()
    net.addr_a = ("198.51.100.7", 4000)
    net.send("a", net.a_to_b(b"from new address"))
    net.pump()
    assert net.b.peers[0].endpoint == ("198.51.100.7", 4000)
    net.send("b", net.b_to_a(b"reply"))
    net.pump()
    assert net.got["a"][-1] == net.b_to_a(b"reply")
    # An unauthenticated datagram from elsewhere does not move the endpoint.
    net.inject("b", b"\x04\x00\x00\x00" + bytes(40), src=("203.0.113.1", 1))
    assert net.b.peers[0].endpoint == ("198.51.100.7", 4000)


def test_simultaneous_initiations_converge(net) -> None:
    net.b.set_endpoint(0, net.ADDR_A)
    net.send("a", net.a_to_b(b"from a"))
    net.send("b", net.b_to_a(b"from b"))
    net.pump()
    net.advance(1)
    assert net.got["b"] == [net.a_to_b(b"from a")]
    assert net.got["a"] == [net.b_to_a(b"from b")]
    for i in range(5):
        net.send("a", net.a_to_b(b"x%d" % i))
        net.send("b", net.b_to_a(b"y%d" % i))
        net.pump()
    assert len(net.got["a"]) == len(net.got["b"]) == 6
    assert not any(net.a.counters.values()) and not any(net.b.counters.values())


def test_hostname_endpoint_asks_for_resolution(make_net) -> None:
    net = make_net(timers=TimerConfig(resolve_every_attempts=3))
    spec = PeerSpec(net.a.peers[0].spec.public_key, endpoint=("peer.example", 51820))
    d = Device(PrivateKey(bytes(range(32))), [spec], rng=Random(3).randbytes)
    out = d.send_packet(net.a_to_b(), 0.0, 1e9, peer=0)
    assert ResolveEndpoint(0, "peer.example", 51820) in out
    assert d.counters[DropReason.NO_ENDPOINT] == 1
    d.set_endpoint(0, ("192.0.2.2", 51820))
    deadline = d.next_deadline()
    assert deadline is not None
    out = d.handle_timeout(deadline, 1e9 + deadline)
    assert any(isinstance(o, SendDatagram) for o in out)
    # Handshakes that keep failing ask for the name to be resolved again.
    events = []
    t = deadline
    for _ in range(10):
        nd = d.next_deadline()
        assert nd is not None
        t = nd
        events += d.handle_timeout(t, 1e9 + t)
    assert sum(isinstance(e, ResolveEndpoint) for e in events) >= 3


def transcript(build, seed: int) -> bytes:
    net = build(seed=seed, psk=True)
    net.handshake()
    net.send("b", net.b_to_a(b"answer"))
    net.pump()
    net.advance(130)
    net.send("a", net.a_to_b(b"after rekey"))
    net.pump()
    return b"".join(x.data for x in net.log)


def test_transcript_is_deterministic_under_fixed_rng_and_clocks(net) -> None:
    first, second = transcript(net.build, 5), transcript(net.build, 5)
    assert first == second
    assert transcript(net.build, 6) != first
    # A pinned digest: any change to the wire format or the key schedule shows up here.
    assert hashlib.sha256(first).hexdigest() == PINNED


PINNED = "61dbe2797b17e61df8fa533ed2bb8c61e40349a9675264b13431f49a3684da01"


def test_lossy_link_long_run(net) -> None:
    """Ten fake minutes over a link that drops, duplicates and reorders: rekeys keep
    happening, most traffic arrives, and nothing but replays and losses is ever seen."""
    net.loss, net.dup, net.reorder = 0.15, 0.1, 0.2
    sent = 0
    for step in range(600):
        net.send("a", net.a_to_b(b"a%d" % step))
        if step % 2:
            net.send("b", net.b_to_a(b"b%d" % step))
        sent += 1
        net.pump()
        net.advance(1.0)
    assert len(net.got["b"]) > 0.6 * sent, (len(net.got["b"]), net.a.counters)
    assert len(net.got["a"]) > 0.6 * sent / 2, (len(net.got["a"]), net.b.counters)
    assert len(net.got["b"]) == len(set(net.got["b"]))  # duplicates never delivered twice
    completed = sum(isinstance(e, HandshakeCompleted) for e in net.events["a"])
    assert completed >= 5  # a rekey at least every Rekey-After-Time
    allowed = {
        DropReason.REPLAYED_COUNTER,
        DropReason.REPLAYED_TIMESTAMP,
        DropReason.UNEXPECTED_RESPONSE,
        DropReason.UNKNOWN_INDEX,
        DropReason.HANDSHAKE_FLOOD,
    }
    for dev in (net.a, net.b):
        bad = {r: n for r, n in dev.counters.items() if n and r not in allowed}
        assert not bad, bad
