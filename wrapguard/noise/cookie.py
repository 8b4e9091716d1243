"""mac1, mac2 and cookie replies: WireGuard's DoS mitigation [W 5.3, 5.4.4, 5.4.7].

`CookieChecker` is our side as receiver of handshake messages: it checks mac1 (keyed by our
own public key), and under load checks mac2 against a cookie derived from the sender's address
and a secret rotated every 2 minutes, answering with an XChaCha20-Poly1305 cookie reply.
`CookieState` is kept per peer for the messages we send: it appends mac1/mac2 and consumes the
cookie replies that peer sends us. Randomness (secret, nonces) is injected.
"""

from __future__ import annotations

import hmac as _hmac
from collections.abc import Callable
from typing import Final

from wrapguard.noise.crypto import hash_, mac, xaead_decrypt, xaead_encrypt
from wrapguard.wire.wgmsg import MAC_LEN, CookieReply, emit

LABEL_MAC1: Final = b"mac1----"  # [W 5.4.4]
LABEL_COOKIE: Final = b"cookie--"  # [W 5.4.7]
COOKIE_SECRET_MAX_AGE: Final = 120.0  # [W 5.4.7] R_m changes every two minutes
# A cookie is used for mac2 while younger than the secret's lifetime minus a latency margin.
COOKIE_LIFETIME: Final = COOKIE_SECRET_MAX_AGE - 5.0
_ZERO_MAC: Final = bytes(MAC_LEN)

Rng = Callable[[int], bytes]


class CookieChecker:
    """Checks mac1/mac2 on incoming handshake messages and makes cookie replies."""

    __slots__ = ("_cookie_key", "_mac1_key", "_rng", "_secret", "_secret_time")

    def __init__(self, local_public: bytes, rng: Rng) -> None:
        self._mac1_key = hash_(LABEL_MAC1, local_public)
        self._cookie_key = hash_(LABEL_COOKIE, local_public)
        self._rng = rng
        self._secret: bytes | None = None
        self._secret_time = 0.0

    def mac1_ok(self, data: bytes) -> bool:
        """[W 5.4.4] msg.mac1 = MAC(HASH(Label-Mac1 || Spub_m'), msg_alpha)."""
        end = len(data) - 2 * MAC_LEN
        expected = mac(self._mac1_key, data[:end])
        return _hmac.compare_digest(expected, data[end : end + MAC_LEN])

    def _cookie(self, src: bytes, now: float) -> bytes:
        # [W 5.4.7] tau = MAC(R_m, A_m'); R_m is a random secret rotated every 2 minutes.
        if self._secret is None or now - self._secret_time >= COOKIE_SECRET_MAX_AGE:
            self._secret = self._rng(32)
            self._secret_time = now
        return mac(self._secret, src)

    def mac2_ok(self, data: bytes, src: bytes, now: float) -> bool:
        """[W 5.4.4] msg.mac2 = MAC(cookie, msg_beta); src is the sender's IP and port bytes."""
        end = len(data) - MAC_LEN
        expected = mac(self._cookie(src, now), data[:end])
        return _hmac.compare_digest(expected, data[end:])

    def make_reply(self, data: bytes, receiver: int, src: bytes, now: float) -> bytes:
        """[W 5.4.7] A cookie reply to `data`, bound to its mac1 as associated data."""
        end = len(data) - 2 * MAC_LEN
        mac1 = data[end : end + MAC_LEN]
        nonce = self._rng(24)
        sealed = xaead_encrypt(self._cookie_key, nonce, self._cookie(src, now), mac1)
        return emit(CookieReply(receiver, nonce, sealed))


class CookieState:
    """Per-peer: adds mac1/mac2 to our handshake messages and stores that peer's cookie."""

    __slots__ = ("_cookie", "_cookie_key", "_cookie_time", "_last_mac1", "_mac1_key")

    def __init__(self, remote_public: bytes) -> None:
        self._mac1_key = hash_(LABEL_MAC1, remote_public)
        self._cookie_key = hash_(LABEL_COOKIE, remote_public)
        self._cookie: bytes | None = None
        self._cookie_time = 0.0
        self._last_mac1: bytes | None = None

    @property
    def has_cookie(self) -> bool:
        return self._cookie is not None

    def add_macs(self, message: bytes, now: float) -> bytes:
        """Fill in mac1 and mac2 (zero unless a fresh cookie is held) [W 5.4.4]."""
        body = message[: len(message) - 2 * MAC_LEN]
        mac1 = mac(self._mac1_key, body)
        self._last_mac1 = mac1
        mac2 = _ZERO_MAC
        if self._cookie is not None and now - self._cookie_time < COOKIE_LIFETIME:
            mac2 = mac(self._cookie, body + mac1)
        return body + mac1 + mac2

    def consume_reply(self, reply: CookieReply, now: float) -> bool:
        """[W 5.4.7] Decrypt a cookie reply for our last message; False if it does not open."""
        if self._last_mac1 is None:
            return False
        cookie = xaead_decrypt(
            self._cookie_key, reply.nonce, reply.encrypted_cookie, self._last_mac1
        )
        if cookie is None or len(cookie) != MAC_LEN:
            return False
        self._cookie = cookie
        self._cookie_time = now
        return True
