"""Benchmark: two netstack Stacks in memory on a clean link (CPU-bound, one core).

Prints one flow's payload throughput (Mbit/s of wall time) and the cost per data segment,
for IPv4 and IPv6, plus the isolated costs of building and of receiving one segment.
Not a test; run with `python bench/bench_netstack.py [MiB]`.
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

from wrapguard.netstack import Accepted, Readable, Stack

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "netstack"))
from lossy_link import LinkModel, Pair


def one_way(mib: int, v6: bool) -> tuple[float, int, int]:
    """a sends `mib` MiB to b, which reads as it arrives: (seconds, data segments, packets)."""
    rng = random.Random(1)
    a = Stack(["10.150.0.1", "fd15::1"], rng=rng.getrandbits)
    b = Stack(["10.150.0.2", "fd15::2"], rng=rng.getrandbits)
    pair = Pair(a, b, rng, LinkModel(delay=0.0005), LinkModel(delay=0.0005))
    b.listen(5001)
    total = mib << 20
    chunk = bytes(256 * 1024)
    ca = a.connect("fd15::2" if v6 else "10.150.0.2", 5001, 0.0)
    sent = received = 0
    t0 = time.perf_counter()
    while received < total:
        while sent < total:
            n = a.send(ca, chunk[: min(len(chunk), total - sent)], pair.now)
            if n == 0:
                break
            sent += n
        for _side, ev in pair.events():
            if isinstance(ev, Readable):
                received += len(b.recv(ev.conn, 1 << 24))
            elif isinstance(ev, Accepted):
                pass
        if not pair.step():
            break
    elapsed = time.perf_counter() - t0
    mss = 1420 - (60 if v6 else 40)
    return elapsed, -(-total // mss), pair.sent


def micro(n: int = 20000) -> tuple[float, float]:
    """Cost of emitting one full segment, and of receiving one in-order data segment."""
    rng = random.Random(2)
    a = Stack(
        ["10.150.0.1"],
        rng=rng.getrandbits,
    )
    b = Stack(["10.150.0.2"], rng=rng.getrandbits)
    pair = Pair(a, b, rng)
    b.listen(5001)
    ca = a.connect("10.150.0.2", 5001, 0.0)
    for _ in range(5):
        pair.step()
    list(pair.events())
    conn = a._by_id[ca]
    data = bytes(1380)
    out = conn.out
    t0 = time.perf_counter()
    for i in range(n):
        out.tcp(i, 0, 0x10, 1000, b"", data)
    emit = (time.perf_counter() - t0) / n
    pkts = a.take_outgoing()
    # Receive: feed b in-order segments as a would send them (b reads every 64 segments).
    del pkts
    bconn = next(iter(b._by_id.values()))
    seq0, ack = conn.iss + conn.snd_nxt, (conn.irs + conn.rcv_nxt) & 0xFFFFFFFF
    out.out = pkts = []
    for i in range(n):
        out.tcp((seq0 + i * 1380) & 0xFFFFFFFF, ack, 0x10, 1000, b"", data)
    t0 = time.perf_counter()
    for i, p in enumerate(pkts):
        b.receive_packet(p, pair.now)
        if i % 64 == 63:
            b.recv(bconn.id, 1 << 24)
            b.take_outgoing()
    recv = (time.perf_counter() - t0) / len(pkts)
    return emit, recv


def calibrate(n: int = 1_000_000) -> float:
    """ns per iteration of a trivial Python loop: compare runs on this noisy machine by it."""
    t0 = time.perf_counter()
    x = 0
    for i in range(n):
        x += i
    return (time.perf_counter() - t0) / n * 1e9


def main() -> None:
    mib = int(sys.argv[1]) if len(sys.argv) > 1 else 64
    print(f"netstack pair bench: one flow, clean link, {mib} MiB, MTU 1420")
    print(f"{'case':<28}{'Mbit/s':>10}{'us/segment':>12}{'packets':>10}")
    for v6 in (False, True):
        secs, segs, pkts = one_way(mib, v6)
        mbps = (mib << 20) * 8 / secs / 1e6
        name = f"one-way {'IPv6' if v6 else 'IPv4'} (both stacks)"
        print(f"{name:<28}{mbps:>10.0f}{secs / segs * 1e6:>12.2f}{pkts:>10}")
    emit, recv = micro()
    print(f"{'emit one 1380 B segment':<28}{'':>10}{emit * 1e6:>12.2f}")
    print(f"{'receive one data segment':<28}{'':>10}{recv * 1e6:>12.2f}")
    print(f"{'calibration: ns/loop iter':<28}{'':>10}{calibrate():>12.1f}")


if __name__ == "__main__":
    main()
