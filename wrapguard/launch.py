"""From a validated command line to a running, wrapped program.

`prepare()` does everything that can fail before anything starts: it loads the config, logs
its notices, builds the routing policy (so a --route to an unknown peer fails here) and finds
the command. `run_child()` and `run_self_test()` then bring the tunnel up.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

from wrapguard import log
from wrapguard.config import Config, load_config
from wrapguard.errors import UsageError, WrapguardError
from wrapguard.frontends import ProxySpec
from wrapguard.options import Options, resolve_command
from wrapguard.routing import RoutingTable


@dataclass(frozen=True, slots=True)
class Plan:
    """Everything a run needs, checked before anything starts (`prepare()`)."""

    options: Options
    config: Config
    routing: RoutingTable
    executable: str | None
    proxies: tuple[ProxySpec, ...] = ()  # the config's [Socks5]/[http], then the flags
    control: str | None = None  # the control socket's path
    door: str = "preload"  # which door carries CMD's sockets (intercept.py)


def _proxies(opts: Options, config: Config) -> tuple[ProxySpec, ...]:
    """A flag replaces the config's section of the same kind (the command line wins)."""
    flagged = {p.kind for p in opts.proxies}
    return tuple(p for p in config.proxies if p.kind not in flagged) + opts.proxies


def prepare(opts: Options) -> Plan:
    assert opts.config_path is not None  # cli._validate guarantees it
    from wrapguard.runtime.lifetime import make_undumpable

    make_undumpable()  # before the private key is read into memory
    logger = log.get()
    config = load_config(opts.config_path)
    if not config.peers:
        raise WrapguardError(
            f"{opts.config_path}: no [Peer] section: nothing could go through the tunnel "
            "(add the peer's PublicKey, Endpoint and AllowedIPs)"
        )
    for notice in config.notices:
        fields = {"file": notice.path, "line": notice.line, "key": notice.key}
        if notice.level == "warning":
            logger.warning(notice.message, **fields)
        else:
            logger.debug(notice.message, **fields)
    routing = RoutingTable.build(config, list(opts.routes), opts.exit_node)
    executable = resolve_command(opts.command[0]) if opts.command else None
    proxies = _proxies(opts, config)
    if opts.self_test is None and not opts.command and not proxies and opts.control is None:
        raise UsageError(
            "no command given: usage is wrapguard --config PATH -- CMD [ARGS]..., or a proxy "
            "daemon with --socks5/--http-proxy (or [Socks5]/[http] in the config)"
        )
    if any(p.password is not None for p in opts.proxies):
        logger.warning(
            "a proxy password on the command line can be read by every local user (ps); "
            "put it in the config's [Socks5] or [http] section instead"
        )
    control = opts.control
    if control is None and opts.self_test is None:
        control = _default_control(opts.config_path)
    return Plan(opts, config, routing, executable, proxies, control)


def _default_control(config_path: str) -> str:
    """compat.md's default; if someone else has taken its directory (another user made
    /tmp/wrapguard-<uid> first), a fresh private one instead of refusing to run."""
    from wrapguard.control.paths import default_control_path

    try:
        return default_control_path(config_path)
    except WrapguardError as exc:
        stem = os.path.splitext(os.path.basename(config_path))[0] or "wrapguard"
        private = tempfile.mkdtemp(prefix=f"wrapguard-{os.geteuid()}-")
        log.get().warning(
            "the default control socket directory cannot be used; using a private one",
            reason=str(exc),
            directory=private,
        )
        return os.path.join(private, f"{stem}.sock")


def choose_door(plan: Plan) -> Plan:
    """The door for CMD (--intercept; auto: static and Go programs get the seccomp door)."""
    from dataclasses import replace

    from wrapguard import intercept

    assert plan.executable is not None
    choice = intercept.choose(plan.executable, plan.options.intercept)
    if choice.door == intercept.SECCOMP:
        why = intercept.seccomp_unavailable()
        if why is not None:
            raise WrapguardError(
                f"refusing to run {plan.executable}: {choice.reason}, and the seccomp door "
                f"cannot run here: {why}"
            )
    log.get().debug("door chosen", door=choice.door, reason=choice.reason)
    return replace(plan, door=choice.door)


def check_wrappable(target: str, door: str = "preload") -> None:
    """Refuse, before anything starts, a program no door can see (fail closed): one the
    kernel runs in secure-execution mode (setuid/setgid, file capabilities), a foreign-
    architecture one, and (for the preload door) a static or Go one (doctor.check_target;
    csrc/exec.c refuses the same at exec)."""
    from wrapguard.doctor import FAIL, check_target

    for finding in check_target(target, seccomp=door == "seccomp", resolvers=False):
        if finding.status == FAIL:
            raise WrapguardError(f"refusing to run {target}: {finding.detail}; {finding.advice}")


def run_child(plan: Plan) -> int:
    """Run the command in the tunnel. The tunnel lives on in a forked launcher while processes
    the command left behind still run; this process returns the command's status
    (runtime/lifetime.py)."""
    from wrapguard.runtime.launcher import run
    from wrapguard.runtime.lifetime import split

    executable = plan.executable
    assert executable is not None
    plan = choose_door(plan)
    check_wrappable(executable, plan.door)
    return split(lambda link: run(plan, executable, link))


def run_daemon(plan: Plan) -> int:
    """No command: serve the proxy doors (and the control socket) until SIGINT/SIGTERM."""
    from wrapguard.runtime.launcher import run

    return run(plan, None, None)


def run_self_test(plan: Plan) -> int:
    from wrapguard.selftest import run_self_test as self_test

    return self_test(plan, plan.options.self_test or "")
