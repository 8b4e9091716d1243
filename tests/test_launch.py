"""launch.py: what is refused before anything starts (no root needed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from wrapguard.keys import PrivateKey


def test_config_without_a_peer_is_one_line_and_exit_1(tmp_path: Path) -> None:
    conf = tmp_path / "nopeer.conf"
    conf.write_text(
        f"[Interface]\nPrivateKey = {PrivateKey.generate().to_base64()}\nAddress = 10.150.0.2/32\n"
    )
    conf.chmod(0o600)
    marker = tmp_path / "ran"
    r = subprocess.run(
        [sys.executable, "-m", "wrapguard", "--config", str(conf), "--", "touch", str(marker)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 1, r
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "no [Peer]" in lines[0] and str(conf) in lines[0], r.stderr
    assert not marker.exists(), "the program ran with nothing tunnelled"


def test_the_process_holding_the_key_is_not_dumpable(tmp_path: Path) -> None:
    """Issue 11: the launcher's core dump held the private key. After prepare() (which reads
    the config) the process is not dumpable; a program it execs is dumpable again."""
    code = (
        "import ctypes, sys\n"
        "from wrapguard.cli import parse_args\n"
        "from wrapguard.launch import prepare\n"
        "prepare(parse_args(['--config', sys.argv[1], '--', 'true']))\n"
        "print(ctypes.CDLL(None).prctl(3, 0, 0, 0, 0))\n"  # PR_GET_DUMPABLE
    )
    conf = tmp_path / "c.conf"
    conf.write_text(
        f"[Interface]\nPrivateKey = {PrivateKey.generate().to_base64()}\n"
        "Address = 10.150.0.2/32\n[Peer]\n"
        f"PublicKey = {PrivateKey.generate().public_key().to_base64()}\n"
        "AllowedIPs = 10.150.0.0/24\n"
    )
    conf.chmod(0o600)
    r = subprocess.run(
        [sys.executable, "-c", code, str(conf)], capture_output=True, text=True, timeout=30
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "0"
