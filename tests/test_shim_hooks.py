"""Real programs under the shim talk through the real channel server to a fake backend.

The fake backend "tunnels" 10.150.0.0/24 and fd15::/64 by opening a loopback TCP connection to a
test server on 127.0.0.1 (same port), fails 10.150.0.99 with ECONNREFUSED and 10.150.0.98 with
ETIMEDOUT after a short delay, and answers DIRECT otherwise. Every destination used here is
either tunnelled/failed by the fake backend or local: nothing leaves the machine.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
from collections.abc import Coroutine, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address, ip_address, ip_network
from pathlib import Path
from subprocess import DEVNULL, PIPE
from typing import Any, TypeVar

import pytest

from wrapguard import shim
from wrapguard.doors.preload.channel import ChannelServer, Decision
from wrapguard.wire.ipc import Action, Address, Proto

T = TypeVar("T")
TUNNELLED = [ip_network("10.150.0.0/24"), ip_network("fd15::/64")]
REFUSED = ip_address("10.150.0.99")
SLOW_FAIL = ip_address("10.150.0.98")
PAGE = b"hello from behind the tunnel\n"
SOURCE4 = Address(IPv4Address("10.150.0.2"), 41000)
SOURCE6 = Address(IPv6Address("fd15::2"), 41000)


@dataclass
class FakeBackend:
    loop: asyncio.AbstractEventLoop
    routes: list[Address] = field(default_factory=list)
    hellos: list[int] = field(default_factory=list)
    listens: list[Address] = field(default_factory=list)
    unlistens: list[Address] = field(default_factory=list)
    peers: dict[Address, Address] = field(default_factory=dict)
    futures: dict[bytes, asyncio.Future[int]] = field(default_factory=dict)
    upstreams: dict[bytes, asyncio.Future[tuple[Any, Any] | None]] = field(default_factory=dict)
    gates: dict[bytes, asyncio.Future[int]] = field(default_factory=dict)
    expired: list[bytes] = field(default_factory=list)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def hello(self, pid: int, version: str) -> None:
        self.hellos.append(pid)

    def route(self, proto: Proto, dst: Address) -> Decision:
        self.routes.append(dst)
        if dst.ip == REFUSED:
            return Decision(Action.FAIL, errno.ECONNREFUSED)
        if any(dst.ip in net for net in TUNNELLED):
            return Decision(Action.TUNNEL)
        return Decision(Action.DIRECT)

    def open_tcp(
        self, dst: Address, token: bytes, gate: bool = False, src_port: int = 0
    ) -> Address | None:
        if gate:
            self.gates[token] = self.loop.create_future()
        status: asyncio.Future[int] = self.loop.create_future()
        upstream: asyncio.Future[tuple[Any, Any] | None] = self.loop.create_future()
        self.futures[token], self.upstreams[token] = status, upstream
        if dst.ip == SLOW_FAIL:
            self.loop.call_later(0.3, status.set_result, errno.ETIMEDOUT)
            self.loop.call_later(0.3, upstream.set_result, None)
        else:
            self._spawn(self._open(dst.port, status, upstream))
        return SOURCE4 if dst.family == 4 else SOURCE6

    async def _open(
        self, port: int, status: asyncio.Future[int], upstream: asyncio.Future[Any]
    ) -> None:
        try:
            streams = await asyncio.open_connection("127.0.0.1", port)
        except OSError as exc:
            status.set_result(exc.errno or errno.ECONNREFUSED)
            upstream.set_result(None)
            return
        status.set_result(0)
        upstream.set_result(streams)

    def tcp_attached(self, token: bytes, sock: socket.socket) -> None:
        self._spawn(self._relay(self.upstreams[token], self.gates.get(token), sock))

    def gate(self, token: bytes, filler: int) -> None:
        gate = self.gates.get(token)
        if gate is not None and not gate.done():
            gate.set_result(filler)

    async def _relay(
        self,
        upstream: asyncio.Future[Any],
        gate: asyncio.Future[int] | None,
        sock: socket.socket,
    ) -> None:
        # As the launcher does: read nothing past the token until the outcome is known.
        streams = await upstream
        if streams is None:  # failed: reset the program's loopback side (docs/channel.md)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
            sock.close()
            return
        if gate is not None:
            left = await gate
            while left:
                chunk = await self.loop.sock_recv(sock, min(left, 65536))
                if not chunk:
                    sock.close()
                    return
                left -= len(chunk)
        reader, writer = await asyncio.open_connection(sock=sock)
        ureader, uwriter = streams
        await asyncio.gather(pump(reader, uwriter), pump(ureader, writer))

    def token_expired(self, token: bytes) -> None:
        self.expired.append(token)

    def status(self, token: bytes) -> asyncio.Future[int] | None:
        return self.futures.get(token)

    def listen(self, proto: Proto, addr: Address, v6only: bool = False) -> None:
        self.listens.append(addr)

    def unlisten(self, proto: Proto, addr: Address) -> None:
        self.unlistens.append(addr)

    def peer_of(self, loopback: Address) -> Address | None:
        return self.peers.get(loopback)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = self.loop.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except OSError:
        writer.close()


async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """HTTP/1.0 for GET, otherwise an echo server."""
    try:
        line = await reader.readline()
        if line.startswith(b"GET "):
            while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                pass
            head = f"HTTP/1.0 200 OK\r\nContent-Length: {len(PAGE)}\r\n\r\n".encode()
            writer.write(head + PAGE)
        else:
            writer.write(line)
            while data := await reader.read(65536):
                writer.write(data)
        await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()


@dataclass
class World:
    loop: asyncio.AbstractEventLoop
    backend: FakeBackend
    server: ChannelServer
    port: int
    isolated: bool

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 15) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env["LD_PRELOAD"] = shim.preload_value(env.get("LD_PRELOAD"), shim.shim_path())
        env.update(self.server.env())
        env.update(extra)
        return env

    def run(
        self, argv: list[str], timeout: float = 20, **extra: str
    ) -> subprocess.CompletedProcess[bytes]:
        """Run a program from the loop thread, so that it inherits the loop's namespace."""

        async def go() -> subprocess.CompletedProcess[bytes]:
            proc = await asyncio.create_subprocess_exec(
                *argv, env=self.env(**extra), stdout=PIPE, stderr=PIPE, stdin=DEVNULL
            )
            try:
                out, err = await asyncio.wait_for(proc.communicate(), timeout)
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
            assert proc.returncode is not None
            return subprocess.CompletedProcess(argv, proc.returncode, out, err)

        return self.call(go(), timeout + 5)

    def python(self, code: str, timeout: float = 20, **extra: str) -> Any:
        argv = [sys.executable, "-c", textwrap.dedent(code), str(self.port)]
        proc = self.run(argv, timeout, **extra)
        assert proc.returncode == 0, proc.stderr.decode()
        return json.loads(proc.stdout)


