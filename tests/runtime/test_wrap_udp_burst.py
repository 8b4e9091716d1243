"""End to end, UDP backpressure: an unpaced burst is slowed down, not dropped at our relay.

A wrapped Python program sends 5,000 datagrams of 1,000 bytes in a loop with no sleeps to a
counting sink in the peer namespace (it counts distinct sequence numbers per run tag). The
same burst goes through the reference path (wireguard-go + the kernel's UDP in the client
namespace) in the same test; the wrapped path must deliver at least as many (issue 10). A
non-blocking wrapped sender must see EAGAIN instead of silent loss (docs/channel.md, "UDP"),
and a socket's data connection must survive fork, close, dup2 and exec (docs/shim.md). The
launcher's intake (UdpRelay: batch drain, pause while a handshake is in flight) is also driven
in memory, without root.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import time
from collections import deque
from ipaddress import IPv4Address
from pathlib import Path
from types import SimpleNamespace

import pytest
from rig.harness import Rig
from runtime.wraphelp import explain, last_json, py, read_line, run_wrapped

from wrapguard.doors.preload import udp as udpassoc
from wrapguard.netstack.stack import Stack
from wrapguard.runtime.bypass import BypassList
from wrapguard.runtime.service import TunnelService
from wrapguard.wire.ipc import (
    TOKEN_LEN,
    UDP_DATA_ACK,
    UDP_DATA_SOCKET,
    Address,
    UdpHeader,
    UdpKind,
    emit_relay_datagram,
    emit_udp_header,
)

SINK_PORT = 9200
COUNT = 5000
SIZE = 1000

# The sink (peer namespace): b"!..." is echoed (a warm-up ping), b"?" answers with a JSON
# object: tag -> how many distinct sequence numbers arrived; anything else is tag (8 B) + u32
# sequence.
SINK = """
import json, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
# Big enough that the sink itself never drops (SO_RCVBUFFORCE = 33: we are root there): the
# two paths are compared, not the sink.
s.setsockopt(socket.SOL_SOCKET, 33, 64 << 20)
s.bind(("0.0.0.0", int(sys.argv[1])))
seen = {}
print("READY", flush=True)
while True:
    data, addr = s.recvfrom(65535)
    if data[:1] == b"!":
        s.sendto(data, addr)
    elif data[:1] == b"?":
        s.sendto(json.dumps({k.decode(): len(v) for k, v in seen.items()}).encode(), addr)
    elif len(data) >= 12:
        seen.setdefault(data[:8], set()).add(int.from_bytes(data[8:12], "big"))
"""

# The sender: a warm-up ping until the sink answers (so that no handshake is in flight, on
# either path), then COUNT datagrams as fast as the loop goes. argv: host port tag count size
# mode ("blocking": a blocking socket; "nonblocking": EAGAIN counted, never retried).
SENDER = """
import errno, json, os, socket, sys, time
host, port, tag = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode()
count, size, mode = int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
w = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
w.settimeout(0.5)
for _ in range(0 if mode.endswith("-cold") else 40):
    w.sendto(b"!warm-up", (host, port))
    try:
        w.recvfrom(100)
        break
    except TimeoutError:
        continue
else:
    if not mode.endswith("-cold"):
        sys.exit("no answer to the warm-up ping")
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setblocking(mode.startswith("blocking"))
pad = b"x" * (size - 12)
errors, sent = {}, 0
t0 = time.monotonic()
for i in range(count):
    try:
        s.sendto(tag + i.to_bytes(4, "big") + pad, (host, port))
        sent += 1
    except OSError as e:
        name = errno.errorcode.get(e.errno, str(e.errno))
        errors[name] = errors.get(name, 0) + 1
print(json.dumps({"sent": sent, "errors": errors, "secs": round(time.monotonic() - t0, 3)}))
if mode.endswith("-exit"):  # at once: what is still queued towards the launcher must not be lost
    sys.stdout.flush()
    os._exit(0)
