"""The seccomp door: programs the preload shim cannot see (static and Go binaries) have their
socket system calls answered by the launcher (docs/seccomp.md).

The helper (csrc/seccomp/helper.c) connects to the door's unix socket (its front,
doors/seccomp_listen.py, which imports this module at the first hand-over), installs a
seccomp filter with a user-notification listener and says the listener's fd number; the
front takes the listener with pidfd_getfd() and answers "K"; the helper execs the program.
From then on the calls the filter traps stop in the program until `_Supervisor` answers them
on the launcher's loop (SECCOMP_IOCTL_NOTIF_RECV/SEND):

- connect() to a destination routed into the tunnel: the door borrows the program's socket
  (pidfd_getfd: the same open file, so Go's epoll registration stays valid), connects it to
  a loopback listener of ours and joins the accepted end to a tunnel flow
  (TunnelService.open_tcp + TcpRelay.attach_socket). A blocking connect is answered when the
  tunnel says open/refused; a non-blocking one gets EINPROGRESS, and its
  getsockopt(SO_ERROR) is held until the outcome is known. UDP: the socket is connected to a
  loopback UDP socket of ours that forwards into a tunnel UDP flow. Port 53 outside the
  tunnel goes to the tunnel DNS when DNS= is set. Unrouted: the call runs as asked
  (SECCOMP_USER_NOTIF_FLAG_CONTINUE); routed but impossible: its errno (fail closed).
- getpeername()/getsockname() of such a socket report the tunnel addresses.
- Anything else trapped runs as asked.

Every read of the program's memory is followed by SECCOMP_IOCTL_NOTIF_ID_VALID (the thread
may have died and its pid been reused) before the door acts on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import ipaddress
import os
import select
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from wrapguard import log
from wrapguard.doors.seccomp_sys import (
    NR,
    family_of,
    fd_inode,
    pidfd_getfd,
    proto_of,
    read_mem,
    sock_proto,
    udp_inodes,
    write_mem,
)
from wrapguard.errors import DecodeError
from wrapguard.runtime.relay import TcpRelay, reset_socket
from wrapguard.runtime.service import TCP, UDP, FrontEnd, TunnelService, UdpFlow, Way, plain
from wrapguard.wire import seccomp as sc

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# A loopback source seen by recvfrom -> the tunnel address it stands for (None: itself)
_Source = Callable[[tuple[IPAddress, int]], tuple[IPAddress, int] | None]

MAX_SOCKADDR = 128
MSGHDR_SIZE, MMSGHDR_SIZE = 56, 64  # struct msghdr, struct mmsghdr (64-bit)
MAX_DATAGRAM = 65535  # the most the door reads of one datagram (larger: EMSGSIZE)
UIO_MAXIOV = 1024  # iovecs per message the kernel takes (more: EMSGSIZE)
HELD_CHECK = 2.0  # seconds between checks that a held blocking call's caller still waits
MAX_UDP_SOURCES = 1024  # tunnel peers of one UDP socket at once (each: a loopback socket of ours)
UDP_SWEEP_EVERY = 5.0  # seconds between checks that a redirected UDP socket still exists
FLOW_KEEP = 60.0  # seconds a TCP flow's addresses stay answerable after it ended

# -- one redirected socket ---------------------------------------------------------------------


@dataclass(eq=False)
class _Flow:
    proto: int
    family: int  # the program's socket's family (addresses it sees are in this family)
    peer: tuple[IPAddress, int]  # what the program asked for (getpeername)
    local: tuple[IPAddress, int]  # our tunnel side (getsockname)
    nonblocking: bool = False
    status: int | None = None  # TCP: 0 open, errno failed, None not known yet
    so_error_told: bool = False
    held: list[sc.Notification] = field(default_factory=list)  # SO_ERROR waiting for status
    relay: TcpRelay | None = None
    udp: UdpFlow | None = None
    ours: socket.socket | None = None  # UDP: our loopback socket the program's one talks to
    inode: int = 0
    join: socket.socket | None = None  # TCP: the one-time loopback listener, until joined


@dataclass(eq=False)
class _Assoc:
    """An unconnected UDP socket of the program that sent into the tunnel: one tunnel UDP
    flow, and per destination a loopback socket of ours whose datagrams to the program's
    socket stand for that destination's replies."""

    family: int
    inode: int
    local: tuple[str, int]  # where the program's socket receives our loopback datagrams
    server: bool = False  # bound to a port the tunnel reaches: any tunnel source comes in
    udp: UdpFlow | None = None
    backs: dict[tuple[IPAddress, int], socket.socket] = field(default_factory=dict)  # by target
    by_addr: dict[tuple[IPAddress, int], tuple[IPAddress, int]] = field(default_factory=dict)
    # ^ our loopback socket's address -> the destination it stands for (as the program asked)


# -- the door ----------------------------------------------------------------------------------


