"""Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s as WireGuard uses it [W 5.4.2, 5.4.3, 5.4.5], [N 7.5].

Theory of operation: the initiator builds an initiation (`create_initiation`) and keeps an
`InitiatorPending`; the responder authenticates it (`consume_initiation`, which decrypts the
initiator's static key and TAI64N timestamp), then answers (`create_response`) and derives its
`SessionKeys`; the initiator checks the response (`consume_response`) and derives its own. These
functions are pure: ephemeral private keys and indices come from the caller (injected
randomness), and failures come back as a `DropReason`, never as an exception. Replay
(timestamp), flood and index bookkeeping belong to the tunnel layer, which owns the peer state.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from wrapguard.noise.crypto import (
    X25519PrivateKey,
    aead_decrypt,
    aead_encrypt,
    dh,
    hash_,
    kdf1,
    kdf2,
    kdf3,
    public_key,
)
from wrapguard.noise.reasons import DropReason
from wrapguard.wire.wgmsg import Initiation, Response

CONSTRUCTION: Final = b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s"  # [W 5.4]
IDENTIFIER: Final = b"WireGuard v1 zx2c4 Jason@zx2c4.com"  # [W 5.4]
INITIAL_CHAIN_KEY: Final = hash_(CONSTRUCTION)  # Ci = HASH(Construction)
INITIAL_HASH: Final = hash_(INITIAL_CHAIN_KEY, IDENTIFIER)  # Hi = HASH(Ci || Identifier)


def _public_bytes(private: X25519PrivateKey) -> bytes:
    return private.public_key().public_bytes_raw()


class LocalStatic:
    """Our static key pair, with the responder's initial transcript hash precomputed.

    The private key object for DH is made at the first handshake, not here: a tunnel that
    never handshakes needs no X25519 object (crypto.public_key says why that matters)."""

    __slots__ = ("_private", "_raw", "hash0", "public")

    def __init__(self, private_raw: bytes) -> None:
        self._raw = private_raw
        self._private: X25519PrivateKey | None = None
        self.public = public_key(private_raw)
        # [W 5.4.2] Hr = HASH(HASH(Ci || Identifier) || Spub_r) when we are the responder.
        self.hash0 = hash_(INITIAL_HASH, self.public)

    @property
    def private(self) -> X25519PrivateKey:
        if self._private is None:
            self._private = X25519PrivateKey.from_private_bytes(self._raw)
        return self._private


_NOT_YET: Final = b""  # RemoteStatic.ss not computed yet (a DH result is 32 bytes or None)


class RemoteStatic:
    """A peer's static public key and preshared key, with DH(Spriv_local, Spub_remote) cached.

    The static-static DH never changes, so it is computed once per peer (at its first
    handshake) instead of once per handshake; `ss` is None if the peer's key is a low-order
    point (every handshake then fails).
    """

    __slots__ = ("_local", "_ss", "hash0", "psk", "public")

    def __init__(self, local: LocalStatic, public: bytes, psk: bytes | None) -> None:
        self.public = public
        self.psk = psk if psk is not None else bytes(32)  # [W 5.2] Q = 0^32 when absent
        self._local = local
        self._ss: bytes | None = _NOT_YET
        # [W 5.4.2] Hi = HASH(HASH(Ci || Identifier) || Spub_r) when we are the initiator.
        self.hash0 = hash_(INITIAL_HASH, public)

    @property
    def ss(self) -> bytes | None:
        if self._ss is _NOT_YET:
            self._ss = dh(self._local.private, self.public)
        return self._ss


@dataclass(slots=True)
class InitiatorPending:
    """The initiator's state between sending an initiation and receiving the response."""

    local_index: int
    ephemeral: X25519PrivateKey
    chaining_key: bytes
    hash: bytes


@dataclass(slots=True)
class InitiationConsumed:
    """The responder's state after an authenticated initiation, before answering it."""

    remote: RemoteStatic
    remote_index: int
    remote_ephemeral: bytes
    timestamp: bytes
    chaining_key: bytes
    hash: bytes


@dataclass(frozen=True, slots=True)
class SessionKeys:
    """Transport keys derived at the end of a handshake [W 5.4.5]."""

    send_key: bytes
    recv_key: bytes
    local_index: int
    remote_index: int
    is_initiator: bool


