"""Where the preload shim lives, how a child gets it, and a probe that proves it loads.

The shim (csrc/, built at install into wrapguard/_shim.so) is prepended to any LD_PRELOAD the
user already has, so their own preloads keep working and the child's descendants stay wrapped.
It announces itself on the file descriptor named by WRAPGUARD_ANNOUNCE_FD; a program that never
announces did not load it (static binary, Go binary, setuid).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from wrapguard.errors import WrapguardError

SHIM_NAME = "_shim.so"
ENV_PRELOAD = "LD_PRELOAD"
ENV_ANNOUNCE_FD = "WRAPGUARD_ANNOUNCE_FD"
ANNOUNCE_PREFIX = b"wrapguard-shim "


def shim_path() -> str:
    path = Path(__file__).with_name(SHIM_NAME)
    if not path.is_file():
        raise WrapguardError(
            f"the preload shim is missing ({path}); reinstall wrapguard with `pip install .` "
            "so that csrc/ is compiled (a C compiler is needed at install time)"
        )
    return str(path)


def preload_value(existing: str | None, shim: str) -> str:
    """The child's LD_PRELOAD: the shim first, then whatever the user had (deduplicated)."""
    parts = [p for p in (existing or "").replace(":", " ").split() if p and p != shim]
    return " ".join([shim, *parts]) if parts else shim


def probe(program: list[str], timeout: float = 5.0) -> tuple[bool, str]:
    """Run `program` with the shim preloaded; True if the shim announced itself in it."""
    shim = shim_path()
    read_fd, write_fd = os.pipe()
    env = dict(os.environ)
    env[ENV_PRELOAD] = preload_value(env.get(ENV_PRELOAD), shim)
    env[ENV_ANNOUNCE_FD] = str(write_fd)
    try:
        proc = subprocess.run(
            program,
            env=env,
            pass_fds=(write_fd,),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=timeout,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        os.close(read_fd)
        os.close(write_fd)
        return False, f"could not run {program[0]}: {exc}"
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as f:
        announced = f.read(4096)
    if announced.startswith(ANNOUNCE_PREFIX):
        return True, announced.splitlines()[0].decode("ascii", "replace")
    err = proc.stderr.decode("utf-8", "replace").strip().splitlines()
    detail = err[-1] if err else f"exit status {proc.returncode}"
    return False, f"the shim did not load into {program[0]} ({detail})"
