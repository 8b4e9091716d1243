"""Our stack through our tunnel to the kernel's TCP, across a lossy, duplicating, reordering link.

A userspace relay in the client namespace sits between the launcher and wireguard-go (this
kernel has no sch_netem); wrapped curl moves data both ways and the sha256 must survive.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest

SIZE = 64 << 20


def wrapped(rig, conf: Path, *cmd: str):  # type: ignore[no-untyped-def]
    argv = [sys.executable, "-m", "wrapguard", "--config", str(conf), "--log-level", "warn", "--"]
    return rig.client.run([*argv, *cmd], check=False, timeout=240)


@pytest.mark.timeout(600)
def test_both_ways_through_a_lossy_link(make_rig, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    rig = make_rig(file_sizes={"64MiB.bin": SIZE})
    relay = rig.start_relay(loss=0.03, dup=0.01, reorder=0.03, seed=11)
    conf = rig.write_client_config(tmp_path / "wg0.conf", endpoint=relay.endpoint)
    out = tmp_path / "down.bin"
    r = wrapped(rig, conf, "curl", "-sS", "--max-time", "200", "-o", str(out), rig.url("64MiB.bin"))
    assert r.returncode == 0, r.stderr
    size, sha = rig.files["64MiB.bin"]
    data = out.read_bytes()
    assert len(data) == size
    assert hashlib.sha256(data).hexdigest() == sha

    up = tmp_path / "up.bin"
    up.write_bytes(bytes(range(256)) * (SIZE // 256))
    r = wrapped(
        rig,
        conf,
        "curl",
        "-sS",
        "--max-time",
        "200",
        "-T",
        str(up),
        f"http://{rig.peer_tunnel_v4}:{rig.http_port}/upload",
    )
    assert r.returncode == 0, r.stderr
    reply = json.loads(r.stdout)
    assert reply == {"sha256": hashlib.sha256(up.read_bytes()).hexdigest(), "length": SIZE}

    stats = relay.stats
    assert stats.total("dropped") > 0
    assert stats.total("duplicated") > 0
    assert stats.total("reordered") > 0
