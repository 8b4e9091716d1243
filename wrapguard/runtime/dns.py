"""The launcher's resolver: names for the shim's RESOLVE requests, never via the host resolver.

/etc/hosts first, then the config's DNS= servers through the tunnel: UDP from one netstack
socket, A and AAAA asked together, 2 s per try and 2 retries per server, TCP when an answer is
truncated (RFC 1035 4.2.2 length-prefixed), search domains from non-IP DNS= entries (a name
with a dot is tried as-is first). Outcomes map to getaddrinfo's EAI_* codes (`ResolveError`).
`forward_server()` names the server that answers the program's own port-53 queries.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import secrets
from collections.abc import Callable, Sequence
from pathlib import Path

from wrapguard import log
from wrapguard.errors import DecodeError
from wrapguard.netstack.events import (
    Closed,
    Connected,
    ConnectFailed,
    ConnId,
    DatagramReceived,
    Event,
    PeerClosed,
    Readable,
    Reset,
    SockId,
)
from wrapguard.runtime.engine import Engine
from wrapguard.wire.dns import Message, Rcode, RType, answer_addresses, emit_query, parse_message

__all__ = [
    "EAI_AGAIN",
    "EAI_FAIL",
    "EAI_NODATA",
    "EAI_NONAME",
    "DnsResolver",
    "ResolveError",
    "read_hosts",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
EAI_NONAME, EAI_AGAIN, EAI_FAIL, EAI_NODATA = 2, 3, 4, 5  # magnitudes of glibc's EAI_*
DNS_PORT = 53
TRY_TIMEOUT = 2.0
ATTEMPTS = 3  # the first try and 2 retries


class ResolveError(Exception):
    """A lookup failed; `eai` is the magnitude of the getaddrinfo error code."""

    def __init__(self, eai: int, message: str = "") -> None:
        super().__init__(message or f"EAI {eai}")
        self.eai = eai


def read_hosts(path: Path, name: str) -> list[IPAddress]:
    """The addresses /etc/hosts gives `name` (case-insensitive), in file order."""
    out: list[IPAddress] = []
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return out
    want = name.lower()
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split()
        if len(fields) < 2 or want not in (f.lower().removesuffix(".") for f in fields[1:]):
            continue
        with contextlib.suppress(ValueError):
            ip = ipaddress.ip_address(fields[0].split("%", 1)[0])
            if ip not in out:
                out.append(ip)
    return out


class _TcpQuery:
    """One query over TCP (after a truncated UDP answer): 2-byte length prefix both ways."""

    def __init__(self, engine: Engine, query: bytes, fut: asyncio.Future[bytes]) -> None:
        self.engine, self.fut = engine, fut
        self.out = len(query).to_bytes(2, "big") + query
        self.buf = b""
        self.cid: ConnId | None = None

    def on_event(self, event: Event) -> None:
        stack, now = self.engine.stack, self.engine.now()
        assert self.cid is not None
        if isinstance(event, Connected):
            stack.send(self.cid, self.out, now)  # a query is far smaller than the send buffer
        elif isinstance(event, Readable):
            self.buf += stack.recv(self.cid)
            if len(self.buf) >= 2 and len(self.buf) >= 2 + int.from_bytes(self.buf[:2], "big"):
                n = int.from_bytes(self.buf[:2], "big")
                if not self.fut.done():
                    self.fut.set_result(self.buf[2 : 2 + n])
                with contextlib.suppress(OSError, KeyError):
                    stack.close(self.cid, now)
        elif isinstance(event, ConnectFailed | Reset | PeerClosed | Closed) and not self.fut.done():
            self.fut.set_exception(ConnectionError("dns: TCP query failed"))
        self.engine.schedule_flush()


class DnsResolver:
    """Resolves names for the shim; `start()` binds the netstack UDP socket."""

    def __init__(
        self,
        engine: Engine,
        servers: Sequence[IPAddress],
        search: Sequence[str] = (),
        *,
        hosts: Path = Path("/etc/hosts"),
        timeout: float = TRY_TIMEOUT,
        attempts: int = ATTEMPTS,
        rng: Callable[[int], int] = secrets.randbits,
    ) -> None:
        self.engine = engine
        self.log = log.get("wrapguard.dns")
        self.servers = [s for s in servers if engine.route(s, 17, DNS_PORT) is not None]
        for s in servers:
            if s not in self.servers:
                self.log.warning(
                    "DNS server is not routed into the tunnel: not used", server=str(s)
                )
        self.search = [d.strip(".") for d in search if d.strip(".")]
        self.hosts, self.timeout, self.attempts, self.rng = hosts, timeout, attempts, rng
        self.sock: SockId | None = None
        self.pending: dict[tuple[int, IPAddress], asyncio.Future[Message]] = {}
        self.queries = 0

    def forward_server(self) -> IPAddress | None:
        """Where the program's own DNS queries to servers outside the tunnel are sent instead
        (docs/channel.md "DNS"): the first DNS= server routed into the tunnel, if any."""
        return self.servers[0] if self.servers else None

    def start(self) -> None:
        self.sock = self.engine.stack.udp_bind(0)
        self.engine.handlers[self.sock] = self

    def close(self) -> None:
        if self.sock is not None:
            self.engine.handlers.pop(self.sock, None)
            self.engine.stack.udp_close(self.sock)
            self.sock = None
        for fut in self.pending.values():
            fut.cancel()

    def on_event(self, event: Event) -> None:
        if not isinstance(event, DatagramReceived) or event.src[1] != DNS_PORT:
            return
        try:
            msg = parse_message(event.data)
        except DecodeError:
            return
        fut = self.pending.get((msg.ident, event.src[0]))
        if fut is not None and not fut.done() and msg.is_response:
            fut.set_result(msg)

    # -- lookups -------------------------------------------------------------------------------

    def candidates(self, name: str) -> list[str]:
        """The names to try, in order (resolv.conf semantics with ndots 1)."""
        if name.endswith("."):
            return [name.rstrip(".")]
        searched = [f"{name}.{d}" for d in self.search]
        return [name, *searched] if "." in name else [*searched, name]

    async def resolve(self, name: str, family: int = 0) -> tuple[list[IPAddress], str]:
        """(addresses, canonical name) for family 0 (IPv4 first, then IPv6), 4 or 6."""
        name = name.strip()
        if not name or len(name) > 253 or any(not c.isprintable() for c in name):
            raise ResolveError(EAI_NONAME, "not a host name")
        versions = (4, 6) if family == 0 else (family,)
        local = [a for a in read_hosts(self.hosts, name.rstrip(".")) if a.version in versions]
        if local:
            return sorted(local, key=lambda a: a.version), name.rstrip(".")
        if not self.servers:
            raise ResolveError(EAI_AGAIN, "no DNS server inside the tunnel")
        again = exists = False
        for candidate in self.candidates(name):
            rtypes = [RType.A if v == 4 else RType.AAAA for v in versions]
            results = await asyncio.gather(
                *(self.query(candidate, t) for t in rtypes), return_exceptions=True
            )
            addrs: list[IPAddress] = []
            canon = candidate
            nxdomain = True
            for rtype, res in zip(rtypes, results, strict=True):
                if isinstance(res, BaseException):
                    again, nxdomain = True, False
                    continue
                if res.rcode == Rcode.NXDOMAIN:
                    continue
                nxdomain = False
                if res.rcode != Rcode.NOERROR:
                    again = True
                    continue
                c, found = answer_addresses(res, candidate, rtype)
                if found:
                    canon = c if not addrs else canon
                    addrs += found
            if addrs:
                return addrs, canon
            exists = exists or not nxdomain
        # The name exists without an address of that family: NODATA, as glibc says.
        eai = EAI_NODATA if exists and not again else EAI_AGAIN if again else EAI_NONAME
        raise ResolveError(eai, f"cannot resolve {name!r}")

    async def query(self, name: str, rtype: int) -> Message:
        """One question to the servers in turn, `attempts` rounds of `timeout` each."""
        if self.sock is None:
            raise ConnectionError("dns: resolver not started")
        for _ in range(self.attempts):
            for server in self.servers:
                ident = self.rng(16)
                query = emit_query(ident, name, rtype)
                fut: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
                self.pending[(ident, server)] = fut
                self.queries += 1
                try:
                    dst = (server, DNS_PORT)
                    self.engine.stack.udp_send(self.sock, dst, query, self.engine.now())
                    self.engine.schedule_flush()
                    msg = await asyncio.wait_for(fut, self.timeout)
                except (TimeoutError, OSError):
                    continue
                finally:
                    self.pending.pop((ident, server), None)
                if not msg.questions or msg.questions[0].name.lower() != name.lower():
                    continue
                if msg.truncated:
                    with contextlib.suppress(OSError, ConnectionError, TimeoutError, DecodeError):
                        return await self._tcp(server, query)
                return msg
        raise TimeoutError(f"dns: no answer for {name}")

    async def _tcp(self, server: IPAddress, query: bytes) -> Message:
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        handler = _TcpQuery(self.engine, query, fut)
        handler.cid = self.engine.connect(server, DNS_PORT, handler)
        try:
            data = await asyncio.wait_for(fut, self.timeout * 2)
        finally:
            self.engine.abort(handler.cid)
        return parse_message(data)
