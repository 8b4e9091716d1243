"""The HTTP proxy door: CONNECT (RFC 9110 9.3.6) and absolute-URI requests (RFC 9112 3.2.2)
onto the flow API, every byte of HTTP parsed by h11 (sans-IO).

httpproxy_proto.py reads one request head and says what it asks for (a tunnel, a request to
forward in origin form, or a refusal); this module accepts clients, keeps them alive between
requests, dials the destination (through the tunnel: a `TcpRelay` joined to the client's
socket for CONNECT, or to one end of a socketpair for a forwarded request; on the host network
when the route says DIRECT) and streams bodies one chunk at a time each way.
Statuses: 502 refused, unreachable or unknown name; 504 timed out; 400 malformed; 407 no or
wrong credentials; 501 an https:// URL without CONNECT; 508 a request to the proxy itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import os
import socket
from typing import Any

import h11

from wrapguard import log
from wrapguard.doors import ProxySpec, relayio
from wrapguard.doors.httpproxy_proto import (
    REALM,
    Forward,
    Refusal,
    Tunnel,
    authorized,
    client_response,
    hostport,
    plan,
    refusal_for,
)
from wrapguard.errors import UsageError
from wrapguard.runtime.relay import TcpRelay
from wrapguard.runtime.service import TCP, FrontEnd, IPAddress, TunnelService, Way

MAX_HEAD = 64 * 1024  # request or response line + headers (h11 answers 431 beyond it)
CHUNK = 256 * 1024  # one read each way: memory per connection stays a few chunks
IDLE_TIMEOUT = 60.0  # s to wait for the next request head (idle keep-alive or slow head)
IO_TIMEOUT = 300.0  # s without progress on a forwarded request or response
DIAL_TIMEOUT = relayio.CONNECT_TIMEOUT  # s for a direct connect or a name lookup
DRAIN_LIMIT = 64 * 1024  # body bytes we read and discard to keep a refused client alive
MAX_CLIENTS = 256  # client connections at once (handed-off CONNECT tunnels not counted)
MAX_ADDRESSES = 4  # addresses of one name tried in turn


# -- the door (asyncio) --------------------------------------------------------------------------


class HttpProxyDoor:
    """Listens, accepts up to MAX_CLIENTS, one task per client connection."""

    def __init__(self, service: TunnelService, spec: ProxySpec, listeners: list[socket.socket]):
        self.service = service
        self.spec = spec
        self.listeners = listeners
        self.port = int(listeners[0].getsockname()[1])
        self.local_hosts = {ipaddress.ip_address(s.getsockname()[0]) for s in listeners}
        self.credentials = (
            None if spec.username is None else f"{spec.username}:{spec.password or ''}".encode()
        )
        host = str(listeners[0].getsockname()[0])
        self._address = hostport(host, self.port)
        self.frontend = service.add_frontend(FrontEnd("http", self._address, spec.auth))
        self.counts: dict[str, Any] = self.frontend.extra
        self.counts.update({"requests": 0, "connects": 0, "direct": 0, "refused_clients": 0})
        self.log = log.get("wrapguard.httpproxy")
        self._clients: set[asyncio.Task[None]] = set()
        self._accept_failed = False  # warned once; then debug lines only
        self._accepting = [asyncio.create_task(self._accept(s)) for s in listeners]

    @property
    def address(self) -> str:
        return self._address

    async def close(self) -> None:
        tasks = [*self._accepting, *self._clients]
        for task in tasks:
            task.cancel()
        for s in self.listeners:
            s.close()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _accept(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, _ = await loop.sock_accept(listener)
            except OSError as exc:  # EMFILE and friends: back off instead of spinning
                say = self.log.debug if self._accept_failed else self.log.warning
                say("http proxy cannot accept", error=os.strerror(exc.errno or 0))
                self._accept_failed = True
                await asyncio.sleep(0.5)
                continue
            sock.setblocking(False)
            if len(self._clients) >= MAX_CLIENTS:
                self.counts["refused_clients"] += 1
                with contextlib.suppress(OSError):
                    sock.send(_BUSY)
                sock.close()
                continue
            task = asyncio.create_task(_Client(self, sock).run())
            self._clients.add(task)
            task.add_done_callback(self._clients.discard)

    def is_self(self, ip: IPAddress, port: int) -> bool:
        return port == self.port and (ip.is_loopback or ip.is_unspecified or ip in self.local_hosts)


def _canned(status: int, text: str) -> bytes:
    conn = h11.Connection(h11.SERVER)
    body = text.encode() + b"\n"
    hdrs = [(b"content-type", b"text/plain"), (b"content-length", b"%d" % len(body))]
    head = conn.send(h11.Response(status_code=status, headers=[*hdrs, (b"connection", b"close")]))
    return (head or b"") + body


_BUSY = _canned(503, "wrapguard: too many proxy connections, try again later")


class _UpstreamFailed(Exception):
    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.text = text


class _Client:
    """One client connection: requests one after another (keep-alive), each CONNECT handing
    the socket over for good."""

    def __init__(self, door: HttpProxyDoor, sock: socket.socket) -> None:
        self.door = door
        self.service = door.service
        self.sock: socket.socket | None = sock
        self.loop = asyncio.get_running_loop()
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        self.must_close = False

    async def run(self) -> None:
        try:
            while self.sock is not None:
                try:
                    async with asyncio.timeout(IDLE_TIMEOUT):
                        event = await self._next_event()
                except TimeoutError:
                    return
                if not isinstance(event, h11.Request):
                    return  # ConnectionClosed: the client is done
                await self._handle(event)
                if self.sock is None or self.must_close:
                    return
                if self.conn.our_state is not h11.DONE or self.conn.their_state is not h11.DONE:
                    return
                self.conn.start_next_cycle()
        except h11.RemoteProtocolError as exc:
            # The client's bytes are not HTTP (or too big): say so if we still may, and go.
            # Never log the text: it may quote a header such as Proxy-Authorization.
            status = exc.error_status_hint if exc.error_status_hint >= 400 else 400
            text = "request header too large" if status == 431 else "malformed request"
            await self._reply_quietly(Refusal(status, text))
        except (OSError, TimeoutError, h11.LocalProtocolError):
            pass  # the client went away or stopped reading: nothing to tell it
        except Exception as exc:  # a bug of ours: one line, never a traceback, never a crash
            self.door.log.warning("http proxy client failed", error=type(exc).__name__)
        finally:
            if self.sock is not None:
                self.sock.close()
                self.sock = None

    # -- client I/O ------------------------------------------------------------------------------

    async def _next_event(self, timeout: float | None = None) -> Any:
        assert self.sock is not None
        while True:
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            async with asyncio.timeout(timeout):
                data = await self.loop.sock_recv(self.sock, CHUNK)
            self.conn.receive_data(data)

    async def _send(self, data: bytes | None) -> None:
        if data:
            assert self.sock is not None
            await _sock_send(self.sock, data)

    async def _reply(self, refusal: Refusal) -> None:
        """An error status with a one-line text body; the connection stays up only if the
        request was read to its end (a small body is read and dropped to get there)."""
        conn = self.conn
        if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            self.must_close = True
            return
        if (
            conn.their_state is h11.SEND_BODY
            and not conn.they_are_waiting_for_100_continue
            and not self.must_close
        ):
            with contextlib.suppress(TimeoutError, h11.RemoteProtocolError):
                await self._drain()
        body = f"wrapguard: {refusal.text}\n".encode()
        headers = [
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"content-length", b"%d" % len(body)),
            *refusal.headers,
        ]
        if conn.their_state in (h11.IDLE, h11.SEND_BODY, h11.ERROR):  # request not read to its end
            headers.append((b"connection", b"close"))
            self.must_close = True
        out = conn.send(h11.Response(status_code=refusal.status, headers=headers))
        await self._send((out or b"") + (conn.send(h11.Data(data=body)) or b""))
        await self._send(conn.send(h11.EndOfMessage()))

    async def _reply_quietly(self, refusal: Refusal) -> None:
        with contextlib.suppress(OSError, TimeoutError, h11.LocalProtocolError):
            if self.sock is not None:
                await self._reply(refusal)

    async def _drain(self) -> None:
        left = DRAIN_LIMIT
        async with asyncio.timeout(2.0):
            while self.conn.their_state is h11.SEND_BODY and left >= 0:
                event = await self._next_event()
                if isinstance(event, h11.Data):
                    left -= len(event.data)

    # -- one request ------------------------------------------------------------------------------

    async def _handle(self, request: h11.Request) -> None:
        door = self.door
        door.counts["requests"] += 1
        try:
            if door.credentials is not None and not authorized(request.headers, door.credentials):
                raise Refusal(
                    407, "proxy authentication required", [(b"proxy-authenticate", REALM)]
                )
            ask = plan(request)
            if isinstance(ask, Tunnel):
                await self._tunnel(ask)
            else:
                await self._forward(ask)
        except Refusal as refusal:
            # Our own text: host:port at most, never a header, a URL path or a credential.
            door.log.debug("http proxy refused", status=refusal.status, why=refusal.text)
            await self._reply(refusal)

    async def _tunnel(self, ask: Tunnel) -> None:
        """CONNECT: 200, then the client's socket is joined to the destination both ways."""
        while self.conn.their_state is h11.SEND_BODY:  # a CONNECT has no body: its end
            await self._next_event(IDLE_TIMEOUT)
        relay, up = await self._dial(ask.host, ask.port, pair=False)
        self.door.counts["connects"] += 1
        if relay is not None and relay.delivered():  # the flow ended before we could join it
            raise Refusal(502, f"connection to {hostport(ask.host, ask.port)} reset")
        ok = h11.Response(status_code=200, headers=[], reason=b"Connection established")
        head = self.conn.send(ok)
        initial, _ = self.conn.trailing_data  # what the client sent after its request head
        sock, self.sock = self.sock, None
        assert sock is not None and head is not None
        if relay is not None:
            # Written at once (a few bytes into an empty buffer) so nothing on the loop can run
            # between the check above and the join.
            try:
                if sock.send(head) != len(head):
                    raise OSError(errno.EAGAIN, "short write")
            except OSError:
                relay.abort()
                sock.close()
                return
            relay.attach_socket(sock, initial)
            return
        assert up is not None
        try:
            await _sock_send(sock, head)
        except (OSError, TimeoutError):
            sock.close()
            up.close()
            return
        await relayio.splice(sock, up, a_to_b=initial)

    async def _forward(self, ask: Forward) -> None:
        """An absolute-URI request: sent on in origin form over a new upstream connection, the
        body streamed up while the response streams back."""
        _, up = await self._dial(ask.host, ask.port, pair=True)
        assert up is not None
        upstream = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)
        try:
            try:
                await _sock_send(up, upstream.send(ask.request))
            except (OSError, TimeoutError):
                raise Refusal(
                    502, f"{hostport(ask.host, ask.port)} closed the connection"
                ) from None
            body = asyncio.create_task(self._pump_request(upstream, up))
            response = asyncio.create_task(self._pump_response(upstream, up))
            try:
                done, _ = await asyncio.wait({body, response}, return_when=asyncio.FIRST_EXCEPTION)
                failed = body.exception() if body in done else None
                if failed is not None:
                    raise failed  # the client broke off its request
                await response
            except _UpstreamFailed as exc:
                if self.conn.our_state is h11.SEND_RESPONSE:
                    raise Refusal(exc.status, exc.text) from None
                self.must_close = True  # mid-response: the client sees the cut
            finally:
                if not body.done():
                    self.must_close = True  # the origin answered before the body ended
                for task in (body, response):
                    task.cancel()
                await asyncio.gather(body, response, return_exceptions=True)
        finally:
            up.close()

    async def _pump_request(self, upstream: h11.Connection, up: socket.socket) -> None:
        while self.conn.their_state is h11.SEND_BODY:
            event = await self._next_event(IO_TIMEOUT)
            if isinstance(event, h11.Data):
                out = upstream.send(h11.Data(data=event.data))
            elif isinstance(event, h11.EndOfMessage):
                out = upstream.send(h11.EndOfMessage())
            else:
                continue
            try:
                await _sock_send(up, out)
            except (OSError, TimeoutError):
                return  # the origin stopped taking the body; its response says why

    async def _pump_response(self, upstream: h11.Connection, up: socket.socket) -> None:
        conn = self.conn
        while True:
            try:
                event = upstream.next_event()
            except h11.RemoteProtocolError:
                raise _UpstreamFailed(502, "the origin's response is not valid HTTP") from None
            if event is h11.NEED_DATA:
                try:
                    async with asyncio.timeout(IO_TIMEOUT):
                        data = await self.loop.sock_recv(up, CHUNK)
                except TimeoutError:
                    raise _UpstreamFailed(504, "the origin did not answer in time") from None
                except OSError as exc:
                    raise _UpstreamFailed(502, f"the origin failed: {exc.strerror}") from None
                upstream.receive_data(data)
            elif isinstance(event, h11.InformationalResponse):
                # 100 Continue and the like, to an HTTP/1.1 client still waiting for its answer.
                if conn.our_state is h11.SEND_RESPONSE and conn.their_http_version == b"1.1":
                    info = h11.InformationalResponse(
                        status_code=event.status_code,
                        headers=client_response(event),
                        reason=event.reason,
                    )
                    await self._send(conn.send(info))
            elif isinstance(event, h11.Response):
                head = h11.Response(
                    status_code=event.status_code,
                    headers=client_response(event),
                    reason=event.reason,
                )
                await self._send(conn.send(head))
            elif isinstance(event, h11.Data):
                await self._send(conn.send(h11.Data(data=event.data)))
            elif isinstance(event, h11.EndOfMessage):
                await self._send(conn.send(h11.EndOfMessage()))
                return
            else:  # ConnectionClosed before the end of the response
                raise _UpstreamFailed(502, "the origin closed the connection before answering")

    # -- dialling ---------------------------------------------------------------------------------

    async def _dial(
        self, host: str, port: int, *, pair: bool
    ) -> tuple[TcpRelay | None, socket.socket | None]:
        """Connect to host:port by the route the service gives each of its addresses in turn.
        Returns (relay, None) for a tunnel flow (or, with `pair`, (relay, our end of a
        socketpair joined to it)), (None, socket) for a direct one; Refusal on failure."""
        where = hostport(host, port)
        ips = await self._addresses(host)
        service, door = self.service, self.door
        err = errno.EHOSTUNREACH
        for ip in ips[:MAX_ADDRESSES]:
            route = service.route(TCP, ip, port)
            if route.way is Way.FAIL:
                err = _telling(err, route.errno)
                continue
            if route.way is Way.TUNNEL:
                try:
                    relay, outcome = service.open_tcp(ip, port)
                except OSError as exc:
                    err = _telling(err, exc.errno or errno.ENETUNREACH)
                    continue
                ours: socket.socket | None = None
                if pair:  # joined before the outcome: the relay handles every ending
                    theirs, ours = socket.socketpair()
                    ours.setblocking(False)
                    relay.attach_socket(theirs)
                try:
                    status = await outcome
                except asyncio.CancelledError:
                    relay.abort()
                    if ours is not None:
                        ours.close()
                    raise
                if status == 0:
                    door.frontend.flows += 1
                    return relay, ours
                err = _telling(err, status)
                if ours is not None:
                    ours.close()
                continue
            if door.is_self(ip, port):
                raise Refusal(508, f"{where} is this proxy")
            try:
                sock = await relayio.connect(ip, port, DIAL_TIMEOUT)
            except OSError as exc:
                err = _telling(err, exc.errno or errno.ECONNREFUSED)
                continue
            door.frontend.flows += 1
            door.counts["direct"] += 1
            return None, sock
        raise refusal_for(err, where)

    async def _addresses(self, host: str) -> list[IPAddress]:
        try:
            return [ipaddress.ip_address(host)]
        except ValueError:
            pass
        try:
            async with asyncio.timeout(DIAL_TIMEOUT):
                ips = await self.service.resolve(host)
        except TimeoutError:
            raise Refusal(504, f"timed out resolving {host}") from None
        except (OSError, UnicodeError, ValueError):
            # 502, not 404: the failure is the gateway's, not a resource missing on an origin.
            raise Refusal(502, f"cannot resolve {host}") from None
        if not ips:
            raise Refusal(502, f"cannot resolve {host}")
        return ips


