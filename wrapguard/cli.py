"""The command line: the contract users know from the Go wrapguard (compat.md).

    wrapguard --config PATH [--exit-node IP] [--route CIDR:PEER_IP]... [--log-level L]
              [--log-file F] [--doctor [TARGET]] [--self-test] -- CMD ARGS...

Parsing is click's; every failure becomes one clear line on stderr and an exit code:
2 for usage errors, 1 for setup errors, 127/126 when CMD cannot be found or run (as env(1)
does), and otherwise the wrapped program's own exit status.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

import click

from wrapguard import __version__, startup
from wrapguard.clioptions import log_options, routing_options
from wrapguard.errors import UsageError, WrapguardError
from wrapguard.options import (
    EXIT_SETUP,
    Options,
)


def _parse_proxy(kind: str) -> Callable[[click.Context, click.Parameter, str | None], object]:
    def parse(_ctx: click.Context, param: click.Parameter, value: str | None) -> object:
        if value is None:
            return None
        from wrapguard.frontends import parse_proxy_flag

        try:
            return parse_proxy_flag(kind, value)
        except UsageError as exc:
            raise click.BadParameter(str(exc), param_hint=param.opts[0]) from None

    return parse


MODES = """\b
Modes:
  wrap a command   wrapguard --config wg0.conf -- curl http://10.150.0.1:8080/
  proxy daemon     wrapguard --config wg0.conf --socks5 127.0.0.1:1080 --http-proxy 127.0.0.1:8118
  show the state   wrapguard show [--control PATH]
  UDP blocked?     wrapguard relay --listen HOST:PORT --forward WG_HOST:PORT --key-file FILE
  whole host       wrapguard up --config wg0.conf [--exit-node IP]   (root: a TUN device)
  check, prove     wrapguard --doctor [TARGET] --config wg0.conf | --self-test [IP:PORT]
"""


@click.command(
    context_settings={
        "help_option_names": ["-h", "--help"],
        "allow_interspersed_args": False,
        "max_content_width": 100,
    },
    epilog=MODES,
)
@click.option(
    "--config", "config_path", metavar="PATH", help="wg-quick style WireGuard config file."
)
@routing_options(
    "Send CIDR through the peer that owns PEER_IP (repeatable; IPv6: fd00::/8:fd15::1)."
)
@log_options
@click.option(
    "--socks5",
    metavar="[USER:PASS@]HOST:PORT",
    callback=_parse_proxy("socks5"),
    help="Serve a SOCKS5 proxy into the tunnel (names resolve through DNS=).",
)
@click.option(
    "--http-proxy",
    metavar="[USER:PASS@]HOST:PORT",
    callback=_parse_proxy("http"),
    help="Serve an HTTP proxy (CONNECT and plain requests) into the tunnel.",
)
@click.option(
    "--control",
    metavar="PATH",
    help="The control socket (GET /state, /bypass, /metrics); default in $XDG_RUNTIME_DIR.",
)
@click.option(
    "--intercept",
    type=click.Choice(["auto", "preload", "seccomp"], case_sensitive=False),
    default="auto",
    show_default=True,
    help="How CMD's sockets are seen: the preload shim, the seccomp door (static and Go "
    "programs), or auto (chosen from the program's ELF headers).",
)
@click.option(
    "--doctor",
    metavar="[TARGET]",
    is_flag=False,
    flag_value="",
    default=None,
    help="Check this system (and TARGET, a program) for what wrapguard needs, then exit.",
)
@click.option(
    "--self-test",
    metavar="[IP:PORT]",
    is_flag=False,
    flag_value="",
    default=None,
    help="Bring the tunnel up and prove a handshake and a connection through it (to IP:PORT,"
    " or an ICMP echo to the first peer), then exit. Needs --config.",
)
@click.version_option(
    __version__, "--version", prog_name="wrapguard", message="%(prog)s version %(version)s"
)
@click.argument("command", nargs=-1, type=click.UNPROCESSED, metavar="-- CMD [ARGS]...")
def _command(**kwargs: object) -> Options:
    """Run CMD with its network traffic inside a WireGuard tunnel (no root, no TUN device)."""
    return Options(
        config_path=kwargs["config_path"],  # type: ignore[arg-type]
        exit_node=kwargs["exit_node"],  # type: ignore[arg-type]
        routes=kwargs["routes"],  # type: ignore[arg-type]
        log_level=str(kwargs["log_level"]).lower(),
        log_file=kwargs["log_file"],  # type: ignore[arg-type]
        doctor=kwargs["doctor"],  # type: ignore[arg-type]
        self_test=kwargs["self_test"],  # type: ignore[arg-type]
        command=tuple(kwargs["command"]),  # type: ignore[arg-type]
        proxies=tuple(p for p in (kwargs["socks5"], kwargs["http_proxy"]) if p is not None),  # type: ignore[misc]
        control=kwargs["control"],  # type: ignore[arg-type]
        intercept=str(kwargs["intercept"]).lower(),
    )


def parse_args(argv: Sequence[str]) -> Options | int:
    """Parse argv; returns Options, or an exit code when --help/--version already answered."""
    try:
        result = _command.main(list(argv), prog_name="wrapguard", standalone_mode=False)
    except click.UsageError as exc:
        raise UsageError(_one_line(exc.format_message())) from None
    except click.exceptions.Abort:
        return 130
    if isinstance(result, Options):
        _validate(result)
        return result
    return 0 if result is None else int(result)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _validate(opts: Options) -> None:
    wants_run = opts.doctor is None and opts.self_test is None
    if opts.doctor is not None and opts.self_test is not None:
        raise UsageError("--doctor and --self-test cannot be used together")
    if opts.self_test is not None and opts.config_path is None:
        raise UsageError("--self-test needs --config PATH")
    if wants_run:
        # No command: a proxy daemon, if the flags or the config's [Socks5]/[http] ask for one
        # (launch.prepare checks that once the config is read).
        if opts.config_path is None:
            raise UsageError(
                "--config PATH is required to run a command"
                if opts.command
                else "no command given: usage is wrapguard --config PATH -- CMD [ARGS]..."
            )
    elif opts.command and opts.doctor is None:
        raise UsageError("--self-test does not take a command")


def run(opts: Options) -> int:
    """Carry out a parsed command line; returns the exit code."""
    from wrapguard import log  # not for --help and --version (start-up time)

    try:
        log.setup(opts.log_level, opts.log_file)
    except OSError as exc:
        raise WrapguardError(
            f"cannot open log file {opts.log_file}: {exc.strerror or exc}"
        ) from None
    if opts.doctor is not None or opts.self_test is not None:
        startup.resume()  # the launcher resumes the collector for a run or a daemon
    if opts.doctor is not None:
        from wrapguard.doctor import run_doctor

        return run_doctor(opts)
    from wrapguard.launch import prepare, run_child, run_self_test

    plan = prepare(opts)
    if opts.self_test is not None:
        return run_self_test(plan)
    if not opts.command:
        from wrapguard.launch import run_daemon

        return run_daemon(plan)
    return run_child(plan)


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Console-script entry point."""
    startup.pause()  # no garbage collection until the start-up is done (startup.py)
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if args[:1] == ["show"]:
            sys.exit(_show(args[1:]))
        if args[:1] == ["relay"]:
            from wrapguard.roads.relaycli import relay_main

            startup.resume()
            sys.exit(relay_main(args[1:]))
        if args[:1] == ["up"]:
            startup.resume()
            sys.exit(_up(args[1:]))
        parsed = parse_args(args)
        if isinstance(parsed, int):
            sys.exit(parsed)
        code = run(parsed)
    except WrapguardError as exc:
        _report(exc)
        code = exc.exit_code
    except KeyboardInterrupt:
        code = 130
    except Exception as exc:  # the last line of defence: one line, never a traceback
        _report(WrapguardError(f"internal error: {type(exc).__name__}: {exc}"))
        if os.environ.get("WRAPGUARD_TRACEBACK"):
            raise
        code = EXIT_SETUP
    finally:
        startup.resume(freeze=False)  # a caller in the same process gets its collector back
    sys.exit(code)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--control", metavar="PATH", help="The control socket (default: find it).")
