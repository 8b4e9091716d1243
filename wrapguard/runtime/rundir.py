"""What a run leaves in the runtime directory, and what it finds there from other runs.

Each launcher's private channel directory (`wrapguard-*`, 0700, docs/channel.md) gets a
`launcher.pid` file: "PID STARTTIME" (the start time from /proc/PID/stat tells a reused pid
from ours). A launcher that died without cleaning up (kill -9, a crash) leaves its directory
behind; the next run removes every such directory it owns whose launcher is gone. A lock per
WireGuard key (`wrapguard-key-<hash>.lock`) lets a second launcher with the same private key
say why its tunnel will break: the peer keeps one endpoint per key and follows whichever
client handshaked last.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import shutil
import stat
import time

from wrapguard import log

PID_FILE = "launcher.pid"
NO_PID_GRACE = 86400.0  # seconds: a directory without a pid file (an older version) is kept


def _start_time(pid: int) -> str | None:
    """Field 22 of /proc/PID/stat (after the parenthesised command name), or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read().decode(errors="replace")
    except OSError:
        return None
    fields = text[text.rfind(")") + 2 :].split()
    return fields[19] if len(fields) > 19 else None


def mark_owner(directory: str) -> int:
    """Record which process owns `directory` (ours, 0700: nobody else can write there) and
    hold an exclusive lock on the record for the whole run: a directory whose record nobody
    holds locked is stale, whatever /proc lets us see (hidepid, another PID namespace).
    Returns the fd to keep open (closed with the run)."""
    pid = os.getpid()
    path = os.path.join(directory, PID_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, f"{pid} {_start_time(pid) or 0}\n".encode())
    return fd


def _alive(directory: str) -> bool:
    path = os.path.join(directory, PID_FILE)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        # No record: a launcher still starting, or an older version. Leave it unless old.
        with contextlib.suppress(OSError):
            return os.stat(directory).st_mtime > time.time() - NO_PID_GRACE
        return False
    except OSError:
        return True  # cannot tell: leave it
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True  # its launcher holds the lock: alive
    finally:
        os.close(fd)
    return False


def sweep_stale(parent: str, keep: str | None = None) -> list[str]:
    """Remove our channel directories under `parent` whose launcher is gone; returns them."""
    removed: list[str] = []
    uid = os.geteuid()
    try:
        names = os.listdir(parent)
    except OSError:
        return removed
    for name in names:
        if not name.startswith("wrapguard-") or name.startswith("wrapguard-key-"):
            continue
        path = os.path.join(parent, name)
        if keep is not None and os.path.abspath(path) == os.path.abspath(keep):
            continue
        try:
            st = os.lstat(path)
        except OSError:
            continue
        # Only real directories of ours, private as we make them: never follow a link,
        # never touch another user's files.
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid or stat.S_IMODE(st.st_mode) != 0o700:
            continue
        if _alive(path):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    if removed:
        log.get("wrapguard.launcher").info(
            "removed what earlier runs left behind", directories=removed
        )
    return removed


class KeyLock:
    """Held for the whole run: a second launcher with the same key finds it taken."""

    def __init__(self) -> None:
        self._fd: int | None = None
        self._path: str | None = None

    def acquire(self, parent: str, public_key: bytes) -> int | None:
        """Take the lock; returns the pid of another launcher holding it, or None."""
        digest = hashlib.sha256(b"wrapguard key lock\0" + public_key).hexdigest()[:16]
        path = os.path.join(parent, f"wrapguard-key-{digest}.lock")
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(path, flags, 0o600)
        except OSError:
            return None  # another user's file, or no room: the check is best effort
        if os.fstat(fd).st_uid != os.geteuid():
            os.close(fd)
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            other = None
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                with contextlib.suppress(OSError, ValueError):
                    other = int(os.pread(fd, 32, 0).split()[0]) or -1
            os.close(fd)
            return other if other is not None else -1
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd, self._path = fd, path
        return None

    def release(self) -> None:
        """Unlock and remove the file (a launcher that finds it gone just makes a new one)."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                if self._path is not None:
                    os.unlink(self._path)
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = self._path = None