"""


@pytest.fixture(scope="module")
def sink(module_rig: Rig) -> Rig:
    assert module_rig.peer_ns is not None
    proc = module_rig.peer_ns.python_popen(
        ["-c", SINK, str(SINK_PORT)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    assert read_line(proc, 15) == "READY"
    return module_rig


def counts(rig: Rig) -> dict[str, int]:
    """The sink's counts by tag, once they have stopped growing (datagrams still in flight)."""
    assert rig.peer_ns is not None
    with rig.peer_ns.socket(socket.AF_INET, socket.SOCK_DGRAM) as q:
        q.settimeout(2)
        last: dict[str, int] = {}
        stable = 0
        for _ in range(40):
            q.sendto(b"?", ("127.0.0.1", SINK_PORT))
            now: dict[str, int] = json.loads(q.recvfrom(65535)[0])
            stable = stable + 1 if now == last else 0
            if stable >= 2:
                break
            last = now
            time.sleep(0.25)
        return last


def delivered(rig: Rig, tag: str) -> int:
    return counts(rig).get(tag, 0)


def peer_rcvbuf_drops(rig: Rig) -> int:
    """UDP RcvbufErrors in the peer namespace: datagrams the peer's wireguard-go socket (or
    the sink) had no room for - lost after the tunnel, on either path."""
    assert rig.peer_ns is not None
    lines = [ln.split() for ln in rig.peer_ns.run(["cat", "/proc/net/snmp"]).stdout.splitlines()]
    names, values = [ln for ln in lines if ln and ln[0] == "Udp:"][:2]
    return int(values[names.index("RcvbufErrors")])


def sender(rig: Rig, tag: str, mode: str, count: int = COUNT) -> list[str]:
    args = [rig.peer_tunnel_v4, str(SINK_PORT), tag, str(count), str(SIZE), mode]
    return [*py(SENDER), *args]


@pytest.mark.root
@pytest.mark.interop
def test_unpaced_burst_delivers_at_least_what_the_kernel_path_does(
    sink: Rig, tmp_path: Path
) -> None:
    rig = sink
    kc = rig.start_kernel_client()
    try:
        drops = peer_rcvbuf_drops(rig)
        r = rig.client.run(sender(rig, "kernel-1", "blocking"), check=False, timeout=60)
        assert r.returncode == 0, explain(r)
        kernel_out = last_json(r.stdout)
        kernel = delivered(rig, "kernel-1")
        kernel_out["peer_drops"] = peer_rcvbuf_drops(rig) - drops
    finally:
        kc.stop()  # the wrapped run is our key too: only one of them at a time
    conf = rig.write_client_config(tmp_path / "c.conf")
    drops = peer_rcvbuf_drops(rig)
    r = run_wrapped(rig.client, conf, sender(rig, "wrapblk1", "blocking"), timeout=120)
    assert r.returncode == 0, explain(r)
    wrapped_out = last_json(r.stdout)
    wrapped = delivered(rig, "wrapblk1")
    wrapped_out["peer_drops"] = peer_rcvbuf_drops(rig) - drops
    print(
        f"\nunpaced burst of {COUNT} x {SIZE} B: kernel path delivered {kernel} "
        f"({json.dumps(kernel_out)}), wrapped delivered {wrapped} ({json.dumps(wrapped_out)})"
    )
    assert wrapped_out["sent"] == COUNT, wrapped_out  # a blocking socket waits, never fails
    # Nothing is lost on our side: what did not arrive, the peer's wireguard-go socket had no
    # room for (its default receive buffer; the kernel path loses there too).
    assert wrapped + wrapped_out["peer_drops"] >= COUNT, wrapped_out
    assert wrapped >= kernel, (wrapped, kernel)


@pytest.mark.root
@pytest.mark.interop
def test_nonblocking_burst_sees_eagain_instead_of_silent_loss(sink: Rig, tmp_path: Path) -> None:
    rig = sink
    conf = rig.write_client_config(tmp_path / "c.conf")
    drops = peer_rcvbuf_drops(rig)
    r = run_wrapped(rig.client, conf, sender(rig, "wrapnb01", "nonblocking"), timeout=120)
    assert r.returncode == 0, explain(r)
    out = last_json(r.stdout)
    got = delivered(rig, "wrapnb01")
    out["peer_drops"] = peer_rcvbuf_drops(rig) - drops
    print(f"\nnon-blocking burst of {COUNT}: {json.dumps(out)}, delivered {got}")
    assert set(out["errors"]) <= {"EAGAIN"}, out
    assert out["errors"].get("EAGAIN", 0) > 0 or got == COUNT, (out, got)
    assert got + out["peer_drops"] >= out["sent"], (out, got)  # every send that succeeded


