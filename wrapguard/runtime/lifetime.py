"""How long a run lasts: the program's exit status now, the tunnel for as long as it is used.

`wrapguard -- CMD` forks once, before anything else starts. The original process (the one the
user's shell waits for) becomes the *waiter*: it forwards SIGINT/SIGTERM/SIGHUP to the
launcher and exits with the status the launcher reports over a pipe. The child becomes the
*launcher*: a child subreaper (prctl PR_SET_CHILD_SUBREAPER), so every process the program
leaves behind (`cmd &`, `ssh -f`, daemons that fork and exit) is re-parented to it and it can
tell when the last one is gone. When the program exits, the launcher reports its status at
once if descendants still run (the tunnel stays up in the background for them), or after its
flows have drained otherwise. If the launcher dies without a status, the waiter kills the
program's process group (fail closed) and exits 1, or 128+N for signal N.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

from wrapguard import log, startup
from wrapguard.runtime.child import FORWARDED, KILL_GRACE

PR_SET_DUMPABLE = 4  # <linux/prctl.h>
PR_SET_CHILD_SUBREAPER = 36
REAP_POLL = 1.0  # seconds between checks for descendants, besides SIGCHLD


class StatusLink:
    """The launcher's end of the pipe to the waiter."""

    def __init__(self, fd: int | None, waiter: int | None) -> None:
        self._fd = fd
        self.waiter = waiter  # the waiter's pid (None when not split)

    @property
    def open(self) -> bool:
        return self._fd is not None

    def _send(self, line: str) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.write(self._fd, line.encode())

    def program_started(self, pgid: int) -> None:
        """The waiter kills this group if the launcher dies before reporting a status."""
        self._send(f"pgid {pgid}\n")

    def program_gone(self) -> None:
        """The program exited: its pgid may be reused, the waiter must not kill it any more."""
        self._send("gone\n")

    def report(self, status: int) -> None:
        """Send the exit status; the waiter exits with it. Once only."""
        if self._fd is None:
            return
        self._send(f"status {status}\n")
        self.close()

    def close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None


def split(body: Callable[[StatusLink], int]) -> int:
    """Run `body` in a forked launcher; return (in the waiter) the status it reports.

    In the launcher process `body` has closed everything it owns by the time it returns: the
    launcher reports the status and exits at once (os._exit), without the interpreter's
    teardown, which would only keep the waiter waiting for the end of the pipe. An exception
    from `body` takes the usual way out."""
    r, w = os.pipe()
    os.set_inheritable(r, False)
    os.set_inheritable(w, False)
    sys.stdout.flush()
    sys.stderr.flush()
    waiter = os.getpid()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        become_subreaper()
        link = StatusLink(w, waiter)
        try:
            code = body(link)
        except BaseException:
            link.close()  # the waiter takes the exit code from waitpid
            raise
        link.report(code)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    os.close(w)
    startup.resume()  # the waiter has all it needs (the launcher resumes once it is set up)
    status = _wait(pid, r)
    # The waiter has nothing to clean up (the launcher owns every resource): skip the
    # interpreter's teardown, which would only delay the caller.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _wait(pid: int, fd: int) -> int:
    """The waiter: forward signals, read the launcher's lines, exit with its status."""

    def forward(sig: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)

    for sig in FORWARDED:
        signal.signal(sig, forward)
    pgid: int | None = None
    status: int | None = None
    buf = b""
    while True:
        chunk = os.read(fd, 256)
        if not chunk:
            break
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            key, _, value = line.decode().partition(" ")
            if key == "pgid":
                pgid = int(value)
            elif key == "gone":
                pgid = None
            elif key == "status":
                status = int(value)
    os.close(fd)
    if status is not None:
        return status
    # The launcher ended without a status: its own exit code (a setup error), or a signal.
    _, wstatus = os.waitpid(pid, 0)
    if os.WIFSIGNALED(wstatus):
        signum = os.WTERMSIG(wstatus)
        if pgid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)  # fail closed: no tunnel, no program
        print(
            f"wrapguard: the launcher was killed by signal {signum}; the program was stopped",
            file=sys.stderr,
        )
        return 128 + signum
    return os.waitstatus_to_exitcode(wstatus)


