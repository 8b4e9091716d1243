"""Known-answer tests of the primitives under wrapguard.noise.crypto, from the RFCs."""

from __future__ import annotations

import hashlib
import hmac as std_hmac

import pytest
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from wrapguard.noise import crypto
from wrapguard.noise.crypto import X25519PrivateKey

SUNSCREEN = (
    b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for the "
    b"future, sunscreen would be it."
)
KEY_80 = bytes(range(0x80, 0xA0))
AAD = bytes.fromhex("50515253c0c1c2c3c4c5c6c7")


@pytest.mark.parametrize(
    ("scalar", "u", "out"),
    [
        # RFC 7748 5.2, first test vector
        (
            "a546e36bf0527c9d3b16154b82465edd62144c0ac1fc5a18506a2244ba449ac4",
            "e6db6867583030db3594c1a424b15f7c726624ec26b3353b10a903a6d0ab1c4c",
            "c3da55379de9c6908e94ea4df28d084f32eccf03491c71f754b4075577a28552",
        ),
        # RFC 7748 5.2, second test vector
        (
            "4b66e9d4d1b4673c5ad22691957d6af5c11b6421e0ea01d42ca4169e7918ba0d",
            "e5210f12786811d3f4b7959d0538ae2c31dbe7106fc03c3efc4cd549c715a493",
            "95cbde9476e8907d7aade45cb4b873f88b595a68799fa152e6f8f7647aac7957",
        ),
    ],
)
def test_x25519_rfc7748_5_2(scalar: str, u: str, out: str) -> None:
    priv = X25519PrivateKey.from_private_bytes(bytes.fromhex(scalar))
    assert crypto.dh(priv, bytes.fromhex(u)) == bytes.fromhex(out)


def test_x25519_rfc7748_6_1_diffie_hellman() -> None:
    # RFC 7748 6.1: Alice and Bob derive the same shared secret K.
    alice = X25519PrivateKey.from_private_bytes(
        bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
    )
    bob = X25519PrivateKey.from_private_bytes(
        bytes.fromhex("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb")
    )
    alice_pub = bytes.fromhex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
    bob_pub = bytes.fromhex("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")
    shared = bytes.fromhex("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742")
    assert alice.public_key().public_bytes_raw() == alice_pub
    assert crypto.dh(alice, bob_pub) == shared
    assert crypto.dh(bob, alice_pub) == shared


def test_public_key_rfc7748_6_1() -> None:
    # RFC 7748 6.1: Alice's and Bob's public keys, X25519(k, 9) (libsodium's, see public_key).
    alice = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
    bob = bytes.fromhex("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb")
    assert crypto.public_key(alice).hex() == (
        "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
    )
    assert crypto.public_key(bob).hex() == (
        "de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f"
    )


@pytest.mark.parametrize("seed", range(8))
def test_public_key_is_cryptography_s_for_any_scalar(seed: int) -> None:
    # Both libraries clamp k [RFC 7748 5]: unclamped bits (0xff everywhere) must not matter.
    raw = hashlib.blake2s(bytes([seed])).digest() if seed else b"\xff" * 32
    want = X25519PrivateKey.from_private_bytes(raw).public_key().public_bytes_raw()
    assert crypto.public_key(raw) == want


def test_x25519_low_order_point_gives_none() -> None:
    # RFC 7748 6.1: an all-zero output must be detected; u = 0 is a low-order point.
    assert crypto.dh(X25519PrivateKey.generate(), bytes(32)) is None


def test_blake2s_rfc7693_appendix_b() -> None:
    # RFC 7693 Appendix B: BLAKE2s-256("abc")
    assert crypto.hash_(b"abc") == bytes.fromhex(
        "508c5e8c327c14e2e1a72ba34eeb452f37458b209ed63a294d999b4c86675982"
    )
    assert crypto.hash_(b"a", b"bc") == crypto.hash_(b"abc")


