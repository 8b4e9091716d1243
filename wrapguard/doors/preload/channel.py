"""The launcher's side of the local channel (docs/channel.md): control socket and data listener.

`ChannelServer` owns a private 0700 directory with the unix control socket `ctl.sock` (0600),
checks every request's uid (SO_PEERCRED) and secret, answers it through a `ChannelBackend`
(the launcher's routing and tunnel), and runs a loopback data listener (127.0.0.1 and ::1, one
ephemeral port) that admits only connections from a loopback port announced in CONNECT (a
kernel filter drops the others' SYNs: `synfilter`) presenting a live one-time token, and the
UDP data listener `udp.sock` (SOCK_SEQPACKET) beside `ctl.sock`, whose connections present an
association's token. Rejections are counted in `ChannelStats` and never answered. Frames are
encoded by `wrapguard.wire.ipc`.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import errno
import math
import os
import secrets
import shutil
import socket
import stat
import struct
import tempfile
from collections import Counter
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from typing import Protocol

from wrapguard.errors import DecodeError, WrapguardError
from wrapguard.log import get as get_logger
from wrapguard.runtime import synfilter
from wrapguard.wire.ipc import (
    MAX_RESOLVE_ADDRS,
    PREFIX_LEN,
    TOKEN_LEN,
    UDP_DATA_ACK,
    UDP_DATA_SOCKET,
    Action,
    Address,
    ConnectReply,
    ConnectRequest,
    GateRequest,
    HelloReply,
    HelloRequest,
    ListenReply,
    ListenRequest,
    PeerAction,
    PeerReply,
    PeerRequest,
    Proto,
    Reply,
    Request,
    ResolveAction,
    ResolveReply,
    ResolveRequest,
    StatusAction,
    StatusReply,
    StatusRequest,
    UdpAssocReply,
    UdpAssocRequest,
    UdpReleaseReply,
    UdpReleaseRequest,
    UnlistenReply,
    UnlistenRequest,
    emit_reply,
    frame_body_len,
    parse_request,
    secret_matches,
)

__all__ = [
    "ENV_ADDRS",
    "ENV_CONNECT_TIMEOUT",
    "ENV_CTL",
    "ENV_DNS",
    "ENV_SECRET",
    "ENV_UDP",
    "ChannelBackend",
    "ChannelServer",
    "ChannelStats",
    "Decision",
]

log = get_logger("wrapguard.channel")

ENV_CTL = "WRAPGUARD_CTL"
ENV_SECRET = "WRAPGUARD_SECRET"
ENV_CONNECT_TIMEOUT = "WRAPGUARD_CONNECT_TIMEOUT"
ENV_ADDRS = "WRAPGUARD_ADDRS"
ENV_UDP = "WRAPGUARD_UDP"  # the UDP relay's loopback port; "/4": no ::1 socket
ENV_DNS = "WRAPGUARD_DNS"  # "1": the shim asks RESOLVE for names (DNS= is set)
# Who serves ctl.sock: the shim checks SO_PEERCRED against these and the directory's owner.
ENV_CTL_PID = "WRAPGUARD_CTL_PID"
ENV_CTL_UID = "WRAPGUARD_CTL_UID"
MAX_PENDING_DATA = 256  # data connections that have not sent their token yet
DATA_RCVBUF = 4096  # see start(): small, so that a gate's filler closes the window quickly
DATA_BACKLOG = 65535  # as many as net.core.somaxconn allows: a burst never drops our SYNs
ACCEPT_BATCH = 1024  # connections accepted per wake-up (a rejected one costs accept + close)
_LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER 0: close() sends RST, keeps no state
LOCAL_STEP_TIMEOUT = 5.0  # docs/channel.md: a request or a token must arrive within 5 s
TOKEN_TTL = 10.0  # a token not presented by then is dropped and counted
# Up to this many outstanding tokens a CONNECT updates the kernel filter before it replies;
# more (a burst) share one update per loop iteration (_filter_changed).
FILTER_NOW_MAX = 8
# A presented or expired token's port leaves the filter with the next update: the next
# CONNECT's, or this many seconds later (an update is a setsockopt per listener: kept off the
# connect's path). Until then the listener resets what comes from it (_accept_data).
FILTER_TIGHTEN_AFTER = 0.02
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
_LOOPBACK4, _LOOPBACK6 = IPv4Address("127.0.0.1"), IPv6Address("::1")


@dataclass(frozen=True, slots=True)
class Decision:
    """The routing answer for one CONNECT (`errno` only for FAIL)."""

    action: Action
    errno: int = 0


class ChannelBackend(Protocol):
    """What the launcher plugs in; every method is called on the event loop."""

    def hello(self, pid: int, version: str) -> None: ...

    def route(self, proto: Proto, dst: Address) -> Decision: ...

    def open_tcp(
        self, dst: Address, token: bytes, gate: bool = False, src_port: int = 0
    ) -> Address | None:
        """Start the tunnel connection for `token`; return our tunnel source address (what the
        program's getsockname() reports) if already known. Raise OSError to fail the connect."""
        ...

    def tcp_attached(self, token: bytes, sock: socket.socket) -> None:
        """The program's loopback side of `token` arrived: a non-blocking socket, the token
        already consumed and nothing after it read."""
        ...

    def gate(self, token: bytes, filler: int) -> None:
        """The shim wrote `filler` bytes after the token of a gated (non-blocking) connect:
        discard them once the tunnel connection is open, then relay."""
        ...

    def token_expired(self, token: bytes) -> None:
        """`token` was never presented within TOKEN_TTL: abandon its tunnel connection."""
        ...

    def status(self, token: bytes) -> asyncio.Future[int] | None:
        """A future resolving to 0 (open) or the errno of the failure; None if unknown."""
        ...

    def listen(self, proto: Proto, addr: Address, v6only: bool = False) -> None:
        """Listen on `addr.port` of our tunnel addresses (an AF_INET6 listener takes IPv4
        clients too unless `v6only`). Raise OSError to refuse."""
        ...

    def unlisten(self, proto: Proto, addr: Address) -> None: ...

    def peer_of(self, loopback: Address) -> Address | None:
        """The tunnel client behind a loopback connection we made to the program."""
        ...

    def udp_assoc(self, local: Address, dst: Address) -> tuple[Decision, Address | None]:
        """Route a datagram to `dst` from the program's UDP socket whose loopback side is
        `local`; on TUNNEL associate that socket and return our tunnel source for `dst`."""
        ...

    def udp_release(self, local: Address) -> None:
        """The program closed the socket whose loopback side is `local`."""
        ...

    async def resolve(
        self, name: str, family: int, flags: int
    ) -> tuple[int, Sequence[IPv4Address | IPv6Address], str]:
        """(0, addresses, canonical name) or (EAI code magnitude, (), "")."""
        ...


@dataclass(slots=True)
class ChannelStats:
    """Counters of requests served and of everything rejected (never answered)."""

    requests: int = 0
    connections: int = 0  # control connections accepted (the shim keeps one per process)
    bad_secret: int = 0
    bad_uid: int = 0
    malformed: int = 0
    bad_token: int = 0  # a data connection sent an unknown or used token
    no_token: int = 0  # a data connection sent no token within 5 s
    unused_token: int = 0  # a token handed out but never presented
    unannounced: int = 0  # a data connection from a loopback port no CONNECT announced (reset)


def _unsafe(path: str) -> str | None:
    """Why another user could swap our directory out of `path` (None: they cannot). Our
    directory is 0700, but whoever may write its parent may rename it and put their own in its
    place (after `su` without `-`, XDG_RUNTIME_DIR and TMPDIR still name the old user's)."""
    try:
        st = os.stat(path)
    except OSError as exc:
        return exc.strerror or "not usable"
    if not stat.S_ISDIR(st.st_mode):
        return "not a directory"
    if st.st_uid not in (os.geteuid(), 0):
        return f"owned by uid {st.st_uid}"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX:
        return "writable by other users and not sticky"
    if not os.access(path, os.W_OK | os.X_OK):
        return "not writable"
    return None


def _runtime_parent() -> str:
    """$XDG_RUNTIME_DIR, else the temp directory ($TMPDIR, /tmp, ...), else /tmp or /var/tmp:
    the first that no other user can write to (see `_unsafe`)."""
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    candidates = [xdg] if xdg else []
    candidates += [tempfile.gettempdir(), "/tmp", "/var/tmp"]
    first: tuple[str, str] | None = None
    for path in dict.fromkeys(candidates):
        why = _unsafe(path)
        if why is None:
            if first is not None:
                log.info("runtime directory not safe", skipped=first[0], why=first[1], using=path)
            return path
        first = first or (path, why)
    assert first is not None
    raise WrapguardError(
        f"no safe place for the private channel directory: {first[0]} is {first[1]} "
        "(set TMPDIR to a directory only you can write)"
    )


def loopback_pair(kind: int, what: str) -> tuple[int, socket.socket, socket.socket | None]:
    """(port, 127.0.0.1 socket, ::1 socket) bound to one ephemeral port of type `kind`, for
    the shim, which knows only the number; no ::1 socket on a host without IPv6 loopback.
    Raises WrapguardError naming `what` when no port is free on both."""
    for _ in range(32):
        v4 = socket.socket(socket.AF_INET, kind)
        v4.bind(("127.0.0.1", 0))
        port = v4.getsockname()[1]
        v6 = socket.socket(socket.AF_INET6, kind)
        try:
            v6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            v6.bind(("::1", port))
        except OSError as exc:
            v6.close()
            if exc.errno == errno.EADDRINUSE:
                v4.close()
                continue
            return port, v4, None  # no IPv6 loopback on this host
        return port, v4, v6
    raise WrapguardError(f"could not find a free loopback port for {what}")


class ChannelServer:
    """Control socket + loopback data listener; `start()`, then `env()` for the child."""

    def __init__(
        self,
        backend: ChannelBackend,
        *,
        secret: bytes,
        uid: int,
        connect_timeout: float = 120.0,
        tunnel_addrs: Sequence[IPv4Address | IPv6Address] = (),
        token_source: Callable[[int], bytes] = secrets.token_bytes,
        token_ttl: float = TOKEN_TTL,
    ) -> None:
        if len(secret) != 32:
            raise ValueError("the channel secret is 32 bytes")
        self._backend = backend
        self._secret = secret
        self._uid = uid
        self._connect_timeout = connect_timeout
        self._addrs = tuple(tunnel_addrs)
        self._token_source = token_source
        self._token_ttl = token_ttl
        # Outstanding tokens and when each expires: in insertion order, which is deadline
        # order (one TTL), so one timer for the oldest serves them all (not a timer each).
        self._tokens: dict[bytes, float] = {}
        self._token_timer: asyncio.TimerHandle | None = None
        self._servers: list[asyncio.Server] = []
        self._data_listeners: list[socket.socket] = []
        self._tcp_listeners: list[socket.socket] = []  # the loopback data listeners
        # Announced loopback source ports (docs/channel.md, "Security"): per outstanding token
        # the port its connection comes from, 0 when the shim could not tell (any port then
        # gets in while such a token is outstanding).
        self._token_lo: dict[bytes, int] = {}
        self._lo_ports: Counter[int] = Counter()
        self._any_source = 0
        # What each listener has (by position in _tcp_listeners); None: no filter yet.
        self._filter_progs: list[bytes | None] = []
        self._filter_ok = True
        self._filter_sync: asyncio.Future[None] | None = None
        # The listeners CONNECTs named since the last update: only they must let a new port
        # in (one kernel filter update per CONNECT, not one per listener).
        self._filter_need: set[int] = set()
        self._tighten: asyncio.TimerHandle | None = None  # a deferred update (released ports)
        self._pid = 0
        self._loop: asyncio.AbstractEventLoop | None = None  # start()'s: no lookup per request
        self._data_pending: dict[socket.socket, tuple[bytearray, asyncio.TimerHandle]] = {}
        self._tasks: set[asyncio.Task[None]] = set()  # requests that wait (RESOLVE, ...)
        self._ctl_conns: set[_CtlConnection] = set()
        self.stats = ChannelStats()
        self.directory: str | None = None
        self.ctl_path: str | None = None
        self.data_port = 0
        self._has_v6 = False
        self.udp_env: str | None = None  # set by the launcher once its UDP relay is up
        self.resolve_names = False  # set by the launcher when it answers RESOLVE (DNS=)

    def __repr__(self) -> str:  # never shows the secret
        return f"ChannelServer(ctl={self.ctl_path!r}, data_port={self.data_port})"

    async def start(self, parent: str | None = None) -> None:
        """Create the private directory and socket, and the loopback data listener."""
        if parent is not None and (why := _unsafe(parent)) is not None:
            raise WrapguardError(f"{parent} cannot hold the private channel directory: {why}")
        self.directory = os.path.abspath(  # the shim checks the directory of an absolute path
            tempfile.mkdtemp(prefix="wrapguard-", dir=parent or _runtime_parent())
        )
        self._pid = os.getpid()  # SO_PEERCRED of our sockets names the process that listens
        atexit.register(self.close)
        try:
            os.chmod(self.directory, 0o700)
            self.ctl_path = os.path.join(self.directory, "ctl.sock")
            loop = self._loop = asyncio.get_running_loop()
            ctl = await loop.create_unix_server(self._ctl_connection, path=self.ctl_path)
            self._servers.append(ctl)
            os.chmod(self.ctl_path, 0o600)
            udp = self._udp_data_socket()
            loop.add_reader(udp.fileno(), self._accept_udp_data, udp)
            self._data_listeners.append(udp)
            for sock in self._data_sockets():
                # A small receive buffer (inherited by accepted sockets): a non-blocking
                # connect's filler fills it, so the program's socket stays unwritable until
                # the tunnel's outcome is known (docs/channel.md, "gate").
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, DATA_RCVBUF)
                # Inherited too: the relays' writes to the program go out at once, and no
                # setsockopt per data connection (relay.attach_socket(prepared=True)).
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self._data_listeners.append(sock)
                self._tcp_listeners.append(sock)
                self._filter_progs.append(None)
            self._apply_filter()  # before listen(): no SYN from anyone gets in unfiltered
            for sock in self._tcp_listeners:
                sock.listen(DATA_BACKLOG)
                sock.setblocking(False)
                loop.add_reader(sock.fileno(), self._accept_data, sock)
        except BaseException:
            self.close()
            raise
        log.debug("channel up", ctl=self.ctl_path, data_port=self.data_port, ipv6=self._has_v6)

    def _udp_data_socket(self) -> socket.socket:
        """udp.sock: the shim derives its path from WRAPGUARD_CTL (docs/channel.md, "UDP")."""
        assert self.directory is not None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            sock.bind(os.path.join(self.directory, UDP_DATA_SOCKET))
            os.chmod(os.path.join(self.directory, UDP_DATA_SOCKET), 0o600)
            sock.listen(512)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock

    def _data_sockets(self) -> list[socket.socket]:
        """127.0.0.1 and ::1 on one ephemeral port (the shim uses one port for both)."""
        self.data_port, v4, v6 = loopback_pair(socket.SOCK_STREAM, "the local data channel")
        self._has_v6 = v6 is not None
        return [v4] if v6 is None else [v4, v6]

    def env(self) -> dict[str, str]:
        """The child's WRAPGUARD_* variables (LD_PRELOAD is the launcher's)."""
        if self.ctl_path is None:
            raise RuntimeError("ChannelServer.env() before start()")
        env = {
            ENV_CTL: self.ctl_path,
            ENV_SECRET: self._secret.hex(),
            ENV_CONNECT_TIMEOUT: str(math.ceil(self._connect_timeout)),
            ENV_CTL_PID: str(self._pid),
            ENV_CTL_UID: str(os.geteuid()),
        }
        if self._addrs:
            env[ENV_ADDRS] = ",".join(str(a) for a in self._addrs)
        if self.udp_env is not None:
            env[ENV_UDP] = self.udp_env
        if self.resolve_names:
            env[ENV_DNS] = "1"
        return env

    def close(self) -> None:
        """Stop listening and remove the directory; idempotent, also run at exit."""
        atexit.unregister(self.close)
        try:
            for server in self._servers:
                server.close()
            for lsock in self._data_listeners:
                with contextlib.suppress(Exception):
                    asyncio.get_event_loop().remove_reader(lsock.fileno())
                lsock.close()
            for conn in list(self._data_pending):
                self._drop_data(conn)
            if self._token_timer is not None:
                self._token_timer.cancel()
                self._token_timer = None
            for task in list(self._tasks):
                task.cancel()
            for ctl_conn in list(self._ctl_conns):
                ctl_conn.close()
            if self._filter_sync is not None and not self._filter_sync.done():
                self._filter_sync.set_result(None)
            if self._tighten is not None:
                self._tighten.cancel()
        finally:
            self._servers.clear()
            self._data_listeners.clear()
            self._tcp_listeners.clear()
            self._filter_progs.clear()
            self._filter_need.clear()
            self._tokens.clear()
            self._token_lo.clear()
            self._lo_ports.clear()
            self._any_source = 0
            if self.directory is not None:
                shutil.rmtree(self.directory, ignore_errors=True)
                self.directory = None

    # -- control requests --------------------------------------------------------------------

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        """The loop start() ran on (asyncio.get_running_loop() costs a getpid() per call on
        Python 3.11): requests come in on it."""
        return self._loop if self._loop is not None else asyncio.get_running_loop()

    def _ctl_connection(self) -> _CtlConnection:
        return _CtlConnection(self)

    def _answer_now(self, req: Request) -> Reply | Coroutine[None, None, Reply]:
        """The reply to `req`, or a coroutine giving it when it must wait (RESOLVE, a STATUS
        that waits, a CONNECT in a burst): the others are answered in the callback that read
        the request, with no task and no loop turn in between."""
        b = self._backend
        match req:
            case HelloRequest(pid, version):
                b.hello(pid, version)
                return HelloReply()
            case ConnectRequest(proto, dst, gate, src_port, lo_port, _wait, lo4):
                reply = self._connect(proto, dst, gate, src_port, lo_port, lo4)
                if self._filter_sync is not None and len(self._token_lo) <= FILTER_NOW_MAX:
                    # Few tokens out (sequential connects): let the port in at once.
                    self._apply_filter(needed_only=True)
                if self._filter_sync is not None:  # the port is let in before the shim comes
                    return self._after_filter(reply)
                return reply
            case StatusRequest(token, wait):
                fut = b.status(token)
                if fut is None:
                    return StatusReply(StatusAction.DONE, errno.ENOTCONN)
                if not fut.done():
                    if wait:
                        return self._status(fut)
                    return StatusReply(StatusAction.PENDING)
                if fut.cancelled():
                    return StatusReply(StatusAction.DONE, errno.ECONNABORTED)
                return StatusReply(StatusAction.DONE, fut.result())
            case ListenRequest(proto, addr, v6only):
                try:
                    b.listen(proto, addr, v6only)
                except OSError as exc:
                    return ListenReply(exc.errno or errno.EADDRNOTAVAIL)
                if proto is Proto.UDP:
                    return ListenReply(0, self._udp_token(addr))
                return ListenReply()
            case UnlistenRequest(proto, addr):
                b.unlisten(proto, addr)
                return UnlistenReply()
            case PeerRequest(addr):
                peer = b.peer_of(addr)
                if peer is None:
                    return PeerReply(PeerAction.UNKNOWN)
                local_of = getattr(b, "local_of", None)
                local = local_of(addr) if local_of is not None else None
                return PeerReply(PeerAction.FOUND, peer, local)
            case UdpAssocRequest(local, dst):
                return self._udp_assoc(local, dst)
            case ResolveRequest(name, family, flags):
                return self._resolve(name, family, flags)
            case UdpReleaseRequest(local):
                if local.ip.is_loopback:
                    b.udp_release(local)
                return UdpReleaseReply()
        raise AssertionError(req)  # pragma: no cover - the match is exhaustive

    async def _after_filter(self, reply: ConnectReply) -> Reply:
        if self._filter_sync is not None:
            await asyncio.shield(self._filter_sync)
        return reply

    async def _resolve(self, name: str, family: int, flags: int) -> Reply:
        eai, addrs, canon = await self._backend.resolve(name, family, flags)
        addrs = tuple(addrs)[:MAX_RESOLVE_ADDRS]
        if eai or not addrs:
            return ResolveReply(ResolveAction.FAIL, eai or 2)
        return ResolveReply(ResolveAction.FOUND, 0, addrs, canon[:255])

    def _connect(
        self,
        proto: Proto,
        dst: Address,
        gate: bool = False,
        src_port: int = 0,
        lo_port: int = 0,
        lo4: bool = False,
    ) -> ConnectReply:
        decision = self._backend.route(proto, dst)
        if decision.action is Action.DIRECT:
            return ConnectReply(Action.DIRECT)
        if decision.action is Action.FAIL or proto is not Proto.TCP:
            return ConnectReply(Action.FAIL, decision.errno or errno.ENETUNREACH)
        token = self._token_source(TOKEN_LEN)
        loop = self._running_loop()
        self._tokens[token] = deadline = loop.time() + self._token_ttl
        if self._token_timer is None:
            self._token_timer = loop.call_at(deadline, self._expire_due)
        try:
            source = self._backend.open_tcp(dst, token, gate, src_port)
        except OSError as exc:
            del self._tokens[token]
            return ConnectReply(Action.FAIL, exc.errno or errno.ENETUNREACH)
        # The listeners the data connection may come to: an AF_INET socket's to 127.0.0.1
        # alone; an AF_INET6 socket's to ::1, or ::ffff:127.0.0.1 where ::1 fails.
        self._announce(token, lo_port, (0,) if lo4 else range(len(self._tcp_listeners)))
        lo_ip = _LOOPBACK6 if dst.family == 6 and self._has_v6 else _LOOPBACK4
        return ConnectReply(Action.TUNNEL, 0, Address(lo_ip, self.data_port), token, source)

    def _udp_assoc(self, local: Address, dst: Address) -> UdpAssocReply:
        if not local.ip.is_loopback or local.port == 0:  # route only: never associated
            decision = self._backend.route(Proto.UDP, dst)
            if decision.action is Action.DIRECT:
                return UdpAssocReply(Action.DIRECT)
            return UdpAssocReply(Action.FAIL, decision.errno or errno.ENETUNREACH)
        try:
            decision, source = self._backend.udp_assoc(local, dst)
        except OSError as exc:
            return UdpAssocReply(Action.FAIL, exc.errno or errno.ENETUNREACH)
        if decision.action is Action.TUNNEL:
            if source is None:
                return UdpAssocReply(Action.FAIL, errno.ENETUNREACH)
            return UdpAssocReply(Action.TUNNEL, 0, source, self._udp_token(local))
        if decision.action is Action.FAIL:
            return UdpAssocReply(Action.FAIL, decision.errno or errno.ENETUNREACH)
        return UdpAssocReply(Action.DIRECT)

    def _udp_token(self, local: Address) -> bytes:
        """The association's token (a backend without one, e.g. a test's, gets zeros)."""
        udp_token = getattr(self._backend, "udp_token", None)
        token = udp_token(local) if udp_token is not None else None
        return token if token is not None else bytes(TOKEN_LEN)

    async def _status(self, fut: asyncio.Future[int]) -> Reply:
        """STATUS with WAIT of a flow whose outcome is not known yet."""
        try:
            result = await asyncio.wait_for(asyncio.shield(fut), self._connect_timeout)
        except TimeoutError:
            return StatusReply(StatusAction.DONE, errno.ETIMEDOUT)
        except asyncio.CancelledError:
            if fut.cancelled():
                return StatusReply(StatusAction.DONE, errno.ECONNABORTED)
            raise
        return StatusReply(StatusAction.DONE, result)

    def _outcome(self, token: bytes, write: Callable[[bytes], None]) -> asyncio.Future[None]:
        """Write the reply STATUS with WAIT would give for `token` the moment its outcome is
        known: from the engine's dispatch of the outcome (`tell`), else from the outcome's
        own done-callback, with no task wake-up in between (the program's connect() returns
        that much sooner). Done once written."""
        loop = self._running_loop()
        written: asyncio.Future[None] = loop.create_future()
        fut = self._backend.status(token)
        timer: asyncio.TimerHandle | None = None

        def send(err: int) -> None:
            if not written.done():
                if timer is not None:
                    timer.cancel()
                with contextlib.suppress(ConnectionError, RuntimeError):
                    write(emit_reply(StatusReply(StatusAction.DONE, err)))
                written.set_result(None)

        def done(f: asyncio.Future[int]) -> None:
            send(errno.ECONNABORTED if f.cancelled() or f.exception() else f.result())

        if fut is None:
            send(errno.ENOTCONN)
            return written
        timer = loop.call_later(self._connect_timeout, send, errno.ETIMEDOUT)
        if fut.done():
            done(fut)
            return written
        # Sooner still: from the engine's dispatch of the outcome, before the ACK is sealed
        # (a backend without `tell`, e.g. a test's, has the future only).
        tell = getattr(self._backend, "tell", None)
        if tell is not None:
            tell(token, send)
        fut.add_done_callback(done)  # and a cancelled one (at exit) still answers
        return written

    def _expire_due(self) -> None:
        """Expire the tokens past their deadline; the timer then waits for the next one."""
        self._token_timer = None
        loop = self._running_loop()
        now = loop.time()
        tokens = self._tokens
        while tokens:
            token = next(iter(tokens))
            deadline = tokens[token]
            if deadline > now:
                self._token_timer = loop.call_at(deadline, self._expire_due)
                return
            self._expire(token)

    def _expire(self, token: bytes) -> None:
        if self._tokens.pop(token, None) is not None:
            self._release(token)
            self.stats.unused_token += 1
            self._backend.token_expired(token)

    # -- announced loopback ports and the listeners' kernel filter (synfilter) ---------------

    def _announce(self, token: bytes, lo_port: int, listeners: Iterable[int]) -> None:
        """`token`'s data connection comes from `lo_port` (0: unknown) to one of `listeners`
        (indexes in _tcp_listeners)."""
        self._token_lo[token] = lo_port
        if lo_port:
            self._lo_ports[lo_port] += 1
        else:
            self._any_source += 1
        self._filter_need.update(listeners)
        self._filter_changed()

    def _release(self, token: bytes) -> int | None:
        """The token was presented or expired: its port is no longer let in. Returns the port
        it was announced with (0: any), None if it had none."""
        lo = self._token_lo.pop(token, None)
        if lo is None:
            return None
        if lo == 0:
            self._any_source -= 1
        else:
            self._lo_ports[lo] -= 1
            if self._lo_ports[lo] <= 0:
                del self._lo_ports[lo]
        self._tighten_later()
        return lo

    def _filter_changed(self) -> None:
        """One filter update per loop iteration, however many CONNECTs came in it (each waits
        for it before its reply goes out)."""
        if self._filter_sync is None and self._tcp_listeners:
            loop = self._running_loop()
            self._filter_sync = loop.create_future()
            loop.call_soon(self._apply_due)

    def _apply_due(self) -> None:
        if self._filter_sync is not None:  # else a CONNECT applied it already
            self._apply_filter(needed_only=True)

    def _tighten_later(self) -> None:
        """Ports no longer let in leave the filter with its next update (FILTER_TIGHTEN_AFTER)."""
        if self._tighten is None and self._tcp_listeners:
            loop = self._running_loop()
            self._tighten = loop.call_later(FILTER_TIGHTEN_AFTER, self._apply_filter)

    def _apply_filter(self, needed_only: bool = False) -> None:
        """Give the listeners the filter of the ports announced now: every listener, or with
        `needed_only` those the CONNECTs since the last update named. A listener left out
        keeps a filter that may still let released ports in: the pending tighten (set
        whenever a port is released) updates it within FILTER_TIGHTEN_AFTER."""
        sync, self._filter_sync = self._filter_sync, None
        need, self._filter_need = self._filter_need, set()
        listeners = range(len(self._tcp_listeners))
        if needed_only and len(need) < len(listeners):
            listeners = sorted(need)  # type: ignore[assignment]
        elif self._tighten is not None:  # this update takes the released ports out too
            self._tighten.cancel()
            self._tighten = None
        if self._filter_ok:
            ports = None if self._any_source else self._lo_ports.keys()
            prog = synfilter.program(ports)
            try:
                for i in listeners:
                    if prog != self._filter_progs[i]:
                        synfilter.attach(self._tcp_listeners[i], prog)
                        self._filter_progs[i] = prog
            except OSError as exc:
                # Never leave a stale filter that would keep our own connections out: the
                # listener then checks source ports itself (_accept_data), flood or not.
                self._filter_ok = False
                for i, sock in enumerate(self._tcp_listeners):
                    self._filter_progs[i] = None
                    synfilter.detach(sock)
                log.warning("data listener: kernel filter refused", error=str(exc))
        if sync is not None and not sync.done():
            sync.set_result(None)

    # -- data connections --------------------------------------------------------------------

    def _accept_data(self, lsock: socket.socket) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, addr = lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: count, keep serving
                self.stats.no_token += 1
                log.warning("data channel accept failed", error=str(exc))
                return
            if addr[1] not in self._lo_ports and not self._any_source:
                # From a port no CONNECT announced: another local user (the kernel filter
                # stops most before they get here). Reset at once, read nothing, keep nothing.
                self.stats.unannounced += 1
                with contextlib.suppress(OSError):
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
                conn.close()
                continue
            synfilter.detach(conn)  # inherited from the listener; data segments skip it
            conn.setblocking(False)
            # The shim wrote the token right after connecting: usually it is here already,
            # and the connection is handed on without being watched.
            try:
                data = conn.recv(TOKEN_LEN)
            except (BlockingIOError, InterruptedError):
                data = None
            except OSError:
                data = b""
            if data is not None and len(data) == TOKEN_LEN:
                self._token_arrived(conn, data, addr[1])
            elif data == b"":
                self.stats.no_token += 1
                conn.close()
            else:
                self._hold_for_token(conn, self._read_token, data or b"")

    def _hold_for_token(
        self, conn: socket.socket, reader: Callable[[socket.socket], None], got: bytes = b""
    ) -> None:
        """Keep an accepted data connection until its token arrives (LOCAL_STEP_TIMEOUT);
        `got`: the part of it already read."""
        if len(self._data_pending) >= MAX_PENDING_DATA:
            # Too many silent connections (any port gets in while a token without one is out):
            # drop the oldest (dicts keep insertion order), bounded whoever they are.
            self.stats.no_token += 1
            self._drop_data(next(iter(self._data_pending)))
        loop = asyncio.get_running_loop()
        conn.setblocking(False)
        timer = loop.call_later(LOCAL_STEP_TIMEOUT, self._no_token, conn)
        self._data_pending[conn] = (bytearray(got), timer)
        loop.add_reader(conn.fileno(), reader, conn)

    def _no_token(self, conn: socket.socket) -> None:
        if conn in self._data_pending:
            self.stats.no_token += 1
            self._drop_data(conn)

    def _drop_data(self, conn: socket.socket) -> None:
        entry = self._data_pending.pop(conn, None)
        if entry is not None:
            entry[1].cancel()
            with contextlib.suppress(Exception):
                asyncio.get_event_loop().remove_reader(conn.fileno())
        conn.close()

    def _read_token(self, conn: socket.socket) -> None:
        """Read exactly the 16-byte token and nothing more: the bytes after it (a gate's
        filler, or the program's data) are the backend's."""
        buf, timer = self._data_pending[conn]
        try:
            data = conn.recv(TOKEN_LEN - len(buf))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.stats.no_token += 1
            self._drop_data(conn)
            return
        buf += data
        if len(buf) < TOKEN_LEN:
            return
        timer.cancel()
        del self._data_pending[conn]
        asyncio.get_running_loop().remove_reader(conn.fileno())
        try:
            port = conn.getpeername()[1]
        except OSError:
            port = -1
        self._token_arrived(conn, bytes(buf), port)

    def _token_arrived(self, conn: socket.socket, token: bytes, port: int) -> None:
        """A data connection from loopback `port` presented `token`."""
        if self._tokens.pop(token, None) is None:
            self.stats.bad_token += 1
            conn.close()
            return
        lo = self._release(token)
        if lo not in (0, port):  # the token, but not from the socket it was handed to
            self.stats.bad_token += 1
            conn.close()
            self._backend.token_expired(token)
            return
        self._backend.tcp_attached(token, conn)

    # -- UDP data connections (docs/channel.md, "UDP") ----------------------------------------

    def _accept_udp_data(self, lsock: socket.socket) -> None:
        for _ in range(64):
            try:
                conn, _addr = lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self.stats.no_token += 1
                log.warning("UDP data channel accept failed", error=str(exc))
                return
            _, uid, _ = _PEERCRED.unpack(
                conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
            )
            if uid != self._uid:  # the directory is 0700; only root could still get here
                self.stats.bad_uid += 1
                conn.close()
                continue
            self._hold_for_token(conn, self._read_udp_token)

    def _read_udp_token(self, conn: socket.socket) -> None:
        """The first record is an association's 16-byte token: the backend takes the
        connection (and we answer UDP_DATA_ACK) or it is closed, which the shim sees as EOF."""
        try:
            record = conn.recv(TOKEN_LEN + 1)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            record = b""
        entry = self._data_pending.pop(conn)
        entry[1].cancel()
        asyncio.get_running_loop().remove_reader(conn.fileno())
        attach = getattr(self._backend, "udp_attached", None)
        if len(record) != TOKEN_LEN or attach is None or not attach(record, conn):
            if record:
                self.stats.bad_token += 1
            else:
                self.stats.no_token += 1
            conn.close()
            return
        with contextlib.suppress(OSError):
            conn.send(UDP_DATA_ACK)


