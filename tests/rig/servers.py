#!/usr/bin/env python3
"""Servers the rig runs behind a WireGuard peer (stdlib only; one process per service).

    servers.py http    --port 8080 --dir D       GET /<file>, HEAD; PUT/POST /upload -> sha256
    servers.py tcpecho --port 9000               prints "ip port\\n" (the client seen), then echoes
    servers.py udpecho --port 9001               echoes each datagram, from the address it hit
    servers.py udpsink --port 9400               counts bursts by tag; bursts on request (below)
    servers.py dns     --port 53 --names JSON --log F   A/AAAA for fixed names, NXDOMAIN otherwise
    servers.py all --http 8080 --dir D --tcpecho 9000 ...  several of them in one process

Every service binds `--host` (default "::", dual-stack), prints "READY <port>..." on stdout once it
accepts traffic, serves many concurrent clients (a thread per TCP connection, backlog 1024) and
exits on SIGTERM. UDP replies carry the request's destination address as their source
(IP_PKTINFO / IPV6_PKTINFO), so a wildcard-bound server answers from the address that was hit.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import ipaddress
import json
import os
import signal
import socket
import socketserver
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

BACKLOG = 1024
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
IPV6_RECVPKTINFO = socket.IPV6_RECVPKTINFO
IPV6_PKTINFO = socket.IPV6_PKTINFO
QTYPES = {1: "A", 28: "AAAA", 5: "CNAME", 15: "MX", 16: "TXT", 33: "SRV", 65: "HTTPS", 255: "ANY"}


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _plain(ip: str) -> str:
    """'::ffff:10.0.0.1' -> '10.0.0.1' (a dual-stack socket reports IPv4 peers mapped)."""
    return ip[7:] if ip.startswith("::ffff:") and "." in ip else ip


def _bind(sock: socket.socket, host: Any, port: int) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if sock.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if host == "::" else 1)
    sock.bind((host, port))


# -- HTTP ---------------------------------------------------------------------------------------
class _HTTPServer(ThreadingHTTPServer):
    """Set address_family per instance via serve_http (one process may run several)."""

    daemon_threads = True
    request_queue_size = BACKLOG
    allow_reuse_address = True
    files_dir = Path(".")

    def server_bind(self) -> None:
        _bind(self.socket, *self.server_address[:2])
        self.server_address = self.socket.getsockname()
        self.server_port = self.server_address[1]


class _HTTPHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _HTTPServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _file(self) -> Path | None:
        name = self.path.split("?", 1)[0].lstrip("/")
        if not name or "/" in name or name.startswith("."):
            return None
        p = self.server.files_dir / name
        return p if p.is_file() else None

    def _reply(self, code: int, body: bytes, ctype: str = "text/plain") -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        if self.path in ("/", "/index.json"):
            names = sorted(p.name for p in self.server.files_dir.iterdir() if p.is_file())
            self._reply(200, json.dumps(names).encode() + b"\n", "application/json")
            return
        p = self._file()
        if p is None:
            self._reply(404, b"not found\n")
            return
        with open(p, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(size))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.flush()
                self.connection.sendfile(f)

    def do_PUT(self) -> None:
        if self.path.split("?", 1)[0] != "/upload":
            self._reply(404, b"uploads go to /upload\n")
            return
        h = hashlib.sha256()
        n = 0
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                size = int(self.rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                left = size
                while left:
                    chunk = self.rfile.read(min(left, 1 << 16))
                    if not chunk:
                        raise ConnectionError("truncated chunk")
                    h.update(chunk)
                    n += len(chunk)
                    left -= len(chunk)
                self.rfile.readline()
        else:
            left = int(self.headers.get("Content-Length", "0"))
            while left:
                chunk = self.rfile.read(min(left, 1 << 16))
                if not chunk:
                    raise ConnectionError("truncated body")
                h.update(chunk)
                n += len(chunk)
                left -= len(chunk)
        body = json.dumps({"sha256": h.hexdigest(), "length": n}).encode() + b"\n"
        self._reply(200, body, "application/json")

    do_POST = do_PUT


def serve_http(host: str, port: int, files_dir: Path) -> int:
    cls = type("_HTTPServerX", (_HTTPServer,), {"address_family": _family(host)})
    srv = cls((host, port), _HTTPHandler)
    srv.files_dir = files_dir
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return int(srv.server_port)


# -- TCP echo -----------------------------------------------------------------------------------
class _TCPServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    request_queue_size = BACKLOG
    allow_reuse_address = True

    def server_bind(self) -> None:
        _bind(self.socket, *self.server_address[:2])
        self.server_address = self.socket.getsockname()


class _TCPServer6(_TCPServer):
    address_family = socket.AF_INET6


def _tcp_server(host: str, port: int, handler: type[socketserver.BaseRequestHandler]) -> _TCPServer:
    cls = _TCPServer6 if _family(host) == socket.AF_INET6 else _TCPServer
    return cls((host, port), handler)


class _EchoHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock: socket.socket = self.request
        ip, port = self.client_address[:2]
        try:
            sock.sendall(f"{_plain(ip)} {port}\n".encode())
            while data := sock.recv(1 << 16):
                sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def serve_tcpecho(host: str, port: int) -> int:
    srv = _tcp_server(host, port, _EchoHandler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return int(srv.server_address[1])


# -- UDP with reply-from-the-address-hit ----------------------------------------------------------
def _udp_socket(host: str, port: int) -> socket.socket:
    sock = socket.socket(_family(host), socket.SOCK_DGRAM)
    _bind(sock, host, port)
    sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
    if sock.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVPKTINFO, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 21)
    return sock


def _reply_cmsg(ancdata: list[tuple[int, int, bytes]]) -> list[tuple[int, int, bytes]]:
    """Turn the received PKTINFO into the one that makes the reply leave from that address."""
    for level, kind, data in ancdata:
        if level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(data) >= 12:
            _ifindex, _spec_dst, dst = struct.unpack("=I4s4s", data[:12])
            return [(socket.IPPROTO_IP, IP_PKTINFO, struct.pack("=I4s4s", 0, dst, bytes(4)))]
        if level == socket.IPPROTO_IPV6 and kind == IPV6_PKTINFO and len(data) >= 20:
            return [(level, IPV6_PKTINFO, data[:20])]
    return []


Replies = bytes | Iterable[bytes] | None


def serve_udp(
    host: str, port: int, handle: Callable[[bytes, tuple[Any, ...]], Replies]
) -> socket.socket:
    """Bind, then answer each datagram with handle(data, addr) in a thread: one reply, several
    (sent back to back; the sink's burst), or None for no reply."""
    sock = _udp_socket(host, port)

    def loop() -> None:
        space = socket.CMSG_SPACE(64)
        while True:
            try:
                data, anc, _flags, addr = sock.recvmsg(65535, space)
            except OSError:
                return
            replies = handle(data, addr)
            for reply in [replies] if isinstance(replies, bytes) else replies or ():
                with contextlib.suppress(OSError):  # a failed send is skipped, as UDP would
                    sock.sendmsg([reply], _reply_cmsg(anc), 0, addr)

    threading.Thread(target=loop, daemon=True).start()
    return sock


def serve_udpecho(host: str, port: int) -> int:
    sock = serve_udp(host, port, lambda data, addr: data)
    return int(sock.getsockname()[1])


# -- UDP burst sink (bench rows 7 and 7r) ---------------------------------------------------------
SINK_TAG = 8  # bytes of a run's tag
SINK_TAGS = 64  # tags remembered (oldest forgotten first)
SINK_RCVBUF = 64 << 20  # SO_RCVBUFFORCE: the sink itself must not be what drops
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)  # Linux; not in Python's socket module