CLONE_NEWNET = 0x40000000


def loop_thread(loop: asyncio.AbstractEventLoop, started: Future[bool]) -> None:
    """Run the loop; as root first move this thread into a fresh network namespace (with
    only loopback), so that whatever the shim got wrong cannot leave the machine."""
    isolated = False
    if os.geteuid() == 0:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.unshare(CLONE_NEWNET) != 0:
            started.set_exception(OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET)"))
            return
        isolated = True
    asyncio.set_event_loop(loop)
    started.set_result(isolated)
    loop.run_forever()


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    loop = asyncio.new_event_loop()
    started: Future[bool] = Future()
    thread = threading.Thread(target=loop_thread, args=(loop, started), daemon=True)
    thread.start()
    isolated = started.result(10)
    backend = FakeBackend(loop)

    async def setup() -> tuple[ChannelServer, asyncio.Server]:
        if isolated:
            ip = await asyncio.create_subprocess_exec("ip", "link", "set", "lo", "up")
            assert await ip.wait() == 0
        srv = await asyncio.start_server(serve, "127.0.0.1", 0)
        channel = ChannelServer(
            backend,
            secret=os.urandom(32),
            uid=os.getuid(),
            connect_timeout=5,
            tunnel_addrs=[IPv4Address("10.150.0.2"), IPv6Address("fd15::2")],
        )
        await channel.start()
        return channel, srv

    channel, srv = asyncio.run_coroutine_threadsafe(setup(), loop).result(10)
    try:
        yield World(loop, backend, channel, srv.sockets[0].getsockname()[1], isolated)
    finally:
        loop.call_soon_threadsafe(channel.close)
        loop.call_soon_threadsafe(srv.close)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)


CONNECT_ECHO = """
    import json, socket, sys
    port = int(sys.argv[1])
    s = socket.socket(FAMILY)
    s.connect((HOST, port))
    s.sendall(b"ping\\n")
    data = s.recv(100)
    print(json.dumps({"echo": data.decode(), "peer": s.getpeername()[:2],
                      "local": s.getsockname()[:2]}))
"""


@pytest.mark.root
def test_children_run_in_a_private_network_namespace_as_root(world: World) -> None:
    assert world.isolated
    out = world.run(["readlink", "/proc/self/ns/net"])
    assert out.returncode == 0 and out.stdout.strip() != os.readlink("/proc/self/ns/net").encode()


def test_curl_fetches_a_page_through_the_tunnel_path(world: World) -> None:
    before = len(world.backend.routes)
    out = world.run(["curl", "-sS", "--max-time", "10", f"http://10.150.0.1:{world.port}/"])
    assert out.returncode == 0, out.stderr
    assert out.stdout == PAGE
    assert world.backend.routes[before:] == [Address(IPv4Address("10.150.0.1"), world.port)]
    assert world.backend.hellos, "the shim says HELLO when it starts"


def test_python_blocking_connect_and_getpeername(world: World) -> None:
    code = CONNECT_ECHO.replace("FAMILY", "socket.AF_INET").replace("HOST", "'10.150.0.1'")
    out = world.python(code)
    assert out["echo"] == "ping\n"
    assert out["peer"] == ["10.150.0.1", world.port]
    assert out["local"] == ["10.150.0.2", SOURCE4.port]


def test_ipv6_destination(world: World) -> None:
    code = CONNECT_ECHO.replace("FAMILY", "socket.AF_INET6").replace("HOST", "'fd15::1'")
    out = world.python(code)
    assert out["echo"] == "ping\n"
    assert out["peer"] == ["fd15::1", world.port]
    assert out["local"] == ["fd15::2", SOURCE6.port]
    curl = world.run(["curl", "-sS", "--max-time", "10", f"http://[fd15::1]:{world.port}/"])
    assert curl.returncode == 0 and curl.stdout == PAGE, curl.stderr


def test_asyncio_client_non_blocking(world: World) -> None:
    out = world.python(
        """
        import asyncio, json, sys
        async def main():
            r, w = await asyncio.open_connection("10.150.0.1", int(sys.argv[1]))
            w.write(b"async\\n")
            line = await r.readline()
            peer = w.get_extra_info("peername")[:2]
            w.close()
            try:
                await asyncio.open_connection("10.150.0.98", int(sys.argv[1]))
                err = 0
            except OSError as exc:
                err = exc.errno
            return {"line": line.decode(), "peer": peer, "slow_fail": err}
        print(json.dumps(asyncio.run(main())))
        """
    )
    assert out == {
        "line": "async\n",
        "peer": ["10.150.0.1", world.port],
        "slow_fail": errno.ETIMEDOUT,
    }


