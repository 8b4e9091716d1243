"""Socket <-> socket relaying for doors that reach a destination directly (split tunnel).

`connect(ip, port, timeout)` opens an ordinary TCP connection on the host network (for
destinations `TunnelService.route()` sends DIRECT); `splice(a, b)` relays two connected
non-blocking stream sockets both ways until both directions end. Memory is one chunk per
direction (the next read waits until the last chunk is written: backpressure). Half-close
carries through (EOF from one side becomes `shutdown(SHUT_WR)` on the other); an error on
either side, or cancelling, resets both. Tunnel flows do not come here: `TcpRelay` joins
those (runtime/relay.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import socket
from dataclasses import dataclass

from wrapguard.runtime.relay import reset_socket

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
CHUNK = 64 * 1024
CONNECT_TIMEOUT = 30.0  # s, for a direct connect (the kernel's own SYN retries take ~2 min)


@dataclass(slots=True)
class Spliced:
    """What a finished `splice()` moved, and how it ended."""

    a_to_b: int = 0
    b_to_a: int = 0
    error: int = 0  # errno that ended it (0: both sides closed cleanly)


async def connect(ip: IPAddress, port: int, timeout: float = CONNECT_TIMEOUT) -> socket.socket:
    """A connected non-blocking TCP socket to ip:port on the host network. Raises OSError
    with the errno the kernel gave (ECONNREFUSED, ENETUNREACH, ...), ETIMEDOUT after
    `timeout` seconds."""
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            async with asyncio.timeout(timeout):
                await loop.sock_connect(sock, (str(ip), port))
        except TimeoutError:
            raise OSError(errno.ETIMEDOUT, f"connect to {ip} port {port} timed out") from None
    except BaseException:
        sock.close()
        raise
    return sock


async def _pump(
    loop: asyncio.AbstractEventLoop, src: socket.socket, dst: socket.socket, first: bytes
) -> int:
    total = 0
    if first:
        await loop.sock_sendall(dst, first)
        total += len(first)
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    while True:
        n = await loop.sock_recv_into(src, buf)
        if n == 0:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)  # RFC 9293 3.6: the half-close goes on
            return total
        await loop.sock_sendall(dst, view[:n])
        total += n


async def splice(a: socket.socket, b: socket.socket, *, a_to_b: bytes = b"") -> Spliced:
    """Relay a <-> b until both directions have seen EOF (clean close of both) or either
    fails (both reset). `a_to_b` is sent to b first (bytes already read from a). Both
    sockets are closed when this returns or is cancelled."""
    loop = asyncio.get_running_loop()
    a.setblocking(False)
    b.setblocking(False)
    up = asyncio.ensure_future(_pump(loop, a, b, a_to_b))
    down = asyncio.ensure_future(_pump(loop, b, a, b""))
    result = Spliced()
    try:
        await asyncio.wait([up, down], return_when=asyncio.FIRST_EXCEPTION)
    except asyncio.CancelledError:
        up.cancel()
        down.cancel()
        await asyncio.gather(up, down, return_exceptions=True)
        reset_socket(a)
        reset_socket(b)
        raise
    failed = False
    for task in (up, down):
        if task.done() and not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            failed = True
            result.error = exc.errno if isinstance(exc, OSError) and exc.errno else errno.EIO
    if failed:
        for task in (up, down):
            task.cancel()
        await asyncio.gather(up, down, return_exceptions=True)
        reset_socket(a)
        reset_socket(b)
    else:
        result.a_to_b, result.b_to_a = up.result(), down.result()
        a.close()
        b.close()
    return result


__all__ = ["CHUNK", "CONNECT_TIMEOUT", "Spliced", "connect", "splice"]
