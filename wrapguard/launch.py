"""From a validated command line to a running, wrapped program.

`prepare()` does everything that can fail before anything starts: it loads the config, logs
its notices, builds the routing policy (so a --route to an unknown peer fails here) and finds
the command. `run_child()` and `run_self_test()` then bring the tunnel up.
"""

from __future__ import annotations

from dataclasses import dataclass

from wrapguard import log
from wrapguard.cli import Options, resolve_command
from wrapguard.config import Config, load_config
from wrapguard.errors import WrapguardError
from wrapguard.routing import RoutingTable


@dataclass(frozen=True, slots=True)
class Plan:
    options: Options
    config: Config
    routing: RoutingTable
    executable: str | None


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
    return Plan(opts, config, routing, executable)


def check_wrappable(target: str) -> None:
    """Refuse, before anything starts, a program the shim cannot see (fail closed): one the
    kernel runs in secure-execution mode (setuid/setgid, file capabilities), a static, Go or
    foreign-architecture one (doctor.check_target; csrc/exec.c refuses the same at exec)."""
    from wrapguard.doctor import FAIL, check_target

    for finding in check_target(target):
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
    check_wrappable(executable)
    return split(
        lambda link: run(plan.config, plan.routing, plan.options.command, executable, link)
    )


def run_self_test(plan: Plan) -> int:
    from wrapguard.selftest import run_self_test as self_test

    return self_test(plan, plan.options.self_test or "")
