"""The control socket without the rig: HTTP behaviour, paths, metrics text and `show`.

`HttpConn` is driven in memory with an h11 client on the other side (as h11's own tests join
a client and a server); the asyncio server runs on a real unix socket in a thread, against a
fake service (state(), a real BypassList, session.stats()). Another uid is a child process
that drops to 65534 before it connects (root only: CI runs as root).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h11
import pytest

from wrapguard.control import paths, server, show
from wrapguard.control.api import Api, render_metrics
from wrapguard.control.httpconn import HttpConn
from wrapguard.control.server import ControlStats
from wrapguard.errors import WrapguardError
from wrapguard.runtime.bypass import BypassList

PEER_KEY = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg="
NOT_ROOT = "needs root (a child that drops to uid 65534, chown to another user)"


class FakeSession:
    def stats(self) -> dict[str, object]:
        return {
            "wireguard_udp": {"rx_datagrams": 7, "tx_datagrams": 9, "send_errors": 1},
            "tunnel_drops": {"BAD_MAC": 2},
            "stack_drops": {},
            "unrouted_drops": 3,
            "channel": {"requests": 4, "bad_uid": 0, "malformed": 1},
        }


class FakeService:
    """What the control socket uses of TunnelService."""

    def __init__(self) -> None:
        self.bypass = BypassList()
        self.session = FakeSession()

    def state(self) -> dict[str, Any]:
        return {
            "interface": {
                "public_key": "OUR/KEY+base64=",
                "addresses": ["10.150.0.2/32", "fd15::2/128"],
                "listen_port": 40123,
                "mtu": 1420,
                "dns": [],
            },
            "peers": [
                {
                    "public_key": PEER_KEY,
                    "endpoint": "198.18.0.1:51820",
                    "configured_endpoint": "198.18.0.1:51820",
                    "allowed_ips": ["10.150.0.0/24", "fd15::/64"],
                    "latest_handshake": time.time() - 5,
                    "rx_bytes": 3 * 1024 + 512,
                    "tx_bytes": 100,
                    "persistent_keepalive": 25,
                    "transport": "udp",
                }
            ],
            "flows": {"tcp": 2, "udp": 1},
            "frontends": [
                {"kind": "preload", "address": "", "auth": False, "flows": 5},
                {"kind": "socks5", "address": "127.0.0.1:1080", "auth": True, "flows": 2},
            ],
            "bypass": self.bypass.entries(),
            "counters": self.session.stats(),
            "uptime_s": 12.5,
        }


# -- in memory: h11 on both sides ----------------------------------------------------------


def responses(data: bytes, n: int = 10) -> list[tuple[int, dict[str, str], bytes]]:
    """Up to n responses parsed from `data` (an h11 client primed with dummy requests)."""
    client = h11.Connection(h11.CLIENT)
    client.receive_data(data)  # no end of file: every answer of ours has a Content-Length
    out: list[tuple[int, dict[str, str], bytes]] = []
    while len(out) < n and client.our_state is h11.IDLE:
        client.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
        client.send(h11.EndOfMessage())
        status, headers, body = 0, {}, b""
        while True:
            event = client.next_event()
            if isinstance(event, h11.Response):
                status = event.status_code
                headers = {k.decode(): v.decode() for k, v in event.headers}
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
            elif event is h11.NEED_DATA or isinstance(event, h11.ConnectionClosed):
                return out
        out.append((status, headers, body))
        if client.our_state is h11.DONE and client.their_state is h11.DONE:
            client.start_next_cycle()
    return out


def request_bytes(method: str, target: str, body: bytes | None = None, **headers: str) -> bytes:
    client = h11.Connection(h11.CLIENT)
    hdrs = [("host", "localhost"), *headers.items()]
    if body is not None:
        hdrs.append(("content-length", str(len(body))))
    out = client.send(h11.Request(method=method, target=target, headers=hdrs))
    if body:
        out += client.send(h11.Data(data=body))
    return out + client.send(h11.EndOfMessage())


@pytest.fixture
def api() -> tuple[FakeService, Api, ControlStats]:
    service = FakeService()
    stats = ControlStats()
    return service, Api(service, stats), stats  # type: ignore[arg-type]


def conn_for(api: tuple[FakeService, Api, ControlStats]) -> HttpConn:
    return HttpConn(api[1].handle, api[2])


def test_keep_alive_and_pipelining(api: Any) -> None:
    conn = conn_for(api)
    first = responses(conn.receive(request_bytes("GET", "/state")))
    assert [r[0] for r in first] == [200]
    state = json.loads(first[0][2])
    assert state["peers"][0]["public_key"] == PEER_KEY
    assert first[0][1]["content-type"] == "application/json"
    assert not conn.closing
    # The same connection, two more requests in one write (pipelined).
    both = request_bytes("GET", "/bypass") + request_bytes("GET", "/metrics")
    got = responses(conn.receive(both))
    assert [r[0] for r in got] == [200, 200]
    assert json.loads(got[0][2]) == []
    assert got[1][1]["content-type"].startswith("text/plain; version=0.0.4")
    assert not conn.closing


def test_bypass_add_list_clear(api: Any) -> None:
    service, _, _ = api
    service.bypass.set_automatic(__import__("ipaddress").ip_network("198.18.0.1/32"), "endpoint")
    conn = conn_for(api)
    body = json.dumps(["10.150.0.1", "fd15::/64"]).encode()
    [(status, _, answer)] = responses(conn.receive(request_bytes("POST", "/bypass", body)))
    assert status == 200
    cidrs = [e["cidr"] for e in json.loads(answer)]
    assert cidrs == ["198.18.0.1/32", "10.150.0.1/32", "fd15::/64"]
    body = json.dumps({"add": ["192.0.2.0/24"]}).encode()
    [(status, _, answer)] = responses(conn.receive(request_bytes("POST", "/bypass", body)))
    assert status == 200 and json.loads(answer)[-1]["cidr"] == "192.0.2.0/24"
    assert service.bypass.contains(__import__("ipaddress").ip_address("10.150.0.1"))
    [(status, _, answer)] = responses(conn.receive(request_bytes("DELETE", "/bypass")))
    assert status == 200
    assert json.loads(answer) == [
        {"cidr": "198.18.0.1/32", "automatic": True, "reason": "endpoint"}
    ]
    assert not service.bypass.contains(__import__("ipaddress").ip_address("10.150.0.1"))


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b'["10.150.0.1", "not-an-ip"]', "not-an-ip"),
        (b'["10.150.0.1", 42]', "42"),
        (b'{"remove": ["10.0.0.1"]}', "JSON list"),
        (b'"10.150.0.1"', "JSON list"),
        (b"[10.150", "not JSON"),
        (b"\xff\xfe\x00garbage", "not JSON"),
        (b"[" * 50000, "not JSON"),
        (b"", "empty body"),
    ],
    ids=["bad-entry", "number", "wrong-key", "string", "truncated", "binary", "deep", "empty"],
)
def test_bad_bypass_body_is_400_and_adds_nothing(api: Any, body: bytes, needle: str) -> None:
    service, _, _ = api
    conn = conn_for(api)
    [(status, headers, answer)] = responses(conn.receive(request_bytes("POST", "/bypass", body)))
    assert status == 400
    assert headers["content-type"] == "application/json"
    error = json.loads(answer)
    assert needle in error["error"]
    if needle in ("not-an-ip", "42"):
        assert str(error["entry"]) == needle  # the bad entry is named
    assert service.bypass.entries() == []  # all or nothing
    assert not conn.closing  # a bad body is not a broken connection
    [(status, _, _)] = responses(conn.receive(request_bytes("GET", "/state")))
    assert status == 200


def test_unknown_path_404_and_wrong_method_405(api: Any) -> None:
    conn = conn_for(api)
    got = responses(
        conn.receive(
            request_bytes("GET", "/nope")
            + request_bytes("PUT", "/bypass", b"[]")
            + request_bytes("POST", "/state", b"{}")
            + request_bytes("GET", "http://localhost/state?x=1")  # absolute form, a query
        )
    )
    assert [r[0] for r in got] == [404, 405, 405, 200]
    assert "/nope" in json.loads(got[0][2])["error"]
    assert got[1][1]["allow"] == "GET, HEAD, POST, DELETE"
    assert "PUT" in json.loads(got[1][2])["error"]
    assert got[2][1]["allow"] == "GET, HEAD"
    head = conn.receive(request_bytes("HEAD", "/metrics") + request_bytes("GET", "/nope"))
    headers, _, rest = head.partition(b"\r\n\r\n")
    assert headers.startswith(b"HTTP/1.1 200 OK") and b"content-length: " in headers
    assert rest.startswith(b"HTTP/1.1 404 Not Found\r\n")  # no body after the HEAD answer


@pytest.mark.parametrize(
    "raw",
    [
        b"GARBAGE\r\n\r\n",
        b"GET /state HTTP/1.1\r\n\r\n",  # no Host (RFC 9112 3.2)
        b"GET /state HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n",
        b"GET /state HTTP/1.1\r\nHost: x\r\nbad header line\r\n\r\n",
        b"\x00\x01\x02\x03\r\n\r\n",
        b"GET /state HTTP/9.9\r\nHost: x\r\n\r\n",
    ],
    ids=["garbage", "no-host", "bad-length", "bad-header", "binary", "bad-version"],
)
def test_malformed_request_gets_400_then_close(api: Any, raw: bytes) -> None:
    _, _, stats = api
    conn = conn_for(api)
    got = responses(conn.receive(raw))
    assert got and got[0][0] in (400, 505), got
    assert "malformed request" in json.loads(got[0][2])["error"] or got[0][0] == 505
    assert got[0][1].get("connection") == "close"
    assert conn.closing and stats.bad_request == 1
    assert conn.receive(b"GET /state HTTP/1.1\r\nHost: x\r\n\r\n") == b""  # nothing more


def test_huge_body_413_before_reading_it(api: Any) -> None:
    service, _, stats = api
    conn = conn_for(api)
    head = b"POST /bypass HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\n"
    [(status, headers, answer)] = responses(conn.receive(head + b"[" * 1000))
    assert status == 413 and "body over" in json.loads(answer)["error"]
    assert headers["connection"] == "close" and conn.closing and stats.bad_request == 1
    # Chunked: no length up front; stopped as soon as it grows past the bound.
    conn = conn_for(api)
    out = conn.receive(b"POST /bypass HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    chunk = b"%x\r\n%s\r\n" % (60000, b" " * 60000)
    for _ in range(server.MAX_BODY // 60000 + 1):
        out += conn.receive(chunk)
    [(status, _, _)] = responses(out)
    assert status == 413 and conn.closing
    assert service.bypass.entries() == []


def test_huge_head_431(api: Any) -> None:
    conn = conn_for(api)
    raw = b"GET /state HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * (server.MAX_HEAD + 10)
    [(status, _, _)] = responses(conn.receive(raw))
    assert status == 431 and conn.closing


def test_expect_100_continue(api: Any) -> None:
    conn = conn_for(api)
    head = b"POST /bypass HTTP/1.1\r\nHost: x\r\nContent-Length: 14\r\nExpect: 100-continue\r\n\r\n"
    first = conn.receive(head)
    assert first.startswith(b"HTTP/1.1 100 ")
    out = conn.receive(b'["10.150.0.1"]')
    assert out.startswith(b"HTTP/1.1 200 ")


def test_handler_bug_is_500_not_a_crash(api: Any) -> None:
    service, _, _ = api
    service.state = lambda: 1 / 0
    conn = conn_for(api)
    [(status, _, answer)] = responses(conn.receive(request_bytes("GET", "/state")))
    assert status == 500 and "ZeroDivisionError" in json.loads(answer)["error"]


# -- Prometheus text --------------------------------------------------------------------------

SAMPLE = re.compile(
    r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)"
    r'(?:\{(?P<labels>(?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*",?)*)\})?'
    r" (?P<value>[-+]?(?:[0-9]+(?:\.[0-9]*)?(?:[eE][-+]?[0-9]+)?|NaN|[-+]Inf))$"
)
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"')


def parse_prometheus(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """A strict reader of the text exposition format 0.0.4: every sample line is
    `name{labels} value`, each family has # HELP and # TYPE before its samples."""
    assert text.endswith("\n")
    families: dict[str, list[tuple[dict[str, str], float]]] = {}
    typed: dict[str, str] = {}
    helped: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# HELP "):
            helped.add(line.split(" ", 3)[2])
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in ("counter", "gauge", "histogram", "summary", "untyped"), line
            assert name not in typed, f"TYPE twice for {name}"
            typed[name] = kind
        elif line.startswith("#"):
            continue
        else:
            m = SAMPLE.match(line)
            assert m, f"not a Prometheus sample line: {line!r}"
            name = m["name"]
            assert name in typed and name in helped, f"{name} has no # TYPE/# HELP before it"
            labels = dict(LABEL.findall(m["labels"] or ""))
            families.setdefault(name, []).append((labels, float(m["value"])))
    return families


