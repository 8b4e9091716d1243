"""The launcher's UDP relay: the program's UDP sockets associated with netstack UDP sockets.

One loopback UDP port (127.0.0.1 and ::1, same number) receives the shim's datagrams, each
with a `UdpHeader` naming its real destination, and sends them into the tunnel from the
netstack socket of that program socket's association. Datagrams from the tunnel go back with a
header naming their real source; ICMP errors go back as ERROR markers. Only loopback sources
registered over the authenticated control channel (UDP_ASSOC, LISTEN) are accepted
(docs/channel.md, "UDP"); anything else is counted and dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hmac
import ipaddress
import secrets
import socket
import struct
from dataclasses import dataclass

from wrapguard import log
from wrapguard.errors import DecodeError, WrapguardError
from wrapguard.netstack.events import DatagramReceived, Event, SockId, UdpError
from wrapguard.runtime.engine import Engine
from wrapguard.wire.ipc import (
    TOKEN_LEN,
    Address,
    UdpHeader,
    UdpKind,
    emit_udp_header,
    parse_program_datagram,
)

__all__ = ["UdpRelay", "UdpRelayStats"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Key = tuple[str, int]  # the program socket's loopback side: ("127.0.0.1" | "::1", port)
_ERRNO = struct.Struct("!I")
LO4, LO6 = "127.0.0.1", "::1"


@dataclass(slots=True)
class UdpRelayStats:
    """Datagrams relayed each way, and everything dropped."""

    to_tunnel: int = 0
    from_tunnel: int = 0
    errors_sent: int = 0
    unknown_source: int = 0  # a loopback datagram from a socket never associated
    malformed: int = 0
    send_failed: int = 0  # the netstack refused (EMSGSIZE, no address of that family)


def _plain(ip: IPAddress) -> IPAddress:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


class _Assoc:
    """One program socket <-> one netstack UDP socket; the netstack's events for it."""

    __slots__ = ("key", "relay", "sock", "token")

    def __init__(self, relay: UdpRelay, key: Key, sock: SockId) -> None:
        self.relay, self.key, self.sock = relay, key, sock
        # Carried by every datagram from the program: another local user who binds the
        # association's loopback port (after the program closed it) cannot know it.
        self.token = secrets.token_bytes(TOKEN_LEN)

    def on_event(self, event: Event) -> None:
        if isinstance(event, DatagramReceived):
            src = Address(event.src[0], event.src[1])
            self.relay.to_program(self.key, UdpHeader(UdpKind.DATA, src), event.data)
        elif isinstance(event, UdpError):
            dst = Address(event.dst[0], event.dst[1])
            self.relay.stats.errors_sent += 1
            self.relay.to_program(self.key, UdpHeader(UdpKind.ERROR, dst), _ERRNO.pack(event.errno))


class _Endpoint(asyncio.DatagramProtocol):
    def __init__(self, relay: UdpRelay) -> None:
        self.relay = relay

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        self.relay.from_program(data, (str(addr[0]), int(addr[1])))

    def error_received(self, exc: Exception) -> None:  # e.g. ECONNREFUSED: the program is gone
        pass


