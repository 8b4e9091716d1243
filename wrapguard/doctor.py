"""`wrapguard --doctor [TARGET]`: can wrapguard do its job here, and for this program?

One `doctor:` line per check on stdout, each failure with advice; exit 0 when nothing failed
(warnings do not fail), 1 otherwise. The checks never send network traffic: endpoint names are
resolved, nothing is connected. A target's libraries are found from its ELF headers (DT_NEEDED,
as the loader would search them), never by running it, to report DNS resolver libraries.
"""

from __future__ import annotations

import functools
import glob
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
from wrapguard.elf import ElfInfo, NotElf, describe_identity, read_elf, read_file_caps
from wrapguard.errors import WrapguardError

if TYPE_CHECKING:
    from wrapguard.config import StreamEndpoint
    from wrapguard.options import Options

OK, WARN, FAIL = "ok", "warn", "FAIL"


@dataclass(frozen=True, slots=True)
class Finding:
    """One check's result: OK, WARN or FAIL, what was found, what to do."""

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


def check_seccomp() -> Finding:
    """Whether the seccomp door (static and Go programs, docs/seccomp.md) can run here."""
    from wrapguard.doors.seccomp_sys import probe
    from wrapguard.intercept import seccomp_unavailable

    why = seccomp_unavailable() or probe()
    if why is None:
        return Finding(
            OK,
            "seccomp",
            f"a seccomp user-notification filter runs here (Linux {platform.release()}): "
            "static and Go programs get the seccomp door",
        )
    return Finding(
        WARN,
        "seccomp",
        f"the seccomp door cannot run here ({why}): static and Go programs will be refused",
        "use Linux 5.9 or later, and reinstall wrapguard so that its helper is built",
    )


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


def check_target(
    target: str, dns: bool | None = None, seccomp: bool | None = None, *, resolvers: bool = True
) -> list[Finding]:
    """The target and what it runs; `dns`: whether the config has DNS= (None: no config);
    `seccomp`: whether a static or Go program gets the seccomp door (None: if it can run
    here, as --intercept auto does); `resolvers`: also look for resolver libraries (a walk
    through every library it loads; warnings only, so the launcher's own check skips it)."""
    if seccomp is None:
        from wrapguard.intercept import seccomp_unavailable

        seccomp = seccomp_unavailable() is None
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
        findings.extend(_check_binary(target, current, dns, seccomp, resolvers))
        nxt = _interpreter_of(current)
        if nxt is None:
            break
        findings.append(Finding(OK, "target", f"{current} is a script run by {nxt}"))
        current = os.path.realpath(nxt)
    return findings


def _check_binary(
    target: str, path: str, dns: bool | None = None, seccomp: bool = False, resolvers: bool = True
) -> list[Finding]:
    out = []
    try:
        st = os.stat(path)
    except OSError as exc:
        return [Finding(FAIL, "target", f"{path}: {exc.strerror}", "check permissions")]
    if _interpreter_of(path) is None:  # a script's own setuid bits and capabilities are ignored
        secure = check_secure_exec(path, st)
        if secure is not None and secure.status == FAIL:
            return [secure]  # whatever else it is, the shim will not be in it
        if secure is not None:
            out.append(secure)
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
    ours = _shim_identity()
    if ours is not None and info.identity != ours:
        out.append(
            Finding(
                FAIL,
                "target",
                f"{path} is a {describe_identity(info.identity)} program and the shim is "
                f"{describe_identity(ours)}: the loader cannot load the shim into it, so its "
                "traffic would bypass the tunnel",
                f"use a {describe_identity(ours)} build of the program",
            )
        )
    elif (info.is_go or info.is_static) and seccomp:
        kind = "a Go program" if info.is_go else "statically linked"
        out.append(
            Finding(
                OK,
                "target",
                f"{path} is {kind}: the shim cannot see its sockets, so it gets the seccomp "
                "door (its socket calls are answered by wrapguard, docs/seccomp.md)",
            )
        )
    elif info.is_go:
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
        if resolvers:
            out.extend(check_resolvers(path, info, dns))
    return out


# -- secure-execution mode -------------------------------------------------------------------
SECURE = (
    "the kernel runs it in secure-execution mode, where the loader ignores LD_PRELOAD, "
    "so its traffic would bypass the tunnel"
)


def _own_status() -> tuple[bool, int]:
    """(no_new_privs, the inheritable capability set) of this process, which the programs it
    starts inherit; without /proc: (False, every capability), the cautious answer."""
    nnp, inheritable = False, -1
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key == "NoNewPrivs":
                    nnp = value.strip() == "1"
                elif key == "CapInh":
                    inheritable = int(value, 16)
    except (OSError, ValueError):
        pass
    return nnp, inheritable


