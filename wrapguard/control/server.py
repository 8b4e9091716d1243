"""The control socket: HTTP/1.1 over a unix stream socket (compat.md, "Control socket").

Three layers, as h11's own examples: `Api` answers one request (method, path, body) from the
service and does no I/O; `HttpConn` (httpconn.py, imported at the first connection: h11 is
not needed to start) runs h11 for one connection (bytes in, bytes out: keep-alive, pipelining,
a bounded head and body, 400/413/431 for anything malformed, never an exception); `start()` is
the asyncio glue: a 0600 socket in a directory no one else can write,
the SO_PEERCRED check on every accept (our euid or root, unix(7)), an idle timeout. Endpoints:
GET /state, GET|POST|DELETE /bypass, GET /metrics (Prometheus text format 0.0.4); every error
is a JSON `{"error": ...}` with a 4xx (docs/control.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import stat
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from wrapguard import log
from wrapguard.control.paths import SUN_PATH_MAX, check_parent
from wrapguard.errors import UsageError, WrapguardError
from wrapguard.runtime.bypass import parse_entry

if TYPE_CHECKING:
    from wrapguard.runtime.service import TunnelService

MAX_HEAD = 16 * 1024  # request line + headers (h11 answers 431 beyond it)
MAX_BODY = 256 * 1024  # a full bypass list (4096 IPv6 CIDRs as JSON) fits
READ_SIZE = 64 * 1024
IDLE_TIMEOUT = 30.0  # s without a byte from the client: the connection is closed
MAX_CONNECTIONS = 64  # more at once are closed on accept (each holds a small buffer)
BACKLOG = 16
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid (unix(7) SO_PEERCRED)

JSON = "application/json"
PROMETHEUS = "text/plain; version=0.0.4; charset=utf-8"


@dataclass(frozen=True, slots=True)
class Reply:
    """One HTTP response: status, body and its type, extra headers."""

    status: int
    body: bytes
    content_type: str = JSON
    headers: tuple[tuple[str, str], ...] = ()


def json_reply(status: int, value: object) -> Reply:
    text = json.dumps(value, indent=2, default=str, ensure_ascii=False) + "\n"
    return Reply(status, text.encode(), JSON)


def error_reply(status: int, message: str, **fields: object) -> Reply:
    return json_reply(status, {"error": message, **fields})


@dataclass(slots=True)
class ControlStats:
    """Requests served, and what was refused (in /metrics as drops of layer "control")."""

    requests: int = 0
    other_uid: int = 0  # a connection from another uid, closed on accept
    bad_request: int = 0  # malformed HTTP (400/413/431)
    too_many: int = 0  # over MAX_CONNECTIONS at once


# -- the endpoints (no I/O) ------------------------------------------------------------------

ROUTES: dict[str, tuple[str, ...]] = {
    "/state": ("GET", "HEAD"),
    "/bypass": ("GET", "HEAD", "POST", "DELETE"),
    "/metrics": ("GET", "HEAD"),
}


class Api:
    """One request in, one `Reply` out, straight from the service."""

    def __init__(self, service: TunnelService, stats: ControlStats) -> None:
        self.service = service
        self.stats = stats
        self.log = log.get("wrapguard.control")

    def handle(self, method: str, target: str, body: bytes) -> Reply:
        path = urlsplit(target).path or "/"  # origin form, or absolute form (RFC 9112 3.2)
        if len(path) > 1:
            path = path.rstrip("/")
        allowed = ROUTES.get(path)
        if allowed is None:
            return error_reply(404, f"no such endpoint: {path}", endpoints=sorted(ROUTES))
        if method not in allowed:
            reply = error_reply(405, f"{method} is not allowed on {path}", allowed=allowed)
            return Reply(reply.status, reply.body, JSON, (("allow", ", ".join(allowed)),))
        self.stats.requests += 1
        if path == "/state":
            return json_reply(200, self.service.state())
        if path == "/metrics":
            text = render_metrics(self.service.state(), self.stats)
            return Reply(200, text.encode(), PROMETHEUS)
        bypass = self.service.bypass
        if method == "POST":
            return self._add_bypass(body)
        if method == "DELETE":
            n = bypass.clear()
            if n:
                self.log.info("bypass list cleared", removed=n)
            return json_reply(200, bypass.entries())
        return json_reply(200, bypass.entries())

    def _add_bypass(self, body: bytes) -> Reply:
        want = 'a JSON list of IP addresses or CIDRs, e.g. ["10.150.0.0/24"]'
        if not body.strip():
            return error_reply(400, f"empty body: expected {want}")
        try:
            value = json.loads(body)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError
            return error_reply(400, f"body is not JSON ({exc}): expected {want}")
        if isinstance(value, dict) and set(value) == {"add"}:
            value = value["add"]
        if not isinstance(value, list):
            return error_reply(400, f'expected {want} (or {{"add": [...]}})')
        for entry in value:  # all or nothing: name the first bad one, add none
            try:
                parse_entry(entry)
            except UsageError as exc:
                return error_reply(400, str(exc), entry=entry)
        try:
            added = self.service.bypass.add(value)
        except UsageError as exc:
            return error_reply(400, str(exc))
        if added:
            self.log.info("bypass list: entries added", added=[str(n) for n in added])
        return json_reply(200, self.service.bypass.entries())


# -- Prometheus text exposition format 0.0.4 ---------------------------------------------------

# Counters of `session.stats()` that count work done, not something dropped; every other
# counter in a group is a drop reason (so a new drop counter shows up without a change here).
NOT_DROPS = frozenset(
    {"requests", "to_tunnel", "from_tunnel", "errors_sent", "tx_datagrams", "rx_datagrams",
     "delivered", "rx_packets", "tx_packets", "rx_bytes", "tx_bytes"}
)  # fmt: skip


@dataclass
class _Family:
    """One metric family of the Prometheus text format: samples with their labels."""

    name: str
    kind: str  # "counter" or "gauge"
    help: str
    samples: list[tuple[dict[str, str], float]] = field(default_factory=list)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, int) or float(value).is_integer():
        return str(int(value))
    return repr(float(value))


def _drops(counters: dict[str, Any], stats: ControlStats) -> tuple[_Family, _Family]:
    drops = _Family(
        "wrapguard_drops_total", "counter", "Packets, requests or datagrams dropped, by reason."
    )
    events = _Family(
        "wrapguard_events_total", "counter", "Work done by each layer (requests, datagrams)."
    )
    for group, value in counters.items():
        if isinstance(value, bool):
            continue
        if isinstance(value, int | float):  # the engine's own, e.g. "unrouted_drops": 3
            reason = group.removesuffix("_drops")
            drops.samples.append(({"layer": "engine", "reason": reason}, value))
        elif isinstance(value, dict):
            layer = group.removesuffix("_drops")
            for name, n in value.items():
                if not isinstance(n, int | float) or isinstance(n, bool):
                    continue
                if name in NOT_DROPS and not group.endswith("_drops"):
                    events.samples.append(({"layer": layer, "event": str(name)}, n))
                else:
                    drops.samples.append(({"layer": layer, "reason": str(name).lower()}, n))
    for reason in ("other_uid", "bad_request", "too_many"):
        drops.samples.append(({"layer": "control", "reason": reason}, getattr(stats, reason)))
    events.samples.append(({"layer": "control", "event": "requests"}, stats.requests))
    return drops, events


def render_metrics(state: dict[str, Any], stats: ControlStats) -> str:
    """The state as Prometheus text (exposition format 0.0.4): # HELP, # TYPE, samples."""
    rx = _Family("wrapguard_peer_rx_bytes", "counter", "Bytes received from the peer.")
    tx = _Family("wrapguard_peer_tx_bytes", "counter", "Bytes sent to the peer.")
    hs = _Family(
        "wrapguard_peer_latest_handshake_seconds",
        "gauge",
        "Unix time of the latest handshake with the peer (0: none yet).",
    )
    for peer in state.get("peers", []):
        labels = {"peer": str(peer.get("public_key", ""))}
        rx.samples.append((labels, peer.get("rx_bytes") or 0))
        tx.samples.append((labels, peer.get("tx_bytes") or 0))
        hs.samples.append((labels, peer.get("latest_handshake") or 0))
    flows = _Family("wrapguard_flows", "gauge", "Flows open now, by protocol.")
    for proto in ("tcp", "udp"):
        flows.samples.append(({"proto": proto}, state.get("flows", {}).get(proto, 0)))
    frontends = _Family(
        "wrapguard_frontend_flows_total", "counter", "Flows opened through each front-end kind."
    )
    by_kind: dict[str, int] = {}
    for f in state.get("frontends", []):
        kind = str(f.get("kind", ""))
        by_kind[kind] = by_kind.get(kind, 0) + int(f.get("flows", 0) or 0)
    frontends.samples += [({"kind": k}, n) for k, n in by_kind.items()]
    bypass = _Family("wrapguard_bypass_entries", "gauge", "Entries in the bypass list.")
    bypass.samples.append(({}, len(state.get("bypass", []))))
    uptime = _Family("wrapguard_uptime_seconds", "gauge", "Seconds since the tunnel started.")
    uptime.samples.append(({}, state.get("uptime_s", 0) or 0))
    drops, events = _drops(state.get("counters", {}) or {}, stats)
    lines: list[str] = []
    for fam in (rx, tx, hs, flows, frontends, drops, events, bypass, uptime):
        lines += [f"# HELP {fam.name} {fam.help}", f"# TYPE {fam.name} {fam.kind}"]
        for labels, value in fam.samples:
            inner = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
            name = f"{fam.name}{{{inner}}}" if inner else fam.name
            lines.append(f"{name} {_number(value)}")
    return "\n".join(lines) + "\n"


