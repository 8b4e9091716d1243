"""--self-test against a real wireguard-go peer: every step reported, exit 0/1."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from wrapguard.keys import PrivateKey


def self_test(rig, conf: Path, *target: str) -> subprocess.CompletedProcess[str]:  # type: ignore[no-untyped-def]
    argv = [
        sys.executable,
        "-m",
        "wrapguard",
        "--config",
        str(conf),
        "--log-level",
        "warn",
        "--self-test",
        *target,
    ]
    return rig.client.run(argv, check=False, timeout=60)


def test_self_test_passes_with_icmp_echo(rig, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    conf = tmp_path / "wg0.conf"
    rig.write_client_config(conf)
    r = self_test(rig, conf)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    for step in ("config", "shim", "tunnel", "handshake", "ping", "channel"):
        assert any(ln.startswith(f"self-test: [ok] {step}:") for ln in lines), r.stdout
    assert "ICMP echo reply from 10.150.0.1" in r.stdout
    assert lines[-1] == "self-test: all steps passed"


def test_self_test_connects_to_a_target_through_the_shim(rig, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    conf = tmp_path / "wg0.conf"
    rig.write_client_config(conf)
    r = self_test(rig, conf, f"10.150.0.1:{rig.tcp_echo_port}")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "probe: connected to 10.150.0.1 port 9000 from 10.150.0.2" in r.stdout
    assert "self-test: [ok] connect:" in r.stdout
    r6 = self_test(rig, conf, f"[fd15::1]:{rig.tcp_echo_port}")
    assert r6.returncode == 0, r6.stdout + r6.stderr
    assert "from fd15::2" in r6.stdout


def test_self_test_fails_on_refused_target(rig, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    conf = tmp_path / "wg0.conf"
    rig.write_client_config(conf)
    r = self_test(rig, conf, "10.150.0.1:9999")
    assert r.returncode == 1
    assert "self-test: [FAIL] connect:" in r.stdout
    assert "Connection refused" in r.stdout


def test_self_test_refuses_a_target_outside_the_tunnel(rig, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    conf = tmp_path / "wg0.conf"
    rig.write_client_config(conf)
    r = self_test(rig, conf, "192.0.2.7:80")
    assert r.returncode == 1
    assert "not inside any peer's AllowedIPs" in r.stdout


def test_self_test_reports_a_wrong_key(rig, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    conf = tmp_path / "wg0.conf"
    rig.write_client_config(conf)
    text = conf.read_text().replace(
        rig.peer_public_key.to_base64(), PrivateKey.generate().public_key().to_base64()
    )
    conf.write_text(text)
    r = self_test(rig, conf)
    assert r.returncode == 1
    assert "self-test: [FAIL] handshake: no answer from" in r.stdout
    assert "Traceback" not in r.stderr


def test_self_test_bad_port_is_a_usage_error(tmp_path: Path) -> None:
    """Issue 11: `--self-test IP:99999` printed a traceback from the probe."""
    from wrapguard.errors import UsageError
    from wrapguard.selftest import parse_target

    for bad in ("10.150.0.1:99999", "10.150.0.1:0", "10.150.0.1:-1", "10.150.0.1:http"):
        try:
            parse_target(bad)
        except UsageError as exc:
            assert "1 to 65535" in str(exc)
        else:
            raise AssertionError(f"{bad} accepted")
