"""HTTP/1.1 for one control-socket connection: h11, no I/O (server.py has the layers).

Bytes in, bytes out: keep-alive, pipelining, a bounded head and body, 400/413/431/505 for
anything malformed, never an exception. A module of its own so that h11 is imported at the
first connection to the control socket, not at every start.
"""

from __future__ import annotations

import contextlib
import http
from collections.abc import Callable, Iterable

import h11

from wrapguard import log
from wrapguard.control.api import Reply, error_reply
from wrapguard.control.server import MAX_BODY, MAX_HEAD, ControlStats

_REASONS = {s.value: s.phrase for s in http.HTTPStatus}


class HttpConn:
    """Bytes from the client in (`receive`, b"" at end of file), bytes to send back out.
    `closing` once the connection must end (after the bytes returned are sent)."""

    def __init__(
        self,
        handler: Callable[[str, str, bytes], Reply],
        stats: ControlStats,
        *,
        max_body: int = MAX_BODY,
    ) -> None:
        self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        self._handler = handler
        self._stats = stats
        self._max_body = max_body
        self._method = ""
        self._target = ""
        self._body = bytearray()
        self._out: list[bytes] = []
        self.closing = False

    def receive(self, data: bytes) -> bytes:
        if not self.closing:
            try:
                self._h11.receive_data(data)
            except RuntimeError:  # data after end of file: nothing more to read
                self.closing = True
            else:
                self._pump()
        out = b"".join(self._out)
        self._out.clear()
        return out

    def _pump(self) -> None:
        conn = self._h11
        while not self.closing:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                self._fail(exc.error_status_hint, f"malformed request: {exc}")
                return
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            if isinstance(event, h11.Request):
                self._method = event.method.decode("ascii", "replace").upper()
                self._target = event.target.decode("ascii", "replace")
                self._body.clear()
                if event.http_version not in (b"1.0", b"1.1"):  # RFC 9110 15.6.6
                    self._fail(505, f"HTTP/{event.http_version.decode()} is not supported")
                    return
                length = _content_length(event.headers)
                if length is not None and length > self._max_body:
                    self._fail(413, f"request body over {self._max_body} bytes")
                    return
                if conn.they_are_waiting_for_100_continue:
                    self._send(h11.InformationalResponse(status_code=100, headers=[]))
            elif isinstance(event, h11.Data):
                self._body += event.data
                if len(self._body) > self._max_body:
                    self._fail(413, f"request body over {self._max_body} bytes")
                    return
            elif isinstance(event, h11.EndOfMessage):
                try:
                    reply = self._handler(self._method, self._target, bytes(self._body))
                except Exception as exc:  # a bug of ours: a 500, never a dead server
                    log.get("wrapguard.control").warning(
                        "control request failed", error=f"{type(exc).__name__}: {exc}"
                    )
                    reply = error_reply(500, f"internal error: {type(exc).__name__}")
                self._respond(reply)
                if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                    conn.start_next_cycle()
                else:
                    self.closing = True
            elif isinstance(event, h11.ConnectionClosed):
                self.closing = True

    def _send(self, event: h11.Event) -> None:
        data = self._h11.send(event)
        if data:
            self._out.append(data)

    def _respond(self, reply: Reply, close: bool = False) -> None:
        headers = [
            ("content-type", reply.content_type),
            ("content-length", str(len(reply.body))),
            *reply.headers,
        ]
        if close:
            headers.append(("connection", "close"))
        try:
            reason = _REASONS.get(reply.status, "")
            self._send(h11.Response(status_code=reply.status, headers=headers, reason=reason))
            if self._method != "HEAD" and reply.body:
                self._send(h11.Data(data=reply.body))
            self._send(h11.EndOfMessage())
        except h11.LocalProtocolError:
            self.closing = True

    def _fail(self, status: int, message: str) -> None:
        """A 4xx for a request we will not read further, then close (RFC 9112 9.6)."""
        self._stats.bad_request += 1
        if self._h11.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            self._respond(error_reply(status, message), close=True)
        self.closing = True


def _content_length(headers: Iterable[tuple[bytes, bytes]]) -> int | None:
    for name, value in headers:
        if name == b"content-length":
            with contextlib.suppress(ValueError):
                return int(value)
    return None


__all__ = ["HttpConn"]
