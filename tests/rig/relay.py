#!/usr/bin/env python3
"""A lossy userspace UDP relay: drops, duplicates and reorders a share of datagrams.

This kernel has no sch_netem, so impairment happens here. Clients send to the relay's listen
socket; each client address gets its own upstream socket connected to the target (like a NAT
mapping) and replies travel back the same way. Decisions come from one seeded `random.Random`,
so a run is repeatable given the same arrival order. A reordered datagram is held until the next
one in its direction has gone out (or `hold` seconds pass). In-process: `UdpRelay(...).start()`
(sockets may come from `Netns.socket`); as a process: `relay.py --listen H:P --target H:P ...`
prints "READY host port" and, on SIGTERM, one JSON line of counters.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import selectors
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

SockFactory = Callable[[int, int], socket.socket]


def parse_hostport(text: str) -> tuple[str, int]:
    """'1.2.3.4:5' or '[fd00::1]:5' -> (host, port)."""
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def format_hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass
class DirStats:
    """Counters of one direction ("up" = client -> target, "down" = target -> client)."""

    received: int = 0
    sent: int = 0
    dropped: int = 0
    duplicated: int = 0
    reordered: int = 0  # held back and overtaken by a later datagram
    held_timeouts: int = 0  # held back, released by the timer (nothing overtook it)
    send_failed: int = 0  # the kernel refused the send (a full buffer, an unreachable target)


@dataclass
class RelayStats:
    up: DirStats = field(default_factory=DirStats)
    down: DirStats = field(default_factory=DirStats)

    def total(self, name: str) -> int:
        return int(getattr(self.up, name) + getattr(self.down, name))

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Held:
    data: bytes
    sock: socket.socket
    addr: tuple[Any, ...] | None
    deadline: float


class UdpRelay:
    """See the module docstring. Use as a context manager or start()/stop()."""

    def __init__(
        self,
        target: tuple[str, int],
        *,
        listen: tuple[str, int] = ("127.0.0.1", 0),
        loss: float = 0.0,
        dup: float = 0.0,
        reorder: float = 0.0,
        seed: int = 0,
        hold: float = 0.02,
        directions: str = "both",
        sock_factory: SockFactory | None = None,
    ) -> None:
        assert directions in ("both", "up", "down"), directions
        self.target = target
        self.loss, self.dup, self.reorder, self.hold = loss, dup, reorder, hold
        self.directions = directions
        self.rng = random.Random(seed)
        self.stats = RelayStats()
        self._factory: SockFactory = sock_factory or socket.socket
        self._sel = selectors.DefaultSelector()
        self._lock = threading.Lock()
        self._upstream: dict[tuple[Any, ...], socket.socket] = {}
        self._held: dict[str, _Held] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        fam = socket.AF_INET6 if ":" in listen[0] else socket.AF_INET
        self._listen = self._factory(fam, socket.SOCK_DGRAM)
        self._listen.bind(listen)
        self._listen.setblocking(False)
        self._sel.register(self._listen, selectors.EVENT_READ, None)
        self._wake_r, self._wake_w = socket.socketpair()
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._listen.getsockname()[:2]
        return host, port

    @property
    def endpoint(self) -> str:
        """The listen address as a WireGuard Endpoint string."""
        return format_hostport(*self.address)

    def set(self, **kwargs: float) -> None:
        """Change loss/dup/reorder while running (e.g. loss=1.0 for a black hole)."""
        with self._lock:
            for k, v in kwargs.items():
                assert k in ("loss", "dup", "reorder", "hold"), k
                setattr(self, k, v)

    def start(self) -> UdpRelay:
        self._thread = threading.Thread(target=self._run, name="udp-relay", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> RelayStats:
        """Stop the thread and close every socket (idempotent); returns the final counters."""
        if self._stop.is_set():
            return self.stats
        self._stop.set()
        self._wake_w.send(b"x")
        if self._thread is not None:
            self._thread.join(5)
        for s in [self._listen, *self._upstream.values(), self._wake_r, self._wake_w]:
            s.close()
        self._sel.close()
        return self.stats

    def __enter__(self) -> UdpRelay:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the loop ---------------------------------------------------------------------------
    def _upstream_for(self, client: tuple[Any, ...]) -> socket.socket:
        sock = self._upstream.get(client)
        if sock is None:
            fam = socket.AF_INET6 if ":" in self.target[0] else socket.AF_INET
            sock = self._factory(fam, socket.SOCK_DGRAM)
            sock.connect(self.target)
            sock.setblocking(False)
            self._upstream[client] = sock
            self._sel.register(sock, selectors.EVENT_READ, client)
        return sock

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            timeout = min((h.deadline - now for h in self._held.values()), default=0.5)
            for key, _ in self._sel.select(max(timeout, 0)):
                if key.data == "wake":
                    continue
                sock: socket.socket = key.fileobj  # type: ignore[assignment]
                while True:
                    try:
                        data, addr = sock.recvfrom(65535)
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError:  # e.g. ECONNREFUSED from an earlier send
                        break
                    if key.data is None:
                        self._forward("up", data, self._upstream_for(addr), None)
                    else:
                        self._forward("down", data, self._listen, key.data)
            now = time.monotonic()
            for direction, held in list(self._held.items()):
                if held.deadline <= now:
                    del self._held[direction]
                    getattr(self.stats, direction).held_timeouts += 1
                    self._send(direction, held.data, held.sock, held.addr)

    def _forward(
        self, direction: str, data: bytes, sock: socket.socket, addr: tuple[Any, ...] | None
    ) -> None:
        st: DirStats = getattr(self.stats, direction)
        st.received += 1
        impaired = self.directions in ("both", direction)
        with self._lock:
            loss, dup, reorder, hold = self.loss, self.dup, self.reorder, self.hold
        if impaired and self.rng.random() < loss:
            st.dropped += 1
            return
        copies = 2 if impaired and self.rng.random() < dup else 1
        st.duplicated += copies - 1
        if impaired and direction not in self._held and self.rng.random() < reorder:
            self._held[direction] = _Held(data, sock, addr, time.monotonic() + hold)
            copies -= 1
        for _ in range(copies):
            self._send(direction, data, sock, addr)
        held = self._held.get(direction)
        if held is not None and held.data is not data:
            del self._held[direction]
            st.reordered += 1
            self._send(direction, held.data, held.sock, held.addr)

    def _send(
        self, direction: str, data: bytes, sock: socket.socket, addr: tuple[Any, ...] | None
    ) -> None:
        try:
            if addr is None:
                sock.send(data)
            else:
                sock.sendto(data, addr)
            getattr(self.stats, direction).sent += 1
        except OSError:
            getattr(self.stats, direction).send_failed += 1  # just more loss, but counted


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="lossy UDP relay")
    ap.add_argument("--listen", default="127.0.0.1:0")
    ap.add_argument("--target", required=True)
    for name in ("loss", "dup", "reorder"):
        ap.add_argument(f"--{name}", type=float, default=0.0)
    ap.add_argument("--hold", type=float, default=0.02)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--directions", default="both", choices=["both", "up", "down"])
    a = ap.parse_args(argv)
    relay = UdpRelay(
        parse_hostport(a.target),
        listen=parse_hostport(a.listen),
        loss=a.loss,
        dup=a.dup,
        reorder=a.reorder,
        hold=a.hold,
        seed=a.seed,
        directions=a.directions,
    )
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    relay.start()
    print("READY", *relay.address, flush=True)
    done.wait()
    print(json.dumps(relay.stop().as_dict()), flush=True)
    os._exit(0)


if __name__ == "__main__":
    main()
