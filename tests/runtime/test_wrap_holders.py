"""End to end, issue 11 finding 3: a tunnel listener or UDP association ends with the
program's socket, however the program went (os._exit here, no close()).

Another local user (uid 65534) then binds the freed loopback port: it must get no tunnel
connection and no datagram, while the peer sees a refused connection instead.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from rig.harness import Rig
from runtime.wraphelp import explain, py, read_line, run_wrapped

NOBODY = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"]

# As another user: bind PORT on loopback (TCP listen or UDP), report what arrives for 6 s.
THIEF = """
import json, socket, sys, time
kind, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM if kind == "tcp" else socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", port))
if kind == "tcp":
    s.listen()
s.settimeout(6)
print("BOUND", flush=True)
got = []
try:
    if kind == "tcp":
        c, a = s.accept()
        c.settimeout(2)
        got.append(["conn", a[0], c.recv(100).decode(errors="replace")])
    else:
        d, a = s.recvfrom(2000)
        got.append(["dgram", a[0], d[:40].hex()])
except OSError as e:
    got.append(["none", type(e).__name__])
print(json.dumps(got), flush=True)
"""


@pytest.fixture(scope="module")
def conf(module_rig: Rig, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return module_rig.write_client_config(
        tmp_path_factory.mktemp("holders") / "c.conf", keepalive=25
    )


def _thief(rig: Rig, kind: str, port: int) -> subprocess.Popen[str]:
    proc = rig.client.popen(
        [*NOBODY, sys.executable, "-c", THIEF, kind, str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert read_line(proc, 10) == "BOUND"
    return proc


def test_tcp_listener_of_a_vanished_program_is_not_handed_on(module_rig: Rig, conf: Path) -> None:
    port = 8731
    server = py(
        f"""
        import os, socket, sys, time
        l = socket.socket()
        l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        l.bind(("0.0.0.0", {port}))
        l.listen()
        print("LISTENING", flush=True)
        time.sleep(1.0)
        os._exit(0)  # no close(): the kernel frees the port, we never say UNLISTEN
        """
    )
    # The program exits, wrapguard too; a background sleep keeps the launcher (and its
    # listener, if it leaked) alive while the thief takes the port.
    script = f"{shlex.join(server)} ; sleep 8 >/dev/null 2>&1 & exit 0"
    log = Path(str(conf) + ".tcp.log")
    r = run_wrapped(
        module_rig.client, conf, ["sh", "-c", script], extra=["--log-file", str(log)],
        timeout=30, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    assert r.returncode == 0, explain(r)
    thief = _thief(module_rig, "tcp", port)
    time.sleep(0.5)
    probe = textwrap.dedent(
        f"""
        import socket
        try:
            s = socket.create_connection(({module_rig.our_tunnel_v4!r}, {port}), timeout=5)
            s.sendall(b"SECRET-from-the-peer")
            s.settimeout(3)
            print("reply:", s.recv(100))
        except OSError as e:
            print(type(e).__name__)
        """
    )
    pr = module_rig.peer.ns.run([sys.executable, "-c", probe], check=False, timeout=30)
    out, _ = thief.communicate(timeout=15)
    got = json.loads(out.strip().splitlines()[-1])
    assert got[0][0] == "none", f"another user received a tunnel connection: {got}"
    assert "ConnectionRefused" in pr.stdout or "ConnectionReset" in pr.stdout, pr.stdout
    assert "stopped listening on the tunnel" in log.read_text(), log.read_text()


def test_udp_reply_for_a_vanished_client_is_not_handed_on(module_rig: Rig, conf: Path) -> None:
    """A wrapped UDP client sends to a peer service that answers late, then exits without
    close(); another user binds its loopback port: the late answer must not reach them."""
    late = module_rig.peer.ns.python_popen(
        [
            "-c",
            textwrap.dedent(
                """
                import socket, time
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                s.bind(("0.0.0.0", 9011))
                print("READY", flush=True)
                while True:
                    d, a = s.recvfrom(2000)
                    time.sleep(3.0)
                    s.sendto(b"SECRET-late-" + d, a)
                """
            ),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert read_line(late, 10) == "READY"
        client = py(
            f"""
            import os, socket
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.sendto(b"hello", ({module_rig.peer_tunnel_v4!r}, 9011))
            print(s.getsockname()[1], flush=True)
            os._exit(0)
            """
        )
        script = f"{shlex.join(client)} ; sleep 8 >/dev/null 2>&1 & exit 0"
        r = run_wrapped(
            module_rig.client, conf, ["sh", "-c", script], timeout=30,
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        assert r.returncode == 0, explain(r)
        port = int(r.stdout.strip().splitlines()[0])
        thief = _thief(module_rig, "udp", port)
        out, _ = thief.communicate(timeout=15)
        got = json.loads(out.strip().splitlines()[-1])
        assert got[0][0] == "none", f"another user received the tunnel's reply: {got}"
    finally:
        late.kill()
        late.wait()


def test_bound_udp_port_of_a_vanished_server_is_not_handed_on(module_rig: Rig, conf: Path) -> None:
    port = 8733
    server = py(
        f"""
        import os, socket, time
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", {port}))
        time.sleep(1.0)
        os._exit(0)  # no close(): the port is free, no UDP_RELEASE was sent
        """
    )
    script = f"{shlex.join(server)} ; sleep 8 >/dev/null 2>&1 & exit 0"
    r = run_wrapped(
        module_rig.client, conf, ["sh", "-c", script], timeout=30,
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    assert r.returncode == 0, explain(r)
    thief = _thief(module_rig, "udp", port)
    time.sleep(0.5)
    send = textwrap.dedent(
        f"""
        import socket, time
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for _ in range(5):
            s.sendto(b"SECRET-to-the-server", ({module_rig.our_tunnel_v4!r}, {port}))
            time.sleep(0.2)
        """
    )
    module_rig.peer.ns.run([sys.executable, "-c", send], check=False, timeout=30)
    out, _ = thief.communicate(timeout=15)
    got = json.loads(out.strip().splitlines()[-1])
    assert got[0][0] == "none", f"another user received datagrams for the tunnel port: {got}"
