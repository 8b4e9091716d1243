"""Which door carries a wrapped program's sockets (`--intercept auto|preload|seccomp`).

The preload shim sees dynamically linked programs that call libc; static and Go programs
make their own system calls, so `auto` gives them the seccomp door (docs/seccomp.md), chosen
from the ELF headers of the program (and of the interpreters of a `#!` script), as --doctor
reads them. Nothing is executed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from wrapguard.elf import NotElf, read_elf

PRELOAD, SECCOMP = "preload", "seccomp"


@dataclass(frozen=True, slots=True)
class Choice:
    """The door a program gets, and why."""

    door: str  # PRELOAD or SECCOMP
    reason: str


def _script_interpreter(path: str) -> str | None:
    from wrapguard.doctor import _interpreter_of

    return _interpreter_of(path)


def needs_seccomp(path: str) -> str | None:
    """Why the shim cannot see `path` (static or Go, itself or its #! interpreter), else None."""
    seen: set[str] = set()
    current = os.path.realpath(path)
    while current not in seen:
        seen.add(current)
        try:
            info = read_elf(current)
        except (NotElf, OSError):
            info = None
        if info is not None:
            if info.is_go:
                return f"{current} is a Go program (it makes its own system calls)"
            if info.is_static:
                return f"{current} is statically linked (LD_PRELOAD cannot load into it)"
            return None
        nxt = _script_interpreter(current)
        if nxt is None:
            return None
        current = os.path.realpath(nxt)
    return None


def seccomp_unavailable() -> str | None:
    """None when the seccomp door can run here, else why not."""
    from wrapguard.doors.seccomp_sys import helper_path, supported

    if helper_path() is None:
        return "the seccomp helper is missing (reinstall wrapguard with `pip install .`)"
    return supported()


def choose(path: str, mode: str) -> Choice:
    if mode == PRELOAD:
        return Choice(PRELOAD, "--intercept preload")
    if mode == SECCOMP:
        return Choice(SECCOMP, "--intercept seccomp")
    why = needs_seccomp(path)
    if why is None:
        return Choice(PRELOAD, "a dynamically linked program: the preload shim sees its calls")
    return Choice(SECCOMP, why)


__all__ = ["PRELOAD", "SECCOMP", "Choice", "choose", "needs_seccomp", "seccomp_unavailable"]
