"""`wrapguard --doctor [TARGET]`: can wrapguard do its job here, and for this program?

One `doctor:` line per check on stdout, each failure with advice; exit 0 when nothing failed
(warnings do not fail), 1 otherwise. The checks never send network traffic: endpoint names are
resolved, nothing is connected.
"""

from __future__ import annotations

import os
import platform
import shutil
import socket
import stat
import sys
import tempfile
from dataclasses import dataclass
from typing import TYPE_CHECKING

from wrapguard import shim
from wrapguard.elf import NotElf, read_elf
from wrapguard.errors import WrapguardError

if TYPE_CHECKING:
    from wrapguard.cli import Options

OK, WARN, FAIL = "ok", "warn", "FAIL"


@dataclass(frozen=True, slots=True)
class Finding:
    status: str
    check: str
    detail: str
    advice: str = ""

    def line(self) -> str:
        text = f"doctor: [{self.status}] {self.check}: {self.detail}"
        if self.advice and self.status != OK:
            text += f" -- {self.advice}"
        return text


def check_platform() -> Finding:
    if not sys.platform.startswith("linux"):
        return Finding(
            FAIL,
            "platform",
            f"{sys.platform} is not supported",
            "wrapguard needs Linux with glibc (LD_PRELOAD)",
        )
    libc = os.confstr("CS_GNU_LIBC_VERSION") if hasattr(os, "confstr") else None
    return Finding(OK, "platform", f"Linux {platform.machine()}, {libc or 'unknown libc'}")


def check_shim() -> Finding:
    try:
        path = shim.shim_path()
    except WrapguardError as exc:
        return Finding(FAIL, "shim", str(exc), "reinstall with `pip install .`")
    probe_target = shutil.which("true") or "/bin/true"
    ok, detail = shim.probe([probe_target])
    if ok:
        return Finding(OK, "shim", f"{path} loads into {probe_target} ({detail})")
    return Finding(FAIL, "shim", detail, "rebuild the shim with `pip install .`")


def _interpreter_of(path: str) -> str | None:
    """The program a `#!` script runs, following `/usr/bin/env NAME`."""
    try:
        with open(path, "rb") as f:
            first = f.readline(256)
    except OSError:
        return None
    if not first.startswith(b"#!"):
        return None
    words = first[2:].decode("utf-8", "replace").split()
    if not words:
        return None
    if os.path.basename(words[0]) == "env":
        args = [w for w in words[1:] if not w.startswith("-") and "=" not in w]
        return shutil.which(args[0]) if args else None
    return words[0]


def check_target(target: str) -> list[Finding]:
    path = target if "/" in target else shutil.which(target)
    if path is None or not os.path.exists(path):
        return [
            Finding(FAIL, "target", f"{target} not found", "check the name, or give a full path")
        ]
    findings = []
    seen: set[str] = set()
    current = os.path.realpath(path)
    while current not in seen:
        seen.add(current)
        findings.extend(_check_binary(target, current))
        nxt = _interpreter_of(current)
        if nxt is None:
            break
        findings.append(Finding(OK, "target", f"{current} is a script run by {nxt}"))
        current = os.path.realpath(nxt)
    return findings


def _check_binary(target: str, path: str) -> list[Finding]:
    out = []
    try:
        st = os.stat(path)
    except OSError as exc:
        return [Finding(FAIL, "target", f"{path}: {exc.strerror}", "check permissions")]
    if st.st_mode & (stat.S_ISUID | stat.S_ISGID):
        out.append(
            Finding(
                FAIL,
                "target",
                f"{path} is setuid/setgid: the loader drops "
                "LD_PRELOAD for it, so its traffic would bypass the tunnel",
                "run a copy without the setuid bit, or another program",
            )
        )
    try:
        info = read_elf(path)
    except NotElf:
        if _interpreter_of(path) is None:
            out.append(
                Finding(
                    WARN,
                    "target",
                    f"{path} is neither ELF nor a #! script",
                    "wrapguard cannot tell whether the shim will see it",
                )
            )
        return out
    except OSError as exc:
        return [Finding(FAIL, "target", f"{path}: {exc.strerror}", "check permissions")]
    if info.is_go:
        out.append(
            Finding(
                FAIL,
                "target",
                f"{path} is a Go program: Go makes its own system "
                "calls, so the shim cannot see its sockets",
                "use a SOCKS/HTTP proxy mode of the program, or a non-Go client",
            )
        )
    elif info.is_static:
        out.append(
            Finding(
                FAIL,
                "target",
                f"{path} is statically linked: LD_PRELOAD cannot "
                "load the shim into it, so its traffic would bypass the tunnel",
                "use a dynamically linked build of the program",
            )
        )
    else:
        out.append(
            Finding(
                OK,
                "target",
                f"{path} is dynamically linked ({info.interpreter}); the shim can load into it",
            )
        )
    return out


