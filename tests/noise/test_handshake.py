"""Noise_IKpsk2 handshake [W 5.4.2-5.4.5]: a known-answer check computed independently here,
determinism under fixed randomness, both roles agreeing, and every failure path."""

from __future__ import annotations

import hashlib
import hmac as std_hmac

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from wrapguard.noise.handshake import (
    InitiationConsumed,
    LocalStatic,
    RemoteStatic,
    consume_initiation,
    consume_response,
    create_initiation,
    create_response,
)
from wrapguard.noise.reasons import DropReason
from wrapguard.wire.wgmsg import Initiation, Response

I_PRIV = bytes(range(1, 33))
R_PRIV = bytes(range(101, 133))
E_I = bytes([7]) * 32
E_R = bytes([9]) * 32
PSK = bytes([0x55]) * 32
TS = bytes.fromhex("400000006553f1000000beef")


# -- an independent reference of [W 5.4], written from the paper with stdlib hmac ------------
def H(*parts: bytes) -> bytes:
    return hashlib.blake2s(b"".join(parts)).digest()


def HM(key: bytes, data: bytes) -> bytes:
    return std_hmac.new(key, data, hashlib.blake2s).digest()


def KDF(n: int, key: bytes, data: bytes) -> list[bytes]:
    t0 = HM(key, data)
    out, prev = [], b""
    for i in range(1, n + 1):
        prev = HM(t0, prev + bytes([i]))
        out.append(prev)
    return out


def DH(priv: bytes, pub: bytes) -> bytes:
    peer = X25519PublicKey.from_public_bytes(pub)
    return X25519PrivateKey.from_private_bytes(priv).exchange(peer)


