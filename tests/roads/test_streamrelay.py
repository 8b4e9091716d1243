"""`wrapguard relay` and the client road on loopback (in-process, one asyncio loop): a wrong key
is 401 with nothing forwarded, the session cap is 503, idle sessions end and the road comes
back, garbage uploads are refused, HTTPS_PROXY-style CONNECT works, SIGTERM exits 0."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import h11
import pytest

from wrapguard import log
from wrapguard.config import StreamEndpoint
from wrapguard.roads import streamrelay
from wrapguard.roads.stream import StreamRoad, proxy_for
from wrapguard.roads.streamrelay import HostPort, Relay
from wrapguard.wire import stream as framing

KEY = "the-key"


@pytest.fixture(autouse=True)
def _logging() -> Iterator[None]:
    """These tests log at debug level in this process: put the logging back afterwards."""
    log.setup("debug")
    yield
    log.setup()


class Sink(asyncio.DatagramProtocol):
    """The stand-in WireGuard server: echoes, and remembers what came from where."""

    def __init__(self) -> None:
        self.got: list[tuple[bytes, tuple[str, int]]] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.got.append((data, addr))
        self.t.sendto(data, addr)  # type: ignore[attr-defined]


async def until(cond: Callable[[], bool], timeout: float = 10) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.02)


class Bench:
    def __init__(self, relay: Relay, sink: Sink) -> None:
        self.relay, self.sink = relay, sink
        self.roads: list[StreamRoad] = []

    def road(self, key: str = KEY, proxy: str | None = None) -> tuple[StreamRoad, list[bytes]]:
        url = f"http://127.0.0.1:{self.relay.port}/wg"
        target = StreamEndpoint(url, "http", "127.0.0.1", self.relay.port, "/wg", key)
        got: list[bytes] = []
        road = StreamRoad(target, got.extend, proxy=proxy or False)
        road.start()
        self.roads.append(road)
        return road, got


def run(coro_fn: Callable[[], object]) -> None:
    asyncio.run(coro_fn())  # type: ignore[arg-type]


async def raw(port: int, request: bytes, read: bool = True) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    data = b""
    if read:
        async with asyncio.timeout(10):
            data = await reader.read()
    writer.close()
    return data


def put(key: str, body: bytes, sid: str = "a" * 32) -> bytes:
    head = (
        f"PUT /wg HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
        f"X-Wrapguard-Session: {sid}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def test_datagrams_both_ways_and_a_wrong_key_forwards_nothing() -> None:
    async def main() -> None:
        async with bench() as b:
            road, got = b.road()
            await until(lambda: road.state == "up")
            for i in range(50):
                road.send(b"dgram-%d" % i)
            await until(lambda: len(got) == 50)
            assert got == [b"dgram-%d" % i for i in range(50)]
            forwarded = len(b.sink.got)
            # A wrong key, over the road and by hand with a body of frames: 401, nothing sent on.
            bad, _ = b.road("wrong")
            await until(lambda: bad.state == "refused")
            assert "HTTP 401" in (bad.last_error or "")
            reply = await raw(b.relay.port, put("wrong", framing.start([b"x" * 40] * 3)))
            assert reply.startswith(b"HTTP/1.1 401 ")
            reply = await raw(b.relay.port, put("", framing.start([b"y" * 40])))
            assert reply.startswith(b"HTTP/1.1 401 ")
            await asyncio.sleep(0.2)
            assert len(b.sink.got) == forwarded
            assert b.relay.refused >= 3

    run(main)


def test_bad_requests_are_refused() -> None:
    async def main() -> None:
        async with bench() as b:
            p = b.relay.port
            reply = await raw(p, put(KEY, b"<html>not frames</html>"))
            assert reply.startswith(b"HTTP/1.1 400 ")
            assert b"not a wrapguard stream" in reply
            reply = await raw(p, put(KEY, b"", sid="XYZ"))
            assert reply.startswith(b"HTTP/1.1 400 ")
            reply = await raw(p, b"DELETE /wg HTTP/1.1\r\nHost: x\r\n\r\n")
            assert reply.startswith(b"HTTP/1.1 405 ")
            reply = await raw(p, b"garbage\r\n\r\n")
            assert reply.startswith(b"HTTP/1.1 400 ")
            assert not b.sink.got
            # POST works as PUT does: a plain Content-Length body of frames is forwarded.
            post = put(KEY, framing.start([b"p1", b"p2"]), sid="b" * 32).replace(b"PUT", b"POST")
            reply = await raw(p, post)
            assert reply.startswith(b"HTTP/1.1 200 "), reply
            await until(lambda: len(b.sink.got) == 2)
            assert [d for d, _ in b.sink.got] == [b"p1", b"p2"]

    run(main)


def test_session_cap_idle_end_and_reconnect(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(streamrelay, "SWEEP_EVERY", 0.1)

    async def main() -> None:
        async with bench() as b:
            roads = [b.road() for _ in range(3)]
            await until(lambda: all(r.state == "up" for r, _ in roads))
            assert len(b.relay.sessions) == 3
            extra, _ = b.road()
            await until(lambda: extra.last_error is not None)
            assert "HTTP 503" in (extra.last_error or "")
            # Each session has its own UDP socket: the server sees three source ports.
            for i, (r, _) in enumerate(roads):
                r.send(b"from-%d" % i)
            await until(lambda: len(b.sink.got) == 3)
            assert len({addr for _, addr in b.sink.got}) == 3
            # Silence: the relay ends the idle sessions; the roads reconnect on their own.
            first, got = roads[0]
            roads[1][0].close()
            roads[2][0].close()
            before = first.connects
            await until(lambda: first.connects > before, timeout=20)
            await until(lambda: first.state == "up")
            first.send(b"again")
            await until(lambda: b"again" in got)

    run(main)


class ConnectProxy:
    """A minimal HTTP CONNECT proxy (h11) for the HTTPS_PROXY path."""

    def __init__(self) -> None:
        self.targets: list[str] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER)
        while True:
            ev = conn.next_event()
            if ev is h11.NEED_DATA:
                conn.receive_data(await reader.read(65536))
                continue
            break
        assert isinstance(ev, h11.Request) and ev.method == b"CONNECT"
        target = ev.target.decode()
        self.targets.append(target)
        host, _, port = target.rpartition(":")
        up_r, up_w = await asyncio.open_connection(host, int(port))
        writer.write(conn.send(h11.Response(status_code=200, headers=[])))

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            with_data = conn.trailing_data[0] if r is reader else b""
            if with_data:
                w.write(with_data)
            while data := await r.read(65536):
                w.write(data)
                await w.drain()
            w.close()

        await asyncio.gather(pipe(reader, up_w), pipe(up_r, writer), return_exceptions=True)


def test_through_a_connect_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> None:
        async with bench() as b:
            cp = ConnectProxy()
            server = await asyncio.start_server(cp.handle, "127.0.0.1", 0)
            pport = server.sockets[0].getsockname()[1]
            monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{pport}")
            monkeypatch.delenv("NO_PROXY", raising=False)
            monkeypatch.delenv("no_proxy", raising=False)
            assert proxy_for("http", "127.0.0.1") == f"http://127.0.0.1:{pport}"
            road, got = b.road(proxy=proxy_for("http", "127.0.0.1"))
            await until(lambda: road.state == "up")
            road.send(b"via-proxy")
            await until(lambda: got == [b"via-proxy"])
            assert cp.targets == [f"127.0.0.1:{b.relay.port}"] * 2  # download and upload
            assert road.describe()["proxy"] == f"http://127.0.0.1:{pport}"
            road.close()
            server.close()

    run(main)


@contextlib.asynccontextmanager
async def bench() -> AsyncIterator[Bench]:
    """The bench as an async context a test's own loop can use (one loop per test)."""
    loop = asyncio.get_running_loop()
    transport, sink = await loop.create_datagram_endpoint(Sink, local_addr=("127.0.0.1", 0))
    port = transport.get_extra_info("sockname")[1]
    relay = Relay(HostPort("127.0.0.1", 0), HostPort("127.0.0.1", port), ["other", KEY],
                  max_sessions=3, idle_timeout=1.0, detached_grace=1.0)  # fmt: skip
    await relay.start()
    b = Bench(relay, sink)
    try:
        yield b
    finally:
        for r in b.roads:
            r.close()
        await relay.close()
        transport.close()