class SeccompDoor:
    """The door's logic: the loopback listeners redirected sockets are joined through, and
    one supervisor per listener fd its front (doors/seccomp_listen.py) was handed."""

    def __init__(
        self, service: TunnelService, frontend: FrontEnd, counters: dict[str, int]
    ) -> None:
        self.service = service
        self.log = log.get("wrapguard.seccomp")
        self.loop = asyncio.get_running_loop()
        self.frontend = frontend
        self.flows: dict[int, _Flow] = {}  # by the program socket's inode
        self._joins: dict[int, socket.socket] = {}  # fd -> a flow's one-time loopback listener
        self.has_v6_loopback = True  # until ::1 cannot be bound
        self._sups: set[_Supervisor] = set()
        self._sweep: asyncio.TimerHandle | None = None
        self.counters = counters  # the front's: /state shows them
        self.listening: dict[int, tuple[IPAddress, int]] = {}  # inode -> what it listens on
        self.bound: dict[int, tuple[IPAddress, int]] = {}  # inode -> tunnel address bound
        self.assocs: dict[int, _Assoc] = {}  # unconnected UDP sockets sending into the tunnel
        self.refusals_logged: set[tuple[object, ...]] = set()  # kinds of internal refusal logged

    def count(self, what: str) -> None:
        self.counters[what] = self.counters.get(what, 0) + 1

    def supervise(self, listener: int, pid: int) -> None:
        """Answer the trapped calls of `pid`'s filter from now on (`listener`: its fd, ours)."""
        self._sups.add(_Supervisor(self, listener, pid))

    async def close(self) -> None:
        for sup in list(self._sups):
            sup.close()
        for fd, s in list(self._joins.items()):
            self.loop.remove_reader(fd)
            s.close()
        self._joins.clear()
        for flow in list(self.flows.values()):
            self._end_udp(flow)
        for assoc in list(self.assocs.values()):
            self._end_assoc(assoc)
        if self._sweep is not None:
            self._sweep.cancel()

    def supervisor_gone(self, sup: _Supervisor) -> None:
        self._sups.discard(sup)

    # -- loopback joins ----------------------------------------------------------------------

    def _listener(self, family: int) -> socket.socket:
        """A one-time loopback listener for one redirected socket: nobody else knows its
        port, and what it accepts is checked against the program socket's address."""
        if family == socket.AF_INET6 and self.has_v6_loopback:
            s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
            try:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                s.bind(("::1", 0))
                s.listen(4)
                s.setblocking(False)
                return s
            except OSError:
                s.close()
                self.has_v6_loopback = False
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind(("127.0.0.1", 0))
        s.listen(4)
        s.setblocking(False)
        return s

    def _on_join(self, listener: socket.socket, flow: _Flow, want: tuple[str, int]) -> None:
        for _ in range(8):
            try:
                sock, addr = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                break
            if (str(ipaddress.ip_address(addr[0])), addr[1]) == want:
                self._end_join(listener)
                self._join(flow, sock)
                return
            reset_socket(sock)  # a stranger raced for the port: never a tunnel flow
            self.count("loopback_strangers")
        self._end_join(listener)

    def _end_join(self, listener: socket.socket) -> None:
        if self._joins.pop(listener.fileno(), None) is not None:
            self.loop.remove_reader(listener.fileno())
        listener.close()

    def _join(self, flow: _Flow, sock: socket.socket) -> None:
        assert flow.relay is not None
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        flow.relay.attach_socket(sock)

    # -- decisions -----------------------------------------------------------------------------

    def connect_tcp(self, sup: _Supervisor, n: sc.Notification, sock: socket.socket,
                    family: int, dst: tuple[IPAddress, int],
                    target: tuple[IPAddress, int]) -> None:  # fmt: skip
        """Join the program's socket (a borrowed copy: `sock`) to a tunnel flow to `target`
        (it asked for `dst`)."""
        dup = sock.fileno()
        if not sup.valid(n):
            return
        if sock.family != family:  # as tcp_v4/v6_connect answer a sockaddr of the other family
            self.count("connect_refused")
            other = errno.EAFNOSUPPORT if sock.family == socket.AF_INET else errno.EINVAL
            sup.answer(n, error=other)
            return
        flags = fcntl.fcntl(dup, fcntl.F_GETFL)
        nonblocking = bool(flags & os.O_NONBLOCK)
        listener = self._listener(family)
        lhost, lport = listener.getsockname()[:2]
        if family == socket.AF_INET6 and listener.family == socket.AF_INET:
            lhost = "::ffff:" + lhost
        inode = os.fstat(dup).st_ino
        flow = _Flow(TCP, family, dst, dst, nonblocking, inode=inode)
        joined: list[tuple[str, int]] = []  # the program's loopback address, once joined

        def opened(status: int) -> None:
            # Open: answer from the engine's dispatch (before the ACK is sealed, no loop
            # turn). A failure tears the flow down: that waits for the future, as before.
            if status == 0 and joined:
                self._outcome(sup, flow, n, status, joined[0])

        relay, outcome = self.service.open_tcp(
            target[0], target[1], on_done=lambda _r: self._ended(flow), on_status=opened
        )
        flow.relay = relay
        flow.local = self.service.tcp_local(relay)
        self.frontend.flows += 1
        self.count("tcp_redirected")
        # Never wait on the loop: non-blocking for this one call (the program waits in
        # its own connect meanwhile), the loopback handshake completes by itself.
        fcntl.fcntl(dup, fcntl.F_SETFL, flags | os.O_NONBLOCK)
        try:
            err = sock.connect_ex((lhost, lport))
        finally:
            fcntl.fcntl(dup, fcntl.F_SETFL, flags)
        if err not in (0, errno.EINPROGRESS):
            listener.close()
            relay.abort()
            sup.answer(n, error=err)
            return
        name = sock.getsockname()
        key = (str(ipaddress.ip_address(name[0])), name[1])
        old = self.flows.get(inode)
        if old is not None:
            self._forget(old)
        self.flows[inode] = flow
        self._joins[listener.fileno()] = listener
        self.loop.add_reader(listener.fileno(), self._on_join, listener, flow, key)
        flow.join = listener
        if nonblocking:
            sup.answer(n, error=errno.EINPROGRESS)
        else:
            flow.so_error_told = True
        joined.append(key)

        def done(f: asyncio.Future[int]) -> None:
            if flow.status is None:  # not told by opened()
                self._outcome(sup, flow, n, f.result(), key)

        outcome.add_done_callback(done)

    def _outcome(self, sup: _Supervisor, flow: _Flow, n: sc.Notification, status: int,
                 key: tuple[str, int]) -> None:  # fmt: skip
        flow.status = status
        if status:
            self.count("tcp_failed")
            self.log.debug(
                "tunnel connect failed", dst=f"{flow.peer[0]}:{flow.peer[1]}", errno=status
            )
            if flow.join is not None and flow.join.fileno() in self._joins:
                self._end_join(flow.join)  # not joined yet: the program's side sees a reset
                if flow.relay is not None:
                    flow.relay.abort()
        if not flow.nonblocking:
            sup.answer(n, error=status)  # the blocking connect() returns now
        for held in flow.held:
            self.answer_so_error(sup, held, flow)
        flow.held.clear()

    def _ended(self, flow: _Flow) -> None:
        self.loop.call_later(FLOW_KEEP, self._expire, flow)

    def _expire(self, flow: _Flow) -> None:
        if self.flows.get(flow.inode) is flow:
            del self.flows[flow.inode]

    def _forget(self, flow: _Flow) -> None:
        self.flows.pop(flow.inode, None)
        self._end_udp(flow)

    def answer_so_error(self, sup: _Supervisor, n: sc.Notification, flow: _Flow) -> None:
        assert flow.status is not None
        flow.so_error_told = True
        optval, optlen = n.args[3], n.args[4]
        try:
            have = struct.unpack("<i", read_mem(n.pid, optlen, 4))[0]
            if not sup.valid(n):
                return
            value = struct.pack("<i", flow.status)
            write_mem(n.pid, optval, value[: max(0, min(have, 4))])
            write_mem(n.pid, optlen, struct.pack("<i", min(have, 4)))
        except OSError:
            sup.answer(n, error=errno.EFAULT)
            return
        sup.answer(n)

    def connect_udp(self, sup: _Supervisor, n: sc.Notification, sock: socket.socket,
                    family: int, dst: tuple[IPAddress, int],
                    target: tuple[IPAddress, int]) -> None:  # fmt: skip
        """A connected UDP socket to a routed destination (a borrowed copy: `sock`): connect
        it to a loopback UDP socket of ours that forwards into a tunnel UDP flow (and
        back)."""
        dup = sock.fileno()
        ours: socket.socket | None = None
        try:
            if not sup.valid(n):
                return
            inode = os.fstat(dup).st_ino
            old = self.flows.get(inode)
            if old is not None:
                self._forget(old)
            assoc = self.assocs.get(inode)
            if assoc is not None:
                self._end_assoc(assoc)
            v6 = family == socket.AF_INET6
            ours = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM)
            ours.bind(("::1" if v6 else "127.0.0.1", 0))
            err = sock.connect_ex(ours.getsockname()[:2])
            if err == errno.EADDRNOTAVAIL and v6:  # no ::1 here: v4-mapped loopback
                ours.close()
                ours = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
                ours.bind(("::ffff:127.0.0.1", 0))
                err = sock.connect_ex(ours.getsockname()[:2])
            if err:
                ours.close()
                sup.answer(n, error=err)
                return
            ours.connect(sock.getsockname()[:2])
            ours.setblocking(False)
            sock_ours = ours

            def back(src: tuple[IPAddress, int], payload: bytes) -> None:
                if plain(src[0]) == plain(target[0]) and src[1] == target[1]:
                    with contextlib.suppress(OSError):
                        sock_ours.send(payload)

            udp = self.service.open_udp(back)
            tunnel_ip = self.service.tunnel_address(plain(target[0]).version)
            assert tunnel_ip is not None  # route() said TUNNEL: we have that family
            flow = _Flow(UDP, family, dst, (tunnel_ip, udp.port), udp=udp, ours=ours, inode=inode)
            flow.status = 0
            self.flows[inode] = flow
            self.frontend.flows += 1
            self.count("udp_redirected")
            self.loop.add_reader(ours.fileno(), self._udp_out, flow, target)
            self._arm_sweep()
            ours = None
            sup.answer(n)
        finally:
            if ours is not None:
                ours.close()

    def send_datagram(self, sock: socket.socket, asked: tuple[IPAddress, int],
                      target: tuple[IPAddress, int], data: bytes) -> None:  # fmt: skip
        """One datagram from an unconnected program socket (a borrowed copy: `sock`) into
        the tunnel, to `target` (it asked for `asked`)."""
        assoc = self.assoc_for(sock)
        if target not in assoc.backs:
            while len(assoc.backs) >= MAX_UDP_SOURCES:  # a scanner, a DHT: the oldest goes
                self._drop_back(assoc, next(iter(assoc.backs)))
            self._back(assoc, target, asked)
        assert assoc.udp is not None
        assoc.udp.send(target, data)
        self.frontend.flows += 1

    def assoc_for(self, sock: socket.socket, port: int = 0) -> _Assoc:
        """The association of a program UDP socket (a borrowed copy: `sock`): made on its
        first datagram into the tunnel, or when it binds a port the tunnel can reach
        (`port`: the tunnel flow takes that port, and datagrams from any tunnel source come
        in)."""
        inode = os.fstat(sock.fileno()).st_ino
        assoc = self.assocs.get(inode)
        if assoc is not None:
            return assoc
        name = sock.getsockname()
        if name[1] == 0:  # never bound: as the kernel's autobind on a first send
            sock.bind(("::" if sock.family == socket.AF_INET6 else "0.0.0.0", 0))
            name = sock.getsockname()
        here = ipaddress.ip_address(name[0])
        if here.is_unspecified:
            host = "::1" if sock.family == socket.AF_INET6 else "127.0.0.1"
        else:
            host = str(here)
        assoc = _Assoc(sock.family, inode, (host, name[1]), server=port != 0)
        a = assoc

        def back(src: tuple[IPAddress, int], payload: bytes) -> None:
            key = (plain(src[0]), src[1])
            ours = a.backs.get(key)
            if ours is None and a.server and len(a.backs) < MAX_UDP_SOURCES:
                with contextlib.suppress(OSError):
                    ours = self._back(a, key, key)
            if ours is None:
                self.count("udp_unasked_dropped")  # only those it sent to come back
                return
            with contextlib.suppress(OSError):
                ours.sendto(payload, a.local)  # connected to it: the same as send()

        if port:
            assoc.udp = self.service.open_udp(back, port=port)
        else:  # a client: the peer sees the program's own port when the tunnel has it free
            try:
                assoc.udp = self.service.open_udp(back, port=name[1])
            except OSError:
                assoc.udp = self.service.open_udp(back)
        self.assocs[inode] = assoc
        self.count("udp_assocs")
        self._arm_sweep()
        return assoc

    def _back(self, assoc: _Assoc, target: tuple[IPAddress, int],
              asked: tuple[IPAddress, int]) -> socket.socket:  # fmt: skip
        """The loopback socket of ours that stands for `target` towards the program."""
        v6 = assoc.family == socket.AF_INET6 and ":" in assoc.local[0]
        ours = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM)
        local = ipaddress.ip_address(assoc.local[0])
        try:
            ours.bind(
                (assoc.local[0] if plain(local).is_loopback else ("::1" if v6 else "127.0.0.1"), 0)
            )
        except OSError:
            ours.close()
            raise
        with contextlib.suppress(OSError):
            ours.connect(assoc.local)  # datagrams from anyone else are dropped by the kernel
        ours.setblocking(False)
        assoc.backs[target] = ours
        name = ours.getsockname()
        assoc.by_addr[(plain(ipaddress.ip_address(name[0])), name[1])] = asked
        return ours

    def _drop_back(self, assoc: _Assoc, target: tuple[IPAddress, int]) -> None:
        ours = assoc.backs.pop(target)
        with contextlib.suppress(OSError):
            name = ours.getsockname()
            assoc.by_addr.pop((plain(ipaddress.ip_address(name[0])), name[1]), None)
        ours.close()
        self.count("udp_backs_dropped")

    def _end_assoc(self, assoc: _Assoc) -> None:
        self.assocs.pop(assoc.inode, None)
        for ours in assoc.backs.values():
            ours.close()
        assoc.backs.clear()
        if assoc.udp is not None:
            assoc.udp.close()
            assoc.udp = None

    def _udp_out(self, flow: _Flow, target: tuple[IPAddress, int]) -> None:
        assert flow.ours is not None and flow.udp is not None
        for _ in range(64):
            try:
                data = flow.ours.recv(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            try:
                flow.udp.send(target, data)
            except OSError as exc:
                self.log.debug("udp datagram not sent", error=str(exc))

    def _end_udp(self, flow: _Flow) -> None:
        if flow.ours is not None:
            with contextlib.suppress(Exception):
                self.loop.remove_reader(flow.ours.fileno())
            flow.ours.close()
            flow.ours = None
        if flow.udp is not None:
            flow.udp.close()
            flow.udp = None

    def _arm_sweep(self) -> None:
        if self._sweep is None:
            self._sweep = self.loop.call_later(UDP_SWEEP_EVERY, self._sweep_udp)

    def _sweep_udp(self) -> None:
        """End the UDP redirections whose program socket is gone (no close() is seen)."""
        self._sweep = None
        udp = [f for f in self.flows.values() if f.proto == UDP]
        if not udp and not self.assocs:
            return
        alive = udp_inodes()
        for flow in udp:
            if flow.inode not in alive:
                self._forget(flow)
        for assoc in list(self.assocs.values()):
            if assoc.inode not in alive:
                self._end_assoc(assoc)
        if self.assocs or any(f.proto == UDP for f in self.flows.values()):
            self._arm_sweep()


class _Supervisor:
    """One listener fd: receive notifications as they come, answer each (now or later)."""

    def __init__(self, door: SeccompDoor, fd: int, pid: int) -> None:
        self.door = door
        self.fd = fd
        self.pid = pid
        self.log = door.log
        self.loop = door.loop
        self._poll = select.poll()
        self._poll.register(fd, select.POLLIN)
        self.loop.add_reader(fd, self._on_ready)
        self.held: dict[int, sc.Notification] = {}  # our fd copy -> its blocking call
        self._held_timer: asyncio.TimerHandle | None = None
        self.by_call: dict[int, Callable[[sc.Notification], None]] = {
            NR["connect"]: self._connect,
            NR["getpeername"]: self._getpeername,
            NR["getsockname"]: self._getsockname,
            NR["getsockopt"]: self._getsockopt,
            NR["sendto"]: self._sendto,
            NR["sendmsg"]: self._sendmsg,
            NR["sendmmsg"]: self._sendmmsg,
            NR["recvfrom"]: self._recvfrom,
            NR["bind"]: self._bind,
            NR["listen"]: self._listen,
            NR["accept"]: self._accept,
            NR["accept4"]: self._accept,
        }

    def close(self) -> None:
        for fd in list(self.held):
            self._unhold(fd)
        if self._held_timer is not None:
            self._held_timer.cancel()
            self._held_timer = None
        if self.fd >= 0:
            self.loop.remove_reader(self.fd)
            os.close(self.fd)
            self.fd = -1
            self.door.supervisor_gone(self)

    # -- the kernel's side ---------------------------------------------------------------------

    def _on_ready(self) -> None:
        for _ in range(64):
            events = self._poll.poll(0)
            if not events:
                return
            ev = events[0][1]
            if not ev & select.POLLIN:
                if ev & (select.POLLHUP | select.POLLERR | select.POLLNVAL):
                    self.close()  # every filtered process has exited
                return
            buf = bytearray(sc.NOTIF_SIZE)
            try:
                fcntl.ioctl(self.fd, sc.IOCTL_NOTIF_RECV, buf, True)
            except OSError as exc:
                if exc.errno in (errno.ENOENT, errno.EINTR):  # it died meanwhile
                    continue
                self.log.warning("seccomp receive failed", error=str(exc))
                self.close()
                return
            n = sc.parse_notification(bytes(buf))
            handler = self.by_call.get(n.nr)
            try:
                if handler is None:
                    self.answer(n, flags=sc.FLAG_CONTINUE)
                else:
                    handler(n)
            except (ProcessLookupError, FileNotFoundError):
                self.answer(n, error=errno.ESRCH)  # gone: nobody reads it
            except OSError as exc:
                if exc.errno == errno.EIO:  # its memory: a bad pointer, as the kernel says
                    self.door.count("bad_pointer")
                    self.answer(n, error=errno.EFAULT)
                else:
                    self._refuse(n, exc)
            except Exception as exc:  # fail closed: never CONTINUE on a surprise
                self._refuse(n, exc)

    def _refuse(self, n: sc.Notification, exc: BaseException) -> None:
        """A call the door could not decide: refused (never let through), counted, and
        logged once per kind of failure (a looping program must not flood the log)."""
        self.door.count("refused_internal")
        key = (n.nr, type(exc).__name__, getattr(exc, "errno", None))
        if key not in self.door.refusals_logged:
            self.door.refusals_logged.add(key)
            self.log.warning(
                "seccomp call refused after an internal error (logged once per kind)",
                nr=n.nr,
                error=repr(exc),
            )
        self.answer(n, error=errno.ENETUNREACH if n.nr == NR["connect"] else errno.EIO)

    def valid(self, n: sc.Notification) -> bool:
        """The notification is still pending (its thread did not die): what we read of its
        memory was that thread's."""
        try:
            fcntl.ioctl(self.fd, sc.IOCTL_NOTIF_ID_VALID, struct.pack("<Q", n.id))
        except OSError:
            return False
        return True

    def answer(self, n: sc.Notification, val: int = 0, error: int = 0, flags: int = 0) -> None:
        if self.fd < 0:
            return
        try:
            fcntl.ioctl(self.fd, sc.IOCTL_NOTIF_SEND, sc.emit_response(n.id, val, error, flags))
        except OSError as exc:
            if exc.errno != errno.ENOENT:  # ENOENT: the caller died, or was interrupted
                self.log.debug("seccomp answer failed", error=str(exc))

    def go_on(self, n: sc.Notification) -> None:
        self.answer(n, flags=sc.FLAG_CONTINUE)

    # -- the calls -----------------------------------------------------------------------------

    def _connect(self, n: sc.Notification) -> None:
        door = self.door
        fd, addr, addrlen = n.args[0], n.args[1], n.args[2]
        if addr == 0 or addrlen < 2:
            self.go_on(n)
            return
        raw = read_mem(n.pid, addr, min(addrlen, MAX_SOCKADDR))
        try:
            family, ip, port = sc.parse_sockaddr(raw)
        except DecodeError:
            self.go_on(n)  # the kernel answers EINVAL itself
            return
        if ip is None:
            self.go_on(n)  # AF_UNIX, AF_UNSPEC (a UDP disconnect), AF_NETLINK ...
            return
        if not self.valid(n):
            return
        inode = fd_inode(n.pid, fd)
        flow = door.flows.get(inode) if inode is not None else None
        if flow is not None and flow.proto == TCP:
            if flow.status is None:
                self.answer(n, error=errno.EALREADY)
            elif flow.status == 0:
                self.answer(n, error=errno.EISCONN)
            else:
                self.answer(n, error=flow.status)
            return
        service = door.service
        if flow is None and all(
            not service.dns_captured(p, ip, port) and service.route(p, ip, port).way is Way.DIRECT
            for p in (TCP, UDP)
        ):
            self.go_on(n)  # loopback, bypassed, unrouted: the host network, as asked
            return
        dup = pidfd_getfd(n.pid, fd)  # one borrowed copy for the whole decision
        sock = socket.socket(fileno=dup)
        try:
            self._connect_with(n, sock, family, ip, port, flow)
        finally:
            sock.detach()
            os.close(dup)

    def _connect_with(self, n: sc.Notification, sock: socket.socket, family: int,
                      ip: IPAddress, port: int, flow: _Flow | None) -> None:  # fmt: skip
        door, service = self.door, self.door.service
        proto = proto_of(sock)
        if proto is None:
            # Not TCP/UDP (SCTP, UDP-Lite, ping sockets...) to a destination routed into the
            # tunnel (the caller let the unrouted ones go): no door can carry it, so it must
            # not go out directly either.
            door.count("connect_refused")
            self.answer(n, error=errno.ENETUNREACH)
            return
        dst = (ip, port)
        target: tuple[IPAddress, int] = (plain(ip), port)
        if service.dns_captured(proto, ip, port):
            redirect = service.dns_redirect(proto, ip, port)
            if (
                redirect is None
                or service.route(proto, redirect[0], redirect[1]).way is not Way.TUNNEL
            ):
                self.answer(n, error=errno.ENETUNREACH)  # never the host's resolver
                return
            target = redirect
        else:
            route = service.route(proto, ip, port)
            if route.way is Way.DIRECT:
                if flow is not None:  # a UDP socket re-connected elsewhere
                    door._forget(flow)
                self.go_on(n)
                return
            if route.way is Way.FAIL:
                self.answer(n, error=route.errno)
                return
        if proto == TCP:
            door.connect_tcp(self, n, sock, family, dst, target)
        else:
            door.connect_udp(self, n, sock, family, dst, target)

    # -- inbound: bind, listen, accept ------------------------------------------------------

    def _bind(self, n: sc.Notification) -> None:
        """bind() to our tunnel address (which the host does not have): the socket is bound
        to loopback at that port instead, and getsockname()/listen() use the tunnel
        address. A UDP socket bound to the wildcard or a tunnel address at a fixed port is a
        server the tunnel can reach: its association takes that port in the tunnel."""
        raw = self._name_at(n.pid, n.args[1], n.args[2])
        try:
            family, ip, port = sc.parse_sockaddr(raw) if raw else (0, None, 0)
        except DecodeError:
            family, ip = 0, None
        service = self.door.service
        tunnel = ip is not None and plain(ip) in service.addresses
        if ip is None or not (tunnel or (ip.is_unspecified and port)):
            self.go_on(n)
            return
        if not tunnel and sock_proto(n.pid, n.args[0]) != UDP:
            self.go_on(n)  # a TCP wildcard bind: listen() decides
            return
        if not self.valid(n):
            return
        dup = pidfd_getfd(n.pid, n.args[0])
        sock = socket.socket(fileno=dup)
        try:
            if tunnel:
                host = "::1" if family == socket.AF_INET6 else "127.0.0.1"
                if family == socket.AF_INET6 and isinstance(plain(ip), ipaddress.IPv4Address):
                    host = "::ffff:127.0.0.1"
            else:
                host = str(ip)
            err = 0
            try:
                sock.bind((host, port))
            except OSError as exc:
                err = exc.errno or errno.EADDRINUSE
            if err == 0 and tunnel:
                self.door.bound[os.fstat(dup).st_ino] = (plain(ip), sock.getsockname()[1])
            if err == 0 and sock.type == socket.SOCK_DGRAM and sock.getsockname()[1]:
                try:
                    self.door.assoc_for(sock, port=sock.getsockname()[1])
                    self.log.info("receiving UDP from the tunnel", port=sock.getsockname()[1])
                except OSError as exc:
                    self.log.warning(
                        "UDP port not reachable from the tunnel", port=port, error=str(exc)
                    )
            self.answer(n, error=err)
        finally:
            sock.detach()
            os.close(dup)

    def _listen(self, n: sc.Notification) -> None:
        """listen() on the wildcard or a tunnel address: tunnel connections to that port are
        relayed to it (the preload door's inbound path); the call itself runs as asked."""
        door = self.door
        dup = pidfd_getfd(n.pid, n.args[0])
        sock = socket.socket(fileno=dup)
        try:
            if sock.type != socket.SOCK_STREAM or sock.family not in (
                socket.AF_INET, socket.AF_INET6
            ):  # fmt: skip
                self.go_on(n)
                return
            inode = os.fstat(dup).st_ino
            name = sock.getsockname()
            here = ipaddress.ip_address(name[0])
            port = name[1]
            tunnel = door.bound.get(inode)
            if tunnel is not None:
                ip: IPAddress = tunnel[0]
            elif here.is_unspecified:
                ip = here
            else:
                self.go_on(n)  # loopback or a host address: not reachable from the tunnel
                return
            v6only = False
            if sock.family == socket.AF_INET6:
                v6only = bool(sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY))
            if not self.valid(n):
                return
            self.go_on(n)
            if port:  # port 0: the kernel picks one at listen(); seen at the next accept
                door.service.listen_tcp(ip, port, v6only)
            door.listening[inode] = (ip, port)
        finally:
            sock.detach()
            os.close(dup)

    def _accept(self, n: sc.Notification) -> None:
        """accept() on a tunnel listener: done here, so that the address it reports is the
        tunnel client's; the new socket is installed in the program with
        SECCOMP_IOCTL_NOTIF_ADDFD (ADDFD_FLAG_SEND answers the call with its number)."""
        door = self.door
        inode = fd_inode(n.pid, n.args[0])
        if inode is None or inode not in door.listening:
            self.go_on(n)
            return
        dup = pidfd_getfd(n.pid, n.args[0])
        lsock = socket.socket(fileno=dup)
        try:
            flags = fcntl.fcntl(dup, fcntl.F_GETFL)
            if door.listening[inode][1] == 0:
                ip = door.listening[inode][0]
                port = lsock.getsockname()[1]
                door.listening[inode] = (ip, port)
                door.service.listen_tcp(ip, port, False)
            ready = _readable_now(dup)
            if not ready:
                if flags & os.O_NONBLOCK:
                    self.answer(n, error=errno.EAGAIN)
                else:  # a blocking accept: answered when a connection comes
                    self._hold(os.dup(dup), n, self._accept_later)
                return
            self._accept_now(n, lsock, flags)
        finally:
            lsock.detach()
            os.close(dup)

    def _hold(self, fd: int, n: sc.Notification, then: Callable[..., None], *args: object) -> None:
        """A blocking call answered later: `then(n, fd, *args)` once `fd` (our copy of the
        program's socket) is readable. Checked every HELD_CHECK seconds: a caller that died
        meanwhile (its thread killed) no longer keeps our copy, and with it the port."""
        self.held[fd] = n
        self.loop.add_reader(fd, then, n, fd, *args)
        if self._held_timer is None:
            self._held_timer = self.loop.call_later(HELD_CHECK, self._check_held)

    def _check_held(self) -> None:
        self._held_timer = None
        for fd, n in list(self.held.items()):
            if not self.valid(n):
                self._unhold(fd)
                self.door.count("held_calls_gone")
        if self.held and self.fd >= 0:
            self._held_timer = self.loop.call_later(HELD_CHECK, self._check_held)

    def _unhold(self, fd: int) -> None:
        if self.held.pop(fd, None) is not None:
            self.loop.remove_reader(fd)
            os.close(fd)

    def _accept_later(self, n: sc.Notification, fd: int) -> None:
        self.held.pop(fd, None)
        self.loop.remove_reader(fd)
        try:
            if not self.valid(n):
                return
            lsock = socket.socket(fileno=fd)
            try:
                self._accept_now(n, lsock, fcntl.fcntl(fd, fcntl.F_GETFL))
            finally:
                lsock.detach()
        except Exception as exc:
            self.log.warning("seccomp accept failed", error=repr(exc))
            self.answer(n, error=errno.ECONNABORTED)
        finally:
            os.close(fd)

    def _accept_now(self, n: sc.Notification, lsock: socket.socket, flags: int) -> None:
        fd = lsock.fileno()
        # Non-blocking for our accept only (the program waits in its own call meanwhile).
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)
        try:
            conn, addr = lsock.accept()
        except (BlockingIOError, InterruptedError):
            if flags & os.O_NONBLOCK:
                self.answer(n, error=errno.EAGAIN)
            else:  # another thread took it: wait for the next one
                self._hold(os.dup(fd), n, self._accept_later)
            return
        finally:
            fcntl.fcntl(fd, fcntl.F_SETFL, flags)
        try:
            want = n.args[3] if n.nr == NR["accept4"] else 0
            cflags = fcntl.fcntl(conn.fileno(), fcntl.F_GETFL) & ~os.O_NONBLOCK
            if want & socket.SOCK_NONBLOCK:
                cflags |= os.O_NONBLOCK
            fcntl.fcntl(conn.fileno(), fcntl.F_SETFL, cflags)
            key = (str(ipaddress.ip_address(addr[0])), addr[1])
            inbound = self.door.service.inbound_peer(key)
            family = lsock.family
            if inbound is not None:
                remote, local = inbound
                rip = remote[0]
                if family == socket.AF_INET:
                    rip = plain(rip)
                name = sc.emit_sockaddr(family, rip, remote[1])
                flow = _Flow(TCP, family, remote, local, status=0, so_error_told=True)
                flow.inode = os.fstat(conn.fileno()).st_ino
                self.door.flows[flow.inode] = flow
                self.door.count("tcp_accepted")
            else:
                name = sc.emit_sockaddr(family, ipaddress.ip_address(addr[0]), addr[1])
            if n.args[1] and n.args[2]:
                have = struct.unpack("<i", read_mem(n.pid, n.args[2], 4))[0]
                if have > 0:
                    write_mem(n.pid, n.args[1], name[:have])
                write_mem(n.pid, n.args[2], struct.pack("<i", len(name)))
            newfd_flags = os.O_CLOEXEC if want & socket.SOCK_CLOEXEC else 0
            try:
                fcntl.ioctl(self.fd, sc.IOCTL_NOTIF_ADDFD, sc.emit_addfd(n.id, conn.fileno(),
                            newfd_flags=newfd_flags))  # fmt: skip
            except OSError as exc:
                if inbound is not None:
                    self.door.flows.pop(os.fstat(conn.fileno()).st_ino, None)
                if exc.errno != errno.ENOENT:
                    self.answer(n, error=exc.errno or errno.EMFILE)
        finally:
            conn.close()

    # -- datagrams with an address: unconnected UDP ----------------------------------------

    def _where(self, raw: bytes, proto: int) -> tuple[str, tuple[IPAddress, int], int]:
        """("direct" | "tunnel" | "fail", the target, errno) for a datagram's address."""
        service = self.door.service
        try:
            _family, ip, port = sc.parse_sockaddr(raw)
        except DecodeError:
            return "direct", (ipaddress.IPv4Address(0), 0), 0
        if ip is None:
            return "direct", (ipaddress.IPv4Address(0), 0), 0
        if service.dns_captured(proto, ip, port):
            redirect = service.dns_redirect(proto, ip, port)
            if redirect is None or service.route(proto, *redirect).way is not Way.TUNNEL:
                return "fail", (ip, port), errno.ENETUNREACH
            return "tunnel", redirect, 0
        route = service.route(proto, ip, port)
        if route.way is Way.DIRECT:
            return "direct", (ip, port), 0
        if route.way is Way.FAIL:
            return "fail", (ip, port), route.errno
        return "tunnel", (plain(ip), port), 0

    def _datagrams(self, n: sc.Notification, msgs: list[tuple[bytes, list[tuple[int, int]] | None]],
                   lens_at: list[int] | None) -> None:  # fmt: skip
        """sendto/sendmsg/sendmmsg with addresses: (name, iovecs) per message. All outside
        the tunnel: the call runs as asked. Else the door sends each one itself: into the
        tunnel through the socket's association (replies come back to the program's socket
        from a loopback socket of ours per destination; recvfrom reports the tunnel source),
        or directly from a borrowed copy of the socket. TCP Fast Open into the tunnel is
        refused (ENETUNREACH): fail closed."""
        where = [self._where(name, UDP) if name else ("direct", None, 0) for name, _ in msgs]
        if all(w[0] == "direct" for w in where):
            self.go_on(n)
            return
        door = self.door
        proto = sock_proto(n.pid, n.args[0])
        if proto == TCP and self._flow_of(n) is not None:
            self.go_on(n)  # a TCP socket we connected: the kernel ignores the address
            return
        # A UDP socket we connected still sends to an address it names (the kernel does):
        # such datagrams go as any unconnected socket's would, never directly when routed.
        if proto != UDP:
            if not self.valid(n):
                return
            door.count("send_refused")
            self.answer(n, error=errno.ENETUNREACH)
            return
        payloads = [_gather(n.pid, iov) for _, iov in msgs]
        if not self.valid(n):
            return
        dup = pidfd_getfd(n.pid, n.args[0])
        sock = socket.socket(fileno=dup)
        sent = 0
        err = 0
        try:
            for (name, _), (way, target, werr), data in zip(msgs, where, payloads, strict=True):
                try:
                    if data is None:  # over a datagram's size, or more iovecs than UIO_MAXIOV
                        raise OSError(errno.EMSGSIZE, os.strerror(errno.EMSGSIZE))
                    if way == "fail":
                        raise OSError(werr, os.strerror(werr))
                    if way == "direct":
                        _family, ip, port = sc.parse_sockaddr(name) if name else (0, None, 0)
                        if ip is None:
                            sock.send(data, socket.MSG_DONTWAIT)
                        else:
                            sock.sendto(data, socket.MSG_DONTWAIT, (str(ip), port))
                    else:
                        assert target is not None
                        asked = sc.parse_sockaddr(name)
                        door.send_datagram(sock, (asked[1], asked[2]), target, data)  # type: ignore[arg-type]
                except OSError as exc:
                    err = exc.errno or errno.EIO
                    break
                if lens_at is not None:
                    write_mem(n.pid, lens_at[sent], struct.pack("<I", len(data)))
                sent += 1
        finally:
            sock.detach()
            os.close(dup)
        if lens_at is None:
            if err:
                self.answer(n, error=err)
            else:
                self.answer(n, val=len(payloads[0] or b""))
        elif sent == 0 and err:
            self.answer(n, error=err)
        else:
            self.answer(n, val=sent)

    def _name_at(self, pid: int, addr: int, length: int) -> bytes:
        return read_mem(pid, addr, min(length, MAX_SOCKADDR)) if addr and length >= 2 else b""

    def _sendto(self, n: sc.Notification) -> None:
        name = self._name_at(n.pid, n.args[4], n.args[5])
        self._datagrams(n, [(name, [(n.args[1], n.args[2])])], None)

    def _msg(self, pid: int, raw: bytes) -> tuple[bytes, list[tuple[int, int]] | None]:
        """A msghdr's address and iovecs (None: more than UIO_MAXIOV, EMSGSIZE)."""
        name, namelen, iov, iovlen = struct.unpack_from("<QI4xQQ", raw)
        if iovlen > UIO_MAXIOV:
            return self._name_at(pid, name, namelen), None
        vec = read_mem(pid, iov, 16 * iovlen) if iovlen else b""
        iovs = [struct.unpack_from("<QQ", vec, 16 * i) for i in range(len(vec) // 16)]
        return self._name_at(pid, name, namelen), iovs

    def _sendmsg(self, n: sc.Notification) -> None:
        raw = read_mem(n.pid, n.args[1], MSGHDR_SIZE)
        if len(raw) < MSGHDR_SIZE or struct.unpack_from("<Q", raw)[0] == 0:
            self.go_on(n)  # no address (or the kernel answers EFAULT)
            return
        self._datagrams(n, [self._msg(n.pid, raw)], None)

    def _sendmmsg(self, n: sc.Notification) -> None:
        count = min(n.args[2], 1024)  # UIO_MAXIOV: the kernel sends no more
        raw = read_mem(n.pid, n.args[1], count * MMSGHDR_SIZE)
        heads = [
            raw[i : i + MSGHDR_SIZE] for i in range(0, len(raw) - MMSGHDR_SIZE + 1, MMSGHDR_SIZE)
        ]
        if not any(struct.unpack_from("<Q", h)[0] for h in heads):
            self.go_on(n)
            return
        msgs = [self._msg(n.pid, h) for h in heads]
        lens = [n.args[1] + i * MMSGHDR_SIZE + MSGHDR_SIZE for i in range(len(heads))]
        self._datagrams(n, msgs, lens)

    def _recvfrom(self, n: sc.Notification) -> None:
        """recvfrom() asking for the source, on a UDP socket the door carries (an
        unconnected one that sent into the tunnel, or one it connected): done here, so that
        a datagram from one of our loopback sockets reports the tunnel source it stands
        for."""
        inode = fd_inode(n.pid, n.args[0])
        door = self.door
        source: _Source
        assoc = door.assocs.get(inode) if inode is not None else None
        flow = door.flows.get(inode) if inode is not None else None
        if assoc is not None:
            family, source = assoc.family, assoc.by_addr.get
        elif flow is not None and flow.proto == UDP and flow.ours is not None:
            name = flow.ours.getsockname()
            ours = (plain(ipaddress.ip_address(name[0])), name[1])
            peer = flow.peer

            def source(a: tuple[IPAddress, int]) -> tuple[IPAddress, int] | None:
                return peer if a == ours else None

            family = flow.family
        else:
            self.go_on(n)
            return
        if n.args[2] == 0:
            self.go_on(n)
            return
        dup = pidfd_getfd(n.pid, n.args[0])
        try:
            self._recv_now(n, dup, family, source)
        finally:
            os.close(dup)

    def _recv_now(self, n: sc.Notification, fd: int, family: int, source: _Source) -> None:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        want = n.args[3]
        sock = socket.socket(fileno=fd)
        buf = bytearray(min(n.args[2], MAX_DATAGRAM))
        try:
            fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)
            try:
                got, src = sock.recvfrom_into(
                    buf, len(buf), want & (socket.MSG_PEEK | socket.MSG_TRUNC)
                )
            except (BlockingIOError, InterruptedError):
                if flags & os.O_NONBLOCK or want & socket.MSG_DONTWAIT:
                    self.answer(n, error=errno.EAGAIN)
                else:  # blocking: answered when a datagram comes
                    self._hold(os.dup(fd), n, self._recv_later, family, source)
                return
            except OSError as exc:
                self.answer(n, error=exc.errno or errno.EIO)
                return
            finally:
                fcntl.fcntl(fd, fcntl.F_SETFL, flags)
        finally:
            sock.detach()
        ip = ipaddress.ip_address(src[0])
        where = source((plain(ip), src[1])) or (ip, src[1])
        write_mem(n.pid, n.args[1], bytes(buf[: min(got, len(buf))]))
        have = struct.unpack("<i", read_mem(n.pid, n.args[5], 4))[0] if n.args[5] else 0
        wip = where[0] if family == socket.AF_INET6 else plain(where[0])
        name = sc.emit_sockaddr(family, wip, where[1])
        if have > 0:
            write_mem(n.pid, n.args[4], name[:have])
        if n.args[5]:
            write_mem(n.pid, n.args[5], struct.pack("<i", len(name)))
        self.answer(n, val=got)

    def _recv_later(self, n: sc.Notification, fd: int, family: int, source: _Source) -> None:
        self.held.pop(fd, None)
        self.loop.remove_reader(fd)
        try:
            if self.valid(n):
                self._recv_now(n, fd, family, source)
        except Exception as exc:
            self.log.warning("seccomp recvfrom failed", error=repr(exc))
            self.answer(n, error=errno.EIO)
        finally:
            os.close(fd)

    def _flow_of(self, n: sc.Notification) -> _Flow | None:
        inode = fd_inode(n.pid, n.args[0])
        return None if inode is None else self.door.flows.get(inode)

    def _name(self, n: sc.Notification, which: str) -> None:
        flow = self._flow_of(n)
        if flow is None:
            self.go_on(n)
            return
        if flow.status != 0 and which == "peer":
            self.answer(n, error=errno.ENOTCONN)
            return
        self._write_name(n, flow.family, flow.peer if which == "peer" else flow.local)

    def _write_name(self, n: sc.Notification, family: int, where: tuple[IPAddress, int]) -> None:
        ip, port = where
        family = socket.AF_INET6 if family == socket.AF_INET6 else socket.AF_INET
        if family == socket.AF_INET and ip.version == 6:
            ip = plain(ip)
        data = sc.emit_sockaddr(family, ip, port)
        addr, lenp = n.args[1], n.args[2]
        have = struct.unpack("<i", read_mem(n.pid, lenp, 4))[0]
        if have < 0:
            self.answer(n, error=errno.EINVAL)
            return
        if not self.valid(n):
            return
        if have:
            write_mem(n.pid, addr, data[:have])
        write_mem(n.pid, lenp, struct.pack("<i", len(data)))
        self.answer(n)

    def _getpeername(self, n: sc.Notification) -> None:
        self._name(n, "peer")

    def _getsockname(self, n: sc.Notification) -> None:
        inode = fd_inode(n.pid, n.args[0])
        bound = self.door.bound.get(inode) if inode is not None else None
        if bound is not None and inode not in self.door.flows:
            flow = _Flow(TCP, family_of(n.pid, n.args[0]), bound, bound, status=0)
            self._write_name(n, flow.family, bound)
            return
        self._name(n, "local")

    def _getsockopt(self, n: sc.Notification) -> None:
        flow = self._flow_of(n)
        if flow is None or flow.proto != TCP or flow.so_error_told:
            self.go_on(n)
            return
        if flow.status is None:
            flow.held.append(n)  # answered when the tunnel says open or refused
            return
        self.door.answer_so_error(self, n, flow)


def _gather(pid: int, iov: list[tuple[int, int]] | None) -> bytes | None:
    """A datagram's bytes from the program's iovecs; None when it is larger than any UDP
    datagram (the kernel answers EMSGSIZE): never more than that is read."""
    if iov is None:
        return None
    parts, left = [], MAX_DATAGRAM
    for addr, length in iov:
        if length > left:
            return None
        parts.append(read_mem(pid, addr, length))
        left -= length
    return b"".join(parts)


def _readable_now(fd: int) -> bool:
    """Whether `fd` has something to read now (poll: select() cannot take fds >= 1024, and
    the launcher raises its fd limit)."""
    p = select.poll()
    p.register(fd, select.POLLIN)
    return bool(p.poll(0))


__all__ = ["SeccompDoor"]
