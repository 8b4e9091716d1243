"""The SOCKS5 door (RFC 1928, RFC 1929 username/password): a proxy any local program can use.

Each accepted connection runs `socks5_proto.ServerConn` up to its request. CONNECT resolves
a name with `TunnelService.resolve()` (the tunnel's DNS= servers when set: socks5h never
asks the host), tries the addresses in order (IPv4 first), and by `route()` joins the client
to a tunnel flow (`TcpRelay`) or to a direct host connection (`relayio.splice`); the reply
code says what happened. UDP ASSOCIATE opens a `_Association`: a UDP socket of ours next to
the listener, RFC 1928 7 datagrams both ways, ended with its TCP connection. Bounded: at most
`MAX_CONNECTIONS` connections, `MAX_HANDSHAKES` of them negotiating, each within
`HANDSHAKE_TIMEOUT`; bad input gets a reply code or a close, counted in `drops`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import socket
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from wrapguard import log
from wrapguard.doors import ProxySpec, relayio
from wrapguard.doors.socks5_proto import (
    EARLY_MAX,
    HANDSHAKE_TIMEOUT,
    Close,
    Cmd,
    Host,
    Rep,
    Requested,
    Send,
    ServerConn,
    State,
    emit_udp_datagram,
    host_ip,
    parse_udp_datagram,
    rep_for_errno,
)
from wrapguard.errors import DecodeError, WrapguardError
from wrapguard.runtime.relay import reset_socket
from wrapguard.runtime.service import TCP, UDP, FrontEnd, TunnelService, UdpFlow, Way, plain

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

MAX_CONNECTIONS = 1024  # open client connections the door serves at once (then: backlog)
MAX_HANDSHAKES = 128  # of those, still negotiating (more are closed at once: "busy")
LISTEN_BACKLOG = 512
RECV = 4096  # bytes per read while negotiating (a whole request is < 600)
RESOLVE_TIMEOUT = 30.0  # s for a name
TUNNEL_CONNECT_TIMEOUT = 75.0  # s for a tunnel connect (the netstack gives up by itself too)
LINGER = 2.0  # s we read (and discard) after a failure reply, so the reply is not lost to a RST
UDP_MAX = 65535
UDP_BATCH = 64  # datagrams read per readable callback
UDP_NAMES = 64  # names an association remembers
UDP_PENDING = 32  # datagrams an association holds while their names resolve
UDP_DIRECT_PEERS = 256  # direct destinations whose replies an association lets back in
UDP_DNS_REMEMBERED = 256  # captured DNS queries per association whose replies map back
# When several addresses fail, report the most telling failure (refused beats unreachable).
_WEAK = {errno.ENETUNREACH: 0, errno.EHOSTUNREACH: 1}


def _hostport(host: object, port: int) -> str:
    text = str(host)
    return f"[{text}]:{port}" if ":" in text else f"{text}:{port}"


def _ip(text: str) -> IPAddress:
    return plain(ipaddress.ip_address(text.split("%", 1)[0]))


class Socks5Door:
    """A running SOCKS5 proxy: listeners, the connections they serve, and their counters."""

    def __init__(self, service: TunnelService, spec: ProxySpec) -> None:
        self.service = service
        self.spec = spec
        self.log = log.get("wrapguard.socks5")
        self._creds = (
            None
            if spec.username is None
            else (spec.username.encode(), (spec.password or "").encode())
        )
        self.address = ""
        self.drops: dict[str, int] = {}
        self.frontend = FrontEnd("socks5", auth=spec.auth, extra={"drops": self.drops})
        self._listeners: list[socket.socket] = []
        self._accepters: list[asyncio.Task[None]] = []
        self._conns: set[asyncio.Task[None]] = set()
        self._handshaking = 0
        self._room = asyncio.Event()
        self._closed = False
        self.handshake_timeout = HANDSHAKE_TIMEOUT

    def drop(self, reason: str, n: int = 1) -> None:
        self.drops[reason] = self.drops.get(reason, 0) + n

    # -- listening ----------------------------------------------------------------------------

    async def open(self) -> None:
        spec = self.spec
        hosts = await _bind_hosts(spec.host)
        port = spec.port
        errors: list[str] = []
        for host in hosts:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    # "::" serves IPv4 too (as most servers do); "::1" and the like only IPv6.
                    both = ipaddress.ip_address(host).is_unspecified
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if both else 1)
                sock.bind((host, port))
                sock.listen(LISTEN_BACKLOG)
                sock.setblocking(False)
            except OSError as exc:
                sock.close()
                errors.append(f"{_hostport(host, port)}: {exc.strerror or exc}")
                continue
            port = sock.getsockname()[1]  # port 0: every address gets the first one's port
            self._listeners.append(sock)
        if not self._listeners or (errors and spec.host != "localhost"):
            for sock in self._listeners:
                sock.close()
            raise WrapguardError(f"cannot listen for SOCKS5 on {'; '.join(errors)}")
        first = self._listeners[0].getsockname()
        self.address = _hostport(first[0], first[1])
        self.frontend.address = self.address
        self.service.add_frontend(self.frontend)
        self._room.set()
        for sock in self._listeners:
            self._accepters.append(asyncio.create_task(self._accept_loop(sock)))
        self.log.debug(
            "SOCKS5 listeners",
            address=", ".join(_hostport(*s.getsockname()[:2]) for s in self._listeners),
            auth="username/password" if self._creds else "none",
        )

    async def close(self) -> None:
        """Stop listening and end the connections the door still serves (direct relays,
        UDP associations, handshakes). Tunnel flows already handed to a TcpRelay belong to
        the session, which drains them like the shim's."""
        if self._closed:
            return
        self._closed = True
        tasks = [*self._accepters, *self._conns]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for sock in self._listeners:
            sock.close()
        self._listeners.clear()

    async def _accept_loop(self, lsock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while len(self._conns) >= MAX_CONNECTIONS:
                self._room.clear()
                await self._room.wait()  # the kernel's backlog holds the rest meanwhile
            try:
                sock, peer = await loop.sock_accept(lsock)
            except OSError as exc:
                self.drop("accept_failed")
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    await asyncio.sleep(0.1)  # out of descriptors: let some close first
                continue
            if self._handshaking >= MAX_HANDSHAKES:
                self.drop("busy")
                reset_socket(sock)
                continue
            task = asyncio.create_task(self._serve(sock, peer))
            self._conns.add(task)
            task.add_done_callback(self._conn_done)

    def _conn_done(self, task: asyncio.Task[None]) -> None:
        self._conns.discard(task)
        self._room.set()

    # -- one connection -----------------------------------------------------------------------

    async def _serve(self, sock: socket.socket, peer: Any) -> None:
        loop = asyncio.get_running_loop()
        sock.setblocking(False)
        client = _hostport(peer[0], peer[1])
        core = ServerConn(self._creds, loop.time(), self.handshake_timeout)
        owned = True  # False once a TcpRelay took the socket
        self._handshaking += 1
        negotiating = True
        try:
            req = await self._negotiate(sock, core)
            self._handshaking -= 1
            negotiating = False
            if req is None:
                if core.state is State.CLOSED:  # we ended it: let the last reply arrive
                    await _linger_close(sock)
                return
            if req.cmd == Cmd.CONNECT:
                owned = not await self._connect(sock, core, req, client)
            else:
                await self._associate(sock, core, req, peer, client)
        except OSError:
            pass  # the client went away
        except Exception as exc:  # one connection's bug must not stop the door
            self.drop("internal_error")
            self.log.warning("SOCKS5 connection failed", client=client, error=repr(exc))
        finally:
            if negotiating:
                self._handshaking -= 1
            if owned:
                sock.close()

    async def _negotiate(self, sock: socket.socket, core: ServerConn) -> Requested | None:
        loop = asyncio.get_running_loop()
        while True:
            deadline = core.next_deadline()
            try:
                async with asyncio.timeout_at(deadline):
                    data = await loop.sock_recv(sock, RECV)
            except TimeoutError:
                outs = core.handle_timeout(loop.time())
            else:
                if not data:
                    return None
                outs = core.receive(data, loop.time())
            for out in outs:
                if isinstance(out, Requested):
                    return out
                if not await self._emit(sock, out, linger=False):
                    return None

    async def _emit(
        self, sock: socket.socket, out: Send | Close | Requested, *, linger: bool = True
    ) -> bool:
        """Carry out a core output; False once the connection is to close."""
        if isinstance(out, Send):
            await asyncio.get_running_loop().sock_sendall(sock, out.data)
            return True
        if isinstance(out, Close):
            if not out.reason.startswith("rep_"):
                self.drop(out.reason)
            if linger:
                await _linger_close(sock)
            return False
        return True

    async def _reply(
        self, sock: socket.socket, core: ServerConn, rep: Rep, bound: tuple[Host, int] | None
    ) -> bool:
        """Send the reply; True when it was a success (the connection goes on)."""
        outs = core.reply(rep, *bound) if bound is not None else core.reply(rep)
        for out in outs:
            if not await self._emit(sock, out):
                return False
        return rep == Rep.SUCCEEDED

    async def resolve(self, host: Host) -> list[IPAddress]:
        """The addresses to try for a request's host, IPv4 first. OSError(EHOSTUNREACH) when
        a name has none."""
        ip = host_ip(host)
        if ip is not None:
            return [plain(ip)]
        assert isinstance(host, str)
        try:
            async with asyncio.timeout(RESOLVE_TIMEOUT):
                addrs = await self.service.resolve(host)
        except (OSError, TimeoutError, ValueError) as exc:  # ValueError: IDNA refused the name
            raise OSError(errno.EHOSTUNREACH, f"{host}: not found ({exc})") from None
        ordered = sorted((plain(a) for a in addrs), key=lambda a: a.version)
        if not ordered:
            raise OSError(errno.EHOSTUNREACH, f"{host}: not found")
        return ordered

    async def _connect(
        self, sock: socket.socket, core: ServerConn, req: Requested, client: str
    ) -> bool:
        """CONNECT; True when the socket was handed to a TcpRelay (it owns it now)."""
        target = _hostport(req.host, req.port)
        try:
            ips = await self.resolve(req.host)
        except OSError as exc:
            self._log_flow(client, "connect", target, "-", Rep.HOST_UNREACHABLE, str(exc))
            await self._reply(sock, core, Rep.HOST_UNREACHABLE, None)
            return False
        err = 0
        for ip in ips:
            route = self.service.route(TCP, ip, req.port)
            if route.way is Way.FAIL:
                err = _telling(err, route.errno or errno.ENETUNREACH)
                continue
            if route.way is Way.TUNNEL:
                status = await self._tunnel(sock, core, ip, req.port, client, target)
                if status == 0:
                    return True
                err = _telling(err, status)
                continue
            try:
                upstream = await relayio.connect(ip, req.port)
            except OSError as exc:
                err = _telling(err, exc.errno or errno.EHOSTUNREACH)
                continue
            return await self._direct(sock, core, upstream, client, target)
        rep = rep_for_errno(err)
        self._log_flow(client, "connect", target, "-", rep, errno.errorcode.get(err, str(err)))
        await self._reply(sock, core, rep, None)
        return False

    async def _tunnel(
        self, sock: socket.socket, core: ServerConn, ip: IPAddress, port: int, client: str,
        target: str,
    ) -> int:  # fmt: skip
        """One tunnel connect; 0 when the client is joined to it, else the errno."""
        try:
            relay, outcome = self.service.open_tcp(ip, port)
        except OSError as exc:  # no local port left, and the like
            return exc.errno or errno.EADDRNOTAVAIL
        joined = False
        try:
            try:
                async with asyncio.timeout(TUNNEL_CONNECT_TIMEOUT):
                    status = await outcome
            except TimeoutError:
                status = errno.ETIMEDOUT
            if status:
                return status
            local = relay.local()
            bound: tuple[Host, int] = (
                (ipaddress.ip_address(local[0]), local[1])
                if local
                else (ipaddress.IPv4Address(0), 0)
            )
            await self._reply(sock, core, Rep.SUCCEEDED, bound)
            relay.attach_socket(sock, core.take_early())
            joined = True
            self.frontend.flows += 1
            self._log_flow(client, "connect", target, "tunnel", Rep.SUCCEEDED, str(ip))
            return 0
        finally:
            if not joined:
                relay.abort()

    async def _direct(
        self, sock: socket.socket, core: ServerConn, upstream: socket.socket, client: str,
        target: str,
    ) -> bool:  # fmt: skip
        try:
            name = upstream.getsockname()
            bound = (ipaddress.ip_address(name[0].split("%", 1)[0]), name[1])
            if not await self._reply(sock, core, Rep.SUCCEEDED, bound):
                return False
            self.frontend.flows += 1
            peer = upstream.getpeername()
            self._log_flow(client, "connect", target, "direct", Rep.SUCCEEDED, str(peer[0]))
            await relayio.splice(sock, upstream, a_to_b=core.take_early())
        finally:
            upstream.close()
        return False

    def _log_flow(
        self, client: str, cmd: str, target: str, via: str, rep: Rep, detail: str = ""
    ) -> None:
        self.log.debug(
            "socks5 flow", client=client, cmd=cmd, target=target, via=via,
            reply=rep.name.lower(), detail=detail,
        )  # fmt: skip

    # -- UDP ASSOCIATE ------------------------------------------------------------------------

    async def _associate(
        self, sock: socket.socket, core: ServerConn, req: Requested, peer: Any, client: str
    ) -> None:
        loop = asyncio.get_running_loop()
        # RFC 1928 7: only datagrams from the client's IP (that of this TCP connection) are
        # taken; DST.PORT, when not zero, names its UDP port, else the first datagram does.
        # (DST.ADDR is not used: the TCP connection already says where the client is.)
        local_ip = sock.getsockname()[0]
        try:
            assoc = _Association(self, _ip(peer[0]), req.port or None, local_ip)
        except OSError as exc:
            self._log_flow(client, "udp", "-", "-", Rep.GENERAL_FAILURE, str(exc))
            await self._reply(sock, core, Rep.GENERAL_FAILURE, None)
            return
        bound = assoc.usock.getsockname()
        try:
            if not await self._reply(sock, core, Rep.SUCCEEDED, (_ip(bound[0]), bound[1])):
                return
            self.frontend.flows += 1
            # The association lives as long as this connection (RFC 1928 7); what the client
            # sends on it means nothing and is discarded.
            while await loop.sock_recv(sock, RECV):
                pass
        except OSError:
            pass
        finally:
            assoc.close()
            self.log.debug(
                "socks5 flow", client=client, cmd="udp", relay=_hostport(*bound[:2]),
                reply="succeeded", **assoc.counts,
            )  # fmt: skip


class _Association:
    """One UDP ASSOCIATE: the client's datagrams out (tunnel or direct per destination),
    replies back with a header naming their real source."""

    def __init__(
        self, door: Socks5Door, client_ip: IPAddress, client_port: int | None, local_ip: str
    ) -> None:
        self.door = door
        self.service = door.service
        self.loop = asyncio.get_running_loop()
        self.client_ip = client_ip
        self.client_port = client_port
        family = socket.AF_INET6 if ":" in local_ip else socket.AF_INET
        # A dual-stack listener's IPv4 clients are IPv4-mapped on our IPv6 socket.
        self.client_host = (
            f"::ffff:{client_ip}"
            if family == socket.AF_INET6 and client_ip.version == 4
            else str(client_ip)
        )
        self.usock = socket.socket(family, socket.SOCK_DGRAM)
        self.client_family = family
        try:
            self.usock.bind((local_ip, 0))
            self.usock.setblocking(False)
        except OSError:
            self.usock.close()
            raise
        self.loop.add_reader(self.usock.fileno(), self._readable, self.usock, self._from_client)
        self.flow: UdpFlow | None = None
        self.direct: dict[int, socket.socket] = {}  # IP version -> our host UDP socket
        self.direct_peers: OrderedDict[tuple[IPAddress, int], None] = OrderedDict()
        # DNS queries sent to the tunnel DNS server in place of an outside one, by (server,
        # port, message id): the reply comes back as from the address the client asked.
        self.dns_asked: OrderedDict[tuple[IPAddress, int, bytes], tuple[IPAddress, int]] = (
            OrderedDict()
        )
        self.names: OrderedDict[str, IPAddress] = OrderedDict()
        self.pending: dict[str, list[tuple[int, bytes]]] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self.counts = {"to_destination": 0, "to_client": 0}
        self.closed = False

    def drop(self, reason: str) -> None:
        self.door.drop(f"udp_{reason}")

    def _readable(self, sock: socket.socket, handle: Callable[[bytes, Any], None]) -> None:
        for _ in range(UDP_BATCH):
            try:
                data, addr = sock.recvfrom(UDP_MAX)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # an ICMP error reported on the socket: nothing to relay
            handle(data, addr)
            if self.closed:
                return

    # client -> destination

    def _from_client(self, data: bytes, addr: Any) -> None:
        try:
            src = _ip(addr[0])
        except ValueError:
            src = None
        if src != self.client_ip or (self.client_port is not None and addr[1] != self.client_port):
            self.drop("foreign_source")
            return
        if self.client_port is None:
            self.client_port = addr[1]
        try:
            dg = parse_udp_datagram(data)
        except DecodeError:
            self.drop("malformed")
            return
        if dg.frag != 0:
            self.drop("fragment")  # RFC 1928 7: no reassembly here, so MUST drop
            return
        ip = host_ip(dg.host)
        if ip is None:
            assert isinstance(dg.host, str)
            ip = self.names.get(dg.host)
            if ip is None:
                self._resolve_later(dg.host, dg.port, dg.payload)
                return
        self._send(plain(ip), dg.port, dg.payload)

    def _resolve_later(self, name: str, port: int, payload: bytes) -> None:
        if sum(len(v) for v in self.pending.values()) >= UDP_PENDING:
            self.drop("pending_overflow")
            return
        waiting = self.pending.get(name)
        if waiting is not None:
            waiting.append((port, payload))
            return
        self.pending[name] = [(port, payload)]
        task = asyncio.create_task(self._resolve(name))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _resolve(self, name: str) -> None:
        try:
            ips = await self.door.resolve(name)
        except OSError:
            ips = []
        waiting = self.pending.pop(name, [])
        if self.closed:
            return
        if not ips:
            for _ in waiting:
                self.drop("unresolved")
            return
        self.names[name] = ips[0]
        while len(self.names) > UDP_NAMES:
            self.names.popitem(last=False)
        for port, payload in waiting:
            self._send(ips[0], port, payload)

    def _send(self, ip: IPAddress, port: int, payload: bytes) -> None:
        route = self.service.route(UDP, ip, port)
        try:
            if route.way is Way.TUNNEL:
                if self.flow is None:
                    self.flow = self.service.open_udp(self._from_tunnel)
                if route.target is not None:  # a DNS query to a server outside the tunnel
                    # Its reply (same message id) comes back as from the address asked.
                    self.dns_asked[(*route.target, bytes(payload[:2]))] = (ip, port)
                    while len(self.dns_asked) > UDP_DNS_REMEMBERED:
                        self.dns_asked.popitem(last=False)
                self.flow.send(route.target or (ip, port), payload)
            elif route.way is Way.DIRECT:
                self._direct_sock(ip.version).sendto(payload, (str(ip), port))
                self.direct_peers[(ip, port)] = None
                self.direct_peers.move_to_end((ip, port))
                while len(self.direct_peers) > UDP_DIRECT_PEERS:
                    self.direct_peers.popitem(last=False)
            else:
                self.drop("unroutable")
                return
        except OSError:
            self.drop("send_failed")  # EMSGSIZE, a full buffer, no address of that family
            return
        self.counts["to_destination"] += 1

    def _direct_sock(self, version: int) -> socket.socket:
        sock = self.direct.get(version)
        if sock is None:
            family = socket.AF_INET6 if version == 6 else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_DGRAM)
            sock.setblocking(False)
            self.direct[version] = sock
            self.loop.add_reader(sock.fileno(), self._readable, sock, self._from_direct)
        return sock

    # destination -> client

    def _from_direct(self, data: bytes, addr: Any) -> None:
        src = (_ip(addr[0]), int(addr[1]))
        if src not in self.direct_peers:
            self.drop("unexpected_reply")  # only the destinations the client sent to answer
            return
        self._to_client(src[0], src[1], data)

    def _from_tunnel(self, src: tuple[IPAddress, int], payload: bytes) -> None:
        ip, port = plain(src[0]), src[1]
        if self.dns_asked:
            ip, port = self.dns_asked.pop((ip, port, bytes(payload[:2])), (ip, port))
        self._to_client(ip, port, payload)

    def _to_client(self, ip: IPAddress, port: int, payload: bytes) -> None:
        if self.client_port is None or self.closed:
            self.drop("no_client_port")
            return
        try:
            self.usock.sendto(
                emit_udp_datagram(ip, port, payload), (self.client_host, self.client_port)
            )
        except OSError:
            self.drop("client_send_failed")
            return
        self.counts["to_client"] += 1

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for task in self.tasks:
            task.cancel()
        for sock in (self.usock, *self.direct.values()):
            with contextlib.suppress(Exception):
                self.loop.remove_reader(sock.fileno())
            sock.close()
        if self.flow is not None:
            self.flow.close()