EXIT_COUNT = 300  # about what a default send buffer holds: most is still queued at exit


@pytest.mark.root
@pytest.mark.interop
def test_datagrams_still_queued_when_the_program_exits_arrive(sink: Rig, tmp_path: Path) -> None:
    rig = sink
    conf = rig.write_client_config(tmp_path / "c.conf")
    for i in range(3):
        tag = f"wrapexi{i}"
        argv = sender(rig, tag, "blocking-exit", EXIT_COUNT)
        drops = peer_rcvbuf_drops(rig)
        r = run_wrapped(rig.client, conf, argv, timeout=120)
        assert r.returncode == 0, explain(r)
        got = delivered(rig, tag)
        drops = peer_rcvbuf_drops(rig) - drops
        print(f"\n{EXIT_COUNT} datagrams, then os._exit(): {got} delivered, {drops} peer drops")
        assert got + drops >= EXIT_COUNT, (got, drops, last_json(r.stdout), r.stderr[-1500:])


# What a socket's data connection must survive (docs/shim.md): one JSON line of local facts;
# every datagram is tag + u32 0 to the sink, which the test then asks about. argv: host port.
LIFECYCLE = """
import json, os, socket, subprocess, sys, time
DST = (sys.argv[1], int(sys.argv[2]))
res = {}

def dgram(tag):
    return tag.encode().ljust(8, b"_")[:8] + bytes(4) + b"lifecycle"

def udp():
    return socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

def seqpacket(fd):  # a data connection (the control connection is SOCK_STREAM)
    sock = socket.socket(fileno=fd)
    try:
        return sock.type == socket.SOCK_SEQPACKET
    finally:
        sock.detach()

def ours():  # our data connections: high-numbered SEQPACKET sockets the program never made
    fds = []
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            if (fd > 100 and os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
                    and seqpacket(fd)):
                fds.append(fd)
        except OSError:
            pass
    return sorted(fds)

s = udp()
s.sendto(dgram("first"), DST)
data = ours()
res["data_fds"] = len(data)
res["cloexec"] = all(not os.get_inheritable(fd) for fd in data)

pid = os.fork()  # the child shares the socket and its data connection
if pid == 0:
    s.sendto(dgram("forkchld"), DST)
    os._exit(0)
os.waitpid(pid, 0)
pid = os.fork()  # the parent closes (releases the association) while the child still sends
if pid == 0:
    time.sleep(0.5)
    try:
        s.sendto(dgram("orphan"), DST)
        os._exit(0)
    except OSError:
        os._exit(3)
s.close()
res["orphan_rc"] = os.waitpid(pid, 0)[1] >> 8

a = udp()
a.sendto(dgram("a-before"), DST)
for fd in ours():
    os.close(fd)  # through close(): noticed at once
a.sendto(dgram("a-closed"), DST)
os.closerange(101, 65536)  # close_range() behind the shim's back
a.sendto(dgram("a-range"), DST)
null = os.open("/dev/null", os.O_WRONLY)
victims = ours()
for fd in victims:
    os.dup2(null, fd)  # dup2() over our fd: it is the program's now
a.sendto(dgram("a-dup2"), DST)
res["dup2_kept"] = all(os.readlink(f"/proc/self/fd/{fd}") == "/dev/null" for fd in victims)
res["dup2_victims"] = len(victims)

e = udp()
e.sendto(dgram("exec-par"), DST)
child = '''
import os, socket, sys
s = socket.socket(fileno=int(sys.argv[1]))
def seqpacket(fd):
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        return False
    try:
        return sock.type == socket.SOCK_SEQPACKET
    finally:
        sock.detach()
high = [f for f in os.listdir("/proc/self/fd") if int(f) > 100 and seqpacket(int(f))]
s.sendto(sys.argv[2].encode().ljust(8, b"_") + bytes(4), (sys.argv[3], int(sys.argv[4])))
print(len(high))
'''
r = subprocess.run([sys.executable, "-c", child, str(e.fileno()), "exec-chl", *sys.argv[1:3]],
                   pass_fds=(e.fileno(),), capture_output=True, text=True, timeout=30)
res["exec"] = [r.returncode, r.stdout.strip(), r.stderr[-300:]]

c = udp()
c.connect(DST)
c.send(dgram("connsend"))
os.write(c.fileno(), dgram("connwrit"))

def sent_before_eagain(sock):
    sock.setblocking(False)
    for n in range(3000):
        try:
            sock.sendto(dgram("sndbuf"), DST)
        except BlockingIOError:
            return n
    return n

small = udp()
small.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
later = udp()
later.sendto(dgram("later"), DST)  # its data connection opens with the default buffer
time.sleep(0.3)
later.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # and follows the new size
res["sndbuf"] = [sent_before_eagain(small), sent_before_eagain(later),
                 sent_before_eagain(udp())]
print(json.dumps(res))
"""

