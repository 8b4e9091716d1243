"""End to end, DNS: with DNS= set, names resolve through the tunnel and never on the host.

The rig's DNS server behind the peer (10.150.0.1:53) serves web.wg.test (A + AAAA),
v4only.wg.test and v6only.wg.test; the client namespace's own resolver (127.0.0.1:53, its
/etc/resolv.conf) logs every query it gets: any entry there is a leak. Checked: curl, Python
(getaddrinfo, gethostbyname, create_connection) and node (dns.lookup, http.get) resolve and
fetch through the tunnel; an unknown name gives the usual "could not resolve" error; search
domains from non-IP DNS= entries apply; without DNS= the host resolver is used.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import sys
from ipaddress import IPv4Address, IPv6Address, ip_address
from pathlib import Path
from typing import Any

from rig.harness import Rig
from runtime.wraphelp import explain, last_json, py, run_wrapped

from wrapguard.netstack.events import Connected, ConnId, DatagramReceived, Readable, SockId
from wrapguard.runtime.dns import (
    EAI_AGAIN,
    EAI_NODATA,
    EAI_NONAME,
    DnsResolver,
    ResolveError,
)
from wrapguard.wire.dns import FLAG_QR, FLAG_TC, Message, Rcode, Record, RType, parse_message
from wrapguard.wire.dns import emit_message as emit_dns

PYTHON_LOOKUPS = """
import json, socket, sys
P4, P6, HTTP = sys.argv[1], sys.argv[2], int(sys.argv[3])
res = {}
def gai(name, *args, **kw):
    try:
        return sorted({a[4][0] for a in socket.getaddrinfo(name, HTTP, *args, **kw)})
    except socket.gaierror as e:
        return f"gaierror {e.errno}"
res["both"] = gai("web.wg.test", type=socket.SOCK_STREAM)
res["v4"] = gai("web.wg.test", socket.AF_INET)
res["v6"] = gai("web.wg.test", socket.AF_INET6)
res["v4only_as_v6"] = gai("v4only.wg.test", socket.AF_INET6)
res["search"] = gai("v6only")
res["missing"] = gai("nothere.wg.test")
res["numeric"] = gai("10.150.0.1")
res["localhost"] = gai("localhost", socket.AF_INET)
res["ghbn"] = socket.gethostbyname("v4only.wg.test")
res["ghbn_ex"] = socket.gethostbyname_ex("web.wg.test")[2]
res["canon"] = socket.getaddrinfo("web.wg.test", 80, 2, 0, 0, socket.AI_CANONNAME)[0][3]
res["gni"] = socket.getnameinfo((P4, 80), 0)[0]
try:
    res["ghba"] = socket.gethostbyaddr(P4)[0]
except socket.herror as e:
    res["ghba"] = f"herror {e.errno}"
