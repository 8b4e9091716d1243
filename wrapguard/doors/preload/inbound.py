"""The preload door, inbound: the program's listeners, reachable from the tunnel.

The shim reports each listen() on the wildcard or a tunnel address (LISTEN); `PreloadInbound`
then listens on that port of our tunnel addresses (`TunnelService.listen`) and joins each
tunnel connection to a loopback connection to the program's own listening socket, after
checking that it is still the program's (another user may hold the port once the program has
gone). PEER and LOCAL tell the shim, for an accepted loopback connection, the real client and
the tunnel address it connected to (accept(), getpeername(), getsockname()).
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
from collections.abc import Callable

from wrapguard import log
from wrapguard.runtime import owners
from wrapguard.runtime.relay import TcpRelay, reset_socket
from wrapguard.runtime.service import IPAddress, TunnelService, plain
from wrapguard.wire.ipc import Address

ACCEPTED_TRIES = 25  # x 2 ms: how long the kernel may take to list an accepted connection


class PreloadInbound:
    """The program's TCP listeners on the tunnel, and the UDP ports it bound (to `udp`)."""

    def __init__(self, service: TunnelService, poke_holders: Callable[[], None]) -> None:
        self.service = service
        self.log = log.get("wrapguard.preload")
        self.inbound: dict[tuple[str, int], tuple[Address, Address]] = {}
        self.listeners: dict[int, Callable[[], None]] = {}  # port -> stop listening
        self.tcp_bound: dict[int, dict[int, Address]] = {}  # port -> {4|6: what it bound}
        self.v6only: dict[int, bool] = {}  # port -> its AF_INET6 listener has IPV6_V6ONLY
        self._listening: dict[int, list[str]] = {}  # port -> tunnel addresses it takes (logged)
        self._tasks: set[asyncio.Future[None]] = set()
        self._poke_holders = poke_holders

    def listen(self, addr: Address, v6only: bool = False) -> None:
        self._poke_holders()
        port = addr.port
        bound = self.tcp_bound.setdefault(port, {})
        bound[addr.ip.version] = addr
        if addr.ip.version == 6:
            self.v6only[port] = v6only
        takes = [str(a) for a in self.service.addresses if self._listener_family(port, a)]
        if port in self.listeners:
            if takes != self._listening.get(port):
                self._listening[port] = takes
                self.log.info("listening on the tunnel", port=port, addresses=takes)
            return

        def on_accept(relay: TcpRelay) -> None:
            task = asyncio.ensure_future(self._inbound(relay, port))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        def accepts(local: bytes) -> bool:
            return self._listener_family(port, ipaddress.ip_address(local)) is not None

        self.listeners[port] = self.service.listen(port, on_accept, accepts, self._relay_done)
        self._listening[port] = takes
        self.log.info("listening on the tunnel", port=port, addresses=takes)

    def unlisten(self, addr: Address) -> None:
        bound = self.tcp_bound.get(addr.port, {})
        bound.pop(addr.ip.version, None)
        if bound:
            return  # the other family's listener on this port is still open
        self.drop_listener(addr.port, "closed by the program")

    def drop_listener(self, port: int, why: str) -> None:
        self.tcp_bound.pop(port, None)
        self._listening.pop(port, None)
        stop = self.listeners.pop(port, None)
        if stop is not None:
            stop()
            self.log.info("stopped listening on the tunnel", port=port, reason=why)

    def check_holders(self) -> None:
        """End every listener whose port no socket of ours holds any more (issue 11). Whose
        socket accepts each relayed connection is checked as it comes (`_accepted_uid`)."""
        if not self.listeners:
            return
        me = os.geteuid()
        held = owners.tcp_listeners()
        for port in [p for p in self.listeners if all(u != me for u, _ in held.get(p, ()))]:
            self.drop_listener(port, "the program's listener is gone")

    def _listener_family(self, port: int, local: IPAddress) -> int | None:
        """Which of the program's listeners on `port` takes a tunnel connection to `local`.

        An AF_INET listener takes IPv4 only; an AF_INET6 one takes IPv6, and IPv4 as
        v4-mapped when no AF_INET listener has the port (a dual-stack socket). A listener bound
        to one address takes only connections to that address."""

        def takes(addr: Address | None) -> bool:
            return addr is not None and (plain(addr.ip).is_unspecified or plain(addr.ip) == local)

        bound = self.tcp_bound.get(port, {})
        if local.version == 4:
            if takes(bound.get(4)):
                return socket.AF_INET
            v6 = bound.get(6)
            dual = not self.v6only.get(port, False)
            if v6 is not None and dual and (v6.ip.is_unspecified or takes(v6)):
                return socket.AF_INET6
            return None
        return socket.AF_INET6 if takes(bound.get(6)) else None

    def peer_of(self, loopback: Address) -> Address | None:
        entry = self.inbound.get((str(loopback.ip), loopback.port))
        return None if entry is None else entry[0]

    def local_of(self, loopback: Address) -> Address | None:
        """Our tunnel address the client connected to (the accepted socket's getsockname)."""
        entry = self.inbound.get((str(loopback.ip), loopback.port))
        return None if entry is None else entry[1]

    def _relay_done(self, relay: TcpRelay) -> None:
        if relay.inbound_key is not None:
            self.inbound.pop(relay.inbound_key, None)

    async def _inbound(self, relay: TcpRelay, port: int) -> None:
        ends = relay.remote(), relay.local()
        if ends[0] is None or ends[1] is None:
            return  # already gone
        remote = Address(ipaddress.ip_address(ends[0][0]), ends[0][1])
        ours = Address(ipaddress.ip_address(ends[1][0]), ends[1][1])
        family = self._listener_family(port, ours.ip)
        if family is None:
            relay.abort()  # no listener of this family/address: refuse, as the kernel would
            return
        host = "::1" if family == socket.AF_INET6 else "127.0.0.1"
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.bind((host, 0))
            local = sock.getsockname()
            key = (str(ipaddress.ip_address(local[0])), local[1])
            self.inbound[key] = (remote, ours)
            relay.inbound_key = key
            await asyncio.get_running_loop().sock_connect(sock, (host, port))
            uid = await _accepted_uid((host, port), local)
            if uid != os.geteuid():
                # Not our program's socket: it exited without close() and someone else holds
                # the port now. Refuse, and stop listening there.
                reset_socket(sock)
                self.drop_listener(port, "the port is held by another user's socket")
                self.log.warning(
                    "refused a tunnel connection: the program's listener is gone and another "
                    "user's socket holds its loopback port",
                    port=port,
                    uid=uid,
                )
                relay.abort()
                return
        except OSError as exc:
            sock.close()
            self.log.warning("program's listener unreachable", port=port, error=str(exc))
            relay.abort()
            return
        self.log.debug("tunnel connection in", client=f"{remote.ip}:{remote.port}", port=port)
        relay.attach_socket(sock)


async def _accepted_uid(server: tuple[str, int], client: tuple[str, int]) -> int | None:
    """Who accepted our loopback connection; the kernel may list it a moment after connect."""
    for _ in range(ACCEPTED_TRIES):
        uid = owners.tcp_accepted_uid(server, (client[0], client[1]))
        if uid is not None:
            return uid
        await asyncio.sleep(0.002)
    return None


__all__ = ["PreloadInbound"]
