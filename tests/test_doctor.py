"""--doctor as a user runs it: real binaries, one line per check, exit 0/1."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from wrapguard.keys import PrivateKey

WG = [sys.executable, "-m", "wrapguard"]


def doctor(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*WG, "--doctor", *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_doctor_passes_curl() -> None:
    r = doctor("curl")
    assert r.returncode == 0, r.stdout + r.stderr
    assert all(ln.startswith("doctor: ") for ln in r.stdout.splitlines())
    assert "[ok] shim" in r.stdout
    assert "dynamically linked" in r.stdout


def test_doctor_flags_static_ldconfig() -> None:
    r = doctor("/sbin/ldconfig")
    assert r.returncode == 1
    assert "statically linked" in r.stdout and "[FAIL] target" in r.stdout


def test_doctor_flags_go_binaries() -> None:
    go = shutil.which("wireguard-go")
    assert go is not None, "wireguard-go is needed (make test installs it)"
    r = doctor(go)
    assert r.returncode == 1
    assert "Go program" in r.stdout


def test_doctor_flags_setuid(tmp_path: Path) -> None:
    copy = tmp_path / "true-setuid"
    shutil.copy(shutil.which("true") or "/bin/true", copy)
    copy.chmod(0o4755)
    r = doctor(str(copy))
    assert r.returncode == 1
    assert "setuid" in r.stdout


def test_doctor_follows_script_interpreter(tmp_path: Path) -> None:
    script = tmp_path / "s"
    script.write_text("#!/usr/bin/env sh\necho hi\n")
    script.chmod(0o755)
    r = doctor(str(script))
    assert r.returncode == 0, r.stdout
    assert "script run by" in r.stdout


def test_doctor_missing_target() -> None:
    r = doctor("no-such-program-wrapguard")
    assert r.returncode == 1
    assert "not found" in r.stdout


def test_doctor_warns_without_dns_and_checks_config(tmp_path: Path) -> None:
    conf = tmp_path / "wg0.conf"
    conf.write_text(
        f"[Interface]\nPrivateKey = {PrivateKey.generate().to_base64()}\nAddress = 10.150.0.2\n"
        f"[Peer]\nPublicKey = {PrivateKey.generate().public_key().to_base64()}\n"
        "Endpoint = 127.0.0.1:51820\nAllowedIPs = 10.150.0.0/24\n"
    )
    conf.chmod(0o600)
    r = subprocess.run(
        [*WG, "--config", str(conf), "--doctor"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "[warn] dns" in r.stdout and "host resolver" in r.stdout
    assert "[ok] config" in r.stdout


def test_doctor_reports_broken_config(tmp_path: Path) -> None:
    conf = tmp_path / "wg0.conf"
    conf.write_text("[Interface]\nAddress = 10.150.0.2\n")
    conf.chmod(0o600)
    r = subprocess.run(
        [*WG, "--config", str(conf), "--doctor"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 1
    assert "[FAIL] config" in r.stdout and "PrivateKey" in r.stdout
