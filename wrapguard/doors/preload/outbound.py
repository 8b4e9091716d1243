"""The preload door, outbound: the shim's connect() and UDP sends, on the flow API.

`PreloadOutbound` answers CONNECT (a TCP flow through `TunnelService.open_tcp`, joined to the
program's data connection when it presents its token, through a gate for non-blocking
connects), STATUS (the flow's outcome), UDP associations (`udp.UdpRelay`) and RESOLVE. Routing
is the service's (`TunnelService.route`: DNS capture, bypass, policy routes, AllowedIPs).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable, Sequence

from wrapguard import log
from wrapguard.doors.preload.channel import Decision
from wrapguard.doors.preload.udp import UdpRelay
from wrapguard.runtime.relay import TcpRelay, reset_socket
from wrapguard.runtime.service import FrontEnd, IPAddress, TunnelService, Way, plain
from wrapguard.wire.ipc import RESOLVE_ADDRCONFIG, Action, Address, Proto

GATE_DEADLINE = 5.0  # seconds for the GATE request to follow the token (the local step)
RELAY_RCVBUF = 1 << 20  # bytes; the kernel caps it at net.core.rmem_max
STATUS_KEEP = 60.0  # seconds an outcome stays askable after its flow ended
_ACTION = {Way.TUNNEL: Action.TUNNEL, Way.DIRECT: Action.DIRECT, Way.FAIL: Action.FAIL}


def open_rcvbuf(sock: socket.socket) -> None:
    """Data sockets start with the small receive buffer of a gate; give relaying room."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RELAY_RCVBUF)


class _Gate:
    """A gated (non-blocking) connect: the program's socket, held unread until the tunnel
    connection is open and the shim has said how many filler bytes to discard."""

    __slots__ = ("filler", "sock")

    def __init__(self) -> None:
        self.sock: socket.socket | None = None
        self.filler: int | None = None


