"""The launcher's run: tunnel engine + local channel + the wrapped program, on one loop.

`Launcher.run()` brings the engine up (UDP socket, handshakes for peers with
PersistentKeepalive), starts the channel server, runs the program with the shim preloaded, and
tears everything down on every exit path. `TunnelBackend` answers the shim's requests: routing
decisions, outbound TCP connections through the netstack, and inbound listeners whose tunnel
connections are relayed to the program's own listening socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import os
import secrets
import socket
from collections.abc import Sequence

from wrapguard import log, shim
from wrapguard.config import Config
from wrapguard.errors import WrapguardError
from wrapguard.netstack.events import ConnId
from wrapguard.routing import RoutingTable
from wrapguard.runtime.channel import ChannelServer, Decision
from wrapguard.runtime.child import raise_fd_limit, run_child
from wrapguard.runtime.dns import DnsResolver, ResolveError
from wrapguard.runtime.engine import Engine, IPAddress
from wrapguard.runtime.relay import TcpRelay, reset_socket
from wrapguard.runtime.udpassoc import UdpRelay
from wrapguard.tunnel.timers import TimerConfig
from wrapguard.wire.ipc import RESOLVE_ADDRCONFIG, Action, Address, Proto

GATE_DEADLINE = 5.0  # seconds for the GATE request to follow the token (the local step)
RELAY_RCVBUF = 1 << 20  # bytes; the kernel caps it at net.core.rmem_max
HELLO_TIMEOUT = 3.0  # compat.md: READY from the shim within 3 s
STATUS_KEEP = 60.0  # seconds an outcome stays askable after its flow ended


def _open_rcvbuf(sock: socket.socket) -> None:
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


class TunnelBackend:
    """The channel backend: what the shim's requests mean for the tunnel."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.log = log.get("wrapguard.backend")
        self.relays: dict[bytes, TcpRelay] = {}
        self.gates: dict[bytes, _Gate] = {}
        self.futures: dict[bytes, asyncio.Future[int]] = {}
        self.inbound: dict[tuple[str, int], tuple[Address, Address]] = {}
        self.listeners: dict[int, int] = {}  # port -> ListenerId
        self.tcp_bound: dict[int, dict[int, Address]] = {}  # port -> {4|6: what it bound}
        self.v6only: dict[int, bool] = {}  # port -> its AF_INET6 listener has IPV6_V6ONLY
        self.hellos = 0  # processes that loaded the shim
        self.hello_event = asyncio.Event()
        self._tasks: set[asyncio.Future[None]] = set()
        self.v4 = any(a.version == 4 for a in engine.addresses)
        self.v6 = any(a.version == 6 for a in engine.addresses)
        self.udp = UdpRelay(engine)
        self.resolver: DnsResolver | None = None  # set when the config has DNS=

    # -- requests ------------------------------------------------------------------------------

    def hello(self, pid: int, version: str) -> None:
        self.hellos += 1
        self.hello_event.set()
        self.log.debug("shim loaded", pid=pid, version=version)

    def route(self, proto: Proto, dst: Address) -> Decision:
        ip = dst.ip
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if ip.is_loopback or ip.is_unspecified:
            return Decision(Action.DIRECT)
        peer = self.engine.route(ip, int(proto), dst.port)
        if peer is None:
            return Decision(Action.DIRECT)
        if dst.port == 0:
            return Decision(Action.FAIL, errno.ECONNREFUSED)  # as the kernel answers port 0
        if (ip.version == 4 and not self.v4) or (ip.version == 6 and not self.v6):
            return Decision(Action.FAIL, errno.ENETUNREACH)
        return Decision(Action.TUNNEL)

    def open_tcp(
        self, dst: Address, token: bytes, gate: bool = False, src_port: int = 0
    ) -> Address | None:
        ip = dst.ip
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        def on_status(status: int) -> None:
            if not future.done():
                future.set_result(status)
            if status:
                self.log.debug("tunnel connect failed", dst=f"{ip}:{dst.port}", errno=status)
            if token in self.gates:
                self._gate_progress(token)

        relay = TcpRelay(self.engine, on_status=on_status, on_done=self._relay_done)
        relay.token = token
        cid = self.engine.connect(ip, dst.port, relay, src_port)
        relay.attach_conn(cid)
        self.relays[token] = relay
        self.futures[token] = future
        if gate:
            self.gates[token] = _Gate()
        local = self.engine.stack.conn_info(cid).local
        return Address(local[0], local[1])

    def tcp_attached(self, token: bytes, sock: socket.socket) -> None:
        relay = self.relays.get(token)
        g = self.gates.get(token)
        if relay is None:  # the flow already ended (a fast failure): the program sees a reset
            self.gates.pop(token, None)
            reset_socket(sock)
            return
        if g is None:
            _open_rcvbuf(sock)
            relay.attach_socket(sock)
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
        if relay is not None and relay.cid is not None:
            with contextlib.suppress(OSError):
                self.engine.stack.abort(relay.cid, self.engine.now())
            self.engine.schedule_flush()

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
            _open_rcvbuf(sock)
            relay.attach_socket(sock)

        g.sock = None  # from here on, discard() owns it
        loop.add_reader(sock.fileno(), discard)
        loop.call_soon(discard)

    def udp_assoc(self, local: Address, dst: Address) -> tuple[Decision, Address | None]:
        decision = self.route(Proto.UDP, dst)
        if decision.action is not Action.TUNNEL:
            return decision, None
        return decision, self.udp.assoc(local, dst)

    def udp_token(self, local: Address) -> bytes | None:
        return self.udp.token(local)

    def udp_release(self, local: Address) -> None:
        self.udp.release(local)

    async def resolve(
        self, name: str, family: int, flags: int
    ) -> tuple[int, Sequence[ipaddress.IPv4Address | ipaddress.IPv6Address], str]:
        if self.resolver is None:
            return 4, (), ""  # EAI_FAIL: the shim asks only when DNS= is set
        try:
            addrs, canon = await self.resolver.resolve(name, family)
        except ResolveError as exc:
            self.log.debug("name not resolved", name=name, eai=exc.eai)
            return exc.eai, (), ""
        if flags & RESOLVE_ADDRCONFIG:
            addrs = [a for a in addrs if (self.v4 if a.version == 4 else self.v6)]
        return (0, addrs, canon) if addrs else (2, (), "")

    def token_expired(self, token: bytes) -> None:
        self.gates.pop(token, None)
        relay = self.relays.pop(token, None)
        self.futures.pop(token, None)
        if relay is not None and relay.cid is not None:
            with contextlib.suppress(OSError):
                self.engine.stack.abort(relay.cid, self.engine.now())
            self.engine.schedule_flush()

    def status(self, token: bytes) -> asyncio.Future[int] | None:
        return self.futures.get(token)

    def _relay_done(self, relay: TcpRelay) -> None:
        if relay.token is not None:
            token = relay.token
            self.relays.pop(token, None)
            fut = self.futures.get(token)
            if fut is not None and not fut.done():
                fut.set_result(relay.status or errno.ECONNRESET)
            # The shim may ask STATUS after a fast failure: keep the outcome a while.
            asyncio.get_running_loop().call_later(STATUS_KEEP, self.futures.pop, token, None)
        if relay.inbound_key is not None:
            self.inbound.pop(relay.inbound_key, None)

    # -- inbound -------------------------------------------------------------------------------

    def listen(self, proto: Proto, addr: Address, v6only: bool = False) -> None:
        if proto == Proto.UDP:
            self.udp.bind(addr)
            return
        if proto != Proto.TCP:
            return
        port = addr.port
        bound = self.tcp_bound.setdefault(port, {})
        bound[addr.ip.version] = addr
        if addr.ip.version == 6:
            self.v6only[port] = v6only
        if port in self.listeners:
            return

        def on_accept(cid: ConnId) -> None:
            task = asyncio.ensure_future(self._inbound(cid, port))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        def accepts(local: bytes) -> bool:
            return self._listener_family(port, ipaddress.ip_address(local)) is not None

        self.listeners[port] = self.engine.listen(port, on_accept, accepts)
        self.log.info(
            "listening on the tunnel", port=port, addresses=[str(a) for a in self.engine.addresses]
        )

    def unlisten(self, proto: Proto, addr: Address) -> None:
        if proto != Proto.TCP:
            return
        bound = self.tcp_bound.get(addr.port, {})
        bound.pop(addr.ip.version, None)
        if bound:
            return  # the other family's listener on this port is still open
        self.tcp_bound.pop(addr.port, None)
        lid = self.listeners.pop(addr.port, None)
        if lid is not None:
            self.engine.unlisten(addr.port, lid)  # type: ignore[arg-type]
            self.log.info("stopped listening on the tunnel", port=addr.port)

    def _listener_family(self, port: int, local: IPAddress) -> int | None:
        """Which of the program's listeners on `port` takes a tunnel connection to `local`.

        An AF_INET listener takes IPv4 only; an AF_INET6 one takes IPv6, and IPv4 as
        v4-mapped when no AF_INET listener has the port (a dual-stack socket). A listener bound
        to one address takes only connections to that address."""

        def takes(addr: Address | None) -> bool:
            if addr is None:
                return False
            ip = addr.ip
            if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
                ip = ip.ipv4_mapped
            return ip.is_unspecified or ip == local

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

    async def _inbound(self, cid: ConnId, port: int) -> None:
        info = self.engine.stack.conn_info(cid)
        remote = Address(info.remote[0], info.remote[1])
        family = self._listener_family(port, info.local[0])
        if family is None:
            # No listener of this family/address: refuse, as the kernel would.
            with contextlib.suppress(OSError):
                self.engine.stack.abort(cid, self.engine.now())
            self.engine.schedule_flush()
            return
        relay = TcpRelay(self.engine, on_done=self._relay_done)
        relay.attach_conn(cid, established=True)
        host = "::1" if family == socket.AF_INET6 else "127.0.0.1"
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.bind((host, 0))
            local = sock.getsockname()
            key = (str(ipaddress.ip_address(local[0])), local[1])
            self.inbound[key] = (remote, Address(info.local[0], info.local[1]))
            relay.inbound_key = key
            await asyncio.get_running_loop().sock_connect(sock, (host, port))
        except OSError as exc:
            sock.close()
            self.log.warning("program's listener unreachable", port=port, error=str(exc))
            with contextlib.suppress(OSError):
                self.engine.stack.abort(cid, self.engine.now())
            self.engine.schedule_flush()
            return
        self.log.debug("tunnel connection in", client=f"{remote.ip}:{remote.port}", port=port)
        relay.attach_socket(sock)


