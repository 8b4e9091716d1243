"""Rows 1, 2, 4, 5 and 6 (and 1s, 1t/2t, 4s, 4p, 1g) of `make bench` (root): our launcher against
the kernel path.

One rig (tests/rig): wireguard-go as the peer in its namespace, servers behind it. "Ours" is a
program wrapped by our launcher in the client namespace; the reference is the same program in
the same namespace through `rig.start_kernel_client()` (wireguard-go + the kernel's TCP). The
kernel client runs only during its own turns (it holds our key and tunnel address), and the
peer forgets its sessions before every turn, so each turn starts with a fresh handshake.
Turns alternate A, B / B, A round by round.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import resource
import select
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from clients import write_clients
from procs import (
    GiB,
    Row,
    Stat,
    children,
    cpu_times,
    python_env,
    ratio,
    rss_mb,
    run_tracked,
    tail,
)
from rig.harness import Rig, build_rig
from rig.netns import Netns
from rig.support import FileStore

MB = 1e6


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 16384)), hard))


class RigBench:
    """The rig plus the two ways to run a program in its client namespace."""

    def __init__(self, workdir: Path, down_mib: int, up_mib: int) -> None:
        self.workdir = workdir
        files = workdir / "files"
        files.mkdir(parents=True, exist_ok=True)
        self.down_name = f"{down_mib}MiB.bin"
        self.rig: Rig = build_rig(
            workdir / "rig", FileStore(files), file_sizes={self.down_name: down_mib << 20}
        )
        self.conf = self.rig.write_client_config(workdir / "client.conf", second_peer=False)
        self.up_file = workdir / "upload.bin"
        data = os.urandom(up_mib << 20)
        self.up_file.write_bytes(data)
        self.up_size, self.up_sha = len(data), hashlib.sha256(data).hexdigest()
        self.scripts = write_clients(workdir)
        self.env = python_env(Netns.python_env(), workdir.parent / "pycache")

    def close(self) -> None:
        """Tear the rig down; what could not be removed is printed to stderr."""
        problems = self.rig.close()
        if problems:
            print("rig teardown problems:", *problems, sep="\n  ", file=sys.stderr)

    # -- the two paths ----------------------------------------------------------------------
    @property
    def ns(self) -> str:
        return self.rig.client.name

    def wrapped(self, cmd: Sequence[str], extra: Sequence[str] = ()) -> list[str]:
        return [
            "ip", "netns", "exec", self.ns, sys.executable, "-m", "wrapguard",
            "--config", str(self.conf), "--log-level", "warn", *extra, "--", *cmd,
        ]  # fmt: skip

    def direct(self, cmd: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns, *cmd]

    def kernel_up(self) -> int:
        """Start the kernel client (fresh handshake); returns its wireguard-go pid."""
        self.rig.reset_peer()
        kc = self.rig.kernel_client
        kc = self.rig.start_kernel_client() if kc is None else kc.start()
        assert kc.proc is not None
        return kc.proc.pid

    def kernel_down(self) -> None:
        if self.rig.kernel_client is not None:
            self.rig.kernel_client.stop()
        self.rig.reset_peer()

    def run(self, ours: bool, cmd: Sequence[str], timeout: float) -> tuple[str, float, float]:
        """Run cmd on one path: (stdout, wall seconds, launcher's own CPU seconds or 0)."""
        argv = self.wrapped(cmd) if ours else self.direct(cmd)
        t = run_tracked(argv, timeout=timeout, env=self.env, preexec_fn=_raise_nofile)
        if t.returncode != 0:
            raise RuntimeError(f"exit {t.returncode}: {tail(t.stderr or t.stdout)}")
        return t.stdout, t.wall, t.own_cpu if ours else 0.0

    # -- rows 1 and 2 -----------------------------------------------------------------------
    def _curl_down(self, ours: bool, check: bool) -> tuple[float, float, int]:
        out = str(self.workdir / "down.bin") if check else "/dev/null"
        w = "%{http_code} %{size_download} %{time_total}\n"
        cmd = ["curl", "-sS", "-o", out, "-w", w, self.rig.url(self.down_name)]
        stdout, _wall, cpu = self.run(ours, cmd, timeout=120)
        speed, size = self._downloaded(stdout, out, check, "download")
        return speed, cpu, size

    def _downloaded(self, stdout: str, out: str, check: bool, what: str) -> tuple[float, int]:
        """(MB/s, bytes) from curl's `-w "%{http_code} %{size_download} %{time_total}"`; the
        file's sha256 checked when `check` (then `out` is removed)."""
        code, size, secs = stdout.split()[-3:]
        want_size, want_sha = self.rig.files[self.down_name]
        if code != "200" or int(size) != want_size:
            raise RuntimeError(f"{what}: HTTP {code}, {size} bytes")
        if check:
            got = hashlib.sha256(Path(out).read_bytes()).hexdigest()
            Path(out).unlink()
            if got != want_sha:
                raise RuntimeError(f"{what}: sha256 mismatch")
        return int(size) / float(secs) / MB, int(size)

    def _curl_up(self, ours: bool) -> tuple[float, float, int]:
        w = "\n%{http_code} %{size_upload} %{time_total}\n"
        url = self.rig.url("upload")
        cmd = ["curl", "-sS", "-H", "Expect:", "-T", str(self.up_file), "-w", w, url]
        stdout, _wall, cpu = self.run(ours, cmd, timeout=120)
        lines = [line for line in stdout.splitlines() if line.strip()]
        code, size, secs = lines[-1].split()
        body = json.loads(lines[-2])
        if code != "200" or body != {"sha256": self.up_sha, "length": self.up_size}:
            raise RuntimeError(f"upload: HTTP {code}, server saw {body}")
        return int(size) / float(secs) / MB, cpu, int(size)

    def startup_cpu(self, runs: int = 3) -> float:
        """The launcher's own CPU seconds for `-- true` (start-up and exit), median."""
        samples = [self.run(True, ["true"], timeout=30)[2] for _ in range(runs)]
        return Stat.of(samples).median

    def rows_transfer(self, rounds: int, deadline: float) -> list[Row]:
        base = self.startup_cpu()
        speeds: dict[tuple[str, bool], list[float]] = {}
        cpu: dict[tuple[str, bool], list[float]] = {}  # CPU seconds per GiB
        errors: dict[str, str] = {}
        for r in range(rounds):
            if r >= 2 and time.monotonic() > deadline:
                break
            order = [False, True] if r % 2 == 0 else [True, False]
            for ours in order:
                kc_pid = 0 if ours else self.kernel_up()
                try:
                    for kind in ("down", "up"):
                        if kind in errors:
                            continue
                        before = cpu_times(kc_pid) if kc_pid else None
                        try:
                            if kind == "down":
                                mbps, own, size = self._curl_down(ours, check=r == 0)
                            else:
                                mbps, own, size = self._curl_up(ours)
                        except Exception as e:
                            errors[kind] = f"{'ours' if ours else 'kernel'}: {e}"
                            continue
                        after = cpu_times(kc_pid) if kc_pid else None
                        if before is not None and after is not None:
                            own = after.own - before.own
                        else:
                            own = max(0.0, own - base)
                        speeds.setdefault((kind, ours), []).append(mbps)
                        cpu.setdefault((kind, ours), []).append(own / (size / GiB))
                finally:
                    if not ours:
                        self.kernel_down()
        rows = []
        down_mib, up_mib = self.rig.files[self.down_name][0] >> 20, self.up_size >> 20
        for kind, key, label in (
            ("down", "1", f"Download {down_mib} MiB, curl via wireguard-go peer (MB/s)"),
            ("up", "2", f"Upload {up_mib} MiB, curl -T via wireguard-go peer (MB/s)"),
        ):
            row = Row(key, label)
            if kind in errors:
                row.ours = f"error: {errors[kind]}"
            else:
                o, k = Stat.of(speeds[(kind, True)]), Stat.of(speeds[(kind, False)])
                co, ck = Stat.of(cpu[(kind, True)]), Stat.of(cpu[(kind, False)])
                row.ours, row.ref, row.ratio = o.fmt(), k.fmt(), ratio(o.median, k.median)
                row.notes = (
                    f"ours {o.spread()}, kernel {k.spread()}; CPU s/GiB: launcher "
                    f"{co.fmt(1)} (net of its {base:.2f} s start-up), wireguard-go client "
                    f"{ck.fmt(1)}"
                )
            rows.append(row)
        return rows

    # -- rows 4s and 1g: the seccomp door -----------------------------------------------------
    def _door(self, door: str, cmd: Sequence[str], timeout: float) -> str:
        argv = self.wrapped(cmd, ("--intercept", door))
        t = run_tracked(argv, timeout=timeout, env=self.env, preexec_fn=_raise_nofile)
        if t.returncode != 0:
            raise RuntimeError(f"{door}: exit {t.returncode}: {tail(t.stderr or t.stdout)}")
        return t.stdout

    def row_seccomp_connect(self, rounds: int, n: int = 200) -> Row:
        """The same Python client (connect_rtt.py) through both doors."""
        row = Row("4s", f"Connect round trip, seccomp door vs preload door, {n} connects (us)")
        host, port = self.rig.peer_tunnel_v4, str(self.rig.tcp_echo_port)
        cmd = [sys.executable, str(self.scripts["connect_rtt.py"]), host, port, str(n)]
        got: dict[str, list[float]] = {"seccomp": [], "preload": []}
        for r in range(rounds):
            for door in ("seccomp", "preload") if r % 2 == 0 else ("preload", "seccomp"):
                out = self._door(door, cmd, 60)
                got[door].extend(json.loads(out.strip().splitlines()[-1])["connect"])
        o, k = Stat.of(got["seccomp"]), Stat.of(got["preload"])
        row.ours, row.ref, row.ratio = o.fmt(0), k.fmt(0), ratio(o.median, k.median)
        row.notes = f"seccomp {o.spread(0)}, preload {k.spread(0)}"
        return row

    def row_seccomp_download(self, rounds: int, goprobe: Path) -> Row:
        """A Go client (tests/runtime/goprobe, static) through the seccomp door against curl
        through the shim, same file."""
        row = Row("1g", "Download, Go client via the seccomp door vs curl via the shim (MB/s)")
        url = self.rig.url(self.down_name)
        size, sha = self.rig.files[self.down_name]
        speeds: dict[str, list[float]] = {"go": [], "curl": []}
        for r in range(rounds):
            for who in ("go", "curl") if r % 2 == 0 else ("curl", "go"):
                t0 = time.monotonic()
                if who == "go":
                    res = json.loads(self._door("seccomp", [str(goprobe), "get", url], 120)
                                     .strip().splitlines()[-1])  # fmt: skip
                    if res.get("sha256") != sha:
                        raise RuntimeError(f"go download: {res}")
                    speeds[who].append(size / (time.monotonic() - t0) / MB)
                else:
                    mbps, _cpu, _size = self._curl_down(True, check=False)
                    speeds[who].append(mbps)
        o, k = Stat.of(speeds["go"]), Stat.of(speeds["curl"])
        row.ours, row.ref, row.ratio = o.fmt(), k.fmt(), ratio(o.median, k.median)
        row.notes = (
            f"go {o.spread()}, curl {k.spread()}; the Go figure is the whole run's wall time "
            "(start-up and handshake included), curl's its own transfer time"
        )
        return row

    # -- row 1s -------------------------------------------------------------------------------
    def row_socks5(self, rounds: int, port: int = 1080) -> Row:
        """The row-1 download through the SOCKS5 door (a daemon in the client namespace, a
        plain curl --socks5 beside it) next to the same download by a wrapped curl. One
        launcher at a time: both hold our key, and the peer follows the last handshake."""
        mib = self.rig.files[self.down_name][0] >> 20
        row = Row("1s", f"Download {mib} MiB, curl through the SOCKS5 door vs wrapped (MB/s)")
        speeds: dict[bool, list[float]] = {True: [], False: []}
        for r in range(rounds):
            for socks in [True, False] if r % 2 == 0 else [False, True]:
                self.rig.reset_peer()
                if socks:
                    speeds[True].append(self._socks_down(port, check=r == 0))
                else:
                    speeds[False].append(self._curl_down(True, check=False)[0])
        o, k = Stat.of(speeds[True]), Stat.of(speeds[False])
        row.ours, row.ref, row.ratio = o.fmt(), k.fmt(), ratio(o.median, k.median)
        row.notes = (
            f"SOCKS5 {o.spread()}, wrapped curl {k.spread()}; a daemon per turn, its start-up "
            "excluded (curl's time_total)"
        )
        return row

    @contextlib.contextmanager
    def socks5_daemon(self, port: int) -> Iterator[None]:
        """`wrapguard --socks5 127.0.0.1:PORT` in the client namespace, once it listens."""
        argv = [
            "ip", "netns", "exec", self.ns, sys.executable, "-m", "wrapguard",
            "--config", str(self.conf), "--socks5", f"127.0.0.1:{port}", "--log-level", "warn",
        ]  # fmt: skip
        errlog = self.workdir / "socks5.err"
        with open(errlog, "wb") as err:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                env=self.env, start_new_session=True, preexec_fn=_raise_nofile,
            )  # fmt: skip
        try:
            self._wait_listening(proc, port, errlog)
            yield
        finally:
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, 15)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait(10)

    def _socks_down(self, port: int, check: bool) -> float:
        out = str(self.workdir / "socks.bin") if check else "/dev/null"
        w = "%{http_code} %{size_download} %{time_total}\n"
        where = f"127.0.0.1:{port}"
        cmd = ["curl", "-sS", "--socks5", where, "-o", out, "-w", w, self.rig.url(self.down_name)]
        with self.socks5_daemon(port):
            stdout, _, _ = self.run(False, cmd, timeout=120)
        return self._downloaded(stdout, out, check, "SOCKS5 download")[0]

    # -- row 4p -------------------------------------------------------------------------------
    def row_socks5_connect(self, rounds: int, n: int = 200, port: int = 1080) -> Row:
        """Row 4's client (connect_rtt.py) run plainly through the SOCKS5 door (timed to the
        SOCKS5 success reply) next to the same client wrapped (timed connect()). One launcher
        at a time, the peer reset before each turn."""
        row = Row("4p", f"Connect round trip, {n} connects through the SOCKS5 door vs wrapped "
                        "connect() (median us)")  # fmt: skip
        host, port_s = self.rig.peer_tunnel_v4, str(self.rig.tcp_echo_port)
        cmd = [sys.executable, str(self.scripts["connect_rtt.py"]), host, port_s, str(n)]

        def turn(socks: bool) -> str:
            self.rig.reset_peer()
            if not socks:
                return self.run(True, cmd, timeout=60)[0]
            with self.socks5_daemon(port):
                return self.run(False, [*cmd, f"127.0.0.1:{port}"], timeout=60)[0]

        return _connect_row(row, rounds, turn, ("SOCKS5", "wrapped"),
                            "; a daemon per turn, its start-up excluded")  # fmt: skip

    def _wait_listening(self, proc: subprocess.Popen[bytes], port: int, errlog: Path) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"SOCKS5 daemon exited: {tail(errlog.read_text())}")
            probe = self.rig.client.socket()
            try:
                probe.connect(("127.0.0.1", port))
                return
            except OSError:
                time.sleep(0.05)
            finally:
                probe.close()
        raise RuntimeError("SOCKS5 daemon not listening after 30 s")

    # -- rows 1t and 2t: the TUN add-on -----------------------------------------------------------
    def tun_up(self) -> subprocess.Popen[bytes]:
        """`wrapguard up` in the client namespace (fresh handshake), once it says it is up."""
        self.rig.reset_peer()
        env = dict(self.env, WRAPGUARD_STATE_DIR=str(self.workdir / "tun-state"))
        errlog = self.workdir / "tun-up.log"
        argv = [
            "ip", "netns", "exec", self.ns, sys.executable, "-m", "wrapguard", "up",
            "--config", str(self.conf), "--tun", "wgbench0",
            "--control", str(self.workdir / "tun.sock"),
        ]  # fmt: skip
        with open(errlog, "wb") as err:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err, env=self.env | env,
                start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + 30
        while '"up: ' not in errlog.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                self.tun_down(proc)
                raise RuntimeError(f"wrapguard up: {tail(errlog.read_text(errors='replace'))}")
            time.sleep(0.05)
        return proc

    def tun_down(self, proc: subprocess.Popen[bytes]) -> None:
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, 15)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait(10)
        self.rig.reset_peer()

    def rows_tun(self, rounds: int) -> list[Row]:
        """Rows 1 and 2 with plain (unwrapped) curl, once through `wrapguard up`'s TUN device
        and once through wireguard-go's, turns interleaved; CPU of each tunnel process."""
        speeds: dict[tuple[str, bool], list[float]] = {}
        cpu: dict[tuple[str, bool], list[float]] = {}
        errors: dict[str, str] = {}
        for r in range(rounds):
            for ours in [True, False] if r % 2 == 0 else [False, True]:
                proc = self.tun_up() if ours else None
                pid = proc.pid if proc is not None else self.kernel_up()
                try:
                    for kind in ("down", "up"):
                        if kind in errors:
                            continue
                        before = cpu_times(pid)
                        try:
                            if kind == "down":
                                mbps, _, size = self._curl_down(False, check=r == 0)
                            else:
                                mbps, _, size = self._curl_up(False)
                        except Exception as e:
                            errors[kind] = f"{'ours' if ours else 'kernel'}: {e}"
                            continue
                        after = cpu_times(pid)
                        speeds.setdefault((kind, ours), []).append(mbps)
                        if before is not None and after is not None:
                            cpu.setdefault((kind, ours), []).append(
                                (after.own - before.own) / (size / GiB)
                            )
                finally:
                    if proc is not None:
                        self.tun_down(proc)
                    else:
                        self.kernel_down()
        rows = []
        down_mib, up_mib = self.rig.files[self.down_name][0] >> 20, self.up_size >> 20
        for kind, key, label in (
            ("down", "1t", f"TUN mode: download {down_mib} MiB, plain curl, `wrapguard up` vs "
                           "wireguard-go's TUN (MB/s)"),
            ("up", "2t", f"TUN mode: upload {up_mib} MiB, plain curl -T, `wrapguard up` vs "
                         "wireguard-go's TUN (MB/s)"),
        ):  # fmt: skip
            row = Row(key, label)
            if kind in errors:
                row.ours = f"error: {errors[kind]}"
            else:
                o, k = Stat.of(speeds[(kind, True)]), Stat.of(speeds[(kind, False)])
                co = Stat.of(cpu.get((kind, True), [0.0]))
                ck = Stat.of(cpu.get((kind, False), [0.0]))
                row.ours, row.ref, row.ratio = o.fmt(), k.fmt(), ratio(o.median, k.median)
                row.notes = (
                    f"ours {o.spread()}, wireguard-go {k.spread()}; CPU s/GiB: wrapguard up "
                    f"{co.fmt(1)}, wireguard-go client {ck.fmt(1)}"
                )
            rows.append(row)
        return rows

    # -- row 4 --------------------------------------------------------------------------------
    def row_connect(self, rounds: int, n: int = 200) -> Row:
        row = Row("4", f"Connect round trip, {n} sequential connect+close (median us)")
        host, port = self.rig.peer_tunnel_v4, str(self.rig.tcp_echo_port)
        cmd = [sys.executable, str(self.scripts["connect_rtt.py"]), host, port, str(n)]

        def turn(ours: bool) -> str:
            if ours:
                return self.run(True, cmd, timeout=60)[0]
            self.kernel_up()
            try:
                return self.run(False, cmd, timeout=60)[0]
            finally:
                self.kernel_down()

        return _connect_row(row, rounds, turn, ("ours", "kernel"))

    # -- row 5 --------------------------------------------------------------------------------
    def row_startup(self, runs: int = 15) -> Row:
        """Exact wall times (bench/startup_row.py: this process reaps the launcher, which the
        waiter never does; run_tracked's 20 ms polls would round each run up)."""
        from startup_row import run_once, subreaper

        row = Row("5", "`wrapguard -- true` vs `true` (median wall ms)")
        series = {
            "ours": self.wrapped(["true"]),
            "true": self.direct(["true"]),
            "python": self.direct([sys.executable, "-c", "pass"]),  # the interpreter, for scale
        }
        times: dict[str, list[float]] = {k: [] for k in series}
        cpu = []
        with subreaper():
            run_once(series["ours"], self.env, self.workdir)  # bytecode caches warm
            for i in range(runs):
                order = list(series)
                for kind in order if i % 2 == 0 else order[::-1]:
                    wall, used = run_once(series[kind], self.env, self.workdir)
                    times[kind].append(wall)
                    if kind == "ours":
                        cpu.append(used)
        o, k, p, c = (Stat.of(x) for x in (times["ours"], times["true"], times["python"], cpu))
        row.ours, row.ref, row.ratio = o.fmt(), k.fmt(), f"+{o.median - k.median:.1f} ms"
        row.notes = (
            f"ours {o.spread()}, true {k.spread()} (both via ip netns exec; exact wall times, "
            f"the launcher reaped by the bench); CPU of the waiter, launcher and `true` "
            f"{c.fmt(0)} ms; `python -c pass` alone {p.fmt()} ms"
        )
        return row

    # -- row 6 --------------------------------------------------------------------------------
    def row_rss(self, n: int = 1000) -> Row:
        row = Row("6", f"Launcher RSS, {n} concurrent open connections (MB)")
        host, port = self.rig.peer_tunnel_v4, str(self.rig.tcp_echo_port)
        cmd = [sys.executable, str(self.scripts["hold_conns.py"]), host, port, str(n)]
        errlog = self.workdir / "hold_conns.err"
        with open(errlog, "wb") as err:
            proc = subprocess.Popen(
                self.wrapped(cmd),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                env=self.env,
                start_new_session=True,
                preexec_fn=_raise_nofile,
            )
        assert proc.stdin is not None and proc.stdout is not None
        try:
            _expect(proc, "UP", 30, errlog)
            # The launcher is the forked child of the process we started (the waiter).
            kids = children(proc.pid)
            launcher = kids[0] if len(kids) == 1 else proc.pid
            rss1, _ = rss_mb(launcher)
            t0 = time.perf_counter()
            proc.stdin.write(b"go\n")
            proc.stdin.flush()
            _expect(proc, "HELD", 120, errlog)
            opened = time.perf_counter() - t0
            rss, hwm = rss_mb(launcher)
            proc.stdin.write(b"done\n")
            proc.stdin.flush()
            proc.wait(30)
        finally:
            if proc.poll() is None:
                with contextlib.suppress(OSError):
                    os.killpg(proc.pid, 9)
                proc.wait(10)
        row.ours, row.ref = f"{rss:.1f}", f"{rss1:.1f} (1 conn)"
        row.ratio = f"+{(rss - rss1) * 1e3 / (n - 1):.1f} KB/conn"
        row.notes = f"VmHWM {hwm:.1f} MB; {n} connections opened and echoed in {opened:.1f} s"
        return row


