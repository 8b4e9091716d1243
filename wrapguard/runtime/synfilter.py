"""A kernel filter on the loopback data listener: only announced source ports get in.

Every local user can connect to a loopback port, so a flood of connections could fill the
data listener's accept queue, and the kernel then drops the program's own SYNs (each costs a
1 s retransmission). The shim therefore binds the program's socket before CONNECT and
announces its port (docs/channel.md, "Security"); this module turns the announced ports into a
classic BPF socket filter (SO_ATTACH_FILTER, socket(7), Documentation/networking/filter.rst).
The kernel runs a listener's filter before a SYN reaches the SYN or accept queue
(tcp_v4_rcv/tcp_v6_rcv: tcp_filter()), on the segment from its TCP header on, so `ldh [0]` is
the source port for IPv4 and IPv6 alike: a SYN from any other port is dropped at once and
costs the flooder its retries. Accepted sockets inherit the filter (sk_clone_lock): `detach`
them, so that data segments do not run it.
"""

from __future__ import annotations

import contextlib
import ctypes
import socket
import struct
from collections.abc import Collection

__all__ = ["MAX_PORTS", "attach", "detach", "program"]

SO_ATTACH_FILTER = 26  # <asm-generic/socket.h>
SO_DETACH_FILTER = 27
MAX_PORTS = 500  # 2 instructions each; well inside BPF_MAXINSNS and a 20 KiB optmem_max
_INSN = struct.Struct("=HBBI")  # struct sock_filter: code, jt, jf, k
_LDH_ABS = 0x28  # BPF_LD | BPF_H | BPF_ABS
_JEQ_K = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
_RET_K = 0x06  # BPF_RET | BPF_K
_KEEP = 0xFFFFFFFF  # "keep the whole packet" (a shorter length would trim it)
_ACCEPT_ALL = _INSN.pack(_RET_K, 0, 0, _KEEP)


def program(ports: Collection[int] | None) -> bytes:
    """The filter: keep segments whose TCP source port is in `ports`, drop the rest; None (or
    more than MAX_PORTS ports) keeps everything."""
    if ports is None or len(ports) > MAX_PORTS:
        return _ACCEPT_ALL
    out = [_INSN.pack(_LDH_ABS, 0, 0, 0)]
    for port in sorted(ports):
        out.append(_INSN.pack(_JEQ_K, 0, 1, port))  # equal: the next one, else skip it
        out.append(_ACCEPT_ALL)
    out.append(_INSN.pack(_RET_K, 0, 0, 0))
    return b"".join(out)


def attach(sock: socket.socket, prog: bytes) -> None:
    """Replace the socket's filter (atomically, in the kernel); OSError if refused."""
    buf = ctypes.create_string_buffer(prog, len(prog))
    fprog = struct.pack("@HP", len(prog) // _INSN.size, ctypes.addressof(buf))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


def detach(sock: socket.socket) -> None:
    """Remove an inherited filter (ENOENT, none attached, is fine)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, SO_DETACH_FILTER, 0)
