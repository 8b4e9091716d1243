"""Open a TUN device through /dev/net/tun (Documentation/networking/tuntap.rst).

`open_tun(name)` returns the non-blocking, close-on-exec fd and the kernel's name for the
device. IFF_TUN | IFF_NO_PI: each read() is one IP packet, each write() sends one, with no
packet-information header. The device is not persistent: it disappears with its addresses and
routes when the last fd is closed (also when the process is killed).
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct

from wrapguard.errors import WrapguardError

TUN_PATH = "/dev/net/tun"
TUNSETIFF = 0x400454CA  # _IOW('T', 202, int)
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFNAMSIZ = 16
_IFREQ = struct.Struct("16sH22x")  # struct ifreq: name, flags, the rest of the union


def valid_ifname(name: str) -> bool:
    """What the kernel accepts as an interface name (dev_valid_name)."""
    raw = name.encode("utf-8", "surrogateescape")
    return (
        0 < len(raw) < IFNAMSIZ
        and name not in (".", "..")
        and not any(c in name for c in "/:")
        and not any(c.isspace() for c in name)
    )


def open_tun(name: str) -> tuple[int, str]:
    """Create the TUN device `name`; WrapguardError with one line if it cannot be."""
    try:
        fd = os.open(TUN_PATH, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise WrapguardError(f"cannot open {TUN_PATH}: {exc.strerror}") from None
    try:
        ifr = _IFREQ.pack(name.encode(), IFF_TUN | IFF_NO_PI)
        got = fcntl.ioctl(fd, TUNSETIFF, ifr)
    except OSError as exc:
        os.close(fd)
        why = exc.strerror
        if exc.errno in (errno.EPERM, errno.EACCES):
            why = "permission denied (needs root or CAP_NET_ADMIN)"
        elif exc.errno in (errno.EBUSY, errno.EINVAL):
            why = f"{exc.strerror} (a device of that name exists and is not a free TUN device)"
        raise WrapguardError(f"cannot create the TUN device {name}: {why}") from None
    return fd, got[:IFNAMSIZ].rstrip(b"\0").decode()


__all__ = ["open_tun", "valid_ifname"]
