"""End to end, issue 11 finding 2: after kill -9 of the launcher, the processes it served
neither leak to nor accept from another local user who takes over the freed ports.

A background UDP client (a descendant: it outlives the launcher) talks to the peer's echo
through the tunnel; the launcher is killed; another uid (65534) binds the freed relay port
and sends forged "tunnel" datagrams to the client's socket. The client's sends must fail
closed, nothing may reach the thief, and no forged datagram may reach the client.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from rig.harness import Rig
from runtime.wraphelp import read_line, wrap_argv

NOBODY = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"]

CLIENT = """
import json, os, socket, sys, time
peer, echo, go, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(5)
s.sendto(b"hello", (peer, echo))
first = s.recvfrom(100)
ready = {"port": s.getsockname()[1], "relay": int(os.environ["WRAPGUARD_UDP"].split("/")[0]),
         "first": [first[0].decode(), first[1][0]]}
open(out + ".ready", "w").write(json.dumps(ready))
while not os.path.exists(go):
    time.sleep(0.05)
res = {"send": [], "got": []}
s.settimeout(0.3)
for i in range(8):
    try:
        s.sendto(b"SECRET-%d" % i, (peer, echo))
        res["send"].append("ok")
    except OSError as e:
        res["send"].append(type(e).__name__)
    try:
        d, a = s.recvfrom(200)
        res["got"].append([d.decode(errors="replace"), a[0], a[1]])
    except OSError:
        pass
open(out, "w").write(json.dumps(res))
"""

# Another user: bind the relay port, send forged relay datagrams (a made-up token) to the
# client, and report what reached the relay port.
THIEF = """
import json, socket, struct, sys, time
relay, victim = int(sys.argv[1]), int(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", relay))
print("BOUND", flush=True)
src = bytes([4]) + bytes([10, 150, 0, 1]) + bytes(12) + struct.pack("!H", 9001)
forged = bytes([1, 0]) + src + b"\\x55" * 16 + b"FORGED"
s.settimeout(0.2)
got = []
end = time.monotonic() + 4
while time.monotonic() < end:
    s.sendto(forged, ("127.0.0.1", victim))
    try:
        d, a = s.recvfrom(2000)
        got.append(d[-40:].hex())
    except OSError:
        pass
print(json.dumps(got), flush=True)
"""


@pytest.fixture(scope="module")
def conf(module_rig: Rig, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return module_rig.write_client_config(tmp_path_factory.mktemp("killed") / "c.conf")


def _wait(path: Path, timeout: float) -> str:
    end = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > end:
            raise AssertionError(f"{path} did not appear within {timeout} s")
        time.sleep(0.05)
    time.sleep(0.05)
    return path.read_text()


def test_killed_launcher_leaks_nothing_and_accepts_no_forgery(
    module_rig: Rig, conf: Path, tmp_path: Path
) -> None:
    rig = module_rig
    go, out, log = tmp_path / "go", tmp_path / "client.json", tmp_path / "wg.log"
    client = f'{sys.executable} -c "$CLIENT" {rig.peer_tunnel_v4} {rig.udp_echo_port} {go} {out}'
    proc = rig.client.popen(
        wrap_argv(
            conf,
            ["sh", "-c", f"{client} </dev/null >/dev/null 2>&1 & exit 0"],
            ["--log-file", str(log)],
        ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**rig.client.python_env(), "CLIENT": textwrap.dedent(CLIENT)},
    )
    assert proc.wait(30) == 0, log.read_text()
    ready = json.loads(_wait(Path(str(out) + ".ready"), 20))
    assert ready["first"] == ["hello", rig.peer_tunnel_v4], ready
    bg = [json.loads(ln) for ln in log.read_text().splitlines() if "background" in ln]
    os.kill(int(bg[0]["launcher_pid"]), signal.SIGKILL)
    time.sleep(0.3)
    thief = rig.client.popen(
        [*NOBODY, sys.executable, "-c", THIEF, str(ready["relay"]), str(ready["port"])],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert read_line(thief, 10) == "BOUND"
    go.write_text("go")
    res = json.loads(_wait(out, 20))
    stolen, _ = thief.communicate(timeout=20)
    assert json.loads(stolen.strip().splitlines()[-1]) == [], "the thief received our datagrams"
    assert res["got"] == [], f"the client accepted forged or stray datagrams: {res['got']}"
    assert res["send"] and all(r != "ok" for r in res["send"]), res["send"]