def check_secure_exec(path: str, st: os.stat_result) -> Finding | None:
    """Will the kernel run `path` in secure-execution mode (AT_SECURE) for a program we start?
    As security/commoncap.c (cap_bprm_creds_from_file) decides: when the exec changes the
    effective ids (a setuid/setgid bit it honours: not on a nosuid mount, not under
    no_new_privs, and only to another id than our real one; or our own effective and real ids
    differ), or file capabilities grant something to a caller whose real uid is not 0.
    csrc/exec.c applies the same rule to what a wrapped program execs."""
    ruid, euid, _ = os.getresuid()
    rgid, egid, _ = os.getresgid()
    try:
        nosuid = bool(os.statvfs(path).f_flag & os.ST_NOSUID)
    except OSError:
        nosuid = False
    nnp, inheritable = _own_status()
    honoured = not nosuid and not nnp
    setuid = bool(st.st_mode & stat.S_ISUID)
    # setgid without group execute marks mandatory locking, not setgid (fs/exec.c)
    setgid = st.st_mode & (stat.S_ISGID | stat.S_IXGRP) == stat.S_ISGID | stat.S_IXGRP
    new_euid = st.st_uid if setuid and honoured else euid
    new_egid = st.st_gid if setgid and honoured else egid
    caps = read_file_caps(path)
    granting = caps is not None and caps.grants(inheritable)
    if new_euid != ruid or new_egid != rgid:
        copy = " (a plain `cp` makes one), or another program"
        if setuid and honoured and new_euid != ruid:
            what, advice = f"is setuid to uid {st.st_uid}", f"run a copy without the bit{copy}"
        elif setgid and honoured and new_egid != rgid:
            what, advice = f"is setgid to gid {st.st_gid}", f"run a copy without the bit{copy}"
        else:
            what = f"would start with effective ids {euid}/{egid} but real ids {ruid}/{rgid}"
            advice = "run wrapguard with equal real and effective user and group ids"
        return Finding(FAIL, "target", f"{path} {what}: {SECURE}", advice)
    if granting and ruid != 0 and not nosuid:
        return Finding(
            FAIL,
            "target",
            f"{path} has file capabilities ({caps}): {SECURE}",
            "run a copy without them (a plain `cp` drops them), or another program",
        )
    special = [f"the {w} bit" for w, on in (("setuid", setuid), ("setgid", setgid)) if on]
    if granting:
        special.append(f"file capabilities ({caps})")
    if not special:
        return None
    why = (
        "its filesystem is mounted nosuid" if nosuid
        else "no_new_privs is set" if nnp and (setuid or setgid) and not granting
        else "the bit names our own id" if not granting
        else "we run as root"
    )  # fmt: skip
    detail = f"{path} has {' and '.join(special)}, but runs in normal mode here ({why})"
    return Finding(OK, "target", f"{detail}: the shim can load into it")


@functools.cache
def _shim_identity() -> tuple[int, int, int] | None:
    """The shim's ELF class, byte order and machine (what it can be loaded into)."""
    try:
        return read_elf(shim.shim_path()).identity
    except (WrapguardError, OSError, NotElf):
        return None


# -- resolver libraries ----------------------------------------------------------------------
# Libraries that read /etc/resolv.conf and send their own DNS queries instead of calling
# getaddrinfo (node's dns.resolve*, aria2c, BIND's dig/host/nslookup), by soname prefix.
RESOLVER_LIBS = {
    "libcares.so": "c-ares",
    "libdns-": "BIND 9's libdns",
    "libdns.so": "BIND 9's libdns",
    "libunbound.so": "libunbound",
    "libldns.so": "ldns",
    "libgetdns.so": "getdns",
}
CARES_SYMBOLS = frozenset({"ares_init_options", "ares_library_init", "ares_init"})  # built in
# glibc's resolver API is answered inside libc, where the shim cannot see its sockets.
RES_SYMBOLS = frozenset(
    {"res_query", "res_search", "res_send", "res_nquery", "res_nsearch", "res_nsend"}
    | {"__res_query", "__res_search", "__res_send", "__res_nquery", "__res_nsearch"}
)
MAX_LIBRARIES = 400  # bounds the walk through a target's dependencies


def _ld_conf_dirs(path: str = "/etc/ld.so.conf", depth: int = 0) -> list[str]:
    """The directories /etc/ld.so.conf lists (with its `include` globs), in order."""
    dirs: list[str] = []
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError:
        return dirs
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if line.startswith("include ") and depth < 4:
            pattern = line.split(None, 1)[1]
            if not os.path.isabs(pattern):
                pattern = os.path.join(os.path.dirname(path), pattern)
            for inc in sorted(glob.glob(pattern)):
                dirs += _ld_conf_dirs(inc, depth + 1)
        elif line.startswith("/"):
            dirs.append(line)
    return dirs


