"""One TCP flow: the program's loopback socket joined to a netstack connection.

Bytes from the program are read only while the stack's send buffer takes them (the rest waits
for `Writable`); bytes from the tunnel are taken from the stack only while the program's socket
accepts them (so the stack's receive window closes when the program stops reading). Memory is
bounded by one chunk each way. Half-close carries through: the program's EOF becomes our FIN
and the peer's FIN becomes `shutdown(SHUT_WR)` on the program's socket. A reset on either side
resets the other.
"""

from __future__ import annotations

import contextlib
import errno
import socket
import struct
from collections.abc import Callable
from ipaddress import IPv4Address, IPv6Address

from wrapguard.netstack import TcpState
from wrapguard.netstack.events import (
    Closed,
    Connected,
    ConnectFailed,
    ConnId,
    Event,
    PeerClosed,
    Readable,
    Reset,
    Writable,
)
from wrapguard.runtime.engine import Engine

CHUNK = 256 * 1024
# Our FIN is acknowledged: the peer has every byte (RFC 9293 3.3.2).
_FIN_ACKED = frozenset({TcpState.FIN_WAIT_2, TcpState.TIME_WAIT, TcpState.CLOSED})
_LINGER_RST = struct.pack("ii", 1, 0)


def reset_socket(sock: socket.socket) -> None:
    """Close with a RST, so the program sees ECONNRESET rather than a clean EOF."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
    sock.close()


class TcpRelay:
    """Relays one program socket <-> one netstack connection on the engine's loop."""

    def __init__(
        self,
        engine: Engine,
        *,
        on_status: Callable[[int], None] | None = None,
        on_done: Callable[[TcpRelay], None] | None = None,
    ) -> None:
        self.engine = engine
        self.loop = engine.running_loop()
        self.cid: ConnId | None = None
        self.sock: socket.socket | None = None
        self.connected = False
        self.status: int | None = None  # 0 open, errno failed, None not known yet
        self.end_errno = 0  # why an open flow died (ETIMEDOUT, ECONNRESET), told to the shim
        self._on_status = on_status
        self._on_done = on_done
        self.token: bytes | None = None  # the channel token of an outbound flow
        self.inbound_key: tuple[str, int] | None = None  # loopback address of an inbound flow
        self._to_stack = b""  # read from the program, not yet taken by the stack
        self._to_prog = b""  # taken from the stack, not yet written to the program
        self._reading = False
        self._writing = False
        self._prog_eof = False
        self._peer_fin = False
        self._fin_sent_to_prog = False
        self._stack_closed = False
        self._done = False

    # ------------------------------------------------------------------ setup

    def attach_conn(self, cid: ConnId, *, established: bool = False) -> None:
        self.cid = cid
        self.engine.handlers[cid] = self
        if established:
            self._set_status(0)
        self._maybe_start()

    def attach_socket(
        self, sock: socket.socket, initial: bytes = b"", *, prepared: bool = False
    ) -> None:
        """The program's side arrived; `initial` is what it sent right after its token.
        `prepared`: sock is non-blocking with TCP_NODELAY already (the preload channel's
        data listeners hand their accepted sockets on so: two syscalls fewer a connect)."""
        if self._done:  # the flow ended before its socket came: the program sees a reset
            reset_socket(sock)
            return
        self._to_stack = initial
        if not prepared:
            sock.setblocking(False)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        if self.status not in (None, 0):
            self._fail_program()
            return
        self._maybe_start()

    def _maybe_start(self) -> None:
        if self.sock is not None and self.connected and not self._done:
            if self._to_stack:
                self._push_to_stack()
            else:
                self._want_read(True)
            self._pull_from_stack()

    def _set_status(self, status: int) -> None:
        if self.status is None:
            self.status = status
            self.connected = status == 0
            if self._on_status is not None:
                self._on_status(status)

    # ------------------------------------------------------------------ stack events

    def on_event(self, event: Event) -> None:
        if isinstance(event, Readable):
            self._pull_from_stack()
        elif isinstance(event, Writable):
            self._push_to_stack()
        elif isinstance(event, Connected):
            self._set_status(0)
            self._maybe_start()
        elif isinstance(event, PeerClosed):
            self._peer_fin = True
            self._pull_from_stack()
        elif isinstance(event, ConnectFailed | Reset):
            self._set_status(event.errno)
            self.end_errno = event.errno
            self._fail_program()
        elif isinstance(event, Closed):
            self._stack_closed = True
            self._set_status(errno.ECONNRESET)
            self._finish_if_done()

    # ------------------------------------------------------------------ program -> tunnel

    def _want_read(self, on: bool) -> None:
        if self.sock is None or on == self._reading:
            return
        self._reading = on
        if on:
            self.loop.add_reader(self.sock.fileno(), self._on_prog_readable)
        else:
            self.loop.remove_reader(self.sock.fileno())

    def _on_prog_readable(self) -> None:
        assert self.sock is not None
        try:
            data = self.sock.recv(CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._abort_stack()
            return
        if not data:
            self._want_read(False)
            self._prog_eof = True
            if self.cid is not None and not self._stack_closed:
                with contextlib.suppress(OSError):
                    self.engine.stack.shutdown_write(self.cid, self.engine.now())
                self.engine.schedule_flush()
            self._finish_if_done()
            return
        self._to_stack = data
        self._push_to_stack()

    def _push_to_stack(self) -> None:
        if not self._to_stack or self.cid is None or self._stack_closed:
            return
        try:
            n = self.engine.stack.send(self.cid, self._to_stack, self.engine.now())
        except OSError:
            self._fail_program()
            return
        self._to_stack = self._to_stack[n:]
        self._want_read(not self._to_stack and not self._prog_eof)
        self.engine.schedule_flush()

    # ------------------------------------------------------------------ tunnel -> program

    def _pull_from_stack(self) -> None:
        if self.sock is None or self.cid is None or not self.connected:
            return
        while not self._to_prog and not self._stack_closed:
            try:
                data = self.engine.stack.recv(self.cid, CHUNK)
            except OSError:
                break
            if not data:
                break
            self._to_prog = data
            self._write_prog()
        self.engine.schedule_flush()  # a window update may be due
        if not self._to_prog and self._peer_fin and not self._fin_sent_to_prog:
            self._fin_sent_to_prog = True
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_WR)
            self._finish_if_done()

    def _write_prog(self) -> None:
        assert self.sock is not None
        try:
            n = self.sock.send(self._to_prog)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError:
            self._abort_stack()
            return
        self._to_prog = self._to_prog[n:]
        want = bool(self._to_prog)
        if want != self._writing:
            self._writing = want
            if want:
                self.loop.add_writer(self.sock.fileno(), self._on_prog_writable)
            else:
                self.loop.remove_writer(self.sock.fileno())

    def _on_prog_writable(self) -> None:
        self._write_prog()
        if not self._to_prog:
            self._pull_from_stack()

    # ------------------------------------------------------------------ draining (at exit)

    def delivered(self) -> bool:
        """True once everything the program sent is acknowledged by the peer, FIN included
        (or the flow is over). Until then the launcher must not go away."""
        if self._done or self._stack_closed or self.cid is None:
            return self._done or self._stack_closed
        if not self.connected:
            return True  # never opened: the program could not hand us a byte for the peer
        if not self._prog_eof or self._to_stack:
            return False
        _, unacked = self.engine.stack.buffered(self.cid)
        state = self.engine.stack.conn_info(self.cid).state
        return unacked == 0 and state in _FIN_ACKED

    def undelivered(self) -> int:
        """Bytes the program handed us that the peer has not acknowledged yet."""
        if self._done or self._stack_closed or self.cid is None:
            return len(self._to_stack)
        return len(self._to_stack) + self.engine.stack.buffered(self.cid)[1]

    def describe(self) -> str:
        if self.cid is None or self._stack_closed:
            return "?"
        info = self.engine.stack.conn_info(self.cid)
        return f"{info.local[0]}:{info.local[1]} -> {info.remote[0]}:{info.remote[1]}"

    def local(self) -> tuple[str, int] | None:
        """Our end of the tunnel flow (tunnel address, port) while it exists: what a SOCKS5
        reply names as BND.ADDR/BND.PORT."""
        local = self.local_address()
        return None if local is None else (str(local[0]), local[1])

    def local_address(self) -> tuple[IPv4Address | IPv6Address, int] | None:
        """`local()` with the address as an address object."""
        if self.cid is None or self._stack_closed:
            return None
        try:
            return self.engine.stack.conn_info(self.cid).local
        except OSError:  # already gone
            return None

    def remote(self) -> tuple[str, int] | None:
        """The far end of the tunnel flow (its address, port) while it exists."""
        if self.cid is None or self._stack_closed:
            return None
        try:
            addr, port = self.engine.stack.conn_info(self.cid).remote
        except OSError:  # already gone
            return None
        return str(addr), port

    def abort(self) -> None:
        """Give up on the flow: RST to the peer and to the program."""
        self._abort_stack()

    # ------------------------------------------------------------------ endings

    def _abort_stack(self) -> None:
        if self.cid is not None and not self._stack_closed:
            self.engine.abort(self.cid)
        self._close_socket(reset=True)
        self._finish()

    def _fail_program(self) -> None:
        self._close_socket(reset=True)
        self._finish_if_done()

    def _close_socket(self, *, reset: bool) -> None:
        sock = self.sock
        if sock is None:
            return
        self._want_read(False)
        if self._writing:
            self.loop.remove_writer(sock.fileno())
            self._writing = False
        self.sock = None
        if reset:
            reset_socket(sock)
        else:
            sock.close()

    def _finish_if_done(self) -> None:
        both_shut = self._prog_eof and self._fin_sent_to_prog
        if both_shut and self.cid is not None and not self._stack_closed:
            with contextlib.suppress(OSError):
                self.engine.stack.close(self.cid, self.engine.now())
            self.engine.schedule_flush()
        if both_shut:
            self._close_socket(reset=False)
        if self._stack_closed and (self.sock is None or both_shut):
            self._finish()
        elif self._stack_closed and self.sock is not None and not self._to_prog:
            # The tunnel side is gone and nothing is left to deliver.
            if self._peer_fin:
                self._close_socket(reset=False)
            else:
                self._close_socket(reset=True)
            self._finish()

    def _finish(self) -> None:
        if self._done:
            return
        self._done = True
        if self._on_done is not None:
            self._on_done(self)
