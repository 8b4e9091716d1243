"""Drives a netstack Stack over an AF_PACKET socket on a veth, against the Linux kernel's TCP.

Run inside a network namespace by test_netstack_kernel.py (not a test module itself):
    python kernel_peer.py IFNAME PEER_MAC OUR_V4 OUR_V6 MODE ARGS...
Modes: client HOST PORT NBYTES | server PORT SECONDS NCONNS | refused HOST PORT | udp HOST PORT.
Prints one JSON line with the outcome.
"""

from __future__ import annotations

import errno
import hashlib
import json
import random
import select
import socket
import sys
import time

from wrapguard.netstack import (
    Accepted,
    Closed,
    Connected,
    ConnectFailed,
    PeerClosed,
    Readable,
    Reset,
    Stack,
    UdpError,
    Writable,
)

ETH_P_ALL = 3


class Wire:
    def __init__(self, ifname: str, peer_mac: bytes, addrs: list[str]) -> None:
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        self.sock.bind((ifname, 0))
        self.sock.setblocking(False)
        self.mac = self.sock.getsockname()[4]
        self.peer_mac = peer_mac
        self.stack = Stack(addrs, rng=random.SystemRandom().getrandbits)

    def flush(self) -> None:
        for pkt in self.stack.take_outgoing():
            et = b"\x08\x00" if pkt[0] >> 4 == 4 else b"\x86\xdd"
            self.sock.send(self.peer_mac + self.mac + et + pkt)

    def pump(self, timeout: float = 0.05) -> None:
        self.flush()
        d = self.stack.next_deadline()
        wait = timeout if d is None else max(0.0, min(timeout, d - time.monotonic()))
        r, _, _ = select.select([self.sock], [], [], wait)
        if r:
            for _ in range(512):
                try:
                    frame, addr = self.sock.recvfrom(70000)
                except BlockingIOError:
                    break
                if addr[2] == socket.PACKET_OUTGOING:
                    continue
                if frame[12:14] in (b"\x08\x00", b"\x86\xdd"):
                    self.stack.receive_packet(frame[14:], time.monotonic())
        self.stack.handle_timeout(time.monotonic())
        self.flush()

    def events(self):
        ev = self.stack.next_event()
        while ev is not None:
            yield ev
            ev = self.stack.next_event()


def client(w: Wire, host: str, port: int, nbytes: int) -> dict[str, object]:
    data = random.Random(nbytes).randbytes(nbytes)
    cid = w.stack.connect(host, port, time.monotonic())
    sent, got, closed, peer_closed = 0, hashlib.sha256(), False, False
    count, errors = 0, []
    deadline = time.monotonic() + 60
    connected = False
    while not closed and time.monotonic() < deadline:
        for ev in w.events():
            if isinstance(ev, Connected | Writable):
                connected = True
            elif isinstance(ev, Readable):
                chunk = w.stack.recv(cid, 1 << 22)
                got.update(chunk)
                count += len(chunk)
            elif isinstance(ev, PeerClosed):
                peer_closed = True
                w.stack.close(cid, time.monotonic())
            elif isinstance(ev, Closed):
                closed = True
            elif isinstance(ev, Reset | ConnectFailed):
                errors.append(ev.errno)
        if connected and sent < nbytes:
            sent += w.stack.send(cid, data[sent : sent + 262144], time.monotonic())
            if sent == nbytes:
                w.stack.shutdown_write(cid, time.monotonic())
        w.pump()
    if not closed:  # a diagnosis for the test log
        c = w.stack._by_id.get(cid)
        if c is not None:
            print(
                json.dumps(
                    {
                        k: str(getattr(c, k))
                        for k in (
                            "state",
                            "snd_una",
                            "snd_nxt",
                            "snd_max",
                            "snd_wnd",
                            "rcv_nxt",
                            "cwnd",
                            "recovery",
                            "sacked",
                            "n_timeouts",
                            "n_retransmits",
                            "t_rto",
                            "t_persist",
                        )
                    }
                    | {
                        "rcvbuf": len(c.rcv_buf),
                        "sndbuf": len(c.snd_buf),
                        "sent": sent,
                        "drops": str(dict(w.stack.drops)),
                    }
                ),
                file=sys.stderr,
            )
    return {
        "ok": got.digest() == hashlib.sha256(data).digest() and count == nbytes,
        "count": count,
        "peer_closed": peer_closed,
        "closed": closed,
        "errors": errors,
    }


def server(w: Wire, port: int, seconds: float, expect: int) -> dict[str, object]:
    w.stack.listen(port)
    print("ready", flush=True)
    pending: dict[int, bytearray] = {}
    eof: set[int] = set()
    accepted, closed, echoed = 0, 0, 0
    peers = []
    end = time.monotonic() + seconds
    while time.monotonic() < end and closed < expect:
        for ev in w.events():
            if isinstance(ev, Accepted):
                accepted += 1
                pending[ev.conn] = bytearray()
                info = w.stack.conn_info(ev.conn)
                peers.append(str(info.remote[0]))
            elif isinstance(ev, PeerClosed):
                eof.add(ev.conn)
            elif isinstance(ev, Closed):
                closed += 1
                pending.pop(ev.conn, None)
        for cid, buf in list(pending.items()):
            if len(buf) < 1 << 20:
                buf += w.stack.recv(cid, 1 << 20)
            if buf:
                n = w.stack.send(cid, buf, time.monotonic())
                echoed += n
                del buf[:n]
            if cid in eof and not buf and not w.stack.buffered(cid)[0]:
                w.stack.close(cid, time.monotonic())
                eof.discard(cid)
        w.pump(0.01)
    return {"accepted": accepted, "closed": closed, "echoed": echoed, "peers": peers}


def refused(w: Wire, host: str, port: int) -> dict[str, object]:
    cid = w.stack.connect(host, port, time.monotonic())
    end = time.monotonic() + 10
    while time.monotonic() < end:
        for ev in w.events():
            if isinstance(ev, ConnectFailed) and ev.conn == cid:
                return {"errno": ev.errno, "refused": ev.errno == errno.ECONNREFUSED}
        w.pump()
    return {"errno": None}


def udp(w: Wire, host: str, port: int) -> dict[str, object]:
    sock = w.stack.udp_bind(0)
    w.stack.udp_send(sock, (host, port), b"ping", time.monotonic())
    end = time.monotonic() + 10
    while time.monotonic() < end:
        for ev in w.events():
            if isinstance(ev, UdpError):
                return {"errno": ev.errno}
        w.pump()
    return {"errno": None}


def main() -> None:
    ifname, peer_mac, v4, v6, mode, *args = sys.argv[1:]
    w = Wire(ifname, bytes.fromhex(peer_mac.replace(":", "")), [v4, v6])
    if mode == "client":
        out = client(w, args[0], int(args[1]), int(args[2]))
    elif mode == "server":
        out = server(w, int(args[0]), float(args[1]), int(args[2]))
    elif mode == "refused":
        out = refused(w, args[0], int(args[1]))
    else:
        out = udp(w, args[0], int(args[1]))
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
