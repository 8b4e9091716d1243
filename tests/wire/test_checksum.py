"""Internet checksum: RFC 1071 vectors, a captured header, fast path == fallback."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from wrapguard.wire.checksum import (
    HAVE_FASTPATH,
    checksum,
    csum_partial,
    csum_partial_py,
    finish,
    pseudo_header_sum,
)

# A real IPv4 header (TCP, 172.22.104.109 -> 74.125.159.103) whose checksum is 0x4eb6.
IPV4_HDR = bytes.fromhex("45000034eda5400040060000ac16686d4a7d9f67")


def words_sum(data: bytes, initial: int = 0) -> int:
    """RFC 1071 4.1, literally: add 16-bit words, fold the carries."""
    if len(data) % 2:
        data += b"\0"
    total = initial
    for i in range(0, len(data), 2):
        total += (data[i] << 8) | data[i + 1]
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def test_fastpath_is_built():
    assert HAVE_FASTPATH


def test_rfc1071_example():
    # RFC 1071 3: bytes 00 01 f2 03 f4 f5 f6 f7 sum to 0xddf2.
    data = bytes.fromhex("0001f203f4f5f6f7")
    assert csum_partial(data) == csum_partial_py(data) == 0xDDF2
    assert checksum(data) == 0x220D


def test_ipv4_header_vector():
    assert len(IPV4_HDR) == 20
    assert checksum(IPV4_HDR) == 0x4EB6
    with_csum = IPV4_HDR[:10] + b"\x4e\xb6" + IPV4_HDR[12:]
    assert csum_partial(with_csum) == 0xFFFF  # a receiver's check


def test_tcp_segment_vector():
    # The TCP segment that followed IPV4_HDR on the wire (ACK with timestamps): 0x37a6.
    seg = bytes.fromhex("af1f0050e8338b62fc13da668010005c000000000101080a04b866f74add9045")
    src, dst = bytes.fromhex("ac16686d"), bytes.fromhex("4a7d9f67")
    assert finish(csum_partial(seg, pseudo_header_sum(src, dst, 6, len(seg)))) == 0x37A6


def test_empty_and_zero():
    assert csum_partial(b"") == csum_partial_py(b"") == 0
    assert csum_partial(b"\0\0\0") == csum_partial_py(b"\0\0\0") == 0
    assert csum_partial(b"\xff\xff") == csum_partial_py(b"\xff\xff") == 0xFFFF


@given(st.binary(max_size=3000), st.integers(0, 0xFFFFFFFF))
def test_fast_equals_fallback_equals_reference(data, initial):
    fast = csum_partial(data, initial)
    assert fast == csum_partial_py(data, initial)
    ref = words_sum(data, initial)
    assert fast == ref or (fast, ref) == (0xFFFF, 0) or (fast, ref) == (0, 0xFFFF)
    assert 0 <= fast <= 0xFFFF


@given(st.binary(min_size=2, max_size=200).filter(lambda b: len(b) % 2 == 0))
def test_checksum_verifies(data):
    c = checksum(data)
    assert csum_partial(data + c.to_bytes(2, "big")) == 0xFFFF
