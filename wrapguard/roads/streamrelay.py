"""`wrapguard relay`: the server end of the stream road, beside any WireGuard server.

It accepts the stream pairs of proto.py over HTTP/1.1 (h11 parses every byte; TLS through the
standard ssl module when --tls-cert/--tls-key are given, usually nginx or Caddy does it in
front), checks the API key in constant time (401 and nothing forwarded when it is wrong), and
gives each client session its own connected UDP socket toward --forward, so the WireGuard
server sees one endpoint per client. Datagrams from the server go down the session's GET
stream; those in its PUT/POST body go to the server. Memory is bounded: a cap on sessions,
a bounded decoder per upload, a bounded write buffer per download (datagrams beyond it are
dropped, as UDP would), a few datagrams held while a session has no download stream. A session
ends when it carried no datagram for --idle-timeout seconds, or had no stream for
DETACHED_GRACE. Runs in the foreground until SIGTERM/SIGINT (exit 0, everything closed).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import signal
import socket
import ssl
from collections import deque
from dataclasses import dataclass

import h11

from wrapguard import log
from wrapguard.errors import UsageError, WrapguardError
from wrapguard.roads import proto
from wrapguard.wire import stream as framing

HEAD_TIMEOUT = 10.0  # seconds for a client to send its request head (and its TLS handshake)
MAX_PENDING_HEADS = 128  # connections at once that have not sent a request head yet
DETACHED_GRACE = 30.0  # seconds a session lives without any stream (a client reconnecting)
SWEEP_EVERY = 5.0
DOWN_HIGH_WATER = 1 << 20  # bytes queued on one download stream before datagrams are dropped
HELD_WHILE_DETACHED = 32  # datagrams from the server kept for a download stream to come
READ_CHUNK = 65536
UDP_BURST = 64  # datagrams read from one session's socket per readable callback
MAX_HEAD = 16384
SOCK_BUF = 1 << 20  # per session UDP socket: a burst of a few hundred datagrams


@dataclass(frozen=True, slots=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_hostport(text: str, flag: str, low: int = 1) -> HostPort:
    """`1.2.3.4:443`, `[::1]:443` or `name:443`; raises UsageError naming the flag."""
    host, sep, port_text = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise UsageError(f"{flag}: {host!r} in brackets is not an IPv6 address") from None
    elif ":" in host:
        raise UsageError(f"{flag}: write an IPv6 address in brackets, e.g. [::1]:8443")
    if not sep or not host:
        raise UsageError(f"{flag}: {text!r} is not HOST:PORT")
    if not port_text.isdigit() or not low <= int(port_text) < 65536:
        raise UsageError(f"{flag}: {port_text!r} is not a port ({low}-65535)")
    return HostPort(host, int(port_text))


class _Down:
    """A session's download stream: the body of a GET response, written in chunks."""

    __slots__ = ("conn", "last_write", "sent", "writer")

    def __init__(self, conn: h11.Connection, writer: asyncio.StreamWriter, now: float) -> None:
        self.conn = conn
        self.writer = writer
        self.last_write = now
        self.sent = 0

    def write(self, payload: bytes, now: float) -> None:
        data = self.conn.send(h11.Data(data=payload))
        if data and not self.writer.transport.is_closing():
            self.writer.write(data)
        self.last_write = now

    def backlog(self) -> int:
        transport = self.writer.transport
        return 0 if transport.is_closing() else transport.get_write_buffer_size()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


