"""Rows 5h and 5v of `make bench` (no root): wall time of `wrapguard --help` and `--version`.

The installed console script (the `wrapguard` beside this interpreter; `python -m wrapguard`
if there is none) is run directly, 15 times each, interleaved with `python -c pass` (the
interpreter's own start-up, for scale), after one untimed run of each that warms the bytecode
cache (procs.python_env). The goal (issue 14) is 100 ms each.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from procs import Row, Stat, python_env, run_tracked, tail

GOAL_MS = 100.0


def wrapguard_argv() -> tuple[list[str], str]:
    """How a user starts wrapguard here, and a name for it (for the notes)."""
    script = Path(sys.executable).parent / "wrapguard"
    if script.exists():
        return [str(script)], "the console script"
    return [sys.executable, "-m", "wrapguard"], "`python -m wrapguard`"


def rows_cli(workdir: Path, runs: int = 15) -> list[Row]:
    env = python_env(os.environ, workdir / "pycache")
    wg, how = wrapguard_argv()
    series = {
        "--help": [*wg, "--help"],
        "--version": [*wg, "--version"],
        "python": [sys.executable, "-c", "pass"],
    }
    wall: dict[str, list[float]] = {k: [] for k in series}
    cpu: dict[str, list[float]] = {k: [] for k in series}
    for i in range(runs + 1):  # run 0 warms the cache and checks the output
        order = list(series)
        for kind in order if i % 2 == 0 else order[::-1]:
            t = run_tracked(series[kind], timeout=30, env=env)
            if t.returncode != 0:
                raise RuntimeError(f"{kind}: exit {t.returncode}: {tail(t.stderr or t.stdout)}")
            if i == 0:
                if kind == "--help" and "Usage" not in t.stdout:
                    raise RuntimeError(f"--help printed no usage: {tail(t.stdout)}")
                if kind == "--version" and not t.stdout.strip():
                    raise RuntimeError("--version printed nothing")
                continue
            wall[kind].append(t.wall * 1e3)
            cpu[kind].append(t.total_cpu * 1e3)
    p = Stat.of(wall["python"])
    rows = []
    for kind, key in (("--help", "5h"), ("--version", "5v")):
        o, c = Stat.of(wall[kind]), Stat.of(cpu[kind])
        row = Row(key, f"`wrapguard {kind}` (median wall ms)", o.fmt(), f"goal {GOAL_MS:.0f}")
        row.ratio = f"{o.median / GOAL_MS:.2f}x of goal"
        row.notes = (
            f"{o.spread()}; CPU {c.fmt(0)} ms; {how}, no namespace; `python -c pass` "
            f"{p.fmt()} ms, {p.spread()}"
        )
        rows.append(row)
    return rows