def test_metrics_text_parses(api: Any) -> None:
    _, handler, _ = api
    reply = handler.handle("GET", "/metrics", b"")
    assert reply.content_type == "text/plain; version=0.0.4; charset=utf-8"
    fams = parse_prometheus(reply.body.decode())
    assert fams["wrapguard_peer_rx_bytes"] == [({"peer": PEER_KEY}, 3584.0)]
    assert fams["wrapguard_peer_tx_bytes"] == [({"peer": PEER_KEY}, 100.0)]
    [(labels, when)] = fams["wrapguard_peer_latest_handshake_seconds"]
    assert labels == {"peer": PEER_KEY} and abs(when - (time.time() - 5)) < 60
    assert dict((lb["proto"], v) for lb, v in fams["wrapguard_flows"]) == {"tcp": 2, "udp": 1}
    kinds = {lb["kind"]: v for lb, v in fams["wrapguard_frontend_flows_total"]}
    assert kinds == {"preload": 5, "socks5": 2}
    drops = {(lb["layer"], lb["reason"]): v for lb, v in fams["wrapguard_drops_total"]}
    assert drops[("tunnel", "bad_mac")] == 2
    assert drops[("engine", "unrouted")] == 3
    assert drops[("channel", "malformed")] == 1
    assert drops[("wireguard_udp", "send_errors")] == 1
    assert ("channel", "requests") not in drops  # work done is not a drop
    assert drops[("control", "other_uid")] == 0


