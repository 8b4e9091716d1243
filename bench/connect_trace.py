"""Row 4's connect() cut into legs, in the rig (root): where the wall time of a wrapped
blocking connect goes, next to the launcher's CPU per connect.

The wrapped client is row 4's (connect_rtt.py) with CLOCK_MONOTONIC stamps kept per connect;
the launcher runs under a small wrapper (written to the work directory) that stamps, on the
same clock, its CONNECT reads, sealed datagrams handed to the UDP socket, replies, the
SYN-ACK's receive batch and the outcome (STATUS) written. Stamps cost a little: compare trees
with this script, not with row 4's figures. Per connect (medians over all of them):
  t0->CONNECT read        the shim's steps before the request, and the launcher's wake-up
  CONNECT->SYN send       route, TCB, seal: until the SYN is handed to the UDP socket
  SYN send->reply         the rest of the CONNECT callback up to the TUNNEL reply
  CONNECT callback        the whole callback that read the CONNECT
  SYN send->SYN-ACK rx    the tunnel round trip, and what the launcher did meanwhile
  SYN-ACK rx->STATUS      the receive batch of the SYN-ACK until the outcome is written
  STATUS->connect returns the shim's wake-up
Launcher CPU per connect: the program's parent (the launcher) over the timed connects
(/proc/PID/task/*/schedstat). Run: `python bench/connect_trace.py [--rounds N] [-n N]
[PYTHON ...]`; each PYTHON (default: this one) is a venv's interpreter whose checkout is
traced (its parent's parent directory), turns interleaved.
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import statistics
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

_BENCH = Path(__file__).resolve().parent
for _p in (str(_BENCH.parent / "tests"), str(_BENCH.parent), str(_BENCH)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from procs import run_tracked  # noqa: E402
from rig_rows import RigBench, _raise_nofile  # noqa: E402

CLIENT = r"""
import json, os, socket, sys, time
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def cpu_ns():
    base, total = f"/proc/{os.getppid()}/task", 0
    for t in os.listdir(base):
        try:
            total += int(open(f"{base}/{t}/schedstat").read().split()[0])
        except OSError:
            pass
    return total
def once():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    t0 = time.perf_counter()
    s.connect((host, port))
    t1 = time.perf_counter()
    if not s.recv(100):
        raise SystemExit("no banner")
    s.close()
    return t0, t1
once()  # the WireGuard handshake
c0 = cpu_ns()
stamps = [once() for _ in range(n)]
print(json.dumps({"stamps": stamps, "cpu_us": (cpu_ns() - c0) / 1e3 / n}))
"""

LAUNCHER = r"""
import os, runpy, sys, time
from asyncio import selector_events
import wrapguard.runtime.launcher as launcher
from wrapguard.doors.preload import channel
from wrapguard.runtime import udp
stamps, add, now = [], None, time.perf_counter
add = stamps.append
def stamp(cls, name, tag, end=None):
    f = getattr(cls, name)
    def g(*a, **k):
        add((now(), tag))
        try:
            return f(*a, **k)
        finally:
            if end:
                add((now(), end))
    setattr(cls, name, g)
stamp(channel._CtlConnection, "data_received", "ctl_in", "ctl_in_end")
stamp(udp.WgUdpRuntime, "_send_batch", "udp_tx")
stamp(udp.WgUdpRuntime, "_batch", "udp_rx")
write = selector_events._SelectorSocketTransport.write
def w(self, data):
    if self._sock.family == 1:  # the control connection: a reply or a STATUS
        add((now(), f"ctl_out{len(data)}"))
    return write(self, data)
selector_events._SelectorSocketTransport.write = w
run = launcher.run
def traced(*a, **k):
    try:
        return run(*a, **k)
    finally:
        with open(os.environ["WG_TRACE_OUT"], "w") as f:
            f.writelines(f"{t:.7f} {tag}\n" for t, tag in stamps)
