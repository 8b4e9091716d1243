"""Failures a user can cause end in a clear line, not silence: wrong key, dead peer."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from wrapguard.keys import PrivateKey

WARNING = "no handshake response from peer yet"


def run(rig, conf: Path, *cmd: str):  # type: ignore[no-untyped-def]
    argv = [sys.executable, "-m", "wrapguard", "--config", str(conf), "--"]
    return rig.client.run([*argv, *cmd], check=False, timeout=60)


def warnings(stderr: str) -> list[dict[str, object]]:
    recs = [json.loads(ln) for ln in stderr.splitlines() if ln.startswith("{")]
    return [r for r in recs if r["level"] == "warn"]


def test_wrong_peer_key_is_reported_while_the_program_waits(rig, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    conf = rig.write_client_config(tmp_path / "wg0.conf")
    wrong = PrivateKey.generate().public_key().to_base64()
    conf.write_text(conf.read_text().replace(rig.peer_public_key.to_base64(), wrong))
    r = run(rig, conf, "curl", "-sS", "--max-time", "8", rig.url("1KiB.bin"))
    assert r.returncode == 28, r.stderr  # curl: operation timed out
    found = [w for w in warnings(r.stderr) if WARNING in str(w["message"])]
    assert len(found) == 1, r.stderr
    assert found[0]["endpoint"] == f"{rig.peer_endpoint[0]}:{rig.peer_endpoint[1]}"
    assert "Traceback" not in r.stderr


def test_working_peer_draws_no_warning(rig, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    conf = rig.write_client_config(tmp_path / "wg0.conf")
    r = run(rig, conf, "curl", "-sS", "-o", "/dev/null", rig.url("1KiB.bin"))
    assert r.returncode == 0, r.stderr
    assert not [w for w in warnings(r.stderr) if WARNING in str(w["message"])]
