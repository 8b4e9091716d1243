"""Network namespaces for the test rig: create, run commands in, open sockets in, sweep, delete.

A `Netns` owns one named namespace (`ip netns add`), every process it started and a set of
cleanup callbacks; `close()` undoes all of it and never raises. `Netns.socket()` creates a socket
inside the namespace from the test process: a short-lived helper thread setns()es itself into
the namespace, creates the socket and exits, so the caller's thread never changes namespace.
Names carry the owner's pid (`wgrig-<pid>-<id>-<role>`), so `sweep_stale()` removes only the
leftovers of dead runs and never a namespace a concurrent run is using.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

PREFIX = "wgrig-"
NETNS_DIR = Path("/run/netns")
NETNS_ETC = Path("/etc/netns")
WG_SOCK_DIR = Path("/var/run/wireguard")
CHECKOUT = Path(__file__).resolve().parents[2]
CLONE_NEWNET = 0x40000000
_NAME_RE = re.compile(rf"^{PREFIX}(\d+)-([0-9a-f]+)-\w+$")

T = TypeVar("T")
_libc = ctypes.CDLL(None, use_errno=True)


class CommandFailed(subprocess.CalledProcessError):
    """A command run in a namespace failed; str() shows its output, for a readable test log."""

    def __str__(self) -> str:
        return f"{super().__str__()}\nstdout: {self.stdout!s:.2000}\nstderr: {self.stderr!s:.2000}"


def new_id() -> str:
    """A short random id (6 hex digits); interface names built from it stay <= 15 chars."""
    return secrets.token_hex(3)


def _setns(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


def call_in_netns(name: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run fn(*args, **kwargs) in a helper thread that has entered namespace `name`.

    Sockets created by fn stay in that namespace; the calling thread is never moved.
    """
    box: dict[str, Any] = {}

    def runner() -> None:
        try:
            _setns(NETNS_DIR / name)
            box["result"] = fn(*args, **kwargs)
        except BaseException as exc:
            box["error"] = exc

    t = threading.Thread(target=runner, name=f"setns-{name}", daemon=True)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["result"]  # type: ignore[no-any-return]


def _kill_group(proc: subprocess.Popen[Any], grace: float) -> None:
    """SIGTERM the process group, SIGKILL it after `grace` seconds, then reap the leader.

    The leader is reaped only after the last signal: until then its pid (and so the group id)
    cannot be reused, so no signal can reach a stranger. A leader reaped earlier is left alone.
    """
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            if os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                break
        except ChildProcessError:
            break
        time.sleep(0.01)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)


def netns_pids(name: str) -> list[int]:
    out = subprocess.run(
        ["ip", "netns", "pids", name], capture_output=True, text=True, timeout=10, check=False
    ).stdout
    return [int(p) for p in out.split()]


def _kill_pids(pids: Sequence[int]) -> None:
    pids = [p for p in pids if p != os.getpid()]  # never the test process itself
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = []
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
                alive.append(pid)
        deadline = time.monotonic() + 2
        while alive and time.monotonic() < deadline:
            alive = [p for p in alive if Path(f"/proc/{p}").exists() and not _is_zombie(p)]
            if alive:
                time.sleep(0.02)
        if not alive:
            return


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] in ("Z", "X")


