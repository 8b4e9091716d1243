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
import dataclasses
import errno
import ipaddress
import os
import secrets
import signal
import socket
from collections.abc import Sequence
from typing import TYPE_CHECKING

from wrapguard import log, shim
from wrapguard.config import Config
from wrapguard.errors import WrapguardError
from wrapguard.netstack.events import ConnId
from wrapguard.routing import RoutingTable
from wrapguard.runtime import lifetime, owners, rundir
from wrapguard.runtime.bypass import BypassList
from wrapguard.runtime.channel import ChannelServer, Decision
from wrapguard.runtime.child import FORWARDED, KILL_GRACE, raise_fd_limit, run_child
from wrapguard.runtime.dns import DNS_PORT, DnsResolver, ResolveError
from wrapguard.runtime.engine import Engine, IPAddress
from wrapguard.runtime.lifetime import StatusLink
from wrapguard.runtime.relay import TcpRelay, reset_socket
from wrapguard.runtime.service import FrontEnd, TunnelService
from wrapguard.runtime.udpassoc import UdpRelay
from wrapguard.tunnel.timers import TimerConfig
from wrapguard.wire.ipc import RESOLVE_ADDRCONFIG, Action, Address, Proto

if TYPE_CHECKING:
    from wrapguard.doors import Door
    from wrapguard.doors.seccomp import SeccompDoor
    from wrapguard.launch import Plan

