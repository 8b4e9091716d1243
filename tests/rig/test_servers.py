"""servers.py on loopback (no root needed): HTTP, TCP echo, UDP echo, UDP sink and DNS behave
as the rig promises, including dual-stack binding and replies from the address that was hit."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from rig.servers import SINK_TAGS, UdpSink, dns_parse_reply, dns_query

SERVERS = Path(__file__).with_name("servers.py")
NAMES = {"web.wg.test": ["10.150.0.1", "fd15::1"], "v6.wg.test": {"AAAA": ["fd15::7"]}}


@dataclass
class Running:
    http: int
    tcpecho: int
    udpecho: int
    udpsink: int
    dns: int
    files: Path
    log: Path


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    d = tmp_path_factory.mktemp("srv")
    (d / "files").mkdir()
    (d / "files" / "a.bin").write_bytes(os.urandom(300_000))
    argv = [sys.executable, str(SERVERS), "all", "--http", "0", "--dir", str(d / "files")]
    argv += ["--tcpecho", "0", "--udpecho", "0", "--udpsink", "0"]
    argv += ["--dns", "0", "--names", json.dumps(NAMES)]
    proc = subprocess.Popen([*argv, "--log", str(d / "dns.log")], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        word, *ports = proc.stdout.readline().split()
        assert word == "READY"
        http, tcpecho, udpecho, udpsink, dns = map(int, ports)
        yield Running(http, tcpecho, udpecho, udpsink, dns, files=d / "files", log=d / "dns.log")
    finally:
        proc.terminate()
        proc.wait(5)


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_http_download_head_404(srv: Running, host: str) -> None:
    data = (srv.files / "a.bin").read_bytes()
    c = http.client.HTTPConnection(host, srv.http, timeout=5)
    c.request("GET", "/a.bin")
    r = c.getresponse()
    assert (r.status, r.read()) == (200, data)
    c.request("HEAD", "/a.bin")  # same keep-alive connection
    r = c.getresponse()
    assert (r.status, r.getheader("Content-Length"), r.read()) == (200, str(len(data)), b"")
    for path in ("/nope", "/../etc/passwd", "/.hidden"):
        c.request("GET", path)
        r = c.getresponse()
        r.read()
        assert r.status == 404, path
    c.request("GET", "/")
    assert json.loads(c.getresponse().read()) == ["a.bin"]


def test_http_upload(srv: Running) -> None:
    body = os.urandom(1_000_001)
    want = {"sha256": hashlib.sha256(body).hexdigest(), "length": len(body)}
    c = http.client.HTTPConnection("127.0.0.1", srv.http, timeout=5)
    c.request("PUT", "/upload", body=body)
    assert json.loads(c.getresponse().read()) == want
    chunks = iter([body[:7], body[7:500_000], body[500_000:]])
    c.request("POST", "/upload", body=chunks, encode_chunked=True)
    assert json.loads(c.getresponse().read()) == want


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_tcp_echo_reports_client_then_echoes(srv: Running, host: str) -> None:
    with socket.create_connection((host, srv.tcpecho), timeout=5) as s:
        f = s.makefile("rb")
        assert f.readline().decode() == f"{host} {s.getsockname()[1]}\n"
        s.sendall(b"x" * 100_000)
        s.shutdown(socket.SHUT_WR)
        assert f.read() == b"x" * 100_000


UDP_TARGETS = [(socket.AF_INET, "127.0.0.2"), (socket.AF_INET6, "::1")]


@pytest.mark.parametrize(("family", "host"), UDP_TARGETS)
def test_udp_echo_replies_from_the_address_hit(srv: Running, family: int, host: str) -> None:
    # 127.0.0.2 is not the address the kernel would pick as a source for 127.0.0.1: a reply
    # that passes the connected socket's filter proves the IP_PKTINFO path.
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.settimeout(2)
        s.connect((host, srv.udpecho))
        for size in (0, 1, 1472, 9000):
            msg = os.urandom(size)
            s.send(msg)
            assert s.recv(65535) == msg


def _sink_count(s: socket.socket, tag: bytes) -> dict[str, int]:
    s.send(b"?" + tag)
    return dict(json.loads(s.recv(65535)))


@pytest.mark.parametrize(("family", "host"), UDP_TARGETS)
def test_udp_sink_counts_distinct_and_bursts_on_request(
    srv: Running, family: int, host: str
) -> None:
    tag = os.urandom(8)
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.settimeout(2)
        s.connect((host, srv.udpsink))
        s.send(b"!ping")
        assert s.recv(100) == b"!ping"
        for seq in (0, 1, 2, 2, 7):  # one duplicate
            s.send(b"D" + tag + seq.to_bytes(4, "big") + b"pad")
        s.send(b"garbage")
        s.send(b"D" + tag)  # too short: ignored
        assert _sink_count(s, tag) == {"distinct": 4, "received": 5}
        assert _sink_count(s, os.urandom(8)) == {"distinct": 0, "received": 0}
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        s.send(b"B" + tag + (50).to_bytes(4, "big") + (300).to_bytes(2, "big"))
        got = [s.recv(65535) for _ in range(50)]
    assert {len(d) for d in got} == {300}
    assert {d[:9] for d in got} == {b"D" + tag}
    assert sorted(int.from_bytes(d[9:13], "big") for d in got) == list(range(50))


def test_udp_sink_forgets_the_oldest_tag() -> None:
    sink = UdpSink()
    tags = [i.to_bytes(8, "big") for i in range(SINK_TAGS + 1)]
    for tag in tags:
        assert sink.handle(b"D" + tag + bytes(4)) is None
    assert sink.handle(b"?" + tags[0]) == b'{"distinct": 0, "received": 0}'
    assert sink.handle(b"?" + tags[-1]) == b'{"distinct": 1, "received": 1}'
    burst = sink.handle(b"B" + tags[1] + bytes([0, 0, 0, 3, 0, 1]))  # size 1: the header only
    assert isinstance(burst, Iterator)
    assert list(burst) == [b"D" + tags[1] + i.to_bytes(4, "big") for i in range(3)]


def test_dns_udp_tcp_nxdomain_formerr_and_log(srv: Running) -> None:
    srv.log.unlink(missing_ok=True)
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as u:
        u.settimeout(2)
        u.connect(("::1", srv.dns))
        for (name, qtype), want in {
            ("web.wg.test", "A"): (0, ["10.150.0.1"]),
            ("Web.WG.test", "AAAA"): (0, ["fd15::1"]),
            ("v6.wg.test", "AAAA"): (0, ["fd15::7"]),
            ("v6.wg.test", "A"): (0, []),
            ("other.test", "AAAA"): (3, []),
        }.items():
            u.send(dns_query(name, qtype, qid=77))
            reply = u.recv(1500)
            assert reply[:2] == (77).to_bytes(2, "big")
            assert dns_parse_reply(reply) == want, name
        u.send(b"\x00\x01" + b"\xff" * 20)  # garbage: a FORMERR, not a crash
        assert u.recv(1500)[3] & 0xF == 1
    with socket.create_connection(("127.0.0.1", srv.dns), timeout=2) as t:
        f = t.makefile("rb")
        for qtype in ("A", "AAAA"):  # two queries on one connection
            q = dns_query("web.wg.test", qtype)
            t.sendall(len(q).to_bytes(2, "big") + q)
            _rcode, addrs = dns_parse_reply(f.read(int.from_bytes(f.read(2), "big")))
            assert len(addrs) == 1
    log = [json.loads(line) for line in srv.log.read_text().splitlines()]
    assert [e.get("name") for e in log] == [
        "web.wg.test", "web.wg.test", "v6.wg.test", "v6.wg.test", "other.test", None,
        "web.wg.test", "web.wg.test",
    ]  # fmt: skip
    assert [e["transport"] for e in log].count("tcp") == 2
    assert log[4]["rcode"] == "NXDOMAIN" and "error" in log[5]
    assert {e["client"] for e in log} == {"::1", "127.0.0.1"}