class Netns:
    """One network namespace owned by this process (see the module docstring)."""

    def __init__(self, role: str, rig_id: str | None = None) -> None:
        self.id = rig_id or new_id()
        self.name = f"{PREFIX}{os.getpid()}-{self.id}-{role}"
        self.procs: list[subprocess.Popen[Any]] = []
        self._cleanups: list[Callable[[], object]] = []
        self._closed = False
        subprocess.run(["ip", "netns", "add", self.name], check=True, timeout=10)
        try:
            with self.iproute() as ipr:
                ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        except BaseException:
            self.close()
            raise

    def __repr__(self) -> str:
        return f"Netns({self.name})"

    # -- netlink, sockets -------------------------------------------------------------------
    def iproute(self) -> Any:
        """A pyroute2 IPRoute bound to this namespace (use as a context manager)."""
        from pyroute2 import IPRoute

        return IPRoute(netns=self.name)

    def socket(
        self, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM, proto: int = 0
    ) -> socket.socket:
        """A socket that lives in this namespace, created from the test process."""
        return call_in_netns(self.name, socket.socket, family, type, proto)

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run fn inside this namespace (in a helper thread); return its result."""
        return call_in_netns(self.name, fn, *args, **kwargs)

    def resolv_conf(self, text: str) -> None:
        """Set /etc/resolv.conf as seen by processes started with run()/popen()/python()."""
        d = NETNS_ETC / self.name
        d.mkdir(parents=True, exist_ok=True)
        (d / "resolv.conf").write_text(text)

    def hosts(self, text: str) -> None:
        """Set /etc/hosts as seen by processes started with run()/popen()/python().

        Written in place, never by rename: `ip netns exec` bind-mounts this file over
        /etc/hosts when a process starts, which pins its inode, so a process already running
        sees the new text only if the same file changes. It must exist before that process
        starts."""
        d = NETNS_ETC / self.name
        d.mkdir(parents=True, exist_ok=True)
        with open(d / "hosts", "w") as f:  # O_TRUNC: the same inode
            f.write(text)

    # -- processes --------------------------------------------------------------------------
    def _argv(self, argv: Sequence[str | os.PathLike[str]]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *(os.fspath(a) for a in argv)]

    def run(
        self,
        argv: Sequence[str | os.PathLike[str]],
        *,
        check: bool = True,
        timeout: float = 60,
        capture: bool = True,
        **kwargs: Any,
    ) -> subprocess.CompletedProcess[Any]:
        """subprocess.run inside the namespace; output captured as text unless told otherwise."""
        if capture and "stdout" not in kwargs and "stderr" not in kwargs:
            kwargs["capture_output"] = True
        kwargs.setdefault("text", "input" not in kwargs or isinstance(kwargs["input"], str))
        r = subprocess.run(self._argv(argv), timeout=timeout, start_new_session=True, **kwargs)
        if check and r.returncode != 0:
            raise CommandFailed(r.returncode, [self.name, *map(str, argv)], r.stdout, r.stderr)
        return r

    def popen(self, argv: Sequence[str | os.PathLike[str]], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start a process in the namespace (own process group); it is killed by close()."""
        proc: subprocess.Popen[Any] = subprocess.Popen(
            self._argv(argv), start_new_session=True, **kwargs
        )
        self.procs.append(proc)
        return proc

    @staticmethod
    def python_env(env: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ if env is None else env)
        parts = [str(CHECKOUT), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(parts))
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    @staticmethod
    def _python_argv(script_or_args: str | os.PathLike[str] | Sequence[str]) -> list[str]:
        if isinstance(script_or_args, os.PathLike):
            return [sys.executable, os.fspath(script_or_args)]
        if isinstance(script_or_args, str):
            if script_or_args.endswith(".py") and "\n" not in script_or_args:
                return [sys.executable, script_or_args]
            return [sys.executable, "-c", script_or_args]
        return [sys.executable, *script_or_args]

    def python(
        self,
        script_or_args: str | os.PathLike[str] | Sequence[str],
        *,
        env: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> subprocess.CompletedProcess[Any]:
        """Run Python with the checkout importable: a Path or "*.py" string runs that script,
        any other string is code for -c, a list is the arguments after the interpreter."""
        return self.run(self._python_argv(script_or_args), env=self.python_env(env), **kwargs)

    def python_popen(
        self,
        script_or_args: str | os.PathLike[str] | Sequence[str],
        *,
        env: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> subprocess.Popen[Any]:
        return self.popen(self._python_argv(script_or_args), env=self.python_env(env), **kwargs)

    # -- teardown ---------------------------------------------------------------------------
    def on_close(self, fn: Callable[[], object]) -> None:
        """Register a cleanup to run (last registered first) before the namespace is deleted."""
        self._cleanups.append(fn)

    def close(self) -> list[str]:
        """Kill everything and delete the namespace; returns problems instead of raising."""
        if self._closed:
            return []
        self._closed = True
        problems: list[str] = []
        for fn in reversed(self._cleanups):
            try:
                fn()
            except Exception as exc:
                problems.append(f"{self.name}: cleanup {fn!r}: {exc!r}")
        for proc in reversed(self.procs):
            _kill_group(proc, grace=2)
        if (NETNS_DIR / self.name).exists():
            _kill_pids(netns_pids(self.name))
        remove_netns(self.name, problems)
        return problems


def remove_netns(name: str, problems: list[str]) -> None:
    r = subprocess.run(
        ["ip", "netns", "del", name], capture_output=True, text=True, timeout=10, check=False
    )
    if r.returncode != 0 and (NETNS_DIR / name).exists():
        problems.append(f"ip netns del {name}: {r.stderr.strip()}")
    etc = NETNS_ETC / name
    if etc.exists():
        for f in etc.iterdir():
            f.unlink()
        etc.rmdir()


def rig_namespaces() -> Iterator[tuple[str, int, str]]:
    """(name, owner pid, rig id) of every rig namespace on the machine."""
    if not NETNS_DIR.is_dir():
        return
    for p in sorted(NETNS_DIR.iterdir()):
        m = _NAME_RE.match(p.name)
        if m:
            yield p.name, int(m.group(1)), m.group(2)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not _is_zombie(pid)


def sweep_stale() -> list[str]:
    """Remove rig namespaces (and their processes, wg sockets) whose owner process is gone."""
    removed: list[str] = []
    problems: list[str] = []
    for name, pid, rig_id in rig_namespaces():
        if pid == os.getpid() or _pid_alive(pid):
            continue
        _kill_pids(netns_pids(name))
        remove_netns(name, problems)
        for sock in WG_SOCK_DIR.glob(f"wgr{rig_id}*.sock"):
            with contextlib.suppress(FileNotFoundError):
                sock.unlink()
        removed.append(name)
    for etc in NETNS_ETC.glob(f"{PREFIX}*") if NETNS_ETC.is_dir() else []:
        m = _NAME_RE.match(etc.name)
        if m and not (NETNS_DIR / etc.name).exists() and not _pid_alive(int(m.group(1))):
            remove_netns(etc.name, problems)
    return removed
