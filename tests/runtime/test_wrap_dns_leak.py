"""End to end, DNS leaks: with DNS= set, no resolver reaches the host's DNS, whatever it uses.

Programs that speak DNS themselves (c-ares in node and aria2c, BIND's dig/host/nslookup, a
hand-made resolver) send their queries to the client namespace's resolv.conf server,
127.0.0.1:53 (a logging "leak" resolver: any entry in `rig.client_dns_log()` is a leak), or to
any server they are given. The launcher answers every port-53 query to an address outside the
tunnel through the tunnel DNS (the rig's 10.150.0.1:53) and the reply comes back from the
address asked; dig's sends go through libuv's raw `syscall(SYS_sendmmsg)`. One rig serves the
whole module; the launcher's rewrite is also checked on its own against a fake engine.
"""

from __future__ import annotations

import errno
import hashlib
import shutil
from ipaddress import ip_address, ip_network
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from rig.harness import Rig
from runtime.wraphelp import explain, last_json, py, run_wrapped

from wrapguard.doors.preload.channel import Decision
from wrapguard.doors.preload.door import PreloadDoor
from wrapguard.doors.preload.udp import DNS_REMEMBERED
from wrapguard.netstack.events import SockId
from wrapguard.runtime.bypass import BypassList
from wrapguard.runtime.service import TunnelService
from wrapguard.wire.ipc import Action, Address, Proto

RIG_OPTIONS: dict[str, object] = {}

NODE_RESOLVE = """
const dns = require("dns");
const other = new dns.Resolver();
other.setServers([process.argv[2]]);  // a resolver on the host's own network, not the tunnel
const out = {};
dns.resolve4("web.wg.test", (e1, v4) => {
  out.resolve4 = e1 ? e1.code : v4;
  dns.resolve6("web.wg.test", (e2, v6) => {
    out.resolve6 = e2 ? e2.code : v6;
    other.resolve4("v4only.wg.test", (e3, a) => {
      out.other = e3 ? e3.code : a;
      dns.resolve4("nothere.wg.test", (e4) => {
        out.missing = e4 && e4.code;
        console.log(JSON.stringify(out));
      });
    });
  });
});
"""

# A resolver of its own: a v4only.wg.test A query by hand, over UDP (unconnected, reply source
# checked) to the resolv.conf server and over TCP to [::1]:53.
RAW_RESOLVER = """
import json, socket, struct
Q = bytes.fromhex("beef01000001000000000000" + "0676346f6e6c7902776704746573740000010001")
res = {}
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.settimeout(5)
u.sendto(Q, ("127.0.0.1", 53))
reply, src = u.recvfrom(512)
res["udp"] = [reply[:2].hex(), socket.inet_ntoa(reply[-4:]), list(src)]
t = socket.create_connection(("::1", 53), timeout=5)
t.sendall(struct.pack("!H", len(Q)) + Q)
f = t.makefile("rb")
n = struct.unpack("!H", f.read(2))[0]
reply = f.read(n)
res["tcp"] = [reply[:2].hex(), socket.inet_ntoa(reply[-4:]), list(t.getpeername()[:2])]
print(json.dumps(res))
"""


