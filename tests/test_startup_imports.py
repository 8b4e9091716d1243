"""Start-up cost: what `wrapguard --help`, `--version` and a plain `-- true` must not import.

Most of a start is spent importing modules (bench row 5, issue 14); these tests fail when a
heavy module that the path does not use comes back on it. They read `sys.modules` of real
subprocesses (the waiter and the forked launcher, just before they exit), never timings;
and whether the garbage collector, off during the start-up (wrapguard/startup.py), is back on.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from wrapguard.keys import PrivateKey

# Imported at the last moment in each process: os._exit() is how both the waiter and the
# launcher end (runtime/lifetime.py), sys.exit() how --help and --version do.
PROBE = textwrap.dedent(
    """
    import gc, json, os, sys
    out, argv = sys.argv[1], sys.argv[2:]
    real_exit = os._exit

    def dump():
        with open(f"{out}.{os.getpid()}", "w") as f:
            json.dump({"modules": sorted(sys.modules), "gc": gc.isenabled()}, f)

    def _exit(code):
        dump()
        real_exit(code)

    os._exit = _exit
    from wrapguard.cli import main
    try:
        main(argv)
    except SystemExit:
        dump()
        raise
    """
)

# Never needed to print help or the version: the whole runtime is behind these.
NOT_FOR_HELP = [
    "asyncio",
    "cryptography",
    "h11",
    "structlog",
    "wrapguard.config",
    "wrapguard.doctor",
    "wrapguard.launch",
    "wrapguard.log",
]
# Not needed to run a dynamically linked program with a plain UDP config and no DNS=:
# the stream road (h11, urllib.request, http.client), the control socket's HTTP layer and
# endpoints (imported at its first connection), cryptography's serialization (SSH key support).
NOT_FOR_PLAIN_RUN = [
    "structlog",  # log.py is the whole pipeline
    "h11",
    "http.client",
    "urllib.request",
    "wrapguard.control.httpconn",
    "wrapguard.control.api",
    "wrapguard.roads.stream",
    "cryptography.hazmat.primitives.serialization",
    # cryptography's OpenSSL backend (~4 ms), imported by its X25519 key constructors: public
    # keys come from libsodium and DH objects are made at the first handshake (noise/crypto.py).
    "cryptography.hazmat.backends.openssl",
    # Endpoint host names only (runtime/udp.py): the config above gives an address.
    "wrapguard.tunnel.reresolve",
    # The seccomp door's logic: its front (doors/seccomp_listen.py) listens in every run and
    # imports it at the first hand-over of a static or Go program.
    "wrapguard.doors.seccomp",
    "wrapguard.wire.seccomp",
]


def _dumps(tmp_path: Path, *argv: str) -> list[dict[str, object]]:
    out = tmp_path / "mods"
    r = subprocess.run(
        [sys.executable, "-c", PROBE, str(out), *argv],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    dumps = sorted(tmp_path.glob("mods.*"))
    assert dumps, "the probe did not run"
    return [json.loads(p.read_text()) for p in dumps]


def _modules(tmp_path: Path, *argv: str) -> list[set[str]]:
    return [set(d["modules"]) for d in _dumps(tmp_path, *argv)]  # type: ignore[call-overload]


@pytest.mark.parametrize("flag", ["--help", "--version"])
def test_help_and_version_import_no_runtime(tmp_path: Path, flag: str) -> None:
    (dump,) = _dumps(tmp_path, flag)
    mods = set(dump["modules"])  # type: ignore[call-overload]
    assert "wrapguard.cli" in mods and "click" in mods  # the probe saw the real thing
    loaded = sorted(m for m in NOT_FOR_HELP if m in mods)
    assert loaded == [], f"{flag} imports {loaded}"
    assert dump["gc"] is True, "cli.main left the garbage collector off"


def _plain_run(tmp_path: Path) -> list[dict[str, object]]:
    conf = tmp_path / "wg0.conf"
    conf.write_text(
        "[Interface]\n"
        f"PrivateKey = {PrivateKey.generate().to_base64()}\n"
        "Address = 10.150.0.2/32\n"
        "\n[Peer]\n"
        f"PublicKey = {PrivateKey.generate().public_key().to_base64()}\n"
        "Endpoint = 127.0.0.1:9\n"  # loopback; `true` sends nothing, no keepalive is set
        "AllowedIPs = 10.150.0.0/24\n"
    )
    conf.chmod(0o600)
    control = tmp_path / "ctl.sock"
    procs = _dumps(
        tmp_path, "--config", str(conf), "--control", str(control), "--log-level", "warn",
        "--", "true",
    )  # fmt: skip
    assert len(procs) == 2, "expected the waiter and the launcher"
    return procs


def test_plain_run_imports_nothing_it_does_not_use(tmp_path: Path) -> None:
    procs = [set(d["modules"]) for d in _plain_run(tmp_path)]  # type: ignore[call-overload]
    launcher = max(procs, key=len)
    assert "wrapguard.runtime.launcher" in launcher and "wrapguard.control.server" in launcher
    for mods in procs:
        loaded = sorted(m for m in NOT_FOR_PLAIN_RUN if m in mods)
        assert loaded == [], f"`-- true` imports {loaded}"


def test_waiter_and_launcher_collect_garbage_once_set_up(tmp_path: Path) -> None:
    """The collector is off while the modules load (startup.py); a launcher (or waiter) that
    stays up for hours must have it back on by the time the program runs."""
    assert [d["gc"] for d in _plain_run(tmp_path)] == [True, True]