class PreloadOutbound:
    """Outbound TCP flows by channel token, UDP associations, name lookups."""

    def __init__(
        self, service: TunnelService, frontend: FrontEnd, poke_holders: Callable[[], None]
    ) -> None:
        self.service = service
        self.frontend = frontend
        self.log = log.get("wrapguard.preload")
        self.relays: dict[bytes, TcpRelay] = {}
        self.gates: dict[bytes, _Gate] = {}
        self.futures: dict[bytes, asyncio.Future[int]] = {}
        self.tellers: dict[bytes, Callable[[int], None]] = {}  # see tell()
        self.udp = UdpRelay(service)
        self._poke_holders = poke_holders

    def route(self, proto: Proto, dst: Address) -> Decision:
        route = self.service.route(int(proto), dst.ip, dst.port)
        return Decision(_ACTION[route.way], route.errno)

    # -- TCP -------------------------------------------------------------------------------------

    def open_tcp(
        self, dst: Address, token: bytes, gate: bool = False, src_port: int = 0
    ) -> Address | None:
        def known(status: int) -> None:  # from the engine's event dispatch
            if status:
                self.log.debug("tunnel connect failed", dst=f"{dst.ip}:{dst.port}", errno=status)
            tell = self.tellers.pop(token, None)
            if tell is not None:
                tell(status)
            if token in self.gates:
                self._gate_progress(token)

        relay, outcome = self.service.open_tcp(
            dst.ip, dst.port, src_port=src_port, on_done=self._relay_done, on_status=known
        )
        relay.token = token
        self.frontend.flows += 1
        self.relays[token] = relay
        self.futures[token] = outcome
        if gate:
            self.gates[token] = _Gate()
        local = relay.local_address()
        return None if local is None else Address(plain(local[0]), local[1])

    def tcp_attached(self, token: bytes, sock: socket.socket) -> None:
        relay = self.relays.get(token)
        g = self.gates.get(token)
        if relay is None:  # the flow already ended (a fast failure): the program sees a reset
            self.gates.pop(token, None)
            reset_socket(sock)
            return
        if g is None:
            open_rcvbuf(sock)
            relay.attach_socket(sock, prepared=True)
            return
        g.sock = sock
        # The GATE request must follow within the local step's time, or the flow is dropped.
        asyncio.get_running_loop().call_later(GATE_DEADLINE, self._gate_expired, token)
        self._gate_progress(token)

    def _gate_expired(self, token: bytes) -> None:
        g = self.gates.get(token)
        if g is None or g.filler is not None:
            return
        del self.gates[token]
        if g.sock is not None:
            reset_socket(g.sock)
        relay = self.relays.get(token)
        if relay is not None:
            relay.abort()

    def gate(self, token: bytes, filler: int) -> None:
        g = self.gates.get(token)
        if g is not None and g.filler is None:
            g.filler = filler
            self._gate_progress(token)

    def _gate_progress(self, token: bytes) -> None:
        """Open the gate once the outcome and the filler count are known (docs/channel.md)."""
        g = self.gates[token]
        if g.sock is None:
            return
        relay = self.relays.get(token)
        if relay is None or relay.status not in (None, 0):
            # Failed: reset the program's side; its SO_ERROR then reports the real errno.
            del self.gates[token]
            reset_socket(g.sock)
            return
        if relay.status is None or g.filler is None:
            return  # wait for the other half
        sock, remaining = g.sock, g.filler
        loop = asyncio.get_running_loop()
        buf = bytearray(min(remaining, 65536) or 1)

        def discard() -> None:
            nonlocal remaining
            while remaining > 0:
                try:
                    n = sock.recv_into(buf, min(remaining, len(buf)))
                except (BlockingIOError, InterruptedError):
                    return
                except OSError:
                    n = 0
                if n == 0:  # the program went away before the gate opened
                    loop.remove_reader(sock.fileno())
                    self.gates.pop(token, None)
                    if self.relays.get(token) is relay:
                        relay.attach_socket(sock)  # the relay sees the EOF and cleans up
                    else:
                        sock.close()
                    return
                remaining -= n
            loop.remove_reader(sock.fileno())
            self.gates.pop(token, None)
            if self.relays.get(token) is not relay or relay.status not in (None, 0):
                reset_socket(sock)  # the flow ended while the filler drained
                return
            open_rcvbuf(sock)
            relay.attach_socket(sock, prepared=True)

        g.sock = None  # from here on, discard() owns it
        loop.add_reader(sock.fileno(), discard)
        loop.call_soon(discard)

    def token_expired(self, token: bytes) -> None:
        self.gates.pop(token, None)
        self.tellers.pop(token, None)
        relay = self.relays.pop(token, None)
        self.futures.pop(token, None)
        if relay is not None:
            relay.abort()

    def status(self, token: bytes) -> asyncio.Future[int] | None:
        return self.futures.get(token)

    def tell(self, token: bytes, callback: Callable[[int], None]) -> bool:
        """Call `callback(status)` the moment the outcome of `token`'s flow is known (the
        channel writes a blocking connect's reply there, a loop turn before the future's
        callbacks would). False if the outcome is known already or the token is not ours."""
        fut = self.futures.get(token)
        if fut is None or fut.done():
            return False
        self.tellers[token] = callback
        return True

    def _relay_done(self, relay: TcpRelay) -> None:
        token = relay.token
        if token is None:
            return
        self.relays.pop(token, None)
        fut = self.futures.get(token)
        if fut is not None and fut.done() and relay.end_errno:
            # An open flow that died: STATUS now says why (the shim reports it instead of the
            # loopback reset's ECONNRESET, docs/channel.md "STATUS").
            ended: asyncio.Future[int] = relay.loop.create_future()
            ended.set_result(relay.end_errno)
            self.futures[token] = ended
        # The shim may ask STATUS after a fast failure: keep the outcome a while.
        relay.loop.call_later(STATUS_KEEP, self.futures.pop, token, None)

    # -- UDP -------------------------------------------------------------------------------------

    def udp_assoc(self, local: Address, dst: Address) -> tuple[Decision, Address | None]:
        route = self.service.route(int(Proto.UDP), dst.ip, dst.port)
        decision = Decision(_ACTION[route.way], route.errno)
        if route.way is not Way.TUNNEL:
            return decision, None
        self._poke_holders()
        # our source in the family of where the datagrams really go
        real = dst if route.target is None else Address(*route.target)
        return decision, self.udp.assoc(local, real)

    def udp_token(self, local: Address) -> bytes | None:
        return self.udp.token(local)

    def udp_attached(self, token: bytes, sock: socket.socket) -> bool:
        """A UDP data connection presented `token` (docs/channel.md, "UDP")."""
        return self.udp.attach(token, sock)

    def udp_release(self, local: Address) -> None:
        self.udp.release(local)

    # -- names -----------------------------------------------------------------------------------

    async def resolve(
        self, name: str, family: int, flags: int
    ) -> tuple[int, Sequence[IPAddress], str]:
        resolver = self.service.resolver
        if resolver is None:
            return 4, (), ""  # EAI_FAIL: the shim asks only when DNS= is set
        from wrapguard.runtime.dns import ResolveError

        try:
            addrs, canon = await resolver.resolve(name, family)
        except ResolveError as exc:
            self.log.debug("name not resolved", name=name, eai=exc.eai)
            return exc.eai, (), ""
        if flags & RESOLVE_ADDRCONFIG:
            addrs = [a for a in addrs if self.service.has_family(a.version)]
        return (0, addrs, canon) if addrs else (2, (), "")


__all__ = ["PreloadOutbound", "open_rcvbuf"]
