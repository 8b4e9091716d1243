"""The seccomp door's front: the unix socket its helper (csrc/seccomp/helper.c) connects to,
and the hand-over of the helper's seccomp listener fd (docs/seccomp.md).

Every wrapped run listens here (a shimmed program may exec a static or Go one, which
csrc/exec.c hands to the helper), but few runs ever hand a program over. So the door's logic,
the supervisor answering the trapped calls (doors/seccomp.py and its wire format, ~6 ms to
import), is imported at the first hand-over, not at start-up (bench row 5, issue 14).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import struct
from typing import TYPE_CHECKING

from wrapguard import log
from wrapguard.doors.seccomp_sys import SOCKET_NAME, helper_path, pidfd_getfd
from wrapguard.runtime.service import FrontEnd, TunnelService

if TYPE_CHECKING:
    from wrapguard.doors.seccomp import SeccompDoor

ENV_HELPER, ENV_SOCK = "WRAPGUARD_SECCOMP_HELPER", "WRAPGUARD_SECCOMP_SOCK"
HANDOVER_TIMEOUT = 5.0  # seconds for a helper to say its listener's number


class SeccompListener:
    """The running door as the launcher sees it: its helper socket, `ready` once a listener
    was handed over, and the logic (`door`) from the first hand-over on."""

    def __init__(self, service: TunnelService, directory: str) -> None:
        self.service = service
        self.log = log.get("wrapguard.seccomp")
        self.path = os.path.join(directory, SOCKET_NAME)
        self.loop = asyncio.get_running_loop()
        self.frontend = service.add_frontend(FrontEnd("seccomp", address=self.path))
        self.counters: dict[str, int] = {}  # the door's (/state shows them)
        self.listeners = 0  # listener fds received so far
        self.ready = asyncio.Event()  # set by the first one
        self.door: SeccompDoor | None = None
        self._tasks: set[asyncio.Future[None]] = set()
        self._server: socket.socket | None = None

    @property
    def address(self) -> str:
        return self.path

    async def start(self) -> None:
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        try:
            server.bind(self.path)
        except OSError:
            server.close()
            raise
        os.chmod(self.path, 0o600)
        server.listen(64)
        server.setblocking(False)
        self._server = server
        self.loop.add_reader(server.fileno(), self._on_helper)
        self.frontend.extra["counters"] = self.counters

    def helper_argv(self, executable: str, argv: list[str]) -> list[str]:
        helper = helper_path()
        if helper is None:
            raise OSError(errno.ENOENT, "the seccomp helper is missing (reinstall wrapguard)")
        return [helper, self.path, executable, *argv]

    def env(self) -> dict[str, str]:
        """For the preload shim's exec hooks (csrc/exec.c): where to hand a static or Go
        program over."""
        helper = helper_path()
        if helper is None:
            return {}
        return {ENV_HELPER: helper, ENV_SOCK: self.path}

    async def close(self) -> None:
        if self.door is not None:
            await self.door.close()
        if self._server is not None:
            self.loop.remove_reader(self._server.fileno())
            self._server.close()
            self._server = None
            with contextlib.suppress(OSError):
                os.unlink(self.path)

    def _logic(self) -> SeccompDoor:
        if self.door is None:
            from wrapguard.doors.seccomp import SeccompDoor  # at first use (module docstring)

            self.door = SeccompDoor(self.service, self.frontend, self.counters)
        return self.door

    def _on_helper(self) -> None:
        assert self._server is not None
        try:
            conn, _ = self._server.accept()
        except (BlockingIOError, InterruptedError):
            return
        task = asyncio.ensure_future(self._handover(conn))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handover(self, conn: socket.socket) -> None:
        conn.setblocking(False)
        try:
            creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
            pid, uid, _ = struct.unpack("iII", creds)
            if uid != os.geteuid():
                self.log.warning("seccomp helper of another user refused", uid=uid)
                return
            line = b""
            async with asyncio.timeout(HANDOVER_TIMEOUT):
                while not line.endswith(b"\n") and len(line) < 32:
                    chunk = await self.loop.sock_recv(conn, 32 - len(line))
                    if not chunk:
                        return
                    line += chunk
            word, num = line.split()
            if word != b"L":
                return
            listener = pidfd_getfd(pid, int(num))
            try:
                self._logic().supervise(listener, pid)
            except Exception:
                os.close(listener)  # no K: the helper stops, the program never runs
                raise
            self.listeners += 1
            await self.loop.sock_sendall(conn, b"K")
            self.log.debug("seccomp filter on", pid=pid)
            self.ready.set()
        except (OSError, ValueError, TimeoutError) as exc:
            self.log.warning("seccomp helper hand-over failed", error=str(exc))
        except Exception as exc:  # the door's logic failed to load or to start: a bug
            self.log.error("seccomp door failed", error=repr(exc))
        finally:
            conn.close()


async def start(service: TunnelService, directory: str) -> SeccompListener:
    door = SeccompListener(service, directory)
    await door.start()
    return door


__all__ = ["ENV_HELPER", "ENV_SOCK", "SeccompListener", "start"]
