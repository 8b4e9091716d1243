"""Children that clear their environment stay wrapped (fail closed, never a direct leak)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

PROBE = (
    "import socket,sys; s=socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10);"
    "print(s.makefile().readline().split()[0])"
)


@pytest.mark.parametrize(
    "prefix",
    [
        ["env", "-i"],
        ["env", "-u", "LD_PRELOAD"],
        ["env", "-u", "WRAPGUARD_CTL", "-u", "WRAPGUARD_SECRET"],
        ["env", "LD_PRELOAD="],
    ],
    ids=["env-i", "no-preload", "no-channel", "empty-preload"],
)
def test_a_child_that_clears_its_environment_is_still_wrapped(  # type: ignore[no-untyped-def]
    rig, tmp_path: Path, prefix: list[str]
) -> None:
    conf = rig.write_client_config(tmp_path / "wg0.conf")
    # The client namespace has a route to the peer's veth; 10.150.0.1 is reachable only
    # through the tunnel, so a leak would fail with ENETUNREACH rather than leave the machine.
    cmd = [*prefix, sys.executable, "-c", PROBE, str(rig.peer_tunnel_v4), str(rig.tcp_echo_port)]
    argv = [sys.executable, "-m", "wrapguard", "--config", str(conf), "--log-level", "warn", "--"]
    r = rig.client.run([*argv, *cmd], check=False, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(rig.our_tunnel_v4)


def test_a_spawned_child_with_its_own_environment_is_still_wrapped(  # type: ignore[no-untyped-def]
    rig, tmp_path: Path
) -> None:
    conf = rig.write_client_config(tmp_path / "wg0.conf")
    parent = (
        "import subprocess,sys;"
        "r=subprocess.run([sys.executable,'-c',sys.argv[1],sys.argv[2],sys.argv[3]],"
        "env={'PATH':'/usr/bin:/bin'},capture_output=True,text=True);"
        "print(r.stdout.strip() or r.stderr.strip()[-200:])"
    )
    cmd = [sys.executable, "-c", parent, PROBE, str(rig.peer_tunnel_v4), str(rig.tcp_echo_port)]
    argv = [sys.executable, "-m", "wrapguard", "--config", str(conf), "--log-level", "warn", "--"]
    r = rig.client.run([*argv, *cmd], check=False, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(rig.our_tunnel_v4)


EXECLE = r"""
#include <unistd.h>
int main(int argc, char **argv) {
    char *env[] = {"PATH=/usr/bin:/bin", (char *)0};
    if (argc < 5) return 2;
    execle(argv[1], argv[1], "-c", argv[2], argv[3], argv[4], (char *)0, env);
    return 127;
}
"""


def test_execle_with_its_own_environment_is_still_wrapped(  # type: ignore[no-untyped-def]
    rig, tmp_path: Path
) -> None:
    import shutil
    import subprocess

    cc = shutil.which("cc") or shutil.which("gcc")
    assert cc is not None, "a C compiler is needed (make test installs gcc)"
    src, exe = tmp_path / "execle.c", tmp_path / "execle"
    src.write_text(EXECLE)
    subprocess.run([cc, "-o", str(exe), str(src)], check=True, timeout=60)
    conf = rig.write_client_config(tmp_path / "wg0.conf")
    cmd = [str(exe), sys.executable, PROBE, str(rig.peer_tunnel_v4), str(rig.tcp_echo_port)]
    argv = [sys.executable, "-m", "wrapguard", "--config", str(conf), "--log-level", "warn", "--"]
    r = rig.client.run([*argv, *cmd], check=False, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(rig.our_tunnel_v4)
