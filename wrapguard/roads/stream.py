"""The client end of the stream road: one peer's WireGuard datagrams over HTTP(S) streams.

`StreamRoad` keeps the two requests of proto.py open to the peer's `Endpoint = https://...`:
a GET whose response body brings datagrams down, then a PUT whose chunked body takes them up
(one chunk per batch: `send()` queues, a `call_soon` flush writes what one loop turn produced).
TLS is the standard ssl module's (certificate and host name verified, TransportCA or the system
store); HTTP is h11's; HTTPS_PROXY/HTTP_PROXY (and NO_PROXY) are honoured with an HTTP CONNECT
tunnel. When a stream breaks both are reopened with exponential backoff and jitter, under the
same session id (the relay keeps its UDP socket, the server sees the same endpoint); datagrams
are lost meanwhile, and WireGuard's own retransmission and rekeying carry the session across.
A download that brings nothing, not even a keepalive, for DEAD_AFTER seconds counts as broken.

Problems are logged once per distinct cause: a refused key (401) as one error naming the
TransportKey, an untrusted certificate as one error naming the certificate problem.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import random
import secrets
import ssl
import urllib.parse
import urllib.request
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import h11

from wrapguard import __version__, log
from wrapguard.config import PeerConfig, StreamEndpoint
from wrapguard.roads import proto
from wrapguard.wire import stream as framing

if TYPE_CHECKING:
    from wrapguard.runtime.udp import WgUdpRuntime

BACKOFF_FIRST = 0.25
BACKOFF_MAX = 10.0
REFUSED_RETRY = 30.0  # seconds between tries once the relay refused our key (+ jitter)
STABLE_AFTER = 10.0  # seconds up (or a datagram received) before a break counts as a blip
CONNECT_TIMEOUT = 15.0  # TCP + TLS + proxy + response head
DEAD_AFTER = 3 * proto.KEEPALIVE_EVERY
UP_HIGH_WATER = 1 << 20  # bytes queued on the upload before datagrams are dropped
HELD_WHILE_DOWN = 64  # datagrams kept while the streams are (re)connecting
READ_CHUNK = 65536
USER_AGENT = f"wrapguard/{__version__}".encode()


class RoadRefused(Exception):
    """The relay (or a proxy) answered with a status that retrying soon will not change."""


class RoadFailed(Exception):
    """The streams could not be opened, or broke; retried with backoff."""


def tls_context(ca_file: str | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=ca_file)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def proxy_for(scheme: str, host: str) -> str | None:
    """The proxy URL the environment asks for (HTTPS_PROXY/HTTP_PROXY, NO_PROXY), or None."""
    proxies = urllib.request.getproxies_environment()
    url = proxies.get(scheme)
    if not url:
        return None
    if urllib.request.proxy_bypass_environment(host, proxies):  # type: ignore[attr-defined]
        return None
    return url


class StreamRoad:
    """The stream road to one peer; `start()` on the loop, `send()` datagrams, `close()`."""

    def __init__(
        self,
        target: StreamEndpoint,
        on_datagrams: Callable[[list[bytes]], None],
        *,
        peer: int = 0,
        proxy: str | bool | None = True,
        session_id: str | None = None,
    ) -> None:
        self.target = target
        self.on_datagrams = on_datagrams
        self.peer = peer
        self.proxy = (
            proxy_for(target.scheme, target.host)
            if proxy is True
            else (proxy if isinstance(proxy, str) else None)
        )
        self.session_id = session_id or secrets.token_hex(16)
        self.log = log.get("wrapguard.road")
        self.state = "idle"  # connecting, up, backoff, refused, closed
        self.last_error: str | None = None
        self.connects = 0
        self.stats = {"tx_datagrams": 0, "rx_datagrams": 0, "dropped": 0}
        self._ssl = tls_context(target.ca_file) if target.scheme == "https" else None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._pending: list[bytes] = []
        self._held: deque[bytes] = deque(maxlen=HELD_WHILE_DOWN)
        self._flush_scheduled = False
        self._up: tuple[h11.Connection, asyncio.StreamWriter] | None = None
        self._up_last = 0.0
        self._logged: str | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.ensure_future(self._run())

    def close(self) -> None:
        self.state = "closed"
        if self._task is not None:
            self._task.cancel()
        for w in list(self._writers):
            with contextlib.suppress(Exception):
                w.close()
        self._up = None

    def describe(self) -> dict[str, Any]:
        """For /state: the road, its state and its last problem."""
        return {
            "url": self.target.url,
            "state": self.state,
            "connects": self.connects,
            "last_error": self.last_error,
            "proxy": None if self.proxy is None else _without_credentials(self.proxy),
            **self.stats,
        }

    # ------------------------------------------------------------------ data path

    def send(self, datagram: bytes) -> None:
        """Queue one datagram for the upload; the batch is written when this loop turn ends."""
        self._pending.append(datagram)
        if not self._flush_scheduled and self._loop is not None:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        batch, self._pending = self._pending, []
        if not batch:
            return
        up = self._up
        if up is None:
            dropped = len(batch) + len(self._held) - HELD_WHILE_DOWN
            self._held.extend(batch)
            if dropped > 0:
                self.stats["dropped"] += dropped
            return
        conn, writer = up
        transport = writer.transport
        if transport.is_closing() or transport.get_write_buffer_size() > UP_HIGH_WATER:
            self.stats["dropped"] += len(batch)  # the relay reads too slowly: UDP would drop
            return
        try:
            writer.write(conn.send(h11.Data(data=framing.encode(batch))) or b"")
        except (h11.LocalProtocolError, OSError, RuntimeError, ValueError):
            # ValueError: a datagram the framing cannot carry (empty, over 65535 bytes)
            self.stats["dropped"] += len(batch)
            return
        self.stats["tx_datagrams"] += len(batch)
        assert self._loop is not None
        self._up_last = self._loop.time()

    # ------------------------------------------------------------------ the streams

    async def _run(self) -> None:
        backoff = BACKOFF_FIRST
        while True:
            wait = backoff * (1 + random.random() / 2)
            self.state = "connecting"
            rx_before = self.stats["rx_datagrams"]
            assert self._loop is not None
            started = self._loop.time()
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except RoadRefused as exc:
                self.state = "refused"
                self._problem("error", str(exc))
                wait = REFUSED_RETRY * (1 + random.random() / 2)  # not all clients at once
            except ssl.SSLCertVerificationError as exc:
                self.state = "backoff"
                self._problem(
                    "error",
                    f"the TLS certificate of {self.target.host} is not trusted: "
                    f"{exc.verify_message or exc.reason}"
                    + ("" if self.target.ca_file else " (a private CA? set TransportCA = FILE)"),
                )
                wait = BACKOFF_MAX
            except (OSError, RoadFailed, framing.StreamError, h11.ProtocolError) as exc:
                lasted = self._loop.time() - started >= STABLE_AFTER
                if self.state == "up" and (lasted or self.stats["rx_datagrams"] > rx_before):
                    # It worked until now (a proxy restarted, the relay ended an idle session):
                    # try again soon, and say so quietly; a reconnect that fails is a warning.
                    # (A stream that is accepted and dropped at once backs off as a failure.)
                    wait = backoff = BACKOFF_FIRST
                    self._problem("info", _reason(exc) + "; reconnecting")
                else:
                    backoff = min(backoff * 2, BACKOFF_MAX)
                    self._problem("warning", _reason(exc))
                self.state = "backoff"
            finally:
                self._up = None
                for w in list(self._writers):
                    with contextlib.suppress(Exception):
                        w.close()
                self._writers.clear()
            if self.state != "refused":
                self.state = "backoff"
            await asyncio.sleep(wait)

    def _problem(self, level: str, text: str) -> None:
        self.last_error = text
        if text == self._logged:
            return  # said once already; the state in /state says it is still so
        self._logged = text
        getattr(self.log, level)(
            f"stream road to peer {self.peer + 1}: {text}", url=self.target.url, peer=self.peer + 1
        )

    def _headers(self, extra: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        t = self.target
        default = 443 if t.scheme == "https" else 80
        host = f"[{t.host}]" if ":" in t.host else t.host
        if t.port != default:
            host += f":{t.port}"
        return [
            (b"host", host.encode()),
            (b"user-agent", USER_AGENT),
            (proto.KEY_HEADER, b"Bearer " + t.key.encode("ascii")),
            (proto.SESSION_HEADER, self.session_id.encode("ascii")),
            *extra,
        ]

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A TCP (TLS) connection to the relay, through the proxy when there is one."""
        t = self.target
        if self.proxy is None:
            reader, writer = await asyncio.open_connection(
                t.host,
                t.port,
                ssl=self._ssl,
                server_hostname=t.host if self._ssl is not None else None,
                limit=READ_CHUNK,
            )
            self._writers.add(writer)
            return reader, writer
        p = urllib.parse.urlsplit(self.proxy if "://" in self.proxy else "http://" + self.proxy)
        if p.scheme not in ("http", ""):
            raise RoadRefused(
                f"proxy {p.scheme}://{p.hostname}: only http:// proxies are supported"
            )
        phost, pport = p.hostname or "", p.port or 8080
        reader, writer = await asyncio.open_connection(phost, pport, limit=READ_CHUNK)
        self._writers.add(writer)
        authority = f"[{t.host}]:{t.port}" if ":" in t.host else f"{t.host}:{t.port}"
        headers = [(b"host", authority.encode()), (b"user-agent", USER_AGENT)]
        if p.username is not None:
            cred = f"{urllib.parse.unquote(p.username)}:{urllib.parse.unquote(p.password or '')}"
            headers.append((b"proxy-authorization", b"Basic " + base64.b64encode(cred.encode())))
        conn = h11.Connection(h11.CLIENT)
        writer.write(conn.send(h11.Request(method="CONNECT", target=authority, headers=headers)))
        writer.write(conn.send(h11.EndOfMessage()) or b"")
        resp = await _response(conn, reader)
        if resp.status_code != 200:
            text = f"proxy {phost}:{pport} refused CONNECT to {authority}: HTTP {resp.status_code}"
            if resp.status_code == 407:
                raise RoadRefused(text + " (proxy credentials in HTTPS_PROXY?)")
            raise RoadFailed(text)
        data, _closed = conn.trailing_data
        if data:
            raise RoadFailed(f"proxy {phost}:{pport} sent data before the tunnel was up")
        if self._ssl is not None:
            await writer.start_tls(self._ssl, server_hostname=t.host)
        return reader, writer

    async def _session(self) -> None:
        """Open the download, then the upload; pump until one of them breaks."""
        assert self._loop is not None
        t = self.target
        async with asyncio.timeout(CONNECT_TIMEOUT):
            down_r, down_w = await self._open()
            down = h11.Connection(h11.CLIENT)
            down_w.write(
                down.send(h11.Request(method="GET", target=t.target, headers=self._headers([])))
            )
            down_w.write(down.send(h11.EndOfMessage()) or b"")
            resp = await _response(down, down_r)
            self._check_status(resp)
            up_r, up_w = await self._open()
            up = h11.Connection(h11.CLIENT)
            head = h11.Request(
                method="PUT",
                target=t.target,
                headers=self._headers(
                    [(b"transfer-encoding", b"chunked"), (b"content-type", proto.CONTENT_TYPE)]
                ),
            )
            up_w.write(up.send(head))
            up_w.write(up.send(h11.Data(data=framing.start(self._held))) or b"")
            self._held.clear()
        self._up = (up, up_w)
        self._up_last = self._loop.time()
        self.connects += 1
        self.state = "up"
        if self._logged is not None or self.connects == 1:
            self.log.info(
                "stream road up" if self.connects == 1 else "stream road reconnected",
                url=t.url,
                peer=self.peer + 1,
                proxy=None if self.proxy is None else _without_credentials(self.proxy),
            )
        self._logged = None
        self.last_error = None
        if self._pending:
            self._flush()
        tasks = [
            asyncio.ensure_future(self._pump_down(down, down_r)),
            asyncio.ensure_future(self._watch_up(up, up_r)),
            asyncio.ensure_future(self._keepalive()),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for task in done:
            exc = task.exception()
            if exc is not None:
                raise exc
        raise RoadFailed("the relay ended the stream")

    def _check_status(self, resp: h11.Response) -> None:
        if resp.status_code == 200:
            return
        reason = resp.reason.decode("latin-1", "replace")
        if resp.status_code == 401:
            raise RoadRefused(
                "the relay refused the TransportKey (HTTP 401): check TransportKey/"
                "TransportKeyFile against the relay's --key-file"
            )
        if resp.status_code == 503:
            raise RoadFailed("the relay is full or unavailable (HTTP 503)")
        raise RoadFailed(
            f"the relay answered HTTP {resp.status_code} {reason}".rstrip()
            + " (is the URL path right, and the proxy in front set up as docs/streams.md says?)"
        )

    async def _pump_down(self, conn: h11.Connection, reader: asyncio.StreamReader) -> None:
        decoder = framing.StreamDecoder()
        deliver = self.on_datagrams
        stats = self.stats
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                async with asyncio.timeout(DEAD_AFTER):
                    data = await reader.read(READ_CHUNK)
                if not data:
                    raise RoadFailed("the download stream was closed")
                conn.receive_data(data)
                continue
            if isinstance(event, h11.Data):
                got = decoder.feed(event.data)
                if got:
                    stats["rx_datagrams"] += len(got)
                    deliver(got)
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                raise RoadFailed("the relay ended the download stream")

    async def _watch_up(self, conn: h11.Connection, reader: asyncio.StreamReader) -> None:
        """The relay answers the upload only to end it (or to refuse it)."""
        resp = await _response(conn, reader, timeout=None)
        self._check_status(resp)
        raise RoadFailed("the relay ended the upload stream")

    async def _keepalive(self) -> None:
        assert self._loop is not None
        while True:
            await asyncio.sleep(proto.KEEPALIVE_EVERY / 3)
            up = self._up
            if up is None or up[1].transport.is_closing():
                continue
            if self._loop.time() - self._up_last >= proto.KEEPALIVE_EVERY:
                up[1].write(up[0].send(h11.Data(data=framing.KEEPALIVE)) or b"")
                self._up_last = self._loop.time()


async def _response(
    conn: h11.Connection, reader: asyncio.StreamReader, timeout: float | None = CONNECT_TIMEOUT
) -> h11.Response:
    async with asyncio.timeout(timeout):
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await reader.read(READ_CHUNK)
                conn.receive_data(data)
                if not data and conn.their_state is h11.CLOSED:
                    raise RoadFailed("the connection closed before a response")
                continue
            if isinstance(event, h11.Response):
                return event
            if isinstance(event, h11.ConnectionClosed):
                raise RoadFailed("the connection closed before a response")
            # h11.InformationalResponse (100 Continue): wait for the real one


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "no answer in time (relay or proxy unreachable, or the stream went silent)"
    if isinstance(exc, ssl.SSLError):
        return f"TLS failed: {exc.reason or exc}"
    if isinstance(exc, OSError):
        return f"cannot connect: {exc.strerror or exc}"
    if isinstance(exc, framing.StreamError):
        return f"the relay's answer is not a wrapguard stream ({exc})"
    if isinstance(exc, h11.ProtocolError):
        return f"HTTP error: {exc}"
    return str(exc)


def _without_credentials(url: str) -> str:
    p = urllib.parse.urlsplit(url if "://" in url else "http://" + url)
    host = p.hostname or ""
    return f"{p.scheme}://{host}" + (f":{p.port}" if p.port else "")


async def probe(target: StreamEndpoint, timeout: float = 10.0) -> tuple[bool, str]:
    """For --doctor: can we reach the relay, is its certificate valid, is our key accepted?
    Opens one download stream (a session of its own, which the relay soon forgets) and reads
    the magic. Returns (ok, what happened in one sentence)."""
    road = StreamRoad(target, lambda _d: None)
    via = "" if road.proxy is None else f" via {_without_credentials(road.proxy)}"
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await road._open()
            try:
                conn = h11.Connection(h11.CLIENT)
                head = h11.Request(method="GET", target=target.target, headers=road._headers([]))
                writer.write(conn.send(head))
                writer.write(conn.send(h11.EndOfMessage()) or b"")
                road._check_status(await _response(conn, reader))
                decoder = framing.StreamDecoder()
                while not decoder.started:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        data = await reader.read(READ_CHUNK)
                        if not data:
                            raise RoadFailed("the stream ended before it began")
                        conn.receive_data(data)
                    elif isinstance(event, h11.Data):
                        decoder.feed(event.data)
                    else:
                        raise RoadFailed("the stream ended before it began")
            finally:
                writer.close()
    except RoadRefused as exc:
        return False, str(exc)
    except ssl.SSLCertVerificationError as exc:
        return False, f"the TLS certificate of {target.host} is not trusted: {exc.verify_message}"
    except (OSError, RoadFailed, framing.StreamError, h11.ProtocolError) as exc:
        return False, _reason(exc) + via
    tls = ", TLS certificate valid" if target.scheme == "https" else " (no TLS)"
    return True, f"relay reachable{via}{tls}, key accepted"


# The device addresses a stream peer by a synthetic endpoint in 100::/64, the IPv6
# discard-only prefix (RFC 6666): it is never a real host, and no UDP ever goes there.
ROAD_PREFIX = "100::"


def road_address(peer: int, target: StreamEndpoint) -> tuple[str, int]:
    return (f"{ROAD_PREFIX}{peer + 1:x}", target.port)


def attach_roads(runtime: WgUdpRuntime, peers: Sequence[PeerConfig]) -> dict[int, StreamRoad]:
    """A StreamRoad for every peer with an http(s) Endpoint, wired into `runtime`."""
    roads: dict[int, StreamRoad] = {}
    for i, p in enumerate(peers):
        if p.stream is None:
            continue
        addr = road_address(i, p.stream)

        def received(datagrams: list[bytes], addr: tuple[str, int] = addr) -> None:
            runtime.road_received(addr, datagrams)

        road = StreamRoad(p.stream, received, peer=i)
        runtime.add_road(addr, road)
        roads[i] = road
    return roads


__all__ = [
    "RoadFailed",
    "RoadRefused",
    "StreamRoad",
    "attach_roads",
    "probe",
    "proxy_for",
    "road_address",
    "tls_context",
]
