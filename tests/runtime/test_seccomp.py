"""End to end, the seccomp door: static and Go programs inside the tunnel (docs/seccomp.md).

A small Go client/server (tests/runtime/goprobe, standard library only) is built once per
session with Debian's Go toolchain, CGO_ENABLED=0 (static) and =1 (dynamic, cgo), into a
temporary directory (GOCACHE/GOPATH there too, no module downloads). `--intercept auto`
gives both the seccomp door (ELF inspection); they reach the rig's servers behind a real
wireguard-go peer: HTTP downloads checked by sha256, the addresses Go reports, a refused
port, an unroutable destination, names through the tunnel DNS with no leak query, UDP echo,
300 concurrent connections. busybox-static's wget and nc too, and a wrapped bash that starts
a static program later.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from rig.harness import MiB, Rig
from runtime.wraphelp import explain, last_json, run_wrapped

pytestmark = [pytest.mark.root, pytest.mark.interop]

RIG_OPTIONS: dict[str, object] = {"file_sizes": {"1MiB.bin": MiB, "64MiB.bin": 64 * MiB}}
GOPROBE = Path(__file__).resolve().parent / "goprobe" / "main.go"
BUSYBOX = "/usr/bin/busybox"


@pytest.fixture(scope="session")
def goprobes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """{"static": path, "cgo": path}: the Go probe built both ways, once per session."""
    if shutil.which("go") is None:
        pytest.fail("go not installed: scripts/install-system-deps.sh installs golang-go")
    root = tmp_path_factory.mktemp("go")
    env = dict(os.environ)
    env.update(
        GOCACHE=str(root / "cache"), GOPATH=str(root / "path"), GO111MODULE="off",
        GOFLAGS="", GOPROXY="off",
    )  # fmt: skip
    out = {}
    for kind, cgo in (("static", "0"), ("cgo", "1")):
        target = root / f"goprobe-{kind}"
        subprocess.run(
            ["go", "build", "-o", str(target), str(GOPROBE)],
            env={**env, "CGO_ENABLED": cgo}, check=True, timeout=300,
            cwd=GOPROBE.parent,
        )  # fmt: skip
        out[kind] = target
    return out


@pytest.fixture(scope="module")
def conf(module_rig: Rig, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return module_rig.write_client_config(tmp_path_factory.mktemp("conf") / "c.conf", dns=True)


@pytest.fixture(params=["static", "cgo"])
def probe(request: pytest.FixtureRequest, goprobes: dict[str, Path]) -> Iterator[str]:
    yield str(goprobes[request.param])


def go(rig: Rig, conf: Path, probe: str, *args: str, timeout: float = 90,
       extra: tuple[str, ...] = ()) -> dict[str, object]:  # fmt: skip
    r = run_wrapped(rig.client, conf, [probe, *args], timeout=timeout, extra=extra)
    assert r.stdout.strip(), explain(r)
    return last_json(r.stdout)


def test_go_http_get_1mib(module_rig: Rig, conf: Path, probe: str) -> None:
    res = go(module_rig, conf, probe, "get", module_rig.url("1MiB.bin"))
    size, sha = module_rig.files["1MiB.bin"]
    assert res == {"status": 200, "bytes": size, "sha256": sha}


def test_go_download_64mib_sha256(module_rig: Rig, conf: Path, probe: str) -> None:
    res = go(module_rig, conf, probe, "get", module_rig.url("64MiB.bin"))
    size, sha = module_rig.files["64MiB.bin"]
    assert res == {"status": 200, "bytes": size, "sha256": sha}


@pytest.mark.parametrize("v6", [False, True])
def test_go_tcp_addresses_are_the_tunnels(
    module_rig: Rig, conf: Path, probe: str, v6: bool
) -> None:
    """LocalAddr()/RemoteAddr() (getsockname/getpeername) show the tunnel addresses; the
    echo server's first line says it saw our tunnel address too."""
    rig = module_rig
    peer = rig.peer_tunnel_v6 if v6 else rig.peer_tunnel_v4
    ours = rig.our_tunnel_v6 if v6 else rig.our_tunnel_v4
    host = f"[{peer}]" if v6 else peer
    res = go(rig, conf, probe, "tcp", f"{host}:{rig.tcp_echo_port}")
    assert res["remote"] == f"{host}:{rig.tcp_echo_port}", res
    local = str(res["local"])
    assert local.rsplit(":", 1)[0].strip("[]") == ours, res
    seen = str(res["echo"]).split()
    assert seen[0] == ours and seen[1] == local.rsplit(":", 1)[1], res


