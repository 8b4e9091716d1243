"""Cryptographic primitives of WireGuard [W 5.4], bound to vetted libraries.

HASH, MAC, HMAC and KDF1-3 on hashlib.blake2s (HMAC is hand-rolled on BLAKE2s, RFC 2104 with a
64-byte block, about twice as fast as hmac.new); DH is X25519 and AEAD is ChaCha20-Poly1305 from
`cryptography`; XAEAD (cookie replies, [W 5.4.7]) and a static key's public key (see
`public_key`) are from PyNaCl. TAI64N
timestamps are built from a wall-clock time passed in by the caller. Nothing here keeps state
or draws randomness; no cryptography is written by hand.
"""

from __future__ import annotations

import hashlib
import struct
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from nacl.bindings import (
    crypto_aead_xchacha20poly1305_ietf_decrypt,
    crypto_aead_xchacha20poly1305_ietf_encrypt,
    crypto_scalarmult_base,
)
from nacl.exceptions import CryptoError

__all__ = [
    "AEAD_TAG_LEN",
    "ChaCha20Poly1305",
    "InvalidTag",
    "X25519PrivateKey",
    "X25519PublicKey",
    "aead_decrypt",
    "aead_encrypt",
    "dh",
    "hash_",
    "hmac",
    "kdf1",
    "kdf2",
    "kdf3",
    "mac",
    "public_key",
    "tai64n",
    "xaead_decrypt",
    "xaead_encrypt",
]

AEAD_TAG_LEN: Final = 16
_BLOCK: Final = 64  # BLAKE2s block size, the HMAC block size [RFC 2104 2]
_IPAD: Final = int.from_bytes(b"\x36" * _BLOCK, "big")
_OPAD: Final = int.from_bytes(b"\x5c" * _BLOCK, "big")
_blake2s = hashlib.blake2s
# [W 5.1] TAI64N: a 12-byte big-endian TAI64 label (2^62 + 10 s offset) and nanoseconds.
_TAI64_BASE: Final = (1 << 62) + 10
_TAI64N = struct.Struct(">QI")
# Whitening: nanoseconds rounded down to ~16.8 ms, so the timestamp does not leak a fine clock.
_WHITEN_MASK: Final = ~0xFFFFFF
_ZERO_NONCE: Final = bytes(12)


def hash_(*parts: bytes) -> bytes:
    """HASH(input): BLAKE2s with a 32-byte digest [W 5.4]."""
    h = _blake2s()
    for p in parts:
        h.update(p)
    return h.digest()


def mac(key: bytes, data: bytes) -> bytes:
    """MAC(key, input): keyed BLAKE2s with a 16-byte digest [W 5.4]."""
    return _blake2s(data, digest_size=16, key=key).digest()


def hmac(key: bytes, data: bytes) -> bytes:
    """HMAC-BLAKE2s(key, input) with a 32-byte output [W 5.4], RFC 2104 by hand."""
    k = int.from_bytes(key.ljust(_BLOCK, b"\0"), "big")
    inner = _blake2s((k ^ _IPAD).to_bytes(_BLOCK, "big"))
    inner.update(data)
    outer = _blake2s((k ^ _OPAD).to_bytes(_BLOCK, "big"))
    outer.update(inner.digest())
    return outer.digest()


def kdf1(key: bytes, data: bytes) -> bytes:
    """KDF1: the first HKDF output, tau1 = HMAC(HMAC(key, input), 0x1) [W 5.4]."""
    t0 = hmac(key, data)
    return hmac(t0, b"\x01")


def kdf2(key: bytes, data: bytes) -> tuple[bytes, bytes]:
    """KDF2: (tau1, tau2) with tau2 = HMAC(tau0, tau1 || 0x2) [W 5.4]."""
    t0 = hmac(key, data)
    t1 = hmac(t0, b"\x01")
    return t1, hmac(t0, t1 + b"\x02")


def kdf3(key: bytes, data: bytes) -> tuple[bytes, bytes, bytes]:
    """KDF3: (tau1, tau2, tau3) [W 5.4]."""
    t0 = hmac(key, data)
    t1 = hmac(t0, b"\x01")
    t2 = hmac(t0, t1 + b"\x02")
    return t1, t2, hmac(t0, t2 + b"\x03")


def public_key(private: bytes) -> bytes:
    """X25519(k, 9), the public key of a private key k [RFC 7748 6.1], by libsodium (which
    clamps k as cryptography does). cryptography's X25519PrivateKey.from_private_bytes()
    imports its OpenSSL backend (~4 ms), which a start that never handshakes (`wrapguard
    -- true`, bench row 5) needs for nothing else."""
    return crypto_scalarmult_base(private)


def dh(private: X25519PrivateKey, public: bytes) -> bytes | None:
    """DH(priv, pub): X25519; None when the result is all zeros (a low-order point)."""
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError:
        return None


def aead_encrypt(key: bytes, plaintext: bytes, ad: bytes) -> bytes:
    """AEAD(key, 0, plain, auth) for handshake fields: the counter is always 0 there [W 5.4.2]."""
    return ChaCha20Poly1305(key).encrypt(_ZERO_NONCE, plaintext, ad)


def aead_decrypt(key: bytes, ciphertext: bytes, ad: bytes) -> bytes | None:
    """Open a handshake AEAD field; None when authentication fails."""
    try:
        return ChaCha20Poly1305(key).decrypt(_ZERO_NONCE, ciphertext, ad)
    except InvalidTag:
        return None


def xaead_encrypt(key: bytes, nonce: bytes, plaintext: bytes, ad: bytes) -> bytes:
    """XAEAD: XChaCha20-Poly1305 with a 24-byte random nonce [W 5.4.7]."""
    return bytes(crypto_aead_xchacha20poly1305_ietf_encrypt(plaintext, ad, nonce, key))


def xaead_decrypt(key: bytes, nonce: bytes, ciphertext: bytes, ad: bytes) -> bytes | None:
    try:
        return bytes(crypto_aead_xchacha20poly1305_ietf_decrypt(ciphertext, ad, nonce, key))
    except CryptoError:
        return None


def tai64n(wall_time: float) -> bytes:
    """TAI64N(wall_time) [W 5.4.2], whitened to ~16.8 ms."""
    secs = int(wall_time)
    nanos = int((wall_time - secs) * 1e9) & _WHITEN_MASK
    return _TAI64N.pack(_TAI64_BASE + secs, nanos)
