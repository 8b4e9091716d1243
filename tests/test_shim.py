"""The preload shim loads into real programs without changing them."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from wrapguard import shim
from wrapguard.elf import read_elf


def run_preloaded(
    argv: list[str], announce: bool
) -> tuple[subprocess.CompletedProcess[bytes], bytes]:
    env = dict(os.environ)
    env["LD_PRELOAD"] = shim.preload_value(env.get("LD_PRELOAD"), shim.shim_path())
    r, w = os.pipe()
    if announce:
        env["WRAPGUARD_ANNOUNCE_FD"] = str(w)
    proc = subprocess.run(
        argv, env=env, pass_fds=(w,), capture_output=True, timeout=30, check=False
    )
    os.close(w)
    with os.fdopen(r, "rb") as f:
        return proc, f.read()


def test_shim_is_a_plain_shared_library_without_libpython() -> None:
    path = shim.shim_path()
    out = subprocess.run(["ldd", path], capture_output=True, text=True, check=True).stdout
    assert "libpython" not in out
    assert "libc.so" in out


@pytest.mark.parametrize("argv", [["true"], ["curl", "--version"]])
def test_preloaded_programs_run_unchanged(argv: list[str]) -> None:
    exe = shutil.which(argv[0])
    assert exe is not None, f"{argv[0]} is needed (make test installs curl)"
    plain = subprocess.run([exe, *argv[1:]], capture_output=True, timeout=30, check=False)
    wrapped, announced = run_preloaded([exe, *argv[1:]], announce=True)
    assert wrapped.returncode == plain.returncode == 0
    assert wrapped.stdout == plain.stdout
    assert wrapped.stderr == plain.stderr
    assert announced.startswith(b"wrapguard-shim "), announced
    assert b"pid=" in announced


def test_shim_is_silent_without_announce_fd() -> None:
    wrapped, announced = run_preloaded(["true"], announce=False)
    assert wrapped.returncode == 0 and wrapped.stderr == b""
    assert announced == b""


def test_static_binary_never_announces() -> None:
    ldconfig = "/sbin/ldconfig"
    assert read_elf(ldconfig).is_static
    ok, detail = shim.probe([ldconfig, "--version"])
    assert not ok and "did not load" in detail


def test_probe_sees_the_shim_in_a_dynamic_program() -> None:
    ok, detail = shim.probe([shutil.which("true") or "/bin/true"])
    assert ok, detail


def test_existing_ld_preload_is_kept_after_the_shim() -> None:
    assert shim.preload_value(None, "/s.so") == "/s.so"
    assert shim.preload_value("/a.so:/b.so", "/s.so") == "/s.so /a.so /b.so"
    assert shim.preload_value("/s.so /a.so", "/s.so") == "/s.so /a.so"