def test_go_refused_port_is_refused(module_rig: Rig, conf: Path, probe: str) -> None:
    res = go(module_rig, conf, probe, "dial", f"{module_rig.peer_tunnel_v4}:9999")
    assert "connection refused" in str(res.get("error")), res


def test_go_unroutable_is_network_unreachable(module_rig: Rig, tmp_path: Path,
                                              probe: str) -> None:  # fmt: skip
    """Routed into the tunnel but no tunnel address of that family: ENETUNREACH, and
    nothing tried on the host network."""
    conf4 = module_rig.write_client_config(
        tmp_path / "v4only.conf", address=f"{module_rig.our_tunnel_v4}/32"
    )
    res = go(
        module_rig,
        conf4,
        probe,
        "dial",
        f"[{module_rig.peer_tunnel_v6}]:{module_rig.tcp_echo_port}",
    )
    assert "network is unreachable" in str(res.get("error")), res


def test_go_lookup_through_tunnel_dns_no_leak(module_rig: Rig, conf: Path, probe: str) -> None:
    """Go's own resolver reads resolv.conf (127.0.0.1, the leak resolver) and asks it over
    UDP: the door sends the query to the tunnel DNS instead."""
    before = len(module_rig.client_dns_log())
    res = go(module_rig, conf, probe, "lookup", "web.wg.test")
    assert sorted(res["addrs"]) == sorted([module_rig.peer_tunnel_v4, module_rig.peer_tunnel_v6]), (
        res
    )  # type: ignore[arg-type]
    assert module_rig.client_dns_log()[before:] == []


def test_go_udp_echo(module_rig: Rig, conf: Path, probe: str) -> None:
    rig = module_rig
    res = go(rig, conf, probe, "udp", f"{rig.peer_tunnel_v4}:{rig.udp_echo_port}")
    assert res["echo"] == "ping from go", res
    assert str(res["remote"]) == f"{rig.peer_tunnel_v4}:{rig.udp_echo_port}"
    assert str(res["local"]).startswith(rig.our_tunnel_v4 + ":"), res


def test_go_300_concurrent_connections(module_rig: Rig, conf: Path,
                                       goprobes: dict[str, Path]) -> None:  # fmt: skip
    rig = module_rig
    res = go(rig, conf, str(goprobes["static"]), "many", "300",
             f"{rig.peer_tunnel_v4}:{rig.tcp_echo_port}", timeout=180)  # fmt: skip
    assert res["ok"] == 300, res


def test_busybox_wget_and_nc(module_rig: Rig, conf: Path, tmp_path: Path) -> None:
    rig = module_rig
    out = tmp_path / "1MiB.out"
    r = run_wrapped(rig.client, conf, [BUSYBOX, "wget", "-q", "-O", str(out), rig.url("1MiB.bin")])
    assert r.returncode == 0, explain(r)
    import hashlib

    assert hashlib.sha256(out.read_bytes()).hexdigest() == rig.files["1MiB.bin"][1]
    r = run_wrapped(
        rig.client, conf,
        ["sh", "-c", f"echo hello-nc | {BUSYBOX} nc -w 5 {rig.peer_tunnel_v4} {rig.tcp_echo_port}"],
        extra=("--intercept", "seccomp"),
    )  # fmt: skip
    assert r.returncode == 0, explain(r)
    assert r.stdout.split()[0] == rig.our_tunnel_v4, explain(r)


def test_doctor_names_the_seccomp_door(goprobes: dict[str, Path]) -> None:
    from wrapguard.doctor import check_target

    findings = check_target(str(goprobes["static"]), seccomp=True)
    assert any("seccomp door" in f.detail and f.status == "ok" for f in findings), findings
    refused = check_target(str(goprobes["static"]), seccomp=False)
    assert any(f.status == "FAIL" for f in refused), refused


