"""Client programs the benchmark runs wrapped (through our launcher) and through the kernel path.

Each is a standalone stdlib script: `write_clients(dir)` puts them in a directory and returns
their paths. connect_rtt.py times sequential connect()s; hold_conns.py opens many asyncio
connections and holds them until its stdin says so.
"""

from __future__ import annotations

from pathlib import Path

CONNECT_RTT = r"""
import json, socket, sys, time
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def once():
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    t0 = time.perf_counter()
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


def write_clients(directory: Path) -> dict[str, Path]:
    out = {}
    for name, text in (("connect_rtt.py", CONNECT_RTT), ("hold_conns.py", HOLD_CONNS)):
        path = directory / name
        path.write_text(text.lstrip())
        out[name] = path
    return out
