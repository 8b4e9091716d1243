"""mac1/mac2 and cookie replies [W 5.4.4, 5.4.7]."""

from __future__ import annotations

import hashlib
import random

from wrapguard.noise.cookie import CookieChecker, CookieState
from wrapguard.wire.wgmsg import CookieReply, parse

PUB = bytes(range(32))


def rng_from(seed: int):  # type: ignore[no-untyped-def]
    r = random.Random(seed)
    return r.randbytes


def msg148(fill: int = 1) -> bytes:
    return bytes([1, 0, 0, 0]) + bytes([fill]) * 112 + bytes(32)


def test_mac1_is_keyed_by_receivers_public_key() -> None:
    state = CookieState(PUB)
    out = state.add_macs(msg148(), 0.0)
    key = hashlib.blake2s(b"mac1----" + PUB).digest()
    assert out[-32:-16] == hashlib.blake2s(out[:-32], key=key, digest_size=16).digest()
    assert out[-16:] == bytes(16)  # no cookie yet: mac2 is zero [W 5.4.4]
    assert CookieChecker(PUB, rng_from(1)).mac1_ok(out)
    assert not CookieChecker(bytes(32), rng_from(1)).mac1_ok(out)
    assert not CookieChecker(PUB, rng_from(1)).mac1_ok(out[:-20] + b"\xff" + out[-19:])


def test_cookie_round_trip_gives_valid_mac2() -> None:
    checker = CookieChecker(PUB, rng_from(2))
    state = CookieState(PUB)
    src = b"\x7f\x00\x00\x01\x30\x39"
    first = state.add_macs(msg148(), 0.0)
    assert not checker.mac2_ok(first, src, 0.0)
    reply = parse(checker.make_reply(first, 77, src, 0.0))
    assert isinstance(reply, CookieReply) and reply.receiver == 77
    assert state.consume_reply(reply, 0.1)
    assert state.has_cookie
    second = state.add_macs(msg148(2), 1.0)
    assert second[-16:] != bytes(16)
    assert checker.mac1_ok(second) and checker.mac2_ok(second, src, 1.0)
    # The cookie is bound to the source address and port.
    assert not checker.mac2_ok(second, b"\x7f\x00\x00\x01\x30\x3a", 1.0)


def test_cookie_reply_only_opens_for_our_last_mac1() -> None:
    checker = CookieChecker(PUB, rng_from(3))
    state = CookieState(PUB)
    assert not state.consume_reply(CookieReply(1, bytes(24), bytes(32)), 0.0)  # nothing sent
    sent = state.add_macs(msg148(), 0.0)
    other = CookieState(PUB).add_macs(msg148(9), 0.0)
    reply = parse(checker.make_reply(other, 1, b"ab", 0.0))
    assert isinstance(reply, CookieReply)
    assert not state.consume_reply(reply, 0.0)
    assert not state.has_cookie
    good = parse(checker.make_reply(sent, 1, b"ab", 0.0))
    assert isinstance(good, CookieReply)
    assert state.consume_reply(good, 0.0)


def test_secret_rotates_every_two_minutes() -> None:
    checker = CookieChecker(PUB, rng_from(4))
    state = CookieState(PUB)
    src = b"src"
    sent = state.add_macs(msg148(), 0.0)
    reply = parse(checker.make_reply(sent, 1, src, 0.0))
    assert isinstance(reply, CookieReply)
    assert state.consume_reply(reply, 0.0)
    msg = state.add_macs(msg148(), 100.0)
    assert checker.mac2_ok(msg, src, 100.0)
    assert not checker.mac2_ok(msg, src, 121.0)  # R_m changed at 120 s


def test_stale_cookie_is_not_used() -> None:
    checker = CookieChecker(PUB, rng_from(5))
    state = CookieState(PUB)
    sent = state.add_macs(msg148(), 0.0)
    reply = parse(checker.make_reply(sent, 1, b"s", 0.0))
    assert isinstance(reply, CookieReply)
    assert state.consume_reply(reply, 0.0)
    assert state.add_macs(msg148(), 200.0)[-16:] == bytes(16)
