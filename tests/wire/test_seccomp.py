"""wire/seccomp.py: the user-notification structures and socket addresses (no root)."""

from __future__ import annotations

import errno
import socket
import struct
from ipaddress import IPv4Address, IPv6Address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wrapguard.errors import DecodeError
from wrapguard.wire import seccomp as sc


def test_ioctl_numbers_are_the_kernels() -> None:
    # include/uapi/linux/seccomp.h, as the kernel computes them on x86_64 and aarch64
    assert sc.IOCTL_NOTIF_RECV == 0xC0502100
    assert sc.IOCTL_NOTIF_SEND == 0xC0182101
    assert sc.IOCTL_NOTIF_ID_VALID == 0x40082102
    assert sc.IOCTL_NOTIF_ADDFD == 0x40182103


@given(
    st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1), st.integers(-(2**31), 2**31 - 1),
    st.lists(st.integers(0, 2**64 - 1), min_size=6, max_size=6),
)  # fmt: skip
def test_notification_round_trip(nid: int, pid: int, nr: int, args: list[int]) -> None:
    n = sc.Notification(nid, pid, 0, nr, 0xC000003E, 0x401000, tuple(args))  # type: ignore[arg-type]
    raw = sc.emit_notification(n)
    assert len(raw) == sc.NOTIF_SIZE
    assert sc.parse_notification(raw) == n


def test_notification_layout() -> None:
    raw = bytearray(sc.NOTIF_SIZE)
    struct.pack_into("<QIIiI", raw, 0, 7, 1234, 0, 42, 0xC000003E)
    struct.pack_into("<Q", raw, 24, 0xDEAD)  # instruction_pointer
    struct.pack_into("<6Q", raw, 32, 3, 0x7FFF0000, 16, 0, 0, 0)
    n = sc.parse_notification(bytes(raw))
    assert (n.id, n.pid, n.nr, n.ip) == (7, 1234, 42, 0xDEAD)
    assert n.args[:3] == (3, 0x7FFF0000, 16)


def test_short_notification_is_an_error() -> None:
    with pytest.raises(DecodeError):
        sc.parse_notification(bytes(79))


def test_response_carries_a_negated_errno_and_flags() -> None:
    raw = sc.emit_response(9, error=errno.ECONNREFUSED)
    assert len(raw) == sc.RESP_SIZE
    assert sc.parse_response(raw) == (9, 0, -errno.ECONNREFUSED, 0)
    assert sc.parse_response(sc.emit_response(9, flags=sc.FLAG_CONTINUE)) == (9, 0, 0, 1)
    assert sc.parse_response(sc.emit_response(9, val=5)) == (9, 5, 0, 0)


def test_addfd_layout() -> None:
    raw = sc.emit_addfd(3, 11)
    assert struct.unpack("<QIIII", raw) == (3, sc.ADDFD_FLAG_SEND, 11, 0, 0)


def test_sockaddr_matches_the_kernels_layout() -> None:
    a4 = sc.emit_sockaddr(sc.AF_INET, IPv4Address("10.150.0.1"), 8080)
    assert len(a4) == 16
    assert socket.inet_ntoa(a4[4:8]) == "10.150.0.1" and a4[2:4] == b"\x1f\x90"
    assert sc.parse_sockaddr(a4) == (sc.AF_INET, IPv4Address("10.150.0.1"), 8080)
    a6 = sc.emit_sockaddr(sc.AF_INET6, IPv6Address("fd15::1"), 53)
    assert len(a6) == 28
    assert sc.parse_sockaddr(a6) == (sc.AF_INET6, IPv6Address("fd15::1"), 53)


def test_an_ipv4_address_on_an_ipv6_socket_is_v4_mapped() -> None:
    raw = sc.emit_sockaddr(sc.AF_INET6, IPv4Address("10.150.0.2"), 1)
    assert sc.parse_sockaddr(raw)[1] == IPv6Address("::ffff:10.150.0.2")
    with pytest.raises(ValueError):
        sc.emit_sockaddr(sc.AF_INET, IPv6Address("fd15::2"), 1)


def test_other_families_and_short_addresses() -> None:
    assert sc.parse_sockaddr(struct.pack("<H", socket.AF_UNIX) + b"/x") == (socket.AF_UNIX, None, 0)
    assert sc.parse_sockaddr(struct.pack("<H", 0) + bytes(14))[1] is None  # AF_UNSPEC
    for raw in (b"\x02", struct.pack("<H", 2) + bytes(3), struct.pack("<H", 10) + bytes(10)):
        with pytest.raises(DecodeError):
            sc.parse_sockaddr(raw)