def test_unconnected_udp_through_the_tunnel(module_rig: Rig, conf: Path, probe: str) -> None:
    """sendto()/sendmsg() with a tunnel destination on an unconnected socket go through the
    tunnel (the client namespace has no route there), and recvfrom() reports the tunnel
    source, not our loopback socket; IPv4, IPv6, Go's WriteTo/ReadFrom; a DNS query to the
    resolv.conf server answered through the tunnel from the address asked, no leak."""
    rig = module_rig
    code = f"""
import socket
q = bytes.fromhex("beef01000001000000000000" + "037765620277670474657374000001" + "0001")
out = []
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(5)
s.sendto(b"one", ("{rig.peer_tunnel_v4}", {rig.udp_echo_port}))
d, a = s.recvfrom(100)
out += [d.decode(), f"{{a[0]}}:{{a[1]}}"]
s.sendmsg([b"tw", b"o"], [], 0, ("{rig.peer_tunnel_v4}", {rig.udp_echo_port}))
d, a = s.recvfrom(100)
out += [d.decode(), f"{{a[0]}}:{{a[1]}}"]
s6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s6.settimeout(5)
s6.sendto(b"six", ("{rig.peer_tunnel_v6}", {rig.udp_echo_port}))
d, a = s6.recvfrom(100)
out += [d.decode(), f"{{a[0]}}:{{a[1]}}"]
s.sendto(q, ("127.0.0.1", 53))
d, a = s.recvfrom(512)
out += [d[:2].hex(), f"{{a[0]}}:{{a[1]}}"]
c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # connected, read with recvfrom
c.settimeout(5)
c.connect(("{rig.peer_tunnel_v4}", {rig.udp_echo_port}))
c.send(b"conn")
d, a = c.recvfrom(100)
out += [d.decode(), f"{{a[0]}}:{{a[1]}}"]
print(" ".join(out))
"""
    before = len(rig.client_dns_log())
    r = run_wrapped(rig.client, conf, ["python3", "-c", code], extra=("--intercept", "seccomp"))
    assert r.returncode == 0, explain(r)
    v4, v6, port = rig.peer_tunnel_v4, rig.peer_tunnel_v6, rig.udp_echo_port
    assert r.stdout.split() == [
        "one", f"{v4}:{port}", "two", f"{v4}:{port}", "six", f"{v6}:{port}",
        "beef", "127.0.0.1:53", "conn", f"{v4}:{port}",
    ], explain(r)  # fmt: skip
    assert rig.client_dns_log()[before:] == []
    res = go(rig, conf, probe, "udpfrom", f"{v4}:{port}")
    assert res == {"echo": "ping from go", "from": f"{v4}:{port}"}, res


def test_tcp_fast_open_into_the_tunnel_fails_closed(module_rig: Rig, tmp_path: Path) -> None:
    """sendto(MSG_FASTOPEN) is an implicit connect the door does not carry: ENETUNREACH.
    The peer's underlay address is routed into the tunnel here, so a leak would reach its
    echo server directly."""
    rig = module_rig
    underlay = rig.peer_endpoint[0]
    conf = rig.write_client_config(
        tmp_path / "c.conf", allowed_ips=f"10.150.0.0/24, fd15::/64, {underlay}/32"
    )
    code = f"""
import errno, socket
s = socket.socket()
try:
    s.sendto(b"x", socket.MSG_FASTOPEN, ("{underlay}", {rig.tcp_echo_port}))
    print("sent")
except OSError as e:
    print(errno.errorcode[e.errno])
"""
    r = run_wrapped(rig.client, conf, ["python3", "-c", code], extra=("--intercept", "seccomp"))
    assert r.returncode == 0, explain(r)
    assert r.stdout.split() == ["ENETUNREACH"], explain(r)


def test_wrapped_bash_starts_a_static_program_later(
    module_rig: Rig, conf: Path, goprobes: dict[str, Path]
) -> None:
    """bash gets the preload shim; the static Go program it execs later is handed to the
    seccomp door by the shim's exec hook (csrc/exec.c) instead of being refused, and so is
    busybox run through posix_spawn-style PATH search."""
    rig = module_rig
    script = (
        f"sleep 0.2; {goprobes['static']} tcp {rig.peer_tunnel_v4}:{rig.tcp_echo_port}; "
        f"echo hi | busybox nc -w 5 {rig.peer_tunnel_v4} {rig.tcp_echo_port}"
    )
    r = run_wrapped(rig.client, conf, ["bash", "-c", script])
    assert r.returncode == 0, explain(r)
    lines = r.stdout.splitlines()
    res = json.loads(lines[0])
    assert res["remote"] == f"{rig.peer_tunnel_v4}:{rig.tcp_echo_port}", res
    assert str(res["echo"]).split()[0] == rig.our_tunnel_v4, res
    assert lines[1].split()[0] == rig.our_tunnel_v4, explain(r)


