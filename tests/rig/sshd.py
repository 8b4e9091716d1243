"""A real OpenSSH server for the rig's tests (ssh -f, ssh through a proxy).

`start_sshd(ns, address, port, workdir)` starts `sshd -D` in `ns` listening on address:port
with fresh host and client keys (key-only root login) and returns (process, client key).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from rig.netns import Netns

SSH_PORT = 2222  # where the `sshd` fixture (tests/conftest.py) listens on the peer's address


def start_sshd(
    ns: Netns, address: str, port: int, workdir: Path, *, forwarding: bool = True
) -> tuple[subprocess.Popen[Any], Path]:
    sshd_bin = shutil.which("sshd") or "/usr/sbin/sshd"
    if not os.path.exists(sshd_bin) or shutil.which("ssh") is None:
        pytest.fail("openssh-server/client not installed: run `make test`")
    d = workdir
    for name in ("host", "client"):
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)], check=True
        )
    (d / "authorized_keys").write_text((d / "client.pub").read_text())
    (d / "sshd_config").write_text(
        textwrap.dedent(
            f"""\
            ListenAddress {address}:{port}
            HostKey {d / "host"}
            AuthorizedKeysFile {d / "authorized_keys"}
            PidFile {d / "sshd.pid"}
            PermitRootLogin prohibit-password
            PasswordAuthentication no
            KbdInteractiveAuthentication no
            UsePAM no
            StrictModes no
            AllowTcpForwarding {"yes" if forwarding else "no"}
            """
        )
    )
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation dir
    with open(d / "sshd.log", "w") as log:
        proc = ns.popen(
            [sshd_bin, "-D", "-e", "-f", str(d / "sshd_config")],
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    end = time.monotonic() + 10
    while f":{port}" not in ns.run(["ss", "-ltn"], check=False).stdout:
        if time.monotonic() > end or proc.poll() is not None:
            raise AssertionError(f"sshd did not listen on {port}: {(d / 'sshd.log').read_text()}")
        time.sleep(0.1)
    return proc, d / "client"
