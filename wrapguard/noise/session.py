"""Transport keypairs: sealing, opening and the sliding replay window [W 5.4.6].

A `Keypair` holds one ChaCha20-Poly1305 object per direction (built once per keypair, never per
packet), the 64-bit send counter, and a receive window of `REPLAY_WINDOW` bits kept as a Python
int (bit i set = counter top-i seen; RFC 6479 semantics). The window is checked before
decryption and updated only after the AEAD authenticated the packet, so forged packets change
nothing. Time-based expiry is the tunnel layer's job; counter limits are checked here.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any, Final

from wrapguard.noise.crypto import ChaCha20Poly1305, InvalidTag
from wrapguard.noise.handshake import SessionKeys

REKEY_AFTER_MESSAGES: Final = 1 << 60  # [W 6.1]
REJECT_AFTER_MESSAGES: Final = (1 << 64) - (1 << 13) - 1  # [W 6.1]
REPLAY_WINDOW: Final = 2048  # bits; [W 5.4.6] "a sliding window", RFC 6479
_WINDOW_MASK: Final = (1 << REPLAY_WINDOW) - 1
_NONCE_PREFIX: Final = bytes(4)  # [W 5.4.6] 32 zero bits then the 64-bit LE counter
_PREFIX = struct.Struct("<II")
_NONCE = struct.Struct("<4xQ")  # [W 5.4.6] 32 zero bits, then the 64-bit LE counter
_PADS: Final = tuple(bytes(n) for n in range(16))

try:
    from wrapguard._fastpath import ffi as _ffi  # type: ignore[import-not-found]
    from wrapguard._fastpath import lib as _lib

    HAVE_SEAL_BATCH = hasattr(_lib, "wg_seal_batch")
except ImportError:  # not built: seal_batch seals one packet at a time in Python
    HAVE_SEAL_BATCH = False


class _Scratch:
    """The C sealer's output buffer, grown as needed and reused (one event loop thread)."""

    buf: Any = None
    size = 0
    lens: Any = None

    @classmethod
    def get(cls, size: int, n: int) -> tuple[Any, Any]:
        if size > cls.size:
            cls.size = max(size, 1 << 17)
            cls.buf = _ffi.new("uint8_t[]", cls.size)
        if cls.lens is None or n > len(cls.lens):
            cls.lens = _ffi.new("uint32_t[]", max(n, 64))
        return cls.buf, cls.lens


class Keypair:
    """One direction pair of transport keys with counters; mutable, owned by one peer."""

    __slots__ = (
        "_bitmap",
        "_open",
        "_prefix",
        "_seal",
        "_send_key",
        "_top",
        "created",
        "is_initiator",
        "local_index",
        "reject_after_messages",
        "remote_index",
        "send_counter",
    )

    def __init__(
        self,
        keys: SessionKeys,
        created: float,
        reject_after_messages: int = REJECT_AFTER_MESSAGES,
    ) -> None:
        self._seal = ChaCha20Poly1305(keys.send_key)
        self._send_key = keys.send_key
        self._open = ChaCha20Poly1305(keys.recv_key)
        self.local_index = keys.local_index
        self.remote_index = keys.remote_index
        self.is_initiator = keys.is_initiator
        self.created = created
        self.reject_after_messages = reject_after_messages
        self.send_counter = 0
        self._prefix = _PREFIX.pack(4, keys.remote_index)  # type 4, reserved, receiver
        self._top = -1  # highest counter accepted so far
        self._bitmap = 0

    def seal(self, packet: bytes, mtu: int) -> bytes | None:
        """Encrypt one IP packet (or b"" for a keepalive) into a transport message.

        Pads to a multiple of 16 without exceeding `mtu` [W 5.4.6]. None when the counter is
        exhausted (Reject-After-Messages); the caller must then rekey.
        """
        counter = self.send_counter
        if counter >= self.reject_after_messages:
            return None
        self.send_counter = counter + 1
        n = len(packet)
        pad = -n % 16
        if pad:
            if n + pad > mtu:
                pad = max(mtu - n, 0)
            packet += _PADS[pad]
        ctr = counter.to_bytes(8, "little")
        return self._prefix + ctr + self._seal.encrypt(_NONCE_PREFIX + ctr, packet, None)

    def seal_batch(
        self, packets: Sequence[bytes], mtu: int, fast: bool = HAVE_SEAL_BATCH
    ) -> tuple[bytes, list[int]]:
        """`seal` for each packet, the transport messages back to back, and their lengths.

        The caller checks first that len(packets) counters remain (Reject-After-Messages).
        With the cffi helper the packets are sealed by libcrypto from C, one call for all;
        `fast=False` is the pure-Python path (tests compare the two).
        """
        n = len(packets)
        counter = self.send_counter
        if counter + n > self.reject_after_messages:
            raise ValueError("not enough counters left: rekey first")
        if not fast or n < 2:
            sealed = [self._seal_one(p, mtu) for p in packets]
            return b"".join(sealed), [len(m) for m in sealed]
        lens = [len(p) for p in packets]
        src = b"".join(packets)
        dst, dlens = _Scratch.get(len(src) + 47 * n, n)
        slens = _ffi.new("uint32_t[]", lens)
        if _lib.wg_seal_batch(
            self._send_key, self.remote_index, counter, src, slens, n, mtu, dst, dlens
        ):
            raise RuntimeError("libcrypto failed to seal")  # local failure: never remote input
        self.send_counter = counter + n
        out = list(dlens[0:n])
        return _ffi.buffer(dst, sum(out))[:], out

    def _seal_one(self, packet: bytes, mtu: int) -> bytes:
        wire = self.seal(packet, mtu)
        assert wire is not None  # the caller checked the counters
        return wire

    def check_counter(self, counter: int) -> bool:
        """True when `counter` is neither exhausted, replayed, nor behind the window."""
        if counter >= self.reject_after_messages:
            return False
        top = self._top
        if counter > top:
            return True
        d = top - counter
        return d < REPLAY_WINDOW and not (self._bitmap >> d) & 1

    def open(self, data: bytes | memoryview, counter: int) -> bytes | None:
        """Decrypt a whole transport message (header included) whose header carries `counter`;
        None if it fails to open. `counter` must have passed `check_counter`; on success the
        window is updated.
        """
        try:
            plain = self._open.decrypt(_NONCE.pack(counter), data[16:], None)
        except InvalidTag:
            return None
        top = self._top
        if counter > top:
            shift = counter - top
            if shift < REPLAY_WINDOW:
                self._bitmap = ((self._bitmap << shift) | 1) & _WINDOW_MASK
            else:
                self._bitmap = 1
            self._top = counter
        else:
            self._bitmap |= 1 << (top - counter)
        return plain
