"""Another local user attacks the launcher's loopback data listener (issue 11, finding 4).

uid 65534 (started in the rig's client namespace, `os.setuid` in the child) floods every
loopback TCP listener of the launcher with thousands of silent connections and with connect
churn, while a wrapped program makes sequential connects through the tunnel (IPv4 and IPv6
destinations in turn). The program's connects must all succeed and take at most twice their
unflooded time: the flood must cost the attacker, not us (docs/channel.md, "Security").
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from rig.harness import Rig
from runtime.wraphelp import popen_wrapped, py, read_line

CONNECTS = 100  # per phase
HOLD = 5000  # silent connections the attacker keeps open at a time
RATE = 25000  # the attacker's connects per second: the old listener lost 5x at this rate

# The wrapped program: one phase per "go" line on stdin; per phase, CONNECTS sequential
# connects to the echo server (v4 and v6 in turn), each read its first line and closed.
PROGRAM = f"""
import json, socket, sys, time
hosts = sys.argv[1:3]
port = int(sys.argv[3])
print("READY", flush=True)
for line in sys.stdin:
    t0, failed = time.monotonic(), []
    for i in range({CONNECTS}):
        try:
            s = socket.create_connection((hosts[i % 2], port), timeout=20)
            s.settimeout(20)
            if not s.makefile("rb").readline():
                failed.append("no line")
            s.close()
        except OSError as e:
            failed.append(repr(e))
    print(json.dumps({{"s": time.monotonic() - t0, "failed": failed}}), flush=True)
"""

# The attacker, as uid 65534: connects to the launcher's loopback listeners (found as any local
# user finds them, in /proc/net/tcp*) at RATE per second until killed, keeping the last HOLD
# connections open and silent (the oldest closed for each new one: churn).
ATTACKER = f"""
import collections, os, resource, socket, sys, time
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
hold = min({HOLD}, hard - 64)
os.setgroups([])
os.setgid(65534)
os.setuid(65534)
ports = [int(p) for p in sys.argv[1:]]
targets = [(socket.AF_INET, ("127.0.0.1", p)) for p in ports]
targets += [(socket.AF_INET6, ("::1", p)) for p in ports]
held, n, i = collections.deque(), 0, 0
print("READY", flush=True)
t0 = time.monotonic()
while True:
    if n % 100 == 0 and (ahead := t0 + n / {RATE} - time.monotonic()) > 0:
        time.sleep(ahead)
    fam, addr = targets[i % len(targets)]
    i += 1
    s = socket.socket(fam)
    s.setblocking(False)
    try:
        s.connect(addr)
    except BlockingIOError:
        pass
    except OSError:
        s.close()
        n += 1
        continue
    n += 1
    held.append(s)
    if len(held) > hold:
        held.popleft().close()
"""


def loopback_listeners(rig: Rig) -> list[int]:
    """Ports of root's TCP listeners on 127.0.0.1/::1 in the client namespace (the rig's own
    resolver on port 53 aside): what another user sees in /proc/net/tcp and tcp6."""
    out = rig.client.run(["cat", "/proc/net/tcp", "/proc/net/tcp6"]).stdout
    ports = set()
    for line in out.splitlines()[1:]:
        f = line.split()
        if len(f) < 8 or f[3] != "0A" or f[7] != "0":  # LISTEN, uid 0
            continue
        addr, port = f[1].rsplit(":", 1)
        if addr in ("0100007F", "00000000000000000000000001000000") and int(port, 16) != 53:
            ports.add(int(port, 16))
    return sorted(ports)


@pytest.fixture(scope="module")
def program(module_rig: Rig, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    conf: Path = module_rig.write_client_config(tmp_path_factory.mktemp("attack") / "c.conf")
    hosts = [module_rig.peer_tunnel_v4, module_rig.peer_tunnel_v6]
    argv = [*py(PROGRAM), *hosts, str(module_rig.tcp_echo_port)]
    proc = popen_wrapped(
        module_rig.client, conf, argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    assert read_line(proc, 30) == "READY"
    yield proc
    proc.kill()
    proc.wait()


def phase(proc: Any) -> dict[str, Any]:
    proc.stdin.write(b"go\n")
    proc.stdin.flush()
    result: dict[str, Any] = json.loads(read_line(proc, 120))
    return result


def test_a_flood_of_the_data_listener_costs_the_attacker_not_our_connects(
    module_rig: Rig, program: Any
) -> None:
    flood_check(module_rig, program)


def test_a_flood_spares_the_connects_of_the_seccomp_door(module_rig: Rig, tmp_path: Path) -> None:
    """The same program under the seccomp door (docs/seccomp.md): its redirected sockets are
    joined through one-time loopback listeners, so flooding whatever the launcher listens
    on costs our connects nothing."""
    conf: Path = module_rig.write_client_config(tmp_path / "c.conf")
    hosts = [module_rig.peer_tunnel_v4, module_rig.peer_tunnel_v6]
    argv = [*py(PROGRAM), *hosts, str(module_rig.tcp_echo_port)]
    proc = popen_wrapped(
        module_rig.client, conf, argv, extra=("--intercept", "seccomp"),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert read_line(proc, 30) == "READY"
        flood_check(module_rig, proc)
    finally:
        proc.kill()
        proc.wait()


def flood_check(module_rig: Rig, program: Any) -> None:
    warm = phase(program)  # the first handshake and the first connects
    assert warm["failed"] == [], warm
    ports = loopback_listeners(module_rig)
    assert ports, "no loopback listener of the launcher found"
    quiet = phase(program)
    assert quiet["failed"] == [], quiet
    attacker = module_rig.client.python_popen(
        ["-c", ATTACKER, *map(str, ports)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    try:
        assert read_line(attacker, 15) == "READY"
        time.sleep(2)  # thousands of silent connections first
        flooded = phase(program)
        assert attacker.poll() is None, "the attacker died"
    finally:
        attacker.kill()
        attacker.wait()
    after = phase(program)
    assert flooded["failed"] == [], flooded
    assert after["failed"] == [], after
    print(f"connects: {quiet['s']:.2f} s, flooded {flooded['s']:.2f} s, after {after['s']:.2f} s")
    unflooded = max(quiet["s"], after["s"])
    assert flooded["s"] <= 2 * unflooded, (quiet, flooded, after)
