"""intercept.py: which door a program gets (no root, nothing executed)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from wrapguard import intercept
from wrapguard.cli import parse_args
from wrapguard.errors import UsageError


def test_a_dynamic_program_gets_the_preload_door() -> None:
    curl = shutil.which("curl")
    assert curl is not None
    assert intercept.choose(curl, "auto").door == intercept.PRELOAD


def test_static_and_go_programs_get_the_seccomp_door() -> None:
    choice = intercept.choose("/sbin/ldconfig", "auto")
    assert choice.door == intercept.SECCOMP and "statically linked" in choice.reason
    go = shutil.which("wireguard-go")
    assert go is not None, "wireguard-go is needed (make test installs it)"
    choice = intercept.choose(go, "auto")
    assert choice.door == intercept.SECCOMP and "Go program" in choice.reason


def test_a_script_run_by_a_static_interpreter_gets_the_seccomp_door(tmp_path: Path) -> None:
    script = tmp_path / "s"
    script.write_text("#!/sbin/ldconfig\n")
    script.chmod(0o755)
    assert intercept.choose(str(script), "auto").door == intercept.SECCOMP
    sh = tmp_path / "t"
    sh.write_text("#!/bin/sh\ntrue\n")
    sh.chmod(0o755)
    assert intercept.choose(str(sh), "auto").door == intercept.PRELOAD


def test_the_flag_overrides_the_choice() -> None:
    assert intercept.choose("/sbin/ldconfig", "preload").door == intercept.PRELOAD
    curl = shutil.which("curl")
    assert curl is not None
    assert intercept.choose(curl, "seccomp").door == intercept.SECCOMP


def test_intercept_flag_parses_and_rejects_nonsense() -> None:
    opts = parse_args(["--config", "x.conf", "--intercept", "SECCOMP", "--", "true"])
    assert not isinstance(opts, int) and opts.intercept == "seccomp"
    opts = parse_args(["--config", "x.conf", "--", "true"])
    assert not isinstance(opts, int) and opts.intercept == "auto"
    with pytest.raises(UsageError):
        parse_args(["--config", "x.conf", "--intercept", "ptrace", "--", "true"])


def test_the_helper_is_installed_and_this_kernel_can_run_it() -> None:
    assert intercept.seccomp_unavailable() is None