def PUB(priv: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(priv).public_key().public_bytes_raw()


def AEAD(key: bytes, plain: bytes, ad: bytes) -> bytes:
    return ChaCha20Poly1305(key).encrypt(bytes(12), plain, ad)


def reference_handshake(psk: bytes) -> dict[str, bytes]:
    c = H(b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s")
    h = H(c, b"WireGuard v1 zx2c4 Jason@zx2c4.com")
    h = H(h, PUB(R_PRIV))
    e_pub = PUB(E_I)
    (c,) = KDF(1, c, e_pub)
    h = H(h, e_pub)
    c, k = KDF(2, c, DH(E_I, PUB(R_PRIV)))
    static = AEAD(k, PUB(I_PRIV), h)
    h = H(h, static)
    c, k = KDF(2, c, DH(I_PRIV, PUB(R_PRIV)))
    ts = AEAD(k, TS, h)
    h = H(h, ts)
    ref = {"e_i": e_pub, "static": static, "ts": ts, "c_init": c, "h_init": h}
    er_pub = PUB(E_R)
    (c,) = KDF(1, c, er_pub)
    h = H(h, er_pub)
    (c,) = KDF(1, c, DH(E_R, e_pub))
    (c,) = KDF(1, c, DH(E_R, PUB(I_PRIV)))
    c, tau, k = KDF(3, c, psk)
    h = H(h, tau)
    ref["empty"] = AEAD(k, b"", h)
    ref["t_i_send"], ref["t_i_recv"] = KDF(2, c, b"")
    return ref


def setup(psk: bytes | None = None) -> tuple[LocalStatic, RemoteStatic, LocalStatic, RemoteStatic]:
    li, lr = LocalStatic(I_PRIV), LocalStatic(R_PRIV)
    return li, RemoteStatic(li, lr.public, psk), lr, RemoteStatic(lr, li.public, psk)


def full(psk: bytes | None) -> tuple[Initiation, Response, object, object]:
    li, ri, lr, rr = setup(psk)
    made = create_initiation(li, ri, 0x11111111, E_I, TS)
    assert not isinstance(made, DropReason)
    init, pending = made
    consumed = consume_initiation(lr, init, lambda pub: rr if pub == rr.public else None)
    assert isinstance(consumed, InitiationConsumed)
    assert consumed.timestamp == TS and consumed.remote_index == 0x11111111
    resp_made = create_response(lr, consumed, 0x22222222, E_R)
    assert not isinstance(resp_made, DropReason)
    resp, keys_r = resp_made
    keys_i = consume_response(li, ri, pending, resp)
    return init, resp, keys_i, keys_r


@pytest.mark.parametrize("psk", [None, PSK])
def test_known_answer_against_independent_reference(psk: bytes | None) -> None:
    ref = reference_handshake(psk if psk is not None else bytes(32))
    li, ri, _, _ = setup(psk)
    made = create_initiation(li, ri, 1, E_I, TS)
    assert not isinstance(made, DropReason)
    init, pending = made
    assert init.ephemeral == ref["e_i"]
    assert init.encrypted_static == ref["static"]
    assert init.encrypted_timestamp == ref["ts"]
    assert pending.chaining_key == ref["c_init"]
    assert pending.hash == ref["h_init"]
    _, resp, keys_i, _ = full(psk)
    assert resp.encrypted_nothing == ref["empty"]
    assert resp.ephemeral == PUB(E_R)
    assert not isinstance(keys_i, DropReason)
    assert keys_i.send_key == ref["t_i_send"] and keys_i.recv_key == ref["t_i_recv"]


@pytest.mark.parametrize("psk", [None, PSK])
def test_both_roles_derive_mirrored_keys(psk: bytes | None) -> None:
    _, resp, keys_i, keys_r = full(psk)
    assert not isinstance(keys_i, DropReason) and not isinstance(keys_r, DropReason)
    assert keys_i.send_key == keys_r.recv_key  # type: ignore[attr-defined]
    assert keys_i.recv_key == keys_r.send_key  # type: ignore[attr-defined]
    assert keys_i.is_initiator and not keys_r.is_initiator  # type: ignore[attr-defined]
    assert keys_i.local_index == 0x11111111 and keys_i.remote_index == 0x22222222
    assert resp.receiver == 0x11111111 and resp.sender == 0x22222222


def test_deterministic_under_fixed_inputs() -> None:
    a, b = full(PSK), full(PSK)
    assert a[0] == b[0] and a[1] == b[1] and a[2] == b[2]


def test_psk_mismatch_fails_response() -> None:
    li = LocalStatic(I_PRIV)
    lr = LocalStatic(R_PRIV)
    ri = RemoteStatic(li, lr.public, PSK)
    rr = RemoteStatic(lr, li.public, None)
    made = create_initiation(li, ri, 1, E_I, TS)
    assert not isinstance(made, DropReason)
    init, pending = made
    consumed = consume_initiation(lr, init, lambda pub: rr)
    assert isinstance(consumed, InitiationConsumed)  # the psk only enters the second message
    resp_made = create_response(lr, consumed, 2, E_R)
    assert not isinstance(resp_made, DropReason)
    assert consume_response(li, ri, pending, resp_made[0]) is DropReason.HANDSHAKE_DECRYPT_FAILED


def test_initiation_to_wrong_responder_fails() -> None:
    li, ri, _, _ = setup()
    other = LocalStatic(bytes([3]) * 32)
    made = create_initiation(li, ri, 1, E_I, TS)
    assert not isinstance(made, DropReason)
    got = consume_initiation(other, made[0], lambda pub: None)
    assert got is DropReason.HANDSHAKE_DECRYPT_FAILED


def test_unknown_initiator_is_reported() -> None:
    li, ri, lr, _ = setup()
    made = create_initiation(li, ri, 1, E_I, TS)
    assert not isinstance(made, DropReason)
    assert consume_initiation(lr, made[0], lambda pub: None) is DropReason.UNKNOWN_PEER


def test_tampered_timestamp_fails() -> None:
    li, ri, lr, rr = setup()
    made = create_initiation(li, ri, 1, E_I, TS)
    assert not isinstance(made, DropReason)
    init = made[0]
    bad = Initiation(
        init.sender,
        init.ephemeral,
        init.encrypted_static,
        bytes([init.encrypted_timestamp[0] ^ 1]) + init.encrypted_timestamp[1:],
    )
    assert consume_initiation(lr, bad, lambda pub: rr) is DropReason.HANDSHAKE_DECRYPT_FAILED


def test_low_order_keys_are_refused() -> None:
    li = LocalStatic(I_PRIV)
    bad_peer = RemoteStatic(li, bytes(32), None)
    assert bad_peer.ss is None
    assert create_initiation(li, bad_peer, 1, E_I, TS) is DropReason.HANDSHAKE_DECRYPT_FAILED
    lr = LocalStatic(R_PRIV)
    init = Initiation(1, bytes(32), bytes(48), bytes(28))  # ephemeral u = 0
    assert consume_initiation(lr, init, lambda pub: None) is DropReason.HANDSHAKE_DECRYPT_FAILED