async def _linger_close(sock: socket.socket) -> None:
    """Close after a final reply without losing it: our FIN first, then read what the client
    still sends (closing with unread bytes would send a RST that can overtake the reply)."""
    loop = asyncio.get_running_loop()
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)
    got = 0
    try:
        async with asyncio.timeout(LINGER):
            while got < EARLY_MAX:
                data = await loop.sock_recv(sock, RECV)
                if not data:
                    break
                got += len(data)
    except (TimeoutError, OSError):
        pass
    sock.close()


async def _bind_hosts(host: str) -> list[str]:
    """The addresses to listen on: an IP literal as it is, "localhost" as 127.0.0.1 and ::1,
    anything else through getaddrinfo (the bind address is a local one: no tunnel DNS)."""
    try:
        return [str(ipaddress.ip_address(host.strip("[]")))]
    except ValueError:
        pass
    if host == "localhost":
        return ["127.0.0.1", "::1"]
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(
            host, None, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except OSError as exc:
        raise WrapguardError(f"SOCKS5 bind address {host!r}: {exc}") from None
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def _telling(old: int, new: int) -> int:
    """Of two connect failures, the one that says more (refused/timeout over unreachable)."""
    if not old:
        return new
    return new if _WEAK.get(new, 2) > _WEAK.get(old, 2) else old


async def start(service: TunnelService, spec: ProxySpec) -> Socks5Door:
    """Listen on spec.host:spec.port and serve SOCKS5 until `close()`."""
    door = Socks5Door(service, spec)
    await door.open()
    return door


__all__ = ["Socks5Door", "start"]
