"""The HTTP proxy door (wrapguard/doors/httpproxy.py, httpproxy_proto.py).

Three tiers: the pure request planning (no I/O); the door on loopback with a stand-in service
that routes everything DIRECT (no root: curl and raw sockets against the rig's HTTP server
run in this process); and end to end in the rig, `wrapguard --http-proxy` as a daemon in the
client namespace with curl and git through it into the tunnel.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import hashlib
import ipaddress
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import h11
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rig.harness import KiB, MiB, Rig
from rig.servers import serve_http

from wrapguard.doors import ProxySpec, httpproxy
from wrapguard.doors.httpproxy_proto import (
    Forward,
    Refusal,
    Tunnel,
    authorized,
    plan,
    refusal_for,
    split_authority,
)
from wrapguard.runtime.service import FrontEnd, Route, Way

BIG = "big.bin"
RIG_OPTIONS: dict[str, Any] = {"file_sizes": {BIG: 64 * MiB, "small.bin": 64 * KiB}}
USER, PASSWORD = "alice", "s3cret:with@odd"


def request(target: bytes, method: bytes = b"GET", headers: list[Any] | None = None) -> h11.Request:
    hdrs = headers if headers is not None else [(b"host", b"example")]
    return h11.Request(method=method, target=target, headers=hdrs)


# -- what a request asks for (pure) --------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "default", "want"),
    [
        (b"10.150.0.1:8080", None, ("10.150.0.1", 8080)),
        (b"[fd15::1]:443", None, ("fd15::1", 443)),
        (b"web.wg.test:22", None, ("web.wg.test", 22)),
        (b"web.wg.test", 80, ("web.wg.test", 80)),
        (b"[::1]", 80, ("::1", 80)),
    ],
)
def test_split_authority(text: bytes, default: int | None, want: tuple[str, int]) -> None:
    assert split_authority(text, default) == want


@pytest.mark.parametrize(
    "text",
    [b"host", b"host:", b"host:0", b"host:65536", b"host:8x", b"fd15::1:80", b"[fd15::1]80",
     b"[nothex]:80", b"[fd15::1:80", b"[fe80::1%25lo]:80", b"bad host:80", b":80",
     b"a%2fb:80", b"-x.:80"],
)  # fmt: skip
def test_split_authority_refuses(text: bytes) -> None:
    with pytest.raises(Refusal) as info:
        split_authority(text)
    assert info.value.status == 400


def test_plan_connect() -> None:
    assert plan(request(b"[fd15::1]:8080", b"CONNECT")) == Tunnel("fd15::1", 8080)


def test_plan_absolute_uri_to_origin_form() -> None:
    headers = [
        (b"host", b"wrong.example"),
        (b"user-agent", b"t"),
        (b"proxy-authorization", b"Basic eDp5"),
        (b"proxy-connection", b"keep-alive"),
        (b"connection", b"keep-alive, x-hop"),
        (b"x-hop", b"1"),
        (b"keep-alive", b"timeout=5"),
        (b"te", b"trailers"),
        (b"upgrade", b"websocket"),
        (b"content-length", b"3"),
    ]
    got = plan(request(b"http://u@web.wg.test:8080/a/b?q=1#frag", b"POST", headers))
    assert isinstance(got, Forward)
    assert (got.host, got.port) == ("web.wg.test", 8080)
    assert got.request.target == b"/a/b?q=1"
    assert got.request.method == b"POST"
    # RFC 9112 3.2.2: Host comes from the request-target; hop-by-hop fields are gone.
    assert list(got.request.headers) == [
        (b"host", b"web.wg.test:8080"),
        (b"user-agent", b"t"),
        (b"content-length", b"3"),
        (b"via", b"1.1 wrapguard"),
        (b"connection", b"close"),
    ]


def test_plan_chunked_body_stays_chunked_and_loses_content_length() -> None:
    headers = [(b"host", b"h"), (b"transfer-encoding", b"chunked")]
    got = plan(request(b"http://10.150.0.1/up", b"PUT", headers))
    assert isinstance(got, Forward)
    names = [n for n, _ in got.request.headers]
    assert b"transfer-encoding" in names and b"content-length" not in names
    assert (got.host, got.port, got.request.target) == ("10.150.0.1", 80, b"/up")


def test_plan_query_without_path() -> None:
    got = plan(request(b"http://[fd15::1]?x"))
    assert isinstance(got, Forward) and got.request.target == b"/?x"
    assert (got.host, got.port) == ("fd15::1", 80)


@pytest.mark.parametrize(
    ("target", "status"),
    [(b"https://example/", 501), (b"/index.html", 400), (b"*", 400), (b"ftp://x/", 400),
     (b"http:///nohost", 400), (b"http://h:99999/", 400)],
)  # fmt: skip
def test_plan_refuses(target: bytes, status: int) -> None:
    with pytest.raises(Refusal) as info:
        plan(request(target, b"OPTIONS" if target == b"*" else b"GET"))
    assert info.value.status == status


def basic(user: str, password: str) -> bytes:
    return b"Basic " + base64.b64encode(f"{user}:{password}".encode())


def test_authorized() -> None:
    want = f"{USER}:{PASSWORD}".encode()
    assert authorized([(b"proxy-authorization", basic(USER, PASSWORD))], want)
    assert authorized([(b"Proxy-Authorization", b"basic  " + basic(USER, PASSWORD)[6:])], want)
    assert not authorized([(b"proxy-authorization", basic(USER, "nope"))], want)
    assert not authorized([(b"proxy-authorization", b"Basic !!!")], want)
    assert not authorized([(b"proxy-authorization", b"Bearer abc")], want)
    assert not authorized([(b"authorization", basic(USER, PASSWORD))], want)  # not ours
    assert not authorized([], want)


def test_refusal_for_errno() -> None:
    assert refusal_for(errno.ETIMEDOUT, "h:1").status == 504
    r = refusal_for(errno.ECONNREFUSED, "h:1")
    assert (r.status, r.text) == (502, "cannot connect to h:1: connection refused")
    assert refusal_for(errno.ENETUNREACH, "h:1").status == 502


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=80), st.sampled_from([b"GET", b"CONNECT", b"POST"]))
def test_garbage_targets_give_a_plan_or_a_refusal(target: bytes, method: bytes) -> None:
    try:
        req = request(target, method)
    except h11.LocalProtocolError:
        return  # h11 itself would never hand us this target
    try:
        plan(req)
    except Refusal as r:
        assert 400 <= r.status < 600


# -- the door on loopback, everything DIRECT (no root) ------------------------------------------


class DirectService:
    """A stand-in for TunnelService: loopback goes direct, anything else fails as unroutable
    (so that no test here can ever send a packet off this machine); one name resolves."""

    def __init__(self) -> None:
        self.frontends: list[FrontEnd] = []
        self.lookups: list[str] = []

    def route(self, proto: int, ip: Any, port: int) -> Route:
        return Route(Way.DIRECT) if ip.is_loopback else Route(Way.FAIL, errno.ENETUNREACH)

    async def resolve(self, name: str, family: int = 0) -> list[Any]:
        self.lookups.append(name)
        if name == "origin.test":
            return [ipaddress.ip_address("127.0.0.1")]
        raise OSError(errno.EHOSTUNREACH, f"{name}: not found")

    def add_frontend(self, frontend: FrontEnd) -> FrontEnd:
        self.frontends.append(frontend)
        return frontend


class LocalDoor:
    """The door on its own loop in a thread, as the launcher runs it."""

    def __init__(self, spec: ProxySpec) -> None:
        self.service = DirectService()
        self.loop = asyncio.new_event_loop()
        self.door: Any = None
        ready = threading.Event()

        async def main() -> None:
            self.stop = asyncio.Event()
            self.door = await httpproxy.start(self.service, spec)  # type: ignore[arg-type]
            ready.set()
            await self.stop.wait()
            await self.door.close()

        self.thread = threading.Thread(
            target=self.loop.run_until_complete, args=(main(),), daemon=True
        )
        self.thread.start()
        assert ready.wait(10), "the door did not start"
        self.port = self.door.port

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(10)
        self.loop.close()

    @property
    def counts(self) -> dict[str, Any]:
        return dict(self.service.frontends[0].extra, flows=self.service.frontends[0].flows)


@pytest.fixture(scope="module")
def origin(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, Path]:
    """The rig's HTTP server on loopback (files, PUT/POST /upload with sha256)."""
    d = tmp_path_factory.mktemp("origin")
    (d / "one.txt").write_bytes(b"one\n" * 1000)
    (d / "two.bin").write_bytes(os.urandom(3 * MiB + 17))
    return serve_http("127.0.0.1", 0, d), d