def test_chacha20poly1305_rfc8439_2_8_2() -> None:
    # RFC 8439 2.8.2: AEAD_CHACHA20_POLY1305 example; nonce = constant 07000000 || IV.
    nonce = bytes.fromhex("070000004041424344454647")
    expected_ct = bytes.fromhex(
        "d31a8d34648e60db7b86afbc53ef7ec2a4aded51296e08fea9e2b5a736ee62d6"
        "3dbea45e8ca9671282fafb69da92728b1a71de0a9e060b2905d6a5b67ecd3b36"
        "92ddbd7f2d778b8c9803aee328091b58fab324e4fad675945585808b4831d7bc"
        "3ff4def08e4b7a9de576d26586cec64b6116"
    )
    tag = bytes.fromhex("1ae10b594f09e26a7e902ecbd0600691")
    sealed = ChaCha20Poly1305(KEY_80).encrypt(nonce, SUNSCREEN, AAD)
    assert sealed == expected_ct + tag


def test_xchacha20poly1305_draft_a_3_1() -> None:
    # draft-irtf-cfrg-xchacha-03 A.3.1: AEAD_XChaCha20_Poly1305 example.
    nonce = bytes(range(0x40, 0x58))
    expected = bytes.fromhex(
        "bd6d179d3e83d43b9576579493c0e939572a1700252bfaccbed2902c21396cbb"
        "731c7f1b0b4aa6440bf3a82f4eda7e39ae64c6708c54c216cb96b72e1213b452"
        "2f8c9ba40db5d945b11b69b982c1bb9e3f3fac2bc369488f76b2383565d3fff9"
        "21f9664c97637da9768812f615c68b13b52e"
        "c0875924c1c7987947deafd8780acf49"
    )
    assert crypto.xaead_encrypt(KEY_80, nonce, SUNSCREEN, AAD) == expected
    assert crypto.xaead_decrypt(KEY_80, nonce, expected, AAD) == SUNSCREEN
    assert crypto.xaead_decrypt(KEY_80, nonce, expected[:-1] + b"\0", AAD) is None


@pytest.mark.parametrize("key_len", [0, 16, 32, 64])
@pytest.mark.parametrize("msg", [b"", b"\x01", b"x" * 200])
def test_hmac_blake2s_matches_stdlib(key_len: int, msg: bytes) -> None:
    # [W 5.4] HMAC is RFC 2104 over BLAKE2s; the hand-rolled one must equal hmac.new.
    key = bytes(range(key_len))
    assert crypto.hmac(key, msg) == std_hmac.new(key, msg, hashlib.blake2s).digest()


def test_kdf_chain_definition() -> None:
    # [W 5.4] tau0 = HMAC(key, input); tau1 = HMAC(tau0, 0x1); tau_i = HMAC(tau0, tau_{i-1}||i)
    key, data = b"k" * 32, b"input"
    t0 = std_hmac.new(key, data, hashlib.blake2s).digest()
    t1 = std_hmac.new(t0, b"\x01", hashlib.blake2s).digest()
    t2 = std_hmac.new(t0, t1 + b"\x02", hashlib.blake2s).digest()
    t3 = std_hmac.new(t0, t2 + b"\x03", hashlib.blake2s).digest()
    assert crypto.kdf1(key, data) == t1
    assert crypto.kdf2(key, data) == (t1, t2)
    assert crypto.kdf3(key, data) == (t1, t2, t3)


def test_mac_is_keyed_blake2s_16() -> None:
    expected = hashlib.blake2s(b"m", key=b"k" * 32, digest_size=16).digest()
    assert crypto.mac(b"k" * 32, b"m") == expected


def test_tai64n_layout_and_order() -> None:
    # [W 5.1] 12 bytes: TAI64 label (2^62 + 10 + secs) big-endian, then nanoseconds.
    ts = crypto.tai64n(1_700_000_000.5)
    assert len(ts) == 12
    assert int.from_bytes(ts[:8], "big") == (1 << 62) + 10 + 1_700_000_000
    nanos = int.from_bytes(ts[8:], "big")
    assert 500_000_000 - (1 << 24) < nanos <= 500_000_000
    assert crypto.tai64n(1_700_000_001.0) > ts > crypto.tai64n(1_700_000_000.0)