GATE_DEADLINE = 5.0  # seconds for the GATE request to follow the token (the local step)
RELAY_RCVBUF = 1 << 20  # bytes; the kernel caps it at net.core.rmem_max
HELLO_TIMEOUT = 3.0  # compat.md: READY from the shim within 3 s
STATUS_KEEP = 60.0  # seconds an outcome stays askable after its flow ended
# Seconds without progress before a flow's undelivered data is given up (the environment
# variable is a test knob, documented in docs/testing.md).
DRAIN_STALL = float(os.environ.get("WRAPGUARD_TEST_DRAIN_STALL", "30"))
HOLDER_CHECK_EVERY = 2.0  # seconds between checks that the program's sockets still exist
ACCEPTED_TRIES = 25  # x 2 ms: how long the kernel may take to list an accepted connection
DRAIN_ANNOUNCE = 1.0  # seconds of draining before one log line says so
DRAIN_POLL = 0.02  # seconds between drain checks (the exit path only)
STAGED_STALL = 5.0  # seconds datagrams may wait for a handshake at exit (Rekey-Timeout [W 6.1])


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
        self._listening: dict[int, list[str]] = {}  # port -> tunnel addresses it takes (logged)
        self.hellos = 0  # processes that loaded the shim
        self.bypass = BypassList()  # the session shares its own (control socket, every door)
        self.frontend: FrontEnd | None = None  # the preload door, as /state shows it
        self._exit_watch: owners.ExitWatch | None = None
        self.hello_event = asyncio.Event()
        self._tasks: set[asyncio.Future[None]] = set()
        self.v4 = any(a.version == 4 for a in engine.addresses)
        self.v6 = any(a.version == 6 for a in engine.addresses)
        self.udp = UdpRelay(engine)
        self.udp.dns_target = self.dns_target  # its port-53 datagrams (docs/channel.md "DNS")
        self.dns_forwarded: set[IPAddress] = set()  # servers asked whose queries we answered
        self.resolver: DnsResolver | None = None  # set when the config has DNS=

    # -- requests ------------------------------------------------------------------------------

    def hello(self, pid: int, version: str) -> None:
        self.hellos += 1
        self.hello_event.set()
        self.log.debug("shim loaded", pid=pid, version=version)
        self._exits().watch(pid)

    # -- holders: listeners and associations end with the program's socket ----------------

    def _exits(self) -> owners.ExitWatch:
        if self._exit_watch is None:
            self._exit_watch = owners.ExitWatch(
                self.check_holders,
                lambda: bool(self.listeners or self.udp.assocs),
                HOLDER_CHECK_EVERY,
            )
        return self._exit_watch

    def check_holders(self) -> None:
        """End every listener and UDP association whose program socket no longer exists: a
        process that exited without close() must not leave its tunnel port to whoever binds
        the loopback port next (issue 11)."""
        me = os.geteuid()
        if self.listeners:
            # A listener ends when no socket of ours holds its port any more. Whose socket
            # accepts each relayed connection is checked as it comes (_accepted_uid).
            held = owners.tcp_listeners()
            for port in [p for p in self.listeners if all(u != me for u, _ in held.get(p, ()))]:
                self._drop_listener(port, "the program's listener is gone")
        if self.udp.assocs:
            bound = owners.udp_ports()
            for key in list(self.udp.assocs):
                takers = {u for u, ip in bound.get(key[1], ()) if owners.receives(ip, key[0])}
                if takers == {me}:
                    continue
                if takers - {me}:  # shared with another user (SO_REUSEADDR): never relay
                    self.log.warning(
                        "udp association ended: another user's socket shares its port",
                        port=key[1],
                    )
                else:
                    self.log.debug("udp association ended: its socket is gone", port=key[1])
                self.udp.release(key)

    def _drop_listener(self, port: int, why: str) -> None:
        self.tcp_bound.pop(port, None)
        self._listening.pop(port, None)
        lid = self.listeners.pop(port, None)
        if lid is not None:
            self.engine.unlisten(port, lid)  # type: ignore[arg-type]
            self.log.info("stopped listening on the tunnel", port=port, reason=why)

    def close(self) -> None:
        if self._exit_watch is not None:
            self._exit_watch.close()

    def route(self, proto: Proto, dst: Address) -> Decision:
        ip = dst.ip
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if self._dns_forwarded(ip, dst.port, proto):
            target = self.dns_target(ip, dst.port, proto)
            if target is None or not (self.v4 if target[0].version == 4 else self.v6):
                return Decision(Action.FAIL, errno.ENETUNREACH)  # never the host's resolver
            return Decision(Action.TUNNEL)
        if ip.is_loopback or ip.is_unspecified or self.bypass.contains(ip):
            return Decision(Action.DIRECT)
        peer = self.engine.route(ip, int(proto), dst.port)
        if peer is None:
            return Decision(Action.DIRECT)
        if dst.port == 0:
            return Decision(Action.FAIL, errno.ECONNREFUSED)  # as the kernel answers port 0
        if (ip.version == 4 and not self.v4) or (ip.version == 6 and not self.v6):
            return Decision(Action.FAIL, errno.ENETUNREACH)
        return Decision(Action.TUNNEL)

    def dns_captured(self, ip: IPAddress, port: int, proto: int) -> bool:
        return self._dns_forwarded(ip, port, proto)

    def _dns_forwarded(self, ip: IPAddress, port: int, proto: int) -> bool:
        """A DNS query (port 53, TCP or UDP) to a server outside the tunnel, with DNS= set."""
        if self.resolver is None or port != DNS_PORT or proto not in (Proto.TCP, Proto.UDP):
            return False
        return ip.is_loopback or ip.is_unspecified or self.engine.route(ip, proto, port) is None

    def dns_target(
        self, ip: IPAddress, port: int, proto: int = Proto.UDP
    ) -> tuple[IPAddress, int] | None:
        """Where a query the program sends itself really goes (docs/channel.md "DNS").

        With DNS= set, port 53 of an address not routed into the tunnel (the host's
        resolv.conf servers, such as 127.0.0.53) would reach the host's resolver: the query
        goes to the first tunnel DNS server instead, and its replies come back as if from
        the address asked. None: send it as asked."""
        if not self._dns_forwarded(ip, port, proto):
            return None
        server = self.resolver.forward_server() if self.resolver is not None else None
        if server is None:
            return None
        if ip not in self.dns_forwarded:
            self.dns_forwarded.add(ip)
            self.log.info(
                "DNS queries answered through the tunnel", asked=str(ip), server=str(server)
            )
        return server, DNS_PORT

    def open_tcp(
        self, dst: Address, token: bytes, gate: bool = False, src_port: int = 0
    ) -> Address | None:
        ip = dst.ip
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        port = dst.port
        target = self.dns_target(ip, port, Proto.TCP)
        if target is not None:
            ip, port = target
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        def on_status(status: int) -> None:
            if not future.done():
                future.set_result(status)
            if status:
                self.log.debug("tunnel connect failed", dst=f"{ip}:{port}", errno=status)
            if token in self.gates:
                self._gate_progress(token)

        relay = TcpRelay(self.engine, on_status=on_status, on_done=self._relay_done)
        relay.token = token
        if self.frontend is not None:
            self.frontend.flows += 1
        cid = self.engine.connect(ip, port, relay, src_port)
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
            self.engine.abort(relay.cid)

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
        target = self.dns_target(dst.ip, dst.port)  # the shim sends v4-mapped as IPv4
        self._exits().poke()
        # our source in the family of where the datagrams really go
        return decision, self.udp.assoc(local, dst if target is None else Address(*target))

    def udp_token(self, local: Address) -> bytes | None:
        return self.udp.token(local)

    def udp_attached(self, token: bytes, sock: socket.socket) -> bool:
        """A UDP data connection presented `token` (docs/channel.md, "UDP")."""
        return self.udp.attach(token, sock)

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
            self.engine.abort(relay.cid)

    def status(self, token: bytes) -> asyncio.Future[int] | None:
        return self.futures.get(token)

    def _relay_done(self, relay: TcpRelay) -> None:
        if relay.token is not None:
            token = relay.token
            self.relays.pop(token, None)
            fut = self.futures.get(token)
            if fut is not None and not fut.done():
                fut.set_result(relay.status or errno.ECONNRESET)
            elif fut is not None and relay.end_errno:
                # An open flow that died: STATUS now says why (the shim reports it instead
                # of the loopback reset's ECONNRESET, docs/channel.md "STATUS").
                ended: asyncio.Future[int] = asyncio.get_running_loop().create_future()
                ended.set_result(relay.end_errno)
                self.futures[token] = ended
            # The shim may ask STATUS after a fast failure: keep the outcome a while.
            asyncio.get_running_loop().call_later(STATUS_KEEP, self.futures.pop, token, None)
        if relay.inbound_key is not None:
            self.inbound.pop(relay.inbound_key, None)

    # -- inbound -------------------------------------------------------------------------------

    def listen(self, proto: Proto, addr: Address, v6only: bool = False) -> None:
        self._exits().poke()
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
        takes = [str(a) for a in self.engine.addresses if self._listener_family(port, a)]
        if port in self.listeners:
            if takes != self._listening.get(port):
                self._listening[port] = takes
                self.log.info("listening on the tunnel", port=port, addresses=takes)
            return

        def on_accept(cid: ConnId) -> None:
            task = asyncio.ensure_future(self._inbound(cid, port))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        def accepts(local: bytes) -> bool:
            return self._listener_family(port, ipaddress.ip_address(local)) is not None

        self.listeners[port] = self.engine.listen(port, on_accept, accepts)
        self._listening[port] = takes
        self.log.info("listening on the tunnel", port=port, addresses=takes)

    def unlisten(self, proto: Proto, addr: Address) -> None:
        if proto != Proto.TCP:
            return
        bound = self.tcp_bound.get(addr.port, {})
        bound.pop(addr.ip.version, None)
        if bound:
            return  # the other family's listener on this port is still open
        self._drop_listener(addr.port, "closed by the program")

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
            self.engine.abort(cid)
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
            uid = await _accepted_uid((host, port), local)
            if uid != os.geteuid():
                # Not our program's socket: it exited without close() and someone else holds
                # the port now. Refuse, and stop listening there.
                reset_socket(sock)
                self._drop_listener(port, "the port is held by another user's socket")
                self.log.warning(
                    "refused a tunnel connection: the program's listener is gone and another "
                    "user's socket holds its loopback port",
                    port=port,
                    uid=uid,
                )
                self.engine.abort(cid)
                return
        except OSError as exc:
            sock.close()
            self.log.warning("program's listener unreachable", port=port, error=str(exc))
            self.engine.abort(cid)
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
        self.bypass = self.backend.bypass
        self.key_lock = rundir.KeyLock()
        self._owner_fd: int | None = None  # launcher.pid, locked while we run
        self.service = TunnelService(self)
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
        assert channel.directory is not None
        self._owner_fd = rundir.mark_owner(channel.directory)
        parent = os.path.dirname(channel.directory)
        rundir.sweep_stale(parent, keep=channel.directory)
        other = self.key_lock.acquire(parent, self.config.interface.private_key.public_key().raw)
        if other is not None:
            self.log.warning(
                "another wrapguard uses this private key: the peer keeps one endpoint per key "
                "and follows whichever client handshook last, so the two will take the tunnel "
                "from each other (give each client its own key)",
                other_pid=other if other > 0 else None,
            )
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

    async def drain(self, stall: float = DRAIN_STALL, abandon: asyncio.Event | None = None) -> None:
        """Stay until every byte the program sent is acknowledged by the peer (its FIN too)
        and every datagram it sent has left (a handshake may be under way), giving up after
        `stall` seconds without progress (datagrams: STAGED_STALL), or at once when
        `abandon` is set (a stop signal): one warning naming each flow and what was left
        undelivered, and a reset, so the peer does not wait forever."""
        loop = asyncio.get_running_loop()
        self.backend.udp.take_queued()
        self.engine.flush()
        started = since = loop.time()
        mark: tuple[int, int, int] | None = None
        announced = False
        while True:
            pending = [
                h for h in list(self.engine.handlers.values())
                if isinstance(h, TcpRelay) and not h.delivered()
            ]  # fmt: skip
            staged = self._staged_datagrams()
            if not pending and not staged:
                return
            now_mark = (len(pending), sum(h.undelivered() for h in pending), staged)
            now = loop.time()
            if now_mark != mark:
                mark, since = now_mark, now
            stopped = abandon is not None and abandon.is_set()
            limit = stall if pending else min(stall, STAGED_STALL)
            if stopped or now - since >= limit:
                why = "stopped by a signal" if stopped else "no progress"
                for h in pending:
                    self.log.warning(
                        f"flow reset with data undelivered: {why}",
                        flow=h.describe(),
                        undelivered_bytes=h.undelivered(),
                        stalled_s=round(now - since, 1),
                    )
                    h.abort()
                if staged:
                    self.log.warning(
                        f"datagrams never sent: the peer did not answer our handshake ({why})",
                        datagrams=staged,
                    )
                self.engine.flush()
                return
            if not announced and now - started >= DRAIN_ANNOUNCE:
                announced = True
                self.log.info(
                    "delivering what the program sent before it exited",
                    flows=now_mark[0],
                    undelivered_bytes=now_mark[1],
                    datagrams=staged,
                )
            await asyncio.sleep(DRAIN_POLL)

    def _staged_datagrams(self) -> int:
        """UDP packets waiting in the peers' staged queues for a handshake (TCP segments
        there are the flows' own business: they retransmit and are drained as flows)."""
        n = 0
        for peer in self.engine.device.peers:
            for pkt in peer.staged:
                proto = pkt[9] if pkt[0] >> 4 == 4 else pkt[6]
                n += proto == 17
        return n

    def stats(self) -> dict[str, object]:
        """Every counter the run kept: traffic, and each drop by its reason (non-zero only)."""
        engine = self.engine
        return {
            "wireguard_udp": dict(engine.wg.stats),
            "tunnel_drops": {r.name: n for r, n in engine.device.counters.items() if n},
            "stack_drops": {r.name: n for r, n in engine.stack.drops.items() if n},
            "unrouted_drops": engine.unrouted_drops,
            "channel": dataclasses.asdict(self.channel.stats),
            "udp_relay": dataclasses.asdict(self.backend.udp.stats),
        }

    def close(self) -> None:
        with contextlib.suppress(Exception):  # counters must never stop the teardown
            self.log.info("run statistics", **self.stats())
        self.key_lock.release()
        if self._owner_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._owner_fd)
            self._owner_fd = None
        self.backend.close()
        self.channel.close()
        self.backend.udp.close()
        if self.backend.resolver is not None:
            self.backend.resolver.close()
        self.engine.close()