def _show_command(control: str | None) -> str | None:
    """Print the state of a running wrapguard, as `wg show` does."""
    return control or ""


def _show(argv: Sequence[str]) -> int:
    try:
        result = _show_command.main(list(argv), prog_name="wrapguard show", standalone_mode=False)
    except click.UsageError as exc:
        raise UsageError(_one_line(exc.format_message())) from None
    if not isinstance(result, str):
        return 0 if result is None else int(result)  # --help
    from wrapguard.control.show import main as show_main

    return show_main(result or None)


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--config", "config_path", metavar="PATH", required=True, help="wg-quick config.")
@click.option("--tun", metavar="NAME", help="The TUN device's name (default: the config's stem).")
@routing_options("Send CIDR through the peer that owns PEER_IP (repeatable).")
@click.option(
    "--control",
    metavar="PATH",
    help="The control socket (GET /state, /bypass, /metrics); default in $XDG_RUNTIME_DIR.",
)
@log_options
def _up_command(**kwargs: object) -> object:
    """The TUN add-on (root or CAP_NET_ADMIN): the whole host's traffic to the tunnel's routes
    goes through a TUN device into the tunnel, until SIGINT/SIGTERM; peer endpoints are
    bypassed. Everything it made is removed on exit (docs/tun.md)."""
    from wrapguard.tun.up import UpOptions

    log_level, log_file = str(kwargs.pop("log_level")).lower(), kwargs.pop("log_file")
    return (UpOptions(**kwargs), log_level, log_file)  # type: ignore[arg-type]


def _up(argv: Sequence[str]) -> int:
    try:
        result = _up_command.main(list(argv), prog_name="wrapguard up", standalone_mode=False)
    except click.UsageError as exc:
        raise UsageError(_one_line(exc.format_message())) from None
    except click.exceptions.Abort:
        return 130
    if not isinstance(result, tuple):
        return 0 if result is None else int(result)  # --help
    opts, level, log_file = result
    from wrapguard import log

    try:
        log.setup(level, log_file)
    except OSError as exc:
        raise WrapguardError(f"cannot open log file {log_file}: {exc.strerror or exc}") from None
    from wrapguard.tun.up import run_up

    return run_up(opts)


def _report(exc: WrapguardError) -> None:
    """One clear line on the terminal; with --log-file, the same as a JSON log line there."""
    line = f"wrapguard: {exc}"
    if isinstance(exc, UsageError):
        line += " (see wrapguard --help)"
    log = sys.modules.get("wrapguard.log")  # None: logging never set up, so no log file
    if log is not None and log.writes_to_file():
        log.get().error(str(exc))
    print(line, file=sys.stderr)
