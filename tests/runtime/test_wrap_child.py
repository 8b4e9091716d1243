"""End to end, the wrapped program itself: exit codes, signals, static binaries, stdio.

The launcher runs in a bare network namespace (lo only) with a config whose peer is a dead
loopback port and no keepalive, so nothing is sent anywhere: these tests are about the child
process (child.py, the shim's HELLO), not the tunnel.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from rig.netns import Netns
from runtime.wraphelp import explain, popen_wrapped, read_line, run_wrapped

from wrapguard.keys import PrivateKey

pytestmark = pytest.mark.root


@pytest.fixture
def ns_conf(make_netns: Callable[[str], Netns], tmp_path: Path) -> tuple[Netns, Path]:
    peer = PrivateKey.generate().public_key()
    conf = tmp_path / "c.conf"
    conf.write_text(
        "[Interface]\n"
        f"PrivateKey = {PrivateKey.generate().to_base64()}\n"
        "Address = 10.150.0.2/32\n\n"
        "[Peer]\n"
        f"PublicKey = {peer.to_base64()}\n"
        "Endpoint = 127.0.0.1:9\n"
        "AllowedIPs = 10.150.0.0/24\n"
    )
    conf.chmod(0o600)
    return make_netns("w"), conf


@pytest.mark.parametrize(
    ("script", "status"),
    [("exit 3", 3), ("exit 0", 0), ("kill -9 $$", 137), ("kill -TERM $$", 143)],
)
def test_exit_status_is_the_programs(ns_conf: tuple[Netns, Path], script: str, status: int) -> None:
    ns, conf = ns_conf
    r = run_wrapped(ns, conf, ["sh", "-c", script], timeout=30)
    assert r.returncode == status, explain(r)


def _start_trapping(ns: Netns, conf: Path, trap: str) -> subprocess.Popen[bytes]:
    proc = popen_wrapped(
        ns,
        conf,
        ["sh", "-c", f"{trap}; echo ready; sleep 30 & wait; sleep 30"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert read_line(proc, 10) == "ready"
    return proc


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=str)
def test_signals_are_forwarded_to_the_program(
    ns_conf: tuple[Netns, Path], sig: signal.Signals
) -> None:
    ns, conf = ns_conf
    proc = _start_trapping(ns, conf, f"trap 'exit 42' {sig.name[3:]}")
    t0 = time.monotonic()
    proc.send_signal(sig)  # `ip netns exec` exec()s: this pid is wrapguard
    assert proc.wait(10) == 42
    assert time.monotonic() - t0 < 3.0


def test_program_ignoring_sigterm_is_killed_after_grace(ns_conf: tuple[Netns, Path]) -> None:
    ns, conf = ns_conf
    proc = _start_trapping(ns, conf, "trap '' TERM")
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(15) == 137
    took = time.monotonic() - t0
    assert 5.0 <= took < 10.0, took


def test_static_binary_is_refused_before_it_runs(ns_conf: tuple[Netns, Path]) -> None:
    """With the preload door forced (auto gives it the seccomp door, test_seccomp.py)."""
    ns, conf = ns_conf
    # `ldconfig -p` prints the cache: any stdout would mean it ran.
    r = run_wrapped(
        ns, conf, ["/sbin/ldconfig", "-p"], timeout=30, extra=("--intercept", "preload")
    )
    assert r.returncode == 1, explain(r)
    assert r.stdout == "", explain(r)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, explain(r)
    assert "ldconfig" in lines[0] and "static" in lines[0], explain(r)


def test_stdin_and_stdout_pass_through(ns_conf: tuple[Netns, Path]) -> None:
    ns, conf = ns_conf
    r = run_wrapped(ns, conf, ["cat"], input="hi\n", timeout=30)
    assert r.returncode == 0, explain(r)
    assert r.stdout == "hi\n"
    data = bytes(range(256)) * 4096  # 1 MiB, binary, both ways
    r = run_wrapped(ns, conf, ["cat"], input=data, timeout=30)
    assert r.returncode == 0
    assert r.stdout == data


def test_unrunnable_file_is_one_line_and_126(ns_conf: tuple[Netns, Path], tmp_path: Path) -> None:
    ns, conf = ns_conf
    junk = tmp_path / "not-a-program"
    junk.write_bytes(b"\x00\x01 this is neither ELF nor a script\n")
    junk.chmod(0o755)
    r = run_wrapped(ns, conf, [str(junk)], timeout=30)
    assert r.returncode == 126, explain(r)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and not ln.startswith("{")]
    assert len(lines) == 1 and "cannot run" in lines[0], explain(r)
    assert "Traceback" not in r.stderr


def test_launcher_gets_room_for_many_connections_but_the_program_keeps_its_limit(
    ns_conf: tuple[Netns, Path],
) -> None:
    import resource

    ns, conf = ns_conf
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    r = run_wrapped(ns, conf, ["sh", "-c", "ulimit -n"], timeout=30)
    assert r.returncode == 0, explain(r)
    assert r.stdout.strip() == str(soft)