def test_node_net_connect(world: World) -> None:
    node = shutil.which("node")
    assert node is not None, "node is part of the test environment"
    script = """
        const net = require("net");
        const s = net.connect(Number(process.argv.at(-1)), "10.150.0.1", () => s.write("node\\n"));
        s.on("data", (d) => {
            console.log(JSON.stringify({data: d.toString(), peer: s.remoteAddress}));
            s.destroy();
        });
        s.on("error", (e) => { console.log(JSON.stringify({error: e.code})); });
    """
    out = world.run([node, "-e", textwrap.dedent(script), "--", str(world.port)])
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"data": "node\n", "peer": "10.150.0.1"}


def test_refused_fails_fast_blocking_and_non_blocking(world: World) -> None:
    out = world.python(
        """
        import json, socket, sys, time
        port = int(sys.argv[1])
        start = time.monotonic()
        s = socket.socket()
        blocking = s.connect_ex(("10.150.0.99", port))
        t = socket.socket()
        t.setblocking(False)
        nonblocking = t.connect_ex(("10.150.0.99", port))
        print(json.dumps([blocking, nonblocking, time.monotonic() - start]))
        """
    )
    assert out[:2] == [errno.ECONNREFUSED, errno.ECONNREFUSED]
    assert out[2] < 0.5  # one channel round trip each, no waiting
    curl = world.run(["curl", "-sS", "--max-time", "10", f"http://10.150.0.99:{world.port}/"])
    assert curl.returncode == 7, curl.stderr  # CURLE_COULDNT_CONNECT


def test_timed_out_blocking_and_via_so_error(world: World) -> None:
    out = world.python(
        """
        import json, socket, sys, select
        port = int(sys.argv[1])
        s = socket.socket()
        blocking = s.connect_ex(("10.150.0.98", port))
        t = socket.socket()
        t.setblocking(False)
        first = t.connect_ex(("10.150.0.98", port))
        select.select([], [t], [], 5)
        so_error = t.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        try:
            t.getpeername()
            peer = 0
        except OSError as exc:
            peer = exc.errno
        print(json.dumps([blocking, first, so_error, peer]))
        """
    )
    assert out == [errno.ETIMEDOUT, errno.EINPROGRESS, errno.ETIMEDOUT, errno.ENOTCONN]


def test_connect_again_reports_ealready_then_eisconn(world: World) -> None:
    out = world.python(
        """
        import errno, json, socket, sys, time
        port = int(sys.argv[1])
        slow = socket.socket()
        slow.setblocking(False)
        first = slow.connect_ex(("10.150.0.98", port))
        again = slow.connect_ex(("10.150.0.98", port))
        ok = socket.socket()
        ok.setblocking(False)
        ok.connect_ex(("10.150.0.1", port))
        deadline = time.monotonic() + 5
        while (r := ok.connect_ex(("10.150.0.1", port))) == errno.EALREADY:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        print(json.dumps([first, again, r]))
        """
    )
    assert out == [errno.EINPROGRESS, errno.EALREADY, errno.EISCONN]


def test_loopback_never_asks_the_launcher(world: World) -> None:
    routes, requests = len(world.backend.routes), world.server.stats.requests
    out = world.python(
        CONNECT_ECHO.replace("FAMILY", "socket.AF_INET").replace("HOST", "'127.0.0.1'")
    )
    assert out["echo"] == "ping\n" and out["peer"] == ["127.0.0.1", world.port]
    assert len(world.backend.routes) == routes
    assert world.server.stats.requests == requests + 1  # the HELLO only


def test_direct_decision_makes_the_real_call(world: World) -> None:
    # 0.0.0.0 is not loopback for the shim, the fake backend says DIRECT, and the kernel
    # connects a 0.0.0.0 destination to this host: a real DIRECT connect that stays local.
    routes = len(world.backend.routes)
    out = world.python(
        CONNECT_ECHO.replace("FAMILY", "socket.AF_INET").replace("HOST", "'0.0.0.0'")
    )
    assert out["echo"] == "ping\n" and out["peer"] == ["127.0.0.1", world.port]
    assert world.backend.routes[routes:] == [Address(IPv4Address("0.0.0.0"), world.port)]


def test_dup_carries_the_virtual_peer(world: World) -> None:
    out = world.python(
        """
        import json, os, socket, sys
        s = socket.create_connection(("10.150.0.1", int(sys.argv[1])))
        d = s.dup()
        fd = os.dup2(s.fileno(), 100)
        e = socket.socket(fileno=fd)
        s.close()
        print(json.dumps([d.getpeername(), e.getpeername()]))
        """
    )
    assert out == [["10.150.0.1", world.port]] * 2


def listen_script(bind_host: str) -> str:
    return f"""
        import json, socket, sys
        srv = socket.socket(socket.AF_INET6 if ":" in "{bind_host}" else socket.AF_INET)
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("{bind_host}", 0))
        srv.listen(5)
        print(srv.getsockname()[1], flush=True)
        c, addr = srv.accept()
        out = {{"accepted": addr[:2], "peer": c.getpeername()[:2],
                "bound": srv.getsockname()[0]}}
        c.close()
        srv.close()
        print(json.dumps(out), flush=True)
    """