def test_supervisor_survives_programs_killed_mid_call(
    module_rig: Rig, conf: Path, goprobes: dict[str, Path]
) -> None:
    """A Go dial (its SO_ERROR held) and a blocking Python connect (the connect itself held)
    to a silent tunnel address are SIGKILLed while the launcher still owes them an answer;
    the answers go to dead pids, and the next program in the same run works."""
    rig = module_rig
    probe = goprobes["static"]
    blocking = "import socket; socket.create_connection(('10.150.0.77', 80), timeout=None)"
    script = (
        f'{probe} dial 10.150.0.77:80 & a=$!; python3 -c "{blocking}" & b=$!; '
        f"sleep 1.5; kill -9 $a $b; wait; {probe} get {rig.url('1MiB.bin')}"
    )
    r = run_wrapped(rig.client, conf, ["sh", "-c", script], extra=("--intercept", "seccomp"))
    assert r.returncode == 0, explain(r)
    res = last_json(r.stdout)
    assert res["sha256"] == rig.files["1MiB.bin"][1], explain(r)
    assert "Traceback" not in r.stderr and "internal error" not in r.stderr, explain(r)


def test_rclone_copyurl_end_to_end(module_rig: Rig, conf: Path, tmp_path: Path) -> None:
    """A real Go tool from Debian (rclone, cgo-linked): auto picks the seccomp door."""
    import hashlib

    rclone = shutil.which("rclone")
    if rclone is None:
        pytest.fail("rclone not installed: scripts/install-system-deps.sh installs it")
    rig = module_rig
    out = tmp_path / "got.bin"
    r = run_wrapped(
        rig.client, conf,
        [rclone, "--config", "/dev/null", "copyurl", rig.url("1MiB.bin"), str(out)],
        extra=("--log-level", "debug"),
    )  # fmt: skip
    assert r.returncode == 0, explain(r)
    assert '"door": "seccomp"' in r.stderr, explain(r)
    assert hashlib.sha256(out.read_bytes()).hexdigest() == rig.files["1MiB.bin"][1]


@pytest.mark.parametrize("bind", [":8081", "10.150.0.2:8082"])
def test_go_server_reached_from_the_peer_sees_its_tunnel_address(
    module_rig: Rig, tmp_path: Path, probe: str, bind: str
) -> None:
    """A Go HTTP server listening on the wildcard (or on our tunnel address, which the host
    does not have) is reached from the peer; r.RemoteAddr (accept()'s address) is the peer's
    tunnel address, never loopback; v6 for the wildcard too."""
    from runtime.wraphelp import popen_wrapped, read_line

    rig = module_rig
    # PersistentKeepalive: we handshake first, so that the peer knows where we are
    conf = rig.write_client_config(tmp_path / "c.conf", keepalive=25)
    proc = popen_wrapped(
        rig.client, conf, [probe, "serve", bind], stdout=subprocess.PIPE, text=True
    )
    try:
        line = read_line(proc, 20)
        assert "listening" in line, line
        port = bind.rsplit(":", 1)[1]
        targets = [(rig.our_tunnel_v4, rig.peer_tunnel_v4)]
        if bind.startswith(":"):
            targets.append((f"[{rig.our_tunnel_v6}]", rig.peer_tunnel_v6))
        for host, want in targets:
            r = rig.peer.ns.run(
                ["curl", "-sS", "--max-time", "20", f"http://{host}:{port}/"],
                check=False, timeout=40,
            )  # fmt: skip
            assert r.returncode == 0, r
            client = r.stdout.split()[0].rsplit(":", 1)[0].strip("[]")
            assert client in (want, f"::ffff:{want}"), r.stdout
    finally:
        proc.terminate()
        proc.wait(15)


DNS_TCP_QUERY = """
import socket, struct
q = bytes.fromhex("beef01000001000000000000" + "037765620277670474657374000001" + "0001")
s = socket.create_connection(("127.0.0.1", 53), timeout=10)
s.sendall(struct.pack("!H", len(q)) + q)
n = struct.unpack("!H", s.recv(2))[0]
r = b""
while len(r) < n:
    r += s.recv(n - len(r))
print(r[:2].hex(), ".".join(str(b) for b in r[-4:]), s.getpeername()[0])
"""


