"""Pieces of the rig that are not the Rig itself: the session's random files, veth pairs,
starting servers.py and waiting for READY, and the leftover check used after teardown.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import select
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rig.netns import NETNS_DIR, NETNS_ETC, PREFIX, WG_SOCK_DIR, Netns
from rig.wg import IFA_F_NODAD

KiB = 1 << 10
MiB = 1 << 20
SERVERS = Path(__file__).with_name("servers.py")


def file_name(size: int) -> str:
    """1024 -> '1KiB.bin', 1048576 -> '1MiB.bin', 1000 -> '1000B.bin'."""
    for unit, n in (("MiB", MiB), ("KiB", KiB)):
        if size >= n and size % n == 0:
            return f"{size // n}{unit}.bin"
    return f"{size}B.bin"


class FileStore:
    """Random files of known sha256, created on first request and shared by a whole session."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self._known: dict[str, tuple[int, str]] = {}
        self._lock = threading.Lock()

    def get(self, name: str, size: int) -> tuple[int, str]:
        with self._lock:
            if name in self._known:
                assert self._known[name][0] == size, f"{name}: asked twice with other sizes"
                return self._known[name]
            h = hashlib.sha256()
            with open(self.dir / name, "wb") as f:
                left = size
                while left:
                    chunk = os.urandom(min(left, MiB))
                    h.update(chunk)
                    f.write(chunk)
                    left -= len(chunk)
            self._known[name] = (size, h.hexdigest())
            return self._known[name]


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def veth(a: Netns, b: Netns, name_a: str, name_b: str, addrs: tuple[str, str, str, str]) -> None:
    """A veth pair a<->b, both ends up; addrs = (a_v4, a_v6, b_v4, b_v6) with /24 and /64."""
    with a.iproute() as ipr:
        ipr.link("add", ifname=name_a, kind="veth", peer={"ifname": name_b, "net_ns_fd": b.name})
    for ns, ifname, v4, v6 in ((a, name_a, *addrs[:2]), (b, name_b, *addrs[2:])):
        with ns.iproute() as ipr:
            idx = ipr.link_lookup(ifname=ifname)[0]
            ipr.addr("add", index=idx, address=v4, prefixlen=24)
            ipr.addr("add", index=idx, address=v6, prefixlen=64, flags=IFA_F_NODAD)
            ipr.link("set", index=idx, state="up")


def spawn_servers(
    ns: Netns, workdir: Path, tag: str, specs: Sequence[list[str]]
) -> list[tuple[str, Path, subprocess.Popen[bytes]]]:
    """Start servers.py services in `ns`; wait for them with wait_ready()."""
    procs = []
    for argv in specs:
        log = workdir / f"server-{tag}-{argv[0]}.log"
        with open(log, "ab") as errlog:
            proc = ns.python_popen(
                [str(SERVERS), *argv, "--tag", f"wgrig-{tag}"],
                stdout=subprocess.PIPE,
                stderr=errlog,
                stdin=subprocess.DEVNULL,
            )
        procs.append((f"{argv[0]} in {ns.name}", log, proc))
    return procs


def wait_ready(
    procs: Sequence[tuple[str, Path, subprocess.Popen[bytes]]], timeout: float = 15.0
) -> None:
    """Block until every server printed its READY line (it is bound and serving)."""
    deadline = time.monotonic() + timeout
    for name, log, proc in procs:
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        buf = b""
        while not buf.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError(f"server {name} not ready after {timeout}s")
            chunk = os.read(fd, 256)
            if not chunk:
                raise RuntimeError(f"server {name} exited: {log.read_text()[-2000:]}")
            buf += chunk
        if not buf.startswith(b"READY"):
            raise RuntimeError(f"server {name}: unexpected {buf!r}")


def leftovers(rig_id: str) -> list[str]:
    """Anything of rig `rig_id` still on the machine: namespaces, links, processes, sockets."""
    found = [str(p) for p in NETNS_DIR.glob(f"{PREFIX}*-{rig_id}-*")]
    found += [str(p) for p in NETNS_ETC.glob(f"{PREFIX}*-{rig_id}-*")]
    found += [str(p) for p in WG_SOCK_DIR.glob(f"wgr{rig_id}*")]
    found += [f"link {p.name}" for p in Path("/sys/class/net").glob(f"wgr{rig_id}*")]
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            mine = f"wgrig-{rig_id}-" in cmd or (f"wgr{rig_id}" in cmd and "wireguard-go" in cmd)
            if mine:
                found.append(f"pid {proc.name}: {cmd.strip()}")
    return found