@pytest.mark.parametrize("bind_host", ["0.0.0.0", "10.150.0.2", "::", "fd15::2"])
def test_listen_is_announced_and_accept_reports_the_tunnel_peer(
    world: World, bind_host: str
) -> None:
    before = len(world.backend.listens)
    v6 = ":" in bind_host
    mapped = Address(IPv4Address("10.150.0.7"), 40007)  # a v4 client, also for a v6 listener

    async def go() -> tuple[int, dict[str, Any]]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            textwrap.dedent(listen_script(bind_host)),
            env=world.env(),
            stdout=PIPE,
            stderr=PIPE,
        )
        try:
            assert proc.stdout is not None and proc.stderr is not None
            port = int(await asyncio.wait_for(proc.stdout.readline(), 10))
            # The launcher's side: a loopback connection whose source it maps to a tunnel peer.
            lo = "::1" if v6 else "127.0.0.1"
            client = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET)
            client.setblocking(False)
            client.bind((lo, 0))
            here = client.getsockname()
            world.backend.peers[Address(ip_address(here[0]), here[1])] = mapped
            await asyncio.get_running_loop().sock_connect(client, (lo, port))
            out = json.loads(await asyncio.wait_for(proc.stdout.readline(), 10))
            client.close()
            rc = await asyncio.wait_for(proc.wait(), 10)
            assert rc == 0, await proc.stderr.read()
            return port, out
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()

    port, out = world.call(go(), 30)
    announced = [Address(ip_address(bind_host), port)]
    assert world.backend.listens[before:] == announced
    client = ["::ffff:10.150.0.7" if v6 else "10.150.0.7", 40007]
    assert out["accepted"] == client
    assert out["peer"] == client
    assert out["bound"] == bind_host
    assert world.backend.unlistens[-1:] == announced  # close() said UNLISTEN before exiting


def test_getpeername_truncates_like_the_kernel_and_errno_is_preserved(world: World) -> None:
    out = world.python(
        """
        import ctypes, json, socket, sys
        libc = ctypes.CDLL(None, use_errno=True)
        s = socket.socket()
        ctypes.set_errno(77)
        port = int(sys.argv[1]).to_bytes(2, "big")
        sin = bytes([2, 0]) + port + bytes([10, 150, 0, 1]) + bytes(8)
        rc = libc.connect(s.fileno(), sin, len(sin))
        after_connect = ctypes.get_errno()
        buf = ctypes.create_string_buffer(16)
        n = ctypes.c_uint32(6)
        ctypes.set_errno(78)
        rc2 = libc.getpeername(s.fileno(), buf, ctypes.byref(n))
        print(json.dumps([rc, after_connect, rc2, ctypes.get_errno(), n.value, buf.raw[:8].hex()]))
        """
    )
    port = world.port.to_bytes(2, "big").hex()
    assert out == [0, 77, 0, 78, 16, "0200" + port + "0a96" + "0000"]


@pytest.mark.root
def test_inert_without_ctl_and_udp_fails_closed_without_a_relay(world: World) -> None:
    # Only in the private namespace (no routes): a real connect to 10.150.0.1 fails there.
    assert world.isolated
    code = """
        import json, socket, sys
        port = int(sys.argv[1])
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp = u.connect_ex(("10.150.0.1", port))
        t = socket.socket()
        tcp = t.connect_ex(("10.150.0.1", port)) if len(sys.argv) > 2 else None
        print(json.dumps([udp, tcp]))
    """
    # This world's launcher has no UDP relay (no WRAPGUARD_UDP): a tunnelled UDP destination
    # fails closed after asking the route.
    before = len(world.backend.routes)
    assert world.python(code) == [errno.ENETUNREACH, None]
    assert world.backend.routes[before:] == [Address(IPv4Address("10.150.0.1"), world.port)]
    routes = len(world.backend.routes)
    argv = [sys.executable, "-c", textwrap.dedent(code), str(world.port), "tcp"]
    proc = world.run(argv, WRAPGUARD_CTL="")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == [errno.ENETUNREACH, errno.ENETUNREACH]
    assert len(world.backend.routes) == routes


def test_forked_child_is_still_wrapped(world: World) -> None:
    out = world.python(
        """
        import json, os, socket, sys
        port = int(sys.argv[1])
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            s = socket.create_connection(("10.150.0.1", port))
            s.sendall(b"child\\n")
            os.write(w, json.dumps([s.recv(100).decode(), s.getpeername()]).encode())
            os._exit(0)
        os.close(w)
        data = os.read(r, 1000)
        os.waitpid(pid, 0)
        print(data.decode())
        """
    )
    assert out == ["child\n", ["10.150.0.1", world.port]]


def test_twenty_threads_connect_at_once(world: World) -> None:
    out = world.python(
        """
        import json, socket, sys, threading
        port = int(sys.argv[1])
        results, barrier = [], threading.Barrier(20)
        def one(i):
            barrier.wait()
            s = socket.create_connection(("10.150.0.1", port), timeout=10)
            s.sendall(b"t%d\\n" % i)
            results.append((s.recv(100) == b"t%d\\n" % i, s.getpeername()[0]))
            s.close()
        ts = [threading.Thread(target=one, args=(i,)) for i in range(20)]
        [t.start() for t in ts]
        [t.join() for t in ts]
        print(json.dumps(results))
        """
    )
    assert out == [[True, "10.150.0.1"]] * 20


def test_one_control_connection_per_process_and_a_forked_child_opens_its_own(
    world: World,
) -> None:
    """Every request of a process goes over one control connection (docs/channel.md,
    "Framing"); a forked child never writes to the parent's (they run at the same time). A
    blocking connect is one request."""
    before, requests = world.server.stats.connections, world.server.stats.requests
    out = world.python(
        """
        import json, os, socket, sys
        port = int(sys.argv[1])
        def once(tag):
            s = socket.create_connection(("10.150.0.1", port))
            s.sendall(tag + b"\\n")
            ok = s.recv(100) == tag + b"\\n"
            s.close()
            return ok
        res = [once(b"p%d" % i) for i in range(5)]
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.write(w, json.dumps([once(b"c%d" % i) for i in range(20)]).encode())
            os._exit(0)
        os.close(w)
        res += [once(b"q%d" % i) for i in range(20)]
        child = json.loads(os.read(r, 10000))
        os.waitpid(pid, 0)
        print(json.dumps([res, child]))
        """
    )
    assert out == [[True] * 25, [True] * 20]
    assert world.server.stats.connections - before == 2
    # HELLO, then one CONNECT per blocking connect: its outcome follows on the connection
    # (CONNECT with WAIT), no STATUS request
    assert world.server.stats.requests - requests == 1 + 45