class UdpRelay:
    """The loopback relay port and the associations; `start()`, then `env_value()`."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.log = log.get("wrapguard.udp")
        self.port = 0
        self.has_v6 = False
        self.assocs: dict[Key, _Assoc] = {}
        self.stats = UdpRelayStats()
        self._transports: dict[str, asyncio.DatagramTransport] = {}

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for host, sock in self._sockets():
            transport, _ = await loop.create_datagram_endpoint(lambda: _Endpoint(self), sock=sock)
            self._transports[host] = transport

    def _sockets(self) -> list[tuple[str, socket.socket]]:
        """127.0.0.1 and ::1 on one ephemeral port (the shim knows only the number)."""
        for _ in range(32):
            v4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            v4.bind((LO4, 0))
            port = v4.getsockname()[1]
            v6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            try:
                v6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                v6.bind((LO6, port))
            except OSError as exc:
                v6.close()
                if exc.errno == errno.EADDRINUSE:
                    v4.close()
                    continue
                self.port = port
                return [(LO4, v4)]
            self.port, self.has_v6 = port, True
            return [(LO4, v4), (LO6, v6)]
        raise WrapguardError("could not find a free loopback port for the UDP relay")

    def env_value(self) -> str:
        """WRAPGUARD_UDP for the shim: the port, with "/4" when there is no ::1 socket."""
        return str(self.port) if self.has_v6 else f"{self.port}/4"

    def close(self) -> None:
        for transport in self._transports.values():
            transport.close()
        self._transports.clear()
        for key in list(self.assocs):
            self.release(key)

    # -- associations --------------------------------------------------------------------------

    def _key(self, local: Address) -> Key:
        return (str(_plain(local.ip)), local.port)

    def _source(self, assoc: _Assoc, version: int) -> Address:
        ip = next((a for a in self.engine.addresses if a.version == version), None)
        if ip is None:
            raise OSError(errno.ENETUNREACH, f"no tunnel address of IPv{version}")
        return Address(ip, self.engine.stack.udp_port(assoc.sock))

    def _add(self, key: Key, port: int) -> _Assoc:
        old = self.assocs.get(key)
        if old is not None:
            if port == 0 or self.engine.stack.udp_port(old.sock) == port:
                return old
            self.release(key)
        assoc = _Assoc(self, key, self.engine.stack.udp_bind(port))
        self.assocs[key] = assoc
        self.engine.handlers[assoc.sock] = assoc
        self.log.debug("udp association", local=f"{key[0]}:{key[1]}", port=port or "ephemeral")
        return assoc

    def assoc(self, local: Address, dst: Address) -> Address:
        """Associate the program socket `local` (if new) and return our source toward `dst`."""
        assoc = self._add(self._key(local), 0)
        return self._source(assoc, _plain(dst.ip).version)

    def token(self, local: Address) -> bytes | None:
        """The association's token, handed to the shim over the authenticated channel."""
        assoc = self.assocs.get(self._key(local))
        return None if assoc is None else assoc.token

    def bind(self, bound: Address) -> None:
        """The program bound UDP port P on the wildcard or a tunnel address; `bound` is its
        socket's loopback side (docs/channel.md: LISTEN with proto 17). Receive on port P of
        our tunnel addresses. Raises OSError (EADDRINUSE) if the netstack has it."""
        if bound.port == 0:
            return
        if bound.ip.is_loopback:
            key = self._key(bound)
        else:  # an older shim's bound address: derive the loopback side from its family
            key = (LO6 if bound.ip.version == 6 and self.has_v6 else LO4, bound.port)
        self._add(key, bound.port)
        self.log.info("receiving UDP from the tunnel", port=bound.port)

    def release(self, local: Address | Key) -> None:
        key = local if isinstance(local, tuple) else self._key(local)
        assoc = self.assocs.pop(key, None)
        if assoc is not None:
            self.engine.handlers.pop(assoc.sock, None)
            self.engine.stack.udp_close(assoc.sock)

    # -- datagrams -----------------------------------------------------------------------------

    def from_program(self, data: bytes, src: Key) -> None:
        assoc = self.assocs.get(src)
        if assoc is None:
            self.stats.unknown_source += 1
            return
        try:
            header, token, payload = parse_program_datagram(data)
        except DecodeError:
            self.stats.malformed += 1
            return
        if not hmac.compare_digest(token, assoc.token):
            self.stats.unknown_source += 1
            return
        if header.kind is not UdpKind.DATA:
            self.stats.malformed += 1
            return
        dst = (_plain(header.addr.ip), header.addr.port)
        try:
            self.engine.stack.udp_send(assoc.sock, dst, payload, self.engine.now())
        except OSError:
            self.stats.send_failed += 1
            return
        self.stats.to_tunnel += 1
        self.engine.schedule_flush()

    def to_program(self, key: Key, header: UdpHeader, payload: bytes) -> None:
        transport = self._transports.get(key[0])
        if transport is None:
            return
        self.stats.from_tunnel += 1
        with contextlib.suppress(OSError):
            transport.sendto(emit_udp_header(header) + payload, key)
