"""Where the control socket lives (compat.md, "Control socket").

Default: `$XDG_RUNTIME_DIR/wrapguard/<config stem>.sock` when XDG_RUNTIME_DIR names a
directory of ours that no one else can write (after `su` without `-` it still names the
other user's), else `<tempdir>/wrapguard-<uid>/<config stem>.sock` in a 0700 directory of
ours. `check_parent()` is the one rule for any socket directory: ours (or root's) and not
writable by others, created 0700 when missing. `find_control_socket()` lists the sockets in
the default directories, for `wrapguard show` without a path.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

from wrapguard.errors import WrapguardError

SUFFIX = ".sock"
SUN_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) - 1 on Linux (unix(7))


def _problem(path: str, *, private: bool) -> str | None:
    """Why `path` may not hold our control socket (None: it may). Whoever may write a
    directory may swap the socket for their own; root can anyway, so root's directories pass.
    `private`: it must be ours and 0700 (the directories we make for ourselves)."""
    try:
        st = os.lstat(path) if private else os.stat(path)
    except OSError as exc:
        return exc.strerror or "not usable"
    if stat.S_ISLNK(st.st_mode):
        return "a symbolic link"  # its owner could point it elsewhere later
    if not stat.S_ISDIR(st.st_mode):
        return "not a directory"
    euid = os.geteuid()
    if st.st_uid != euid and (private or st.st_uid != 0):
        return f"owned by uid {st.st_uid}, not by us (uid {euid})"
    if private and stat.S_IMODE(st.st_mode) & 0o077:
        return f"not private (mode {stat.S_IMODE(st.st_mode):04o}, want 0700)"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"writable by other users (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def check_parent(directory: str, *, private: bool = False) -> None:
    """Make sure `directory` may hold a control socket: create it 0700 if missing (its own
    parent must exist), else it must be ours (or root's) and not writable by others.
    The temp-dir default must be private (it sits in a directory everyone can write).
    Raises WrapguardError with one line."""
    private = private or os.path.abspath(directory) == _temp_dir()
    try:
        os.mkdir(directory, 0o700)
        private = True  # we made it: it must still be ours and 0700 when we look (no swap)
    except FileExistsError:
        pass
    except OSError as exc:
        raise WrapguardError(
            f"cannot create the control socket directory {directory}: {exc.strerror}"
        ) from None
    why = _problem(directory, private=private)
    if why is not None:
        raise WrapguardError(f"{directory} cannot hold the control socket: {why}")


def _stem(config_path: str) -> str:
    stem = Path(config_path).stem if config_path not in ("", "-") else ""
    return stem or "wrapguard"


def _xdg_dir() -> str | None:
    """$XDG_RUNTIME_DIR/wrapguard when XDG_RUNTIME_DIR is set, usable and ours."""
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if not xdg or not os.path.isabs(xdg):
        return None
    if _problem(xdg, private=False) is not None or os.stat(xdg).st_uid != os.geteuid():
        return None
    if not os.access(xdg, os.W_OK | os.X_OK):
        return None
    return os.path.join(xdg, "wrapguard")


def _temp_dir() -> str:
    return os.path.join(tempfile.gettempdir(), f"wrapguard-{os.geteuid()}")


def default_directories() -> list[str]:
    """The directories a default control socket may be in, preferred first."""
    xdg = _xdg_dir()
    return [d for d in (xdg, _temp_dir()) if d is not None]


def default_control_path(config_path: str) -> str:
    """`$XDG_RUNTIME_DIR/wrapguard/<stem>.sock`, else `<tempdir>/wrapguard-<uid>/<stem>.sock`.
    Raises WrapguardError when the temp-dir fallback exists but is not a private directory of
    ours (someone else made it first: using it would hand them our socket)."""
    name = _stem(config_path) + SUFFIX
    xdg = _xdg_dir()
    if xdg is not None:
        return os.path.join(xdg, name)
    directory = _temp_dir()
    if os.path.lexists(directory):
        why = _problem(directory, private=True)
        if why is not None:
            raise WrapguardError(
                f"{directory} cannot hold the control socket: {why} (pass --control PATH)"
            )
    return os.path.join(directory, name)


def find_control_socket() -> list[str]:
    """The control sockets in the default directories (ours, private ones only), sorted."""
    found: list[str] = []
    for directory in default_directories():
        if _problem(directory, private=directory == _temp_dir()) is not None:
            continue
        try:
            names = sorted(os.listdir(directory))
        except OSError:
            continue
        for name in names:
            path = os.path.join(directory, name)
            try:
                st = os.lstat(path)
            except OSError:
                continue
            if name.endswith(SUFFIX) and stat.S_ISSOCK(st.st_mode) and st.st_uid == os.geteuid():
                found.append(path)
    return found


__all__ = ["check_parent", "default_control_path", "default_directories", "find_control_socket"]
