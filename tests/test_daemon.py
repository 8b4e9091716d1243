"""The proxy daemon (issue 12): `wrapguard --config F` with a wireproxy-style config holding
[Socks5] and [http] sections and no command serves both proxies until SIGTERM, then exits 0
and leaves no socket, directory or lock file behind."""

from __future__ import annotations

import hashlib
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rig.harness import MiB, Rig

RIG_OPTIONS = {"file_sizes": {"1MiB.bin": MiB}}
SOCKS, HTTP = 18931, 18932


def _wait_listening(rig: Rig, port: int, proc: subprocess.Popen[str]) -> None:
    end = time.monotonic() + 20
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"the daemon exited {proc.returncode}: {proc.stderr.read()}")  # type: ignore[union-attr]
        r = rig.client.run(["ss", "-ltnH", f"sport = :{port}"], check=False)
        if r.stdout.strip():
            return
        time.sleep(0.1)
    raise AssertionError(f"nothing listens on {port}")


def test_wireproxy_config_daemon_serves_and_stops_clean(module_rig: Rig, tmp_path: Path) -> None:
    rig = module_rig
    conf = rig.write_client_config(
        tmp_path / "wg0.conf",
        extra_lines=(
            "[Socks5]", f"BindAddress = 127.0.0.1:{SOCKS}",
            "[http]", f"BindAddress = 127.0.0.1:{HTTP}",
        ),
    )  # fmt: skip
    tmp = tmp_path / "tmp"
    tmp.mkdir(mode=0o700)
    env = {**rig.client.python_env(), "TMPDIR": str(tmp)}
    env.pop("XDG_RUNTIME_DIR", None)
    proc = rig.client.popen(
        [sys.executable, "-m", "wrapguard", "--config", str(conf)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        _wait_listening(rig, SOCKS, proc)
        _wait_listening(rig, HTTP, proc)
        size, sha = rig.files["1MiB.bin"]
        for proxy in (f"socks5h://127.0.0.1:{SOCKS}", f"http://127.0.0.1:{HTTP}"):
            out = tmp_path / "got.bin"
            r = rig.client.run(
                ["curl", "-sS", "--max-time", "20", "-x", proxy, "-o", str(out),
                 rig.url("1MiB.bin")],
                check=False,
            )  # fmt: skip
            assert r.returncode == 0, (proxy, r.stderr)
            assert (
                hashlib.sha256(out.read_bytes()).hexdigest() == sha and out.stat().st_size == size
            )
        assert any(tmp.iterdir()), "the daemon keeps its control socket and channel in TMPDIR"
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        assert time.monotonic() - t0 < 10
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = proc.stderr.read() if proc.stderr else ""
    assert "socks5 proxy listening" in err and "http proxy listening" in err, err
    left = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*"))
    assert left == [], f"left behind: {left}"
    r = rig.client.run(["ss", "-ltnH", f"sport = :{SOCKS}"], check=False)
    assert r.stdout.strip() == ""


@pytest.mark.parametrize("flag", ["--socks5", "--http-proxy"])
def test_the_proxies_live_as_long_as_the_command(
    module_rig: Rig, tmp_path: Path, flag: str
) -> None:
    """With a command, the proxy serves while it runs (here: the command uses it) and goes
    with it."""
    rig = module_rig
    conf = rig.write_client_config(tmp_path / "c.conf")
    port = SOCKS + 10 if flag == "--socks5" else HTTP + 10
    scheme = "socks5h" if flag == "--socks5" else "http"
    cmd = ["curl", "-sS", "--max-time", "20", "-x", f"{scheme}://127.0.0.1:{port}",
           "-o", "/dev/null", "-w", "%{http_code}", rig.url("1MiB.bin")]  # fmt: skip
    r = rig.client.run(
        [sys.executable, "-m", "wrapguard", "--config", str(conf), flag, f"127.0.0.1:{port}",
         "--", *cmd],
        check=False, env=rig.client.python_env(), timeout=60,
    )  # fmt: skip
    assert r.returncode == 0 and r.stdout == "200", r
    r = rig.client.run(["ss", "-ltnH", f"sport = :{port}"], check=False)
    assert r.stdout.strip() == "", "the proxy outlived its command"
