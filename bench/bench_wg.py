"""Benchmark of the WireGuard cores (no I/O, no pytest): handshakes per second and the
transport path at 1420 bytes, beside the raw primitive costs measured in the same run
(performance.md quotes 2.65 us for a ChaCha20-Poly1305 seal+open and ~150 us per handshake).

    python bench/bench_wg.py [--seconds 1.0]
"""

from __future__ import annotations

import argparse
import os
import statistics
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from wrapguard.keys import PrivateKey
from wrapguard.noise.cookie import CookieChecker, CookieState
from wrapguard.noise.crypto import tai64n
from wrapguard.noise.handshake import (
    InitiationConsumed,
    LocalStatic,
    RemoteStatic,
    consume_initiation,
    consume_response,
    create_initiation,
    create_response,
)
from wrapguard.noise.session import Keypair
from wrapguard.tunnel.device import Device
from wrapguard.tunnel.events import DeliverPacket, SendDatagram
from wrapguard.tunnel.peer import PeerSpec
from wrapguard.wire.wgmsg import emit

MTU = 1420


def per_op(fn: Callable[[], object], seconds: float, batch: int) -> float:
    """Median seconds per call over several timed batches."""
    samples = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(samples) < 3:
        t0 = time.perf_counter()
        for _ in range(batch):
            fn()
        samples.append((time.perf_counter() - t0) / batch)
    return statistics.median(samples)


def bench_handshake(seconds: float) -> float:
    ki, kr = PrivateKey.generate(), PrivateKey.generate()
    li, lr = LocalStatic(ki.raw), LocalStatic(kr.raw)
    ri, rr = RemoteStatic(li, lr.public, None), RemoteStatic(lr, li.public, None)
    cookie_i, checker = CookieState(lr.public), CookieChecker(lr.public, os.urandom)
    n = [0]

    def one() -> None:
        n[0] += 1
        made = create_initiation(li, ri, n[0], os.urandom(32), tai64n(1.7e9 + n[0]))
        assert not isinstance(made, type(None)) and isinstance(made, tuple)
        init, pending = made
        wire = cookie_i.add_macs(emit(init), 0.0)
        assert checker.mac1_ok(wire)
        consumed = consume_initiation(lr, init, lambda pub: rr)
        assert isinstance(consumed, InitiationConsumed)
        resp = create_response(lr, consumed, n[0] + 1, os.urandom(32))
        assert isinstance(resp, tuple)
        keys = consume_response(li, ri, pending, resp[0])
        assert not isinstance(keys, type(None))

    return per_op(one, seconds, 20)


def ipv4(payload_len: int) -> bytes:
    total = 20 + payload_len
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 0, 0, 64, 17, 0,
                      bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]))  # fmt: skip
    return hdr + bytes(payload_len)


def device_pair() -> tuple[Device, Device]:
    ka, kb = PrivateKey.generate(), PrivateKey.generate()
    a = Device(ka, [PeerSpec(kb.public_key(), endpoint=("192.0.2.2", 1),
                             allowed_ips=("10.0.0.2/32",))], rng=os.urandom)  # fmt: skip
    b = Device(kb, [PeerSpec(ka.public_key(), allowed_ips=("10.0.0.1/32",))], rng=os.urandom)
    out = a.send_packet(ipv4(10), 0.0, 1.7e9)
    while out:
        nxt = []
        for o in out:
            if isinstance(o, SendDatagram):
                dst, src = (
                    (b, ("192.0.2.1", 1)) if o.addr == ("192.0.2.2", 1) else (a, ("192.0.2.2", 1))
                )
                nxt += dst.datagram_received(o.data, src, 0.0, 1.7e9)
        out = nxt
    return a, b


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=1.0, help="time per measurement")
    s = ap.parse_args().seconds
    packet = bytes(MTU)

    aead = ChaCha20Poly1305(os.urandom(32))
    nonce = bytes(12)
    raw = per_op(lambda: aead.decrypt(nonce, aead.encrypt(nonce, packet, None), None), s, 500)

    from wrapguard.noise.handshake import SessionKeys

    k1, k2 = os.urandom(32), os.urandom(32)
    tx = Keypair(SessionKeys(k1, k2, 1, 2, True), 0.0)
    rx = Keypair(SessionKeys(k2, k1, 2, 1, False), 0.0)

    def kp_path() -> None:
        wire = tx.seal(packet, MTU)
        assert wire is not None
        counter = tx.send_counter - 1
        rx.check_counter(counter)
        rx.open(wire, counter)

    kp = per_op(kp_path, s, 500)

    a, b = device_pair()
    ip = ipv4(MTU - 20)
    src = ("192.0.2.1", 1)
    delivered = [0]

    def dev_path() -> None:
        (o,) = a.send_packet(ip, 1.0, 1.7e9)
        assert isinstance(o, SendDatagram)
        out = b.datagram_received(o.data, src, 1.0, 1.7e9)
        if out and isinstance(out[-1], DeliverPacket):
            delivered[0] += 1

    dev = per_op(dev_path, s, 500)
    assert delivered[0] > 0 and not any(b.counters.values()), b.counters

    def send_only() -> None:
        a.send_packet(ip, 1.0, 1.7e9)

    dev_send = per_op(send_only, s, 500)
    hs = bench_handshake(s)

    def row(name: str, t: float, note: str = "") -> None:
        print(f"{name:<48}{t * 1e6:>9.2f}{MTU * 8 / t / 1e9:>9.2f}   {note}")

    print(f"{'operation (1420 B)':<48}{'us/op':>9}{'Gbit/s':>9}   performance.md")
    row("raw ChaCha20-Poly1305 seal+open (reused AEAD)", raw, "2.65 us")
    row("Keypair.seal + check_counter + open", kp)
    row("Device.send_packet + datagram_received", dev)
    row("Device.send_packet only (route + seal)", dev_send)
    print(f"{'  transport overhead over raw seal+open':<48}{(dev - raw) * 1e6:>9.2f}")
    print(f"{'full handshake (both roles, macs)':<48}{hs * 1e6:>9.1f}{'':>9}   ~150 us initiator")
    print(f"handshakes per second (one core, both roles): {1 / hs:,.0f}")


if __name__ == "__main__":
    main()
