"""Internet checksum (RFC 1071) and the TCP/UDP/ICMPv6 pseudo-header sums.

`csum_partial` is the one's complement sum of big-endian 16-bit words, folded to 16 bits
(0 only for an all-zero input). It uses the cffi helper `wg_csum_partial` when built and a
pure-Python fallback otherwise (`int.from_bytes(...) % 0xFFFF`, since 2**16 == 1 mod 0xFFFF).
Pseudo-headers: RFC 9293 3.1 (IPv4), RFC 8200 8.1 (IPv6).
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = [
    "HAVE_FASTPATH",
    "checksum",
    "csum_bytes",
    "csum_partial",
    "csum_partial_py",
    "finish",
    "pseudo_header_sum",
]


def csum_partial_py(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
    """Pure-Python one's complement sum of `data` plus `initial`, folded to 16 bits."""
    n = len(data)
    total = int.from_bytes(data, "big")
    if n & 1:
        # An odd trailing byte is the high byte of a zero-padded word (RFC 1071 4.1).
        total <<= 8
    total += initial
    if total == 0:
        return 0
    return (total - 1) % 0xFFFF + 1


try:
    from wrapguard._fastpath import lib as _lib  # type: ignore[import-not-found]

    _c_csum = _lib.wg_csum_partial

    def _csum_fast(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
        if initial > 0xFFFFFFFF:
            initial = (initial - 1) % 0xFFFF + 1
        if isinstance(data, memoryview):
            data = data.tobytes()
        return int(_c_csum(data, len(data), initial))

    HAVE_FASTPATH = True
    csum_partial: Callable[..., int] = _csum_fast

    def csum_bytes(data: bytes, initial: int) -> int:
        """`csum_partial` for a bytes object and an initial sum below 2**32 (hot path)."""
        return int(_c_csum(data, len(data), initial))

except ImportError:  # pragma: no cover - the extension is built in CI
    HAVE_FASTPATH = False
    csum_partial = csum_partial_py
    csum_bytes = csum_partial_py


def finish(total: int) -> int:
    """Fold `total` and complement it: the value written into a checksum field."""
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def checksum(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
    """The checksum field value for `data` (with a zeroed checksum field) plus `initial`."""
    return finish(csum_partial(data, initial))


def pseudo_header_sum(src: bytes, dst: bytes, proto: int, length: int) -> int:
    """Unfolded sum of the pseudo-header: addresses, protocol and upper-layer length.

    RFC 9293 3.1 for IPv4 (4-byte addresses), RFC 8200 8.1 for IPv6 (16-byte addresses).
    """
    return int.from_bytes(src + dst, "big") % 0xFFFF + proto + length
