"""Framing of WireGuard datagrams inside long-lived HTTP bodies (the stream road), sans-IO.

A stream (the body of the download response or of the upload request; HTTP chunking is the
HTTP library's business) is the 4-byte magic `WGs1`, then frames: a 2-byte big-endian length
and that many bytes of one datagram, unchanged. A zero length is a keepalive (sent while idle so
that proxies do not time the stream out) and carries nothing. A sender writes the frames of one
batch in one write, so a proxy that flushes per chunk passes the batch on at once.

`StreamDecoder.feed(data)` is incremental (any split of the bytes gives the same datagrams)
and bounded: it holds at most one incomplete frame, never more than `max_datagram + 2` bytes.
Anything that is not such a stream (an HTML error page, a wrong length) raises `StreamError`
with a message that says what came instead.
"""

from __future__ import annotations

from collections.abc import Iterable

from wrapguard.errors import DecodeError

MAGIC = b"WGs1"
HEADER = 2
MAX_DATAGRAM = 0xFFFF  # what a 2-byte length can say (and more than any UDP payload we use)
KEEPALIVE = b"\x00\x00"


class StreamError(DecodeError):
    """The bytes are not a wrapguard datagram stream (or break its limits)."""


def encode(datagrams: Iterable[bytes | bytearray | memoryview]) -> bytes:
    """The frames for a batch of datagrams, ready for one write (one HTTP chunk)."""
    parts: list[bytes | bytearray | memoryview] = []
    for d in datagrams:
        n = len(d)
        if not 0 < n <= MAX_DATAGRAM:
            raise ValueError(f"a datagram of {n} bytes cannot be framed (1-{MAX_DATAGRAM})")
        parts.append(n.to_bytes(2, "big"))
        parts.append(d)
    return b"".join(parts)


def start(datagrams: Iterable[bytes | bytearray | memoryview] = ()) -> bytes:
    """The first bytes of a stream: the magic, then any datagrams already waiting."""
    return MAGIC + encode(datagrams)


def _show(data: bytes) -> str:
    text = bytes(data[:24])
    return repr(text) + ("..." if len(data) > 24 else "")


class StreamDecoder:
    """Splits a stream's bytes back into datagrams; see the module docstring."""

    __slots__ = ("_buf", "_magic_seen", "bytes_in", "datagrams", "keepalives", "max_datagram")

    def __init__(self, max_datagram: int = MAX_DATAGRAM) -> None:
        if not 0 < max_datagram <= MAX_DATAGRAM:
            raise ValueError(f"max_datagram must be 1-{MAX_DATAGRAM}, not {max_datagram}")
        self.max_datagram = max_datagram
        self._buf = bytearray()
        self._magic_seen = False
        self.keepalives = 0
        self.datagrams = 0
        self.bytes_in = 0

    @property
    def pending(self) -> int:
        """Bytes held for an incomplete frame (or the magic), at most max_datagram + 2."""
        return len(self._buf)

    @property
    def started(self) -> bool:
        return self._magic_seen

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """The complete datagrams that `data` finishes, in order. Raises StreamError."""
        self.bytes_in += len(data)
        buf = self._buf
        buf += data
        if not self._magic_seen:
            if len(buf) < len(MAGIC):
                if MAGIC.startswith(bytes(buf)):
                    return []
                raise StreamError(f"not a wrapguard stream: it starts with {_show(bytes(buf))}")
            if buf[: len(MAGIC)] != MAGIC:
                raise StreamError(f"not a wrapguard stream: it starts with {_show(bytes(buf))}")
            del buf[: len(MAGIC)]
            self._magic_seen = True
        out: list[bytes] = []
        pos, end = 0, len(buf)
        limit = self.max_datagram
        while end - pos >= HEADER:
            n = (buf[pos] << 8) | buf[pos + 1]
            if n == 0:
                self.keepalives += 1
                pos += HEADER
                continue
            if n > limit:
                raise StreamError(
                    f"a frame of {n} bytes is larger than the limit of {limit} bytes "
                    f"(garbage in the stream? next bytes {_show(bytes(buf[pos : pos + 24]))})"
                )
            if end - pos - HEADER < n:
                break
            out.append(bytes(buf[pos + HEADER : pos + HEADER + n]))
            pos += HEADER + n
        if pos:
            del buf[:pos]
        self.datagrams += len(out)
        return out

    def at_end(self) -> None:
        """The stream ended: raises StreamError if it stopped inside a frame or the magic."""
        if not self._magic_seen:
            raise StreamError(
                "the stream ended before it began (no wrapguard magic"
                + (f"; got {_show(bytes(self._buf))})" if self._buf else ")")
            )
        if self._buf:
            raise StreamError(f"the stream ended inside a frame ({len(self._buf)} bytes held)")


__all__ = [
    "HEADER",
    "KEEPALIVE",
    "MAGIC",
    "MAX_DATAGRAM",
    "StreamDecoder",
    "StreamError",
    "encode",
    "start",
]
