"""runtime/rundir.py: stale private directories and the per-key lock (no root needed)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from wrapguard.runtime.rundir import KeyLock, sweep_stale

HOLD = """
import os, sys, time
from wrapguard.runtime.rundir import mark_owner
mark_owner(sys.argv[1])
print("held", flush=True)
sys.stdin.readline()
"""


def _private(parent: Path) -> Path:
    return Path(tempfile.mkdtemp(prefix="wrapguard-", dir=parent))


def test_a_live_launchers_directory_is_kept_whatever_proc_shows(tmp_path: Path) -> None:
    """Liveness is the lock on launcher.pid, not /proc/PID (hidepid, PID namespaces, a
    non-dumpable launcher may hide it): the review of issue 11 found a live run's directory
    removed that way."""
    live = _private(tmp_path)
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(live)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        pid_file = live / "launcher.pid"
        # Make /proc useless for the check: a pid that is not alive.
        pid_file.write_text("999999999 1\n")
        assert sweep_stale(str(tmp_path)) == []
        assert live.is_dir()
    finally:
        assert proc.stdin is not None
        proc.stdin.write("\n")
        proc.stdin.flush()
        proc.wait(10)
    assert sweep_stale(str(tmp_path)) == [str(live)]  # its launcher is gone: the lock is free
    assert not live.exists()


def test_only_our_private_directories_are_swept(tmp_path: Path) -> None:
    other = tmp_path / "wrapguard-notprivate"
    other.mkdir(mode=0o755)
    (other / "launcher.pid").write_text("1 1\n")
    link = tmp_path / "wrapguard-link"
    link.symlink_to(other)
    assert sweep_stale(str(tmp_path)) == []
    assert other.is_dir() and link.is_symlink()


def test_key_lock_names_the_other_holder(tmp_path: Path) -> None:
    a, b = KeyLock(), KeyLock()
    assert a.acquire(str(tmp_path), b"k" * 32) is None
    assert b.acquire(str(tmp_path), b"k" * 32) == os.getpid()  # the same process, here
    assert KeyLock().acquire(str(tmp_path), b"x" * 32) is None  # another key: free
    a.release()
    c = KeyLock()
    assert c.acquire(str(tmp_path), b"k" * 32) is None  # free again once a released it
    c.release()
