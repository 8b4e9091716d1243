"""The command line as a user meets it: real subprocesses, exit codes, one clear line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from wrapguard import __version__
from wrapguard.keys import PrivateKey

WG = [sys.executable, "-m", "wrapguard"]


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*WG, *args], capture_output=True, text=True, timeout=60, cwd=cwd, check=False
    )


def one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got: {err!r}"
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture
def good_config(tmp_path: Path) -> Path:
    me = PrivateKey.generate()
    peer = PrivateKey.generate().public_key()
    path = tmp_path / "wg0.conf"
    path.write_text(
        "[Interface]\n"
        f"PrivateKey = {me.to_base64()}\n"
        "Address = 10.150.0.2/32\n"
        "\n[Peer]\n"
        f"PublicKey = {peer.to_base64()}\n"
        "Endpoint = 198.18.0.2:51820\n"
        "AllowedIPs = 10.150.0.0/24\n"
    )
    path.chmod(0o600)
    return path


def test_version_goes_to_stdout_exit_0() -> None:
    r = run("--version")
    assert r.returncode == 0
    assert r.stdout.strip() == f"wrapguard version {__version__}"
    assert r.stderr == ""


def test_help_lists_every_flag() -> None:
    r = run("--help")
    assert r.returncode == 0
    for flag in (
        "--config",
        "--exit-node",
        "--route",
        "--log-level",
        "--log-file",
        "--doctor",
        "--self-test",
        "--version",
    ):
        assert flag in r.stdout


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--bogus"], "--bogus"),
        (["--config"], "--config"),
        (["--log-level", "loud", "--config", "x", "--", "true"], "loud"),
        (["--exit-node", "not-an-ip", "--config", "x", "--", "true"], "not-an-ip"),
        (["--route", "10.0.0.0/8", "--config", "x", "--", "true"], "--route"),
        (["--route", "300.0.0.0/8:10.150.0.1", "--config", "x", "--", "true"], "--route"),
        (["--", "true"], "--config"),
        (["--self-test"], "--config"),
    ],
)
def test_usage_errors_exit_2_with_one_line(args: list[str], needle: str) -> None:
    r = run(*args)
    assert r.returncode == 2, r.stderr
    line = one_line(r.stderr)
    assert line.startswith("wrapguard: ")
    assert needle in line


# Tests here run in the host's network namespace, so none of them may bring the tunnel up:
# they stop at a missing command (exit 127), which is checked after the config and flags.
NO_CMD = "no-such-command-wrapguard"


def test_both_flag_spellings_work(good_config: Path) -> None:
    a = run(f"--config={good_config}", "--log-level=debug", "--", NO_CMD)
    b = run("--config", str(good_config), "--log-level", "debug", "--", NO_CMD)
    c = run(f"--config={good_config}", "--log-level=bogus", "--", NO_CMD)
    assert a.returncode == b.returncode == 127
    assert c.returncode == 2


def test_missing_config_file_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope.conf"
    r = run("--config", str(missing), "--", "true")
    assert r.returncode == 1
    line = one_line(r.stderr)
    assert str(missing) in line


def test_bad_config_names_file_line_and_key(tmp_path: Path) -> None:
    path = tmp_path / "bad.conf"
    path.write_text(
        "[Interface]\n"
        f"PrivateKey = {PrivateKey.generate().to_base64()}\n"
        "Address = 10.150.0.2/32\n"
        "[Peer]\n"
        f"PublicKey = {PrivateKey.generate().public_key().to_base64()}\n"
        "Endpoint = 198.18.0.2:99999\n"
    )
    path.chmod(0o600)
    r = run("--config", str(path), "--", "true")
    assert r.returncode == 1
    line = one_line(r.stderr)
    assert f"{path}:6" in line
    assert "Endpoint" in line


def test_bad_private_key_is_not_echoed(tmp_path: Path) -> None:
    path = tmp_path / "bad.conf"
    secret = "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LXNlYw"
    path.write_text(f"[Interface]\nPrivateKey = {secret}\nAddress = 10.150.0.2\n")
    path.chmod(0o600)
    r = run("--config", str(path), "--", "true")
    assert r.returncode == 1
    line = one_line(r.stderr)
    assert "PrivateKey" in line and f"{path}:2" in line
    assert secret not in r.stderr + r.stdout


def test_missing_command_exit_127(good_config: Path) -> None:
    r = run("--config", str(good_config), "--", "no-such-command-wrapguard")
    assert r.returncode == 127
    assert "no-such-command-wrapguard" in one_line(r.stderr)


def test_not_executable_command_exit_126(good_config: Path, tmp_path: Path) -> None:
    script = tmp_path / "script.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o644)
    r = run("--config", str(good_config), "--", str(script))
    assert r.returncode == 126
    assert "not executable" in one_line(r.stderr)


def test_route_to_unknown_peer_ip_is_an_error_before_start(good_config: Path) -> None:
    r = run("--config", str(good_config), "--route", "192.0.2.0/24:10.99.0.1", "--", "true")
    assert r.returncode in (1, 2)
    assert "10.99.0.1" in one_line(r.stderr)


def test_log_file_appends_json_and_silences_terminal(good_config: Path, tmp_path: Path) -> None:
    logf = tmp_path / "wg.log"
    logf.write_text('{"pre": "existing"}\n')
    r = run("--config", str(good_config), "--log-file", str(logf), "--", NO_CMD)
    assert r.returncode == 127
    # Only the one-line reason reaches the terminal; the JSON lines went to the file.
    assert not any(ln.startswith("{") for ln in r.stderr.splitlines())
    lines = logf.read_text().splitlines()
    assert lines[0] == '{"pre": "existing"}'
    records = [json.loads(ln) for ln in lines[1:]]
    assert records, "nothing was logged to the file"
    for rec in records:
        assert list(rec)[:3] == ["timestamp", "level", "message"]
    assert any(rec["level"] == "error" for rec in records)


def test_world_readable_config_warns_as_a_json_log_line(good_config: Path) -> None:
    good_config.chmod(0o644)
    r = run("--config", str(good_config), "--", NO_CMD)
    records = [json.loads(ln) for ln in r.stderr.splitlines() if ln.startswith("{")]
    assert any(rec["level"] == "warn" for rec in records), r.stderr


def test_unwritable_log_file_is_a_setup_error(good_config: Path, tmp_path: Path) -> None:
    r = run(
        "--config", str(good_config), "--log-file", str(tmp_path / "no" / "dir.log"), "--", "true"
    )
    assert r.returncode == 1
    assert "log file" in one_line(r.stderr)


def test_log_file_symlink_of_another_user_is_not_followed(
    good_config: Path, tmp_path: Path
) -> None:
    """Issue 11: another user plants /tmp/x.log -> a file of root's; we must not append."""
    if os.geteuid() != 0:
        pytest.skip("needs root to plant a symlink owned by another user")
    target = tmp_path / "precious"
    target.write_text("keep\n")
    planted = tmp_path / "planted.log"
    planted.symlink_to(target)
    os.lchown(planted, 65534, 65534)
    r = run("--config", str(good_config), "--log-file", str(planted), "--", NO_CMD)
    assert r.returncode == 1, r.stderr
    assert "symlink owned by another user" in one_line(r.stderr)
    assert target.read_text() == "keep\n"
    mine = tmp_path / "mine.log"
    mine.symlink_to(tmp_path / "real.log")  # our own symlink is followed as before
    run("--config", str(good_config), "--log-file", str(mine), "--", NO_CMD)
    assert (tmp_path / "real.log").read_text().startswith("{")