def _telling(old: int, new: int) -> int:
    """Of two dial failures, the one that says more about the destination (as the SOCKS5
    door): refused, then timed out, then anything else, then merely unreachable."""
    rank = {errno.ECONNREFUSED: 3, errno.ETIMEDOUT: 2, errno.EHOSTUNREACH: 0, errno.ENETUNREACH: 0}
    return new if rank.get(new, 1) >= rank.get(old, 1) else old


async def _sock_send(sock: socket.socket, data: bytes | None) -> None:
    # asyncio.timeout, never wait_for: on 3.11 wait_for swallows a cancellation that arrives
    # as the send completes (gh-86296), and close() would then wait on a task forever.
    if data:
        async with asyncio.timeout(IO_TIMEOUT):
            await asyncio.get_running_loop().sock_sendall(sock, data)


# -- starting ---------------------------------------------------------------------------------


def _bind_hosts(host: str) -> list[str]:
    return ["127.0.0.1", "::1"] if host == "localhost" else [host]


def _listen(host: str, port: int) -> socket.socket:
    ip = ipaddress.ip_address(host)
    sock = socket.socket(socket.AF_INET6 if ip.version == 6 else socket.AF_INET)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if ip.version == 6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.listen(128)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def start(service: TunnelService, spec: ProxySpec) -> HttpProxyDoor:
    """Listen on spec.host:spec.port (both loopbacks for "localhost") and serve until close()."""
    hosts = _bind_hosts(spec.host)
    try:
        first = ipaddress.ip_address(hosts[0])
    except ValueError:
        raise UsageError(f"--http-proxy: {spec.host!r} is not an IP address") from None
    if not first.is_loopback and not spec.auth:
        raise UsageError(
            f"--http-proxy on {spec.host} (not loopback) needs a username and password: "
            "anyone who can reach it could use the tunnel"
        )
    listeners: list[socket.socket] = []
    try:
        for i, host in enumerate(hosts):
            port = spec.port if not listeners else int(listeners[0].getsockname()[1])
            try:
                listeners.append(_listen(host, port))
            except OSError:
                if i > 0:  # ::1 for "localhost" is a nicety: a host without IPv6 lacks it
                    continue
                raise  # the launcher names the door and the address
    except BaseException:
        for s in listeners:
            s.close()
        raise
    return HttpProxyDoor(service, spec, listeners)


__all__ = ["HttpProxyDoor", "start"]