def test_a_program_that_takes_over_the_control_fd_number_gets_nothing(world: World) -> None:
    """The shim's control connection is an fd of the program's process: a program that
    closes it or dup2()s something over it (closefrom, `exec 9>file`) must never receive a
    request (the secret) in its file; the next request opens a new connection."""
    out = world.python(
        """
        import json, os, socket, sys
        port = int(sys.argv[1])
        def once():
            s = socket.create_connection(("10.150.0.1", port))
            s.sendall(b"x\\n")
            ok = s.recv(10) == b"x\\n"
            s.close()
            return ok
        first = once()
        def link(n):
            try:
                return os.readlink(f"/proc/self/fd/{n}")
            except OSError:
                return ""
        ours = [int(n) for n in os.listdir("/proc/self/fd")
                if int(n) > 2 and link(n).startswith("socket:")]
        r, w = os.pipe()
        for n in ours:
            os.dup2(w, n)
        second = once()
        os.set_blocking(r, False)
        try:
            leaked = len(os.read(r, 4096))
        except BlockingIOError:
            leaked = 0
        os.closerange(3, max(ours + [3]) + 1)
        third = once()
        print(json.dumps([first, len(ours), second, leaked, third]))
        """
    )
    assert out == [True, 1, True, 0, True]


def test_unreachable_channel_fails_closed(world: World, tmp_path: Any) -> None:
    code = """
        import json, socket, sys
        s = socket.socket()
        print(json.dumps(s.connect_ex(("10.150.0.1", int(sys.argv[1])))))
    """
    assert world.python(code, WRAPGUARD_CTL=str(tmp_path / "gone.sock")) == errno.ENETUNREACH
    bad = world.server.stats.bad_secret
    assert world.python(code, WRAPGUARD_SECRET="00" * 32) == errno.ENETUNREACH
    assert world.server.stats.bad_secret >= bad + 2  # the HELLO and the CONNECT


def test_udp_and_names_fail_closed_when_the_channel_is_unreachable(
    world: World, tmp_path: Any
) -> None:
    code = """
        import json, socket, sys
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            s.sendto(b"x", ("10.150.0.1", int(sys.argv[1])))
            udp = "sent"
        except OSError as e:
            udp = e.errno
        try:
            gai = socket.getaddrinfo("web.wg.test", 80)[0][4][0]
        except socket.gaierror as e:
            gai = e.errno
        loop = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        loop.bind(("127.0.0.1", 0))
        s.sendto(b"lo", loop.getsockname())  # loopback never asks the launcher
        print(json.dumps([udp, gai, loop.recv(10).decode()]))
    """
    gone = {"WRAPGUARD_CTL": str(tmp_path / "gone.sock"), "WRAPGUARD_DNS": "1"}
    assert world.python(code, **gone) == [errno.ENETUNREACH, socket.EAI_AGAIN, "lo"]


# -- syscall(): libuv (dig, host, nslookup) makes socket calls through it -----------------------
# Linux syscall numbers for the calls used below (asm/unistd_64.h; asm-generic for aarch64).
SYS_NUMBERS = {
    "x86_64": {"close": 3, "mmap": 9, "getpid": 39, "connect": 42, "getpeername": 52},
    "aarch64": {"close": 57, "mmap": 222, "getpid": 172, "connect": 203, "getpeername": 205},
}
SYSCALL_PROBE = """
    import ctypes, errno, json, mmap, os, socket, sys, tempfile
    port, connect_too, NR = int(sys.argv[1]), sys.argv[2] == "1", json.loads(sys.argv[3])
    libc = ctypes.CDLL(None, use_errno=True)  # the shim is preloaded: its syscall() comes first
    call = libc.syscall
    call.restype = ctypes.c_long
    L = ctypes.c_long
    res = {}
    def peer(fd):
        buf, n = ctypes.create_string_buffer(128), ctypes.c_uint32(128)
        if call(L(NR["getpeername"]), L(fd), buf, ctypes.byref(n)) != 0:
            return ["error", ctypes.get_errno()]
        return [socket.inet_ntoa(buf.raw[4:8]), int.from_bytes(buf.raw[2:4], "big")]
    s = socket.create_connection(("10.150.0.1", port), timeout=10)  # libc's connect: tunnelled
    res["getpeername"] = peer(s.fileno())
    if connect_too:  # only in the private namespace: without the hook this goes out directly
        t = socket.socket()
        sa = (socket.AF_INET).to_bytes(2, "little") + port.to_bytes(2, "big")
        sa += socket.inet_aton("10.150.0.1") + bytes(8)
        rc = call(L(NR["connect"]), L(t.fileno()), ctypes.c_char_p(sa), L(16))
        res["connect"] = [rc, peer(t.fileno())]
        if rc == 0:
            t.sendall(b"raw\\n")
            res["echo"] = t.recv(100).decode()
    # Everything else: the real syscall(), all six words and errno unchanged.
    res["getpid"] = call(L(NR["getpid"])) == os.getpid()
    ctypes.set_errno(0)
    res["close"] = [call(L(NR["close"]), L(-1)), errno.errorcode.get(ctypes.get_errno())]
    with tempfile.TemporaryFile() as f:
        f.write(b"a" * mmap.PAGESIZE + b"b" * mmap.PAGESIZE)
        f.flush()
        page = call(L(NR["mmap"]), L(0), L(mmap.PAGESIZE), L(mmap.PROT_READ),
                    L(mmap.MAP_PRIVATE), L(f.fileno()), L(mmap.PAGESIZE))  # the 6th: offset
        res["mmap"] = ctypes.string_at(page, 1).decode()
    print(json.dumps(res))
"""


