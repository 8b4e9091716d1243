"""The channel server: private socket, secret and uid checks, one-time tokens, replies, and
the data listener's announced loopback ports (only those get in: `synfilter`)."""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import stat
import subprocess
import sys
import textwrap
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path
from typing import Any

import pytest

from wrapguard.doors.preload import channel as channel_mod
from wrapguard.doors.preload.channel import FILTER_TIGHTEN_AFTER, ChannelServer, Decision
from wrapguard.errors import DecodeError, WrapguardError
from wrapguard.runtime import synfilter
from wrapguard.wire.ipc import (
    PREFIX_LEN,
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
    UdpHeader,
    UdpKind,
    UdpReleaseReply,
    UdpReleaseRequest,
    UnlistenReply,
    UnlistenRequest,
    emit_reply,
    emit_request,
    emit_udp_header,
    frame_body_len,
    parse_reply,
    parse_request,
    parse_udp_header,
)

SECRET = bytes(range(1, 33))
DST = Address(IPv4Address("10.150.0.1"), 80)
SRC = Address(IPv4Address("10.150.0.2"), 40000)


@dataclass
class Backend:
    status_futures: dict[bytes, asyncio.Future[int]] = field(default_factory=dict)
    attached: list[bytes] = field(default_factory=list)
    handed: list[tuple[float | None, int]] = field(default_factory=list)
    gated: list[tuple[bytes, int]] = field(default_factory=list)
    expired: list[bytes] = field(default_factory=list)
    calls: list[tuple[str, Any]] = field(default_factory=list)

    def hello(self, pid: int, version: str) -> None:
        self.calls.append(("hello", (pid, version)))

    def route(self, proto: Proto, dst: Address) -> Decision:
        if dst.ip == IPv4Address("10.150.0.99"):
            return Decision(Action.FAIL, errno.ECONNREFUSED)
        if dst.ip == IPv4Address("10.150.0.97"):
            return Decision(Action.TUNNEL)  # open_tcp refuses it
        if str(dst.ip).startswith(("10.150.0.", "fd15::")):
            return Decision(Action.TUNNEL)
        return Decision(Action.DIRECT)

    def open_tcp(
        self, dst: Address, token: bytes, gate: bool = False, src_port: int = 0
    ) -> Address | None:
        if dst.ip == IPv4Address("10.150.0.97"):
            raise OSError(errno.EHOSTUNREACH, "no")
        self.status_futures[token] = asyncio.get_running_loop().create_future()
        return SRC

    def tcp_attached(self, token: bytes, sock: Any) -> None:
        self.attached.append(token)
        # What relay.attach_socket(prepared=True) relies on, as handed on
        self.handed.append(
            (sock.gettimeout(), sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        )
        sock.setblocking(True)
        sock.sendall(b"attached")
        sock.close()

    def gate(self, token: bytes, filler: int) -> None:
        self.gated.append((token, filler))

    def token_expired(self, token: bytes) -> None:
        self.expired.append(token)

    def status(self, token: bytes) -> asyncio.Future[int] | None:
        return self.status_futures.get(token)

    def listen(self, proto: Proto, addr: Address, v6only: bool = False) -> None:
        if addr.port == 1:
            raise OSError(errno.EACCES, "no")
        self.calls.append(("listen", addr))

    def unlisten(self, proto: Proto, addr: Address) -> None:
        self.calls.append(("unlisten", addr))

    def peer_of(self, loopback: Address) -> Address | None:
        return SRC if loopback.port == 5555 else None

    def udp_assoc(self, local: Address, dst: Address) -> tuple[Decision, Address | None]:
        decision = self.route(Proto.UDP, dst)
        self.calls.append(("udp_assoc", (local, dst)))
        if dst.port == 2:
            raise OSError(errno.EADDRNOTAVAIL, "no port")
        return decision, SRC if decision.action is Action.TUNNEL else None

    def udp_release(self, local: Address) -> None:
        self.calls.append(("udp_release", local))

    async def resolve(
        self, name: str, family: int, flags: int
    ) -> tuple[int, list[IPv4Address | IPv6Address], str]:
        self.calls.append(("resolve", (name, family, flags)))
        if name == "many.test":
            return 0, [IPv4Address(f"10.0.0.{i}") for i in range(1, 30)], "many.test"
        if name == "web.test":
            return 0, [IPv4Address("10.150.0.1"), IPv6Address("fd15::1")], "www.test"
        return 2, [], ""


async def read_reply(reader: asyncio.StreamReader) -> bytes:
    """One reply frame, or b"" when the server closed the connection instead."""
    try:
        prefix = await asyncio.wait_for(reader.readexactly(PREFIX_LEN), 10)
        return prefix + await asyncio.wait_for(reader.readexactly(frame_body_len(prefix)), 10)
    except asyncio.IncompleteReadError as exc:
        assert exc.partial == b"", "a partial reply"
        return b""
    except ConnectionResetError:  # dropped before our request was read: no answer either
        return b""


async def raw(path: str, data: bytes) -> bytes:
    reader, writer = await asyncio.open_unix_connection(path)
    writer.write(data)
    await writer.drain()
    try:
        return await read_reply(reader)
    finally:
        writer.close()


async def ask(server: ChannelServer, req: Request, secret: bytes = SECRET) -> Reply:
    assert server.ctl_path is not None
    return parse_reply(await raw(server.ctl_path, emit_request(req, secret)))


def bound(host: str = "127.0.0.1") -> socket.socket:
    """A non-blocking socket bound to a loopback port, as the shim binds the program's socket
    before CONNECT; its port goes into ConnectRequest.lo_port."""
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    s.bind((host, 0))
    s.setblocking(False)
    return s


def lo_port(sock: socket.socket) -> int:
    return int(sock.getsockname()[1])


async def connect_data(
    server: ChannelServer, sock: socket.socket, host: str = "127.0.0.1", timeout: float = 5
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect `sock` to the data listener (TimeoutError if the SYN gets no answer)."""
    loop = asyncio.get_running_loop()
    await asyncio.wait_for(loop.sock_connect(sock, (host, server.data_port)), timeout)
    return await asyncio.open_connection(sock=sock)


async def tunnel(server: ChannelServer, sock: socket.socket, dst: Address = DST) -> ConnectReply:
    """CONNECT as the shim sends it for `sock` (an AF_INET socket's says so: LO4)."""
    lo4 = sock.family == socket.AF_INET
    rep = await ask(server, ConnectRequest(Proto.TCP, dst, lo_port=lo_port(sock), lo4=lo4))
    assert isinstance(rep, ConnectReply) and rep.action is Action.TUNNEL, rep
    return rep


def run_with_server(
    body: Callable[[ChannelServer, Backend], Awaitable[None]],
    tmp_path: Path,
    **kwargs: Any,
) -> ChannelServer:
    backend = kwargs.pop("backend", None) or Backend()
    server = ChannelServer(backend, secret=SECRET, uid=kwargs.pop("uid", os.getuid()), **kwargs)

    async def main() -> None:
        await server.start(str(tmp_path))
        try:
            await body(server, backend)
        finally:
            server.close()

    asyncio.run(main())
    return server


def test_directory_and_socket_are_private_and_removed(tmp_path: Path) -> None:
    seen: dict[str, Any] = {}

    async def body(server: ChannelServer, backend: Backend) -> None:
        assert server.directory is not None and server.ctl_path is not None
        seen["dir"], seen["sock"] = server.directory, server.ctl_path
        seen["dir_mode"] = stat.S_IMODE(os.stat(server.directory).st_mode)
        seen["sock_mode"] = stat.S_IMODE(os.stat(server.ctl_path).st_mode)
        seen["is_sock"] = stat.S_ISSOCK(os.stat(server.ctl_path).st_mode)
        seen["env"] = server.env()

    run_with_server(body, tmp_path, tunnel_addrs=[IPv4Address("10.150.0.2")])
    assert seen["dir_mode"] == 0o700 and seen["sock_mode"] == 0o600 and seen["is_sock"]
    assert not os.path.exists(seen["dir"]) and not os.path.exists(seen["sock"])
    env = seen["env"]
    assert env["WRAPGUARD_CTL"] == seen["sock"]
    assert bytes.fromhex(env["WRAPGUARD_SECRET"]) == SECRET
    assert env["WRAPGUARD_ADDRS"] == "10.150.0.2"
    # Who serves ctl.sock, for the shim to check (SO_PEERCRED and the directory's owner).
    assert env["WRAPGUARD_CTL_PID"] == str(os.getpid())
    assert env["WRAPGUARD_CTL_UID"] == str(os.geteuid())
    assert SECRET.hex() not in repr(ChannelServer(Backend(), secret=SECRET, uid=0))


def test_directory_is_removed_on_every_exit_path(tmp_path: Path) -> None:
    script = f"""
        import asyncio, os, sys
        from wrapguard.doors.preload.channel import ChannelServer
        async def main():
            s = ChannelServer(object(), secret=bytes(32), uid=os.getuid())
            await s.start({str(tmp_path)!r})
            print(s.directory, flush=True)
            if sys.argv[1] == "raise":
                raise RuntimeError("setup failed")
            sys.exit(3)
        asyncio.run(main())
    """
    for how in ("exit", "raise"):
        proc = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(script), how],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        directory = proc.stdout.strip().splitlines()[-1]
        assert directory.startswith(str(tmp_path)), proc.stderr
        assert proc.returncode != 0
        assert not os.path.exists(directory)


def test_connect_tunnel_token_status_and_single_use(tmp_path: Path) -> None:
    async def body(server: ChannelServer, backend: Backend) -> None:
        s4, s6 = bound(), bound("::1")
        rep = await tunnel(server, s4)
        assert rep.loopback == Address(IPv4Address("127.0.0.1"), server.data_port)
        assert rep.source == SRC and len(rep.token) == 16
        rep6 = await tunnel(server, s6, Address(IPv6Address("fd15::1"), 80))
        assert rep6.loopback is not None
        assert rep6.loopback.ip == IPv6Address("::1") and rep6.loopback.port == server.data_port

        pending = await ask(server, StatusRequest(rep.token, wait=False))
        assert pending == StatusReply(StatusAction.PENDING)
        waiting = asyncio.ensure_future(ask(server, StatusRequest(rep.token, wait=True)))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        backend.status_futures[rep.token].set_result(errno.ECONNREFUSED)
        assert await waiting == StatusReply(StatusAction.DONE, errno.ECONNREFUSED)
        unknown = await ask(server, StatusRequest(bytes(16), wait=True))
        assert unknown == StatusReply(StatusAction.DONE, errno.ENOTCONN)

        for sock, host, token in ((s4, "127.0.0.1", rep.token), (s6, "::1", rep6.token)):
            r, w = await connect_data(server, sock, host)
            w.write(token)
            assert await asyncio.wait_for(r.read(), 5) == b"attached"
            w.close()
        assert backend.attached == [rep.token, rep6.token]
        s3 = bound()
        await tunnel(server, s3)
        r, w = await connect_data(server, s3)
        w.write(rep.token)  # a token is single use
        assert await asyncio.wait_for(r.read(), 5) == b""
        w.close()
        await asyncio.sleep(0.05)
        assert server.stats.bad_token == 1

    run_with_server(body, tmp_path)


def test_status_wait_is_capped_by_the_connect_timeout(tmp_path: Path) -> None:
    async def body(server: ChannelServer, backend: Backend) -> None:
        rep = await ask(server, ConnectRequest(Proto.TCP, DST))
        assert isinstance(rep, ConnectReply)
        got = await ask(server, StatusRequest(rep.token, wait=True))
        assert got == StatusReply(StatusAction.DONE, errno.ETIMEDOUT)

    run_with_server(body, tmp_path, connect_timeout=0.2)


def test_other_replies(tmp_path: Path) -> None:
    async def body(server: ChannelServer, backend: Backend) -> None:
        any4 = Address(IPv4Address("0.0.0.0"), 8080)
        assert await ask(server, HelloRequest(42, "0.2.0")) == HelloReply()
        assert ("hello", (42, "0.2.0")) in backend.calls
        direct = Address(IPv4Address("192.0.2.1"), 80)
        assert await ask(server, ConnectRequest(Proto.TCP, direct)) == ConnectReply(Action.DIRECT)
        refused = Address(IPv4Address("10.150.0.99"), 80)
        assert await ask(server, ConnectRequest(Proto.TCP, refused)) == ConnectReply(
            Action.FAIL, errno.ECONNREFUSED
        )
        unreachable = Address(IPv4Address("10.150.0.97"), 80)
        assert await ask(server, ConnectRequest(Proto.TCP, unreachable)) == ConnectReply(
            Action.FAIL, errno.EHOSTUNREACH
        )
        assert await ask(server, ListenRequest(Proto.TCP, any4)) == ListenReply()
        refused_port = Address(IPv4Address("0.0.0.0"), 1)
        assert await ask(server, ListenRequest(Proto.TCP, refused_port)) == ListenReply(
            errno.EACCES
        )
        assert await ask(server, UnlistenRequest(Proto.TCP, any4)) == UnlistenReply()
        assert ("listen", any4) in backend.calls and ("unlisten", any4) in backend.calls
        lo = IPv4Address("127.0.0.1")
        assert await ask(server, PeerRequest(Address(lo, 5555))) == PeerReply(PeerAction.FOUND, SRC)
        assert await ask(server, PeerRequest(Address(lo, 5556))) == PeerReply(PeerAction.UNKNOWN)
        assert server.stats.requests == 9

    run_with_server(body, tmp_path)


def test_udp_assoc_and_release(tmp_path: Path) -> None:
    async def body(server: ChannelServer, backend: Backend) -> None:
        lo = Address(IPv4Address("127.0.0.1"), 41000)
        tunnelled = Address(IPv4Address("10.150.0.1"), 53)
        direct = Address(IPv4Address("192.0.2.1"), 53)
        refused = Address(IPv4Address("10.150.0.99"), 53)
        assert await ask(server, UdpAssocRequest(lo, tunnelled)) == UdpAssocReply(
            Action.TUNNEL, 0, SRC
        )
        assert ("udp_assoc", (lo, tunnelled)) in backend.calls
        assert await ask(server, UdpAssocRequest(lo, direct)) == UdpAssocReply(Action.DIRECT)
        assert await ask(server, UdpAssocRequest(lo, refused)) == UdpAssocReply(
            Action.FAIL, errno.ECONNREFUSED
        )
        no_port = Address(IPv4Address("10.150.0.1"), 2)
        assert await ask(server, UdpAssocRequest(lo, no_port)) == UdpAssocReply(
            Action.FAIL, errno.EADDRNOTAVAIL
        )
        # A local side that is not loopback, or port 0, only routes: never associated.
        before = len(backend.calls)
        for local in (Address(IPv4Address("192.0.2.7"), 41000), Address(lo.ip, 0)):
            assert await ask(server, UdpAssocRequest(local, tunnelled)) == UdpAssocReply(
                Action.FAIL, errno.ENETUNREACH
            )
            assert await ask(server, UdpAssocRequest(local, direct)) == UdpAssocReply(Action.DIRECT)
        assert backend.calls[before:] == []
        assert await ask(server, UdpReleaseRequest(lo)) == UdpReleaseReply()
        assert await ask(server, UdpReleaseRequest(SRC)) == UdpReleaseReply()  # not loopback
        assert [c for c in backend.calls if c[0] == "udp_release"] == [("udp_release", lo)]
        env = server.env()
        assert channel_mod.ENV_UDP not in env
        server.udp_env = "4242"
        assert server.env()[channel_mod.ENV_UDP] == "4242"

    run_with_server(body, tmp_path)


def test_resolve(tmp_path: Path) -> None:
    async def body(server: ChannelServer, backend: Backend) -> None:
        web = await ask(server, ResolveRequest("web.test", 0, 1))
        assert web == ResolveReply(
            ResolveAction.FOUND, 0, (IPv4Address("10.150.0.1"), IPv6Address("fd15::1")), "www.test"
        )
        assert ("resolve", ("web.test", 0, 1)) in backend.calls
        assert await ask(server, ResolveRequest("nope.test", 4)) == ResolveReply(
            ResolveAction.FAIL, 2
        )
        many = await ask(server, ResolveRequest("many.test", 4))
        assert isinstance(many, ResolveReply) and len(many.addresses) == 12  # fits a frame
        assert channel_mod.ENV_DNS not in server.env()
        server.resolve_names = True
        assert server.env()[channel_mod.ENV_DNS] == "1"

    run_with_server(body, tmp_path)


def test_udp_header_codec() -> None:
    dst = Address(IPv6Address("fd15::1"), 53)
    hdr = emit_udp_header(UdpHeader(UdpKind.DATA, dst))
    assert hdr == bytes([1, 0, 6]) + dst.ip.packed + (53).to_bytes(2, "big")
    assert parse_udp_header(hdr + b"payload") == (UdpHeader(UdpKind.DATA, dst), b"payload")
    err = emit_udp_header(UdpHeader(UdpKind.ERROR, SRC)) + errno.ECONNREFUSED.to_bytes(4, "big")
    assert parse_udp_header(err)[0].kind is UdpKind.ERROR
    short, version, kind = hdr[:20], bytes([2]) + hdr[1:], hdr[:1] + bytes([7]) + hdr[2:]
    family = hdr[:2] + bytes([5]) + hdr[3:]
    for bad in (short, version, kind, family):
        with pytest.raises(DecodeError):
            parse_udp_header(bad)


def test_one_connection_carries_many_requests_one_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The shim keeps one control connection per process (docs/channel.md, "Framing"): every
    request on it is answered in turn, an idle one is kept, EOF between requests is no error,
    and a bad frame later on still ends the connection unanswered."""

    async def body(server: ChannelServer, backend: Backend) -> None:
        assert server.ctl_path is not None
        reader, writer = await asyncio.open_unix_connection(server.ctl_path)
        try:
            for pid in (1, 2, 3):
                writer.write(emit_request(HelloRequest(pid, "0.2.0"), SECRET))
                assert parse_reply(await read_reply(reader)) == HelloReply()
            await asyncio.sleep(channel_mod.LOCAL_STEP_TIMEOUT + 0.5)  # idle: still served
            writer.write(emit_request(ConnectRequest(Proto.TCP, DST), SECRET))
            rep = parse_reply(await read_reply(reader))
            assert isinstance(rep, ConnectReply) and rep.action is Action.TUNNEL
            assert rep.token is not None
            writer.write(emit_request(StatusRequest(rep.token, False), SECRET))
            assert isinstance(parse_reply(await read_reply(reader)), StatusReply)
            writer.write(emit_request(HelloRequest(4, "0.2.0"), bytes(32)))
            assert await read_reply(reader) == b""  # a wrong secret ends it, unanswered
        finally:
            writer.close()
        _, writer = await asyncio.open_unix_connection(server.ctl_path)
        writer.write(emit_request(HelloRequest(5, "0.2.0"), SECRET))
        await writer.drain()
        writer.close()  # gone between requests (before reading the reply): not malformed
        await asyncio.sleep(0.2)
        assert server.stats.requests == 6 and server.stats.bad_secret == 1
        assert server.stats.malformed == 0

    monkeypatch.setattr(channel_mod, "LOCAL_STEP_TIMEOUT", 0.3)
    run_with_server(body, tmp_path)


async def waiting_connect(
    server: ChannelServer,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, ConnectReply]:
    """A control connection with a CONNECT with WAIT sent and its TUNNEL reply read."""
    assert server.ctl_path is not None
    reader, writer = await asyncio.open_unix_connection(server.ctl_path)
    writer.write(emit_request(ConnectRequest(Proto.TCP, DST, wait=True), SECRET))
    rep = parse_reply(await read_reply(reader))
    assert isinstance(rep, ConnectReply) and rep.action is Action.TUNNEL
    return reader, writer, rep


def test_a_waiting_connect_is_followed_by_its_outcome_on_the_same_connection(
    tmp_path: Path,
) -> None:
    """CONNECT with WAIT (a blocking socket): the TUNNEL reply comes at once, the STATUS reply
    follows on the same connection when the outcome is known; DIRECT gets no second frame."""

    async def body(server: ChannelServer, backend: Backend) -> None:
        reader, writer, rep = await waiting_connect(server)
        try:
            outcome = asyncio.ensure_future(read_reply(reader))
            await asyncio.sleep(0.2)
            assert not outcome.done()  # held until the outcome is known
            backend.status_futures[rep.token].set_result(errno.ECONNREFUSED)
            assert parse_reply(await outcome) == StatusReply(StatusAction.DONE, errno.ECONNREFUSED)
            direct = Address(IPv4Address("192.0.2.1"), 80)
            writer.write(emit_request(ConnectRequest(Proto.TCP, direct, wait=True), SECRET))
            assert parse_reply(await read_reply(reader)) == ConnectReply(Action.DIRECT)
            writer.write(emit_request(HelloRequest(1, "0.2.0"), SECRET))  # next in line
            assert parse_reply(await read_reply(reader)) == HelloReply()
            # GATE is never answered: the request after it is
            writer.write(emit_request(GateRequest(rep.token, 12345), SECRET))
            writer.write(emit_request(HelloRequest(2, "0.2.0"), SECRET))
            assert parse_reply(await read_reply(reader)) == HelloReply()
            assert backend.gated == [(rep.token, 12345)]
        finally:
            writer.close()

    run_with_server(body, tmp_path)


@dataclass
class TellingBackend(Backend):
    """A backend that tells outcomes the moment they are known (PreloadOutbound.tell)."""

    tellers: dict[bytes, Callable[[int], None]] = field(default_factory=dict)

    def tell(self, token: bytes, callback: Callable[[int], None]) -> bool:
        self.tellers[token] = callback
        return True


def test_a_told_outcome_answers_a_waiting_connect_at_once(tmp_path: Path) -> None:
    """The outcome told by the backend (from the engine's event dispatch) is written then and
    there: no loop turn for the future's callbacks, nor the future at all."""
    backend = TellingBackend()

    async def body(server: ChannelServer, _: Backend) -> None:
        reader, writer, rep = await waiting_connect(server)
        try:
            await asyncio.sleep(0.05)
            assert list(backend.tellers) == [rep.token]
            backend.tellers[rep.token](errno.EHOSTUNREACH)  # the future stays unresolved
            got = parse_reply(await asyncio.wait_for(read_reply(reader), 1))
            assert got == StatusReply(StatusAction.DONE, errno.EHOSTUNREACH)
            backend.status_futures[rep.token].set_result(0)  # later: nothing more is sent
            writer.write(emit_request(HelloRequest(1, "0.2.0"), SECRET))
            assert parse_reply(await read_reply(reader)) == HelloReply()
        finally:
            writer.close()

    run_with_server(body, tmp_path, backend=backend, connect_timeout=5)


def test_requests_in_pieces_and_in_one_write_are_answered_in_order(tmp_path: Path) -> None:
    """Frames are cut out of the byte stream however they arrive; one that waits (RESOLVE,
    answered by a task) holds back those behind it, which are then answered in order."""

    async def body(server: ChannelServer, backend: Backend) -> None:
        assert server.ctl_path is not None
        reader, writer = await asyncio.open_unix_connection(server.ctl_path)
        try:
            hello = emit_request(HelloRequest(1, "0.2.0"), SECRET)
            writer.write(hello[:3])
            await asyncio.sleep(0.05)
            writer.write(hello[3:20])
            await asyncio.sleep(0.05)
            writer.write(hello[20:])
            assert parse_reply(await read_reply(reader)) == HelloReply()
            resolve = emit_request(ResolveRequest("web.test", 0), SECRET)
            writer.write(hello + resolve + hello + resolve[:10])
            assert parse_reply(await read_reply(reader)) == HelloReply()
            got = parse_reply(await read_reply(reader))
            assert isinstance(got, ResolveReply) and got.action is ResolveAction.FOUND
            assert parse_reply(await read_reply(reader)) == HelloReply()
            writer.write(resolve[10:])
            got = parse_reply(await read_reply(reader))
            assert isinstance(got, ResolveReply) and got.action is ResolveAction.FOUND
            assert server.stats.requests == 5 and server.stats.malformed == 0
        finally:
            writer.close()

    run_with_server(body, tmp_path)


def test_a_waiting_connect_is_capped_by_the_connect_timeout(tmp_path: Path) -> None:
    async def body(server: ChannelServer, backend: Backend) -> None:
        reader, writer, rep = await waiting_connect(server)
        try:
            outcome = parse_reply(await read_reply(reader))  # the outcome never comes
            assert outcome == StatusReply(StatusAction.DONE, errno.ETIMEDOUT)
            backend.status_futures[rep.token].set_result(0)  # too late: nothing more is sent
            writer.write(emit_request(HelloRequest(1, "0.2.0"), SECRET))
            assert parse_reply(await read_reply(reader)) == HelloReply()
        finally:
            writer.close()

    run_with_server(body, tmp_path, connect_timeout=0.3)


def test_wrong_secret_and_malformed_frames_are_dropped_unanswered(tmp_path: Path) -> None:
    async def body(server: ChannelServer, backend: Backend) -> None:
        assert server.ctl_path is not None
        frame = emit_request(ConnectRequest(Proto.TCP, DST), bytes(32))
        assert await raw(server.ctl_path, frame) == b""
        assert await raw(server.ctl_path, b"\x00\x00\x10\x00garbage") == b""
        assert await raw(server.ctl_path, b"\x00\x00\x00\x05\x01\x09\x00\x00\x00") == b""
        assert server.stats.bad_secret == 1 and server.stats.malformed == 2
        assert server.stats.requests == 0 and backend.status_futures == {}

    run_with_server(body, tmp_path)


def test_wrong_or_missing_token_is_rejected_and_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(channel_mod, "LOCAL_STEP_TIMEOUT", 0.3)

    async def body(server: ChannelServer, backend: Backend) -> None:
        s1, s2 = bound(), bound()
        await tunnel(server, s1)
        await tunnel(server, s2)
        r, w = await connect_data(server, s1)
        w.write(b"GET / HTTP/1.0\r\n")  # 16 bytes, not a token
        assert await asyncio.wait_for(r.read(), 5) == b""
        w.close()
        r, w = await connect_data(server, s2)
        assert await asyncio.wait_for(r.read(), 5) == b""  # silent: closed after the deadline
        w.close()
        await asyncio.sleep(0.05)
        assert server.stats.bad_token == 1 and server.stats.no_token == 1
        assert backend.attached == []

    run_with_server(body, tmp_path)


def test_tokens_never_used_expire_and_are_counted(tmp_path: Path) -> None:
    async def body(server: ChannelServer, backend: Backend) -> None:
        sock = bound()
        rep = await tunnel(server, sock)
        await asyncio.sleep(0.4)
        assert server.stats.unused_token == 1 and backend.expired == [rep.token]
        with pytest.raises(TimeoutError):  # its port is no longer let in: no SYN-ACK
            await connect_data(server, sock, timeout=1.5)
        sock.close()

    run_with_server(body, tmp_path, token_ttl=0.2)


def test_each_token_expires_at_its_own_deadline_and_a_used_one_never(tmp_path: Path) -> None:
    """One timer serves every outstanding token (the oldest's deadline first)."""

    async def body(server: ChannelServer, backend: Backend) -> None:
        a, b, c = bound(), bound(), bound()
        rep_a = await tunnel(server, a)
        await asyncio.sleep(0.15)
        rep_b = await tunnel(server, b)
        rep_c = await tunnel(server, c)
        r, w = await connect_data(server, c)
        w.write(rep_c.token)  # used: never expires
        assert await asyncio.wait_for(r.read(), 5) == b"attached"
        w.close()
        await asyncio.sleep(0.1)  # a's deadline (0.25 s) has passed, b's not yet
        assert backend.expired == [rep_a.token]
        await asyncio.sleep(0.2)
        assert backend.expired == [rep_a.token, rep_b.token]
        assert server.stats.unused_token == 2 and server._token_timer is None
        d = bound()
        rep_d = await tunnel(server, d)  # a new token arms the timer again
        await asyncio.sleep(0.35)
        assert backend.expired[-1] == rep_d.token and server.stats.unused_token == 3
        for s in (a, b, c, d):
            s.close()

    run_with_server(body, tmp_path, token_ttl=0.25)


def test_request_from_another_uid_is_dropped(tmp_path: Path) -> None:
    async def body(server: ChannelServer, backend: Backend) -> None:
        assert await raw(server.ctl_path or "", emit_request(HelloRequest(1, "x"), SECRET)) == b""
        assert server.stats.bad_uid == 1 and backend.calls == []

    run_with_server(body, tmp_path, uid=os.getuid() + 1)


@pytest.mark.root
def test_another_user_cannot_reach_the_socket(tmp_path: Path) -> None:
    tmp_path.chmod(0o755)  # the parent is reachable; the private directory must not be

    async def body(server: ChannelServer, backend: Backend) -> None:
        code = textwrap.dedent(
            f"""
            import os, socket, sys
            os.setgid(65534)
            os.setuid(65534)
            s = socket.socket(socket.AF_UNIX)
            try:
                s.connect({server.ctl_path!r})
            except OSError as exc:
                print(exc.errno)
            else:
                s.sendall(sys.stdin.buffer.read())
                print("reply", len(s.recv(100)))
            """
        )
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            code,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        out, err = await proc.communicate(emit_request(HelloRequest(1, "x"), SECRET))
        assert out.decode().strip() == str(errno.EACCES), err
        assert backend.calls == []

    run_with_server(body, tmp_path)


def test_data_listener_is_loopback_only(tmp_path: Path) -> None:
    async def body(server: ChannelServer, backend: Backend) -> None:
        for sock in server._servers[1:]:
            for s in sock.sockets:
                host = s.getsockname()[0]
                assert host in ("127.0.0.1", "::1")
                assert s.getsockname()[1] == server.data_port
        assert socket.has_ipv6

    run_with_server(body, tmp_path)


NEW_FRAMES: list[Request | Reply] = [
    UdpAssocRequest(Address(IPv4Address("127.0.0.1"), 41000), Address(IPv6Address("fd15::1"), 53)),
    UdpReleaseRequest(Address(IPv6Address("::1"), 41000)),
    ResolveRequest("web.wg.test", 6, 1),
    UdpAssocReply(Action.TUNNEL, 0, SRC),
    UdpAssocReply(Action.DIRECT),
    UdpAssocReply(Action.FAIL, errno.ENETUNREACH),
    UdpReleaseReply(),
    ResolveReply(ResolveAction.FOUND, 0, (IPv4Address("10.150.0.1"),), "web.wg.test"),
    ResolveReply(ResolveAction.FAIL, 5),
]


@pytest.mark.parametrize("frame", NEW_FRAMES, ids=repr)
def test_udp_and_resolve_frames_round_trip(frame: Request | Reply) -> None:
    if isinstance(frame, UdpAssocRequest | UdpReleaseRequest | ResolveRequest):
        assert parse_request(emit_request(frame, SECRET)) == (SECRET, frame)
    else:
        assert parse_reply(emit_reply(frame)) == frame


def test_malformed_resolve_frames_raise_decode_error() -> None:
    good = emit_request(ResolveRequest("ab", 4), SECRET)
    bad_family = good[:40] + bytes([5]) + good[41:]
    not_utf8 = good[:43] + b"\xff\xfe"
    long_len = good[:42] + bytes([9]) + good[43:]
    for data in (bad_family, not_utf8, long_len):
        with pytest.raises(DecodeError):
            parse_request(data)
    found = emit_reply(ResolveReply(ResolveAction.FOUND, 0, (IPv4Address("10.0.0.1"),), "x"))
    zero = found[:12] + bytes([0]) + found[13:]
    with pytest.raises(DecodeError):
        parse_reply(zero)


# -- announced loopback ports: another local user's flood never reaches the accept queue --------


def test_only_announced_ports_get_past_the_kernel_filter(tmp_path: Path) -> None:
    async def body(server: ChannelServer, backend: Backend) -> None:
        stranger = bound()
        with pytest.raises(TimeoutError):  # the SYN is dropped: no SYN-ACK, nothing accepted
            await connect_data(server, stranger, timeout=1.5)
        stranger.close()
        for host in ("::1", "127.0.0.1"):
            ours = bound(host)
            port = lo_port(ours)
            rep = await tunnel(server, ours)
            r, w = await connect_data(server, ours, host)
            w.write(rep.token)
            assert await asyncio.wait_for(r.read(), 5) == b"attached"
            w.close()
        # Used: the port is let in no more (the filter is updated once per loop iteration).
        await asyncio.sleep(0.05)
        again = socket.socket()
        again.setblocking(False)
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # ours may be in TIME_WAIT
        again.bind(("127.0.0.1", port))
        with pytest.raises(TimeoutError):
            await connect_data(server, again, timeout=1.5)
        again.close()
        assert server.stats.unannounced == 0 and len(backend.attached) == 2

    run_with_server(body, tmp_path)


def test_one_filter_update_per_connect_and_used_ports_leave_with_the_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A CONNECT from an AF_INET socket updates the filter of the 127.0.0.1 listener alone
    (one kernel update per connect); a presented token's port is not taken out on the
    connect's path: it leaves with the next CONNECT's update, or FILTER_TIGHTEN_AFTER later
    (then from every listener that still lets it in)."""
    updates: list[tuple[socket.socket, bytes]] = []
    real = synfilter.attach

    def counted(sock: socket.socket, prog: bytes) -> None:
        updates.append((sock, prog))
        real(sock, prog)

    monkeypatch.setattr(synfilter, "attach", counted)

    async def body(server: ChannelServer, backend: Backend) -> None:
        v4 = server._tcp_listeners[0]
        others = server._tcp_listeners[1:]  # ::1, where the host has it
        assert [u[0] for u in updates] == server._tcp_listeners  # at start: nobody, everywhere
        assert {u[1] for u in updates} == {synfilter.program([])}
        updates.clear()
        a = bound()
        rep = await tunnel(server, a)
        assert updates == [(v4, synfilter.program([lo_port(a)]))]  # an AF_INET socket: 127.0.0.1
        r, w = await connect_data(server, a)
        w.write(rep.token)
        assert await asyncio.wait_for(r.read(), 5) == b"attached"
        w.close()
        assert len(updates) == 1  # the used port is still let in
        b = bound()
        await tunnel(server, b)  # its update takes a's port out
        assert updates[1:] == [(v4, synfilter.program([lo_port(b)]))]
        server._expire(next(iter(server._tokens)))  # b's token is never presented
        assert len(updates) == 2
        await asyncio.sleep(FILTER_TIGHTEN_AFTER + 0.05)
        assert updates[2:] == [(v4, synfilter.program([]))]  # the others had nothing to drop
        if others:  # an AF_INET6 socket's port is let in everywhere (::ffff:127.0.0.1 too)
            c = bound("::1")
            rep = await tunnel(server, c, Address(IPv6Address("fd15::1"), 80))
            want = synfilter.program([lo_port(c)])
            assert updates[3:] == [(v4, want), (others[0], want)]
            r, w = await connect_data(server, c, "::1")
            w.write(rep.token)
            assert await asyncio.wait_for(r.read(), 5) == b"attached"
            w.close()
            await asyncio.sleep(FILTER_TIGHTEN_AFTER + 0.05)
            none = synfilter.program([])
            assert updates[5:] == [(v4, none), (others[0], none)]
        await asyncio.sleep(FILTER_TIGHTEN_AFTER + 0.05)
        assert len(updates) == (7 if others else 3)

    run_with_server(body, tmp_path)


def test_a_token_in_pieces_is_still_taken(tmp_path: Path) -> None:
    async def body(server: ChannelServer, backend: Backend) -> None:
        ours = bound()
        rep = await tunnel(server, ours)
        r, w = await connect_data(server, ours)
        w.write(rep.token[:5])
        await w.drain()
        await asyncio.sleep(0.05)
        assert backend.attached == []
        w.write(rep.token[5:])
        assert await asyncio.wait_for(r.read(), 5) == b"attached"
        w.close()
        assert backend.attached == [rep.token] and server.stats.no_token == 0

    run_with_server(body, tmp_path)


def test_data_sockets_are_handed_on_non_blocking_with_nodelay(tmp_path: Path) -> None:
    """The relay takes them as they are (no setblocking, no TCP_NODELAY of its own): the
    listener's TCP_NODELAY is inherited, whether the token came at once or in pieces."""

    async def body(server: ChannelServer, backend: Backend) -> None:
        for pieces in ((16,), (5, 11)):
            ours = bound()
            rep = await tunnel(server, ours)
            r, w = await connect_data(server, ours)
            at = 0
            for n in pieces:
                w.write(rep.token[at : at + n])
                at += n
                await w.drain()
                await asyncio.sleep(0.05)
            assert await asyncio.wait_for(r.read(), 5) == b"attached"
            w.close()
        assert len(backend.handed) == 2
        for timeout, nodelay in backend.handed:
            assert timeout == 0.0 and nodelay != 0

    run_with_server(body, tmp_path)


def test_without_the_kernel_filter_unannounced_connections_are_reset_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(sock: socket.socket, prog: bytes) -> None:
        raise OSError(errno.ENOMEM, "optmem")

    monkeypatch.setattr(synfilter, "attach", refuse)

    async def body(server: ChannelServer, backend: Backend) -> None:
        stranger = bound()
        with pytest.raises(ConnectionResetError):  # accepted, then reset without a read
            r, w = await connect_data(server, stranger)
            try:
                await asyncio.wait_for(r.read(), 5)
            finally:
                w.close()
        stranger.close()
        ours = bound()
        rep = await tunnel(server, ours)
        r, w = await connect_data(server, ours)
        w.write(rep.token)
        assert await asyncio.wait_for(r.read(), 5) == b"attached"
        w.close()
        assert server.stats.unannounced == 1 and backend.attached == [rep.token]

    run_with_server(body, tmp_path)


def test_a_token_from_another_port_than_announced_is_refused(tmp_path: Path) -> None:
    async def body(server: ChannelServer, backend: Backend) -> None:
        a, b = bound(), bound()
        rep_a = await tunnel(server, a)
        await tunnel(server, b)
        r, w = await connect_data(server, b)
        w.write(rep_a.token)  # a's token from b's socket
        assert await asyncio.wait_for(r.read(), 5) == b""
        w.close()
        await asyncio.sleep(0.05)
        assert server.stats.bad_token == 1 and backend.attached == []
        assert backend.expired == [rep_a.token]  # its tunnel connection is abandoned

    run_with_server(body, tmp_path)


def test_an_unannounced_port_lets_any_port_in_while_its_token_is_out(tmp_path: Path) -> None:
    # The shim could not bind the socket (IP_BIND_ADDRESS_NO_PORT): CONNECT without lo_port.
    async def body(server: ChannelServer, backend: Backend) -> None:
        rep = await ask(server, ConnectRequest(Proto.TCP, DST))
        assert isinstance(rep, ConnectReply) and rep.action is Action.TUNNEL
        r, w = await connect_data(server, bound())
        w.write(rep.token)
        assert await asyncio.wait_for(r.read(), 5) == b"attached"
        w.close()
        await asyncio.sleep(0.05)
        with pytest.raises(TimeoutError):  # the token is used: strangers are out again
            await connect_data(server, bound(), timeout=1.5)

    run_with_server(body, tmp_path)


def test_filter_program() -> None:
    # ldh [0] (the TCP source port); per port: jeq #port, 0, 1 and ret #-1; then ret #0.
    assert synfilter.program([]) == bytes.fromhex("28000000 00000000 06000000 00000000")
    one = synfilter.program([0x1234])
    assert len(one) == 4 * 8
    assert one[8:16] == bytes([0x15, 0, 0, 1]) + (0x1234).to_bytes(4, sys.byteorder)
    assert one[16:24] == bytes([0x06, 0, 0, 0]) + b"\xff\xff\xff\xff"
    everything = bytes([0x06, 0, 0, 0]) + b"\xff\xff\xff\xff"
    assert synfilter.program(None) == everything
    assert synfilter.program(range(1, synfilter.MAX_PORTS + 2)) == everything


# -- where the private directory goes: never under a parent another user can write -----------


def test_an_unsafe_parent_is_skipped_or_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)  # world-writable, not sticky: anyone may rename our directory
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)  # as /tmp
    assert channel_mod._unsafe(str(open_dir)) == "writable by other users and not sticky"
    assert channel_mod._unsafe(str(sticky)) is None
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(open_dir))
    monkeypatch.setenv("TMPDIR", str(sticky))
    monkeypatch.setattr(channel_mod.tempfile, "tempdir", None)  # gettempdir() caches
    assert channel_mod._runtime_parent() == str(sticky)
    with pytest.raises(WrapguardError, match="writable by other users"):
        run_with_server(lambda server, backend: asyncio.sleep(0), open_dir)


@pytest.mark.root
def test_a_parent_owned_by_another_user_is_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    theirs = tmp_path / "run-user-65534"  # su without -: XDG_RUNTIME_DIR is still theirs
    theirs.mkdir()
    os.chown(theirs, 65534, 65534)
    theirs.chmod(0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(theirs))
    assert channel_mod._unsafe(str(theirs)) == "owned by uid 65534"
    seen: list[str] = []

    async def body(server: ChannelServer, backend: Backend) -> None:
        assert server.directory is not None
        seen.append(server.directory)

    backend = Backend()
    server = ChannelServer(backend, secret=SECRET, uid=os.getuid())

    async def main() -> None:
        await server.start()
        try:
            await body(server, backend)
        finally:
            server.close()

    asyncio.run(main())
    assert seen and not seen[0].startswith(str(theirs))
