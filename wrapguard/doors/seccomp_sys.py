"""The seccomp door's access to the programs it serves (docs/seccomp.md): where the helper
is, whether this kernel can run it (and a real probe for --doctor), borrowing a program's
fd (pidfd_getfd), reading and writing its memory (/proc/PID/mem), and the kernel's socket
tables. Only the door (doors/seccomp.py) and --doctor use it.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket

HELPER_NAME = "_seccomp_helper"
SOCKET_NAME = "seccomp.sock"
SYS_PIDFD_GETFD = 438  # the same number on x86_64 and aarch64 (the unified table)
SOL_SOCKET, SO_TYPE, SO_PROTOCOL = 1, 3, 38
TCP, UDP = 6, 17

NR: dict[str, int] = (
    {
        "connect": 42, "getpeername": 52, "getsockname": 51, "getsockopt": 55,
        "bind": 49, "listen": 50, "accept": 43, "accept4": 288, "sendto": 44, "recvfrom": 45,
        "sendmsg": 46, "sendmmsg": 307,
    }
    if os.uname().machine == "x86_64"
    else {
        "connect": 203, "getpeername": 205, "getsockname": 204, "getsockopt": 209,
        "bind": 200, "listen": 201, "accept": 202, "accept4": 242, "sendto": 206, "recvfrom": 207,
        "sendmsg": 211, "sendmmsg": 269,
    }
)  # fmt: skip

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def helper_path() -> str | None:
    """The helper built at install next to the package (setup.py), if it is there."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), HELPER_NAME)
    return path if os.access(path, os.X_OK) else None


def supported() -> str | None:
    """None if this kernel offers seccomp user notification to us, else why not."""
    try:
        with open("/proc/self/status") as f:
            if not any(line.startswith("Seccomp:") for line in f):
                return "this kernel has no seccomp (CONFIG_SECCOMP)"
    except OSError as exc:
        return f"cannot read /proc/self/status: {exc.strerror}"
    release = os.uname().release.split(".")
    try:
        major, minor = int(release[0]), int(release[1].split("-")[0])
    except (ValueError, IndexError):
        return None
    if (major, minor) < (5, 9):
        return f"Linux {major}.{minor} has no seccomp user notification with pidfd_getfd (5.9+)"
    return None


def probe(timeout: float = 5.0) -> str | None:
    """Run the helper for real (filter on, listener taken, `true` exec'ed): None if it all
    worked, else what failed (for --doctor)."""
    import subprocess
    import tempfile

    helper = helper_path()
    if helper is None:
        return "the seccomp helper is missing"
    true = "/bin/true" if os.path.exists("/bin/true") else "/usr/bin/true"
    with tempfile.TemporaryDirectory(prefix="wrapguard-seccomp-") as d:
        path = os.path.join(d, SOCKET_NAME)
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(path)
        server.listen(1)
        server.settimeout(timeout)
        proc = subprocess.Popen(
            [helper, path, true, "true"], stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        try:
            conn, _ = server.accept()
            with conn:
                conn.settimeout(timeout)
                _word, num = conn.recv(32).split()
                os.close(pidfd_getfd(proc.pid, int(num)))
                conn.sendall(b"K")
            _, err = proc.communicate(timeout=timeout)
        except (OSError, ValueError, subprocess.TimeoutExpired) as exc:
            proc.kill()
            _, err = proc.communicate()
            tail = err.decode("utf-8", "replace").strip().splitlines()
            return tail[-1] if tail else f"{type(exc).__name__}: {exc}"
        finally:
            server.close()
        if proc.returncode != 0:
            tail = err.decode("utf-8", "replace").strip().splitlines()
            return tail[-1] if tail else f"the helper exited with status {proc.returncode}"
    return None


# -- the program's side: its memory, its fds ---------------------------------------------------


def pidfd_getfd(pid: int, fd: int) -> int:
    """A duplicate of the process's fd `fd` (the same open file)."""
    pidfd = os.pidfd_open(tgid(pid))
    try:
        got = _libc.syscall(SYS_PIDFD_GETFD, pidfd, fd, 0)
        if got < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        os.set_inheritable(got, False)
        return int(got)
    finally:
        os.close(pidfd)


def tgid(tid: int) -> int:
    """pidfd_open() wants the thread-group leader; a notification names the thread."""
    with open(f"/proc/{tid}/status", "rb") as f:
        for line in f:
            if line.startswith(b"Tgid:"):
                return int(line.split()[1])
    raise ProcessLookupError(tid)


def read_mem(pid: int, addr: int, size: int) -> bytes:
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.pread(fd, size, addr)
    finally:
        os.close(fd)


def write_mem(pid: int, addr: int, data: bytes) -> None:
    fd = os.open(f"/proc/{pid}/mem", os.O_WRONLY | os.O_CLOEXEC)
    try:
        if os.pwrite(fd, data, addr) != len(data):
            raise OSError(errno.EFAULT, "short write into the program's memory")
    finally:
        os.close(fd)


def fd_inode(pid: int, fd: int) -> int | None:
    """The inode of the program's fd if it is a socket (the key of a redirected socket)."""
    try:
        st = os.stat(f"/proc/{pid}/fd/{fd}")
    except OSError:
        return None
    return st.st_ino if (st.st_mode & 0o170000) == 0o140000 else None


def udp_inodes() -> set[int]:
    out: set[int] = set()
    for name in ("udp", "udp6"):
        try:
            with open(f"/proc/net/{name}") as f:
                next(f, None)
                for line in f:
                    parts = line.split()
                    if len(parts) > 9:
                        out.add(int(parts[9]))
        except (OSError, ValueError):
            continue
    return out


def family_of(pid: int, fd: int) -> int:
    dup = pidfd_getfd(pid, fd)
    try:
        s = socket.socket(fileno=dup)
        try:
            return int(s.family)
        finally:
            s.detach()
    finally:
        os.close(dup)


IPPROTO_MPTCP = 262  # linux/in.h: falls back to plain TCP against our loopback join


def proto_of(s: socket.socket) -> int | None:
    """TCP (MPTCP too) or UDP (None: another kind of socket: SCTP, UDP-Lite, ping...)."""
    try:
        kind = s.getsockopt(SOL_SOCKET, SO_TYPE)
        proto = s.getsockopt(SOL_SOCKET, SO_PROTOCOL)
    except OSError:
        return None
    if kind == socket.SOCK_STREAM and proto in (0, 6, IPPROTO_MPTCP):
        return TCP
    if kind == socket.SOCK_DGRAM and proto in (0, 17):
        return UDP
    return None


def sock_proto(pid: int, fd: int) -> int | None:
    """TCP or UDP (None: another kind of socket, or not a socket): asked of a borrowed copy."""
    try:
        dup = pidfd_getfd(pid, fd)
    except OSError:
        return None
    try:
        s = socket.socket(fileno=dup)
        try:
            return proto_of(s)
        finally:
            s.detach()
    finally:
        os.close(dup)


__all__ = [
    "HELPER_NAME",
    "NR",
    "SOCKET_NAME",
    "family_of",
    "fd_inode",
    "helper_path",
    "pidfd_getfd",
    "probe",
    "proto_of",
    "read_mem",
    "sock_proto",
    "supported",
    "tgid",
    "udp_inodes",
    "write_mem",
]