@pytest.fixture
def door() -> Iterator[LocalDoor]:
    d = LocalDoor(ProxySpec("http", "127.0.0.1", 0))
    yield d
    d.close()


def curl(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["curl", "-sS", *args], capture_output=True, timeout=timeout)


def exchange(port: int, data: bytes, timeout: float = 10) -> bytes:
    """Send raw bytes to the proxy; everything it answers until it closes (or times out)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        with contextlib.suppress(TimeoutError, ConnectionResetError):
            while chunk := s.recv(65536):
                out += chunk
    return out


def test_local_forward_keeps_the_client_connection(door: LocalDoor, origin: Any) -> None:
    port, _ = origin
    base = f"http://origin.test:{port}"
    r = curl("-x", f"http://127.0.0.1:{door.port}", "-w", "%{num_connects} %{http_code}\n",
             f"{base}/one.txt", "-o", "/dev/null",
             f"{base}/two.bin", "-o", "/dev/null")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().split("\n")[:2] == ["1 200", "0 200"]  # one proxy connection
    assert door.counts["requests"] == 2 and door.counts["flows"] == 2
    assert door.service.lookups == ["origin.test", "origin.test"]


def test_local_forward_bodies_both_ways(door: LocalDoor, origin: Any, tmp_path: Path) -> None:
    port, d = origin
    proxy = f"http://127.0.0.1:{door.port}"
    out = tmp_path / "got"
    r = curl("-x", proxy, f"http://127.0.0.1:{port}/two.bin", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == (d / "two.bin").read_bytes()
    # A sized upload (curl sends Expect: 100-continue: the origin's 100 comes through) and a
    # chunked one (stdin): the origin reports what it got.
    for args in (["--data-binary", f"@{d / 'two.bin'}"], ["-T", "-", "-X", "POST"]):
        inp = (d / "two.bin").read_bytes() if "-T" in args else None
        r = subprocess.run(
            ["curl", "-sS", "-x", proxy, *args, f"http://127.0.0.1:{port}/upload"],
            input=inp, capture_output=True, timeout=60,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        got = json.loads(r.stdout)
        assert got == {"sha256": hashlib.sha256((d / "two.bin").read_bytes()).hexdigest(),
                       "length": (d / "two.bin").stat().st_size}  # fmt: skip


def test_local_connect_direct(door: LocalDoor, origin: Any, tmp_path: Path) -> None:
    port, d = origin
    out = tmp_path / "got"
    r = curl("-p", "-x", f"http://127.0.0.1:{door.port}", f"http://origin.test:{port}/two.bin",
             "-o", str(out), "-w", "%{http_connect}")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"200"
    assert out.read_bytes() == (d / "two.bin").read_bytes()
    assert door.counts["connects"] == 1 and door.counts["direct"] == 1


def test_local_errors_are_statuses(door: LocalDoor, origin: Any) -> None:
    port, _ = origin
    p = door.port
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    cases = [
        (f"GET http://127.0.0.1:{closed}/ HTTP/1.1\r\nHost: x\r\n\r\n", 502, b"refused"),
        (f"CONNECT 127.0.0.1:{closed} HTTP/1.1\r\nHost: x\r\n\r\n", 502, b"refused"),
        ("GET http://nowhere.test/ HTTP/1.1\r\nHost: x\r\n\r\n", 502, b"cannot resolve"),
        ("CONNECT nowhere.test:80 HTTP/1.1\r\nHost: x\r\n\r\n", 502, b"cannot resolve"),
        ("GET https://origin.test/ HTTP/1.1\r\nHost: x\r\n\r\n", 501, b"CONNECT"),
        ("GET /one.txt HTTP/1.1\r\nHost: x\r\n\r\n", 400, b"proxy"),
        ("CONNECT fd15::1:80 HTTP/1.1\r\nHost: x\r\n\r\n", 400, b"brackets"),
        (f"GET http://127.0.0.1:{p}/ HTTP/1.1\r\nHost: x\r\n\r\n", 508, b"this proxy"),
    ]
    for text, status, words in cases:
        # Each error keeps the connection: a second request on it still gets its answer.
        out = exchange(p, (text + f"GET http://127.0.0.1:{port}/one.txt HTTP/1.1\r\n"
                           "Host: x\r\nConnection: close\r\n\r\n").encode())  # fmt: skip
        head, _, rest = out.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 %d " % status), (text, out[:300])
        assert words in rest, (text, out[:300])
        assert b"HTTP/1.1 200 " in rest and rest.endswith(b"one\n"), (text, out[-300:])


def test_local_bad_input_gets_4xx_or_close(door: LocalDoor) -> None:
    p = door.port
    assert exchange(p, b"\x16\x03\x01\x02\x00garbage\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    huge = b"GET http://origin.test/ HTTP/1.1\r\nX: " + b"a" * (httpproxy.MAX_HEAD + 10)
    assert exchange(p, huge).startswith(b"HTTP/1.1 431 ")
    bad_chunk = b"POST http://origin.test/ HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
    assert exchange(p, bad_chunk + b"\r\nzz\r\n").startswith(b"HTTP/1.1 ")  # 4xx or 502
    # Still serving after all that.
    assert exchange(p, b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n", timeout=2).startswith(b"HTTP/1.1 400")


def test_local_garbage_never_breaks_the_door() -> None:
    """Random bytes (then EOF) from many clients: each gets an error status or a close, and
    the door goes on serving."""
    d = LocalDoor(ProxySpec("http", "127.0.0.1", 0))
    prefixes = st.sampled_from([b"", b"GET ", b"CONNECT ", b"GET http://", b"POST http://x/ "])

    @settings(max_examples=150, deadline=None)
    @given(prefixes, st.binary(max_size=300))
    def one(prefix: bytes, junk: bytes) -> None:
        with socket.create_connection(("127.0.0.1", d.port), timeout=10) as s:
            s.sendall(prefix + junk)
            s.shutdown(socket.SHUT_WR)
            out = b""
            with contextlib.suppress(ConnectionResetError):
                while chunk := s.recv(65536):
                    out += chunk
        assert out == b"" or out[:10] in (b"HTTP/1.1 4", b"HTTP/1.1 5"), out[:200]

    try:
        one()
        ok = exchange(d.port, b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n", timeout=2)
        assert ok.startswith(b"HTTP/1.1 400 ")
    finally:
        d.close()


def test_local_idle_client_is_closed(monkeypatch: pytest.MonkeyPatch, door: LocalDoor) -> None:
    monkeypatch.setattr(httpproxy, "IDLE_TIMEOUT", 0.5)
    with socket.create_connection(("127.0.0.1", door.port), timeout=10) as s:
        s.sendall(b"GET http://origin.test/ HT")  # and nothing more
        started = time.monotonic()
        assert s.recv(100) == b""
        assert time.monotonic() - started < 9


def test_local_client_cap(monkeypatch: pytest.MonkeyPatch, door: LocalDoor) -> None:
    monkeypatch.setattr(httpproxy, "MAX_CLIENTS", 1)
    with socket.create_connection(("127.0.0.1", door.port), timeout=10) as first:
        first.sendall(b"GET ")  # holds the one place
        time.sleep(0.2)
        assert exchange(door.port, b"").startswith(b"HTTP/1.1 503 ")
    assert door.counts["refused_clients"] == 1


def test_local_origin_cut_short_reaches_the_client(door: LocalDoor) -> None:
    """An origin that promises 1000 bytes and closes after 10: the client sees the cut (no
    fake complete response); one that answers garbage gets the client a 502."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    answers = [b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n0123456789", b"SSH-2.0-x\r\n\r\n"]

    def serve() -> None:
        for answer in answers:
            c, _ = srv.accept()
            c.recv(65536)
            c.sendall(answer)
            c.close()

    threading.Thread(target=serve, daemon=True).start()
    url = f"http://127.0.0.1:{srv.getsockname()[1]}/"
    r = curl("-x", f"http://127.0.0.1:{door.port}", url)
    assert r.returncode == 18, r  # CURLE_PARTIAL_FILE
    r = curl("-x", f"http://127.0.0.1:{door.port}", "-w", "%{http_code}", url)
    assert r.stdout.endswith(b"502"), r
    srv.close()


