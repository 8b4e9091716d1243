"""Logging: structlog JSON lines, one object per line.

Every line is `{"timestamp", "level", "message", ...fields}` (compat.md), written to stderr or
appended to --log-file (then the terminal stays silent). Levels: error, warn, info, debug.
Secrets never reach a log: keys have redacted reprs, and `_scrub` drops any field whose name
says it holds one, as a second line of defence.
"""

from __future__ import annotations

import datetime
import errno
import json
import os
import sys
from collections.abc import MutableMapping
from typing import IO, Any

import structlog

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


def _timestamp(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    now = datetime.datetime.now(datetime.UTC)
    event["timestamp"] = now.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return event


def _level(_: Any, method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    event["level"] = _NAMES.get(method, method)
    return event


def _scrub(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key in list(event):
        if any(s in key.lower() for s in _SECRET_FIELDS):
            event[key] = "<redacted>"
    return event


def _render(_: Any, __: str, event: MutableMapping[str, Any]) -> str:
    message = event.pop("event", "")
    out = {"timestamp": event.pop("timestamp"), "level": event.pop("level"), "message": message}
    out.update(event)
    return json.dumps(out, default=str, ensure_ascii=False)


class _LineWriter:
    """A structlog logger that writes a line and flushes; the stream is chosen at setup."""

    def msg(self, line: str) -> None:
        stream = _stream if _stream is not None else sys.stderr
        try:
            stream.write(line + "\n")
            stream.flush()
        except (OSError, ValueError):
            pass  # a closed terminal must never take the launcher down

    debug = info = warning = warn = error = critical = exception = log = msg


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
    global _stream
    # The log file stays open for the whole run; line buffering keeps it current. It is
    # created 0600: it names peers, endpoints and destinations.
    _stream = None
    if log_file is not None:
        fd = _open_log(log_file)
        _stream = os.fdopen(fd, "a", encoding="utf-8", buffering=1)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            _level,
            _timestamp,
            _scrub,
            _render,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]),
        logger_factory=lambda *_: _LineWriter(),
        cache_logger_on_first_use=False,
    )


def writes_to_file() -> bool:
    """True when --log-file is in use (the terminal gets no log lines)."""
    return _stream is not None


def get(name: str = "wrapguard") -> Any:
    """A bound logger for one part of the launcher (the name is not printed)."""
    return structlog.get_logger(name)
