"""100 client sessions through one `wrapguard relay`, in a namespace of the test's own (loopback
only): every session gets its own UDP socket toward the server, sees only its own datagrams,
and the relay's memory stays bounded."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

SESSIONS = 100
PER_SESSION = 100
RELAY_PORT = 8081
ECHO_PORT = 51820
KEY = "load-test-key"
MAX_RSS_MIB = 160  # a Python process is ~30 MiB; 100 sessions with bounded buffers add little

# The server: answers each datagram to its source with the source port prepended.
ECHO = """
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
s.bind(("127.0.0.1", PORT))
while True:
    data, addr = s.recvfrom(65535)
    s.sendto(addr[1].to_bytes(2, "big") + data, addr)
""".replace("PORT", str(ECHO_PORT))

# The clients: SESSIONS roads in one process; each tags its datagrams with its index.
CLIENTS = """
import asyncio, json, sys
from wrapguard import log
from wrapguard.config import StreamEndpoint
from wrapguard.roads.stream import StreamRoad
N, PER, PORT, KEY = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]

async def main():
    log.setup("warn")
    url = f"http://127.0.0.1:{PORT}/wg"
    got = [[] for _ in range(N)]
    roads = [
        StreamRoad(StreamEndpoint(url, "http", "127.0.0.1", PORT, "/wg", KEY),
                   got[i].extend, peer=i, proxy=False)
        for i in range(N)
    ]
    for r in roads:
        r.start()
    async with asyncio.timeout(120):
        while not all(r.state == "up" for r in roads):
            await asyncio.sleep(0.05)
    for k in range(PER):
        for i, r in enumerate(roads):
            r.send(i.to_bytes(2, "big") + k.to_bytes(2, "big") + bytes(600))
        await asyncio.sleep(0.01)
    try:
        async with asyncio.timeout(60):
            while sum(map(len, got)) < N * PER * 0.95:
                await asyncio.sleep(0.05)
    except TimeoutError:
        pass
    await asyncio.sleep(0.5)
    foreign = sum(1 for i, g in enumerate(got) for d in g if int.from_bytes(d[2:4], "big") != i)
    ports = [sorted({int.from_bytes(d[:2], "big") for d in g}) for g in got]
    print(json.dumps({"received": [len(g) for g in got], "foreign": foreign, "ports": ports}))
    for r in roads:
        r.close()

asyncio.run(main())
"""


def rss_peak_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


@pytest.mark.timeout(400)
def test_hundred_sessions(make_netns, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ns = make_netns("load")
    keys = tmp_path / "keys"
    keys.write_text(KEY + "\n")
    echo = ns.popen([sys.executable, "-c", ECHO])
    relay_log = tmp_path / "relay.log"
    relay = ns.popen(
        [
            sys.executable, "-m", "wrapguard", "relay", "--listen", f"127.0.0.1:{RELAY_PORT}",
            "--forward", f"127.0.0.1:{ECHO_PORT}", "--key-file", str(keys),
            "--max-sessions", str(SESSIONS), "--log-file", str(relay_log),
        ],
        env=ns.python_env(),
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while not (relay_log.exists() and "relay listening" in relay_log.read_text()):
        assert relay.poll() is None and echo.poll() is None
        assert time.monotonic() < deadline, "relay did not start"
        time.sleep(0.05)
    base = rss_peak_mib(relay.pid)
    r = ns.python(
        ["-c", CLIENTS, str(SESSIONS), str(PER_SESSION), str(RELAY_PORT), KEY],
        timeout=300,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    peak = rss_peak_mib(relay.pid)
    print(f"relay RSS peak {peak:.1f} MiB (at start {base:.1f}); received {sum(out['received'])}")
    # No session saw another's datagrams, each came back through one socket of its own.
    assert out["foreign"] == 0
    assert all(len(p) == 1 for p in out["ports"]), out["ports"]
    assert len({p[0] for p in out["ports"]}) == SESSIONS
    # UDP on loopback may drop a few under this burst; most must arrive, in every session.
    assert sum(out["received"]) >= SESSIONS * PER_SESSION * 0.9, out["received"]
    assert min(out["received"]) > 0
    assert peak < MAX_RSS_MIB
    lines = [json.loads(x) for x in relay_log.read_text().splitlines()]
    assert sum(1 for x in lines if x["message"] == "session opened") == SESSIONS
    relay.terminate()
    assert relay.wait(20) == 0
    echo.kill()
    echo.wait()