def test_no_command_and_no_proxy_is_a_usage_error(good_config: Path) -> None:
    r = run("--config", str(good_config))
    assert r.returncode == 2, r.stderr
    assert "no command given" in one_line(r.stderr) and "--socks5" in one_line(r.stderr)


def test_a_proxy_open_to_the_network_without_credentials_is_refused(good_config: Path) -> None:
    r = run("--config", str(good_config), "--socks5", "0.0.0.0:1080")
    assert r.returncode == 2, r.stderr
    assert "without credentials" in one_line(r.stderr)


def test_help_lists_the_modes() -> None:
    r = run("--help")
    assert r.returncode == 0
    for mode in ("wrap a command", "proxy daemon", "wrapguard show", "--doctor"):
        assert mode in r.stdout, r.stdout
    r = run("show", "--help")
    assert r.returncode == 0 and "--control" in r.stdout, r


def test_console_script_is_installed() -> None:
    exe = Path(sys.executable).with_name("wrapguard")
    if not exe.exists():
        pytest.skip("the wrapguard console script is not installed next to this interpreter")
    r = subprocess.run(
        [str(exe), "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ},
    )
    assert r.returncode == 0 and r.stdout.startswith("wrapguard version ")


def test_a_fifo_config_is_one_line_and_exit_1_within_a_second(tmp_path: Path) -> None:
    """Issue 11: `--config` naming a FIFO hung forever with no output."""
    fifo = tmp_path / "wg0.conf"
    os.mkfifo(fifo, 0o600)
    t0 = time.monotonic()
    r = run("--config", str(fifo), "--", "true")
    assert time.monotonic() - t0 < 2.5  # interpreter start-up included
    assert r.returncode == 1, r
    assert "FIFO" in one_line(r.stderr) and str(fifo) in one_line(r.stderr), r.stderr
