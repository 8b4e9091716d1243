"""Helpers for the end-to-end tests: run `wrapguard --config X -- CMD` inside a rig namespace.

Every wrapped run goes through `sys.executable -m wrapguard` with the checkout importable
(`Netns.python_env`), in the rig's client namespace (no default route: a leak fails instead of
leaving the machine). Small Python programs to wrap are passed as `-c` code (`py()`).
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rig.harness import Rig
from rig.netns import Netns

SERVERS = Path(__file__).resolve().parents[1] / "rig" / "servers.py"


# -- programs the tests wrap (kept here to keep the test modules short) ---------------------
# Python socket behaviours under the shim, one JSON line of results (argv: host port).
SEMANTICS = """
import asyncio, errno, json, os, select, socket, sys
P, PORT = sys.argv[1], int(sys.argv[2])
res = {}

def half_close():  # our FIN reaches the server, its FIN comes back after all the data
    s = socket.create_connection((P, PORT), timeout=10)
    f = s.makefile("rb")
    f.readline()
    s.sendall(b"x" * 300000)
    s.shutdown(socket.SHUT_WR)
    return len(f.read())

def nonblocking_early_write():  # as the kernel: EAGAIN until connected, then it flows
    # (the tunnel connection may already be open when connect() returns EINPROGRESS: then
    # the early send goes through, and must arrive first, in order)
    s = socket.socket()
    s.setblocking(False)
    rc = s.connect_ex((P, PORT))
    try:
        s.send(b"too early\\n")
        early = "sent"
    except BlockingIOError:
        early = "EAGAIN"
    select.select([], [s], [], 10)
    err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    s.send(b"early\\n")
    s.setblocking(True)
    s.settimeout(10)
    f = s.makefile("rb")
    first = f.readline().decode().split()[0]
    got = [f.readline().decode().strip() for _ in range(2 if early == "sent" else 1)]
    return [errno.errorcode.get(rc, rc), early, err, first, got]

def v4_mapped():  # an AF_INET6 socket to ::ffff:10.150.0.1 goes through the tunnel as IPv4
    s = socket.socket(socket.AF_INET6)
    s.settimeout(10)
    s.connect(("::ffff:" + P, PORT))
    first = s.makefile("rb").readline().decode().split()[0]
    return [first, list(s.getpeername()[:2]), s.getsockname()[0]]

def dup_then_close():  # the connection survives closing the original fd
    s = socket.create_connection((P, PORT), timeout=10)
    s2 = socket.socket(fileno=os.dup(s.fileno()))
    s.close()
    s2.settimeout(10)
    f = s2.makefile("rb")
    first = f.readline().decode().split()[0]
    s2.sendall(b"dup\\n")
    return [first, f.readline().decode().strip(), list(s2.getpeername()[:2])]

def asyncio_refused():
    async def main():
        try:
            await asyncio.wait_for(asyncio.open_connection(P, 9999), 10)
            return "connected"
        except OSError as e:
            return type(e).__name__
    return asyncio.run(main())

def sequential():  # 300 short connections one after another: no leak of fds or tokens
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(300):
        s = socket.create_connection((P, PORT), timeout=10)
        s.makefile("rb").readline()
        s.close()
    return len(os.listdir("/proc/self/fd")) - before

for fn in (half_close, nonblocking_early_write, v4_mapped, dup_then_close, asyncio_refused,
           sequential):
    res[fn.__name__] = fn()
print(json.dumps(res))
"""


UDP_WHOAMI = """
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 9002))
print("READY", flush=True)
while True:
    data, addr = s.recvfrom(2048)
    s.sendto(addr[0].encode(), addr)
"""

LEAK_PROBES = {
    # an unconnected UDP socket: sendto() carries the destination, connect() is never called
    "udp-sendto": """
        import socket
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(2)
        try:
            s.sendto(b"who am i", (PEER, 9002))
            print(s.recvfrom(100)[0].decode())
        except OSError as e:
            print(type(e).__name__)
    """,
    # TCP Fast Open: sendto(MSG_FASTOPEN) is an implicit connect()
    "tcp-fastopen": """
        import socket
        s = socket.socket()
        try:
            s.sendto(b"fastopen\\n", socket.MSG_FASTOPEN, (PEER, ECHO))
            s.settimeout(5)
            print(s.makefile().readline().split()[0])
        except OSError as e:
            print(type(e).__name__)
    """,
}


# A server for the peer namespace (port 9100): "rst" -> 1000 bytes then an abortive close
# (SO_LINGER 0: RST); anything else -> reports how the client's end arrived ("EOF" or error).
RST_SERVER = """
import socket, struct, time
l = socket.socket()
l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("0.0.0.0", 9100))
l.listen()
print("READY", flush=True)
while True:
    c, a = l.accept()
    if c.recv(3) == b"rst":
        c.sendall(b"x" * 1000)
        time.sleep(0.3)
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.close()
        continue
    try:
        print("EOF" if c.recv(10) == b"" else "data", flush=True)
    except OSError as e:
        print(type(e).__name__, flush=True)