def test_metrics_escape_label_values() -> None:
    state = FakeService().state()
    state["peers"][0]["public_key"] = 'a"b\\c\nd'
    text = render_metrics(state, ControlStats())
    fams = parse_prometheus(text)
    assert fams["wrapguard_peer_rx_bytes"][0][0]["peer"] == 'a\\"b\\\\c\\nd'


def test_parser_rejects_bad_text() -> None:  # the checker above can fail
    with pytest.raises(AssertionError):
        parse_prometheus("# HELP x y\n# TYPE x gauge\nx{a=b} 1\n")
    with pytest.raises(AssertionError):
        parse_prometheus("x 1\n")


# -- on a real unix socket ----------------------------------------------------------------------


class Running:
    """The control server on its own loop in a thread."""

    def __init__(self, service: FakeService, path: str, **kwargs: Any) -> None:
        self.service = service
        self.path = path
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.door = self.call(server.start(service, path, **kwargs))  # type: ignore[arg-type]

    def call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def close(self) -> None:
        self.call(self.door.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="wgctl-"))  # short: sun_path is 108 bytes
    try:
        yield d
    finally:
        subprocess.run(["rm", "-rf", str(d)], check=False)


@pytest.fixture
def running(sock_dir: Path) -> Iterator[Running]:
    r = Running(FakeService(), str(sock_dir / "run" / "wg0.sock"), idle_timeout=1.0)
    try:
        yield r
    finally:
        r.close()


