"""The seccomp user-notification structures and the socket addresses the door reads and
writes in a program's memory (docs/seccomp.md). Sans-IO: bytes in, frozen values out.

Layouts (include/uapi/linux/seccomp.h, Linux >= 5.9):
- `struct seccomp_notif` (80 bytes): u64 id, u32 pid, u32 flags, then `struct seccomp_data`:
  s32 nr, u32 arch, u64 instruction_pointer, u64 args[6].
- `struct seccomp_notif_resp` (24 bytes): u64 id, s64 val, s32 error, u32 flags.
- `struct seccomp_notif_addfd` (24 bytes): u64 id, u32 flags, u32 srcfd, u32 newfd,
  u32 newfd_flags.
The ioctl numbers are `_IOWR('!', 0, notif)`, `_IOWR('!', 1, resp)`, `_IOW('!', 2, u64)`,
`_IOW('!', 3, addfd)` as the kernel defines them for these sizes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

from wrapguard.errors import DecodeError

NOTIF_SIZE = 80
RESP_SIZE = 24
ADDFD_SIZE = 24
_NOTIF = struct.Struct("<QIIiIQ6Q")
_RESP = struct.Struct("<QqiI")
_ADDFD = struct.Struct("<QIIII")


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (ord("!") << 8) | nr


_WRITE, _READ = 1, 2
IOCTL_NOTIF_RECV = _ioc(_READ | _WRITE, 0, NOTIF_SIZE)
IOCTL_NOTIF_SEND = _ioc(_READ | _WRITE, 1, RESP_SIZE)
IOCTL_NOTIF_ID_VALID = _ioc(_WRITE, 2, 8)
IOCTL_NOTIF_ADDFD = _ioc(_WRITE, 3, ADDFD_SIZE)

FLAG_CONTINUE = 1  # SECCOMP_USER_NOTIF_FLAG_CONTINUE: let the call run as asked
ADDFD_FLAG_SETFD = 1
ADDFD_FLAG_SEND = 2  # install the fd and answer the call with its number, atomically

AF_INET, AF_INET6 = 2, 10
SOCKADDR_IN_LEN, SOCKADDR_IN6_LEN = 16, 28

IPAddress = IPv4Address | IPv6Address


@dataclass(frozen=True, slots=True)
class Notification:
    id: int
    pid: int  # the calling thread, in the launcher's pid namespace
    flags: int
    nr: int  # the system call number
    arch: int
    ip: int
    args: tuple[int, int, int, int, int, int]


def parse_notification(data: bytes) -> Notification:
    if len(data) < NOTIF_SIZE:
        raise DecodeError(f"seccomp notification: {len(data)} bytes, want {NOTIF_SIZE}")
    f = _NOTIF.unpack_from(data)
    args = (f[6], f[7], f[8], f[9], f[10], f[11])
    return Notification(f[0], f[1], f[2], f[3], f[4], f[5], args)


def emit_notification(n: Notification) -> bytes:
    """The kernel's side (for tests)."""
    return _NOTIF.pack(n.id, n.pid, n.flags, n.nr, n.arch, n.ip, *n.args)


def emit_response(notif_id: int, val: int = 0, error: int = 0, flags: int = 0) -> bytes:
    """`error` is a positive errno (the kernel wants it negated); `val` the call's result."""
    return _RESP.pack(notif_id, val, -error if error > 0 else error, flags)


def parse_response(data: bytes) -> tuple[int, int, int, int]:
    if len(data) < RESP_SIZE:
        raise DecodeError(f"seccomp response: {len(data)} bytes, want {RESP_SIZE}")
    v = _RESP.unpack_from(data)
    return v[0], v[1], v[2], v[3]


def emit_addfd(
    notif_id: int, srcfd: int, flags: int = ADDFD_FLAG_SEND, newfd_flags: int = 0
) -> bytes:
    return _ADDFD.pack(notif_id, flags, srcfd, 0, newfd_flags)


def parse_sockaddr(data: bytes) -> tuple[int, IPAddress | None, int]:
    """(family, ip, port); ip None for families other than AF_INET/AF_INET6 (the door lets
    those through). Raises DecodeError for a short AF_INET/AF_INET6 address."""
    if len(data) < 2:
        raise DecodeError("sockaddr shorter than its family")
    family = struct.unpack_from("<H", data)[0]
    if family == AF_INET:
        if len(data) < 8:
            raise DecodeError("sockaddr_in too short")
        return family, IPv4Address(data[4:8]), struct.unpack_from("!H", data, 2)[0]
    if family == AF_INET6:
        if len(data) < 24:
            raise DecodeError("sockaddr_in6 too short")
        return family, IPv6Address(data[8:24]), struct.unpack_from("!H", data, 2)[0]
    return family, None, 0


def emit_sockaddr(family: int, ip: IPAddress, port: int) -> bytes:
    """The address as a socket of `family` reports it: an IPv4 address on an AF_INET6
    socket is v4-mapped."""
    if family == AF_INET:
        if not isinstance(ip, IPv4Address):
            raise ValueError(f"{ip} on an AF_INET socket")
        return struct.pack("<H", AF_INET) + struct.pack("!H", port) + ip.packed + bytes(8)
    if isinstance(ip, IPv4Address):
        ip = IPv6Address(b"\0" * 10 + b"\xff\xff" + ip.packed)
    return struct.pack("<H", AF_INET6) + struct.pack("!H", port) + bytes(4) + ip.packed + bytes(4)


__all__ = [
    "ADDFD_FLAG_SEND",
    "ADDFD_FLAG_SETFD",
    "FLAG_CONTINUE",
    "IOCTL_NOTIF_ADDFD",
    "IOCTL_NOTIF_ID_VALID",
    "IOCTL_NOTIF_RECV",
    "IOCTL_NOTIF_SEND",
    "NOTIF_SIZE",
    "RESP_SIZE",
    "Notification",
    "emit_addfd",
    "emit_notification",
    "emit_response",
    "emit_sockaddr",
    "parse_notification",
    "parse_response",
    "parse_sockaddr",
]
