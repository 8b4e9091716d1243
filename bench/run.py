"""`make bench`: one command, one table; each figure beside its reference, measured in one run.

Rows 1, 2, 4, 5, 6 need root (network namespaces: a wireguard-go peer in a namespace, our
launcher vs wireguard-go + the kernel's TCP in the client namespace, turns interleaved); row 3
runs anywhere (the embedded peer on loopback). Prints the table and writes it, with the machine
and the git commit, to bench/results/latest.md. Benchmarks print figures, never assert them;
a row that fails says "error: ..." and the others go on. See docs/benchmarks.md.

    python bench/run.py [--rounds N] [--quick] [--out PATH]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

BENCH = Path(__file__).resolve().parent
CHECKOUT = BENCH.parent
for p in (str(CHECKOUT / "tests"), str(CHECKOUT), str(BENCH)):
    if p not in sys.path:
        sys.path.insert(0, p)

from loopback_row import rows_loopback  # noqa: E402
from procs import Row  # noqa: E402

ROOT_ROWS = [
    ("1", "Download, curl via wireguard-go peer (MB/s)"),
    ("2", "Upload, curl -T via wireguard-go peer (MB/s)"),
    ("4", "Connect round trip (median us)"),
    ("5", "`wrapguard -- true` vs `true` (median wall ms)"),
    ("6", "Launcher RSS, 1000 concurrent open connections (MB)"),
    ("1s", "Download, curl through the SOCKS5 door vs wrapped (MB/s)"),
    ("1t", "TUN mode: download, `wrapguard up` vs wireguard-go's TUN (MB/s)"),
    ("2t", "TUN mode: upload, `wrapguard up` vs wireguard-go's TUN (MB/s)"),
    ("1h", "Download, wrapped curl over the HTTPS stream road vs UDP (MB/s)"),
    ("4s", "Connect round trip, seccomp door vs preload door (us)"),
    ("1g", "Download, Go client via the seccomp door vs curl via the shim (MB/s)"),
]


def _cmd(argv: list[str]) -> str:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=10, cwd=CHECKOUT)
        return (r.stdout or r.stderr).strip()
    except (OSError, subprocess.SubprocessError) as e:
        return f"unknown ({e})"


def machine() -> dict[str, str]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    commit = _cmd(["git", "rev-parse", "HEAD"])
    dirty = _cmd(["git", "--no-optional-locks", "status", "--porcelain", "--untracked-files=no"])
    wg_go = _cmd(["wireguard-go", "--version"]).splitlines()
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{os.cpu_count()} CPUs, {cpu}",
        "kernel": platform.release(),
        "python": platform.python_version(),
        "wireguard-go": wg_go[0] if wg_go else "not found",
        "commit": commit + (" (with uncommitted changes)" if dirty else ""),
    }


def table(rows: list[Row]) -> str:
    head = "| # | what | wrapguard | reference | ratio | spread, notes |\n|---|---|---|---|---|---|"
    body = [
        f"| {r.key} | {r.what} | {r.ours} | {r.ref} | {r.ratio} | {r.notes} |".replace("\n", " ")
        for r in rows
    ]
    return "\n".join([head, *body])


def markdown(
    rows: list[Row], info: dict[str, str], seconds: float, args: argparse.Namespace
) -> str:
    lines = ["# wrapguard benchmark results (`make bench`)", ""]
    lines += [f"- {k}: {v}" for k, v in info.items()]
    lines.append(
        f"- run: {seconds:.0f} s, rounds {args.rounds} (rows 1-2), medians of interleaved turns"
    )
    lines += ["", table(rows), "", "How each row is measured: [docs/benchmarks.md]"
              "(../../docs/benchmarks.md). MB = 10^6 bytes; reference = wireguard-go + the "
              "kernel's TCP in the same namespace, same peer, same run.", ""]  # fmt: skip
    return "\n".join(lines)


def guarded(rows: list[Row], keys: list[tuple[str, str]], fn: Callable[[], list[Row]]) -> None:
    """Append fn()'s rows, or one error row per key if it fails."""
    try:
        rows += fn()
    except Exception as e:
        msg = " ".join(f"{type(e).__name__}: {e}".split())[-300:]
        rows += [Row(k, what, ours=f"error: {msg}") for k, what in keys]
    print(f"  ... {', '.join(k for k, _ in keys)} done", file=sys.stderr, flush=True)


def build_goprobe(directory: Path) -> Path:
    """The seccomp tests' Go client, built static (CGO_ENABLED=0), standard library only."""
    src = CHECKOUT / "tests" / "runtime" / "goprobe" / "main.go"
    out = directory / "goprobe"
    env = {
        **os.environ, "GOCACHE": str(directory / "cache"), "GOPATH": str(directory / "path"),
        "GO111MODULE": "off", "GOFLAGS": "", "GOPROXY": "off", "CGO_ENABLED": "0",
    }  # fmt: skip
    subprocess.run(["go", "build", "-o", str(out), str(src)], env=env, check=True, timeout=300,
                   cwd=src.parent)  # fmt: skip
    return out


