"""Row 3 of `make bench` (no root): one TCP flow against the embedded peer on loopback.

The peer (`python -m demo.peer`: our engine as a responder + an HTTP server on loopback) runs
as its own process on 127.0.0.1; a wrapped curl downloads /bytes/N and uploads a file (PUT,
body discarded by the peer). The peer is Python too and may be the bottleneck, so the row gives
the CPU seconds per GiB of both the peer and the launcher (from /proc/<pid>/stat).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

from procs import GiB, Row, Stat, cpu_times, python_env, ratio, run_tracked, tail

CHECKOUT = Path(__file__).resolve().parents[1]
GOAL_DOWN, GOAL_UP = 1000.0, 800.0  # Mbit/s, performance.md


def _env(workdir: Path) -> dict[str, str]:
    env = python_env(os.environ, workdir / "pycache")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(CHECKOUT), env.get("PYTHONPATH")]))
    return env


def rows_loopback(workdir: Path, rounds: int, down_mib: int, up_mib: int) -> list[Row]:
    env = _env(workdir)
    down = Row("3a", f"Loopback embedded peer: wrapped curl download {down_mib} MiB (Mbit/s)")
    up = Row("3b", f"Loopback embedded peer: wrapped curl upload {up_mib} MiB (Mbit/s)")
    conf = workdir / "loopback.conf"
    up_file = workdir / "loopback-up.bin"
    up_file.write_bytes(os.urandom(up_mib << 20))
    with open(workdir / "loopback-peer.log", "wb") as log:
        peer = subprocess.Popen(
            [sys.executable, "-m", "demo.peer", "--config-out", str(conf),
             "--http-port", "80", "--log-level", "warn"],
            env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
            cwd=CHECKOUT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 15
        while not (conf.exists() and conf.stat().st_size > 0):
            if peer.poll() is not None or time.monotonic() > deadline:
                why = tail((workdir / "loopback-peer.log").read_text(errors="replace"), 200)
                raise RuntimeError(f"embedded peer did not start ({peer.returncode}): {why}")
            time.sleep(0.05)
        time.sleep(0.2)  # the config is written before "peer up" is printed
        base = "http://10.150.0.1"
        wrap = [sys.executable, "-m", "wrapguard", "--config", str(conf), "--log-level", "warn"]
        jobs = {
            "down": (down, down_mib << 20, ["curl", "-sS", "-o", "/dev/null", "-w",
                     "%{http_code} %{size_download} %{time_total}\n",
                     f"{base}/bytes/{down_mib << 20}"]),
            "up": (up, up_mib << 20, ["curl", "-sS", "-o", "/dev/null", "-H", "Expect:",
                   "-T", str(up_file), "-w", "%{http_code} %{size_upload} %{time_total}\n",
                   f"{base}/sink"]),
        }  # fmt: skip
        starts = [run_tracked([*wrap, "--", "true"], timeout=30, env=env) for _ in range(3)]
        start_cpu = Stat.of([t.own_cpu for t in starts]).median  # the launcher's start-up CPU
        res: dict[str, tuple[list[float], list[float], list[float]]] = {}
        errors: dict[str, str] = {}
        for _ in range(rounds):
            for kind, (_row, size, cmd) in jobs.items():
                if kind in errors:
                    continue
                before = cpu_times(peer.pid)
                try:
                    t = run_tracked([*wrap, "--", *cmd], timeout=120, env=env)
                    after = cpu_times(peer.pid)
                    if t.returncode != 0:
                        raise RuntimeError(f"exit {t.returncode}: {tail(t.stderr or t.stdout)}")
                    code, got, secs = t.stdout.split()[-3:]
                    if code != "200" or int(got) != size:
                        raise RuntimeError(f"HTTP {code}, {got} of {size} bytes")
                except Exception as e:
                    errors[kind] = f"{type(e).__name__}: {tail(str(e), 200)}"
                    continue
                assert before is not None and after is not None
                speeds, lcpu, pcpu = res.setdefault(kind, ([], [], []))
                speeds.append(size * 8 / float(secs) / 1e6)
                lcpu.append(max(0.0, t.own_cpu - start_cpu) / (size / GiB))
                pcpu.append((after.own - before.own) / (size / GiB))
        for kind, goal in (("down", GOAL_DOWN), ("up", GOAL_UP)):
            row = jobs[kind][0]
            if kind in errors:
                row.ours = f"error: {errors[kind]}"
                continue
            s, lc, pc = (Stat.of(x) for x in res[kind])
            row.ours, row.ref = s.fmt(0), f"goal {goal:.0f}"
            row.ratio = f"{ratio(s.median, goal)} of goal"
            row.notes = (
                f"{s.spread(0)}; CPU s/GiB: launcher {lc.fmt(1)} (net of its {start_cpu:.2f} s "
                f"start-up), embedded peer {pc.fmt(1)}"
            )
    finally:
        peer.terminate()
        try:
            peer.wait(5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(OSError):
                os.killpg(peer.pid, 9)
            peer.wait(5)
    return [down, up]
