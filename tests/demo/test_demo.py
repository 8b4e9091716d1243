"""`make demo` (demo/__main__.py) and demo/netns.sh work, say so, and leave nothing behind.

Network safety: the demo's curl targets 10.150.0.1; if the shim ever failed to intercept, that
connect would leave through the host's default route. So every run of the demo here happens in
a fresh namespace with only `lo` (the `make_netns` fixture), where a leak fails instead.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from rig.netns import Netns

REPO = Path(__file__).resolve().parents[2]
NETNS_SH = REPO / "demo" / "netns.sh"

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]


def _run_demo(ns: Netns, tmp: Path, path: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run `python -m demo` in `ns` with TMPDIR=tmp (and PATH=path if given)."""
    tmp.mkdir()
    env = ns.python_env()
    env["TMPDIR"] = str(tmp)  # the demo's temp dir lands here, so we can see it is gone
    argv = [sys.executable, "-m", "demo"]
    if path is not None:  # set inside the namespace: `ip` itself is found with ours
        argv = ["env", f"PATH={path}", *argv]
    return ns.run(argv, env=env, check=False, timeout=60, cwd=REPO)


def test_demo_fetches_the_page_through_the_tunnel(
    make_netns: Callable[[str], Netns], tmp_path: Path
) -> None:
    ns = make_netns("demo")
    with ns.iproute() as ipr:  # only lo: no route anywhere but loopback
        assert [link.get_attr("IFLA_IFNAME") for link in ipr.get_links()] == ["lo"]
    r = _run_demo(ns, tmp_path / "t")
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert r.stderr == ""
    assert "1. A WireGuard peer is up at 127.0.0.1:" in out
    assert "demo.conf" in out
    assert "<h1>Hello through WireGuard!</h1>" in out
    assert "You are 10.150.0.2 (port " in out  # the page, as curl printed it
    assert "The peer saw us as 10.150.0.2" in out
    assert "Cleaned up" in out
    assert list((tmp_path / "t").iterdir()) == []  # config and keys are gone


def test_demo_without_curl_fails_with_one_line(
    make_netns: Callable[[str], Netns], tmp_path: Path
) -> None:
    ns = make_netns("nocurl")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    r = _run_demo(ns, tmp_path / "t", path=str(bindir))
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        "demo failed: curl is not installed (try: apt-get install curl)"
    ]
    assert list((tmp_path / "t").iterdir()) == []


def test_demo_reports_a_failing_command_and_cleans_up(
    make_netns: Callable[[str], Netns], tmp_path: Path
) -> None:
    # A "curl" that fails as curl does when nothing answers: the demo must say so and clean up.
    ns = make_netns("fail")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "curl"
    fake.write_text("#!/bin/sh\necho 'curl: (7) Failed to connect' >&2\nexit 7\n")
    fake.chmod(0o755)
    r = _run_demo(ns, tmp_path / "t", path=f"{bindir}:{os.environ['PATH']}")
    assert r.returncode == 1, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert lines == ["demo failed: the wrapped curl exited 7: curl: (7) Failed to connect"]
    assert "Cleaned up" not in r.stdout
    assert list((tmp_path / "t").iterdir()) == []


def _ours_left(run_id: str) -> list[str]:
    found = []
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    found += [line for line in netns.stdout.splitlines() if f"wgdemo-{run_id}-" in line]
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True)
    found += [line for line in links.stdout.splitlines() if f"wgd{run_id}" in line]
    sock = Path(f"/var/run/wireguard/wgd{run_id}w.sock")
    if sock.exists():
        found.append(str(sock))
    return found


def test_netns_script_runs_both_directions_and_leaves_nothing(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces); CI runs as root and never skips this")
    for tool in ("wireguard-go", "wg", "ip", "curl", "python3"):
        assert shutil.which(tool), f"{tool} missing: run `make test` (it installs it)"
    run_id = secrets.token_hex(3)
    env = {**os.environ, "WGDEMO_ID": run_id, "PYTHON": sys.executable, "TMPDIR": str(tmp_path)}
    try:
        r = subprocess.run(
            ["bash", str(NETNS_SH)], env=env, capture_output=True, text=True, timeout=90
        )
    finally:
        left = _ours_left(run_id)
        for line in left:  # belt and braces: never leave a namespace behind
            if line.startswith(f"wgdemo-{run_id}-"):
                subprocess.run(["ip", "netns", "del", line.split()[0]], check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "curl got: Hello from the server namespace, behind wireguard-go." in r.stdout
    assert "got: Hello from a wrapped python3 -m http.server in the client namespace." in r.stdout
    assert "wireguard-go confirms a handshake" in r.stdout
    assert left == []
    assert list(tmp_path.iterdir()) == []