def release_stdio() -> None:
    """Let go of the caller's stdin and stdout (the program was their only user), so that
    `out=$(wrapguard -- sh -c 'job >/dev/null &')` returns when the shell does. stderr stays:
    it carries our log lines unless --log-file was given."""
    with contextlib.suppress(OSError):
        null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        for fd in (0, 1):
            os.dup2(null, fd, inheritable=False)
        os.close(null)


def _prctl(option: int, arg: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, arg, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), f"prctl({option})")


def make_undumpable() -> None:
    """No core dump and no ptrace/`/proc/PID/mem` by other processes of our uid: this process
    holds the private key. (The program gets its own, dumpable, at exec.)"""
    try:
        _prctl(PR_SET_DUMPABLE, 0)
    except (OSError, AttributeError) as exc:
        log.get("wrapguard.lifetime").debug("cannot make the launcher undumpable", error=str(exc))


def become_subreaper() -> None:
    """Orphaned descendants come to us instead of init, so we know when the last one ends."""
    try:
        _prctl(PR_SET_CHILD_SUBREAPER, 1)
    except (OSError, AttributeError) as exc:
        log.get("wrapguard.lifetime").debug("cannot become a child subreaper", error=str(exc))


def reap() -> bool:
    """Collect exited children; True while any child (hence any descendant) is alive."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return False
        except OSError as exc:
            if exc.errno == errno.EINTR:
                continue
            return False
        if pid == 0:
            return True


def reap_except(program: int) -> None:
    """Collect exited children other than `program` (asyncio's child watcher waits for that
    one): orphans re-parented to us while the program runs must not pile up as zombies."""
    for pid in children():
        if pid == program:
            continue
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)


def children() -> list[int]:
    """Our direct children (descendants re-parented to us included)."""
    out: list[int] = []
    with contextlib.suppress(OSError):
        for tid in os.listdir("/proc/self/task"):
            with contextlib.suppress(OSError), open(f"/proc/self/task/{tid}/children") as f:
                out.extend(int(p) for p in f.read().split())
    return sorted(set(out))


def signal_children(sig: int) -> None:
    """Send `sig` to every child and its process group (what a daemon left behind)."""
    for pid in children():
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)
        with contextlib.suppress(ProcessLookupError, PermissionError, OSError):
            pgid = os.getpgid(pid)
            if pgid != os.getpgrp():
                os.killpg(pgid, sig)


class Afterlife:
    """The launcher after the program exited: stop signals (SIGINT/SIGTERM/SIGHUP) are passed
    on to what the program left behind, SIGKILL follows after the grace period, and
    `outlive()` returns when the last descendant is gone. `stopping` is set by each signal."""

    def __init__(self, logger: Any) -> None:
        self.log = logger
        self.loop = asyncio.get_running_loop()
        self.stopping = asyncio.Event()
        self._kill: asyncio.TimerHandle | None = None
        self._gone = asyncio.Event()

    def install(self) -> None:
        for sig in FORWARDED:
            self.loop.add_signal_handler(sig, self._signalled, sig)
        self.loop.add_signal_handler(signal.SIGCHLD, self._check)

    def remove(self) -> None:
        for sig in (*FORWARDED, signal.SIGCHLD):
            self.loop.remove_signal_handler(sig)
        if self._kill is not None:
            self._kill.cancel()

    def _signalled(self, sig: signal.Signals) -> None:
        self.stopping.set()
        self.stop_children(sig)

    def stop_children(self, sig: signal.Signals) -> None:
        pids = children()
        if not pids:
            return
        self.log.info("stopping the processes left behind", signal=sig.name, pids=pids)
        signal_children(sig)
        if self._kill is None:
            self._kill = self.loop.call_later(KILL_GRACE, signal_children, signal.SIGKILL)

    def _check(self) -> None:
        if not reap():
            self._gone.set()

    async def outlive(self) -> None:
        while not self._gone.is_set():
            self._check()  # SIGCHLD may have come before the handler was installed
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._gone.wait(), REAP_POLL)


__all__ = [
    "Afterlife",
    "StatusLink",
    "children",
    "make_undumpable",
    "reap",
    "reap_except",
    "release_stdio",
    "signal_children",
    "split",
]