LIFECYCLE_TAGS = (
    "first", "forkchld", "orphan", "a-before", "a-closed", "a-range", "a-dup2", "exec-par",
    "exec-chl", "connsend", "connwrit",
)  # fmt: skip


@pytest.mark.root
@pytest.mark.interop
def test_data_connection_follows_fork_close_dup2_exec_and_sndbuf(sink: Rig, tmp_path: Path) -> None:
    rig = sink
    conf = rig.write_client_config(tmp_path / "c.conf")
    argv = [*py(LIFECYCLE), rig.peer_tunnel_v4, str(SINK_PORT)]
    r = run_wrapped(rig.client, conf, argv, timeout=120)
    assert r.returncode == 0, explain(r)
    out = last_json(r.stdout)
    assert out["data_fds"] == 1 and out["cloexec"], out
    assert out["orphan_rc"] == 0, out
    assert out["dup2_victims"] >= 1 and out["dup2_kept"], out
    assert out["exec"][:2] == [0, "0"], out  # no data connection leaked into the new program
    small, later, default = out["sndbuf"]
    assert small < default and later < default and small <= 16 and later <= 16, out
    got = counts(rig)
    missing = [t for t in LIFECYCLE_TAGS if not got.get(t.ljust(8, "_")[:8])]
    print(f"\ndata connection lifecycle: {json.dumps(out)}")
    assert not missing, (missing, out)


# -- the launcher's intake in memory (no root): a real netstack, a stub device and engine ------


class _Peer:
    def __init__(self) -> None:
        self.index = 0
        self.staged: deque[bytes] = deque()


class _Engine:
    """What UdpRelay uses of the engine: the stack, the peers' staged queues, flush()."""

    def __init__(self) -> None:
        self.addresses = [IPv4Address("10.150.0.2")]
        self.stack = Stack(self.addresses, rng=lambda bits: 7, mtu=1420)
        self.device = SimpleNamespace(timers=SimpleNamespace(staged_queue_len=128), peers=[_Peer()])
        self.handlers: dict[int, object] = {}
        self.datagram_sinks: dict[int, object] = {}
        self.flushes = 0
        self.sent: list[bytes] = []

    def now(self) -> float:
        return 0.0

    def flush(self) -> None:
        self.flushes += 1
        self.sent += self.stack.take_outgoing()

    def schedule_flush(self) -> None:
        self.flush()

    send_out = flush


def _record(seq: int, port: int = 9) -> bytes:
    header = UdpHeader(UdpKind.DATA, Address(IPv4Address("10.150.0.1"), port))
    return emit_udp_header(header) + seq.to_bytes(4, "big")


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0.005)


