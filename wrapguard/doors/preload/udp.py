"""The preload door's UDP relay: the program's UDP sockets associated with tunnel UDP flows.

The shim's datagrams, each with a `UdpHeader` naming its real destination, arrive on the
socket's data connection (unix SOCK_SEQPACKET, authenticated by the channel with the
association's token), drained in batches and left unread while a peer's staged queue is full,
so that the program's send blocks as the kernel's would. Replies go to the program's socket
from one loopback UDP port (127.0.0.1 and ::1) with a header naming their real source (ICMP
errors as ERROR markers) and the association's token, which the shim checks. That port is
send-only: a kernel filter drops whatever anyone sends to it (docs/channel.md, "UDP").
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import ipaddress
import secrets
import socket
import struct
from dataclasses import dataclass

from wrapguard import log
from wrapguard.doors.preload.channel import loopback_pair
from wrapguard.errors import DecodeError
from wrapguard.runtime.service import TunnelService, UdpFlow
from wrapguard.wire.ipc import (
    TOKEN_LEN,
    UDP_HDR_LEN,
    Address,
    UdpHeader,
    UdpKind,
    emit_relay_datagram,
    parse_udp_header,
)

try:
    from wrapguard._fastpath import ffi as _ffi  # type: ignore[import-not-found]
    from wrapguard._fastpath import lib as _lib

    HAVE_MMSG = hasattr(_lib, "wg_recvmmsg")
except ImportError:  # not built: one recv_into per record
    HAVE_MMSG = False

__all__ = ["UdpRelay", "UdpRelayStats"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Key = tuple[str, int]  # the program socket's loopback side: ("127.0.0.1" | "::1", port)
_ERRNO = struct.Struct("!I")
SO_ATTACH_FILTER = 26  # <asm-generic/socket.h>
DNS_PORT = 53
DNS_REMEMBERED = 256  # forwarded queries per association whose replies can still be mapped
PREFIXES_KEPT = 256  # tunnel sources per association whose relay header is kept
LO4, LO6 = "127.0.0.1", "::1"
DRAIN_BATCH = 64  # records per readable callback, then one flush into the tunnel
RECORD_BUF = 65536 + 64  # any datagram + its header fits (a full buffer means truncated)
PAUSE_CHECK = 0.01  # s between looks at a staged queue while intake is paused
PAUSE_MAX = 5.0  # s: Rekey-Timeout [W 6.1]; a peer that has not answered by then stops pausing
CLOSE_BATCHES = 64  # at close, batches read per connection before it is dropped
MMSG_RECORDS = 8  # records per recvmmsg call (the cffi helper), DRAIN_BATCH per callback
_ADDR_SLOT = 28  # the helper's source address slot per record (unused for unix sockets)
_TRUNCATED = 0xFFFFFFFF


@dataclass(slots=True)
class UdpRelayStats:
    """Datagrams relayed each way, and everything dropped."""

    to_tunnel: int = 0
    from_tunnel: int = 0
    errors_sent: int = 0
    malformed: int = 0
    send_failed: int = 0  # the netstack refused (EMSGSIZE, no address of that family)


def _plain(ip: IPAddress) -> IPAddress:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


class _Assoc:
    """One program socket <-> one tunnel UDP flow; what comes back on it."""

    __slots__ = (
        "conns", "dns", "dst_cache", "flow", "key", "last_prefix", "prefixes", "relay", "token",
    )  # fmt: skip

    def __init__(self, relay: UdpRelay, key: Key, port: int) -> None:
        self.relay, self.key = relay, key
        self.flow: UdpFlow = relay.service.open_udp(self.on_datagram, self.on_error, port)
        self.conns: set[socket.socket] = set()  # data connections (a fork()ed child shares one)
        # Carried by every datagram from the program: another local user who binds the
        # association's loopback port (after the program closed it) cannot know it.
        self.token = secrets.token_bytes(TOKEN_LEN)
        # Forwarded DNS queries: (server, message id) -> the address the program asked.
        self.dns: dict[tuple[IPAddress, bytes], Address] = {}
        # Per tunnel source (not port 53: a reply may stand for the address the program
        # asked): the relay header + token the program's datagrams from it start with.
        self.prefixes: dict[tuple[IPAddress, int], bytes] = {}
        # The last DATA header from the program to a port other than 53 and where it goes
        # (a connected socket's datagrams all carry the same one): no parse per datagram.
        self.dst_cache: tuple[bytes, tuple[IPAddress, int]] | None = None
        # The last source's (address, port, prefix): the netstack hands out one address
        # object per address, so `is` finds it without hashing the address (ipaddress
        # hashes in Python).
        self.last_prefix: tuple[IPAddress, int, bytes] | None = None

    def on_datagram(self, src: tuple[IPAddress, int], data: bytes) -> None:
        last = self.last_prefix
        if last is not None and src[0] is last[0] and src[1] == last[1]:
            self.relay.send_to_program(self, last[2] + data)
            return
        prefix = self.prefixes.get(src)
        if prefix is None:
            source = self.relay.program_source(self, src, data)
            header = UdpHeader(UdpKind.DATA, source)
            if src[1] == DNS_PORT:
                self.relay.to_program(self, header, data)
                return
            prefix = emit_relay_datagram(header, self.token, b"")
            if len(self.prefixes) >= PREFIXES_KEPT:
                self.prefixes.clear()
            self.prefixes[src] = prefix
        self.last_prefix = (src[0], src[1], prefix)
        self.relay.send_to_program(self, prefix + data)

    def on_error(self, dst: tuple[IPAddress, int], err: int) -> None:
        self.relay.stats.errors_sent += 1
        where = Address(dst[0], dst[1])
        self.relay.to_program(self, UdpHeader(UdpKind.ERROR, where), _ERRNO.pack(err))


_DROP_ALL = struct.pack("HBBI", 0x06, 0, 0, 0)  # classic BPF: BPF_RET|BPF_K, accept 0 bytes


def _drop_everything(sock: socket.socket) -> None:
    """SO_ATTACH_FILTER with a program that keeps nothing (socket(7), filter(2))."""
    prog = ctypes.create_string_buffer(_DROP_ALL)
    fprog = struct.pack("HL", 1, ctypes.addressof(prog))  # struct sock_fprog
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)


class UdpRelay:
    """The associations, their data connections and the loopback relay port; `start()`, then
    `env_value()`; `attach()` for each data connection the channel authenticated."""

    def __init__(self, service: TunnelService) -> None:
        self.service = service
        self.log = log.get("wrapguard.udp")
        self.port = 0
        self.has_v6 = False
        self.assocs: dict[Key, _Assoc] = {}
        self.stats = UdpRelayStats()
        self._relay_socks: dict[str, socket.socket] = {}  # LO4 / LO6 -> the relay port's socket
        self._by_token: dict[bytes, _Assoc] = {}
        self._buf = bytearray(RECORD_BUF)
        self._mv = memoryview(self._buf)
        # With the cffi helper: recvmmsg into MMSG_RECORDS slots, so that a drain costs one
        # syscall per few records and none (no BlockingIOError) to find the queue empty.
        # Set up by the first attach() (no buffer for a program that sends no UDP).
        self._mm: tuple[memoryview, object, object, object] | None = None
        self._paused: dict[socket.socket, _Assoc] = {}  # data connections left unread
        self._pause_timer: asyncio.TimerHandle | None = None
        self._paused_since = 0.0
        self._given_up: set[int] = set()  # peers that did not answer within PAUSE_MAX

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        del loop
        for host, sock in self._sockets():
            # Send-only: datagrams come in on the data connections (docs/channel.md "UDP").
            # Whatever anyone sends to this port is dropped by the kernel, for free.
            sock.setblocking(False)
            _drop_everything(sock)
            self._relay_socks[host] = sock

    def _sockets(self) -> list[tuple[str, socket.socket]]:
        """127.0.0.1 and ::1 on one ephemeral port (the shim knows only the number)."""
        self.port, v4, v6 = loopback_pair(socket.SOCK_DGRAM, "the UDP relay")
        self.has_v6 = v6 is not None
        return [(LO4, v4)] if v6 is None else [(LO4, v4), (LO6, v6)]

    def env_value(self) -> str:
        """WRAPGUARD_UDP for the shim: the port, with "/4" when there is no ::1 socket."""
        return str(self.port) if self.has_v6 else f"{self.port}/4"

    def take_queued(self) -> None:
        """Read what a program sent just before it exited and is still queued on its data
        connections, into the tunnel (at exit, before the drain)."""
        for assoc in list(self.assocs.values()):
            for conn in list(assoc.conns):
                for _ in range(CLOSE_BATCHES):
                    if not self._drain(conn, assoc, pause=False):
                        break

    def close(self) -> None:
        self.take_queued()
        for sock in self._relay_socks.values():
            sock.close()
        self._relay_socks.clear()
        for key in list(self.assocs):
            self.release(key)
        if self._pause_timer is not None:
            self._pause_timer.cancel()
            self._pause_timer = None

    # -- associations --------------------------------------------------------------------------

    def _key(self, local: Address) -> Key:
        return (str(_plain(local.ip)), local.port)

    def _source(self, assoc: _Assoc, version: int) -> Address:
        ip = next((a for a in self.service.addresses if a.version == version), None)
        if ip is None:
            raise OSError(errno.ENETUNREACH, f"no tunnel address of IPv{version}")
        return Address(ip, assoc.flow.port)

    def _add(self, key: Key, port: int) -> _Assoc:
        old = self.assocs.get(key)
        if old is not None:
            if port == 0 or old.flow.port == port:
                return old
            self.release(key)
        assoc = _Assoc(self, key, port)
        self.assocs[key] = assoc
        self._by_token[assoc.token] = assoc
        self.log.debug("udp association", local=f"{key[0]}:{key[1]}", port=port or "ephemeral")
        return assoc

    def assoc(self, local: Address, dst: Address) -> Address:
        """Associate the program socket `local` (if new) and return our source toward `dst`."""
        assoc = self._add(self._key(local), 0)
        return self._source(assoc, _plain(dst.ip).version)

    def token(self, local: Address) -> bytes | None:
        """The association's token, handed to the shim over the authenticated channel."""
        assoc = self.assocs.get(self._key(local))
        return None if assoc is None else assoc.token

    def bind(self, bound: Address) -> None:
        """The program bound UDP port P on the wildcard or a tunnel address; `bound` is its
        socket's loopback side (docs/channel.md: LISTEN with proto 17). Receive on port P of
        our tunnel addresses. Raises OSError (EADDRINUSE) if the netstack has it."""
        if bound.port == 0:
            return
        if bound.ip.is_loopback:
            key = self._key(bound)
        else:  # an older shim's bound address: derive the loopback side from its family
            key = (LO6 if bound.ip.version == 6 and self.has_v6 else LO4, bound.port)
        self._add(key, bound.port)
        self.log.info("receiving UDP from the tunnel", port=bound.port)

    def release(self, local: Address | Key) -> None:
        key = local if isinstance(local, tuple) else self._key(local)
        assoc = self.assocs.pop(key, None)
        if assoc is not None:
            self._by_token.pop(assoc.token, None)
            for conn in list(assoc.conns):  # a sharer's next send re-associates (docs/shim.md)
                # What the program sent before it closed its socket (or exited) is still
                # queued on the data connection: into the tunnel first, never dropped.
                for _ in range(CLOSE_BATCHES):
                    if conn not in assoc.conns or not self._drain(conn, assoc, pause=False):
                        break
                if conn in assoc.conns:
                    self._detach(conn, assoc)
            assoc.flow.close()

    # -- data connections ----------------------------------------------------------------------

    def attach(self, token: bytes, conn: socket.socket) -> bool:
        """A data connection presented `token`: read it if an association has that token."""
        assoc = self._by_token.get(token)
        if assoc is None:
            return False
        if HAVE_MMSG and self._mm is None:
            self.use_mmsg()
        conn.setblocking(False)
        assoc.conns.add(conn)
        asyncio.get_running_loop().add_reader(conn.fileno(), self._drain, conn, assoc)
        return True

    def use_mmsg(self) -> None:
        """Read the data connections with recvmmsg (the cffi helper; attach() does this)."""
        mm_buf = bytearray(MMSG_RECORDS * RECORD_BUF)
        self._mm = (
            memoryview(mm_buf),
            _ffi.from_buffer(mm_buf),
            _ffi.new("uint32_t[]", MMSG_RECORDS),
            _ffi.new("uint8_t[]", MMSG_RECORDS * _ADDR_SLOT),
        )

    def _detach(self, conn: socket.socket, assoc: _Assoc) -> None:
        assoc.conns.discard(conn)
        if self._paused.pop(conn, None) is None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(conn.fileno())
        conn.close()

    def _drain(self, conn: socket.socket, assoc: _Assoc, pause: bool = True) -> bool:
        """Up to DRAIN_BATCH records (one datagram each), then one batch into the tunnel; the
        header's parse is reused while the destination stays the same. True when the batch
        was full (more may be queued)."""
        batch: list[tuple[tuple[IPAddress, int], bytes]] = []
        if self._mm is not None and type(conn) is socket.socket:
            read = self._read_mmsg(conn, assoc, batch)
        else:
            read = self._read_plain(conn, assoc, batch)
        if batch:
            self._send(assoc, batch)
            if pause and conn in assoc.conns and self._backlogged():
                self._pause(conn, assoc)
        return read >= DRAIN_BATCH

    def _read_plain(
        self,
        conn: socket.socket,
        assoc: _Assoc,
        batch: list[tuple[tuple[IPAddress, int], bytes]],
    ) -> int:
        """`_drain`'s reading with one recv_into the same buffer per record (the reference
        the tests compare `_read_mmsg` with); the number of records read."""
        buf, mv = self._buf, self._mv
        recv_into, take = conn.recv_into, self._take
        last: list[object] = [b"", None]  # the last header's bytes and its parse
        read = 0
        for _ in range(DRAIN_BATCH):
            try:
                n = recv_into(buf)
            except (BlockingIOError, InterruptedError):
                break
            except ConnectionResetError:
                # Reported once (the shim's end closed with data unread) before what is still
                # queued: read on, EOF comes after the last record.
                continue
            except OSError:
                n = 0
            if n == 0:  # EOF (a record is never empty: it has a header)
                self._detach(conn, assoc)
                break
            read += 1
            take(assoc, mv, 0, n if n < RECORD_BUF else _TRUNCATED, batch, last)
        return read

    def _read_mmsg(
        self,
        conn: socket.socket,
        assoc: _Assoc,
        batch: list[tuple[tuple[IPAddress, int], bytes]],
    ) -> int:
        """`_read_plain` with recvmmsg (MMSG_RECORDS per call): the same records, the same
        EOF and reset handling, one syscall per few records and no exception at the end."""
        assert self._mm is not None
        mv, bufp, lens, addrs = self._mm
        recvmmsg, take, fd = _lib.wg_recvmmsg, self._take, conn.fileno()
        last: list[object] = [b"", None]
        read = calls = 0
        while read < DRAIN_BATCH and calls < DRAIN_BATCH:
            calls += 1
            cnt = recvmmsg(fd, bufp, RECORD_BUF, min(MMSG_RECORDS, DRAIN_BATCH - read), lens, addrs)
            if cnt == -errno.ECONNRESET or cnt == -errno.EINTR:
                continue  # as _read_plain: the reset is reported once, before what is queued
            if cnt < 0:
                if cnt in (-errno.EAGAIN, -errno.EWOULDBLOCK):
                    break
                cnt = 0  # another error: as EOF
            for i in range(max(cnt, 1)):
                n = lens[i] if cnt else 0
                if n == 0:  # EOF
                    self._detach(conn, assoc)
                    return read
                read += 1
                take(assoc, mv, i * RECORD_BUF, n, batch, last)
            if cnt < MMSG_RECORDS:
                break  # the queue is empty (recvmmsg stops at the first EAGAIN)
        return read

    def _take(
        self,
        assoc: _Assoc,
        mv: memoryview,
        off: int,
        n: int,
        batch: list[tuple[tuple[IPAddress, int], bytes]],
        last: list[object],
    ) -> None:
        """One record of `n` bytes at `off` (_TRUNCATED: larger than any): its datagram onto
        `batch`, or counted as malformed. `last` caches the previous header's parse."""
        if n < UDP_HDR_LEN or n >= RECORD_BUF:
            self.stats.malformed += 1
            return
        raw = mv[off : off + UDP_HDR_LEN]
        cached = assoc.dst_cache
        if cached is not None and raw == cached[0]:
            batch.append((cached[1], bytes(mv[off + UDP_HDR_LEN : off + n])))
            return
        header = last[1]
        if header is None or raw != last[0]:
            last[0] = raw = bytes(raw)
            try:
                header = last[1] = parse_udp_header(raw)[0]
            except DecodeError:
                last[1] = None
                self.stats.malformed += 1
                return
        assert isinstance(header, UdpHeader)
        payload = bytes(mv[off + UDP_HDR_LEN : off + n])
        dst = self.destination(assoc, header, payload)
        if dst is not None:
            batch.append((dst, payload))
            if header.addr.port != DNS_PORT:  # a query's destination depends on its payload
                assoc.dst_cache = (bytes(raw), dst)

    def _send(self, assoc: _Assoc, batch: list[tuple[tuple[IPAddress, int], bytes]]) -> None:
        taken = assoc.flow.send_many(batch)
        self.stats.to_tunnel += taken
        self.stats.send_failed += len(batch) - taken  # EMSGSIZE, no address of that family

    # -- backpressure: a handshake in flight -----------------------------------------------------

    def _backlogged(self) -> set[int]:
        """Peers whose staged queue [W 6.5] has less room than one more batch: reading on
        would only push packets out of it. A peer we waited PAUSE_MAX for is left out until
        its queue drains (its handshake completed, or it dropped them [W 6.4])."""
        full = self.service.backlogged(DRAIN_BATCH)
        self._given_up &= full
        return full - self._given_up

    def _pause(self, conn: socket.socket, assoc: _Assoc) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(conn.fileno())
        if not self._paused:
            self._paused_since = loop.time()
        self._paused[conn] = assoc
        if self._pause_timer is None:
            self._pause_timer = loop.call_later(PAUSE_CHECK, self._check_paused)

    def _check_paused(self) -> None:
        self._pause_timer = None
        loop = asyncio.get_running_loop()
        waiting = self._backlogged()
        if waiting and loop.time() - self._paused_since < PAUSE_MAX:
            self._pause_timer = loop.call_later(PAUSE_CHECK, self._check_paused)
            return
        self._given_up |= waiting
        paused, self._paused = self._paused, {}
        for conn, assoc in paused.items():
            loop.add_reader(conn.fileno(), self._drain, conn, assoc)

    # -- datagrams -----------------------------------------------------------------------------

    def destination(
        self, assoc: _Assoc, header: UdpHeader, payload: bytes
    ) -> tuple[IPAddress, int] | None:
        """Where one datagram from the program goes in the tunnel (None: malformed)."""
        if header.kind is not UdpKind.DATA:
            self.stats.malformed += 1
            return None
        return self.tunnel_destination(assoc, header.addr, payload)

    # -- DNS queries to servers outside the tunnel (docs/channel.md "DNS") --------------------

    def tunnel_destination(
        self, assoc: _Assoc, addr: Address, payload: bytes
    ) -> tuple[IPAddress, int]:
        """Where a datagram to `addr` goes: as addressed, or a DNS query to a server outside
        the tunnel to the tunnel DNS server (remembered by message id for the reply)."""
        ip = _plain(addr.ip)
        if addr.port != DNS_PORT:
            return ip, addr.port
        target = self.service.dns_target(ip, addr.port)
        if target is None:
            return ip, addr.port
        if len(assoc.dns) >= DNS_REMEMBERED:
            del assoc.dns[next(iter(assoc.dns))]  # the oldest (dicts keep insertion order)
        assoc.dns[(target[0], bytes(payload[:2]))] = addr
        return target

    def program_source(self, assoc: _Assoc, src: tuple[IPAddress, int], data: bytes) -> Address:
        """The source the program sees: a forwarded query's reply comes from the address the
        program asked (resolvers drop replies from anyone else), anything else as it is."""
        if src[1] == DNS_PORT and assoc.dns:
            asked = assoc.dns.get((src[0], bytes(data[:2])))
            if asked is not None:
                return asked
        return Address(src[0], src[1])

    def to_program(self, assoc: _Assoc, header: UdpHeader, payload: bytes) -> None:
        self.send_to_program(assoc, emit_relay_datagram(header, assoc.token, payload))

    def send_to_program(self, assoc: _Assoc, datagram: bytes) -> None:
        """One relay datagram (header, token, payload) to the program's socket."""
        sock = self._relay_socks.get(assoc.key[0])
        if sock is None:
            return
        self.stats.from_tunnel += 1
        try:  # (not contextlib.suppress: a context manager per datagram)
            sock.sendto(datagram, assoc.key)
        except OSError:  # loopback: never blocks
            return