def root_rows(work: Path, args: argparse.Namespace, deadline: float) -> list[Row]:
    from rig_rows import RigBench
    from rig_rows import guarded as guarded_row

    rows: list[Row] = []
    bench: RigBench | None = None
    try:
        bench = RigBench(work / "rig", args.down_mib, args.up_mib)
        b = bench
        guarded(rows, ROOT_ROWS[:2], lambda: b.rows_transfer(args.rounds, deadline))
        rows.append(guarded_row(Row(*ROOT_ROWS[2]), lambda: b.row_connect(args.connect_rounds)))
        rows.append(guarded_row(Row(*ROOT_ROWS[3]), lambda: b.row_startup(args.true_runs)))
        rows.append(guarded_row(Row(*ROOT_ROWS[4]), lambda: b.row_rss(args.conns)))
        socks_rounds = min(args.rounds, 3)
        rows.append(guarded_row(Row(*ROOT_ROWS[5]), lambda: b.row_socks5(socks_rounds)))
        guarded(rows, ROOT_ROWS[6:8], lambda: b.rows_tun(min(args.rounds, 3)))
        from stream_row import row_stream

        rows.append(guarded_row(Row(*ROOT_ROWS[8]), lambda: row_stream(b, socks_rounds)))
        rows.append(
            guarded_row(Row(*ROOT_ROWS[9]), lambda: b.row_seccomp_connect(args.connect_rounds))
        )
        rows.append(
            guarded_row(
                Row(*ROOT_ROWS[10]),
                lambda: b.row_seccomp_download(socks_rounds, build_goprobe(work / "go")),
            )
        )
    except Exception as e:
        done = {r.key for r in rows}
        msg = " ".join(f"{type(e).__name__}: {e}".split())[-300:]
        rows += [Row(k, w, ours=f"error: rig: {msg}") for k, w in ROOT_ROWS if k not in done]
    finally:
        if bench is not None:
            problems = bench.close()
            if problems:
                print("rig teardown problems:", *problems, sep="\n  ", file=sys.stderr)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5, help="turns per path for rows 1-2")
    ap.add_argument("--loopback-rounds", type=int, default=3)
    ap.add_argument("--connect-rounds", type=int, default=3, help="200 connects each")
    ap.add_argument("--true-runs", type=int, default=15)
    ap.add_argument("--conns", type=int, default=1000)
    ap.add_argument("--down-mib", type=int, default=64)
    ap.add_argument("--up-mib", type=int, default=32)
    ap.add_argument("--quick", action="store_true", help="small sizes, few rounds (a smoke run)")
    ap.add_argument("--out", type=Path, default=BENCH / "results" / "latest.md")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.loopback_rounds, args.connect_rounds = 2, 1, 1
        args.true_runs, args.conns, args.down_mib, args.up_mib = 5, 100, 8, 4

    me = os.getpid()

    def on_term(signum: int, _frame: FrameType | None) -> None:
        if os.getpid() != me:  # a forked helper (pyroute2) being stopped: die as usual
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise KeyboardInterrupt(f"signal {signum}")  # so that the rig is torn down

    signal.signal(signal.SIGTERM, on_term)
    t0 = time.monotonic()
    deadline = t0 + 6 * 60  # rows 1-2 stop adding rounds past this (the run stays ~10 min)
    info = machine()
    print("wrapguard benchmark:", *(f"{k}: {v}" for k, v in info.items()), sep="\n  ")
    work = Path(tempfile.mkdtemp(prefix="wgbench-"))
    rows: list[Row] = []
    try:
        if shutil.which("curl") is None:
            rows.append(Row("-", "all rows", ours="error: curl not found"))
        elif os.geteuid() == 0:
            rows += root_rows(work, args, deadline)
        else:
            note = "skipped: needs root (network namespaces for the wireguard-go rig)"
            rows += [Row(k, w, ours=note) for k, w in ROOT_ROWS]
        lb = [("3a", "Loopback embedded peer: download (Mbit/s)"),
              ("3b", "Loopback embedded peer: upload (Mbit/s)")]  # fmt: skip
        guarded(
            rows, lb, lambda: rows_loopback(work, args.loopback_rounds, args.down_mib, args.up_mib)
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows.sort(key=lambda r: r.key)
    seconds = time.monotonic() - t0
    print()
    print(table(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(markdown(rows, info, seconds, args))
    print(f"\nwritten to {args.out} ({seconds:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
