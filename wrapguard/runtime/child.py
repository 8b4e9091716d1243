"""The wrapped program: start it, forward signals to it, and turn its end into our exit code.

The child runs in its own process group so that a signal to wrapguard (SIGINT, SIGTERM,
SIGHUP) reaches the whole group, as with the Go tool; if it has not exited 5 s after the
first forwarded signal, the group gets SIGKILL. When wrapguard runs in the terminal's
foreground, the child's group is made the foreground group, so shells and editors keep the
terminal (job control, Ctrl-C, reads from the tty); the terminal is handed back on exit.
A child killed by signal N gives 128+N, as a shell reports it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import resource
import signal
from collections.abc import Callable, Mapping, Sequence

from wrapguard import log
from wrapguard.errors import WrapguardError

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
KILL_GRACE = 5.0
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


_child_nofile: tuple[int, int] | None = None


def raise_fd_limit(want: int = 65536) -> None:
    """Give the launcher room for many connections (two fds each); the child gets the
    limits it would have had without wrapguard."""
    global _child_nofile
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft >= target:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (OSError, ValueError):
        return
    _child_nofile = (soft, hard)


def exit_status(returncode: int) -> int:
    """Shell convention: a negative Popen return code -N means killed by signal N."""
    return 128 - returncode if returncode < 0 else returncode


async def _await_ready(
    proc: asyncio.subprocess.Process, pgid: int, ready: asyncio.Event, timeout: float, name: str
) -> None:
    waiter = asyncio.ensure_future(ready.wait())
    exited = asyncio.ensure_future(proc.wait())
    try:
        await asyncio.wait({waiter, exited}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
    if ready.is_set() or exited.done():
        exited.cancel()
        return
    exited.cancel()
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
    await proc.wait()
    raise WrapguardError(
        f"{name} did not load the wrapguard shim within {timeout:g} s (a static or Go binary, "
        "or a setuid program?); it was stopped so that none of its traffic bypasses the "
        f"tunnel. Run `wrapguard --doctor {name}` to check"
    )


class _Terminal:
    """Hands the controlling terminal's foreground to the child's group and back."""

    def __init__(self) -> None:
        self.fd: int | None = None
        self.our_pgrp = os.getpgrp()
        try:
            fd = os.open("/dev/tty", os.O_RDWR | os.O_CLOEXEC | os.O_NOCTTY)
        except OSError:
            return
        try:
            if os.tcgetpgrp(fd) == self.our_pgrp and os.isatty(0):
                self.fd = fd
                return
        except OSError:
            pass
        os.close(fd)

    def give(self, pgid: int) -> None:
        if self.fd is None:
            return
        old = signal.signal(signal.SIGTTOU, signal.SIG_IGN)
        try:
            os.tcsetpgrp(self.fd, pgid)
        except OSError:
            pass
        finally:
            signal.signal(signal.SIGTTOU, old)

    def take_back(self) -> None:
        if self.fd is None:
            return
        self.give(self.our_pgrp)
        os.close(self.fd)
        self.fd = None


async def run_child(
    argv: Sequence[str],
    executable: str,
    env: Mapping[str, str],
    pass_fds: Sequence[int] = (),
    *,
    ready: asyncio.Event | None = None,
    ready_timeout: float = 3.0,
    on_started: Callable[[int], None] | None = None,
    forwarded: list[signal.Signals] | None = None,
) -> int:
    """Run the program to its end; returns wrapguard's exit status.

    With `ready`, the program must load the shim (which sets the event) within
    `ready_timeout` seconds, or it is killed: fail closed, nothing bypasses the tunnel.
    `on_started(pgid)` is called once the program runs; the signals forwarded to it are
    appended to `forwarded`.
    """
    logger = log.get()
    loop = asyncio.get_running_loop()
    terminal = _Terminal()
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)
    child_nofile = _child_nofile

    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork
    launcher = os.getpid()

    def in_child() -> None:  # between fork and exec
        # The program dies with the launcher (kill -9 included): it never runs on without
        # its tunnel. Checked against a launcher that died before prctl took effect.
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != launcher:
            os._exit(1)
        if child_nofile is not None and child_nofile != nofile:
            resource.setrlimit(resource.RLIMIT_NOFILE, child_nofile)

    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            executable=executable,
            env=dict(env),
            process_group=0,
            pass_fds=tuple(pass_fds),
            close_fds=True,
            preexec_fn=in_child,
        )
    except OSError as exc:
        # ENOEXEC (no #! line, wrong architecture), EACCES, ...: one line, as env(1) does.
        err = WrapguardError(f"cannot run {argv[0]}: {exc.strerror or exc}")
        err.exit_code = 126
        raise err from None
    pgid = proc.pid
    terminal.give(pgid)
    if on_started is not None:
        on_started(pgid)
    logger.info("started program", pid=proc.pid, program=argv[0])
    kill_timer: asyncio.TimerHandle | None = None

    def kill_group() -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
        logger.warning("program did not exit in time: killed", grace_s=KILL_GRACE)

    def forward(sig: signal.Signals) -> None:
        nonlocal kill_timer
        logger.info("forwarding signal", signal=sig.name, pid=pgid)
        if forwarded is not None:
            forwarded.append(sig)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)
        if kill_timer is None:
            kill_timer = loop.call_later(KILL_GRACE, kill_group)

    for sig in FORWARDED:
        loop.add_signal_handler(sig, forward, sig)
    try:
        if ready is not None:
            await _await_ready(proc, pgid, ready, ready_timeout, argv[0])
        returncode = await proc.wait()
    finally:
        for sig in FORWARDED:
            loop.remove_signal_handler(sig)
        if kill_timer is not None:
            kill_timer.cancel()
        terminal.take_back()
    status = exit_status(returncode)
    logger.info("program exited", pid=proc.pid, status=status)
    return status
