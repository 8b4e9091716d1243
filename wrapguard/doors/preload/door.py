"""The preload door: the channel server's backend, made of an outbound and an inbound part.

`PreloadDoor` is what `channel.ChannelServer` calls for each shim request: outbound ones
(CONNECT, GATE, STATUS, UDP associations, RESOLVE) go to `PreloadOutbound`, inbound ones
(LISTEN, UNLISTEN, PEER, LOCAL) to `PreloadInbound`. Both stand on the flow API
(`TunnelService`); what they hold (listeners, UDP associations) ends with the program's
sockets (`check_holders`).
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable, Sequence

from wrapguard import log
from wrapguard.doors.preload.channel import Decision
from wrapguard.doors.preload.inbound import PreloadInbound
from wrapguard.doors.preload.outbound import PreloadOutbound
from wrapguard.runtime import owners
from wrapguard.runtime.service import FrontEnd, IPAddress, TunnelService
from wrapguard.wire.ipc import Address, Proto

HOLDER_CHECK_EVERY = 2.0  # seconds between checks that the program's sockets still exist


class PreloadDoor:
    """The shim's requests, answered on the flow API."""

    def __init__(self, service: TunnelService) -> None:
        self.service = service
        self.log = log.get("wrapguard.preload")
        self.frontend = FrontEnd("preload")  # in /state once a program is wrapped
        self.hellos = 0  # processes that loaded the shim
        self.hello_event = asyncio.Event()
        self._exit_watch: owners.ExitWatch | None = None
        self.outbound = PreloadOutbound(service, self.frontend, self._poke_holders)
        self.inbound = PreloadInbound(service, self._poke_holders)
        self.udp = self.outbound.udp

    def close(self) -> None:
        if self._exit_watch is not None:
            self._exit_watch.close()

    # -- the program's processes, and what they hold -------------------------------------------

    def hello(self, pid: int, version: str) -> None:
        self.hellos += 1
        self.hello_event.set()
        self.log.debug("shim loaded", pid=pid, version=version)
        self._exits().watch(pid)

    def _exits(self) -> owners.ExitWatch:
        if self._exit_watch is None:
            self._exit_watch = owners.ExitWatch(
                self.check_holders,
                lambda: bool(self.inbound.listeners or self.udp.assocs),
                HOLDER_CHECK_EVERY,
            )
        return self._exit_watch

    def _poke_holders(self) -> None:
        self._exits().poke()

    def check_holders(self) -> None:
        """End every listener and UDP association whose program socket no longer exists: a
        process that exited without close() must not leave its tunnel port to whoever binds
        the loopback port next (issue 11)."""
        self.inbound.check_holders()
        udp = self.udp
        if not udp.assocs:
            return
        me = os.geteuid()
        bound = owners.udp_ports()
        for key in list(udp.assocs):
            takers = {u for u, ip in bound.get(key[1], ()) if owners.receives(ip, key[0])}
            if takers == {me}:
                continue
            if takers - {me}:  # shared with another user (SO_REUSEADDR): never relay
                self.log.warning(
                    "udp association ended: another user's socket shares its port", port=key[1]
                )
            else:
                self.log.debug("udp association ended: its socket is gone", port=key[1])
            udp.release(key)

    # -- outbound --------------------------------------------------------------------------------

    def route(self, proto: Proto, dst: Address) -> Decision:
        return self.outbound.route(proto, dst)

    def open_tcp(
        self, dst: Address, token: bytes, gate: bool = False, src_port: int = 0
    ) -> Address | None:
        return self.outbound.open_tcp(dst, token, gate, src_port)

    def tcp_attached(self, token: bytes, sock: socket.socket) -> None:
        self.outbound.tcp_attached(token, sock)

    def gate(self, token: bytes, filler: int) -> None:
        self.outbound.gate(token, filler)

    def token_expired(self, token: bytes) -> None:
        self.outbound.token_expired(token)

    def status(self, token: bytes) -> asyncio.Future[int] | None:
        return self.outbound.status(token)

    def tell(self, token: bytes, callback: Callable[[int], None]) -> bool:
        return self.outbound.tell(token, callback)

    def udp_assoc(self, local: Address, dst: Address) -> tuple[Decision, Address | None]:
        return self.outbound.udp_assoc(local, dst)

    def udp_token(self, local: Address) -> bytes | None:
        return self.outbound.udp_token(local)

    def udp_attached(self, token: bytes, sock: socket.socket) -> bool:
        return self.outbound.udp_attached(token, sock)

    def udp_release(self, local: Address) -> None:
        self.outbound.udp_release(local)

    async def resolve(
        self, name: str, family: int, flags: int
    ) -> tuple[int, Sequence[IPAddress], str]:
        return await self.outbound.resolve(name, family, flags)

    # -- inbound ---------------------------------------------------------------------------------

    def listen(self, proto: Proto, addr: Address, v6only: bool = False) -> None:
        if proto == Proto.UDP:
            self._poke_holders()
            self.udp.bind(addr)
        elif proto == Proto.TCP:
            self.inbound.listen(addr, v6only)

    def unlisten(self, proto: Proto, addr: Address) -> None:
        if proto == Proto.TCP:
            self.inbound.unlisten(addr)

    def peer_of(self, loopback: Address) -> Address | None:
        return self.inbound.peer_of(loopback)

    def local_of(self, loopback: Address) -> Address | None:
        return self.inbound.local_of(loopback)


__all__ = ["HOLDER_CHECK_EVERY", "PreloadDoor"]