res["entries"] = len(socket.getaddrinfo("web.wg.test", "http", socket.AF_INET))
# A program speaking DNS itself over UDP to the configured server: the UDP path.
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.settimeout(5)
q = "abcd01000001000000000000" + "0676346f6e6c7902776704746573740000010001"  # v4only.wg.test A
u.sendto(bytes.fromhex(q), (P4, 53))
reply = u.recv(512)
res["raw"] = [reply[:2].hex(), socket.inet_ntoa(reply[-4:])]
s = socket.create_connection(("web.wg.test", HTTP), timeout=10)
s.sendall(b"GET /nothing HTTP/1.0\\r\\n\\r\\n")
res["http"] = s.makefile("rb").readline().decode().split()[:2]
res["peer"] = s.getpeername()[0]
print(json.dumps(res))
"""

NODE_LOOKUPS = """
const dns = require("dns"), http = require("http");
const port = Number(process.argv[2]), file = process.argv[3];
dns.lookup("web.wg.test", {all: true}, (err, addrs) => {
  if (err) { console.log(JSON.stringify({error: err.code})); return; }
  http.get({host: "v4only.wg.test", port, path: "/" + file}, (res) => {
    let n = 0;
    res.on("data", (d) => { n += d.length; });
    res.on("end", () => dns.lookup("nothere.wg.test", (e2) => {
      console.log(JSON.stringify({addrs: addrs.map((a) => a.address).sort(), status: res.statusCode,
                                  bytes: n, missing: e2 && e2.code}));
    }));
  }).on("error", (e) => console.log(JSON.stringify({error: e.code})));
});
"""


def dns_conf(rig: Rig, path: Path) -> Path:
    return rig.write_client_config(path, dns=True, interface_lines=["DNS = wg.test"])


def test_python_resolves_through_the_tunnel_and_never_on_the_host(rig: Rig, tmp_path: Path) -> None:
    conf = dns_conf(rig, tmp_path / "c.conf")
    p4, p6 = rig.peer_tunnel_v4, rig.peer_tunnel_v6
    argv = [*py(PYTHON_LOOKUPS), p4, p6, str(rig.http_port)]
    r = run_wrapped(rig.client, conf, argv, timeout=60)
    assert r.returncode == 0, explain(r)
    out = last_json(r.stdout)
    assert out["both"] == sorted([p4, p6]), out
    assert out["v4"] == [p4] and out["v6"] == [p6], out
    assert out["v4only_as_v6"] == "gaierror -5", out  # EAI_NODATA, as glibc says
    assert out["search"] == [p6], out
    assert out["missing"] == f"gaierror {-2}", out  # EAI_NONAME: "Name or service not known"
    assert out["numeric"] == [p4] and out["localhost"] == ["127.0.0.1"], out
    assert out["ghbn"] == p4 and out["ghbn_ex"] == [p4], out
    assert out["canon"] == "web.wg.test", out
    assert out["gni"] == p4 and out["ghba"] == "herror 1", out  # reverse: numeric, no PTR
    assert out["entries"] == 1, out
    assert out["raw"] == ["abcd", p4], out  # service "http" resolved, one address, one socktype
    assert out["http"][0].startswith("HTTP/") and out["peer"] in (p4, p6), out
    assert rig.client_dns_log() == [], "a query reached the host resolver"
    log = rig.dns_log()
    asked = {(q["name"], q["qtype"]) for q in log}
    assert {("web.wg.test", "A"), ("web.wg.test", "AAAA")} <= asked, log
    # "v6only" has no dot: the search domain from DNS = wg.test applied.
    assert ("v6only.wg.test", "AAAA") in asked, log
    assert ("nothere.wg.test", "A") in asked, log
    assert {q["client"] for q in log} == {rig.our_tunnel_v4}, log  # through the tunnel only


def test_curl_and_node_resolve_through_the_tunnel(rig: Rig, tmp_path: Path) -> None:
    conf = dns_conf(rig, tmp_path / "c.conf")
    name = sorted(rig.files)[0]
    size, _ = rig.files[name]
    url = f"http://web.wg.test:{rig.http_port}/{name}"
    r = run_wrapped(
        rig.client, conf, ["curl", "-sS", "-o", "/dev/null", "-w", "%{size_download}", url]
    )
    assert r.returncode == 0, explain(r)
    assert r.stdout.strip() == str(size), explain(r)
    r = run_wrapped(rig.client, conf, ["curl", "-sS", f"http://nothere.wg.test:{rig.http_port}/"])
    assert r.returncode == 6, explain(r)  # CURLE_COULDNT_RESOLVE_HOST
    assert "resolve" in r.stderr.lower(), explain(r)
    node = shutil.which("node")
    assert node is not None, "node is installed on CI"
    script = tmp_path / "lookup.js"
    script.write_text(NODE_LOOKUPS)
    r = run_wrapped(rig.client, conf, [node, str(script), str(rig.http_port), name])
    assert r.returncode == 0, explain(r)
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out == {
        "addrs": sorted([rig.peer_tunnel_v4, rig.peer_tunnel_v6]),
        "status": 200,
        "bytes": size,
        "missing": "ENOTFOUND",
    }, out
    assert rig.client_dns_log() == [], "a query reached the host resolver"


def test_without_dns_the_host_resolver_is_used(rig: Rig, tmp_path: Path) -> None:
    conf = rig.write_client_config(tmp_path / "c.conf")
    code = """
        import socket
        try:
            print(socket.getaddrinfo("web.wg.test", 80)[0][4][0])
        except socket.gaierror as e:
            print("gaierror")
    """
    r = run_wrapped(rig.client, conf, [sys.executable, "-c", code.replace("\n        ", "\n")])
    assert r.returncode == 0, explain(r)
    assert r.stdout.strip() == "gaierror", explain(r)  # the host resolver knows no such name
    assert rig.client_dns_log(), "the host resolver was not asked"
    assert rig.dns_log() == []
    assert "names resolve on the host" in r.stderr, explain(r)


# -- the resolver on its own, against a fake engine (no rig, no root) ---------------------------

S1, S2, OFF = ip_address("10.150.0.1"), ip_address("10.150.0.53"), ip_address("192.0.2.53")
ZONE: dict[str, list[Any]] = {
    "web.wg.test": [IPv4Address("10.150.0.7"), IPv6Address("fd15::7")],
    "v4.wg.test": [IPv4Address("10.150.0.8")],
    "big.wg.test": [IPv4Address(f"10.150.1.{i}") for i in range(1, 5)],
}


class FakeStack:
    def __init__(self, engine: FakeEngine) -> None:
        self.engine = engine

    def udp_bind(self, port: int = 0) -> SockId:
        return SockId(1)

    def udp_close(self, sock: SockId) -> None:
        pass

    def udp_send(self, sock: SockId, dst: Any, data: bytes, now: float) -> None:
        self.engine.udp_query(dst[0], data)

    def send(self, cid: ConnId, data: bytes, now: float) -> int:
        query = parse_message(data[2:])
        reply = self.engine.reply(query, tcp=True)
        self.engine.tcp_buf = len(reply).to_bytes(2, "big") + reply
        self.engine.deliver(self.engine.tcp_handler, Readable(cid))
        return len(data)

    def recv(self, cid: ConnId, max_bytes: int = 1 << 20) -> bytes:
        data, self.engine.tcp_buf = self.engine.tcp_buf, b""
        return data

    def close(self, cid: ConnId, now: float) -> None:
        pass

    abort = close


class FakeEngine:
    """Servers S1 and S2 inside the tunnel; `silent` servers never answer."""

    def __init__(self, silent: set[Any] = frozenset(), truncate: bool = False) -> None:  # type: ignore[assignment]
        self.stack = FakeStack(self)
        self.handlers: dict[int, Any] = {}
        self.silent, self.truncate = silent, truncate
        self.queries: list[tuple[str, str, int]] = []
        self.tcp_handler: Any = None
        self.tcp_buf = b""

    def route(self, ip: Any, proto: int, port: int | None) -> int | None:
        return 0 if str(ip).startswith("10.150.") else None

    def now(self) -> float:
        return 0.0

    def abort(self, cid: Any) -> None:  # as Engine.abort: reset, gone is fine, then flush
        with contextlib.suppress(OSError, KeyError):
            self.stack.abort(cid, self.now())
        self.schedule_flush()

    def schedule_flush(self) -> None:
        pass

    def deliver(self, handler: Any, event: Any) -> None:
        asyncio.get_running_loop().call_soon(handler.on_event, event)

    def reply(self, query: Message, tcp: bool = False) -> bytes:
        q = query.questions[0]
        addrs = ZONE.get(q.name.lower())
        rtype = 1 if q.qtype == RType.A else 28
        found = [a for a in addrs or [] if (a.version == 4) == (rtype == 1)]
        flags = FLAG_QR | (Rcode.NXDOMAIN if addrs is None else 0)
        if self.truncate and not tcp and found:
            return emit_dns(Message(query.ident, flags | FLAG_TC, query.questions))
        answers = tuple(Record(q.name, rtype, 1, 60, a) for a in found)
        return emit_dns(Message(query.ident, flags, query.questions, answers))

    def udp_query(self, server: Any, data: bytes) -> None:
        query = parse_message(data)
        q = query.questions[0]
        self.queries.append((str(server), q.name, q.qtype))
        if server not in self.silent:
            event = DatagramReceived(SockId(1), (server, 53), self.reply(query))
            self.deliver(self.handlers[1], event)

    def connect(self, dst: Any, port: int, handler: Any) -> ConnId:
        self.tcp_handler = handler
        self.queries.append((str(dst), "tcp", port))
        self.deliver(handler, Connected(ConnId(9)))
        return ConnId(9)


def resolve(engine: FakeEngine, name: str, family: int = 0, **kw: Any) -> Any:
    async def main() -> Any:
        r = DnsResolver(engine, [S1, S2, OFF], **{"timeout": 0.05, **kw})  # type: ignore[arg-type]
        r.start()
        try:
            return await r.resolve(name, family)
        except ResolveError as exc:
            return exc.eai
        finally:
            r.close()

    return asyncio.run(main())


def test_resolver_answers_families_search_and_errors(tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text("# comment\n10.9.9.9 pinned.wg.test pinned  # alias\n")
    kw: dict[str, Any] = {"hosts": hosts, "search": ["wg.test"]}
    engine = FakeEngine()
    assert resolve(engine, "web.wg.test", **kw) == (ZONE["web.wg.test"], "web.wg.test")
    assert resolve(engine, "web.wg.test", 6, **kw) == ([IPv6Address("fd15::7")], "web.wg.test")
    assert resolve(engine, "WEB", 4, **kw) == ([IPv4Address("10.150.0.7")], "WEB.wg.test")
    assert resolve(engine, "v4.wg.test", 6, **kw) == EAI_NODATA
    assert resolve(engine, "nothere.wg.test", **kw) == EAI_NONAME
    # S1 answers every time; OFF (not routed into the tunnel) is never asked.
    assert {q[0] for q in engine.queries} == {str(S1)}
    # "WEB" has no dot: the search domain first, and it answered.
    assert ("10.150.0.1", "WEB.wg.test", RType.A) in engine.queries
    assert ("10.150.0.1", "WEB", RType.A) not in engine.queries
    engine.queries.clear()
    assert resolve(engine, "PINNED", **kw) == ([IPv4Address("10.9.9.9")], "PINNED")
    assert engine.queries == []  # /etc/hosts first, no query


def test_resolver_retries_the_next_server_then_gives_up() -> None:
    engine = FakeEngine(silent={S1})
    assert resolve(engine, "v4.wg.test", 4) == ([IPv4Address("10.150.0.8")], "v4.wg.test")
    assert [q[0] for q in engine.queries] == [str(S1), str(S2)]
    engine = FakeEngine(silent={S1, S2})
    assert resolve(engine, "v4.wg.test", 4) == EAI_AGAIN
    assert [q[0] for q in engine.queries] == [str(S1), str(S2)] * 3  # 2 retries each


def test_resolver_uses_tcp_when_truncated() -> None:
    engine = FakeEngine(truncate=True)
    assert resolve(engine, "big.wg.test", 4) == (ZONE["big.wg.test"], "big.wg.test")
    assert (str(S1), "tcp", 53) in engine.queries