def test_relay_command_runs_until_sigterm(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text(KEY + "\n")
    logf = tmp_path / "relay.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "wrapguard", "relay", "--listen", "127.0.0.1:0",
         "--forward", "127.0.0.1:9", "--key-file", str(keys), "--log-file", str(logf)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while not (logf.exists() and "relay listening" in logf.read_text()):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        line = json.loads(logf.read_text().splitlines()[0])
        port = int(str(line["listen"]).rpartition(":")[2])
        with socket.create_connection(("127.0.0.1", port), timeout=5):  # a client is open
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(20) == 0
        lines = [json.loads(x) for x in logf.read_text().splitlines()]
        assert lines[-1]["message"] == "relay stopping"
        assert KEY not in logf.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_relay_command_errors_are_one_line(tmp_path: Path) -> None:
    def relay(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "wrapguard", "relay", *args],
            capture_output=True, text=True, timeout=30, env={**os.environ},
        )  # fmt: skip

    r = relay("--listen", "127.0.0.1:0", "--forward", "127.0.0.1:9", "--key-file", "/nonexistent")
    assert r.returncode == 1 and r.stderr.strip().count("\n") == 0
    assert "no such key file" in r.stderr
    keys = tmp_path / "k"
    keys.write_text("k\n")
    r = relay("--listen", "127.0.0.1", "--forward", "127.0.0.1:9", "--key-file", str(keys))
    assert r.returncode == 2 and "--listen" in r.stderr
    r = relay("--listen", "127.0.0.1:0", "--forward", "127.0.0.1:9", "--key-file", str(keys),
              "--tls-cert", str(keys))  # fmt: skip
    assert r.returncode == 2 and "--tls-key" in r.stderr