class UdpSink:
    """Counts distinct sequence numbers per tag; answers queries; bursts on request.

    Every datagram starts with one kind byte:
      b"D" tag(8) u32 seq [padding]   counted (a duplicate is counted once)
      b"!" ...                        echoed (a warm-up ping: the handshake is done)
      b"?" tag(8)                     answered with JSON {"distinct": n, "received": m}
      b"B" tag(8) u32 count u16 size  answered with `count` datagrams b"D" tag seq padding of
                                      `size` bytes, sent back to back (no pacing)
    Anything else is ignored."""

    def __init__(self) -> None:
        self.seen: dict[bytes, set[int]] = {}
        self.received: dict[bytes, int] = {}

    def handle(self, data: bytes, _addr: object = None) -> Replies:
        kind, tag = data[:1], data[1 : 1 + SINK_TAG]
        if kind == b"D" and len(data) >= 1 + SINK_TAG + 4:
            seq = int.from_bytes(data[1 + SINK_TAG : 5 + SINK_TAG], "big")
            if tag not in self.seen:
                while len(self.seen) >= SINK_TAGS:
                    oldest = next(iter(self.seen))
                    del self.seen[oldest], self.received[oldest]
                self.seen[tag], self.received[tag] = set(), 0
            self.seen[tag].add(seq)
            self.received[tag] += 1
            return None
        if kind == b"!":
            return data
        if kind == b"?" and len(tag) == SINK_TAG:
            got = {"distinct": len(self.seen.get(tag, ())), "received": self.received.get(tag, 0)}
            return json.dumps(got).encode()
        if kind == b"B" and len(data) == 1 + SINK_TAG + 6:
            count, size = struct.unpack("!IH", data[1 + SINK_TAG :])
            return self.burst(tag, count, size)
        return None

    @staticmethod
    def burst(tag: bytes, count: int, size: int) -> Iterator[bytes]:
        pad = bytes(max(0, size - 1 - SINK_TAG - 4))
        for seq in range(count):
            yield b"D" + tag + seq.to_bytes(4, "big") + pad