class Session:
    """One client's session: its UDP socket toward the server and its streams."""

    def __init__(
        self, relay: Relay, sid: str, key_index: int, sock: socket.socket, now: float
    ) -> None:
        self.relay = relay
        self.sid = sid
        self.key_index = key_index
        self.sock = sock
        self.down: _Down | None = None
        self.ups: set[asyncio.StreamWriter] = set()
        self.held: deque[bytes] = deque(maxlen=HELD_WHILE_DETACHED)
        self.last_data = now
        self.detached_since = now
        self.closed = False
        self.to_server = self.from_server = self.dropped = 0
        relay.loop.add_reader(sock.fileno(), self._readable)

    @property
    def name(self) -> str:
        return self.sid[:8]  # enough to follow one session in the log, not to take it over

    def attach_down(self, down: _Down, now: float) -> None:
        old, self.down = self.down, down
        if old is not None:
            old.close()
        down.write(framing.start(self.held), now)
        self.held.clear()

    def detach_down(self, down: _Down, now: float) -> None:
        if self.down is down:
            self.down = None
            if not self.ups:
                self.detached_since = now

    def detach_up(self, writer: asyncio.StreamWriter, now: float) -> None:
        self.ups.discard(writer)
        if not self.ups and self.down is None:
            self.detached_since = now

    def forward(self, datagrams: list[bytes], now: float) -> None:
        """Datagrams from the client's upload, to the WireGuard server."""
        send = self.sock.send
        for d in datagrams:
            try:
                send(d)
                self.to_server += 1
            except OSError:  # EAGAIN, or an ICMP error from the server: UDP is lossy
                self.dropped += 1
        if datagrams:
            self.last_data = now

    def _readable(self) -> None:
        got: list[bytes] = []
        recv = self.sock.recv
        for _ in range(UDP_BURST):
            try:
                got.append(recv(65535))
            except BlockingIOError:
                break
            except OSError:
                continue  # ECONNREFUSED: the server is not there (yet)
        got = [d for d in got if d]
        if not got:
            return
        now = self.relay.loop.time()
        self.last_data = now
        self.from_server += len(got)
        down = self.down
        if down is None:
            self.held.extend(got)
            return
        if down.backlog() > DOWN_HIGH_WATER:
            self.dropped += len(got)  # the client reads too slowly: drop, as UDP would
            return
        try:
            down.write(framing.encode(got), now)
            down.sent += len(got)
        except h11.LocalProtocolError:
            self.dropped += len(got)

    def close(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(Exception):
            self.relay.loop.remove_reader(self.sock.fileno())
        self.sock.close()
        if self.down is not None:
            self.down.close()
            self.down = None
        for w in list(self.ups):
            with contextlib.suppress(Exception):
                w.close()
        self.ups.clear()
        self.relay.sessions.pop(self.sid, None)
        self.relay.log.info(
            "session closed",
            session=self.name,
            reason=reason,
            to_server=self.to_server,
            from_server=self.from_server,
            dropped=self.dropped,
        )


class _Refuse(Exception):
    def __init__(self, status: int, text: str, headers: list[tuple[bytes, bytes]] | None = None):
        super().__init__(text)
        self.status = status
        self.text = text
        self.headers = headers or []


class Relay:
    """The relay on the running loop: `await start()`, then `close()` (or `await serve()`)."""

    def __init__(
        self,
        listen: HostPort,
        forward: HostPort,
        keys: list[str],
        *,
        ssl_context: ssl.SSLContext | None = None,
        max_sessions: int = 1000,
        idle_timeout: float = 180.0,
        detached_grace: float = DETACHED_GRACE,
    ) -> None:
        self.listen = listen
        self.forward = forward
        self._keys = [k.encode("ascii") for k in keys]
        self.ssl_context = ssl_context
        self.max_sessions = max_sessions
        self.max_connections = 4 * max_sessions + 16  # two streams each, and reconnects
        # Connections still sending their request head (no key checked yet), oldest first.
        self._heads: dict[asyncio.StreamWriter, None] = {}
        self.idle_timeout = idle_timeout
        self.detached_grace = detached_grace
        self.log = log.get("wrapguard.relay")
        self.sessions: dict[str, Session] = {}
        self.refused = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[object]] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self._forward_addr: tuple[int, tuple[str, int]] | None = None
        self.loop: asyncio.AbstractEventLoop  # set by start()

    @property
    def port(self) -> int:
        assert self._server is not None and self._server.sockets
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        try:
            infos = await self.loop.getaddrinfo(
                self.forward.host, self.forward.port, type=socket.SOCK_DGRAM
            )
        except OSError as exc:
            raise WrapguardError(f"--forward {self.forward}: does not resolve: {exc}") from None
        family, _, _, _, sa = infos[0]
        self._forward_addr = (family, (str(sa[0]), int(sa[1])))
        try:
            self._server = await asyncio.start_server(
                self._handle,
                self.listen.host,
                self.listen.port,
                ssl=self.ssl_context,
                ssl_handshake_timeout=HEAD_TIMEOUT if self.ssl_context is not None else None,
                limit=READ_CHUNK,
                reuse_address=True,
            )
        except OSError as exc:
            raise WrapguardError(
                f"--listen {self.listen}: cannot listen: {exc.strerror or exc}"
            ) from None
        self._sweeper = asyncio.ensure_future(self._sweep())
        if self.ssl_context is None and not _is_loopback(self.listen.host):
            self.log.warning(
                "serving plain HTTP beyond loopback: keys travel in clear unless a TLS proxy "
                "is in front (or use --tls-cert/--tls-key)",
                listen=str(self.listen),
            )
        self.log.info(
            "relay listening",
            listen=str(HostPort(self.listen.host, self.port)),
            forward=f"{self._forward_addr[1][0]}:{self._forward_addr[1][1]}",
            tls=self.ssl_context is not None,
            keys=len(self._keys),
            max_sessions=self.max_sessions,
        )

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._server is not None:
            self._server.close()
        for s in list(self.sessions.values()):
            s.close("relay stopping")
        for w in list(self._writers):
            with contextlib.suppress(Exception):
                w.close()
        if self._handlers:
            _, pending = await asyncio.wait(list(self._handlers), timeout=5)
            for task in pending:
                task.cancel()
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):
                    await self._server.wait_closed()

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_EVERY)
            now = self.loop.time()
            for s in list(self.sessions.values()):
                if now - s.last_data > self.idle_timeout:
                    s.close("idle")
                elif s.down is None and not s.ups and now - s.detached_since > self.detached_grace:
                    s.close("no stream")
                elif s.down is not None and now - s.down.last_write >= proto.KEEPALIVE_EVERY:
                    with contextlib.suppress(Exception):
                        s.down.write(framing.KEEPALIVE, now)

    # ------------------------------------------------------------------ one connection

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._writers) >= self.max_connections:
            writer.close()  # more connections than the sessions could use: refuse, stay bounded
            return
        if len(self._heads) >= MAX_PENDING_HEADS:
            # Too many connections that have sent no request head (no key shown: whoever can
            # reach the port): the oldest goes. A client sends its head at once, so silent
            # connections cannot crowd clients out, only each other.
            oldest = next(iter(self._heads))
            del self._heads[oldest]
            oldest.close()
        self._writers.add(writer)
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
            task.add_done_callback(self._handlers.discard)
        peer = writer.get_extra_info("peername")
        client = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        try:
            try:
                self._heads[writer] = None
                try:
                    async with asyncio.timeout(HEAD_TIMEOUT):
                        event = await self._next(conn, reader)
                finally:
                    self._heads.pop(writer, None)
                if not isinstance(event, h11.Request):
                    return
                forwarded = proto.header(event.headers, b"x-forwarded-for")
                if forwarded is not None:  # behind nginx/Caddy: for the log only, never trusted
                    client += f" for {forwarded.decode('latin-1')[:100]}"
                await self._serve(conn, event, reader, writer, client)
            except _Refuse as r:
                await self._respond(conn, writer, r.status, r.text, r.headers)
            except h11.RemoteProtocolError as exc:
                self.log.debug("bad request", client=client, error=str(exc))
                await self._respond(conn, writer, 400, "bad request")
            except TimeoutError:
                self.log.debug("no request head in time", client=client)
        except (OSError, h11.LocalProtocolError, ssl.SSLError):
            pass  # the client went away
        finally:
            self._writers.discard(writer)
            with contextlib.suppress(Exception):
                writer.close()

    @staticmethod
    async def _next(conn: h11.Connection, reader: asyncio.StreamReader) -> object:
        while True:
            event = conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            conn.receive_data(await reader.read(READ_CHUNK))

    @staticmethod
    async def _respond(
        conn: h11.Connection,
        writer: asyncio.StreamWriter,
        status: int,
        text: str,
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        body = (text + "\n").encode()
        hdrs = [
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
            *(headers or []),
        ]
        with contextlib.suppress(Exception):
            writer.write(conn.send(h11.Response(status_code=status, headers=hdrs)))
            writer.write(conn.send(h11.Data(data=body)))
            writer.write(conn.send(h11.EndOfMessage()))
            async with asyncio.timeout(5):
                await writer.drain()

    def _check(self, req: h11.Request, client: str) -> tuple[str, int]:
        if req.method not in (b"GET", b"PUT", b"POST"):
            raise _Refuse(
                405, "use GET (download) or PUT/POST (upload)", [(b"allow", b"GET, PUT, POST")]
            )
        given = proto.bearer(proto.header(req.headers, proto.KEY_HEADER))
        index = None if given is None else proto.key_matches(given, self._keys)
        if index is None:
            self.refused += 1
            self.log.warning(
                "refused: wrong or missing key" if given is not None else "refused: no key",
                client=client,
            )
            raise _Refuse(
                401, "wrong or missing key", [(b"www-authenticate", b'Bearer realm="wrapguard"')]
            )
        sid = proto.header(req.headers, proto.SESSION_HEADER)
        if sid is None or not proto.SESSION_RE.match(sid):
            raise _Refuse(400, "X-Wrapguard-Session must be 32 lower-case hex digits")
        return sid.decode("ascii"), index

    def _session(self, sid: str, index: int, client: str) -> Session:
        s = self.sessions.get(sid)
        if s is not None:
            if s.key_index != index:
                raise _Refuse(401, "this session belongs to another key")
            return s
        if len(self.sessions) >= self.max_sessions:
            self.log.warning("refused: session cap reached", client=client, cap=self.max_sessions)
            raise _Refuse(503, "relay full", [(b"retry-after", b"5")])
        assert self._forward_addr is not None
        family, addr = self._forward_addr
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, opt, SOCK_BUF)
            sock.connect(addr)
        except OSError as exc:
            sock.close()
            self.log.error(
                "cannot reach the WireGuard server", forward=str(self.forward), error=str(exc)
            )
            raise _Refuse(502, "relay cannot reach its WireGuard server") from None
        s = Session(self, sid, index, sock, self.loop.time())
        self.sessions[sid] = s
        local = sock.getsockname()
        self.log.info("session opened", session=s.name, client=client, udp_port=local[1])
        return s

    async def _serve(
        self,
        conn: h11.Connection,
        req: h11.Request,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        client: str,
    ) -> None:
        sid, index = self._check(req, client)
        session = self._session(sid, index, client)
        now = self.loop.time()
        if req.method == b"GET":
            headers = [
                (b"content-type", proto.CONTENT_TYPE),
                (b"cache-control", b"no-store"),
                (b"x-accel-buffering", b"no"),  # nginx: pass this response on unbuffered
            ]
            writer.write(conn.send(h11.Response(status_code=200, headers=headers)))
            down = _Down(conn, writer, now)
            session.attach_down(down, now)
            try:
                while not session.closed and session.down is down:
                    if not await reader.read(READ_CHUNK):
                        break  # the client (or the proxy) closed the stream
            finally:
                session.detach_down(down, self.loop.time())
            return
        # PUT/POST: the upload stream.
        session.ups.add(writer)
        decoder = framing.StreamDecoder()
        try:
            while not session.closed:
                event = await self._next(conn, reader)
                if isinstance(event, h11.Data):
                    session.forward(decoder.feed(event.data), self.loop.time())
                elif isinstance(event, h11.EndOfMessage):
                    decoder.at_end()
                    await self._respond(conn, writer, 200, "upload ended")
                    return
                else:
                    return  # ConnectionClosed
        except framing.StreamError as exc:
            self.log.warning(
                "bad upload stream", session=session.name, client=client, error=str(exc)
            )
            raise _Refuse(400, f"bad upload stream: {exc}") from None
        finally:
            session.detach_up(writer, self.loop.time())


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def server_tls(cert: str | None, key: str | None) -> ssl.SSLContext | None:
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise UsageError("--tls-cert and --tls-key go together")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
    except FileNotFoundError as exc:
        raise WrapguardError(
            f"{exc.filename or cert}: no such file (TLS certificate/key)"
        ) from None
    except (ssl.SSLError, OSError) as exc:
        raise WrapguardError(f"--tls-cert {cert} / --tls-key {key}: cannot load: {exc}") from None
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


async def serve(relay: Relay) -> int:
    """Run until SIGTERM/SIGINT; returns the exit code (0)."""
    await relay.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        relay.log.info("relay stopping", sessions=len(relay.sessions))
        await relay.close()
    return 0


def run_relay(
    listen: str,
    forward: str,
    key_file: str,
    tls_cert: str | None,
    tls_key: str | None,
    max_sessions: int,
    idle_timeout: float,
) -> int:
    relay = Relay(
        parse_hostport(listen, "--listen", low=0),
        parse_hostport(forward, "--forward"),
        proto.read_key_file(key_file, many=True),
        ssl_context=server_tls(tls_cert, tls_key),
        max_sessions=max_sessions,
        idle_timeout=idle_timeout,
    )
    from wrapguard.runtime.child import raise_fd_limit

    raise_fd_limit()  # each session holds a UDP socket and two streams: 1024 fds is ~330
    return asyncio.run(serve(relay))


__all__ = ["HostPort", "Relay", "Session", "parse_hostport", "run_relay", "serve", "server_tls"]
