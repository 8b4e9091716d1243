"""`wrapguard --config X --self-test [IP:PORT]`: prove the whole path works, step by step.

One `self-test:` line per step on stdout, pass or fail, in bounded time; exit 0 when every step
passed. The steps: the config parses; the shim loads into a dynamically linked program; the
WireGuard socket opens; a handshake completes with the first peer; then either a probe program
running under the shim opens a TCP connection to IP:PORT through the tunnel, or, with no
target, an ICMP echo to the first peer's address comes back and a probe under the shim reaches
the launcher over the local channel.
"""

from __future__ import annotations

import asyncio
import ipaddress
import sys
import time

from wrapguard import shim
from wrapguard.errors import UsageError, WrapguardError
from wrapguard.launch import Plan
from wrapguard.runtime.child import run_child
from wrapguard.runtime.engine import Engine, IPAddress
from wrapguard.runtime.launcher import TunnelSession

HANDSHAKE_TIMEOUT = 8.0  # the first initiation and one retry after REKEY_TIMEOUT (5 s)
PROBE_TIMEOUT = 15.0

PROBE = """
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
family = socket.AF_INET6 if ":" in host else socket.AF_INET
s = socket.socket(family, socket.SOCK_STREAM)
s.settimeout(10)
try:
    s.connect((host, port))
except OSError as exc:
    print(f"self-test:   probe: connect failed: {exc.strerror or exc}")
    sys.exit(3)
peer, me = s.getpeername(), s.getsockname()
print(f"self-test:   probe: connected to {peer[0]} port {peer[1]} from {me[0]}")
"""


def parse_target(text: str) -> tuple[IPAddress, int]:
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    try:
        if not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ValueError
        return ipaddress.ip_address(host), int(port)
    except ValueError:
        raise UsageError(
            f"--self-test {text}: expected IP:PORT with a port from 1 to 65535, "
            "e.g. 10.150.0.1:80 or [fd15::1]:80"
        ) from None


class Reporter:
    def __init__(self) -> None:
        self.failed = 0

    def step(self, ok: bool, name: str, detail: str) -> bool:
        mark = "ok" if ok else "FAIL"
        print(f"self-test: [{mark}] {name}: {detail}", flush=True)
        if not ok:
            self.failed += 1
        return ok


def first_peer_address(plan: Plan) -> IPAddress | None:
    """The peer's own tunnel address: a host route, or the first host of its first network."""
    peer = plan.config.peers[0]
    if not peer.allowed_ips:
        return None
    net = peer.allowed_ips[0]
    if net.num_addresses == 1:
        return net.network_address
    for host in net.hosts():
        return host
    return None


async def _run(plan: Plan, target: tuple[IPAddress, int] | None) -> int:
    report = Reporter()
    cfg = plan.config
    report.step(True, "config", f"{cfg.path}: {len(cfg.peers)} peer(s)")
    ok, detail = shim.probe([sys.executable, "-c", "pass"])
    if not report.step(ok, "shim", detail):
        return 1
    if not cfg.peers:
        report.step(False, "handshake", "the config has no [Peer]")
        return 1
    session = TunnelSession(cfg, plan.routing)
    engine, preload = session.engine, session.preload
    try:
        try:
            await session.start_tunnel()
        except WrapguardError as exc:
            report.step(False, "tunnel", str(exc))
            return 1
        report.step(True, "tunnel", f"WireGuard listening on UDP port {engine.wg.port}")
        endpoint = engine.device.peers[0].endpoint
        if endpoint is None:
            report.step(False, "handshake", "the first peer has no Endpoint to reach")
            return 1
        road = engine.roads.get(0)
        where = road.target.url if road is not None else f"{endpoint[0]}:{endpoint[1]}"
        started = time.monotonic()
        if 0 not in engine.handshakes_done:
            engine.wg.start_handshake(0)
        try:
            async with asyncio.timeout(HANDSHAKE_TIMEOUT):
                while 0 not in engine.handshakes_done:
                    engine.handshake_event.clear()
                    await engine.handshake_event.wait()
        except TimeoutError:
            report.step(
                False,
                "handshake",
                f"no answer from {where} in {HANDSHAKE_TIMEOUT:g} s "
                + (
                    "(wrong keys, peer down, or UDP blocked)"
                    if road is None
                    else f"(stream road {road.state}: {road.last_error or 'no problem seen'})"
                ),
            )
            return 1
        report.step(
            True,
            "handshake",
            f"with peer 1 at {where} in {(time.monotonic() - started) * 1000:.0f} ms",
        )
        await session.start_channel()
        env = session.child_env()
        if target is not None and engine.route(target[0], 6, target[1]) is None:
            report.step(
                False,
                "connect",
                f"{target[0]} is not inside any peer's AllowedIPs or route: "
                "it would not go through the tunnel",
            )
            return 1
        if target is None:
            await _ping_step(report, engine, plan)
            argv = [sys.executable, "-c", "pass"]
        else:
            argv = [sys.executable, "-c", PROBE, str(target[0]), str(target[1])]
        status = await asyncio.wait_for(
            run_child(argv, sys.executable, env, ready=preload.hello_event), PROBE_TIMEOUT
        )
        report.step(
            preload.hello_event.is_set(),
            "channel",
            "the probe under the shim reached the launcher"
            if preload.hello_event.is_set()
            else "the probe never reached the launcher",
        )
        if target is not None:
            report.step(
                status == 0,
                "connect",
                f"probe TCP connect to {target[0]}:{target[1]} through the tunnel "
                + ("succeeded" if status == 0 else f"failed (probe exit {status})"),
            )
    except TimeoutError:
        report.step(False, "probe", f"did not finish within {PROBE_TIMEOUT:g} s")
    finally:
        session.close()
    if report.failed:
        print(f"self-test: {report.failed} step(s) failed")
        return 1
    print("self-test: all steps passed")
    return 0


async def _ping_step(report: Reporter, engine: Engine, plan: Plan) -> None:
    dst = first_peer_address(plan)
    if dst is None:
        report.step(False, "ping", "the first peer has no AllowedIPs to ping")
        return
    try:
        rtt = await engine.ping(dst, 0, timeout=5.0)
    except TimeoutError:
        report.step(False, "ping", f"no ICMP echo reply from {dst} in 5 s")
        return
    except OSError as exc:
        report.step(False, "ping", f"{dst}: {exc.strerror or exc}")
        return
    report.step(True, "ping", f"ICMP echo reply from {dst} in {rtt * 1000:.1f} ms")


def run_self_test(plan: Plan, target_text: str) -> int:
    target = parse_target(target_text) if target_text else None
    return asyncio.run(_run(plan, target))
