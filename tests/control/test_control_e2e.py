"""The control socket end to end: a wrapped program in the rig's client namespace, the real
wireguard-go peer, and curl on the control socket (issue 12, "Done when").

The wrapped program connects to the peer's TCP echo server whenever the test asks; the echo
server's first line is the client address it saw. The client namespace has a route that
would carry 10.150.0.0/24 out of the veth, so a bypassed connection shows up with the veth
address instead of the tunnel address (testing.md, "Make bypasses visible").
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pytest
from control.test_control import as_nobody, parse_prometheus
from rig.harness import Rig
from rig.netns import Netns
from runtime.wraphelp import py, read_line, wrap_argv

RIG_OPTIONS: dict[str, object] = {}
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"]

# Wrapped: one connection per line "host port" on stdin; prints the echo server's first line.
ON_DEMAND = """
import socket, sys
for line in sys.stdin:
    host, port = line.split()
    try:
        s = socket.create_connection((host, int(port)), timeout=15)
        first = s.makefile("rb").readline().decode().strip()
        s.close()
    except OSError as e:
        first = "error " + type(e).__name__
    print(first or "error empty", flush=True)
"""


@dataclass
class Wrapped:
    proc: subprocess.Popen[Any]
    control: str
    stderr: Path

    def connect(self, host: str, port: int) -> str:
        """The client address the echo server saw for one new wrapped connection."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{host} {port}\n".encode())
        self.proc.stdin.flush()
        line = read_line(self.proc, 40)
        assert not line.startswith("error"), f"{line}\n{self.log()}"
        return line.split()[0].removeprefix("::ffff:")

    def log(self) -> str:
        return self.stderr.read_text()[-4000:]


