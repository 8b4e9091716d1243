"""Client programs the benchmark runs wrapped (through our launcher) and through the kernel path.

Each is a standalone stdlib script: `write_clients(dir)` puts them in a directory and returns
their paths. connect_rtt.py times sequential connect()s (or SOCKS5 connects through a proxy);
hold_conns.py opens many asyncio connections and holds them until its stdin says so;
udp_burst.py sends or asks for an unpaced burst (the rig's UDP sink); udp_rtt.py times
sequential datagram round trips to a UDP echo server.
"""

from __future__ import annotations

from pathlib import Path

CONNECT_RTT = r"""
import json, socket, sys, time
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
proxy = sys.argv[4] if len(sys.argv) > 4 else ""  # "IP:PORT" of a SOCKS5 server, or direct
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
def exactly(s, n):
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise SystemExit("SOCKS5: connection closed")
        buf += chunk
    return buf
def socks5(s):  # RFC 1928: no authentication, CONNECT to an IP address; up to the reply
    phost, pport = proxy.rsplit(":", 1)
    s.connect((phost, int(pport)))
    s.sendall(b"\x05\x01\x00")
    if exactly(s, 2) != b"\x05\x00":
        raise SystemExit("SOCKS5: no acceptable method")
    atyp = b"\x04" if fam == socket.AF_INET6 else b"\x01"
    s.sendall(b"\x05\x01\x00" + atyp + socket.inet_pton(fam, host) + port.to_bytes(2, "big"))
    rep = exactly(s, 5)
    if rep[1] != 0:
        raise SystemExit(f"SOCKS5: reply {rep[1]}")
    exactly(s, {1: 3 + 2, 4: 15 + 2, 3: rep[4] + 2}[rep[3]])  # the rest of BND.ADDR, BND.PORT
def once():
    s = socket.socket(socket.AF_INET if proxy else fam, socket.SOCK_STREAM)
    t0 = time.perf_counter()
    if proxy:
        socks5(s)
    else:
        s.connect((host, port))
    t1 = time.perf_counter()
    banner = s.recv(100)  # the echo server greets with "ip port\n"
    t2 = time.perf_counter()
    s.close()
    if not banner:
        raise SystemExit("no banner")
    return (t1 - t0) * 1e6, (t2 - t0) * 1e6
once()  # warm-up: the WireGuard handshake happens here
samples = [once() for _ in range(n)]
print(json.dumps({"connect": [a for a, _ in samples], "first_byte": [b for _, b in samples]}))
"""

HOLD_CONNS = r"""
import asyncio, resource, sys
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, n + 256)), hard))
async def one():
    r, w = await asyncio.open_connection(host, port)
    await r.readline()
    return r, w
async def main():
    loop = asyncio.get_running_loop()
    conns = [await one()]
    print("UP 1", flush=True)
    await loop.run_in_executor(None, sys.stdin.readline)
    sem = asyncio.Semaphore(64)
    async def limited():
        async with sem:
            return await one()
    conns += await asyncio.gather(*(limited() for _ in range(n - 1)))
    # prove they are all alive: one echo round trip on each
    for r, w in conns:
        w.write(b"x\n")
    for r, w in conns:
        if await r.readline() != b"x\n":
            raise SystemExit("echo failed")
    print(f"HELD {len(conns)}", flush=True)
    await loop.run_in_executor(None, sys.stdin.readline)
    for r, w in conns:
        w.close()
asyncio.run(main())
"""


# A warm-up ping, answered by both the sink and the echo server, until one comes back (the
# WireGuard handshake, 0.5 s per try), then a blocking socket with SO_RCVTIMEO: a receive that
# waits longer fails with EAGAIN, with no extra poll() per datagram as settimeout() would add.
WARM_UP = r"""
import errno, json, os, socket, struct, sys, time
def udp_socket(host, port, rcvtimeo):
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(0.5)
    for _ in range(40):
        s.sendto(b"!warm-up", (host, port))
        try:
            if s.recvfrom(100)[0] == b"!warm-up":
                break
        except TimeoutError:
            continue
    else:
        raise SystemExit("no answer to the warm-up ping")
    s.settimeout(None)
    secs = int(rcvtimeo)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                 struct.pack("ll", secs, int((rcvtimeo - secs) * 1e6)))
    return s
"""

# argv: send|recv host port count size tag(16 hex). send: `count` datagrams b"D" tag seq
# padding as fast as sendto() returns; the bench asks the sink what arrived. recv: asks the
# sink for the burst and counts distinct sequence numbers until 0.5 s pass without one, and
# reports its socket's drop counter (/proc/net/udp).
UDP_BURST = r"""
mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
count, size, tag = int(sys.argv[4]), int(sys.argv[5]), bytes.fromhex(sys.argv[6])
s = udp_socket(host, port, 0.5)
dst, errors, out = (host, port), {}, {}
t0 = time.perf_counter()
if mode == "send":
    pad = bytes(size - 13)
    sent = 0
    for i in range(count):
        try:
            s.sendto(b"D" + tag + i.to_bytes(4, "big") + pad, dst)
            sent += 1
        except OSError as e:
            name = errno.errorcode.get(e.errno, str(e.errno))
            errors[name] = errors.get(name, 0) + 1
    out = {"sent": sent, "secs": time.perf_counter() - t0}
else:
    s.sendto(b"B" + tag + count.to_bytes(4, "big") + size.to_bytes(2, "big"), dst)
    seen, received, first, last = set(), 0, None, t0
    while True:
        try:
            data = s.recv(65535)
        except BlockingIOError:
            if first is None and time.perf_counter() - t0 < 3:
                continue  # nothing yet: the request itself is on its way
            break
        if data[:9] == b"D" + tag and len(data) >= 13:
            last = time.perf_counter()
            first = first or last
            seen.add(int.from_bytes(data[9:13], "big"))
            received += 1
    out = {"distinct": len(seen), "received": received, "secs": last - (first or last)}
    ino = os.fstat(s.fileno()).st_ino  # what the kernel dropped at this socket, full
    for path in ("/proc/net/udp", "/proc/net/udp6"):
        with open(path) as f:
            for line in f.read().splitlines()[1:]:
                if int(line.split()[9]) == ino:
                    out["drops"] = int(line.split()[-1])
print(json.dumps({**out, "errors": errors}))
"""

# argv: host port n. One warm-up, then n sequential 64-byte sendto()+recvfrom() to an echo
# server, each timed; a datagram not back within 1 s counts as lost (and is not timed).
UDP_RTT = r"""
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = udp_socket(host, port, 1.0)
dst, samples, lost = (host, port), [], 0
for i in range(n):
    msg = i.to_bytes(4, "big") + bytes(60)
    t0 = time.perf_counter()
    s.sendto(msg, dst)
    try:
        while s.recvfrom(2048)[0] != msg:
            pass  # a late echo of an earlier one
    except BlockingIOError:
        lost += 1
        continue
    samples.append((time.perf_counter() - t0) * 1e6)
print(json.dumps({"rtt": samples, "lost": lost}))
"""


def write_clients(directory: Path) -> dict[str, Path]:
    out = {}
    for name, text in (
        ("connect_rtt.py", CONNECT_RTT),
        ("hold_conns.py", HOLD_CONNS),
        ("udp_burst.py", WARM_UP + UDP_BURST),
        ("udp_rtt.py", WARM_UP + UDP_RTT),
    ):
        path = directory / name
        path.write_text(text.lstrip())
        out[name] = path
    return out
