"""The channel server: private socket, secret and uid checks, one-time tokens, replies."""

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

from wrapguard.runtime import channel as channel_mod
from wrapguard.runtime.channel import ChannelServer, Decision
from wrapguard.wire.ipc import (
    Action,
    Address,
    ConnectReply,
    ConnectRequest,
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
    StatusAction,
    StatusReply,
    StatusRequest,
    UnlistenReply,
    UnlistenRequest,
    emit_request,
    parse_reply,
)

SECRET = bytes(range(1, 33))
DST = Address(IPv4Address("10.150.0.1"), 80)
SRC = Address(IPv4Address("10.150.0.2"), 40000)


@dataclass
class Backend:
    status_futures: dict[bytes, asyncio.Future[int]] = field(default_factory=dict)
    attached: list[bytes] = field(default_factory=list)
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

    def open_tcp(self, dst: Address, token: bytes) -> Address | None:
        if dst.ip == IPv4Address("10.150.0.97"):
            raise OSError(errno.EHOSTUNREACH, "no")
        self.status_futures[token] = asyncio.get_running_loop().create_future()
        return SRC

    def tcp_attached(self, token: bytes, reader: Any, writer: Any) -> None:
        self.attached.append(token)
        writer.write(b"attached")
        writer.close()

    def token_expired(self, token: bytes) -> None:
        self.expired.append(token)

    def status(self, token: bytes) -> asyncio.Future[int] | None:
        return self.status_futures.get(token)

    def listen(self, proto: Proto, addr: Address) -> None:
        if addr.port == 1:
            raise OSError(errno.EACCES, "no")
        self.calls.append(("listen", addr))

    def unlisten(self, proto: Proto, addr: Address) -> None:
        self.calls.append(("unlisten", addr))

    def peer_of(self, loopback: Address) -> Address | None:
        return SRC if loopback.port == 5555 else None


async def raw(path: str, data: bytes) -> bytes:
    reader, writer = await asyncio.open_unix_connection(path)
    writer.write(data)
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(), 10)
    except ConnectionResetError:  # dropped before our request was read: no answer either
        return b""
    finally:
        writer.close()


async def ask(server: ChannelServer, req: Request, secret: bytes = SECRET) -> Reply:
    assert server.ctl_path is not None
    return parse_reply(await raw(server.ctl_path, emit_request(req, secret)))


def run_with_server(
    body: Callable[[ChannelServer, Backend], Awaitable[None]],
    tmp_path: Path,
    **kwargs: Any,
) -> ChannelServer:
    backend = Backend()
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
    assert SECRET.hex() not in repr(ChannelServer(Backend(), secret=SECRET, uid=0))


def test_directory_is_removed_on_every_exit_path(tmp_path: Path) -> None:
    script = f"""
        import asyncio, os, sys
        from wrapguard.runtime.channel import ChannelServer
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
        rep = await ask(server, ConnectRequest(Proto.TCP, DST))
        assert isinstance(rep, ConnectReply) and rep.action is Action.TUNNEL
        assert rep.loopback == Address(IPv4Address("127.0.0.1"), server.data_port)
        assert rep.source == SRC and len(rep.token) == 16
        rep6 = await ask(server, ConnectRequest(Proto.TCP, Address(IPv6Address("fd15::1"), 80)))
        assert isinstance(rep6, ConnectReply) and rep6.loopback is not None
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

        for host in ("127.0.0.1", "::1"):
            r, w = await asyncio.open_connection(host, server.data_port)
            w.write(rep.token if host == "127.0.0.1" else rep6.token)
            assert await asyncio.wait_for(r.read(), 5) == b"attached"
            w.close()
        assert backend.attached == [rep.token, rep6.token]
        r, w = await asyncio.open_connection("127.0.0.1", server.data_port)
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
        r, w = await asyncio.open_connection("127.0.0.1", server.data_port)
        w.write(b"GET / HTTP/1.0\r\n")  # 16 bytes, not a token
        assert await asyncio.wait_for(r.read(), 5) == b""
        w.close()
        r, w = await asyncio.open_connection("127.0.0.1", server.data_port)
        assert await asyncio.wait_for(r.read(), 5) == b""  # silent: closed after the deadline
        w.close()
        await asyncio.sleep(0.05)
        assert server.stats.bad_token == 1 and server.stats.no_token == 1
        assert backend.attached == []

    run_with_server(body, tmp_path)


def test_tokens_never_used_expire_and_are_counted(tmp_path: Path) -> None:
    async def body(server: ChannelServer, backend: Backend) -> None:
        rep = await ask(server, ConnectRequest(Proto.TCP, DST))
        assert isinstance(rep, ConnectReply)
        await asyncio.sleep(0.4)
        assert server.stats.unused_token == 1 and backend.expired == [rep.token]
        r, w = await asyncio.open_connection("127.0.0.1", server.data_port)
        w.write(rep.token)
        assert await asyncio.wait_for(r.read(), 5) == b""
        w.close()

    run_with_server(body, tmp_path, token_ttl=0.2)


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
