"""Who owns a loopback socket: the kernel's socket tables (/proc/net/{tcp,udp}{,6}).

The launcher relays tunnel traffic to the program's own loopback sockets: a listener's port
for inbound TCP, a UDP socket's port for datagrams. A program that exits without close()
frees such a port, and another local user may bind it next. Before relaying, and whenever a
wrapped process exits, the launcher asks here whether a socket of *our* uid still holds the
port; if not, the listener or association ends (issue 11: nobody else gets in).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import os
import socket
import struct
from collections.abc import Callable, Iterator

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
TCP_LISTEN = 0x0A  # include/net/tcp_states.h
TCP_CONNECTED = frozenset({0x01, 0x02, 0x03})  # ESTABLISHED, SYN_SENT, SYN_RECV


def _addr(hexaddr: str) -> IPAddress:
    """/proc/net's hex address: 32-bit words in host (little-endian) order."""
    raw = bytes.fromhex(hexaddr)
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    ip = ipaddress.ip_address(words)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _rows(proto: str) -> Iterator[tuple[IPAddress, int, IPAddress, int, int, int]]:
    """(local ip, local port, remote ip, remote port, state, uid) of every socket."""
    for name in (proto, proto + "6"):
        try:
            with open(f"/proc/net/{name}") as f:
                next(f, None)  # the header
                lines = f.readlines()
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if len(parts) < 8:
                continue
            with contextlib.suppress(ValueError):
                lh, lp = parts[1].split(":")
                rh, rp = parts[2].split(":")
                yield (
                    _addr(lh),
                    int(lp, 16),
                    _addr(rh),
                    int(rp, 16),
                    int(parts[3], 16),
                    int(parts[7]),
                )


def _loopback_or_any(ip: IPAddress) -> bool:
    return ip.is_loopback or ip.is_unspecified


def tcp_listeners() -> dict[int, set[tuple[int, IPAddress]]]:
    """port -> (uid, bound address) of the TCP listeners on loopback or a wildcard."""
    out: dict[int, set[tuple[int, IPAddress]]] = {}
    for lip, lport, _, _, state, uid in _rows("tcp"):
        if state == TCP_LISTEN and _loopback_or_any(lip):
            out.setdefault(lport, set()).add((uid, lip))
    return out


def udp_ports() -> dict[int, set[tuple[int, IPAddress]]]:
    """port -> (uid, bound address) of the UDP sockets on loopback or a wildcard."""
    out: dict[int, set[tuple[int, IPAddress]]] = {}
    for lip, lport, _, _, _, uid in _rows("udp"):
        if _loopback_or_any(lip):
            out.setdefault(lport, set()).add((uid, lip))
    return out


def receives(bound: IPAddress, loopback: str) -> bool:
    """Would a socket bound to `bound` get what the launcher sends to `loopback` (127.0.0.1 or
    ::1) at its port? Its own loopback address or the wildcard of that family; not another
    127/8 address, not the other family (a v6-only [::] never sees 127.0.0.1)."""
    target = ipaddress.ip_address(loopback)
    return bound == target or (bound.is_unspecified and bound.version == target.version)


def tcp_accepted_uid(server: tuple[str, int], client: tuple[str, int]) -> int | None:
    """The uid of the socket that accepted our loopback connection `client` -> `server` (the
    uid of the listener it came from), or None if the kernel does not show it. One sock_diag
    lookup by the exact 4-tuple (O(1); before the child socket is listed, the kernel answers
    with the listener itself); /proc/net/tcp if netlink is unavailable."""
    with contextlib.suppress(OSError, struct.error, ValueError):
        return _diag_uid(server, client)
    cip = ipaddress.ip_address(client[0])
    for _, lport, rip, rport, state, uid in _rows("tcp"):
        if lport == server[1] and rport == client[1] and rip == cip and state in TCP_CONNECTED:
            return uid
    return None