def wait_for_socket(path: str, proc: subprocess.Popen[Any], log: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"wrapguard exited: rc={proc.returncode}\n{log.read_text()}"
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(path)
            return
        except OSError:
            time.sleep(0.1)
        finally:
            s.close()
    raise AssertionError(f"no control socket at {path} after {timeout} s\n{log.read_text()}")


def start_wrapped(
    rig: Rig, name: str, extra: list[str], env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[Any], Path, IO[bytes]]:
    conf = rig.write_client_config(rig.workdir / f"{name}.conf")
    errlog = rig.workdir / f"{name}.stderr"
    err = errlog.open("wb")
    proc = rig.client.popen(
        wrap_argv(conf, py(ON_DEMAND), extra),
        env=env or Netns.python_env(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=err,
    )
    return proc, errlog, err


@pytest.fixture(scope="module")
def veth_route(module_rig: Rig) -> str:
    """The route that makes a bypass visible, proven: an unwrapped client in the namespace
    reaches the echo server over the veth (so the bypass test below can fail)."""
    rig = module_rig
    rig.client.run(["ip", "route", "add", "10.150.0.0/24", "via", rig.peer.veth_v4])
    code = (
        f"import socket; s = socket.create_connection(({rig.peer_tunnel_v4!r}, "
        f"{rig.tcp_echo_port}), timeout=10); "
        "print(s.makefile('rb').readline().decode().split()[0])"
    )
    r = rig.client.run([sys.executable, "-c", code], check=False, timeout=30)
    assert r.stdout.strip().removeprefix("::ffff:") == rig.client_veth_v4, r
    return rig.client_veth_v4


@pytest.fixture(scope="module")
def wrapped(module_rig: Rig, veth_route: str) -> Iterator[Wrapped]:
    rig = module_rig
    base = Path(tempfile.mkdtemp(prefix="wgctl-"))
    base.chmod(0o755)  # anyone may walk up to ctl/: only our own modes keep them out
    control = str(base / "ctl" / "wg.sock")
    try:
        proc, errlog, err = start_wrapped(rig, "ctl", ["--control", control])
        try:
            wait_for_socket(control, proc, errlog)
            yield Wrapped(proc, control, errlog)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
            err.close()
    finally:
        subprocess.run(["rm", "-rf", str(base)], check=False)


def curl(
    rig: Rig, path: str, *args: str, as_nobody: bool = False
) -> subprocess.CompletedProcess[str]:
    argv = ["curl", "-sS", "--max-time", "20", "--unix-socket", path, *args]
    return rig.client.run([*NOBODY, *argv] if as_nobody else argv, check=False, timeout=30)


def curl_json(rig: Rig, path: str, *args: str) -> Any:
    r = curl(rig, path, *args)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_state_names_the_peer_and_its_endpoint(module_rig: Rig, wrapped: Wrapped) -> None:
    rig = module_rig
    assert wrapped.connect(rig.peer_tunnel_v4, rig.tcp_echo_port) == rig.our_tunnel_v4
    state = curl_json(rig, wrapped.control, "http://localhost/state")
    [peer] = state["peers"]
    assert peer["public_key"] == rig.peer_public_key.to_base64()
    assert peer["endpoint"] == rig.peer.endpoint_str()
    assert peer["latest_handshake"] and abs(peer["latest_handshake"] - time.time()) < 300
    assert peer["rx_bytes"] > 0 and peer["tx_bytes"] > 0
    assert f"{rig.our_tunnel_v4}/32" in state["interface"]["addresses"]
    assert state["interface"]["public_key"] == rig.our_public_key.to_base64()


def test_bypass_changes_where_the_next_connection_goes(
    module_rig: Rig, wrapped: Wrapped, veth_route: str
) -> None:
    rig = module_rig
    target = (rig.peer_tunnel_v4, rig.tcp_echo_port)
    assert wrapped.connect(*target) == rig.our_tunnel_v4  # through the tunnel
    added = curl_json(rig, wrapped.control, "-d", json.dumps([rig.peer_tunnel_v4]),
                      "http://localhost/bypass")  # fmt: skip
    assert added == [{"cidr": f"{rig.peer_tunnel_v4}/32", "automatic": False}]
    assert wrapped.connect(*target) == veth_route  # the next connection goes direct
    assert curl_json(rig, wrapped.control, "http://localhost/bypass") == added
    # A bad entry: 400, named, and nothing changes.
    r = curl(rig, wrapped.control, "-w", "\n%{http_code}", "-d", '["10.150.0.9", "nope"]',
             "http://localhost/bypass")  # fmt: skip
    body, _, status = r.stdout.rpartition("\n")
    assert status == "400" and json.loads(body)["entry"] == "nope", r.stdout
    assert curl_json(rig, wrapped.control, "http://localhost/bypass") == added
    assert curl_json(rig, wrapped.control, "-X", "DELETE", "http://localhost/bypass") == []
    assert wrapped.connect(*target) == rig.our_tunnel_v4  # back into the tunnel


def test_metrics_parse_as_prometheus_text(module_rig: Rig, wrapped: Wrapped) -> None:
    rig = module_rig
    wrapped.connect(rig.peer_tunnel_v4, rig.tcp_echo_port)
    r = curl(rig, wrapped.control, "-i", "http://localhost/metrics")
    assert r.returncode == 0, r.stderr
    head, _, text = r.stdout.replace("\r\n", "\n").partition("\n\n")
    assert "content-type: text/plain; version=0.0.4" in head.lower()
    fams = parse_prometheus(text)
    key = rig.peer_public_key.to_base64()
    [(labels, rx)] = fams["wrapguard_peer_rx_bytes"]
    assert labels == {"peer": key} and rx > 0
    assert fams["wrapguard_peer_tx_bytes"][0][1] > 0
    assert fams["wrapguard_peer_latest_handshake_seconds"][0][1] > 0
    assert {lb["proto"] for lb, _ in fams["wrapguard_flows"]} == {"tcp", "udp"}
    assert "wrapguard_drops_total" in fams


def test_show_prints_the_peer(module_rig: Rig, wrapped: Wrapped) -> None:
    rig = module_rig
    r = rig.client.run(
        [sys.executable, "-m", "wrapguard", "show", "--control", wrapped.control],
        check=False,
        timeout=30,
        env=Netns.python_env(),
    )
    assert r.returncode == 0, r.stderr
    assert f"peer: {rig.peer_public_key.to_base64()}\n" in r.stdout
    assert f"  endpoint: {rig.peer.endpoint_str()}\n" in r.stdout
    handshake = r.stdout.split("  latest handshake: ")[1].split("\n")[0]
    assert handshake == "Now" or handshake.endswith(" ago"), r.stdout
    assert "received, " in r.stdout
    # Nothing there: one line, exit 1.
    r = rig.client.run(
        [sys.executable, "-m", "wrapguard", "show", "--control", wrapped.control + ".x"],
        check=False,
        timeout=30,
        env=Netns.python_env(),
    )
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


def test_another_uid_is_refused(module_rig: Rig, wrapped: Wrapped) -> None:
    rig = module_rig
    key = rig.peer_public_key.to_base64()
    directory = os.path.dirname(wrapped.control)
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    assert stat.S_IMODE(os.lstat(wrapped.control).st_mode) == 0o600
    r = curl(rig, wrapped.control, "http://localhost/state", as_nobody=True)
    assert r.returncode == 7 and key not in r.stdout, r  # 7: could not connect (EACCES)
    # Modes opened up by mistake: SO_PEERCRED still closes the connection at once. (A child
    # that reports its connect() and what it read: curl may call a connection closed at
    # once "could not connect" too.)
    os.chmod(directory, 0o755)
    os.chmod(wrapped.control, 0o666)
    try:
        result = as_nobody(wrapped.control)
        assert result["connect"] == 0 and "HTTP" not in result["got"], result
        assert key not in result["got"]
    finally:
        os.chmod(directory, 0o700)
        os.chmod(wrapped.control, 0o600)
    assert curl_json(rig, wrapped.control, "http://localhost/state")["peers"]  # still ours


def test_socket_removed_when_the_program_ends(module_rig: Rig, wrapped: Wrapped) -> None:
    assert wrapped.proc.stdin is not None
    wrapped.proc.stdin.close()  # the wrapped program ends
    assert wrapped.proc.wait(60) == 0, wrapped.log()
    deadline = time.monotonic() + 30  # a forked launcher may drain a moment longer
    while os.path.lexists(wrapped.control) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not os.path.lexists(wrapped.control), wrapped.log()


def test_default_path_and_show_finds_it(module_rig: Rig, tmp_path: Path) -> None:
    """No --control: the socket is $XDG_RUNTIME_DIR/wrapguard/<config stem>.sock, logged, and
    `wrapguard show` with no path finds it. (No traffic: the module's other launcher may
    still hold the key's session.)"""
    rig = module_rig
    xdg = tmp_path / "xdg"
    xdg.mkdir(mode=0o700)
    (xdg / "tmp").mkdir(mode=0o700)  # show also looks in <tempdir>/wrapguard-<uid>: others'
    env = {**Netns.python_env(), "XDG_RUNTIME_DIR": str(xdg), "TMPDIR": str(xdg / "tmp")}
    proc, errlog, err = start_wrapped(rig, "office", [], env=env)
    try:
        path = str(xdg / "wrapguard" / "office.sock")
        wait_for_socket(path, proc, errlog)
        logged = [json.loads(ln) for ln in errlog.read_text().splitlines() if ln.startswith("{")]
        assert any(e.get("message") == "control socket" and e.get("path") == path
                   for e in logged), errlog.read_text()  # fmt: skip
        r = rig.client.run(
            [sys.executable, "-m", "wrapguard", "show"], check=False, timeout=30, env=env
        )
        assert r.returncode == 0, r.stderr
        assert f"peer: {rig.peer_public_key.to_base64()}\n" in r.stdout
        assert proc.stdin is not None
        proc.stdin.close()
        assert proc.wait(60) == 0, errlog.read_text()
        deadline = time.monotonic() + 30
        while os.path.lexists(path) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not os.path.lexists(path)
        r = rig.client.run(
            [sys.executable, "-m", "wrapguard", "show"], check=False, timeout=30, env=env
        )
        assert r.returncode == 1 and "no running wrapguard" in r.stderr, r.stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        err.close()


SOCKS_PORT = 10800


def wait_for_port(rig: Rig, port: int, proc: subprocess.Popen[Any], log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"wrapguard exited: rc={proc.returncode}\n{log.read_text()}"
        s = rig.client.socket()
        try:
            s.connect(("127.0.0.1", port))
            return
        except OSError:
            time.sleep(0.1)
        finally:
            s.close()
    raise AssertionError(f"nothing listens on 127.0.0.1:{port}\n{log.read_text()}")


def socks_connect_first_line(rig: Rig, host: str, port: int) -> str:
    """Through the SOCKS5 door (RFC 1928, no auth): the echo server's first word."""
    s = rig.client.socket()
    s.settimeout(20)
    try:
        s.connect(("127.0.0.1", SOCKS_PORT))
        s.sendall(b"\x05\x01\x00")
        assert s.recv(2) == b"\x05\x00"
        s.sendall(b"\x05\x01\x00\x01" + socket.inet_aton(host) + port.to_bytes(2, "big"))
        f = s.makefile("rb")
        head = f.read(4)
        assert head[:2] == b"\x05\x00", head  # succeeded
        f.read({1: 4, 4: 16}[head[3]] + 2)  # BND.ADDR, BND.PORT
        return f.readline().decode().split()[0].removeprefix("::ffff:")
    finally:
        s.close()


def test_daemon_bypass_for_the_socks5_door(
    module_rig: Rig, veth_route: str, tmp_path: Path
) -> None:
    """The proxy daemon (no command) with --control: the bypass list steers the SOCKS5
    door's next connection too, and SIGTERM removes the socket. (After the wrapped program
    above has ended: one launcher per key at a time.)"""
    rig = module_rig
    control = str(tmp_path / "d.sock")
    conf = rig.write_client_config(rig.workdir / "daemon.conf")
    errlog = rig.workdir / "daemon.stderr"
    argv = [sys.executable, "-m", "wrapguard", "--config", str(conf),
            "--socks5", f"127.0.0.1:{SOCKS_PORT}", "--control", control]  # fmt: skip
    with errlog.open("wb") as err:
        proc = rig.client.popen(argv, env=Netns.python_env(), stdout=err, stderr=err)
    try:
        wait_for_socket(control, proc, errlog)
        wait_for_port(rig, SOCKS_PORT, proc, errlog)  # the control socket starts first
        target = (rig.peer_tunnel_v4, rig.tcp_echo_port)
        assert socks_connect_first_line(rig, *target) == rig.our_tunnel_v4
        curl_json(rig, control, "-d", json.dumps({"add": [rig.peer_tunnel_v4 + "/32"]}),
                  "http://localhost/bypass")  # fmt: skip
        assert socks_connect_first_line(rig, *target) == veth_route
        assert curl_json(rig, control, "-X", "DELETE", "http://localhost/bypass") == []
        assert socks_connect_first_line(rig, *target) == rig.our_tunnel_v4
        state = curl_json(rig, control, "http://localhost/state")
        assert any(f["kind"] == "socks5" for f in state["frontends"]), state["frontends"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, errlog.read_text()
        assert not os.path.lexists(control), errlog.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
