"""`make bench`: one command, one table; each figure beside its reference, measured in one run.

Rows 1, 2, 4, 5, 6, 7, 8 need root (network namespaces: a wireguard-go peer in a namespace, our
launcher vs wireguard-go + the kernel's TCP/UDP in the client namespace, turns interleaved);
rows 3 (the embedded peer on loopback) and 5h/5v (`--help`, `--version`) run anywhere. Prints
the table and writes it, with the machine and the git commit, to bench/results/latest.md.
Benchmarks print figures, never assert them; a row that fails says "error: ..." and the others
go on. See docs/benchmarks.md.

    python bench/run.py [--rounds N] [--quick] [--only 4,5h] [--out PATH]
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

from cli_row import rows_cli  # noqa: E402
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
    ("4p", "Connect round trip, SOCKS5 door vs wrapped connect() (median us)"),
    ("7", "UDP burst, our program sends (% delivered)"),
    ("7r", "UDP burst, our program receives (% delivered)"),
    ("8", "UDP echo round trip (median us)"),
]
ANY_ROWS = [
    ("3a", "Loopback embedded peer: download (Mbit/s)"),
    ("3b", "Loopback embedded peer: upload (Mbit/s)"),
    ("5h", "`wrapguard --help` (median wall ms)"),
    ("5v", "`wrapguard --version` (median wall ms)"),
]


def selected(only: set[str], *keys: str) -> bool:
    """Whether a row (or a group of rows measured together) is to run: all do by default."""
    return not only or any(k in only for k in keys)


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
    keys = dict(ROOT_ROWS)

    def one(key: str, fn: Callable[[RigBench], Row]) -> None:
        if selected(args.only, key):
            b = bench
            assert b is not None
            rows.append(guarded_row(Row(key, keys[key]), lambda: fn(b)))

    def some(group: list[str], fn: Callable[[RigBench], list[Row]]) -> None:
        if selected(args.only, *group):
            b = bench
            assert b is not None
            guarded(rows, [(k, keys[k]) for k in group], lambda: fn(b))

    if not any(selected(args.only, k) for k, _ in ROOT_ROWS):
        return rows
    try:
        bench = RigBench(work / "rig", args.down_mib, args.up_mib)
        some(["1", "2"], lambda b: b.rows_transfer(args.rounds, deadline))
        one("4", lambda b: b.row_connect(args.connect_rounds))
        one("5", lambda b: b.row_startup(args.true_runs))
        one("6", lambda b: b.row_rss(args.conns))
        socks_rounds = min(args.rounds, 3)
        one("1s", lambda b: b.row_socks5(socks_rounds))
        some(["1t", "2t"], lambda b: b.rows_tun(min(args.rounds, 3)))
        from stream_row import row_stream

        one("1h", lambda b: row_stream(b, socks_rounds))
        one("4s", lambda b: b.row_seccomp_connect(args.connect_rounds))
        one("1g", lambda b: b.row_seccomp_download(socks_rounds, build_goprobe(work / "go")))
        one("4p", lambda b: b.row_socks5_connect(args.connect_rounds))
        from udp_rows import UdpBench

        some(["7", "7r"], lambda b: UdpBench(b).rows_burst(args.burst_rounds, args.burst))
        one("8", lambda b: UdpBench(b).row_rtt(args.connect_rounds))
    except Exception as e:
        done = {r.key for r in rows}
        msg = " ".join(f"{type(e).__name__}: {e}".split())[-300:]
        rows += [
            Row(k, w, ours=f"error: rig: {msg}")
            for k, w in ROOT_ROWS
            if k not in done and selected(args.only, k)
        ]
    finally:
        if bench is not None:
            bench.close()
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
    ap.add_argument("--burst", type=int, default=2000, help="datagrams per UDP burst (rows 7)")
    ap.add_argument("--burst-rounds", type=int, default=8, help="turns per path for rows 7/7r")
    ap.add_argument(
        "--only", default="", help="comma-separated row keys to run (e.g. 4,5h,7r); default all"
    )
    ap.add_argument("--quick", action="store_true", help="small sizes, few rounds (a smoke run)")
    ap.add_argument("--out", type=Path, default=BENCH / "results" / "latest.md")
    args = ap.parse_args()
    args.only = {k.strip() for k in args.only.split(",") if k.strip()}
    unknown = args.only - {k for k, _ in ROOT_ROWS + ANY_ROWS}
    if unknown:
        ap.error(f"--only: unknown rows {', '.join(sorted(unknown))}")
    if args.quick:
        args.rounds, args.loopback_rounds, args.connect_rounds = 2, 1, 1
        args.true_runs, args.conns, args.down_mib, args.up_mib = 5, 100, 8, 4
        args.burst, args.burst_rounds = 500, 2

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
            rows += [Row(k, w, ours=note) for k, w in ROOT_ROWS if selected(args.only, k)]
        if selected(args.only, "5h", "5v"):
            guarded(rows, ANY_ROWS[2:], lambda: rows_cli(work, args.true_runs))
        if selected(args.only, "3a", "3b"):
            guarded(
                rows,
                ANY_ROWS[:2],
                lambda: rows_loopback(work, args.loopback_rounds, args.down_mib, args.up_mib),
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