class TunnelSession:
    """Everything a wrapped program needs on the loop: engine, backend, channel, UDP relay and
    resolver. `start_tunnel()` (the WireGuard socket), then `start_channel()`, then
    `child_env()`; `close()` on every exit path. Used by the launcher and by --self-test."""

    def __init__(
        self, config: Config, routing: RoutingTable, *, timers: TimerConfig | None = None
    ) -> None:
        self.config = config
        self.log = log.get("wrapguard.launcher")
        self.engine = Engine(config, routing, timers=timers)
        self.backend = TunnelBackend(self.engine)
        self.channel = ChannelServer(
            self.backend,
            secret=secrets.token_bytes(32),
            uid=os.getuid(),
            tunnel_addrs=self.engine.addresses,
        )

    async def start_tunnel(self) -> None:
        try:
            await self.engine.start()
        except OSError as exc:
            raise WrapguardError(f"cannot open the WireGuard UDP socket: {exc}") from None

    async def start_channel(self) -> None:
        backend, channel = self.backend, self.channel
        await channel.start()
        await backend.udp.start()
        channel.udp_env = backend.udp.env_value()
        iface = self.config.interface
        if iface.dns_servers:
            backend.resolver = DnsResolver(self.engine, iface.dns_servers, iface.dns_search)
            backend.resolver.start()
            channel.resolve_names = True
        else:
            self.log.info("no DNS= in the config: names resolve on the host, outside the tunnel")

    def child_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.channel.env())
        env[shim.ENV_PRELOAD] = shim.preload_value(env.get(shim.ENV_PRELOAD), shim.shim_path())
        return env

    def close(self) -> None:
        self.channel.close()
        self.backend.udp.close()
        if self.backend.resolver is not None:
            self.backend.resolver.close()
        self.engine.close()


class Launcher:
    """One run: everything up, the program to its end, everything down."""

    def __init__(
        self,
        config: Config,
        routing: RoutingTable,
        argv: Sequence[str],
        executable: str,
        *,
        timers: TimerConfig | None = None,
    ) -> None:
        self.config = config
        self.routing = routing
        self.argv = list(argv)
        self.executable = executable
        self.timers = timers
        self.log = log.get("wrapguard.launcher")

    async def run(self) -> int:
        shim_path = shim.shim_path()
        raise_fd_limit()
        session = TunnelSession(self.config, self.routing, timers=self.timers)
        try:
            await session.start_tunnel()
            await session.start_channel()
            self.log.debug("starting program", program=self.argv[0], shim=shim_path)
            return await run_child(
                self.argv,
                self.executable,
                session.child_env(),
                ready=session.backend.hello_event,
                ready_timeout=HELLO_TIMEOUT,
            )
        finally:
            session.close()


def run(config: Config, routing: RoutingTable, argv: Sequence[str], executable: str) -> int:
    """Run the program inside the tunnel; returns its exit status."""
    return asyncio.run(Launcher(config, routing, argv, executable).run())
