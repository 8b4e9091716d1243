"""Programs the shim cannot load into never carry tunnelled traffic out directly.

The kernel runs a program in secure-execution mode (AT_SECURE: ld.so ignores LD_PRELOAD) when
its exec raises privileges: file capabilities for a caller that is not root, a setuid/setgid
bit that changes the effective ids. A static program has no loader to preload into at all.
The client namespace gets a route to 10.150.0.0/24 via the peer's veth (as a host with a
default route has), so a program that ran without the shim would reach the peer directly; a
server in the peer namespace reports every connection's source address and request path.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from rig.harness import Rig
from rig.netns import Netns
from runtime.wraphelp import explain, read_line, run_wrapped, wrap_argv

RIG_OPTIONS: dict[str, object] = {}
WHOAMI_PORT = 9300
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"]

# In the peer namespace: one JSON line [source ip, request path] per connection to the log,
# and an HTTP answer with the source ip (so a wrapped curl shows which way it went).
WHOAMI = """
import json, socket, sys, threading
log = sys.argv[1]
l = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("0.0.0.0", int(sys.argv[2])))
l.listen(64)
print("READY", flush=True)
lock = threading.Lock()
def serve(c, addr):
    c.settimeout(5)
    try:
        path = c.recv(4096).split(b" ")[1].decode()
    except (OSError, IndexError):
        path = "?"
    with lock, open(log, "a") as f:
        f.write(json.dumps([addr[0], path]) + "\\n")
    body = addr[0].encode()
    c.sendall(b"HTTP/1.0 200 OK\\r\\nContent-Length: %d\\r\\n\\r\\n%s" % (len(body), body))
    c.close()
while True:
    c, addr = l.accept()
    threading.Thread(target=serve, args=(c, addr), daemon=True).start()