def serve_udpsink(host: str, port: int) -> int:
    """The sink, in serve_udp's thread: what arrives during a burst waits in its buffer."""
    sock = serve_udp(host, port, UdpSink().handle)
    with contextlib.suppress(OSError):  # needs CAP_NET_ADMIN; else the sysctl's limit
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, SINK_RCVBUF)
    return int(sock.getsockname()[1])


# -- DNS (RFC 1035 4.1) ---------------------------------------------------------------------------
class DnsZone:
    """Fixed A/AAAA records; answers one question per message; logs every query (JSON lines)."""

    def __init__(self, names: dict[str, Any], log_path: Path | None) -> None:
        self.records: dict[str, dict[int, list[bytes]]] = {}
        for name, value in names.items():
            rec: dict[int, list[bytes]] = {1: [], 28: []}
            items = (
                value if isinstance(value, list) else [*value.get("A", []), *value.get("AAAA", [])]
            )
            for ip in items:
                packed = ipaddress.ip_address(ip).packed
                rec[1 if len(packed) == 4 else 28].append(packed)
            self.records[name.lower().rstrip(".")] = rec
        self.log_path = log_path
        self.lock = threading.Lock()

    def log(self, entry: dict[str, Any]) -> None:
        if self.log_path is None:
            return
        with self.lock, open(self.log_path, "a") as f:
            f.write(json.dumps(entry) + "\n")

    def answer(self, msg: bytes, transport: str, addr: tuple[Any, ...]) -> bytes | None:
        entry: dict[str, Any] = {"t": time.time(), "transport": transport}
        entry.update(client=_plain(addr[0]), port=addr[1])
        if len(msg) < 12:
            entry["error"] = "short"
            self.log(entry)
            return None
        qid, flags, qdcount = struct.unpack("!HHH", msg[:6])
        rd = flags & 0x0100
        try:
            if flags & 0x8000 or qdcount != 1:
                raise ValueError("not a single-question query")
            labels, off = [], 12
            while True:
                n = msg[off]
                off += 1
                if n == 0:
                    break
                if n & 0xC0:
                    raise ValueError("compressed question")
                labels.append(msg[off : off + n].decode("ascii"))
                off += n
            qtype, qclass = struct.unpack("!HH", msg[off : off + 4])
            question = msg[12 : off + 4]
        except (ValueError, IndexError, struct.error, UnicodeDecodeError) as exc:
            entry["error"] = str(exc)
            self.log(entry)
            return struct.pack("!HHHHHH", qid, 0x8000 | rd | 1, 0, 0, 0, 0)  # FORMERR
        name = ".".join(labels).lower()
        entry.update(name=name, qtype=QTYPES.get(qtype, str(qtype)))
        rec = self.records.get(name)
        answers = [] if rec is None or qclass != 1 else rec.get(qtype, [])
        rcode = 3 if rec is None else 0  # NXDOMAIN / NOERROR (maybe no data)
        entry["rcode"] = "NXDOMAIN" if rcode else "NOERROR"
        self.log(entry)
        head = struct.pack(
            "!HHHHHH", qid, 0x8000 | 0x0400 | rd | 0x0080 | rcode, 1, len(answers), 0, 0
        )
        body = b"".join(struct.pack("!HHHIH", 0xC00C, qtype, 1, 60, len(a)) + a for a in answers)
        return head + question + body