def test_dns_over_tcp_and_names_in_a_static_program(module_rig: Rig, conf: Path) -> None:
    """A DNS query over TCP to the resolv.conf server (127.0.0.1:53, the leak resolver) is
    answered through the tunnel, getpeername() still says 127.0.0.1; busybox's static glibc
    resolver (connect + send) finds a name through the tunnel; zero leak queries."""
    rig = module_rig
    before = len(rig.client_dns_log())
    r = run_wrapped(rig.client, conf, ["python3", "-c", DNS_TCP_QUERY],
                    extra=("--intercept", "seccomp"))  # fmt: skip
    assert r.returncode == 0, explain(r)
    assert r.stdout.split() == ["beef", rig.peer_tunnel_v4, "127.0.0.1"], explain(r)
    url = f"http://web.wg.test:{rig.http_port}/"
    r = run_wrapped(rig.client, conf, [BUSYBOX, "wget", "-q", "-O", "-", url])
    assert r.returncode == 0, explain(r)
    assert rig.client_dns_log()[before:] == []


UDP_CLIENT = """
import socket, sys
s = socket.socket(socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(2)
for _ in range(10):
    s.sendto(b"hi", (sys.argv[1], int(sys.argv[2])))
    try:
        d, a = s.recvfrom(200)
        print(d.decode(), a[0], a[1])
        break
    except TimeoutError:
        pass
"""


