"""Error types shared by the whole package.

User errors (config, flags, environment) are `WrapguardError` subclasses that carry a
sentence a user understands and, for config problems, the file, line and key. The CLI prints
them as one line and exits with `exit_code`; nothing user-facing ever shows a traceback.
Bad remote input never raises out of a core: codecs raise `DecodeError`, which the cores turn
into a counted drop.
"""

from __future__ import annotations


class WrapguardError(Exception):
    """An error meant for the user: one clear line, exit code 1 (setup error)."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class UsageError(WrapguardError):
    """Bad command line usage (exit code 2)."""

    exit_code = 2


class ConfigError(WrapguardError):
    """A problem in a wg-quick config file, naming the file, the line and the key."""

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        line: int | None = None,
        key: str | None = None,
    ) -> None:
        self.path = path
        self.line = line
        self.key = key
        where = ""
        if path is not None:
            where = path
            if line is not None:
                where += f":{line}"
            where += ": "
        if key is not None:
            message = f"{key}: {message}"
        super().__init__(f"{where}{message}")


class NotBuiltYet(WrapguardError):
    """A documented feature whose implementation has not landed yet (exit code 1)."""


class DecodeError(ValueError):
    """Raised by wire codecs on malformed input; cores turn it into a counted drop."""