class Launcher:
    """One run: everything up, the program to its end (or, with no program, a proxy daemon
    until SIGINT/SIGTERM), the tunnel for as long as it is used, every flow drained,
    everything down (docs/architecture.md, "Lifetime")."""

    def __init__(
        self,
        plan: Plan,
        executable: str | None,
        *,
        timers: TimerConfig | None = None,
        link: StatusLink | None = None,
    ) -> None:
        self.plan = plan
        self.config = plan.config
        self.routing = plan.routing
        self.argv = list(plan.options.command)
        self.executable = executable
        self.timers = timers
        self.link = link or StatusLink(None, None)
        self.log = log.get("wrapguard.launcher")
        self.doors: list[Door] = []
        self.seccomp: SeccompDoor | None = None

    async def _start_doors(self, service: TunnelService) -> None:
        """The control socket, then each proxy the flags or the config ask for."""
        if self.plan.control is not None:
            from wrapguard.control import server as control

            path = self.plan.control
            try:
                ctl: Door = await control.start(service, path)
            except (WrapguardError, OSError):
                if self.plan.options.control is not None:
                    raise  # the user's own path: say why it cannot be used
                # The default path is taken (another run with the same config): one per run.
                root, ext = os.path.splitext(path)
                ctl = await control.start(service, f"{root}-{os.getpid()}{ext}")
            self.doors.append(ctl)
            self.log.info("control socket", path=ctl.address)
        for spec in self.plan.proxies:
            if spec.kind == "socks5":
                from wrapguard.doors import socks5 as module
            else:
                from wrapguard.doors import httpproxy as module  # type: ignore[no-redef]
            try:
                door: Door = await module.start(service, spec)
            except OSError as exc:
                raise WrapguardError(
                    f"cannot listen for the {spec.kind} proxy on {spec.address}: "
                    f"{exc.strerror or exc}"
                ) from None
            self.doors.append(door)
            self.log.info(f"{spec.kind} proxy listening", address=door.address, auth=spec.auth)

    async def _close_doors(self) -> None:
        for door in reversed(self.doors):
            with contextlib.suppress(Exception):
                await door.close()
        self.doors.clear()
        if self.plan.control is not None and self.plan.options.control is None:
            # The default directory (or a private fallback made for this run): leave nothing
            # behind once the last run using it is gone (rmdir fails while it is not empty).
            with contextlib.suppress(OSError):
                os.rmdir(os.path.dirname(self.plan.control))

    async def run(self) -> int:
        shim_path = shim.shim_path()
        raise_fd_limit()
        session = TunnelSession(self.config, self.routing, timers=self.timers)
        forwarded: list[signal.Signals] = []
        try:
            await session.start_tunnel()
            await session.start_channel()
            await self._start_doors(session.service)
            if self.executable is None:
                status = await self._serve(session)
            else:
                status = await self._wrap(session, shim_path, forwarded)
        finally:
            await self._close_doors()
            session.close()
        self.link.report(status)  # everything is closed: the caller may go on
        return status

    async def _serve(self, session: TunnelSession) -> int:
        """The proxy daemon: until SIGINT/SIGTERM/SIGHUP; then the doors close and the flows
        drain (briefly: the user asked us to stop). Exit status 0."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in FORWARDED:
            loop.add_signal_handler(sig, stop.set)
        try:
            self.log.info("serving until SIGINT or SIGTERM", pid=os.getpid())
            await stop.wait()
            self.log.info("stopping")
            await self._close_doors()
            stop.clear()
            await session.drain(min(KILL_GRACE, DRAIN_STALL), abandon=stop)
        finally:
            for sig in FORWARDED:
                loop.remove_signal_handler(sig)
        return 0

    async def _start_seccomp(self, session: TunnelSession) -> SeccompDoor | None:
        """The seccomp door, when this system can run it (docs/seccomp.md): for the program
        itself (--intercept seccomp, or a static/Go program), and for the static or Go
        programs a shimmed program execs later (csrc/exec.c hands them to its helper)."""
        from wrapguard.intercept import seccomp_unavailable

        why = seccomp_unavailable()
        if why is not None:
            self.log.debug("no seccomp door", reason=why)
            return None
        from wrapguard.doors import seccomp

        assert session.channel.directory is not None
        try:
            door = await seccomp.start(session.service, session.channel.directory)
        except OSError as exc:
            if self.plan.door == "seccomp":
                raise WrapguardError(f"cannot start the seccomp door: {exc}") from None
            self.log.warning(
                "no seccomp door: static and Go programs a wrapped program starts will be refused",
                error=str(exc),
            )
            return None
        self.doors.append(door)
        self.seccomp = door
        return door

    async def _wrap(
        self, session: TunnelSession, shim_path: str, forwarded: list[signal.Signals]
    ) -> int:
        assert self.executable is not None
        argv, executable = self.argv, self.executable
        # --intercept preload: the shim alone (static and Go programs refused, as before)
        door = (
            None if self.plan.options.intercept == "preload" else await self._start_seccomp(session)
        )
        if self.plan.door == "seccomp":
            assert door is not None  # launch.choose_door checked that it can run
            argv = door.helper_argv(executable, argv)
            executable = argv[0]
            env = dict(os.environ)
            ready = door.ready
            self.log.debug("starting program", program=self.argv[0], door="seccomp")
        else:
            session.backend.frontend = session.service.add_frontend(
                FrontEnd("preload", address=session.channel.ctl_path or "")
            )
            env = session.child_env()
            if door is not None:  # a static or Go program exec'ed later goes through it
                env.update(door.env())
            ready = session.backend.hello_event
            self.log.debug("starting program", program=self.argv[0], shim=shim_path)
        loop = asyncio.get_running_loop()
        program: list[int] = []

        def started(pgid: int) -> None:  # the program leads its own group: pgid == pid
            program.append(pgid)
            self.link.program_started(pgid)

        def reap() -> None:  # orphans come to us (subreaper): reap them as they exit
            if program:
                lifetime.reap_except(program[0])

        loop.add_signal_handler(signal.SIGCHLD, reap)
        try:
            status = await run_child(
                argv,
                executable,
                env,
                ready=ready,
                ready_timeout=HELLO_TIMEOUT,
                on_started=started,
                forwarded=forwarded,
            )
        finally:
            loop.remove_signal_handler(signal.SIGCHLD)
        self.link.program_gone()
        after = lifetime.Afterlife(self.log)
        after.install()
        try:
            if forwarded:  # the user asked the program to stop: so do what it left
                after.stop_children(signal.SIGTERM)
            if lifetime.reap():
                # The program left processes behind: they keep the tunnel; the caller gets
                # the program's status now.
                self.log.info(
                    "program exited; the tunnel stays up in the background for the "
                    "processes it started (SIGTERM to the launcher ends them)",
                    status=status,
                    pids=lifetime.children(),
                    launcher_pid=os.getpid(),
                )
                self.link.report(status)
                lifetime.release_stdio()
                await after.outlive()
                self.log.info("the last wrapped process exited: tunnel down")
                if after.stopping.is_set():
                    forwarded.append(signal.SIGTERM)
                after.stopping.clear()  # that signal was for them; a new one ends the drain
            # The doors (proxies) close with the program; then what was handed over drains.
            # Stopped by a signal: deliver, but do not wait long for a peer that does not
            # answer (the user asked us to end).
            await self._close_doors()
            stall = min(KILL_GRACE, DRAIN_STALL) if forwarded else DRAIN_STALL
            await session.drain(stall, abandon=after.stopping)
        finally:
            after.remove()
        return status


def run(plan: Plan, executable: str | None, link: StatusLink | None = None) -> int:
    """Run the program inside the tunnel (or, with none, the proxy daemon); returns the exit
    status."""
    return asyncio.run(Launcher(plan, executable, link=link).run())
