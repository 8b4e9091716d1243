"""`wrapguard relay`'s command line (click), kept beside the relay: `wrapguard.cli.main` hands
it the arguments after `relay`. Usage errors are UsageError (exit 2), setup errors exit 1."""

from __future__ import annotations

from collections.abc import Sequence

import click

from wrapguard.clioptions import log_options
from wrapguard.errors import UsageError, WrapguardError


def _one_line(text: str) -> str:
    return " ".join(text.split())


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--listen", required=True, metavar="HOST:PORT", help="Where to accept streams.")
@click.option("--forward", required=True, metavar="HOST:PORT", help="The WireGuard server (UDP).")
@click.option(
    "--key-file", required=True, metavar="FILE", help="API keys, one a line (never on argv)."
)
@click.option("--tls-cert", metavar="FILE", help="Serve TLS with this certificate chain.")
@click.option("--tls-key", metavar="FILE", help="The private key of --tls-cert.")
@click.option("--max-sessions", type=click.IntRange(1, 100000), default=1000, show_default=True)
@click.option(
    "--idle-timeout",
    type=click.FloatRange(1, 86400),
    default=180.0,
    show_default=True,
    help="Seconds without a datagram before a session ends.",
)
@log_options
def _relay_command(**kwargs: object) -> dict[str, object]:
    """Relay WireGuard datagrams between HTTP(S) stream clients and a WireGuard server."""
    return kwargs


def relay_main(argv: Sequence[str]) -> int:
    """`wrapguard relay ...`: parse, set up logging, run until SIGTERM; returns the exit code."""
    try:
        result = _relay_command.main(list(argv), prog_name="wrapguard relay", standalone_mode=False)
    except click.UsageError as exc:
        raise UsageError(_one_line(exc.format_message())) from None
    if not isinstance(result, dict):
        return 0 if result is None else int(result)  # --help
    from wrapguard import log  # only once the command is known (start-up time)

    def opt(name: str) -> str | None:
        value = result.get(name)
        return None if value is None else str(value)

    log_file = opt("log_file")
    try:
        log.setup(str(opt("log_level")).lower(), log_file)
    except OSError as exc:
        raise WrapguardError(f"cannot open log file {log_file}: {exc.strerror or exc}") from None
    from wrapguard.roads.streamrelay import run_relay

    return run_relay(
        str(opt("listen")),
        str(opt("forward")),
        str(opt("key_file")),
        opt("tls_cert"),
        opt("tls_key"),
        int(str(opt("max_sessions"))),
        float(str(opt("idle_timeout"))),
    )
