"""End to end, UDP: wrapped programs' datagrams go through the tunnel, and fail closed.

A "whoami" UDP server in the peer namespace (dual-stack, port 9002) answers each datagram with
the source address it saw and logs it; the rig's UDP echo is on :9001. Checked: unconnected
sendto/recvfrom, sendmsg/recvmsg and connected send/recv over IPv4 and IPv6 report the real
source, the peer sees our tunnel address, a closed port gives ECONNREFUSED on a connected
socket, loopback UDP is untouched (also on an associated socket), a wrapped UDP server is
reachable from the peer, and another local user can inject nothing into an association.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from rig.harness import Rig
from runtime.wraphelp import explain, last_json, popen_wrapped, py, read_line, run_wrapped

pytestmark = [pytest.mark.root, pytest.mark.interop]

WHOAMI_PORT = 9002
WHOAMI = """
import socket, sys
log = open(sys.argv[1], "a", buffering=1)
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.bind(("::", int(sys.argv[2])))
print("READY", flush=True)
while True:
    data, addr = s.recvfrom(4096)
    ip = addr[0].removeprefix("::ffff:")
    log.write(f"{ip} {data[:40]!r}\\n")
    s.sendto(ip.encode() + b" " + data, addr)
"""

# The wrapped client: one JSON line of everything it saw. argv: peer v4, peer v6, echo port.
CLIENT = """
import errno, json, os, select, socket, sys, threading
P4, P6, ECHO, WHO, VETH = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
res = {}

def unconnected_v4():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(5)
    s.sendto(b"hello4", (P4, WHO))
    r = select.select([s], [], [], 5)[0]  # poll/select see the real socket become readable
    data, src = s.recvfrom(2048)
    s.sendto(b"echo-me", (P4, ECHO))
    edata, esrc = s.recvfrom(2048)
    return [bool(r), data.decode(), list(src), edata.decode(), list(esrc)]

def unconnected_v6():
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s.settimeout(5)
    s.sendto(b"hello6", (P6, WHO))
    data, src = s.recvfrom(2048)
    return [data.decode(), list(src[:2])]

def msg_calls():  # sendmsg/recvmsg with two iovecs
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(5)
    s.sendmsg([b"part1-", b"part2"], [], 0, (P4, ECHO))
    a, b = bytearray(3), bytearray(100)
    n, _, flags, src = s.recvmsg_into([a, b])
    return [n, bytes(a + b[: n - 3]).decode(), list(src)]

def connected():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(5)
    s.connect((P4, WHO))
    s.send(b"conn")
    data = s.recv(2048)
    return [data.decode(), list(s.getpeername()), s.getsockname()[0]]

def refused():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(5)
    s.connect((P4, 9)) # discard port: nothing listens in the peer namespace
    for _ in range(5):
        try:
            s.send(b"anyone?")
            s.recv(100)
            return "answered"
        except ConnectionRefusedError:
            return "ECONNREFUSED"
        except TimeoutError:
            continue
    return "timeout"

def loopback():  # loopback UDP is untouched, also on a socket associated with the tunnel
    srv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    srv.bind(("127.0.0.1", 0))
    srv.settimeout(5)
    c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    c.settimeout(5)
    c.sendto(b"x", (P4, ECHO))
    c.recvfrom(100)                   # c is associated now
    c.sendto(b"plain", srv.getsockname())
    got, src = srv.recvfrom(100)
    srv.sendto(b"back", src)
    back, bsrc = c.recvfrom(100)
    return [got.decode(), src[0], src[1] == c.getsockname()[1], back.decode(),
            list(bsrc) == list(srv.getsockname())]

def direct():  # not routed into the tunnel (the peer's veth): the real call, the real source
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(5)
    s.sendto(b"direct", (VETH, ECHO))
    data, src = s.recvfrom(100)
    return [data.decode(), list(src)]

def mmsg():  # sendmmsg/recvmmsg (as glibc's resolver uses) on a connected socket, via ctypes
    import ctypes, time
    libc = ctypes.CDLL(None, use_errno=True)
    class Iov(ctypes.Structure):
        _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]
    class Msg(ctypes.Structure):
        _fields_ = [("name", ctypes.c_void_p), ("namelen", ctypes.c_uint32),
                    ("iov", ctypes.POINTER(Iov)), ("iovlen", ctypes.c_size_t),
                    ("control", ctypes.c_void_p), ("controllen", ctypes.c_size_t),
                    ("flags", ctypes.c_int), ("pad", ctypes.c_int), ("len", ctypes.c_uint)]
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect((P4, ECHO))
    bufs = [ctypes.create_string_buffer(b"mmsg-one"), ctypes.create_string_buffer(b"mmsg-two")]
    iovs = (Iov * 2)(*[Iov(ctypes.cast(b, ctypes.c_void_p), 8) for b in bufs])
    msgs = (Msg * 2)()
    for i in range(2):
        msgs[i].iov, msgs[i].iovlen = ctypes.pointer(iovs[i]), 1
    sent = libc.sendmmsg(s.fileno(), msgs, 2, 0)
    time.sleep(0.5)  # both echoes queued
    rbufs = [ctypes.create_string_buffer(64) for _ in range(2)]
    riovs = (Iov * 2)(*[Iov(ctypes.cast(b, ctypes.c_void_p), 64) for b in rbufs])
    rmsgs = (Msg * 2)()
    for i in range(2):
        rmsgs[i].iov, rmsgs[i].iovlen = ctypes.pointer(riovs[i]), 1
    got = libc.recvmmsg(s.fileno(), rmsgs, 2, 0x10000, None)  # MSG_WAITFORONE
    return [sent, got] + sorted(rbufs[i].raw[: rmsgs[i].len].decode() for i in range(max(got, 0)))