@pytest.fixture(scope="module")
def conf(module_rig: Rig, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return module_rig.write_client_config(tmp_path_factory.mktemp("dnsleak") / "c.conf", dns=True)


def no_leak(rig: Rig) -> None:
    assert rig.client_dns_log() == [], "a query reached the host resolver"
    clients = {q["client"] for q in rig.dns_log()}
    assert clients <= {rig.our_tunnel_v4}, (
        f"the peer's DNS was asked from outside the tunnel: {clients}"
    )


def tool(name: str) -> str:
    path = shutil.which(name)
    assert path is not None, f"{name} is installed by scripts/install-system-deps.sh"
    return path


def test_node_dns_resolve_gets_tunnel_answers(module_rig: Rig, conf: Path, tmp_path: Path) -> None:
    rig = module_rig
    script = tmp_path / "resolve.js"
    script.write_text(NODE_RESOLVE)
    r = run_wrapped(rig.client, conf, [tool("node"), str(script), rig.peer.veth_v4])
    assert r.returncode == 0, explain(r)
    assert last_json(r.stdout) == {
        "resolve4": [rig.peer_tunnel_v4],
        "resolve6": [rig.peer_tunnel_v6],
        "other": [rig.peer_tunnel_v4],
        "missing": "ENOTFOUND",
    }, explain(r)
    no_leak(rig)


@pytest.mark.parametrize(
    "args, transport",
    [([], "UDP"), (["+tcp"], "TCP"), (["@10.150.0.1"], "UDP")],
    ids=["default-server", "tcp", "tunnel-server"],
)
def test_dig_gets_tunnel_answers(
    module_rig: Rig, conf: Path, args: list[str], transport: str
) -> None:
    rig = module_rig
    argv = [tool("dig"), "+time=3", "+tries=2", *args, "web.wg.test", "A"]
    r = run_wrapped(rig.client, conf, argv)
    assert r.returncode == 0, explain(r)
    server = args[0][1:] if args and args[0].startswith("@") else "127.0.0.1"
    # The answer, from the server dig asked (it drops replies from anyone else).
    assert f"SERVER: {server}#53({server}) ({transport})" in r.stdout, explain(r)
    answer = [ln.split() for ln in r.stdout.split("ANSWER SECTION:")[-1].splitlines()]
    assert ["web.wg.test.", "60", "IN", "A", rig.peer_tunnel_v4] in answer, explain(r)
    no_leak(rig)


def test_host_and_nslookup_get_tunnel_answers(module_rig: Rig, conf: Path) -> None:
    rig = module_rig
    r = run_wrapped(rig.client, conf, [tool("host"), "-W", "3", "web.wg.test"])
    assert r.returncode == 0, explain(r)
    assert f"web.wg.test has address {rig.peer_tunnel_v4}" in r.stdout, explain(r)
    assert f"web.wg.test has IPv6 address {rig.peer_tunnel_v6}" in r.stdout, explain(r)
    r = run_wrapped(rig.client, conf, [tool("nslookup"), "-timeout=3", "v4only.wg.test"])
    assert r.returncode == 0, explain(r)
    assert "Server:\t\t127.0.0.1" in r.stdout, explain(r)
    assert f"Address: {rig.peer_tunnel_v4}" in r.stdout, explain(r)
    no_leak(rig)


def test_a_resolver_of_its_own_gets_tunnel_answers(module_rig: Rig, conf: Path) -> None:
    rig = module_rig
    r = run_wrapped(rig.client, conf, py(RAW_RESOLVER))
    assert r.returncode == 0, explain(r)
    assert last_json(r.stdout) == {
        "udp": ["beef", rig.peer_tunnel_v4, ["127.0.0.1", 53]],
        "tcp": ["beef", rig.peer_tunnel_v4, ["::1", 53]],
    }, explain(r)
    no_leak(rig)


def test_aria2c_fetches_by_name_with_default_options(
    module_rig: Rig, conf: Path, tmp_path: Path
) -> None:
    rig = module_rig
    name = sorted(rig.files)[0]
    size, sha = rig.files[name]
    url = f"http://web.wg.test:{rig.http_port}/{name}"
    argv = [tool("aria2c"), "-d", str(tmp_path), "-o", "got", url]
    r = run_wrapped(rig.client, conf, argv, timeout=90)
    assert r.returncode == 0, explain(r)
    got = (tmp_path / "got").read_bytes()
    assert len(got) == size and hashlib.sha256(got).hexdigest() == sha
    no_leak(rig)  # and the leak resolver knows no such name: the tunnel DNS answered


# -- the launcher's rewrite on its own (fake engine, no rig, no root) ---------------------------

TUNNEL_NETS = [ip_network("10.150.0.0/24"), ip_network("fd15::/64")]
DNS_SERVER = ip_address("10.150.0.1")


class FakeStack:
    def udp_bind(self, port: int = 0) -> SockId:
        return SockId(7)

    def udp_port(self, sock: SockId) -> int:
        return 40000

    def udp_close(self, sock: SockId) -> None:
        pass


class FakeEngine:
    def __init__(self) -> None:
        self.addresses = [ip_address("10.150.0.2"), ip_address("fd15::2")]
        self.stack = FakeStack()
        self.handlers: dict[int, Any] = {}
        self.datagram_sinks: dict[int, Any] = {}

    def route(self, ip: Any, proto: int, port: int | None) -> int | None:
        return 0 if any(ip in net for net in TUNNEL_NETS) else None


class StubResolver:
    def __init__(self, *servers: Any) -> None:
        self.servers = list(servers)

    def forward_server(self) -> Any:
        return self.servers[0] if self.servers else None


def backend(*servers: Any) -> PreloadDoor:
    session = SimpleNamespace(engine=FakeEngine(), bypass=BypassList())
    service = TunnelService(session)  # type: ignore[arg-type]
    if servers:
        service.resolver = StubResolver(*(s for s in servers if s is not None))  # type: ignore[assignment]
    return PreloadDoor(service)


def addr(text: str, port: int = 53) -> Address:
    return Address(ip_address(text), port)


def test_port_53_outside_the_tunnel_is_routed_to_the_tunnel_dns() -> None:
    plain = backend()  # no DNS=: port 53 is an ordinary port
    assert plain.route(Proto.UDP, addr("127.0.0.1")).action is Action.DIRECT
    assert plain.route(Proto.TCP, addr("198.18.3.2")).action is Action.DIRECT
    assert plain.service.dns_target(ip_address("127.0.0.1"), 53) is None
    b = backend(DNS_SERVER)
    for proto, dst in [
        (Proto.UDP, addr("127.0.0.1")),
        (Proto.TCP, addr("127.0.0.53")),
        (Proto.UDP, addr("::1")),
        (Proto.TCP, addr("198.18.3.2")),  # a resolver on the host's own network
        (Proto.UDP, addr("0.0.0.0")),
    ]:
        assert b.route(proto, dst) == Decision(Action.TUNNEL), dst
        assert b.service.dns_target(dst.ip, 53, proto) == (DNS_SERVER, 53), dst
    assert b.route(Proto.UDP, addr("127.0.0.1", 5353)).action is Action.DIRECT
    # Port 53 of an address routed into the tunnel goes as asked (dig @10.150.0.1).
    assert b.route(Proto.UDP, addr("10.150.0.9")) == Decision(Action.TUNNEL)
    assert b.service.dns_target(ip_address("10.150.0.9"), 53) is None
    # DNS= set, but no server of it inside the tunnel: fail closed, never the host resolver.
    assert backend(None).route(Proto.UDP, addr("127.0.0.1")) == Decision(
        Action.FAIL, errno.ENETUNREACH
    )
    # An AF_INET6 resolver's query to ::1 leaves from our IPv4 address, towards the server.
    decision, source = b.udp_assoc(addr("::1", 41000), addr("::1"))
    assert decision.action is Action.TUNNEL and source == Address(ip_address("10.150.0.2"), 40000)


def test_the_reply_comes_from_the_address_the_program_asked() -> None:
    b = backend(DNS_SERVER)
    relay = b.udp
    relay.assoc(addr("127.0.0.1", 41000), addr("127.0.0.1"))
    [assoc] = relay.assocs.values()
    query = bytes.fromhex("beef0100000100000000000000")
    assert relay.tunnel_destination(assoc, addr("127.0.0.53"), query) == (DNS_SERVER, 53)
    assert relay.program_source(assoc, (DNS_SERVER, 53), query) == addr("127.0.0.53")
    other = b"\x12\x34" + query[2:]  # an id never forwarded: its real source
    assert relay.program_source(assoc, (DNS_SERVER, 53), other) == addr("10.150.0.1")
    assert relay.tunnel_destination(assoc, addr("10.150.0.1"), other) == (DNS_SERVER, 53)
    assert relay.program_source(assoc, (DNS_SERVER, 53), other) == addr("10.150.0.1")
    assert relay.tunnel_destination(assoc, addr("127.0.0.1", 5353), query) == (
        ip_address("127.0.0.1"),
        5353,
    )
    for i in range(300):  # bounded: the oldest forwarded ids are forgotten
        relay.tunnel_destination(assoc, addr("127.0.0.1"), i.to_bytes(2, "big") + query[2:])
    assert len(assoc.dns) == DNS_REMEMBERED