def test_syscall_reaches_the_hooks_and_passes_everything_else(world: World) -> None:
    import platform

    numbers = SYS_NUMBERS.get(platform.machine())
    assert numbers is not None, f"add this machine's syscall numbers: {platform.machine()}"
    code = textwrap.dedent(SYSCALL_PROBE)
    connect_too = "1" if world.isolated else "0"
    argv = [sys.executable, "-c", code, str(world.port), connect_too, json.dumps(numbers)]
    proc = world.run(argv)
    assert proc.returncode == 0, proc.stderr.decode()
    out = json.loads(proc.stdout)
    assert out["getpeername"] == ["10.150.0.1", world.port], out  # not the loopback data port
    if world.isolated:
        assert out["connect"] == [0, ["10.150.0.1", world.port]], out
        assert out["echo"] == "raw\n", out
    assert out["getpid"] is True and out["close"] == [-1, "EBADF"], out
    assert out["mmap"] == "b", out


# -- exec of what the shim cannot load into (csrc/exec.c) ------------------------------------
# Each case runs in a forked child of a wrapped Python: [how, target, args, as_nobody, nnp].
# The outcome: "ran:<status>" (the exec happened) or the errno name of the refusal.
EXEC_PROBE = r"""
import ctypes, errno, json, os, subprocess, sys
libc = ctypes.CDLL(None, use_errno=True)

def argv_of(target, args):
    words = [target, *args]
    return (ctypes.c_char_p * (len(words) + 1))(*[w.encode() for w in words], None)

def run(how, target, args, as_nobody, nnp):
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # what the programs print is not ours
    if target.startswith("nosuid:"):  # a copy on a nosuid tmpfs, in a mount namespace of our own
        src = target[7:]
        mnt = os.path.join(os.path.dirname(src), "mnt")
        os.makedirs(mnt, exist_ok=True)
        assert libc.unshare(0x20000) == 0  # CLONE_NEWNS
        assert libc.mount(b"none", b"/", None, 0x4000 | 0x40000, None) == 0  # MS_REC|MS_PRIVATE
        assert libc.mount(b"tmpfs", mnt.encode(), b"tmpfs", 2, b"mode=755") == 0  # MS_NOSUID
        target = os.path.join(mnt, os.path.basename(src))
        st = os.stat(src)
        with open(src, "rb") as f, open(target, "wb") as g:
            g.write(f.read())
        os.chown(target, st.st_uid, st.st_gid)
        os.chmod(target, st.st_mode & 0o7777)
    if as_nobody:
        os.setgroups([]); os.setresgid(65534, 65534, 65534); os.setresuid(65534, 65534, 65534)
    if nnp:
        libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS
    words = [target, *args]
    if how == "execv":
        os.execv(target, words)
    if how == "fexecve":
        os.execve(os.open(target, os.O_RDONLY), words, dict(os.environ))
    if how == "subprocess":  # _posixsubprocess: vfork + execve where it can
        return "ran:%d" % subprocess.run(words).returncode
    if how in ("posix_spawn", "posix_spawnp"):
        spawn = os.posix_spawn if how == "posix_spawn" else os.posix_spawnp
        pid = spawn(target, words, os.environ)
        return "ran:%d" % os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    if how == "execveat":  # relative to a directory descriptor
        dirfd = os.open(os.path.dirname(target), os.O_RDONLY | os.O_DIRECTORY)
        env = ["%s=%s" % kv for kv in os.environ.items()]
        envp = (ctypes.c_char_p * (len(env) + 1))(*[e.encode() for e in env], None)
        name = os.path.basename(target).encode()
        libc.execveat(dirfd, name, argv_of(target, args), envp, 0)
        raise OSError(ctypes.get_errno(), how)
    if how in ("execvp", "execl", "execlp"):
        fn = getattr(libc, how)
        if how == "execvp":
            fn(target.encode(), argv_of(target, args))
        else:
            fn(target.encode(), *[w.encode() for w in words], None)
        raise OSError(ctypes.get_errno(), how)
    raise AssertionError(how)

out = {}
for name, case in json.loads(sys.argv[1]).items():
    r, w = os.pipe()  # close-on-exec: empty when the exec happened
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            res = run(*case)
        except OSError as e:
            res = errno.errorcode.get(e.errno, str(e.errno))
        os.write(w, res.encode())
        os._exit(0)
    os.close(w)
    res = os.read(r, 100).decode()
    os.close(r)
    status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    out[name] = res or "ran:%d" % status
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def exec_targets() -> Iterator[dict[str, str]]:
    """Programs the shim cannot load into and near misses, in a world-readable directory on a
    mount that honours setuid bits and file capabilities."""
    import struct
    import tempfile

    setcap, cc = shutil.which("setcap") or "/usr/sbin/setcap", shutil.which("cc")
    assert cc and os.path.exists(setcap), "cc and setcap: scripts/install-system-deps.sh"
    bases = [tempfile.gettempdir(), "/var/tmp", os.path.dirname(os.path.dirname(__file__))]
    base = next(b for b in bases if not os.statvfs(b).f_flag & os.ST_NOSUID)
    d = tempfile.mkdtemp(prefix="wg-exec-", dir=base)
    os.chmod(d, 0o755)
    true = shutil.which("true") or "/bin/true"
    t: dict[str, str] = {"dir": d, "true": true}

    def copy(name: str, mode: int = 0o755, uid: int = 0, caps: str = "") -> None:
        t[name] = os.path.join(d, name)
        shutil.copy(true, t[name])
        os.chown(t[name], uid, uid)
        os.chmod(t[name], mode)
        if caps:
            subprocess.run([setcap, caps, t[name]], check=True, timeout=30)

    copy("suid_nobody", 0o4755, uid=65534)
    copy("sgid_nogroup", 0o2755, uid=65534)
    copy("suid_root", 0o4755)
    copy("cap", caps="cap_net_bind_service=ep")
    copy("cap_inh", caps="cap_net_bind_service=i")
    src = os.path.join(d, "t.c")
    with open(src, "w") as f:
        f.write("int main(void) { return 0; }\n")
    t["static"] = os.path.join(d, "static")
    subprocess.run([cc, "-static", "-o", t["static"], src], check=True, timeout=120)
    t["script_suid"] = os.path.join(d, "script_suid")  # a script run by a setuid interpreter
    t["script_sh"] = os.path.join(d, "script_sh")
    t["script_suid_nonl"] = os.path.join(d, "script_suid_nonl")  # no newline: the kernel runs it
    scripts = {"script_suid": f"#!{t['suid_nobody']}\n", "script_sh": "#!/bin/sh\n"}
    for name, text in (*scripts.items(), ("script_suid_nonl", f"#! {t['suid_nobody']}")):
        with open(t[name], "w") as f:
            f.write(text)
        os.chmod(t[name], 0o755)
    interp = b"/lib/ld-linux.so.2\0"  # a 32-bit i386 program: the 64-bit shim cannot load in
    ehdr = struct.pack(
        "<16sHHIIIIIHHHHHH", b"\x7fELF\x01\x01\x01" + bytes(9), 2, 3, 1, 0x8048000, 52, 0, 0,
        52, 32, 1, 0, 0, 0,
    )  # fmt: skip
    phdr = struct.pack("<IIIIIIII", 3, 84, 0x8048054, 0, len(interp), len(interp), 4, 1)
    t["elf32"] = os.path.join(d, "elf32")
    with open(t["elf32"], "wb") as f:
        f.write(ehdr + phdr + interp)
    os.chmod(t["elf32"], 0o755)
    from wrapguard.elf import read_elf

    t["loader"] = read_elf(true).interpreter or "/lib64/ld-linux-x86-64.so.2"
    t["go"] = shutil.which("wireguard-go") or "wireguard-go"  # dynamically linked, with cgo
    try:
        yield t
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.root
def test_exec_refuses_what_the_shim_cannot_load_into(
    world: World, exec_targets: dict[str, str]
) -> None:
    t = exec_targets
    cases: dict[str, list[Any]] = {
        # secure-execution mode: the exec changes the effective ids...
        "suid_nobody": ["execv", t["suid_nobody"], [], False, False],
        "sgid_nogroup": ["execv", t["sgid_nogroup"], [], False, False],
        "suid_root": ["execv", t["suid_root"], [], False, False],  # root runs it: no change
        "suid_root_by_nobody": ["execv", t["suid_root"], [], True, False],
        "suid_nobody_nnp": ["execv", t["suid_nobody"], [], False, True],  # bits ignored
        "suid_nobody_nosuid": ["execv", "nosuid:" + t["suid_nobody"], [], False, False],  # too
        # ... or file capabilities grant something to a caller that is not root
        "cap_by_nobody": ["execv", t["cap"], [], True, False],
        "cap_by_root": ["execv", t["cap"], [], False, False],
        "cap_inh_by_nobody": ["execv", t["cap_inh"], [], True, False],  # grants nothing
        # no loader, own system calls, another ELF class
        "static": ["execv", t["static"], [], False, False],
        "go": ["execv", t["go"], ["--version"], False, False],
        "elf32": ["execv", t["elf32"], [], False, False],
        "loader": ["execv", t["loader"], ["--version"], False, False],
        "true": ["execv", t["true"], [], False, False],
        # scripts are judged by their interpreter
        "script_suid": ["execv", t["script_suid"], [], False, False],
        "script_sh": ["execv", t["script_sh"], [], False, False],
        "script_suid_nonl": ["execv", t["script_suid_nonl"], [], False, False],
        # every way in
        "execvp": ["execvp", "suid_nobody", [], False, False],
        "execlp": ["execlp", "suid_nobody", [], False, False],
        "execvp_true": ["execvp", "true", [], False, False],
        "execl": ["execl", t["suid_nobody"], [], False, False],
        "fexecve": ["fexecve", t["suid_nobody"], [], False, False],
        "execveat": ["execveat", t["suid_nobody"], [], False, False],
        "execveat_true": ["execveat", t["true"], [], False, False],
        "subprocess": ["subprocess", t["suid_nobody"], [], False, False],
        "posix_spawn": ["posix_spawn", t["suid_nobody"], [], False, False],
        "posix_spawnp": ["posix_spawnp", "suid_nobody", [], False, False],
        "posix_spawnp_true": ["posix_spawnp", "true", [], False, False],
    }
    argv = [sys.executable, "-c", EXEC_PROBE, json.dumps(cases)]
    path = f"{t['dir']}:{os.environ.get('PATH', '/usr/bin:/bin')}"
    proc = world.run(argv, timeout=60, PATH=path)
    assert proc.returncode == 0, proc.stderr.decode()
    out = json.loads(proc.stdout)
    refused = {k for k, v in out.items() if v == "EPERM"}
    assert refused == {
        "suid_nobody", "sgid_nogroup", "suid_root_by_nobody", "cap_by_nobody", "static", "go",
        "elf32", "script_suid", "script_suid_nonl", "execvp", "execlp", "execl", "fexecve",
        "execveat", "subprocess", "posix_spawn", "posix_spawnp",
    }, out  # fmt: skip
    assert all(v == "ran:0" for k, v in out.items() if k not in refused), out
    # The refusal prints nothing; inert (no WRAPGUARD_CTL) the same execs go to the kernel.
    assert proc.stderr == b"", proc.stderr
    inert = {k: cases[k] for k in ("suid_nobody", "static", "elf32")}
    argv = [sys.executable, "-c", EXEC_PROBE, json.dumps(inert)]
    proc = world.run(argv, timeout=60, WRAPGUARD_CTL="")
    assert proc.returncode == 0, proc.stderr.decode()
    out = json.loads(proc.stdout)
    assert out["suid_nobody"] == out["static"] == "ran:0", out
    assert out["elf32"] in ("ENOENT", "ENOEXEC"), out  # the kernel's own answer


# -- a control socket served by anyone but our launcher: fail closed, send nothing (issue 11) ---
# The fake answers every complete request DIRECT and prints, per connection, how many bytes it
# got and their hex. Run as uid 65534 ("other") it plants its own directory in a parent anyone
# may write (XDG_RUNTIME_DIR or TMPDIR of another user after `su` without `-`); as root
# ("same-uid") it is just another process than the launcher.
FAKE_CTL = """
import os, socket, struct, sys
parent, as_other = sys.argv[1], sys.argv[2] == "other"
if as_other:
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)
d = os.path.join(parent, "wrapguard-fake")
os.mkdir(d, 0o700)
srv = socket.socket(socket.AF_UNIX)
srv.bind(os.path.join(d, "ctl.sock"))
srv.listen(16)
print("READY", flush=True)
while True:
    c, _ = srv.accept()
    c.settimeout(2)
    got = b""
    try:
        while len(got) < 4 or len(got) < 4 + struct.unpack("!I", got[:4])[0]:
            chunk = c.recv(4096)
            if not chunk:
                break
            got += chunk
        if len(got) >= 6:
            c.sendall(struct.pack("!IBBHi", 8, 1, got[5], 0, 0))  # DIRECT
    except OSError:
        pass
    print("conn", len(got), got.hex(), flush=True)
    c.close()