# -- the asyncio glue ------------------------------------------------------------------------


def _peer_uid(sock: Any) -> int | None:
    try:
        _, uid, _ = _PEERCRED.unpack(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
        )
    except (OSError, struct.error):
        return None
    return int(uid)


def _clear_stale(path: str) -> None:
    """A socket file of ours that nothing answers on is left from a run that died: remove it.
    Anything else at `path` is refused (another wrapguard, another user's file, not a socket)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise WrapguardError(f"control socket {path}: {exc.strerror}") from None
    if not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.geteuid():
        what = "not a socket" if not stat.S_ISSOCK(st.st_mode) else f"owned by uid {st.st_uid}"
        raise WrapguardError(f"control socket {path} exists and is {what}: not removing it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    except OSError:
        pass  # busy or timed out: someone is there
    finally:
        probe.close()
    raise WrapguardError(
        f"control socket {path} is in use by another wrapguard (pass another --control PATH)"
    )


class ControlServer:
    """The running control socket (a `wrapguard.doors.Door`)."""

    def __init__(self, service: TunnelService, path: str, idle_timeout: float) -> None:
        self.service = service
        self.path = path
        self.idle_timeout = idle_timeout
        self.stats = ControlStats()
        self.api = Api(service, self.stats)
        self._server: asyncio.AbstractServer | None = None
        self._inode: tuple[int, int] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._warned_uid = False
        self.log = log.get("wrapguard.control")

    @property
    def address(self) -> str:
        return self.path

    def __repr__(self) -> str:
        return f"ControlServer({self.path!r})"

    async def _listen(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(self.path)
            st = os.lstat(self.path)
            self._inode = (st.st_dev, st.st_ino)
            # 0600 before listen(): until then every connect() is refused, so the umask's
            # mode never lets anyone in (and SO_PEERCRED checks each connection anyway).
            os.chmod(self.path, 0o600)
            sock.listen(BACKLOG)
            sock.setblocking(False)
            self._server = await asyncio.start_unix_server(self._on_client, sock=sock)
        except OSError as exc:
            sock.close()
            self._unlink()
            raise WrapguardError(
                f"cannot serve the control socket {self.path}: {exc.strerror or exc}"
            ) from None

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        uid = _peer_uid(writer.get_extra_info("socket"))
        if uid is None or uid not in (os.geteuid(), 0):
            self.stats.other_uid += 1
            if not self._warned_uid:  # once: another user must not be able to fill our log
                self._warned_uid = True
                self.log.warning("control socket: connection from another uid closed", uid=uid)
            writer.transport.abort()
            return
        if len(self._tasks) >= MAX_CONNECTIONS:
            self.stats.too_many += 1
            writer.transport.abort()
            return
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._serve(reader, writer)
        except (ConnectionError, OSError, asyncio.CancelledError):
            pass
        finally:
            self._tasks.discard(task)
            writer.transport.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        from wrapguard.control.httpconn import HttpConn

        conn = HttpConn(self.api.handle, self.stats)
        while not conn.closing:
            try:
                async with asyncio.timeout(self.idle_timeout):  # silent, or never reading
                    data = await reader.read(READ_SIZE)
                    out = conn.receive(data)
                    if out:
                        writer.write(out)
                        await writer.drain()
            except TimeoutError:
                return
            if not data:
                return

    def _unlink(self) -> None:
        """Remove the socket file if it is still ours (not one a later run put there)."""
        with contextlib.suppress(OSError):
            st = os.lstat(self.path)
            if self._inode == (st.st_dev, st.st_ino):
                os.unlink(self.path)

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._unlink()
        self._inode = None


async def start(
    service: TunnelService, path: str, *, idle_timeout: float = IDLE_TIMEOUT
) -> ControlServer:
    """Serve the control socket at `path` until `await door.close()` (which removes it)."""
    path = os.path.abspath(path)
    if len(os.fsencode(path)) > SUN_PATH_MAX:
        raise WrapguardError(
            f"control socket path {path} is longer than a unix socket allows "
            f"({SUN_PATH_MAX} bytes): pass a shorter --control PATH"
        )
    check_parent(os.path.dirname(path))
    _clear_stale(path)
    door = ControlServer(service, path, idle_timeout)
    await door._listen()
    door.log.debug("control socket up", path=path)
    return door


__all__ = ["Api", "ControlServer", "Reply", "render_metrics", "start"]