def asyncio_client():  # a connected datagram endpoint on the event loop (epoll)
    import asyncio
    async def main():
        loop = asyncio.get_running_loop()
        got = loop.create_future()
        class Proto(asyncio.DatagramProtocol):
            def datagram_received(self, data, addr):
                got.set_result([data.decode(), list(addr)])
        tr, _ = await loop.create_datagram_endpoint(Proto, remote_addr=(P4, WHO))
        tr.sendto(b"aio")
        try:
            return await asyncio.wait_for(got, 5)
        finally:
            tr.close()
    return asyncio.run(main())

for fn in (asyncio_client, unconnected_v4, unconnected_v6, msg_calls, connected, refused,
           loopback, direct, mmsg):
    try:
        res[fn.__name__] = fn()
    except Exception as e:
        res[fn.__name__] = f"{type(e).__name__}: {e}"
print(json.dumps(res))
"""


def start_whoami(rig: Rig, log: Path) -> subprocess.Popen[bytes]:
    proc = rig.peer.ns.python_popen(
        ["-c", WHOAMI, str(log), str(WHOAMI_PORT)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert read_line(proc, 15) == "READY"
    return proc


def test_udp_client_through_the_tunnel(rig: Rig, tmp_path: Path) -> None:
    log = tmp_path / "whoami.log"
    start_whoami(rig, log)
    conf = rig.write_client_config(tmp_path / "c.conf")
    p4, p6 = rig.peer_tunnel_v4, rig.peer_tunnel_v6
    argv = [*py(CLIENT), p4, p6, str(rig.udp_echo_port), str(WHOAMI_PORT), rig.peer.veth_v4]
    r = run_wrapped(rig.client, conf, argv, timeout=60)
    assert r.returncode == 0, explain(r)
    out = last_json(r.stdout)
    me4, me6 = rig.our_tunnel_v4, rig.our_tunnel_v6
    assert out["unconnected_v4"] == [
        True,
        f"{me4} hello4",
        [p4, WHOAMI_PORT],
        "echo-me",
        [p4, rig.udp_echo_port],
    ], explain(r)
    assert out["unconnected_v6"] == [f"{me6} hello6", [p6, WHOAMI_PORT]], explain(r)
    assert out["msg_calls"] == [11, "part1-part2", [p4, rig.udp_echo_port]], explain(r)
    assert out["connected"] == [f"{me4} conn", [p4, WHOAMI_PORT], me4], explain(r)
    assert out["refused"] == "ECONNREFUSED", explain(r)
    assert out["loopback"] == ["plain", "127.0.0.1", True, "back", True], explain(r)
    assert out["asyncio_client"] == [f"{me4} aio", [p4, WHOAMI_PORT]], explain(r)
    assert out["mmsg"] == [2, 2, "mmsg-one", "mmsg-two"], explain(r)
    assert out["direct"] == ["direct", [rig.peer.veth_v4, rig.udp_echo_port]], explain(r)
    # The peer saw only our tunnel addresses.
    seen = {line.split()[0] for line in log.read_text().splitlines()}
    assert seen == {me4, me6}, log.read_text()


SERVER = """
import socket, sys
s = socket.socket(socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
print("bound", s.getsockname()[0], flush=True)
while True:
    data, addr = s.recvfrom(2048)
    s.sendto(b"server saw " + addr[0].encode() + b" " + data, addr)
"""

PEER_CLIENT = """
import socket, sys, time
host, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(1)
end = time.monotonic() + 15
while time.monotonic() < end:
    s.sendto(b"ping", (host, port))
    try:
        data, src = s.recvfrom(2048)
    except TimeoutError:
        continue
    print(data.decode(), src[0])
    break
else:
    print("no answer")
"""


@pytest.mark.parametrize(
    ("bind", "v6"), [("0.0.0.0", False), ("fd15::2", True)], ids=["v4-wildcard", "v6-tunnel"]
)
def test_wrapped_udp_server_answers_the_peer(rig: Rig, tmp_path: Path, bind: str, v6: bool) -> None:
    conf = rig.write_client_config(tmp_path / "c.conf", keepalive=25)
    proc = popen_wrapped(
        rig.client,
        conf,
        [*py(SERVER), bind, "9003"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        line = read_line(proc, 20)
        assert line == f"bound {bind}", line
        ours, peer = (
            (rig.our_tunnel_v6, rig.peer_tunnel_v6)
            if v6
            else (rig.our_tunnel_v4, rig.peer_tunnel_v4)
        )
        r = rig.peer.ns.python(["-c", PEER_CLIENT, ours, "9003"], check=False, timeout=30)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == f"server saw {peer} ping {ours}", r.stdout
    finally:
        proc.terminate()
        proc.wait(15)


INJECT = """
import json, os, socket, subprocess, sys, textwrap, time
P4, WHO = sys.argv[1], int(sys.argv[2])
relay = int(os.environ["WRAPGUARD_UDP"].split("/")[0])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(5)
s.sendto(b"legit", (P4, WHO))
s.recvfrom(100)  # associated
port = s.getsockname()[1]
# A header claiming the datagram comes from / goes to the peer: u8 1 | u8 0 | addr(19).
hdr = bytes([1, 0, 4]) + socket.inet_aton(P4) + bytes(12) + WHO.to_bytes(2, "big")
forger = textwrap.dedent(f'''
    import socket
    f = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    f.sendto({hdr!r} + b"forged-to-relay", ("127.0.0.1", {relay}))
    f.sendto({hdr!r} + b"forged-to-program", ("127.0.0.1", {port}))
''')
env = {k: v for k, v in os.environ.items() if not k.startswith(("WRAPGUARD", "LD_PRELOAD"))}
subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                sys.executable, "-c", forger], check=True, env=env)
data, src = s.recvfrom(100)
print(json.dumps({"data": data.decode(errors="replace"), "src": list(src)}))
"""


def test_another_user_cannot_inject_into_an_association(rig: Rig, tmp_path: Path) -> None:
    log = tmp_path / "whoami.log"
    start_whoami(rig, log)
    conf = rig.write_client_config(tmp_path / "c.conf")
    argv = [*py(INJECT), rig.peer_tunnel_v4, str(WHOAMI_PORT)]
    r = run_wrapped(rig.client, conf, argv, timeout=60)
    assert r.returncode == 0, explain(r)
    out = last_json(r.stdout)
    # The forged datagram reached the program as what it is: plain loopback traffic from the
    # forger, header bytes and all - never as a datagram from the peer.
    assert out["src"][0] == "127.0.0.1", out
    assert out["data"].endswith("forged-to-program"), out
    assert len(out["data"]) == 21 + len("forged-to-program"), out
    time.sleep(0.5)
    # The launcher dropped the one sent to its relay: the peer saw only "legit".
    assert [ln.split(" ", 1)[1] for ln in log.read_text().splitlines()] == ["b'legit'"]


SAME_PORT = """
import json, os, socket, subprocess, sys, textwrap
P4, WHO = sys.argv[1], int(sys.argv[2])
relay = int(os.environ["WRAPGUARD_UDP"].split("/")[0])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.settimeout(5)
s.sendto(b"legit", (P4, WHO))
s.recvfrom(100)  # associated
port = s.getsockname()[1]
hdr = bytes([1, 0, 4]) + socket.inet_aton(P4) + bytes(12) + WHO.to_bytes(2, "big")
# Another user binds the association's own loopback port (SO_REUSEADDR lets a UDP bind share
# it) and sends from it: the source address matches, but it cannot know the token.
forger = textwrap.dedent(f'''
    import socket
    f = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    f.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    f.bind(("127.0.0.1", {port}))
    for token in (bytes(16), b"x" * 16):
        f.sendto({hdr!r} + token + b"forged-same-port", ("127.0.0.1", {relay}))
    f.sendto({hdr!r} + b"forged-no-token", ("127.0.0.1", {relay}))
''')
env = {k: v for k, v in os.environ.items() if not k.startswith(("WRAPGUARD", "LD_PRELOAD"))}
subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                sys.executable, "-c", forger], check=True, env=env)
print(json.dumps({"port": port}))
"""


def test_another_user_on_the_same_port_cannot_send_into_the_tunnel(
    rig: Rig, tmp_path: Path
) -> None:
    log = tmp_path / "whoami.log"
    start_whoami(rig, log)
    conf = rig.write_client_config(tmp_path / "c.conf")
    r = run_wrapped(rig.client, conf, [*py(SAME_PORT), rig.peer_tunnel_v4, str(WHOAMI_PORT)])
    assert r.returncode == 0, explain(r)
    time.sleep(0.5)
    assert [ln.split(" ", 1)[1] for ln in log.read_text().splitlines()] == ["b'legit'"]