def create_initiation(
    local: LocalStatic,
    remote: RemoteStatic,
    local_index: int,
    ephemeral_raw: bytes,
    timestamp: bytes,
) -> tuple[Initiation, InitiatorPending] | DropReason:
    """[W 5.4.2] Build the first message (mac1/mac2 left zero: cookie.py adds them)."""
    if remote.ss is None:
        return DropReason.HANDSHAKE_DECRYPT_FAILED
    e_priv = X25519PrivateKey.from_private_bytes(ephemeral_raw)
    e_pub = _public_bytes(e_priv)
    c = kdf1(INITIAL_CHAIN_KEY, e_pub)  # Ci = KDF1(Ci, Epub_i)
    h = hash_(remote.hash0, e_pub)  # Hi = HASH(Hi || msg.ephemeral)
    es = dh(e_priv, remote.public)
    if es is None:
        return DropReason.HANDSHAKE_DECRYPT_FAILED
    c, k = kdf2(c, es)  # (Ci, k) = KDF2(Ci, DH(Epriv_i, Spub_r))
    enc_static = aead_encrypt(k, local.public, h)
    h = hash_(h, enc_static)
    c, k = kdf2(c, remote.ss)  # (Ci, k) = KDF2(Ci, DH(Spriv_i, Spub_r))
    enc_ts = aead_encrypt(k, timestamp, h)
    h = hash_(h, enc_ts)
    msg = Initiation(local_index, e_pub, enc_static, enc_ts)
    return msg, InitiatorPending(local_index, e_priv, c, h)


def consume_initiation(
    local: LocalStatic,
    msg: Initiation,
    find_peer: Callable[[bytes], RemoteStatic | None],
) -> InitiationConsumed | DropReason:
    """[W 5.4.2] The responder's side: authenticate the initiator and read its timestamp."""
    c = kdf1(INITIAL_CHAIN_KEY, msg.ephemeral)
    h = hash_(local.hash0, msg.ephemeral)
    es = dh(local.private, msg.ephemeral)
    if es is None:
        return DropReason.HANDSHAKE_DECRYPT_FAILED
    c, k = kdf2(c, es)
    static = aead_decrypt(k, msg.encrypted_static, h)
    if static is None:
        return DropReason.HANDSHAKE_DECRYPT_FAILED
    remote = find_peer(static)
    if remote is None:
        return DropReason.UNKNOWN_PEER
    if remote.ss is None:
        return DropReason.HANDSHAKE_DECRYPT_FAILED
    h = hash_(h, msg.encrypted_static)
    c, k = kdf2(c, remote.ss)
    timestamp = aead_decrypt(k, msg.encrypted_timestamp, h)
    if timestamp is None:
        return DropReason.HANDSHAKE_DECRYPT_FAILED
    h = hash_(h, msg.encrypted_timestamp)
    return InitiationConsumed(remote, msg.sender, msg.ephemeral, timestamp, c, h)


def create_response(
    local: LocalStatic,
    consumed: InitiationConsumed,
    local_index: int,
    ephemeral_raw: bytes,
) -> tuple[Response, SessionKeys] | DropReason:
    """[W 5.4.3] Answer an authenticated initiation and derive the responder's keys."""
    e_priv = X25519PrivateKey.from_private_bytes(ephemeral_raw)
    e_pub = _public_bytes(e_priv)
    c = kdf1(consumed.chaining_key, e_pub)  # Cr = KDF1(Cr, Epub_r)
    h = hash_(consumed.hash, e_pub)
    ee = dh(e_priv, consumed.remote_ephemeral)
    se = dh(e_priv, consumed.remote.public)
    if ee is None or se is None:
        return DropReason.HANDSHAKE_DECRYPT_FAILED
    c = kdf1(c, ee)  # Cr = KDF1(Cr, DH(Epriv_r, Epub_i))
    c = kdf1(c, se)  # Cr = KDF1(Cr, DH(Epriv_r, Spub_i))
    c, tau, k = kdf3(c, consumed.remote.psk)  # (Cr, tau, k) = KDF3(Cr, Q)
    h = hash_(h, tau)
    empty = aead_encrypt(k, b"", h)
    # [W 5.4.5] (Trecv_r, Tsend_r) = KDF2(Cr, e); the final hash is not needed further.
    recv_key, send_key = kdf2(c, b"")
    msg = Response(local_index, consumed.remote_index, e_pub, empty)
    keys = SessionKeys(send_key, recv_key, local_index, consumed.remote_index, False)
    return msg, keys


def consume_response(
    local: LocalStatic,
    remote: RemoteStatic,
    pending: InitiatorPending,
    msg: Response,
) -> SessionKeys | DropReason:
    """[W 5.4.3] The initiator's side: authenticate the response and derive our keys."""
    c = kdf1(pending.chaining_key, msg.ephemeral)
    h = hash_(pending.hash, msg.ephemeral)
    ee = dh(pending.ephemeral, msg.ephemeral)
    se = dh(local.private, msg.ephemeral)
    if ee is None or se is None:
        return DropReason.HANDSHAKE_DECRYPT_FAILED
    c = kdf1(c, ee)
    c = kdf1(c, se)
    c, tau, k = kdf3(c, remote.psk)
    h = hash_(h, tau)
    if aead_decrypt(k, msg.encrypted_nothing, h) is None:
        return DropReason.HANDSHAKE_DECRYPT_FAILED
    send_key, recv_key = kdf2(c, b"")  # [W 5.4.5] (Tsend_i, Trecv_i) = KDF2(Ci, e)
    return SessionKeys(send_key, recv_key, pending.local_index, msg.sender, True)