def test_go_udp_server_reached_from_the_peer(module_rig: Rig, tmp_path: Path, probe: str) -> None:
    """A Go UDP server on the wildcard is reached from the peer over IPv4 and IPv6: ReadFrom
    reports the peer's tunnel address and port, and the reply comes from the server's port."""
    from runtime.wraphelp import popen_wrapped, read_line

    rig = module_rig
    conf = rig.write_client_config(tmp_path / "c.conf", keepalive=25)
    proc = popen_wrapped(rig.client, conf, [probe, "udpserve", ":9005"],
                         stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert "listening" in read_line(proc, 20)
        for ours, peer in ((rig.our_tunnel_v4, rig.peer_tunnel_v4),
                           (rig.our_tunnel_v6, rig.peer_tunnel_v6)):  # fmt: skip
            r = rig.peer.ns.run([sys.executable, "-c", UDP_CLIENT, ours, "9005"],
                                check=False, timeout=40)  # fmt: skip
            assert r.returncode == 0, r
            words = r.stdout.split()
            assert len(words) == 4, r
            client, payload, src, sport = words
            host = client.rsplit(":", 1)[0]
            assert host.strip("[]") in (peer, f"::ffff:{peer}") and payload == "hi", r.stdout
            assert src == ours and sport == "9005", r.stdout
    finally:
        proc.terminate()
        proc.wait(15)


@pytest.mark.parametrize("resolver", ["go", "cgo"])
def test_go_get_by_name_with_either_resolver(
    module_rig: Rig, conf: Path, goprobes: dict[str, Path], resolver: str
) -> None:
    """A URL with a name: Go's own resolver (static build) or glibc's getaddrinfo inside the
    cgo build (GODEBUG=netdns=cgo; glibc sends A and AAAA with sendmmsg on a connected
    socket); both through the tunnel DNS, no leak query."""
    rig = module_rig
    probe = goprobes["static" if resolver == "go" else "cgo"]
    before = len(rig.client_dns_log())
    url = f"http://web.wg.test:{rig.http_port}/1MiB.bin"
    cmd = ["env", f"GODEBUG=netdns={resolver}", str(probe), "get", url]
    r = run_wrapped(rig.client, conf, cmd, extra=("--intercept", "seccomp"))
    assert r.stdout.strip(), explain(r)
    assert last_json(r.stdout)["sha256"] == rig.files["1MiB.bin"][1], explain(r)
    assert rig.client_dns_log()[before:] == []


WHOAMI_UDP = """
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 9006))
print("READY", flush=True)
while True:
    data, addr = s.recvfrom(2048)
    s.sendto(f"{addr[0]} {addr[1]}".encode(), addr)
"""


def test_unconnected_udp_keeps_its_port_in_the_tunnel(module_rig: Rig, conf: Path) -> None:
    """The peer sees the program socket's own port as the source (when the tunnel has it
    free), as it would without wrapguard; getsockname() agrees."""
    from runtime.wraphelp import read_line

    rig = module_rig
    server = rig.peer.ns.python_popen(["-c", WHOAMI_UDP], stdout=subprocess.PIPE, text=True)
    try:
        assert read_line(server, 15) == "READY"
        code = f"""
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(5)
s.sendto(b"?", ("{rig.peer_tunnel_v4}", 9006))
print(s.recvfrom(100)[0].decode(), s.getsockname()[1])
"""
        r = run_wrapped(rig.client, conf, ["python3", "-c", code], extra=("--intercept", "seccomp"))
        assert r.returncode == 0, explain(r)
        ip, seen_port, own_port = r.stdout.split()
        assert ip == rig.our_tunnel_v4 and seen_port == own_port, r.stdout
    finally:
        server.kill()
        server.wait()


def test_a_connected_udp_socket_naming_another_address_is_not_sent_directly(
    module_rig: Rig, conf: Path
) -> None:
    """A UDP socket the door connected into the tunnel still sends to an address it names
    (the kernel does): a DNS query named for the host's resolver (127.0.0.1 here, the leak
    resolver) goes to the tunnel DNS like any other, never out directly (a review finding)."""
    rig = module_rig
    before = len(rig.client_dns_log())
    query = "1234010000010000000000000377656202776704746573740000010001"  # web.wg.test A
    code = f"""
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(5)
s.connect(("{rig.peer_tunnel_v4}", {rig.udp_echo_port}))
s.send(b"ping")
print(s.recv(100) == b"ping" or "echo")
s.sendto(bytes.fromhex("{query}"), ("127.0.0.1", 53))
print("sent")
"""
    r = run_wrapped(rig.client, conf, ["python3", "-c", code], extra=("--intercept", "seccomp"))
    assert r.returncode == 0, explain(r)
    assert r.stdout.split() == ["True", "sent"], explain(r)
    assert rig.client_dns_log()[before:] == []


def test_other_socket_kinds_to_a_routed_destination_fail_closed(
    module_rig: Rig, tmp_path: Path
) -> None:
    """A socket the door cannot carry (UDP-Lite) connecting to a routed destination is
    refused with ENETUNREACH; MPTCP is TCP to the door and goes through the tunnel. The
    peer's underlay address is routed into the tunnel, so a leak would reach it directly."""
    rig = module_rig
    underlay = rig.peer_endpoint[0]
    conf = rig.write_client_config(
        tmp_path / "c.conf", allowed_ips=f"10.150.0.0/24, fd15::/64, {underlay}/32"
    )
    code = f"""
import errno, socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, 136)  # IPPROTO_UDPLITE
try:
    s.connect(("{underlay}", {rig.udp_echo_port}))
    print("connected")
except OSError as e:
    print(errno.errorcode[e.errno])
m = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_MPTCP)
m.settimeout(10)
m.connect(("{rig.peer_tunnel_v4}", {rig.tcp_echo_port}))
print(m.makefile("rb").readline().decode().split()[0])
"""
    r = run_wrapped(rig.client, conf, ["python3", "-c", code], extra=("--intercept", "seccomp"))
    assert r.returncode == 0, explain(r)
    assert r.stdout.split() == ["ENETUNREACH", rig.our_tunnel_v4], explain(r)


def test_a_killed_blocking_accept_does_not_keep_its_port(module_rig: Rig, conf: Path) -> None:
    """A server killed while blocked in accept() (the door holds a copy of its socket until a
    connection comes): the copy is let go once the caller is gone, so the same port can be
    bound again in the same run (a review finding: it stayed bound, EADDRINUSE)."""
    server = "import socket; s = socket.socket(); s.bind(('0.0.0.0', 8765)); s.listen(); s.accept()"
    again = (
        "import socket, time\n"
        "for i in range(40):\n"
        "    try:\n"
        "        socket.socket().bind(('0.0.0.0', 8765)); print('bound', i > 0); break\n"
        "    except OSError as e:\n"
        "        time.sleep(0.25)\n"
        "else:\n"
        "    print('EADDRINUSE')\n"
    )
    script = f'python3 -c "{server}" & a=$!; sleep 1.5; kill -9 $a; wait; python3 -c "$AGAIN"'
    r = run_wrapped(
        module_rig.client, conf, ["env", f"AGAIN={again}", "sh", "-c", script],
        extra=("--intercept", "seccomp"),
    )  # fmt: skip
    assert r.returncode == 0, explain(r)
    assert r.stdout.split()[:1] == ["bound"], explain(r)