def test_local_auth() -> None:
    d = LocalDoor(ProxySpec("http", "127.0.0.1", 0, USER, PASSWORD))
    try:
        out = exchange(
            d.port, b"CONNECT 127.0.0.1:1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        assert out.startswith(b"HTTP/1.1 407 ")
        assert b'\r\nproxy-authenticate: Basic realm="wrapguard"\r\n' in out.lower().replace(
            b"basic", b"Basic"
        )
        ok = basic(USER, PASSWORD)
        out = exchange(d.port, b"CONNECT 127.0.0.1:1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                       b"Proxy-Authorization: " + ok + b"\r\n\r\n")  # fmt: skip
        assert out.startswith(b"HTTP/1.1 502 "), out  # past the check, then refused
        assert d.service.frontends[0].auth is True
    finally:
        d.close()


def test_local_close_ends_every_client() -> None:
    """close() ends idle keep-alive clients and direct CONNECT tunnels, and stops listening."""
    srv = socket.socket()  # the kernel completes the handshakes from its backlog
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    port = srv.getsockname()[1]
    d = LocalDoor(ProxySpec("http", "127.0.0.1", 0))
    idle = socket.create_connection(("127.0.0.1", d.port), timeout=10)
    tunnel = socket.create_connection(("127.0.0.1", d.port), timeout=10)
    tunnel.sendall(f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert tunnel.recv(100).startswith(b"HTTP/1.1 200 ")
    d.close()
    assert not d.thread.is_alive()
    for s in (idle, tunnel):
        with contextlib.suppress(ConnectionResetError):
            assert s.recv(100) == b""
        s.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", d.port), timeout=5).close()
    srv.close()


def test_local_refuses_an_open_unauthenticated_bind() -> None:
    from wrapguard.errors import UsageError

    async def go() -> None:
        await httpproxy.start(DirectService(), ProxySpec("http", "0.0.0.0", 0))  # type: ignore[arg-type]

    with pytest.raises(UsageError):
        asyncio.run(go())


# -- end to end: wrapguard --http-proxy in the rig ------------------------------------------------

PROXY_PORT = 3128


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("httpproxy")  # 0700: the control socket may live here


@pytest.fixture(scope="module")
def daemon(module_rig: Rig, work: Path) -> Iterator[str]:
    """`wrapguard --config c.conf --http-proxy USER:PASS@127.0.0.1:3128` (DNS= in the tunnel)
    running in the client namespace; yields the proxy URL with the credentials."""
    rig = module_rig
    conf = rig.write_client_config(work / "c.conf", dns=True)
    argv = [sys.executable, "-m", "wrapguard", "--config", str(conf),
            "--control", str(work / "control.sock"),
            "--http-proxy", f"{USER}:{PASSWORD}@127.0.0.1:{PROXY_PORT}"]  # fmt: skip
    with open(work / "wrapguard.log", "wb") as log:
        proc = rig.client.popen(argv, env=rig.client.python_env(), stdout=log, stderr=log)
    deadline = time.monotonic() + 20
    while True:
        s = rig.client.socket()
        try:
            s.connect(("127.0.0.1", PROXY_PORT))
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError((work / "wrapguard.log").read_text()) from None
            time.sleep(0.1)
        finally:
            s.close()
    yield f"http://{USER}:{quote(PASSWORD, safe='')}@127.0.0.1:{PROXY_PORT}"
    proc.terminate()
    assert proc.wait(20) == 0, (work / "wrapguard.log").read_text()
    text = (work / "wrapguard.log").read_text()
    assert PASSWORD not in text and base64.b64encode(PASSWORD.encode()).decode() not in text


def rig_curl(rig: Rig, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return rig.client.run(["curl", "-sS", *args], check=False, timeout=timeout)


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@pytest.mark.parametrize("connect", [False, True], ids=["absolute-uri", "connect"])
def test_64mib_through_the_proxy(
    module_rig: Rig, daemon: str, tmp_path: Path, connect: bool
) -> None:
    rig = module_rig
    out = tmp_path / BIG
    args = ["-p"] if connect else []
    sent_before = rig.peer_status().tx_bytes
    r = rig_curl(rig, *args, "-x", daemon, rig.url(BIG), "-o", str(out), "-w", "%{http_code}")
    assert r.returncode == 0 and r.stdout == "200", r
    assert sha256_of(out) == rig.files[BIG][1]
    assert rig.peer_status().tx_bytes - sent_before > 64 * MiB  # it came through the peer


def test_keep_alive_and_ipv6(module_rig: Rig, daemon: str) -> None:
    """Two requests (IPv4 then IPv6 origin) on one proxy connection."""
    rig = module_rig
    r = rig_curl(rig, "-x", daemon, "-w", "%{num_connects} %{http_code}\n",
                 rig.url("small.bin"), "-o", "/dev/null",
                 rig.url("small.bin", v6=True), "-o", "/dev/null")  # fmt: skip
    assert r.returncode == 0, r
    assert r.stdout.split("\n")[:2] == ["1 200", "0 200"], r


def test_refused_port_is_502(module_rig: Rig, daemon: str) -> None:
    rig = module_rig
    url = f"http://{rig.peer_tunnel_v4}:9/"
    r = rig_curl(rig, "-x", daemon, "-w", "\n%{http_code}", url)
    assert r.stdout.endswith("\n502") and "connection refused" in r.stdout, r
    r = rig_curl(rig, "-p", "-x", daemon, "-w", "%{http_connect}", url)
    assert r.returncode != 0 and r.stdout == "502", r


def test_auth_required_wrong_right(module_rig: Rig, daemon: str) -> None:
    rig = module_rig
    url = rig.url("small.bin")
    plain_proxy = f"http://127.0.0.1:{PROXY_PORT}"
    r = rig_curl(rig, "-x", plain_proxy, "-D", "-", "-o", "/dev/null", url)
    assert r.stdout.startswith("HTTP/1.1 407 "), r
    assert 'proxy-authenticate: basic realm="wrapguard"' in r.stdout.lower(), r
    wrong = f"http://{USER}:nope@127.0.0.1:{PROXY_PORT}"
    for args in (["-x", wrong], ["-p", "-x", wrong]):
        r = rig_curl(rig, *args, "-w", "%{http_code} %{http_connect}", "-o", "/dev/null", url)
        assert "407" in r.stdout, (args, r)
    r = rig_curl(rig, "-x", daemon, "-w", "%{http_code}", "-o", "/dev/null", url)
    assert r.stdout == "200", r


def test_names_resolve_in_the_tunnel_without_leaking(module_rig: Rig, daemon: str) -> None:
    rig = module_rig
    before = len(rig.dns_log())
    for args in ([], ["-p"]):
        r = rig_curl(rig, *args, "-x", daemon, "-w", "%{http_code}", "-o", "/dev/null",
                     f"http://web.wg.test:{rig.http_port}/small.bin")  # fmt: skip
        assert r.stdout == "200", (args, r)
    r = rig_curl(rig, "-x", daemon, "-w", "\n%{http_code}", "http://missing.wg.test/")
    assert r.stdout.endswith("\n502") and "cannot resolve" in r.stdout, r
    asked = {q.get("name", "").rstrip(".") for q in rig.dns_log()[before:]}
    assert {"web.wg.test", "missing.wg.test"} <= asked, asked
    assert rig.client_dns_log() == []  # curl sent the names to the proxy; nothing leaked


def test_git_clone_through_http_proxy(module_rig: Rig, daemon: str, tmp_path: Path) -> None:
    """git (libcurl, its own request pattern) clones a dumb-HTTP repository served behind
    the peer, through `http.proxy`."""
    if shutil.which("git") is None:
        pytest.fail("git is not installed: run `make test` (scripts/install-system-deps.sh)")
    rig = module_rig
    served = tmp_path / "served"
    src = tmp_path / "src"
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid",
           "-c", "init.defaultBranch=main"]  # fmt: skip
    subprocess.run([*git, "init", "-q", str(src)], check=True)
    (src / "README").write_text("through the tunnel\n")
    (src / "blob.bin").write_bytes(os.urandom(300 * KiB))
    subprocess.run([*git, "-C", str(src), "add", "."], check=True)
    subprocess.run([*git, "-C", str(src), "commit", "-qm", "first"], check=True)
    subprocess.run([*git, "clone", "-q", "--bare", str(src), str(served / "repo.git")], check=True)
    subprocess.run(["git", "-C", str(served / "repo.git"), "update-server-info"], check=True)
    port = 8081
    assert rig.peer_ns is not None
    srv = rig.peer_ns.popen(
        [sys.executable, "-m", "http.server", "--bind", rig.peer_tunnel_v4, str(port),
         "--directory", str(served)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        for _ in range(100):
            r = rig.peer_ns.run(["curl", "-sS", "-o", "/dev/null",
                                 f"http://{rig.peer_tunnel_v4}:{port}/"], check=False)  # fmt: skip
            if r.returncode == 0:
                break
            time.sleep(0.1)
        dest = tmp_path / "clone"
        r = rig.client.run(
            [*git, "-c", f"http.proxy={daemon}", "clone", "-q",
             f"http://{rig.peer_tunnel_v4}:{port}/repo.git", str(dest)],
            check=False, timeout=120, env={**os.environ, "GIT_TERMINAL_PROMPT": "0"},
        )  # fmt: skip
        assert r.returncode == 0, r
        assert (dest / "README").read_text() == "through the tunnel\n"
        assert (dest / "blob.bin").read_bytes() == (src / "blob.bin").read_bytes()
    finally:
        srv.terminate()
        srv.wait(10)


def test_state_reports_the_proxy(module_rig: Rig, daemon: str, work: Path) -> None:
    """/state on the control socket lists the door with its flows and counters."""
    rig = module_rig
    r = rig_curl(rig, "-x", daemon, "-o", "/dev/null", rig.url("small.bin"))
    assert r.returncode == 0, r
    r = rig.client.run(
        ["curl", "-sS", "--unix-socket", str(work / "control.sock"), "http://localhost/state"]
    )
    doors = [f for f in json.loads(r.stdout)["frontends"] if f["kind"] == "http"]
    assert len(doors) == 1, r.stdout
    door = doors[0]
    assert door["address"] == f"127.0.0.1:{PROXY_PORT}" and door["auth"] is True
    assert door["flows"] >= 1 and door["requests"] >= 1 and door["connects"] >= 0
