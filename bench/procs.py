"""Helpers for `make bench`: run a process while tracking its own CPU time, read /proc, stats.

A wrapped program is a child of the launcher, so the launcher's resource usage from wait4()
includes the child's. `run_tracked()` polls /proc/<pid>/stat (utime, stime, cutime, cstime)
until the process is a zombie and subtracts what its reaped children used: the launcher's own
CPU time, at clock-tick resolution (10 ms).
"""

from __future__ import annotations

import contextlib
import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")
GiB = 1 << 30


@dataclass
class Row:
    """One line of the table: our figure, the reference figure, their ratio, notes."""

    key: str
    what: str
    ours: str = ""
    ref: str = ""
    ratio: str = ""
    notes: str = ""


@dataclass(frozen=True, slots=True)
class CpuTimes:
    """Seconds of CPU: the process itself, and its reaped children."""

    own: float
    children: float


def cpu_times(pid: int) -> CpuTimes | None:
    """utime+stime and cutime+cstime of `pid` from /proc (None once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    fields = raw[raw.rindex(b")") + 2 :].split()  # after "pid (comm) "; state is fields[0]
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return CpuTimes((utime + stime) / TICK, (cutime + cstime) / TICK)


def children(pid: int) -> list[int]:
    """The direct children of `pid` (from /proc/PID/task/*/children)."""
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(x) for x in f.read().split()]
        except OSError:
            continue
    return out


def rss_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of `pid` in MB (10^6 bytes)."""
    vals = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                vals[key] = int(rest.split()[0]) * 1024 / 1e6
    return vals["VmRSS"], vals["VmHWM"]


@dataclass(frozen=True, slots=True)
class Tracked:
    """How a tracked run ended: exit code, output, wall seconds, the process's own CPU."""

    returncode: int
    stdout: str
    stderr: str
    wall: float
    own_cpu: float
    total_cpu: float  # own + children, from wait4


def run_tracked(
    argv: Sequence[str],
    *,
    timeout: float,
    env: Mapping[str, str] | None = None,
    preexec_fn: Callable[[], None] | None = None,
    poll: float = 0.02,
) -> Tracked:
    """Run argv to completion, polling its CPU times; kill its process group on timeout."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            env=dict(env) if env is not None else None,
            start_new_session=True,
            preexec_fn=preexec_fn,
        )
        last: CpuTimes | None = None
        kids: dict[int, CpuTimes] = {}  # its direct children (wrapguard's forked launcher)
        deadline = t0 + timeout
        try:
            while True:
                seen = cpu_times(proc.pid)  # a zombie still shows its final times
                if seen is not None:
                    last = seen
                for kid in children(proc.pid):
                    times = cpu_times(kid)
                    if times is not None:
                        kids[kid] = times
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    break
                if time.perf_counter() > deadline:
                    raise subprocess.TimeoutExpired(list(argv), timeout)
                time.sleep(poll)
        except BaseException:
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, 9)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(proc.pid, 0)
            proc.returncode = -9
            raise
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        total = usage.ru_utime + usage.ru_stime
        if last is not None and last.children > 0:
            own = max(0.0, total - last.children)
        else:
            own = last.own if last is not None else total
        # A child it never reaped (wrapguard's launcher: the waiter returns the program's
        # status and leaves it to finish) is in neither: its own times as last seen, without
        # its children's (the wrapped program). Sampled every `poll` s, so a few ms short.
        own += sum(t.own for t in kids.values())
        out.seek(0)
        err.seek(0)
        return Tracked(
            proc.returncode,
            out.read().decode(errors="replace"),
            err.read().decode(errors="replace"),
            wall,
            own,
            total,
        )


@dataclass(frozen=True, slots=True)
class Stat:
    """Median and spread of some samples."""

    median: float
    lo: float
    hi: float
    n: int

    @staticmethod
    def of(samples: Sequence[float]) -> Stat:
        if not samples:
            raise ValueError("no samples")
        return Stat(statistics.median(samples), min(samples), max(samples), len(samples))

    def fmt(self, digits: int = 1) -> str:
        return f"{self.median:.{digits}f}"

    def spread(self, digits: int = 1) -> str:
        return f"{self.lo:.{digits}f}..{self.hi:.{digits}f} (n={self.n})"


def ratio(ours: float, ref: float, digits: int = 2) -> str:
    return f"{ours / ref:.{digits}f}x" if ref else "n/a"


def python_env(base: Mapping[str, str], pycache: Path) -> dict[str, str]:
    """`base` with a bytecode cache of our own: this environment may set
    PYTHONDONTWRITEBYTECODE, and recompiling every module on each start would add ~0.2 s."""
    env = dict(base)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = str(pycache)
    return env


def tail(text: str, n: int = 300) -> str:
    """The last n characters of some output, on one line (for error cells)."""
    return " ".join(text.strip().split())[-n:]
