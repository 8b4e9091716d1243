"""Two Stacks joined in memory through a lossy link on a fake clock (for tests and benches).

`Pair` moves packets between stacks `a` and `b` with a per-direction `LinkModel` (delay,
loss, duplication, reordering drawn from an injected RNG), runs their timers, and returns the
events of each step. Nothing here reads a clock or draws its own random numbers, so a seed
replays a run exactly.
"""

from __future__ import annotations

import hashlib
import heapq
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from wrapguard.netstack.events import (
    Accepted,
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
from wrapguard.netstack.stack import Stack

__all__ = ["LinkModel", "Pair", "TransferResult", "UniformRng", "run_transfer"]


class UniformRng(Protocol):
    """Anything with `random() -> float` in [0, 1), e.g. `random.Random(seed)`."""

    def random(self) -> float: ...


@dataclass(frozen=True, slots=True)
class LinkModel:
    """One direction of the link: base delay (s), drop/duplicate/reorder probabilities."""

    delay: float = 0.005
    loss: float = 0.0
    duplicate: float = 0.0
    reorder: float = 0.0
    reorder_delay: float = 0.004


class Pair:
    """Stacks a and b in memory; `step()` advances the fake clock to the next thing to do."""

    def __init__(
        self,
        a: Stack,
        b: Stack,
        rng: UniformRng,
        ab: LinkModel | None = None,
        ba: LinkModel | None = None,
        now: float = 0.0,
    ) -> None:
        self.a = a
        self.b = b
        self.rng = rng
        self.models = {id(a): ab or LinkModel(), id(b): ba or LinkModel()}
        self.now = now
        self._flight: list[tuple[float, int, Stack, bytes]] = []
        self._seq = 0
        self.sent = 0
        self.delivered = 0
        self.taps: list[tuple[str, bytes]] | None = None

    def _ship(self, src: Stack, dst: Stack) -> None:
        model = self.models[id(src)]
        rnd = self.rng.random
        for pkt in src.take_outgoing():
            self.sent += 1
            if self.taps is not None:
                self.taps.append(("a" if src is self.a else "b", pkt))
            if model.loss and rnd() < model.loss:
                continue
            copies = 2 if model.duplicate and rnd() < model.duplicate else 1
            for _ in range(copies):
                t = self.now + model.delay
                if model.reorder and rnd() < model.reorder:
                    t += model.reorder_delay * rnd()
                self._seq += 1
                heapq.heappush(self._flight, (t, self._seq, dst, pkt))

    def flush(self) -> None:
        """Put everything both stacks want to send on the wire."""
        self._ship(self.a, self.b)
        self._ship(self.b, self.a)

    def events(self) -> Iterator[tuple[str, Event]]:
        """Drain both stacks' events one at a time (lazily), tagged 'a' or 'b'."""
        for name, st in (("a", self.a), ("b", self.b)):
            ev = st.next_event()
            while ev is not None:
                yield name, ev
                ev = st.next_event()

    def next_time(self) -> float | None:
        """When something next happens: a packet arrival or a timer."""
        cands = [t for t in (self.a.next_deadline(), self.b.next_deadline()) if t is not None]
        if self._flight:
            cands.append(self._flight[0][0])
        return min(cands) if cands else None

    def step(self, limit: float | None = None) -> bool:
        """Advance to the next arrival or timer (not past `limit`); False if idle."""
        self.flush()
        t = self.next_time()
        if t is None or (limit is not None and t > limit):
            if limit is not None:
                self.now = max(self.now, limit)
            return False
        self.now = max(self.now, t)
        flight = self._flight
        while flight and flight[0][0] <= self.now:
            _t, _s, dst, pkt = heapq.heappop(flight)
            self.delivered += 1
            dst.receive_packet(pkt, self.now)
        self.a.handle_timeout(self.now)
        self.b.handle_timeout(self.now)
        self.flush()
        return True

    def in_flight(self) -> int:
        """Packets on the wire."""
        return len(self._flight)


@dataclass(frozen=True, slots=True)
class TransferResult:
    """What `run_transfer` saw: digests of the bytes each side received, and the clocks."""

    a_received: bytes
    b_received: bytes
    a_count: int
    b_count: int
    sim_time: float
    errors: tuple[Event, ...]
    max_buffered: int


def run_transfer(
    pair: Pair,
    a_data: bytes,
    b_data: bytes,
    port: int = 80,
    dst: str = "10.150.0.2",
    limit: float = 600.0,
) -> TransferResult:
    """a connects to b:port; both send their data, half-close, read to EOF and close.

    Returns sha256 digests of what each side read. `max_buffered` is the largest receive
    plus send buffer seen on any connection (for memory-bound checks).
    """
    stacks = {"a": pair.a, "b": pair.b}
    data = {"a": memoryview(a_data), "b": memoryview(b_data)}
    sent = {"a": 0, "b": 0}
    digests = {"a": hashlib.sha256(), "b": hashlib.sha256()}
    counts = {"a": 0, "b": 0}
    shut = {"a": False, "b": False}
    closed: set[str] = set()
    eof: set[str] = set()
    conns: dict[str, ConnId | None] = {"a": None, "b": None}
    errors: list[Event] = []
    max_buf = 0
    pair.b.listen(port)
    conns["a"] = pair.a.connect(dst, port, pair.now)

    def pump(side: str) -> None:
        cid = conns[side]
        if cid is None or shut[side]:
            return
        st, buf = stacks[side], data[side]
        while sent[side] < len(buf):
            try:
                n = st.send(cid, buf[sent[side] : sent[side] + 262144], pair.now)
            except OSError:
                return  # the connection died (its Reset event says why)
            if n == 0:
                return
            sent[side] += n
        st.shutdown_write(cid, pair.now)
        shut[side] = True
        if side in eof:
            st.close(cid, pair.now)

    while len(closed) < 2 and pair.now < limit:
        for side, ev in pair.events():
            st = stacks[side]
            if isinstance(ev, Accepted):
                conns[side] = ev.conn
                pump(side)
            elif isinstance(ev, Connected | Writable):
                pump(side)
            elif isinstance(ev, Readable):
                chunk = st.recv(ev.conn, 1 << 22)
                while chunk:
                    digests[side].update(chunk)
                    counts[side] += len(chunk)
                    chunk = st.recv(ev.conn, 1 << 22)
            elif isinstance(ev, PeerClosed):
                eof.add(side)
                if shut[side]:  # close only once our own data is all queued
                    st.close(ev.conn, pair.now)
            elif isinstance(ev, Closed):
                closed.add(side)
            elif isinstance(ev, Reset | ConnectFailed):
                errors.append(ev)
        for side in ("a", "b"):
            cid = conns[side]
            if cid is not None and side not in closed:
                r, w = stacks[side].buffered(cid)
                max_buf = max(max_buf, r + w)
        if not pair.step():
            break
    return TransferResult(
        digests["a"].digest(),
        digests["b"].digest(),
        counts["a"],
        counts["b"],
        pair.now,
        tuple(errors),
        max_buf,
    )
