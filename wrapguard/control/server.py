"""The control socket: HTTP/1.1 over a unix stream socket (compat.md, "Control socket").

Three layers, as h11's own examples: `Api` (api.py) answers one request (method, path, body)
from the service and does no I/O; `HttpConn` (httpconn.py) runs h11 for one connection (bytes
in, bytes out: keep-alive, pipelining, a bounded head and body, 400/413/431 for anything
malformed, never an exception); both are imported at the first connection (neither h11 nor
the endpoints are needed to start). `start()` is the asyncio glue: a 0600 socket in a
directory no one else can write, the SO_PEERCRED check on every accept (our euid or root,
unix(7)), an idle timeout. Endpoints: GET /state, GET|POST|DELETE /bypass, GET /metrics
(Prometheus text format 0.0.4); every error is a JSON `{"error": ...}` with a 4xx
(docs/control.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import stat
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from wrapguard import log
from wrapguard.control.paths import SUN_PATH_MAX, check_parent
from wrapguard.errors import WrapguardError

if TYPE_CHECKING:
    from wrapguard.control.api import Api
    from wrapguard.runtime.service import TunnelService

MAX_HEAD = 16 * 1024  # request line + headers (h11 answers 431 beyond it)
MAX_BODY = 256 * 1024  # a full bypass list (4096 IPv6 CIDRs as JSON) fits
READ_SIZE = 64 * 1024
IDLE_TIMEOUT = 30.0  # s without a byte from the client: the connection is closed
MAX_CONNECTIONS = 64  # more at once are closed on accept (each holds a small buffer)
BACKLOG = 16
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid (unix(7) SO_PEERCRED)


@dataclass(slots=True)
class ControlStats:
    """Requests served, and what was refused (in /metrics as drops of layer "control")."""

    requests: int = 0
    other_uid: int = 0  # a connection from another uid, closed on accept
    bad_request: int = 0  # malformed HTTP (400/413/431)
    too_many: int = 0  # over MAX_CONNECTIONS at once


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
        self.api: Api | None = None  # made at the first connection (api.py)
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
        from wrapguard.control.api import Api
        from wrapguard.control.httpconn import HttpConn

        if self.api is None:
            self.api = Api(self.service, self.stats)
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


__all__ = ["ControlServer", "ControlStats", "start"]