def test_relay_tls_verifies_certificate_and_host_name(tmp_path: Path) -> None:
    """--tls-cert/--tls-key on the relay itself; the road checks the chain and the name."""
    from roads.streamrig import make_ca

    ca, cert, key = make_ca(tmp_path / "pki", "relay", ["localhost"])
    other_ca, _, _ = make_ca(tmp_path / "other", "other", ["localhost"])

    async def main() -> None:
        loop = asyncio.get_running_loop()
        transport, sink = await loop.create_datagram_endpoint(Sink, local_addr=("127.0.0.1", 0))
        port = transport.get_extra_info("sockname")[1]
        tls = streamrelay.server_tls(str(cert), str(key))
        relay = Relay(HostPort("127.0.0.1", 0), HostPort("127.0.0.1", port), [KEY], ssl_context=tls)
        await relay.start()
        roads: list[StreamRoad] = []

        def road(host: str, ca_file: Path) -> tuple[StreamRoad, list[bytes]]:
            url = f"https://{host}:{relay.port}/wg"
            t = StreamEndpoint(url, "https", host, relay.port, "/wg", KEY, str(ca_file))
            got: list[bytes] = []
            r = StreamRoad(t, got.extend, proxy=False)
            r.start()
            roads.append(r)
            return r, got

        try:
            good, got = road("localhost", ca)
            await until(lambda: good.state == "up")
            good.send(b"over-tls")
            await until(lambda: got == [b"over-tls"])
            wrong_name, _ = road("127.0.0.1", ca)  # the certificate names only "localhost"
            wrong_ca, _ = road("localhost", other_ca)
            await until(lambda: bool(wrong_name.last_error and wrong_ca.last_error))
            assert "not trusted" in str(wrong_name.last_error)
            assert "IP address mismatch" in str(wrong_name.last_error), wrong_name.last_error
            assert "unable to get local issuer certificate" in str(wrong_ca.last_error)
            assert len(sink.got) == 1
        finally:
            for r in roads:
                r.close()
            await relay.close()
            transport.close()

    asyncio.run(main())


def test_silent_connections_cannot_crowd_out_clients(monkeypatch: pytest.MonkeyPatch) -> None:
    """Connections that send no request head (whoever can reach the port, no key shown) are
    capped apart from the sessions' streams, the oldest going first: a client with the key,
    which sends its head at once, gets its road up at once (a review finding: before, they
    counted against the connection limit that authenticated streams share, for 10 s each)."""
    monkeypatch.setattr(streamrelay, "MAX_PENDING_HEADS", 8)

    async def closed(idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]) -> int:
        n = 0
        for reader, _ in idle:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.1):
                    n += await reader.read() == b""
        return n

    async def main() -> None:
        async with bench() as b:
            idle = [await asyncio.open_connection("127.0.0.1", b.relay.port) for _ in range(20)]
            await asyncio.sleep(0.2)
            assert await closed(idle) == 12  # 8 wait for their head; the older ones went
            t0 = time.monotonic()
            road, got = b.road()
            await until(lambda: road.state == "up")
            road.send(b"through")
            await until(lambda: got == [b"through"])
            assert time.monotonic() - t0 < streamrelay.HEAD_TIMEOUT / 2  # not after the idlers
            for _, writer in idle:
                writer.close()

    run(main)
