"""Device input validation: every DropReason reached by a test, garbage that changes nothing,
local misuse that raises, and the cryptokey routing entry points."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wrapguard.keys import PrivateKey
from wrapguard.noise.cookie import CookieState
from wrapguard.noise.reasons import DropReason
from wrapguard.tunnel.device import Device
from wrapguard.tunnel.events import PacketDropped, SendDatagram
from wrapguard.tunnel.peer import PeerSpec
from wrapguard.tunnel.timers import TimerConfig
from wrapguard.wire.wgmsg import MSG_INITIATION, MSG_RESPONSE, MSG_TRANSPORT

# Each function drives a fresh pair into exactly one drop reason and returns the device that
# must have counted it ("a" or "b").


def r_malformed(net) -> str:
    net.inject("b", b"\x09\x00\x00\x00garbage")
    return "b"


def r_invalid_mac1(net) -> str:
    net.inject("b", b"\x01\x00\x00\x00" + bytes(144))
    return "b"


def r_under_load(net) -> str:
    net.b.under_load = True
    net.send("a", net.a_to_b())
    net.pump()
    return "b"


def r_handshake_decrypt_failed(net) -> str:
    # A well-formed initiation with a valid mac1 for b, but garbage crypto fields.
    body = b"\x01\x00\x00\x00" + random.Random(1).randbytes(112) + bytes(32)
    net.inject("b", CookieState(net.b.public_key).add_macs(body, net.now))
    return "b"


def r_unknown_peer(net) -> str:
    stranger = Device(
        PrivateKey(bytes([42]) * 32),
        [PeerSpec(net.a.peers[0].spec.public_key, endpoint=net.ADDR_B)],
        rng=random.Random(9).randbytes,
    )
    out = stranger.start_handshake(0, net.now, net.wall)
    net.inject("b", next(o for o in out if isinstance(o, SendDatagram)).data)
    return "b"


def r_replayed_timestamp(net) -> str:
    net.send("a", net.a_to_b())
    _, _, init = net.queue.pop(0)
    net.inject("b", init)
    net.now += 1
    net.inject("b", init)
    return "b"


def r_handshake_flood(net) -> str:
    net.send("a", net.a_to_b())
    _, _, first = net.queue.pop(0)
    net.inject("b", first)
    net.now += 0.001  # a second genuine initiation within 20 ms (newer TAI64N)
    net.wall_offset += 10
    net.a.peers[0].t_retransmit = None
    net.a.peers[0].last_sent_handshake = float("-inf")
    net.take("a", net.a.start_handshake(0, net.now, net.wall))
    net.queue.clear()
    second = net.sent("a", MSG_INITIATION)[-1].data
    net.inject("b", second)
    return "b"


def r_unexpected_response(net) -> str:
    net.send("a", net.a_to_b())
    net.pump()
    resp = net.sent("b", MSG_RESPONSE)[0].data
    net.inject("a", resp)  # the same response again: the index now names a keypair
    return "a"


def r_invalid_cookie_reply(net) -> str:
    net.drop_a_to_b = True
    net.send("a", net.a_to_b())
    idx = net.a.peers[0].pending.local_index
    net.inject("a", b"\x03\x00\x00\x00" + idx.to_bytes(4, "little") + bytes(56))
    return "a"


def r_unknown_index(net) -> str:
    net.inject("a", b"\x04\x00\x00\x00" + b"\xde\xad\xbe\xef" + bytes(40))
    return "a"


def r_decrypt_failed(net) -> str:
    net.handshake()
    net.send("a", net.a_to_b())
    _, _, data = net.queue.pop(0)
    net.inject("b", data[:-1] + bytes([data[-1] ^ 1]))
    return "b"


def r_replayed_counter(net) -> str:
    net.handshake()
    net.send("a", net.a_to_b())
    _, _, data = net.queue.pop(0)
    net.inject("b", data)
    net.inject("b", data)
    return "b"


def r_keypair_expired(net) -> str:
    net.handshake()
    net.send("a", net.a_to_b())
    _, _, data = net.queue.pop(0)
    net.now += 180
    net.inject("b", data)
    return "b"


def r_invalid_inner_packet(net) -> str:
    net.handshake()
    net.send("a", b"\x00not an ip packet", peer=0)
    net.pump()
    return "b"


def r_disallowed_source(net) -> str:
    net.handshake()
    net.send("a", net.ipv4("10.9.9.9", "10.0.0.2"), peer=0)
    net.pump()
    return "b"


def r_no_route(net) -> str:
    net.send("a", net.ipv4("10.0.0.1", "192.0.2.77"))
    return "a"


def r_no_endpoint(net) -> str:
    net.send("b", net.b_to_a())  # b has no endpoint for a yet
    return "b"


def r_staged_queue_full(net) -> str:
    net.drop_a_to_b = True
    for _ in range(TimerConfig().staged_queue_len + 1):
        net.send("a", net.a_to_b())
    return "a"


def r_handshake_gave_up(net) -> str:
    net.drop_a_to_b = True
    net.send("a", net.a_to_b())
    net.advance(100)
    return "a"


REACHERS: dict[DropReason, Callable[..., str]] = {
    DropReason.MALFORMED: r_malformed,
    DropReason.INVALID_MAC1: r_invalid_mac1,
    DropReason.UNDER_LOAD: r_under_load,
    DropReason.HANDSHAKE_DECRYPT_FAILED: r_handshake_decrypt_failed,
    DropReason.UNKNOWN_PEER: r_unknown_peer,
    DropReason.REPLAYED_TIMESTAMP: r_replayed_timestamp,
    DropReason.HANDSHAKE_FLOOD: r_handshake_flood,
    DropReason.UNEXPECTED_RESPONSE: r_unexpected_response,
    DropReason.INVALID_COOKIE_REPLY: r_invalid_cookie_reply,
    DropReason.UNKNOWN_INDEX: r_unknown_index,
    DropReason.DECRYPT_FAILED: r_decrypt_failed,
    DropReason.REPLAYED_COUNTER: r_replayed_counter,
    DropReason.KEYPAIR_EXPIRED: r_keypair_expired,
    DropReason.INVALID_INNER_PACKET: r_invalid_inner_packet,
    DropReason.DISALLOWED_SOURCE: r_disallowed_source,
    DropReason.NO_ROUTE: r_no_route,
    DropReason.NO_ENDPOINT: r_no_endpoint,
    DropReason.STAGED_QUEUE_FULL: r_staged_queue_full,
    DropReason.HANDSHAKE_GAVE_UP: r_handshake_gave_up,
}


def test_every_drop_reason_has_a_test() -> None:
    assert set(REACHERS) == set(DropReason)


@pytest.mark.parametrize("reason", list(DropReason), ids=lambda r: r.value)
def test_drop_reason_reached(net, reason: DropReason) -> None:
    who = REACHERS[reason](net)
    dev = net.dev(who)
    assert dev.counters[reason] >= 1, dev.counters
    assert PacketDropped(reason, None) in net.drops(who) or any(
        d.reason is reason for d in net.drops(who)
    )


# -- garbage changes no state --------------------------------------------------------------


def fingerprint(dev: Device) -> tuple:
    peers = []
    for p in dev.peers:
        kps = tuple(
            (kp.local_index, kp.send_counter, kp._top, kp._bitmap, kp.created)
            for kp in (p.current, p.previous, p.next)
            if kp is not None
        )
        peers.append(
            (
                kps,
                p.endpoint,
                p.last_timestamp,
                p.last_initiation_consumed,
                p.pending.local_index if p.pending else None,
                tuple(p.staged),
                p.t_retransmit,
                p.t_send_keepalive,
                p.t_new_handshake,
                p.t_zero_keys,
                p.t_persistent,
                p.need_another_keepalive,
                p.rx_bytes,
            )
        )
    return (tuple(sorted(dev._index)), tuple(peers))


def mutated(data: bytes, rnd: random.Random) -> bytes:
    b = bytearray(data)
    for _ in range(rnd.randint(1, 4)):
        b[rnd.randrange(len(b))] ^= 1 << rnd.randrange(8)
    return bytes(b)


garbage = st.one_of(
    st.binary(max_size=200),
    st.tuples(st.sampled_from([1, 2, 3, 4]), st.binary(max_size=160)).map(
        lambda t: bytes([t[0], 0, 0, 0]) + t[1]
    ),
    st.tuples(st.sampled_from([148, 92, 64, 32, 48]), st.sampled_from([1, 2, 3, 4])).flatmap(
        lambda t: st.binary(min_size=t[0] - 4, max_size=t[0] - 4).map(
            lambda body: bytes([t[1], 0, 0, 0]) + body
        )
    ),
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.lists(garbage, min_size=1, max_size=5), seed=st.integers(0, 2**32))
def test_garbage_changes_no_state(net, data: list[bytes], seed: int) -> None:
    if not net.got["b"]:
        net.handshake()
        net.send("b", net.b_to_a())
        net.pump()
        net.send("a", net.a_to_b())  # one in flight: its index and counter are live
    rnd = random.Random(seed)
    # Also bit-flipped copies of genuine datagrams of every type seen so far.
    genuine = [x.data for x in net.log]
    data = data + [mutated(rnd.choice(genuine), rnd) for _ in range(3)]
    for to in ("a", "b"):
        dev = net.dev(to)
        before = fingerprint(dev)
        for d in data:
            outs = dev.datagram_received(
                d, net.ADDR_B if to == "a" else net.ADDR_A, net.now, net.wall
            )
            assert all(isinstance(o, PacketDropped) for o in outs), outs
        assert fingerprint(dev) == before


def test_replay_of_every_genuine_datagram_changes_nothing(net) -> None:
    net.handshake()
    net.send("b", net.b_to_a())
    net.pump()
    net.advance(1)
    before = (fingerprint(net.a), fingerprint(net.b))
    for x in list(net.log):
        to = "b" if x.src == "a" else "a"
        outs = net.dev(to).datagram_received(
            x.data, net.ADDR_A if to == "b" else net.ADDR_B, net.now, net.wall
        )
        assert all(isinstance(o, PacketDropped) for o in outs), (x.kind, outs)
    assert (fingerprint(net.a), fingerprint(net.b)) == before


# -- routing and local misuse ------------------------------------------------------------------


def test_route_longest_prefix_and_explicit_peer(make_net) -> None:
    k = [PrivateKey(bytes([i]) * 32).public_key() for i in (1, 2, 3)]
    dev = Device(
        PrivateKey(bytes([9]) * 32),
        [
            PeerSpec(k[0], allowed_ips=("0.0.0.0/0", "::/0")),
            PeerSpec(k[1], allowed_ips=("10.1.0.0/16", "fd00::/64")),
            PeerSpec(k[2], allowed_ips=("10.1.2.0/24", "10.1.0.0/16")),  # /16 already taken
        ],
        rng=random.Random(1).randbytes,
    )
    assert dev.route(bytes([10, 1, 2, 3])) == 2
    assert dev.route(bytes([10, 1, 3, 3])) == 1
    assert dev.route(bytes([8, 8, 8, 8])) == 0
    assert dev.route(b"\xfd" + bytes(15)) == 1
    assert dev.route(b"\x20\x01" + bytes(14)) == 0


def test_add_allowed_source_extends_inbound_check(net) -> None:
    net.handshake()
    net.b.add_allowed_source(0, "10.9.0.0/16")
    net.send("a", net.ipv4("10.9.9.9", "10.0.0.2", b"policy"), peer=0)
    net.pump()
    assert net.got["b"][-1] == net.ipv4("10.9.9.9", "10.0.0.2", b"policy")
    assert net.b.counters[DropReason.DISALLOWED_SOURCE] == 0


def test_padding_is_removed_before_delivery(net) -> None:
    net.handshake()
    pkt = net.a_to_b(b"x" * 3)  # 31 bytes, padded to 32 on the wire
    net.send("a", pkt)
    assert len(net.sent("a", MSG_TRANSPORT)[-1].data) == 16 + 32 + 16
    net.pump()
    assert net.got["b"][-1] == pkt


def test_local_misuse_raises() -> None:
    k = PrivateKey(bytes([1]) * 32)
    spec = PeerSpec(PrivateKey(bytes([2]) * 32).public_key())
    with pytest.raises(ValueError):
        Device(k, [spec, spec], rng=random.Random(1).randbytes)
    dev = Device(k, [spec], rng=random.Random(1).randbytes)
    with pytest.raises(IndexError):
        dev.send_packet(b"\x45" + bytes(19), 0.0, 0.0, peer=5)
    with pytest.raises(ValueError):
        dev.set_endpoint(0, ("not an ip", 1))
    stuck = Device(k, [spec], rng=lambda n: bytes(n))
    stuck._index[0] = (stuck.peers[0], None)
    with pytest.raises(RuntimeError):
        stuck._new_index()
