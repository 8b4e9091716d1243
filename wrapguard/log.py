"""Logging: JSON lines, one object per line.

Every line is `{"timestamp", "level", "message", ...fields}` (compat.md), written to stderr or
appended to --log-file (then the terminal stays silent). Levels: error, warn, info, debug.
Secrets never reach a log: keys have redacted reprs, and `_line` redacts any field whose name
says it holds one, as a second line of defence. `get(name)` gives a logger with structlog's
call shape (`log.info("message", key=value)`); this module is the whole pipeline (level
filter, timestamp, redaction, JSON, write) and imports no logging library: structlog's
import was ~12 ms of every `wrapguard -- CMD` (issue 14). `capture()` is for tests.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import os
import sys
from collections.abc import Iterator
from typing import IO, Any

LEVELS = {"error": 40, "warn": 30, "info": 20, "debug": 10}
_NAMES = {
    "error": "error",
    "warning": "warn",
    "warn": "warn",
    "info": "info",
    "debug": "debug",
    "critical": "error",
    "exception": "error",
}
_SECRET_FIELDS = ("private_key", "preshared_key", "secret", "psk", "token")

_stream: IO[str] | None = None
_threshold = LEVELS["info"]
_captured: list[dict[str, Any]] | None = None  # capture(): the events, not rendered


def _line(method: str, message: str, fields: dict[str, Any]) -> str:
    """The JSON line of one event: timestamp, level, message, then the fields (scrubbed)."""
    import json  # at the first line written: a quiet run writes none (start-up, ~1 ms)

    now = datetime.datetime.now(datetime.UTC)
    out: dict[str, Any] = {
        "timestamp": now.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "level": _NAMES.get(method, method),
        "message": message,
    }
    for key, value in fields.items():
        out[key] = "<redacted>" if any(s in key.lower() for s in _SECRET_FIELDS) else value
    return json.dumps(out, default=str, ensure_ascii=False)


def _write(line: str) -> None:
    """One line to the log file or stderr, flushed."""
    stream = _stream if _stream is not None else sys.stderr
    try:
        stream.write(line + "\n")
        stream.flush()
    except (OSError, ValueError):
        pass  # a closed terminal must never take the launcher down


_METHOD_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}


class Logger:
    """What `get()` returns: `debug/info/warning/error(message, **fields)`; a line is written
    when the level is at or above setup()'s (checked at each call, so a logger may be made
    at import time, before setup())."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name  # not printed

    def _log(self, method: str, message: str, fields: dict[str, Any]) -> None:
        if _captured is not None:
            _captured.append({**fields, "event": message, "log_level": _NAMES[method]})
            return
        if _METHOD_LEVELS[method] >= _threshold:
            _write(_line(method, message, fields))

    def debug(self, message: str, **fields: Any) -> None:
        self._log("debug", message, fields)

    def info(self, message: str, **fields: Any) -> None:
        self._log("info", message, fields)

    def warning(self, message: str, **fields: Any) -> None:
        self._log("warning", message, fields)

    warn = warning

    def error(self, message: str, **fields: Any) -> None:
        self._log("error", message, fields)

    critical = exception = error


def _open_log(path: str) -> int:
    """Open the log for appending (0600 if new). A symlink is followed only when it belongs
    to us or to root: one planted by another user (in /tmp, say) must not make us append to
    a file of its choosing."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
    try:
        return os.open(path, flags | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
    owner = os.lstat(path).st_uid
    if owner not in (os.geteuid(), 0):
        raise OSError(errno.EPERM, "it is a symlink owned by another user")
    return os.open(path, flags, 0o600)


def setup(level: str = "info", log_file: str | None = None) -> None:
    """Configure logging once, at startup. Raises OSError if the log file cannot be opened."""
    global _stream, _threshold
    # The log file stays open for the whole run; line buffering keeps it current. It is
    # created 0600: it names peers, endpoints and destinations.
    _stream = None
    if log_file is not None:
        fd = _open_log(log_file)
        _stream = os.fdopen(fd, "a", encoding="utf-8", buffering=1)
    _threshold = LEVELS[level]


def writes_to_file() -> bool:
    """True when --log-file is in use (the terminal gets no log lines)."""
    return _stream is not None


def get(name: str = "wrapguard") -> Logger:
    """A logger for one part of the launcher (the name is not printed)."""
    return Logger(name)


@contextlib.contextmanager
def capture() -> Iterator[list[dict[str, Any]]]:
    """For tests: every event of every level while inside, as dicts (`event` is the message,
    `log_level` the level, then the fields), instead of lines."""
    global _captured
    saved, _captured = _captured, []
    try:
        yield _captured
    finally:
        _captured = saved
