"""What the user asked for on the command line, validated as far as it can be without the
config file, and the command to run. Shared by cli, launch, doctor and self-test (which must
not import each other).
"""

from __future__ import annotations

import ipaddress
import os
import shutil
from dataclasses import dataclass

from wrapguard.errors import WrapguardError
from wrapguard.frontends import ProxySpec

EXIT_SETUP = 1
EXIT_USAGE = 2
EXIT_CANNOT_EXECUTE = 126
EXIT_NOT_FOUND = 127

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class Options:
    """What the user asked for, validated as far as it can be without the config file."""

    config_path: str | None
    exit_node: IPAddress | None
    routes: tuple[tuple[IPNetwork, IPAddress], ...]
    log_level: str
    log_file: str | None
    doctor: str | None  # None: not asked; "": no target given
    self_test: str | None  # None: not asked; "": no target given
    command: tuple[str, ...]
    proxies: tuple[ProxySpec, ...] = ()  # --socks5, --http-proxy
    control: str | None = None  # --control PATH
    intercept: str = "auto"  # --intercept auto|preload|seccomp (docs/seccomp.md)


class CommandNotRunnable(WrapguardError):
    """CMD is missing or not executable; the exit code follows env(1)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def resolve_command(name: str) -> str:
    """Find CMD as execvp would; raise CommandNotRunnable with env(1)'s exit codes."""
    if "/" in name:
        path = name
        if not os.path.exists(path):
            raise CommandNotRunnable(f"{name}: no such file", EXIT_NOT_FOUND)
    else:
        found = shutil.which(name)
        if found is None:
            raise CommandNotRunnable(f"{name}: command not found in PATH", EXIT_NOT_FOUND)
        path = found
    if os.path.isdir(path):
        raise CommandNotRunnable(f"{name}: is a directory", EXIT_CANNOT_EXECUTE)
    if not os.access(path, os.X_OK):
        raise CommandNotRunnable(f"{name}: permission denied (not executable)", EXIT_CANNOT_EXECUTE)
    return path
