"""Click options that several commands share (the wrap/daemon command line, `wrapguard up`,
`wrapguard relay`): routing flags and logging flags, each written once."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import TypeVar

import click

from wrapguard.errors import UsageError
from wrapguard.options import IPAddress, IPNetwork

F = TypeVar("F", bound=Callable[..., object])
LOG_LEVELS = ["error", "warn", "info", "debug"]


def parse_exit_node(
    _ctx: click.Context, _param: click.Parameter, value: str | None
) -> IPAddress | None:
    if value is None:
        return None
    try:
        return ipaddress.ip_address(value.strip())
    except ValueError:
        raise click.BadParameter(
            f"{value!r} is not an IP address", param_hint="--exit-node"
        ) from None


def parse_routes(
    _ctx: click.Context, _param: click.Parameter, values: tuple[str, ...]
) -> tuple[tuple[IPNetwork, IPAddress], ...]:
    from wrapguard.config import parse_route_flag

    out = []
    for text in values:
        try:
            out.append(parse_route_flag(text))
        except UsageError as exc:
            raise click.BadParameter(str(exc), param_hint="--route") from None
    return tuple(out)


def routing_options(route_help: str) -> Callable[[F], F]:
    """--exit-node IP and --route CIDR:PEER_IP (repeatable)."""

    def add(f: F) -> F:
        f = click.option(
            "--route",
            "routes",
            metavar="CIDR:PEER_IP",
            multiple=True,
            callback=parse_routes,
            help=route_help,
        )(f)
        return click.option(
            "--exit-node",
            metavar="IP",
            callback=parse_exit_node,
            help="Send all traffic (0.0.0.0/0 and ::/0) through the peer that owns this tunnel IP.",
        )(f)

    return add


def log_options(f: F) -> F:
    """--log-level L and --log-file FILE."""
    f = click.option(
        "--log-file", metavar="FILE", help="Append JSON log lines here instead of stderr."
    )(f)
    return click.option(
        "--log-level",
        type=click.Choice(LOG_LEVELS, case_sensitive=False),
        default="info",
        show_default=True,
        help="Log verbosity.",
    )(f)


__all__ = ["log_options", "parse_exit_node", "parse_routes", "routing_options"]