class _CtlConnection(asyncio.Protocol):
    """One process's control connection (docs/channel.md, "Framing"): requests one at a
    time, as many as the process sends; the first within LOCAL_STEP_TIMEOUT, later ones
    whenever it needs one, each frame once begun within LOCAL_STEP_TIMEOUT. EOF between
    requests is the process's exit. Requests are parsed and answered in the callback that
    read them (a blocking connect's SYN leaves, and its reply goes out, without a task's
    wake-up); the few that must wait get a task, and what follows waits for it."""

    def __init__(self, server: ChannelServer) -> None:
        self._server = server
        self._transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._first = True
        self._busy = False  # a reply (or a blocking connect's outcome) is still to come
        self._eof = False
        self._timer: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        server = self._server
        server.stats.connections += 1
        sock = transport.get_extra_info("socket")
        _, uid, _ = _PEERCRED.unpack(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
        )
        if uid != server._uid:
            server.stats.bad_uid += 1
            log.warning("channel: request from another uid dropped", uid=uid)
            transport.abort()
            return
        self._transport = transport
        server._ctl_conns.add(self)
        self._arm()  # the first request

    def data_received(self, data: bytes) -> None:
        self._buf += data
        self._serve()

    def eof_received(self) -> bool:
        self._eof = True
        self._serve()
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._server._ctl_conns.discard(self)
        self._transport = None

    def pause_writing(self) -> None:  # a process that does not read its replies
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        if self._transport is not None:
            self._transport.resume_reading()

    # -- requests ----------------------------------------------------------------------------

    def _serve(self) -> None:
        server, buf = self._server, self._buf
        while not self._busy and self._transport is not None:
            if len(buf) < PREFIX_LEN:
                break
            try:
                end = PREFIX_LEN + frame_body_len(bytes(buf[:PREFIX_LEN]))
                if len(buf) < end:
                    break
                secret, req = parse_request(bytes(buf[:end]))
            except DecodeError:
                server.stats.malformed += 1
                self.close()
                return
            del buf[:end]
            self._disarm()  # the next frame has its own LOCAL_STEP_TIMEOUT
            if not secret_matches(server._secret, secret):
                server.stats.bad_secret += 1
                log.warning("channel: request with a wrong secret dropped")
                self.close()
                return
            self._first = False
            server.stats.requests += 1
            if isinstance(req, GateRequest):  # never answered: the shim does not wait for it
                server._backend.gate(req.token, req.filler)
                continue
            try:
                reply = server._answer_now(req)
            except Exception as exc:  # a backend's bug ends this connection, not the launcher
                log.error("channel: request failed", request=type(req).__name__, error=repr(exc))
                self.close()
                return
            if isinstance(reply, Coroutine):
                self._busy = True
                task = asyncio.get_running_loop().create_task(self._answer_later(req, reply))
                server._tasks.add(task)
                task.add_done_callback(server._tasks.discard)
                break
            self._reply(req, reply)
        if self._transport is None:
            return
        if self._eof and not self._busy:
            if self._first or buf:  # nothing at all, or a frame cut short
                server.stats.malformed += 1
            self.close()
        elif self._busy or not buf:
            if not self._first:
                self._disarm()
        elif self._timer is None:
            self._arm()

    async def _answer_later(self, req: Request, pending: Coroutine[None, None, Reply]) -> None:
        try:
            reply = await pending
        except Exception as exc:
            log.error("channel: request failed", request=type(req).__name__, error=repr(exc))
            self.close()
            return
        self._busy = False
        self._reply(req, reply)
        self._serve()

    def _reply(self, req: Request, reply: Reply) -> None:
        transport = self._transport
        if transport is None:
            return
        transport.write(emit_reply(reply))
        if (
            isinstance(req, ConnectRequest)
            and req.wait
            and isinstance(reply, ConnectReply)
            and reply.action is Action.TUNNEL
        ):
            # A blocking connect: its outcome follows on this connection (no STATUS request;
            # the shim reads it after its local steps). Nothing else is served before it.
            self._busy = True
            written = self._server._outcome(reply.token, transport.write)
            if not written.done():
                written.add_done_callback(self._outcome_written)
            else:
                self._busy = False

    def _outcome_written(self, _: asyncio.Future[None]) -> None:
        self._busy = False
        self._serve()

    # -- timeouts ------------------------------------------------------------------------------

    def _arm(self) -> None:
        self._disarm()
        loop = self._server._running_loop()
        self._timer = loop.call_later(LOCAL_STEP_TIMEOUT, self._timed_out)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _timed_out(self) -> None:
        self._timer = None
        self._server.stats.malformed += 1
        self.close()

    def close(self) -> None:
        self._disarm()
        if self._transport is not None:
            self._transport.close()
            self._transport = None
