"""Helpers for the TUN add-on tests: run `wrapguard up` in a rig namespace, read its state.

`wrapguard up` only ever runs inside the rig's client namespace (no default route), with its
ledger in a per-test state directory (WRAPGUARD_STATE_DIR) and its control socket in the
test's tmp_path.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rig.netns import Netns

RTPROT = "87"


class Up:
    """One `wrapguard up` process in a namespace."""

    def __init__(
        self,
        ns: Netns,
        conf: Path,
        workdir: Path,
        extra: Sequence[str] = (),
        *,
        tun: str = "wgtun0",
        state_dir: Path | None = None,
        prefix: Sequence[str] = (),
    ) -> None:
        self.ns = ns
        self.tun = tun
        safe = tun.replace("/", "_")
        self.control = workdir / f"{safe}.sock"
        self.log = workdir / f"up-{safe}-{time.monotonic_ns()}.log"
        self.state_dir = state_dir or workdir / "state"
        env = ns.python_env()
        env["WRAPGUARD_STATE_DIR"] = str(self.state_dir)
        argv = [*prefix, sys.executable, "-m", "wrapguard", "up", "--config", str(conf)]
        argv += ["--tun", tun, "--control", str(self.control), *extra]
        self._logf = open(self.log, "wb")  # noqa: SIM115 (closed in stop())
        self.proc = ns.popen(argv, env=env, stdout=self._logf, stderr=subprocess.STDOUT)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_up(self, timeout: float = 30.0) -> Up:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                raise AssertionError(f"wrapguard up exited {code}:\n{self.output()}")
            if '"up: ' in self.output():
                return self
            time.sleep(0.1)
        raise AssertionError(f"wrapguard up did not come up:\n{self.output()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig) if sig == signal.SIGKILL else self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
                raise AssertionError(f"wrapguard up did not stop:\n{self.output()}") from None
        self._logf.close()
        return self.proc.returncode

    def api(self, method: str, path: str, body: Any = None) -> Any:
        argv = ["curl", "-sS", "--max-time", "10", "--unix-socket", str(self.control)]
        argv += ["-X", method]
        if body is not None:
            argv += ["-H", "content-type: application/json", "--data", json.dumps(body)]
        r = self.ns.run([*argv, f"http://localhost{path}"], check=True)
        return json.loads(r.stdout)


def route_get(ns: Netns, dst: str) -> str:
    """`ip route get DST` in the namespace, one line ('' for no route)."""
    r = ns.run(["ip", "route", "get", dst], check=False)
    return " ".join(r.stdout.split()) if r.returncode == 0 else ""


def snapshot(ns: Netns) -> dict[str, str]:
    """Links, addresses, routes (all tables, both families) and rules: what `up` may touch."""
    deadline = time.monotonic() + 10  # a fresh link's IPv6 DAD changes addresses and routes
    while ns.run(["ip", "-6", "addr", "show", "tentative"]).stdout.strip():
        if time.monotonic() > deadline:
            break
        time.sleep(0.2)
    out = {}
    for name, argv in {
        "links": ["ip", "-o", "link", "show"],
        "addrs": ["ip", "-o", "addr", "show"],
        "routes4": ["ip", "-4", "route", "show", "table", "all"],
        "routes6": ["ip", "-6", "route", "show", "table", "all"],
        "rules4": ["ip", "-4", "rule", "show"],
        "rules6": ["ip", "-6", "rule", "show"],
    }.items():
        text = ns.run(argv).stdout
        # Counters and neighbour-learnt details change by themselves; keep what is ours to keep.
        lines = [ln for ln in text.splitlines() if "expires" not in ln]
        out[name] = "\n".join(sorted(" ".join(ln.split()) for ln in lines))
    return out


def ours(ns: Netns, tun: str) -> list[str]:
    """What of ours is in the namespace: the link, routes with our protocol."""
    found = []
    if ns.run(["ip", "link", "show", tun], check=False).returncode == 0:
        found.append(f"link {tun}")
    for fam in ("-4", "-6"):
        r = ns.run(["ip", fam, "route", "show", "table", "all", "proto", RTPROT])
        found += [f"route {ln}" for ln in r.stdout.splitlines() if ln.strip()]
    return found