def _expect(proc: subprocess.Popen[bytes], word: str, timeout: float, errlog: Path) -> str:
    """Wait for a stdout line starting with `word` from proc; raise with its stderr if not."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    fd = proc.stdout.fileno()
    buf = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise RuntimeError(f"no {word} line after {timeout:.0f}s")
        chunk = os.read(fd, 4096)
        if not chunk:
            err = errlog.read_text(errors="replace")
            raise RuntimeError(f"client exited before {word}: {tail(err)}")
        buf += chunk
        for line in buf.decode(errors="replace").splitlines():
            if line.startswith(word):
                return line


def _connect_row(
    row: Row, rounds: int, turn: Callable[[bool], str], names: tuple[str, str], note: str = ""
) -> Row:
    """Rows 4 and 4p: connect_rtt.py's samples over interleaved turns (turn(side) runs one and
    returns its output; True is the row's "wrapguard" side), medians over all of them."""
    got: dict[bool, dict[str, list[float]]] = {True: {}, False: {}}
    per_round: dict[bool, list[float]] = {True: [], False: []}
    for r in range(rounds):
        for side in [True, False] if r % 2 == 0 else [False, True]:
            data = json.loads(turn(side).strip().splitlines()[-1])
            for k, v in data.items():
                got[side].setdefault(k, []).extend(v)
            per_round[side].append(Stat.of(data["connect"]).median)
    o, k = Stat.of(got[True]["connect"]), Stat.of(got[False]["connect"])
    fo, fk = Stat.of(got[True]["first_byte"]), Stat.of(got[False]["first_byte"])
    ro, rk = Stat.of(per_round[True]), Stat.of(per_round[False])
    row.ours, row.ref, row.ratio = o.fmt(0), k.fmt(0), ratio(o.median, k.median)
    row.notes = (
        f"per-round medians {names[0]} {ro.spread(0)}, {names[1]} {rk.spread(0)}; connect+first "
        f"byte {fo.fmt(0)} vs {fk.fmt(0)} us ({ratio(fo.median, fk.median)}){note}"
    )
    return row


def guarded(row: Row, fn: Callable[[], Row]) -> Row:
    """fn() or `row` with the error in it."""
    try:
        return fn()
    except Exception as e:
        row.ours = f"error: {type(e).__name__}: {tail(str(e), 200)}"
        return row