# sock_diag(7): one INET_DIAG request for one socket, named by its 4-tuple.
NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 1
NLMSG_ERROR = 2
INET_DIAG_NOCOOKIE = 0xFFFFFFFF
_NLMSG = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_REQ = struct.Struct("=BBBBI")  # family, protocol, ext, pad, states
_SOCKID = struct.Struct("!HH16s16s")  # sport, dport, src, dst (network order)
_SOCKID_TAIL = struct.Struct("=III")  # if, cookie[2]
_MSG = struct.Struct("=BBBB")  # family, state, timer, retrans (then the sockid, 48 bytes)
_MSG_TAIL = struct.Struct("=IIIII")  # expires, rqueue, wqueue, uid, inode


def _diag_uid(server: tuple[str, int], client: tuple[str, int]) -> int | None:
    sip, cip = ipaddress.ip_address(server[0]), ipaddress.ip_address(client[0])
    family = socket.AF_INET6 if sip.version == 6 else socket.AF_INET
    sockid = _SOCKID.pack(server[1], client[1], sip.packed.ljust(16, b"\0"),
                          cip.packed.ljust(16, b"\0"))  # fmt: skip
    body = (
        _REQ.pack(family, socket.IPPROTO_TCP, 0, 0, 0xFFFFFFFF)
        + sockid
        + _SOCKID_TAIL.pack(0, INET_DIAG_NOCOOKIE, INET_DIAG_NOCOOKIE)
    )
    msg = _NLMSG.pack(_NLMSG.size + len(body), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, 1, 0) + body
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG) as nl:
        nl.settimeout(1.0)
        nl.send(msg)
        reply = nl.recv(8192)
    _, mtype, _, _, _ = _NLMSG.unpack_from(reply)
    if mtype == NLMSG_ERROR:
        (err,) = struct.unpack_from("=i", reply, _NLMSG.size)
        if err in (-errno.ENOENT, 0):
            return None
        raise OSError(-err, "sock_diag")
    if mtype != SOCK_DIAG_BY_FAMILY:
        return None
    tail = _NLMSG.size + _MSG.size + _SOCKID.size + _SOCKID_TAIL.size
    _, _, _, uid, _ = _MSG_TAIL.unpack_from(reply, tail)
    return int(uid)


class ExitWatch:
    """Calls `on_exit()` soon after any watched process exits (pidfd), and every `period`
    seconds while `wanted()` says there is something to check (for processes we could not
    watch: forked children that never loaded the shim anew)."""

    def __init__(
        self, on_exit: Callable[[], None], wanted: Callable[[], bool], period: float
    ) -> None:
        self._on_exit = on_exit
        self._wanted = wanted
        self._period = period
        self._fds: dict[int, int] = {}  # pidfd -> pid
        self._timer: asyncio.TimerHandle | None = None

    @property
    def _loop(self) -> asyncio.AbstractEventLoop:
        return asyncio.get_running_loop()

    def watch(self, pid: int) -> None:
        try:
            fd = os.pidfd_open(pid)
        except (OSError, AttributeError):
            return  # gone already, or no pidfds: the periodic check covers it
        self._fds[fd] = pid
        self._loop.add_reader(fd, self._exited, fd)

    def _exited(self, fd: int) -> None:
        self._loop.remove_reader(fd)
        os.close(fd)
        self._fds.pop(fd, None)
        self._on_exit()

    def poke(self) -> None:
        """Something new to look after: make sure the periodic check runs."""
        # No loop: a backend driven by hand in a test; nothing to schedule.
        if self._timer is None:
            with contextlib.suppress(RuntimeError):
                self._timer = self._loop.call_later(self._period, self._tick)

    def _tick(self) -> None:
        self._timer = None
        if self._wanted():
            self._on_exit()
            self.poke()

    def close(self) -> None:
        for fd in list(self._fds):
            with contextlib.suppress(RuntimeError):
                self._loop.remove_reader(fd)
            os.close(fd)
        self._fds.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


__all__ = ["ExitWatch", "receives", "tcp_accepted_uid", "tcp_listeners", "udp_ports"]