launcher.run = traced
sys.argv = ["wrapguard", *sys.argv[1:]]
runpy.run_module("wrapguard", run_name="__main__", alter_sys=True)
"""

LEGS = (
    "t0->CONNECT read",
    "CONNECT->SYN send",
    "SYN send->reply",
    "CONNECT callback",
    "SYN send->SYN-ACK rx",
    "SYN-ACK rx->STATUS",
    "STATUS->connect returns",
    "connect()",
)
STATUS_LEN = 12  # a STATUS reply frame (the TUNNEL reply is longer)


def _first(ev: list[tuple[float, str]], tag: str, after: float) -> float | None:
    return next((t for t, g in ev if g == tag and t >= after), None)


def legs(trace: list[tuple[float, str]], stamps: list[list[float]]) -> dict[str, list[float]]:
    """Each connect's legs (us) from the launcher's stamps and the client's (t0, t1)."""
    times = [t for t, _ in trace]
    out: dict[str, list[float]] = defaultdict(list)
    for t0, t1 in stamps:
        ev = trace[bisect.bisect_left(times, t0) : bisect.bisect_right(times, t1)]
        ci = _first(ev, "ctl_in", t0)
        if ci is None:
            continue
        tx, ce = _first(ev, "udp_tx", ci), _first(ev, "ctl_in_end", ci)
        st = _first(ev, f"ctl_out{STATUS_LEN}", ci)
        reply = next((t for t, g in ev if t >= ci and g.startswith("ctl_out") and t != st), None)
        rx = max((t for t, g in ev if g == "udp_rx" and st is not None and t < st), default=None)
        if tx is None or ce is None or st is None or reply is None or rx is None:
            continue
        starts = (t0, ci, tx, ci, tx, rx, st, t0)
        ends = (ci, tx, reply, ce, rx, st, t1, t1)
        for name, a, b in zip(LEGS, starts, ends, strict=True):
            out[name].append((b - a) * 1e6)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("-n", type=int, default=1000, help="timed connects per turn")
    ap.add_argument("pythons", nargs="*", default=[sys.executable])
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="wg-connect-trace-"))
    (work / "client.py").write_text(CLIENT.lstrip())
    (work / "launcher.py").write_text(LAUNCHER.lstrip())
    bench = RigBench(work / "rig", 1, 1)
    host, port = bench.rig.peer_tunnel_v4, str(bench.rig.tcp_echo_port)
    got: dict[str, dict[str, list[float]]] = {p: defaultdict(list) for p in args.pythons}
    cpu: dict[str, list[float]] = defaultdict(list)
    try:
        for r in range(args.rounds):
            for py in args.pythons if r % 2 == 0 else args.pythons[::-1]:
                env = dict(bench.env)
                env["PYTHONPATH"] = str(Path(py).absolute().parent.parent.parent)
                env["WG_TRACE_OUT"] = str(work / "trace.txt")
                argv = [
                    "ip", "netns", "exec", bench.ns, py, str(work / "launcher.py"),
                    "--config", str(bench.conf), "--log-level", "warn", "--",
                    py, str(work / "client.py"), host, port, str(args.n),
                ]  # fmt: skip
                t = run_tracked(argv, timeout=300, env=env, preexec_fn=_raise_nofile)
                if t.returncode != 0:
                    raise SystemExit(f"{py}: exit {t.returncode}: {t.stderr[-500:]}")
                data = json.loads(t.stdout.strip().splitlines()[-1])
                lines = (work / "trace.txt").read_text().split("\n")
                trace = [(float(a), b) for a, b in (ln.split() for ln in lines if ln)]
                for k, v in legs(trace, data["stamps"]).items():
                    got[py][k].extend(v)
                cpu[py].append(data["cpu_us"])
                print(f"round {r} {py}: launcher CPU {data['cpu_us']:.0f} us/connect", flush=True)
    finally:
        bench.close()
    names = [os.path.relpath(p) for p in args.pythons]
    print(f"{'leg (median us)':26s}" + "".join(f"{n[-28:]:>30s}" for n in names))
    for leg in LEGS:
        cells = [
            f"{statistics.median(got[p][leg]):8.0f} (n={len(got[p][leg])})" for p in args.pythons
        ]
        print(f"{leg:26s}" + "".join(f"{c:>30s}" for c in cells))
    cells = [
        f"{statistics.median(cpu[p]):8.0f} ({min(cpu[p]):.0f}..{max(cpu[p]):.0f})"
        for p in args.pythons
    ]
    print(f"{'launcher CPU/connect':26s}" + "".join(f"{c:>30s}" for c in cells))


if __name__ == "__main__":
    main()