class _DnsTCPHandler(socketserver.BaseRequestHandler):
    zone: DnsZone

    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.settimeout(10)
        f = sock.makefile("rb")
        try:
            while len(hdr := f.read(2)) == 2:
                msg = f.read(struct.unpack("!H", hdr)[0])
                reply = self.zone.answer(msg, "tcp", self.client_address)
                if reply is None:
                    return
                sock.sendall(struct.pack("!H", len(reply)) + reply)
        except OSError:
            pass


def serve_dns(host: str, port: int, names: dict[str, Any], log_path: Path | None) -> int:
    zone = DnsZone(names, log_path)
    udp = serve_udp(host, port, lambda data, addr: zone.answer(data, "udp", addr))
    port = udp.getsockname()[1]
    handler = type("_DnsTCP", (_DnsTCPHandler,), {"zone": zone})
    tcp = _tcp_server(host, port, handler)
    threading.Thread(target=tcp.serve_forever, daemon=True).start()
    return int(port)


# -- DNS client helper (for tests; no resolver library needed) ------------------------------------
def dns_query(name: str, qtype: str = "A", qid: int = 0x1234) -> bytes:
    code = {v: k for k, v in QTYPES.items()}[qtype]
    qname = b"".join(bytes([len(p)]) + p.encode() for p in name.rstrip(".").split(".")) + b"\0"
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + qname + struct.pack("!HH", code, 1)


def dns_parse_reply(msg: bytes) -> tuple[int, list[str]]:
    """(rcode, addresses) of a reply to dns_query(); only what DnsZone emits is understood."""
    _qid, flags, qd, an = struct.unpack("!HHHH", msg[:8])
    off = 12
    for _ in range(qd):
        while msg[off]:
            off += msg[off] + 1
        off += 5
    out = []
    for _ in range(an):
        off += 2  # compressed name pointer
        _t, _c, _ttl, rdlen = struct.unpack("!HHIH", msg[off : off + 10])
        off += 10
        out.append(str(ipaddress.ip_address(msg[off : off + rdlen])))
        off += rdlen
    return flags & 0xF, out


def _wait_forever() -> None:
    while True:
        time.sleep(3600)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="service", required=True)
    services = (("http", 8080), ("tcpecho", 9000), ("udpecho", 9001), ("udpsink", 9400))
    for name, port in (*services, ("dns", 53)):
        p = sub.add_parser(name)
        p.add_argument("--host", default="::")
        p.add_argument("--port", type=int, default=port)
        p.add_argument("--tag", default="", help="ignored; lets a rig find its own processes")
        if name == "http":
            p.add_argument("--dir", type=Path, required=True)
        if name == "dns":
            p.add_argument("--names", default="{}", help="JSON {name: [ip, ...]}")
            p.add_argument("--log", type=Path)
    p = sub.add_parser("all", help="several services in one process (saves start-up time)")
    p.add_argument("--host", default="::")
    p.add_argument("--tag", default="")
    for name in ("http", "tcpecho", "udpecho", "udpsink", "dns"):
        p.add_argument(f"--{name}", type=int, metavar="PORT", help=f"run {name} on PORT")
    p.add_argument("--dir", type=Path)
    p.add_argument("--names", default="{}")
    p.add_argument("--log", type=Path)
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    run: dict[str, int | None] = {args.service: getattr(args, "port", None)}
    if args.service == "all":
        run = {k: getattr(args, k) for k in ("http", "tcpecho", "udpecho", "udpsink", "dns")}
    ports: list[int] = []
    for service, maybe_port in run.items():
        if maybe_port is None:
            continue
        port = maybe_port
        if service == "http":
            ports.append(serve_http(args.host, port, args.dir))
        elif service == "tcpecho":
            ports.append(serve_tcpecho(args.host, port))
        elif service == "udpecho":
            ports.append(serve_udpecho(args.host, port))
        elif service == "udpsink":
            ports.append(serve_udpsink(args.host, port))
        else:
            ports.append(serve_dns(args.host, port, json.loads(args.names), args.log))
    print("READY", *ports, flush=True)
    _wait_forever()


if __name__ == "__main__":
    main()