"""
FAKE_PROBE = """
    import errno, json, socket, sys
    s = socket.socket()
    s.settimeout(5)
    rc = s.connect_ex(("10.150.0.200", int(sys.argv[1])))
    print(json.dumps(errno.errorcode.get(rc, rc)))
"""


@pytest.mark.root
@pytest.mark.parametrize("who", ["other", "same-uid"])
def test_a_fake_control_socket_gets_nothing_and_the_shim_fails_closed(
    world: World, who: str
) -> None:
    assert world.isolated
    # Under /tmp: uid 65534 must reach it (pytest's tmp_path is in a 0700 directory).
    parent = Path(tempfile.mkdtemp(prefix="wrapguard-test-shared-", dir="/tmp"))
    parent.chmod(0o1777 if who == "other" else 0o700)
    fake = subprocess.Popen(
        [sys.executable, "-c", FAKE_CTL, str(parent), who], stdout=PIPE, stderr=PIPE, text=True
    )
    # A direct connect to 10.150.0.200 would be refused (nothing listens there): a shim that
    # followed the fake's DIRECT would say ECONNREFUSED, one that fails closed ENETUNREACH.
    added = world.run(["ip", "addr", "add", "10.150.0.200/32", "dev", "lo"])
    try:
        assert fake.stdout is not None and fake.stdout.readline().strip() == "READY"
        assert added.returncode == 0, added.stderr
        ctl = str(parent / "wrapguard-fake" / "ctl.sock")
        requests = world.server.stats.requests
        assert world.python(FAKE_PROBE, WRAPGUARD_CTL=ctl) == "ENETUNREACH"
        assert world.server.stats.requests == requests  # nor did it ask the real launcher
    finally:
        world.run(["ip", "addr", "del", "10.150.0.200/32", "dev", "lo"])
        fake.kill()
        out, err = fake.communicate(timeout=10)
        shutil.rmtree(parent, ignore_errors=True)
    assert "Traceback" not in err, err
    got = [line.split() for line in out.splitlines() if line.startswith("conn")]
    # The shim may connect (to learn who serves the socket), but sends not a byte.
    assert all(conn[1] == "0" for conn in got), got
    assert world.server.env()["WRAPGUARD_SECRET"] not in out


def test_the_launchers_socket_through_a_symlink_is_not_trusted(world: World, tmp_path: Any) -> None:
    # The shim checks ctl.sock's directory with lstat: a link (to anything) fails closed.
    assert world.server.directory is not None and world.server.ctl_path is not None
    link = tmp_path / "link"
    link.symlink_to(world.server.directory)
    code = """
        import json, socket, sys
        s = socket.socket()
        print(json.dumps(s.connect_ex(("10.150.0.1", int(sys.argv[1])))))
    """
    requests = world.server.stats.requests
    ctl = str(link / os.path.basename(world.server.ctl_path))
    assert world.python(code, WRAPGUARD_CTL=ctl) == errno.ENETUNREACH
    assert world.python(code, WRAPGUARD_CTL_PID="1") == errno.ENETUNREACH  # not the launcher
    assert world.python(code, WRAPGUARD_CTL_PID="") == errno.ENETUNREACH  # unknown
    assert world.server.stats.requests == requests
    assert world.python(code) == 0  # the same, as the launcher set it up: tunnelled