def test_intake_drains_in_batches_and_pauses_while_a_handshake_is_in_flight(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(udpassoc, "PAUSE_MAX", 0.2)

    async def main() -> None:
        engine = _Engine()
        session = SimpleNamespace(engine=engine, bypass=BypassList())
        relay = udpassoc.UdpRelay(TunnelService(session))  # type: ignore[arg-type]
        local = Address(IPv4Address("127.0.0.1"), 40000)
        relay.assoc(local, Address(IPv4Address("10.150.0.1"), 9))
        token = relay.token(local)
        assert token is not None
        shim, ours = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        assert not relay.attach(bytes(16), socket.socket())  # an unknown token: refused
        assert relay.attach(token, ours)
        for seq in range(100):
            shim.send(_record(seq))
        await _settle()
        assert len(engine.sent) == 100 and engine.flushes == 2  # two batches, one flush each
        # A handshake in flight: the staged queue has less room than a batch -> stop reading.
        engine.device.peers[0].staged.extend([b""] * 100)
        for seq in range(100, 200):
            shim.send(_record(seq))
        await _settle()
        assert len(engine.sent) == 164  # one batch, then the rest waits in the kernel
        engine.device.peers[0].staged.clear()  # the handshake completed
        await _settle()
        assert len(engine.sent) == 200
        # A peer that does not answer: reading resumes after PAUSE_MAX, and stays on.
        engine.device.peers[0].staged.extend([b""] * 100)
        for seq in range(200, 400):
            shim.send(_record(seq))
        await _settle()
        assert len(engine.sent) == 264
        await asyncio.sleep(0.3)
        assert len(engine.sent) == 400
        # Release closes the association's data connections: the shim sees EOF.
        relay.release(local)
        shim.settimeout(1)
        assert shim.recv(10) == b""
        relay.close()

    asyncio.run(main())


def _read_all(relay: udpassoc.UdpRelay, mmsg: bool, records: list[bytes]) -> tuple:
    """What one reader makes of `records` sent on a fresh data connection, then EOF: the
    datagrams batched per drain, the relay's counters, whether it detached."""
    local = Address(IPv4Address("127.0.0.1"), 40001 + mmsg)
    relay.assoc(local, Address(IPv4Address("10.150.0.1"), 9))
    assoc = relay.assocs[("127.0.0.1", local.port)]
    shim, ours = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    shim.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    ours.setblocking(False)
    assoc.conns.add(ours)
    for rec in records:
        shim.send(rec)
    shim.close()  # EOF after the last record
    read = relay._read_mmsg if mmsg else relay._read_plain
    drains = []
    for _ in range(10):
        batch: list = []
        n = read(ours, assoc, batch)
        drains.append((n, [(str(d[0]), d[1], p) for d, p in batch]))
        if ours not in assoc.conns:
            break
    relay.release(local)
    stats = relay.stats
    return drains, (stats.malformed, stats.to_tunnel), ours not in assoc.conns


@pytest.mark.skipif(not udpassoc.HAVE_MMSG, reason="the cffi helper is not built")
def test_recvmmsg_intake_reads_what_the_recv_into_loop_reads() -> None:
    """The data connection's two readers against each other: full and partial batches,
    header changes (the parse cache), a record shorter than a header, a bad header, one
    larger than any datagram (truncated), empty payloads, then EOF."""
    records = [_record(seq) for seq in range(70)]
    records += [_record(70, port=99), _record(71, port=99), b"\x01\x00", _record(72)]
    records += [b"\xee" * 21 + b"bad", _record(73)[:21], b"\x01" + bytes(65600), _record(74)]
    records += [_record(seq, port=1000 + seq % 3) for seq in range(75, 100)]
    got = []
    for mmsg in (False, True):
        engine = _Engine()
        session = SimpleNamespace(engine=engine, bypass=BypassList())
        relay = udpassoc.UdpRelay(TunnelService(session))  # type: ignore[arg-type]
        if mmsg:
            relay.use_mmsg()
        got.append(_read_all(relay, mmsg, records))
    plain, mm = got
    assert plain == mm
    drains, (malformed, _), detached = plain
    assert detached and malformed == 3 and drains[0][0] == udpassoc.DRAIN_BATCH
    assert sum(len(b) for _, b in drains) == 103 - 3  # the header-only record is sent


def test_the_shim_and_the_launcher_agree_on_the_data_socket() -> None:
    header = (Path(__file__).resolve().parents[2] / "csrc" / "shim.h").read_text()
    assert f'#define WG_UDP_DATA_SOCKET "{UDP_DATA_SOCKET}"' in header
    assert UDP_DATA_ACK == b"\x00" and TOKEN_LEN == 16  # udp.c: data_open()


class _RoutingEngine(_Engine):
    """_Engine with a route: 8.8.8.8 is outside the tunnel (its DNS queries are captured)."""

    def route(self, ip: object, proto: int, port: int | None) -> int | None:
        return None if str(ip) == "8.8.8.8" else 0


class _Resolver:
    def forward_server(self) -> IPv4Address:
        return IPv4Address("10.150.0.53")


def test_the_destination_kept_per_association_is_the_one_each_header_names() -> None:
    """A connected socket's datagrams all carry one header: the relay keeps its destination
    per association instead of parsing each. Every record must still go where its own
    header says, across drains and header changes (another address, another port, an
    ERROR header for the same address, a DNS query whose destination and reply mapping
    depend on its payload), as the header's parse and destination() say."""
    engine = _RoutingEngine()
    service = TunnelService(SimpleNamespace(engine=engine, bypass=BypassList()))  # type: ignore[arg-type]
    service.resolver = _Resolver()  # type: ignore[assignment]
    relay = udpassoc.UdpRelay(service)
    if udpassoc.HAVE_MMSG:
        relay.use_mmsg()
    local = Address(IPv4Address("127.0.0.1"), 40009)
    relay.assoc(local, Address(IPv4Address("10.150.0.1"), 9))
    assoc = relay.assocs[("127.0.0.1", local.port)]

    def rec(ip: str, port: int, payload: bytes, kind: UdpKind = UdpKind.DATA) -> bytes:
        return emit_udp_header(UdpHeader(kind, Address(IPv4Address(ip), port))) + payload

    drains = [
        [rec("10.150.0.1", 9, b"a"), rec("10.150.0.1", 9, b"b")],
        [rec("10.150.0.1", 9, b"c"), rec("10.150.0.7", 9, b"d"), rec("10.150.0.7", 10, b"e")],
        [rec("10.150.0.7", 10, b"f", UdpKind.ERROR), rec("10.150.0.7", 10, b"g")],
        [rec("8.8.8.8", 53, b"\x00\x01q"), rec("8.8.8.8", 53, b"\x00\x02q")],
        [rec("10.150.0.1", 9, b"h"), rec("8.8.8.8", 53, b"\x00\x03q"), rec("10.150.0.1", 9, b"i")],
    ]
    want = [
        ("10.150.0.1", 9, b"a"), ("10.150.0.1", 9, b"b"), ("10.150.0.1", 9, b"c"),
        ("10.150.0.7", 9, b"d"), ("10.150.0.7", 10, b"e"), ("10.150.0.7", 10, b"g"),
        ("10.150.0.53", 53, b"\x00\x01q"), ("10.150.0.53", 53, b"\x00\x02q"),
        ("10.150.0.1", 9, b"h"), ("10.150.0.53", 53, b"\x00\x03q"), ("10.150.0.1", 9, b"i"),
    ]  # fmt: skip
    shim, ours = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setblocking(False)
    assoc.conns.add(ours)
    got = []
    read = relay._read_mmsg if udpassoc.HAVE_MMSG else relay._read_plain
    for records in drains:
        for r in records:
            shim.send(r)
        batch: list = []
        read(ours, assoc, batch)
        got += [(str(d[0]), d[1], p) for d, p in batch]
    assert got == want
    assert relay.stats.malformed == 1
    assert sorted(assoc.dns) == [
        (IPv4Address("10.150.0.53"), b"\x00" + bytes([i])) for i in (1, 2, 3)
    ]
    shim.close()
    relay.release(local)


def test_each_reply_carries_the_header_of_its_own_source() -> None:
    """The association keeps its last source's relay header (found by the address object's
    identity, not its hash): a reply from another port, another address, an equal address
    object that is not the same one and a DNS server must each get their own header."""
    engine = _Engine()
    service = TunnelService(SimpleNamespace(engine=engine, bypass=BypassList()))  # type: ignore[arg-type]
    relay = udpassoc.UdpRelay(service)
    local = Address(IPv4Address("127.0.0.1"), 40010)
    relay.assoc(local, Address(IPv4Address("10.150.0.1"), 9))
    assoc = relay.assocs[("127.0.0.1", local.port)]
    sent: list[bytes] = []
    relay.send_to_program = lambda _assoc, datagram: sent.append(datagram)  # type: ignore[method-assign]
    a, b = IPv4Address("10.150.0.1"), IPv4Address("10.150.0.5")
    srcs = [(a, 9), (a, 9), (a, 10), (a, 9), (b, 9), (a, 9), (IPv4Address("10.150.0.1"), 9)]
    srcs += [(a, 53), (a, 9), (a, 53)]
    for i, src in enumerate(srcs):
        assoc.on_datagram(src, b"%d" % i)
    want = [
        emit_relay_datagram(UdpHeader(UdpKind.DATA, Address(ip, port)), assoc.token, b"%d" % i)
        for i, (ip, port) in enumerate(srcs)
    ]
    assert sent == want
    relay.release(local)