def check_config(config_path: str) -> list[Finding]:
    from wrapguard.config import load_config

    try:
        config = load_config(config_path)
    except WrapguardError as exc:
        return [Finding(FAIL, "config", str(exc), "fix the line named above")]
    out = [Finding(OK, "config", f"{config_path}: {len(config.peers)} peer(s), keys valid")]
    for notice in config.notices:
        if notice.level == "warning":
            where = f"{notice.path}:{notice.line}" if notice.line else notice.path
            out.append(Finding(WARN, "config", f"{where}: {notice.message}", "see the message"))
    for i, peer in enumerate(config.peers, 1):
        ep = peer.endpoint
        if ep is None:
            out.append(
                Finding(
                    WARN,
                    "endpoint",
                    f"peer {i} has no Endpoint: it can reach us only after it knows where we are",
                    "give it an Endpoint, or set PersistentKeepalive on its side",
                )
            )
            continue
        try:
            addrs = socket.getaddrinfo(ep.host, ep.port, type=socket.SOCK_DGRAM)
        except OSError as exc:
            out.append(
                Finding(
                    FAIL,
                    "endpoint",
                    f"peer {i} Endpoint {ep.host}: cannot be resolved ({exc})",
                    "check the name or use an IP address",
                )
            )
            continue
        out.append(
            Finding(OK, "endpoint", f"peer {i} Endpoint {ep.host}:{ep.port} -> {addrs[0][4][0]}")
        )
    if config.interface.dns_servers:
        servers = ", ".join(str(s) for s in config.interface.dns_servers)
        out.append(Finding(OK, "dns", f"names resolve through the tunnel via {servers}"))
    else:
        out.append(
            Finding(
                WARN,
                "dns",
                "no DNS= in [Interface]: names are resolved by the "
                "host resolver, outside the tunnel",
                "add DNS = <a resolver inside the tunnel> to keep lookups private",
            )
        )
    return out


def check_channel_dir() -> Finding:
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    try:
        d = tempfile.mkdtemp(prefix="wrapguard-doctor-", dir=base)
        mode = stat.S_IMODE(os.stat(d).st_mode)
        os.rmdir(d)
    except OSError as exc:
        return Finding(
            FAIL,
            "channel",
            f"cannot create a private directory in {base}: {exc.strerror}",
            "set XDG_RUNTIME_DIR or TMPDIR to a writable place",
        )
    if mode != 0o700:
        return Finding(
            FAIL,
            "channel",
            f"a directory made in {base} got mode {mode:o}, not 700",
            "use a TMPDIR on a filesystem with POSIX permissions",
        )
    return Finding(OK, "channel", f"private directories can be made in {base}")


def run_doctor(opts: Options) -> int:
    findings = [check_platform(), check_shim(), check_channel_dir()]
    if opts.doctor:
        findings.extend(check_target(opts.doctor))
    if opts.config_path is not None:
        findings.extend(check_config(opts.config_path))
    for f in findings:
        print(f.line(), flush=True)
    failed = sum(1 for f in findings if f.status == FAIL)
    warned = sum(1 for f in findings if f.status == WARN)
    if failed:
        print(f"doctor: {failed} problem(s) found, {warned} warning(s)")
        return 1
    print(f"doctor: all checks passed, {warned} warning(s)")
    return 0