def _libraries(path: str, info: ElfInfo) -> list[tuple[str, str | None]]:
    """Every library the target loads, as (soname, the library that needs it or None for
    the target itself), breadth first, searched as ld.so(8) does (its cache aside)."""
    default = [*_ld_conf_dirs(), "/lib64", "/usr/lib64", "/lib", "/usr/lib"]
    env = [d for d in os.environ.get("LD_LIBRARY_PATH", "").split(":") if d]
    out: list[tuple[str, str | None]] = []
    seen: set[str] = set()
    queue: list[tuple[str | None, str, ElfInfo]] = [(None, os.path.dirname(path), info)]
    while queue and len(out) < MAX_LIBRARIES:
        parent, origin, elf = queue.pop(0)
        runpath = [d.replace("${ORIGIN}", origin).replace("$ORIGIN", origin) for d in elf.runpath]
        for soname in elf.needed:
            if soname in seen:
                continue
            seen.add(soname)
            out.append((soname, parent))
            for d in [*env, *runpath, *default]:
                candidate = os.path.join(d, soname)
                try:
                    lib = read_elf(candidate)
                except (OSError, NotElf):
                    continue
                queue.append((soname, os.path.dirname(os.path.realpath(candidate)), lib))
                break
    return out


def _resolver_libraries(path: str, info: ElfInfo) -> list[str]:
    """What sends its own DNS queries in the target: "c-ares (libcares.so.2, via X)"..."""
    found = []
    for soname, parent in _libraries(path, info):
        kind = next((k for p, k in RESOLVER_LIBS.items() if soname.startswith(p)), None)
        if kind is not None:
            found.append(f"{kind} ({soname}{f', via {parent}' if parent else ''})")
    if CARES_SYMBOLS & info.symbols and not any(f.startswith("c-ares") for f in found):
        found.append("c-ares (built in)")
    return found


def check_resolvers(path: str, info: ElfInfo, dns: bool | None) -> list[Finding]:
    """DNS resolver libraries in the target, and what happens to their queries."""
    out = []
    libs = _resolver_libraries(path, info)
    if libs:
        what = f"{path} uses {', '.join(libs)}, which sends its own DNS queries"
        if dns:
            detail = f"{what}: with DNS= set, its port-53 queries are answered through the tunnel"
            out.append(Finding(OK, "resolver", detail))
        elif dns is None:
            detail = (
                f"{what}: with DNS= in the config its port-53 queries are answered through the "
                "tunnel; without DNS= they go to the host resolver, outside the tunnel"
            )
            advice = "give --config to check, and set DNS = <a resolver inside the tunnel>"
            out.append(Finding(WARN, "resolver", detail, advice))
        else:
            detail = (
                f"{what}: without DNS= in the config they go to the host resolver "
                "(/etc/resolv.conf), outside the tunnel"
            )
            advice = "add DNS = <a resolver inside the tunnel>: they are then answered through it"
            out.append(Finding(WARN, "resolver", detail, advice))
    res = sorted(RES_SYMBOLS & info.symbols)
    if res:
        detail = (
            f"{path} calls glibc's resolver API ({', '.join(res)}): those lookups are made "
            "inside libc, where the shim cannot see them, and go to the host's resolv.conf "
            "servers, outside the tunnel"
        )
        advice = "avoid the feature that uses it inside the tunnel (e.g. ssh VerifyHostKeyDNS)"
        out.append(Finding(WARN, "resolver", detail, advice))
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
        if peer.stream is not None:
            out.append(_check_relay(i, peer.stream))
            continue
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


def _check_relay(i: int, target: StreamEndpoint) -> Finding:
    """A peer over HTTP(S) streams: reachable, TLS valid, key accepted (one real request)."""
    import asyncio

    from wrapguard.roads.stream import probe

    ok, text = asyncio.run(probe(target))
    if ok:
        return Finding(OK, "relay", f"peer {i} Endpoint {target.url}: {text}")
    return Finding(
        FAIL,
        "relay",
        f"peer {i} Endpoint {target.url}: {text}",
        "see docs/streams.md (the relay, its key file, the proxy in front)",
    )


def _config_has_dns(config_path: str | None) -> bool | None:
    """Whether the config sets DNS= (None: no config, or one that does not load)."""
    from wrapguard.config import load_config

    if config_path is None:
        return None
    try:
        return bool(load_config(config_path).interface.dns_servers)
    except WrapguardError:
        return None


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
    findings = [check_platform(), check_shim(), check_seccomp(), check_channel_dir()]
    if opts.doctor:
        mode = opts.intercept
        seccomp = None if mode == "auto" else mode == "seccomp"
        findings.extend(check_target(opts.doctor, _config_has_dns(opts.config_path), seccomp))
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
