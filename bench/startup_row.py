"""Row 5 of `make bench` alone, with exact wall times, and an A/B of two checkouts (root).

    python bench/startup_row.py [--runs N] [--python OTHER_VENV_PYTHON]... [-- CMD...]

`wrapguard --config X -- true` (or CMD) through `ip netns exec` in the rig's client namespace,
the peer up, against `true` and `python -c pass`; with --python, the same command line run
by each interpreter given (another checkout's venv: `-m wrapguard` imports that checkout), the
turns interleaved A, B, ... / ..., B, A. This process is a child subreaper, so the launcher
(which the waiter never reaps) comes back to it: wall is the waiter's exit (exact, not
polled) and CPU is the waiter's plus the launcher's (wait4 rusage, the wrapped program's
few ms included). Medians, min..max.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

_BENCH = Path(__file__).resolve().parent
for _p in (str(_BENCH.parent / "tests"), str(_BENCH.parent), str(_BENCH)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from procs import Stat  # noqa: E402
from rig_rows import RigBench  # noqa: E402

PR_SET_CHILD_SUBREAPER = 36


@contextlib.contextmanager
def subreaper() -> Iterator[None]:
    """This process as a child subreaper while inside: run_once() reaps the launchers."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    if prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise RuntimeError(f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(ctypes.get_errno())}")
    try:
        yield
    finally:
        prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


def _cpu(usage: os.struct_rusage) -> float:
    return usage.ru_utime + usage.ru_stime


def run_once(argv: list[str], env: dict[str, str], cwd: Path) -> tuple[float, float]:
    """(wall ms until the waiter exits, CPU ms of every process it and its launcher ran)."""
    before = set(_orphans())
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        argv,
        env=env,
        cwd=cwd,  # not a checkout: `python -m wrapguard` would import ./wrapguard from there
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if proc.returncode != 0:
        raise RuntimeError(f"exit {proc.returncode}: {err[-300:]}")
    cpu = _cpu(usage)
    for pid in set(_orphans()) - before:  # the launcher, re-parented to us at the waiter's exit
        _, _, usage = os.wait4(pid, 0)
        cpu += _cpu(usage)
    return wall * 1e3, cpu * 1e3


def _checkout(python: str, env: dict[str, str], cwd: Path) -> str:
    """The directory holding the wrapguard package `python` imports."""
    code = "import os, wrapguard; print(os.path.dirname(os.path.dirname(wrapguard.__file__)))"
    out = subprocess.run([python, "-c", code], env=env, cwd=cwd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{python} cannot import wrapguard: {out.stderr.strip()}")
    return out.stdout.strip()


def _orphans() -> list[int]:
    with open(f"/proc/{os.getpid()}/task/{os.getpid()}/children") as f:
        return [int(x) for x in f.read().split()]


def main() -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--python", action="append", default=[], help="another checkout's python")
    ap.add_argument("cmd", nargs="*", default=["true"])
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="wgbench-startup-"))
    bench = RigBench(work / "rig", 1, 1)
    pythons = [sys.executable, *args.python]
    series: dict[str, list[str]] = {}
    envs: dict[str, dict[str, str]] = {}
    for i, py in enumerate(pythons):
        argv = bench.wrapped(args.cmd)
        argv[argv.index(sys.executable)] = py
        # The rig's environment puts this checkout on PYTHONPATH; each interpreter here
        # gets the checkout it has installed instead.
        env = {k: v for k, v in bench.env.items() if k != "PYTHONPATH"}
        where = _checkout(py, env, work)
        env["PYTHONPATH"] = where
        key = f"ours[{i}] {where}"
        series[key], envs[key] = argv, env
    series["true"] = bench.direct(["true"])
    series["python -c pass"] = bench.direct([sys.executable, "-c", "pass"])
    walls: dict[str, list[float]] = {k: [] for k in series}
    cpus: dict[str, list[float]] = {k: [] for k in series}
    try:
        with subreaper():
            for k, argv in series.items():  # warm the bytecode caches
                run_once(argv, envs.get(k, bench.env), work)
            for r in range(args.runs):
                keys = list(series)
                for k in keys if r % 2 == 0 else keys[::-1]:
                    wall, cpu = run_once(series[k], envs.get(k, bench.env), work)
                    walls[k].append(wall)
                    cpus[k].append(cpu)
        true = Stat.of(walls["true"]).median
        for k in series:
            w, c = Stat.of(walls[k]), Stat.of(cpus[k])
            print(
                f"{k}: wall {w.fmt()} ms ({w.spread()}), +{w.median - true:.1f} over true; "
                f"CPU {c.fmt()} ms ({c.spread()})"
            )
    finally:
        bench.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