"""

RST_CLIENT = """
import json, socket, struct, sys, time
P = sys.argv[1]
s = socket.create_connection((P, 9100), timeout=10)
s.sendall(b"rst")
n = 0
try:
    while d := s.recv(65536):
        n += len(d)
    res = "EOF"
except OSError as e:
    res = type(e).__name__
s2 = socket.create_connection((P, 9100), timeout=10)
s2.sendall(b"abo")
time.sleep(0.3)
s2.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
s2.close()
time.sleep(0.5)
print(json.dumps({"read": res, "bytes": n}))
"""


def wrap_argv(conf: Path | str, cmd: Sequence[str], extra: Sequence[str] = ()) -> list[str]:
    """The wrapguard command line: `python -m wrapguard --config conf [extra] -- cmd`."""
    return [sys.executable, "-m", "wrapguard", "--config", str(conf), *extra, "--", *cmd]


def py(code: str) -> list[str]:
    """A wrapped Python program given as source (dedented)."""
    return [sys.executable, "-c", textwrap.dedent(code)]


def run_wrapped(
    ns: Netns,
    conf: Path | str,
    cmd: Sequence[str],
    *,
    extra: Sequence[str] = (),
    timeout: float = 60,
    **kwargs: Any,
) -> subprocess.CompletedProcess[Any]:
    """Run the wrapped command in `ns` to its end (never raises on a non-zero exit)."""
    return ns.run(
        wrap_argv(conf, cmd, extra), check=False, timeout=timeout, env=Netns.python_env(), **kwargs
    )


def popen_wrapped(
    ns: Netns, conf: Path | str, cmd: Sequence[str], *, extra: Sequence[str] = (), **kwargs: Any
) -> subprocess.Popen[Any]:
    """Start the wrapped command in `ns` (killed by the namespace's close())."""
    return ns.popen(wrap_argv(conf, cmd, extra), env=Netns.python_env(), **kwargs)


def last_json(stdout: str) -> dict[str, Any]:
    """The last line of a wrapped program's stdout, parsed as JSON."""
    lines = [ln for ln in stdout.splitlines() if ln.strip()]
    assert lines, "the wrapped program printed nothing"
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def explain(r: subprocess.CompletedProcess[Any]) -> str:
    """A readable summary of a wrapped run for assertion messages."""
    return f"rc={r.returncode}\nstdout: {r.stdout!s:.2000}\nstderr: {r.stderr!s:.4000}"


def read_line(proc: subprocess.Popen[Any], timeout: float) -> str:
    """One line from proc.stdout (text or bytes), or AssertionError after `timeout` seconds."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    buf = b""
    deadline = time.monotonic() + timeout
    while not buf.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise AssertionError(f"no line from the wrapped program within {timeout} s: {buf!r}")
        chunk = os.read(fd, 1)
        if not chunk:
            raise AssertionError(f"wrapped program ended its output (rc={proc.poll()}): {buf!r}")
        buf += chunk
    return buf.decode().strip()


def start_tcpecho(ns: Netns, host: str, port: int) -> subprocess.Popen[bytes]:
    """The rig's TCP echo server (first line "ip port" of the client) in `ns`, once READY."""
    proc = ns.python_popen(
        [str(SERVERS), "tcpecho", "--host", host, "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
    )
    line = read_line(proc, 15)
    assert line.startswith("READY"), line
    return proc


def echo_client(host: str, port: int, payload: str = "wrapguard-e2e") -> list[str]:
    """A wrapped Python client of the TCP echo: prints JSON {first, echo, peer, sock}."""
    return py(
        f"""
        import json, socket
        s = socket.create_connection(({host!r}, {port}), timeout=20)
        f = s.makefile("rb")
        first = f.readline().decode().strip()
        s.sendall({payload!r}.encode() + b"\\n")
        echo = f.readline().decode().strip()
        print(json.dumps({{"first": first, "echo": echo, "peer": list(s.getpeername()[:2]),
                          "sock": list(s.getsockname()[:2])}}))
        """
    )


def rig_echo_client(rig: Rig, host: str | None = None) -> list[str]:
    return echo_client(host or rig.peer_tunnel_v4, rig.tcp_echo_port)