"""

# A static client (no PT_INTERP: nothing can preload into it) that connects and says its path.
STATIC_CLIENT = r"""
#include <arpa/inet.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
int main(int argc, char **argv) {
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[2]))};
    inet_pton(AF_INET, argv[1], &a.sin_addr);
    int s = socket(AF_INET, SOCK_STREAM, 0);
    if (connect(s, (struct sockaddr *)&a, sizeof a) != 0) { perror("connect"); return 7; }
    char req[256];
    snprintf(req, sizeof req, "GET %s HTTP/1.0\r\n\r\n", argv[3]);
    write(s, req, strlen(req));
    char buf[512];
    ssize_t n = read(s, buf, sizeof buf);
    if (n > 0) fwrite(buf, 1, n, stdout);
    return 0;
}
"""


def _exec_dir() -> Path:
    """A world-readable directory on a mount that honours setuid bits and file capabilities
    (a nosuid /tmp would make the kernel ignore them, and the test prove nothing)."""
    for base in (tempfile.gettempdir(), "/var/tmp", str(Path(__file__).resolve().parents[2])):
        if os.path.isdir(base) and not os.statvfs(base).f_flag & os.ST_NOSUID:
            d = Path(tempfile.mkdtemp(prefix="wg-bypass-", dir=base))
            d.chmod(0o755)
            return d
    pytest.fail("no directory on a mount without nosuid for the setuid/capability copies")


@pytest.fixture(scope="module")
def programs() -> Iterator[dict[str, str]]:
    """Copies of curl: `cap` with cap_net_bind_service=ep, `suid` setuid to nobody; `static`,
    a static client; `conf_dir` for nobody's config."""
    setcap = shutil.which("setcap") or "/usr/sbin/setcap"
    curl, cc = shutil.which("curl"), shutil.which("cc")
    assert curl and cc, "curl and cc are installed by scripts/install-system-deps.sh"
    assert os.path.exists(setcap), "setcap is installed by scripts/install-system-deps.sh"
    d = _exec_dir()
    try:
        cap, suid, static = d / "capcurl", d / "suidcurl", d / "staticclient"
        shutil.copy(curl, cap)
        subprocess.run([setcap, "cap_net_bind_service=ep", str(cap)], check=True, timeout=30)
        shutil.copy(curl, suid)
        os.chown(suid, 65534, 65534)
        suid.chmod(0o4755)
        (d / "static.c").write_text(STATIC_CLIENT)
        subprocess.run(
            [cc, "-static", "-O", "-o", str(static), str(d / "static.c")], check=True, timeout=120
        )
        yield {"cap": str(cap), "suid": str(suid), "static": str(static), "dir": str(d)}
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def whoami(module_rig: Rig, programs: dict[str, str]) -> Iterator[Path]:
    """The peer's whoami server (its log), and the client namespace's route that would carry
    a bypass. The route is proven: an unwrapped capability curl run as nobody gets through
    directly (so the tests below could fail)."""
    rig = module_rig
    log = rig.workdir / "whoami.jsonl"
    log.touch()
    server = rig.peer.ns.python_popen(
        ["-c", WHOAMI, str(log), str(WHOAMI_PORT)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
    )
    assert read_line(server, 15) == "READY"
    rig.client.run(["ip", "route", "add", "10.150.0.0/24", "via", rig.peer.veth_v4])
    r = rig.client.run([*NOBODY, programs["cap"], "-sS", "--max-time", "10", url(rig, "/proof")])
    assert r.stdout == rig.client_veth_v4, explain(r)
    assert seen(log, "/proof") == [rig.client_veth_v4]
    yield log


def url(rig: Rig, path: str) -> str:
    return f"http://{rig.peer_tunnel_v4}:{WHOAMI_PORT}{path}"


def seen(log: Path, path: str, settle: float = 0.0) -> list[str]:
    """The source addresses the peer's server saw for requests to `path`."""
    time.sleep(settle)
    rows = [json.loads(ln) for ln in log.read_text().splitlines() if ln.strip()]
    return [ip for ip, p in rows if p == path]


def nobody_conf(rig: Rig, programs: dict[str, str], name: str) -> Path:
    """Our config, readable by nobody (its owner, mode 600) in a directory nobody can reach."""
    conf = rig.write_client_config(Path(programs["dir"]) / name)
    os.chown(conf, 65534, 65534)
    conf.chmod(0o600)
    return conf


def test_a_capability_program_is_refused_at_launch(
    module_rig: Rig, programs: dict[str, str], whoami: Path
) -> None:
    """As nobody: one clear line, exit 1, and nothing reached the peer."""
    rig = module_rig
    conf = nobody_conf(rig, programs, "launch.conf")
    argv = wrap_argv(conf, [programs["cap"], "-sS", "--max-time", "10", url(rig, "/launch")])
    r = rig.client.run([*NOBODY, *argv], check=False, timeout=60, env=Netns.python_env())
    assert r.returncode == 1, explain(r)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, explain(r)
    line = lines[0]
    assert "refusing to run" in line and programs["cap"] in line, line
    assert "file capabilities (cap_net_bind_service=ep)" in line and "secure-execution" in line
    assert "Traceback" not in r.stderr
    assert seen(whoami, "/launch", settle=0.5) == []


def test_as_root_a_capability_program_keeps_the_shim(
    module_rig: Rig, programs: dict[str, str], whoami: Path, tmp_path: Path
) -> None:
    """For a root caller the kernel does not use secure-execution mode for file capabilities:
    the shim loads, so wrapguard runs it, through the tunnel."""
    rig = module_rig
    conf = rig.write_client_config(tmp_path / "c.conf")
    r = run_wrapped(
        rig.client, conf, [programs["cap"], "-sS", "--max-time", "10", url(rig, "/root")]
    )
    assert r.returncode == 0, explain(r)
    assert r.stdout == rig.our_tunnel_v4, explain(r)
    assert seen(whoami, "/root") == [rig.our_tunnel_v4]


def test_static_program_execed_later_goes_through_the_tunnel(
    module_rig: Rig, programs: dict[str, str], whoami: Path, tmp_path: Path
) -> None:
    """By default (--intercept auto) the wrapped bash's exec of the static client is handed to
    the seccomp door (docs/seccomp.md): it runs, and the peer sees our tunnel address."""
    rig = module_rig
    conf = rig.write_client_config(tmp_path / "c.conf")
    path = "/shell-static-seccomp"
    script = f"{programs['static']} {rig.peer_tunnel_v4} {WHOAMI_PORT} {path}; echo rc=$?"
    r = run_wrapped(rig.client, conf, ["bash", "-c", script], extra=["--log-level", "warn"])
    assert r.returncode == 0, explain(r)
    assert r.stdout.endswith(f"{rig.our_tunnel_v4}rc=0\n"), explain(r)  # the body, then rc
    assert seen(whoami, path, settle=0.5) == [rig.our_tunnel_v4]


@pytest.mark.parametrize("kind", ["cap", "suid", "static"])
def test_a_wrapped_shell_cannot_exec_a_program_that_bypasses_the_shim(
    module_rig: Rig, programs: dict[str, str], whoami: Path, tmp_path: Path, kind: str
) -> None:
    """A wrapped bash execs it: the exec hook refuses (EPERM, bash: "Operation not
    permitted", 126), and nothing reached the peer directly. The capability copy is tried by a
    bash running as nobody (for root the kernel keeps LD_PRELOAD), the setuid-to-nobody copy
    and the static client by a root bash."""
    rig = module_rig
    conf = rig.write_client_config(tmp_path / "c.conf")
    path = f"/shell-{kind}"
    if kind == "static":
        attempt = f"{programs['static']} {rig.peer_tunnel_v4} {WHOAMI_PORT} {path}"
    else:
        attempt = f"{programs[kind]} -sS --max-time 10 {url(rig, path)}"
    script = f"{attempt}; echo rc=$?"
    cmd = [*(NOBODY if kind == "cap" else []), "bash", "-c", script]
    # A static program is refused with the preload door alone; by default it is handed
    # to the seccomp door instead (test_static_program_execed_later_goes_through_the_tunnel).
    extra = ["--log-level", "warn", *(["--intercept", "preload"] if kind == "static" else [])]
    r = run_wrapped(rig.client, conf, cmd, extra=extra)
    assert r.returncode == 0, explain(r)
    assert r.stdout.strip().splitlines()[-1] == "rc=126", explain(r)
    assert "Operation not permitted" in r.stderr, explain(r)
    assert seen(whoami, path, settle=0.5) == [], "it went around the tunnel"
    # The same shell still reaches the peer through the tunnel with a program it can wrap.
    if kind != "cap":  # (nobody cannot reach root's control socket: that fails closed)
        ok = run_wrapped(
            rig.client, conf, ["bash", "-c", f"curl -sS --max-time 10 {url(rig, path + '-ok')}"]
        )
        assert ok.stdout == rig.our_tunnel_v4, explain(ok)
