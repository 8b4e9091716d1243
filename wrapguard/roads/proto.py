"""What the stream road's two ends agree on (docs/streams.md has the whole exchange).

A client session is two long-lived HTTP/1.1 requests to the same URL, both carrying the API key
and one session id the client picked:

    GET  /path   Authorization: Bearer KEY   X-Wrapguard-Session: 32 hex digits
         -> 200, a chunked body: datagrams from the WireGuard server (wire/stream.py framing)
    PUT  /path   (or POST) the same headers, a chunked body: datagrams to the WireGuard server
         -> 200 when the upload ends

A wrong or missing key is 401 (nothing forwarded), a full relay 503, a malformed request 400.
The key travels as a bearer token in Authorization (RFC 6750) because reverse proxies treat
that header as a credential: Caddy, for one, redacts it from its logs.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Sequence

from wrapguard.errors import WrapguardError

KEY_HEADER = b"authorization"
BEARER = b"bearer "
SESSION_HEADER = b"x-wrapguard-session"
SESSION_RE = re.compile(rb"[0-9a-f]{32}\Z")
CONTENT_TYPE = b"application/octet-stream"
KEEPALIVE_EVERY = 15.0  # seconds between keepalive frames on an idle stream (proxy timeouts)
MAX_KEY_LEN = 512
# It goes into an HTTP header and a config line ('#' starts a comment there): base64/hex/URL-safe.
_KEY_RE = re.compile(r"[A-Za-z0-9._~+/=-]+\Z")


def check_key(text: str) -> str | None:
    """Why `text` cannot be an API key, or None when it can."""
    if not text:
        return "is empty"
    if len(text) > MAX_KEY_LEN:
        return f"is longer than {MAX_KEY_LEN} characters"
    if not _KEY_RE.match(text):
        return "may hold only letters, digits and . _ ~ + / = - (e.g. base64 or hex)"
    return None


def read_key_file(path: str, *, many: bool) -> list[str]:
    """The keys in a key file: one a line, blank lines and '#' comments skipped.

    Raises WrapguardError naming the file (and line) for anything wrong."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(1 << 20)
    except FileNotFoundError:
        raise WrapguardError(f"{path}: no such key file") from None
    except IsADirectoryError:
        raise WrapguardError(f"{path}: is a directory, not a key file") from None
    except UnicodeDecodeError:
        raise WrapguardError(f"{path}: is not UTF-8 text") from None
    except OSError as exc:
        raise WrapguardError(f"{path}: cannot read it: {exc.strerror or exc}") from None
    keys: list[str] = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        why = check_key(line)
        if why is not None:
            raise WrapguardError(f"{path}:{lineno}: the key {why}")
        keys.append(line)
    if not keys:
        raise WrapguardError(f"{path}: holds no key (one API key a line)")
    if not many and len(keys) > 1:
        raise WrapguardError(f"{path}: holds {len(keys)} keys; a client uses exactly one")
    return keys


def key_matches(given: bytes, keys: Sequence[bytes]) -> int | None:
    """The index of the key `given` equals, comparing in constant time against every key (so
    the time says nothing about which key or how much of it matched), or None."""
    found: int | None = None
    for i, k in enumerate(keys):
        if hmac.compare_digest(given, k) and found is None:
            found = i
    return found


def bearer(value: bytes | None) -> bytes | None:
    """The token of an `Authorization: Bearer TOKEN` value, or None."""
    if value is None or value[: len(BEARER)].lower() != BEARER:
        return None
    return value[len(BEARER) :].strip()


def header(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """The value of the one header `name` (lower case), None if absent or repeated."""
    values = [v for k, v in headers if k == name]
    return values[0] if len(values) == 1 else None


__all__ = [
    "BEARER",
    "CONTENT_TYPE",
    "KEEPALIVE_EVERY",
    "KEY_HEADER",
    "SESSION_HEADER",
    "SESSION_RE",
    "bearer",
    "check_key",
    "header",
    "key_matches",
    "read_key_file",
]
