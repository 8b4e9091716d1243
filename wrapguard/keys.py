"""WireGuard keys: Curve25519 private/public keys and preshared keys.

Keys are 32 bytes, written in configs as standard base64 (44 characters). Every key type
has a redacted repr and str so that no secret can end up in a log line or a traceback by
accident; only `PublicKey` prints (abbreviated), as `wg show` does.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

from nacl.bindings import crypto_scalarmult_base

KEY_LEN = 32


class KeyFormatError(ValueError):
    """The text is not a base64 encoding of 32 bytes."""


def decode_key(text: str) -> bytes:
    """Decode a base64 WireGuard key, raising KeyFormatError with a user-readable reason."""
    text = text.strip()
    if len(text) != 44 or not text.endswith("="):
        raise KeyFormatError("must be 44 characters of base64 encoding 32 bytes")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise KeyFormatError("is not valid base64") from None
    if len(raw) != KEY_LEN:
        raise KeyFormatError("must decode to 32 bytes")
    return raw


@dataclass(frozen=True, slots=True)
class PublicKey:
    raw: bytes

    def __post_init__(self) -> None:
        if len(self.raw) != KEY_LEN:
            raise KeyFormatError("public key must be 32 bytes")

    @classmethod
    def from_base64(cls, text: str) -> PublicKey:
        return cls(decode_key(text))

    def to_base64(self) -> str:
        return base64.b64encode(self.raw).decode()

    def short(self) -> str:
        """An abbreviation fit for logs: the first 8 base64 characters."""
        return self.to_base64()[:8] + "…"

    def __repr__(self) -> str:
        return f"PublicKey({self.short()})"

    __str__ = __repr__


@dataclass(frozen=True, slots=True)
class PrivateKey:
    raw: bytes

    def __post_init__(self) -> None:
        if len(self.raw) != KEY_LEN:
            raise KeyFormatError("private key must be 32 bytes")

    @classmethod
    def from_base64(cls, text: str) -> PrivateKey:
        return cls(decode_key(text))

    @classmethod
    def generate(cls) -> PrivateKey:
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

        return cls(X25519PrivateKey.generate().private_bytes_raw())

    def public_key(self) -> PublicKey:
        # X25519(k, 9) [RFC 7748 6.1] by libsodium, which clamps k as cryptography does:
        # cryptography's X25519PrivateKey.from_private_bytes() imports its OpenSSL backend
        # (~4 ms), which a run that never handshakes (`-- true`, bench row 5) does not need.
        return PublicKey(crypto_scalarmult_base(self.raw))

    def to_base64(self) -> str:
        """Only for writing a config file the user asked for (demo); never for logs."""
        return base64.b64encode(self.raw).decode()

    def __repr__(self) -> str:
        return "PrivateKey(<redacted>)"

    __str__ = __repr__


@dataclass(frozen=True, slots=True)
class PresharedKey:
    raw: bytes

    def __post_init__(self) -> None:
        if len(self.raw) != KEY_LEN:
            raise KeyFormatError("preshared key must be 32 bytes")

    @classmethod
    def from_base64(cls, text: str) -> PresharedKey:
        return cls(decode_key(text))

    @classmethod
    def zero(cls) -> PresharedKey:
        return cls(bytes(KEY_LEN))

    def __repr__(self) -> str:
        return "PresharedKey(<redacted>)"

    __str__ = __repr__