def connect(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(path)
    return s


def read_all(s: socket.socket) -> bytes:
    data = b""
    with contextlib.suppress(OSError):
        while chunk := s.recv(65536):
            data += chunk
    return data


def test_socket_file_and_directory_modes(running: Running) -> None:
    st = os.lstat(running.path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    parent = os.stat(os.path.dirname(running.path))
    assert stat.S_IMODE(parent.st_mode) == 0o700 and parent.st_uid == os.geteuid()
    assert running.door.address == running.path
    running.call(running.door.close())
    assert not os.path.lexists(running.path)  # close() removes the socket file


def test_keep_alive_over_the_socket_and_idle_timeout(running: Running) -> None:
    s = connect(running.path)
    for _ in range(3):
        s.sendall(request_bytes("GET", "/state"))
        data = b""
        while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
            data += s.recv(65536)
        assert data.startswith(b"HTTP/1.1 200 OK\r\n")
    # Silent for longer than the idle timeout (1 s here): the server closes.
    s.settimeout(15)
    assert s.recv(10) == b""
    s.close()


def test_server_survives_garbage_and_abrupt_clients(running: Running) -> None:
    for raw in (b"\x16\x03\x01garbage\r\n\r\n", b"GET /state HTTP/1.1\r\nHost", b"x" * 100000):
        s = connect(running.path)
        with contextlib.suppress(OSError):
            s.sendall(raw)
        s.close()  # half a request, then gone
    s = connect(running.path)
    s.sendall(b"NOT HTTP AT ALL\r\n\r\n")
    got = responses(read_all(s))
    assert got[0][0] == 400
    assert show.request(running.path)["peers"][0]["public_key"] == PEER_KEY


def test_huge_body_over_the_socket(running: Running) -> None:
    s = connect(running.path)
    body = json.dumps(["10.150.0.1"] * 100000).encode()
    assert len(body) > server.MAX_BODY
    head = b"POST /bypass HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body)
    with contextlib.suppress(OSError):  # the server may close before it all went
        s.sendall(head + body)
    got = responses(read_all(s))
    assert got and got[0][0] == 413
    assert running.service.bypass.entries() == []


def test_curl_post_and_delete(running: Running) -> None:
    def curl(*args: str) -> Any:
        r = subprocess.run(
            ["curl", "-sS", "--unix-socket", running.path, *args],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    assert curl("-d", '["10.150.0.1"]', "http://localhost/bypass") == [
        {"cidr": "10.150.0.1/32", "automatic": False}
    ]
    assert curl("http://localhost/bypass")[0]["cidr"] == "10.150.0.1/32"
    assert "not an IP" in curl("-d", '["nope"]', "http://localhost/bypass")["error"]
    assert curl("-X", "DELETE", "http://localhost/bypass") == []


def test_stale_socket_replaced_live_one_refused(sock_dir: Path) -> None:
    path = str(sock_dir / "s.sock")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)  # bound, never listening: what a killed run leaves
    stale.close()
    r = Running(FakeService(), path)
    try:
        assert show.request(path)["flows"]["tcp"] == 2
        with pytest.raises(WrapguardError, match="in use by another wrapguard"):
            r.call(server.start(FakeService(), path))  # type: ignore[arg-type]
        assert show.request(path)["flows"]["tcp"] == 2  # the live one was left alone
    finally:
        r.close()
    Path(path).write_text("not a socket")
    with pytest.raises(WrapguardError, match="not a socket"):
        asyncio.run(server.start(FakeService(), path))  # type: ignore[arg-type]
    assert Path(path).read_text() == "not a socket"


def test_parent_writable_by_others_refused(sock_dir: Path) -> None:
    d = sock_dir / "open"
    d.mkdir()
    d.chmod(0o777)
    with pytest.raises(WrapguardError, match="writable by other users") as info:
        asyncio.run(server.start(FakeService(), str(d / "x.sock")))  # type: ignore[arg-type]
    assert "\n" not in str(info.value)
    assert not (d / "x.sock").exists()


def test_path_too_long_refused(sock_dir: Path) -> None:
    with pytest.raises(WrapguardError, match="longer than a unix socket allows"):
        asyncio.run(server.start(FakeService(), str(sock_dir / ("x" * 120))))  # type: ignore[arg-type]


@pytest.mark.skipif(os.geteuid() != 0, reason=NOT_ROOT)
def test_parent_owned_by_another_user_refused(sock_dir: Path) -> None:
    d = sock_dir / "theirs"
    d.mkdir(mode=0o755)
    os.chown(d, 65534, 65534)
    with pytest.raises(WrapguardError, match="owned by uid 65534"):
        asyncio.run(server.start(FakeService(), str(d / "x.sock")))  # type: ignore[arg-type]


AS_NOBODY = textwrap.dedent(
    """
    import json, os, socket, sys
    os.setgroups([]); os.setgid(65534); os.setuid(65534)
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    try:
        s.connect(sys.argv[1])
    except OSError as e:
        print(json.dumps({"connect": e.errno})); sys.exit()
    try:
        s.sendall(b"GET /state HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n")
        data = s.recv(65536)
    except OSError as e:
        data = repr(e).encode()
    print(json.dumps({"connect": 0, "got": data.decode(errors="replace")}))
    """
)


def as_nobody(path: str) -> dict[str, Any]:
    r = subprocess.run(
        [sys.executable, "-c", AS_NOBODY, path], capture_output=True, text=True, timeout=30
    )
    assert r.returncode == 0, r.stderr
    result: dict[str, Any] = json.loads(r.stdout)
    return result


@pytest.mark.skipif(os.geteuid() != 0, reason=NOT_ROOT)
def test_another_uid_refused(running: Running) -> None:
    # The modes stop it first: a 0700 directory, a 0600 socket.
    assert as_nobody(running.path)["connect"] != 0
    # With the modes opened up, SO_PEERCRED still does: closed at once, not a byte of state.
    os.chmod(os.path.dirname(os.path.dirname(running.path)), 0o755)
    os.chmod(os.path.dirname(running.path), 0o755)
    os.chmod(running.path, 0o666)
    result = as_nobody(running.path)
    assert result["connect"] == 0
    assert "HTTP" not in result["got"] and PEER_KEY not in result["got"], result
    assert running.door.stats.other_uid == 1
    assert show.request(running.path)["peers"][0]["public_key"] == PEER_KEY  # still ours


# -- paths ----------------------------------------------------------------------------------


@pytest.fixture
def temp_base(sock_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    base = sock_dir / "tmp"
    base.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(base))
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    return base


def test_default_path_xdg(temp_base: Path, sock_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    xdg = sock_dir / "xdg"
    xdg.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(xdg))
    assert paths.default_control_path("/etc/wireguard/wg0.conf") == f"{xdg}/wrapguard/wg0.sock"
    xdg.chmod(0o777)  # not usable: writable by others
    fallback = f"{temp_base}/wrapguard-{os.geteuid()}/wg0.sock"
    assert paths.default_control_path("wg0.conf") == fallback
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(sock_dir / "missing"))
    assert paths.default_control_path("wg0.conf") == fallback
    monkeypatch.setenv("XDG_RUNTIME_DIR", "relative/dir")
    assert paths.default_control_path("wg0.conf") == fallback


@pytest.mark.skipif(os.geteuid() != 0, reason=NOT_ROOT)
def test_default_path_xdg_of_another_user(
    temp_base: Path, sock_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    xdg = sock_dir / "xdg"
    xdg.mkdir(mode=0o700)
    os.chown(xdg, 65534, 65534)  # after `su` without `-`: still the other user's
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(xdg))
    assert paths.default_control_path("a.conf").startswith(f"{temp_base}/wrapguard-")


def test_default_path_temp_dir(temp_base: Path) -> None:
    own = temp_base / f"wrapguard-{os.geteuid()}"
    path = paths.default_control_path("/x/y/office.conf")
    assert path == f"{own}/office.sock"
    assert paths.default_control_path("-") == f"{own}/wrapguard.sock"
    asyncio.run(_start_close(path))  # the server makes the directory 0700
    assert stat.S_IMODE(os.stat(own).st_mode) == 0o700
    own.chmod(0o755)  # ours, but not private: refused
    with pytest.raises(WrapguardError, match="not private"):
        paths.default_control_path("office.conf")
    with pytest.raises(WrapguardError, match="not private"):
        asyncio.run(_start_close(path))
    own.rmdir()
    os.symlink(temp_base, own)  # planted link
    with pytest.raises(WrapguardError, match="symbolic link"):
        paths.default_control_path("office.conf")


async def _start_close(path: str) -> None:
    door = await server.start(FakeService(), path)  # type: ignore[arg-type]
    await door.close()


def test_find_control_socket(temp_base: Path) -> None:
    assert paths.find_control_socket() == []
    a = Running(FakeService(), paths.default_control_path("a.conf"))
    b = Running(FakeService(), paths.default_control_path("b.conf"))
    try:
        own = temp_base / f"wrapguard-{os.geteuid()}"
        (own / "notes.txt").write_text("x")
        assert paths.find_control_socket() == [str(own / "a.sock"), str(own / "b.sock")]
    finally:
        a.close()
        b.close()
    assert paths.find_control_socket() == []


# -- wrapguard show --------------------------------------------------------------------------


def test_render_like_wg_show() -> None:
    state = FakeService().state()
    state["bypass"] = [
        {"cidr": "10.150.0.1/32", "automatic": False},
        {"cidr": "198.18.0.1/32", "automatic": True, "reason": "peer endpoint"},
    ]
    text = show.render(state, now=state["peers"][0]["latest_handshake"] + 65)
    assert "interface: wrapguard\n  public key: OUR/KEY+base64=\n  listening port: 40123\n" in text
    assert f"\npeer: {PEER_KEY}\n  endpoint: 198.18.0.1:51820\n" in text
    assert "  allowed ips: 10.150.0.0/24, fd15::/64\n" in text
    assert "  latest handshake: 1 minute, 5 seconds ago\n" in text
    assert "  transfer: 3.50 KiB received, 100 B sent\n" in text
    assert "  persistent keepalive: every 25 seconds\n" in text
    assert "  transport: udp\n" in text
    assert "  socks5 127.0.0.1:1080 (2 flows, password)\n" in text
    assert "  198.18.0.1/32 (automatic: peer endpoint)\n" in text
    assert text.endswith("flows: 2 tcp, 1 udp\n")
    assert show.ago(5) == "5 seconds ago" and show.ago(3661) == "1 hour, 1 minute, 1 second ago"
    assert show.size(5 * 1024**3) == "5.00 GiB"


def test_show_main(running: Running, capsys: pytest.CaptureFixture[str]) -> None:
    assert show.main(running.path) == 0
    out, err = capsys.readouterr()
    assert f"peer: {PEER_KEY}" in out and "endpoint: 198.18.0.1:51820" in out and err == ""


def test_show_unreachable_one_line(sock_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert show.main(str(sock_dir / "none.sock")) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "cannot reach the control socket" in err
    bogus = socket.socket(socket.AF_UNIX)  # something that is not us answers
    bogus.bind(str(sock_dir / "bogus.sock"))
    bogus.listen()

    def answer() -> None:
        c, _ = bogus.accept()
        c.recv(1000)
        c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
        c.close()

    t = threading.Thread(target=answer, daemon=True)
    t.start()
    assert show.main(str(sock_dir / "bogus.sock")) == 1
    t.join(10)
    bogus.close()
    _, err = capsys.readouterr()
    assert err.count("\n") == 1 and "not JSON" in err and "Traceback" not in err


def test_show_finds_the_one_running(temp_base: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert show.main(None) == 1
    assert "no running wrapguard found" in capsys.readouterr().err
    a = Running(FakeService(), paths.default_control_path("a.conf"))
    try:
        assert show.main(None) == 0
        assert f"peer: {PEER_KEY}" in capsys.readouterr().out
        b = Running(FakeService(), paths.default_control_path("b.conf"))
        try:
            assert show.main(None) == 1
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and "a.sock" in err and "b.sock" in err
        finally:
            b.close()
    finally:
        a.close()
