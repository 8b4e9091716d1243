"""Batched UDP I/O: the cffi recvmmsg/sendmmsg helpers and the runtime paths that use them.

Loopback (127.0.0.1) only. The helpers are part of the built package, so their absence is a
failure here, not a skip.
"""

from __future__ import annotations

import asyncio
import errno
import random
import socket

from wrapguard.keys import PrivateKey
from wrapguard.runtime.udp import HAVE_GSO, HAVE_MMSG, WgUdpRuntime
from wrapguard.tunnel.device import Device
from wrapguard.tunnel.peer import PeerSpec

KA, KB = PrivateKey(bytes([3]) * 32), PrivateKey(bytes([4]) * 32)


def _pair() -> tuple[socket.socket, socket.socket]:
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx.bind(("127.0.0.1", 0))
    return rx, tx


def test_helpers_move_datagrams_both_ways() -> None:
    assert HAVE_MMSG, "the cffi helper lacks wg_recvmmsg/wg_sendmmsg: rebuild it"
    from wrapguard._fastpath import ffi, lib

    rx, tx = _pair()
    try:
        port = rx.getsockname()[1]
        sa = (
            socket.AF_INET.to_bytes(2, "little")
            + port.to_bytes(2, "big")
            + socket.inet_aton("127.0.0.1")
            + bytes(8)
        )
        grams = [bytes([i]) * (1 + i * 37) for i in range(20)]
        blob = b"".join(grams)
        offs = ffi.new("uint32_t[]", 20)
        lens = ffi.new("uint32_t[]", 20)
        o = 0
        for i, g in enumerate(grams):
            offs[i], lens[i] = o, len(g)
            o += len(g)
        assert lib.wg_sendmmsg(tx.fileno(), blob, offs, lens, 20, sa, 16) == 20
        slot = 512  # smaller than the last datagrams: they come back marked as truncated
        buf = bytearray(16 * slot)
        addrs = bytearray(16 * 28)
        got_lens = ffi.new("uint32_t[]", 16)
        got: list[tuple[int, bytes]] = []
        while True:
            n = lib.wg_recvmmsg(
                rx.fileno(), ffi.from_buffer(buf), slot, 16, got_lens, ffi.from_buffer(addrs)
            )
            if n == -errno.EAGAIN:
                break
            assert n > 0
            for i in range(n):
                ln = got_lens[i]
                got.append((ln, bytes(buf[i * slot : i * slot + min(ln, slot)])))
                a = addrs[i * 28 : i * 28 + 8]
                assert (a[2] << 8 | a[3], socket.inet_ntoa(bytes(a[4:8]))) == (
                    tx.getsockname()[1],
                    "127.0.0.1",
                )
        assert len(got) == 20
        for g, (ln, data) in zip(grams, got, strict=True):
            if len(g) <= slot:
                assert (ln, data) == (len(g), g)
            else:
                assert ln == 0xFFFFFFFF
    finally:
        rx.close()
        tx.close()


def _sockaddr(port: int) -> bytes:
    return (
        socket.AF_INET.to_bytes(2, "little")
        + port.to_bytes(2, "big")
        + socket.inet_aton("127.0.0.1")
        + bytes(8)
    )


def _drain(rx: socket.socket) -> list[bytes]:
    rx.setblocking(False)
    got: list[bytes] = []
    while True:
        try:
            got.append(rx.recv(65536))
        except BlockingIOError:
            return got


def test_gso_helper_delivers_the_same_datagrams() -> None:
    """Runs of equal-sized datagrams go as UDP_SEGMENT messages; the receiver must see every
    datagram with its own length, in order, whatever the runs (a shorter one ends a run)."""
    assert HAVE_GSO, "the cffi helper lacks wg_sendmmsg_gso: rebuild it"
    from wrapguard._fastpath import ffi, lib

    sizes = [1000] * 5 + [500] + [1000] * 3 + [200, 300, 300, 1] + [1452] * 30
    grams = [bytes([i]) * n for i, n in enumerate(sizes)]
    blob = b"".join(grams)
    n = len(grams)
    offs = ffi.new("uint32_t[]", n)
    lens = ffi.new("uint32_t[]", n)
    o = 0
    for i, g in enumerate(grams):
        offs[i], lens[i] = o, len(g)
        o += len(g)
    for max_segs in (1, 2, 7, 64):
        rx, tx = _pair()
        try:
            rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            sa = _sockaddr(rx.getsockname()[1])
            assert lib.wg_sendmmsg_gso(tx.fileno(), blob, offs, lens, n, sa, 16, max_segs) == n
            assert _drain(rx) == grams, max_segs
        finally:
            rx.close()
            tx.close()


def test_runtime_falls_back_when_segmentation_fails() -> None:
    """A route that cannot segment (EIO/EINVAL from the kernel) makes the runtime send the
    same datagrams one message each, and keep doing so."""
    from wrapguard._fastpath import ffi, lib

    rx, tx = _pair()
    dev = Device(
        KA,
        [PeerSpec(KB.public_key(), allowed_ips=("10.0.0.0/24",))],
        rng=random.Random(1).randbytes,
    )
    rt = WgUdpRuntime(dev, on_packet=lambda _p, _pkt: None, bind_v4="127.0.0.1", bind_v6=None)
    rt._v4 = tx
    offs, lens = ffi.new("uint32_t[]", 64), ffi.new("uint32_t[]", 64)
    rt._mm_cdata = (None, None, None, offs, lens)
    calls: list[int] = []

    class FailingLib:
        def wg_sendmmsg_gso(self, *args: object) -> int:
            calls.append(len(args))
            return -errno.EIO

        def __getattr__(self, name: str) -> object:
            return getattr(lib, name)

    import wrapguard.runtime.udp as udp_mod

    real = udp_mod._lib
    udp_mod._lib = FailingLib()
    try:
        grams = [bytes([i]) * 1200 for i in range(10)]
        dst = ("127.0.0.1", rx.getsockname()[1])
        rt._send_batch(dst, [b"".join(grams)], [len(g) for g in grams])
        rt._send_batch(dst, grams, [len(g) for g in grams])
        assert len(calls) == 1 and rt.gso_segs == 1
        assert _drain(rx) == grams + grams
        assert rt.stats["send_errors"] == 0 and rt.stats["tx_datagrams"] == 20
    finally:
        udp_mod._lib = real
        rx.close()
        tx.close()


def ipv4(src: str, dst: str, payload: bytes) -> bytes:
    s, d = socket.inet_aton(src), socket.inet_aton(dst)
    hdr = bytes([0x45, 0]) + (20 + len(payload)).to_bytes(2, "big") + bytes(4)
    return hdr + bytes([64, 17, 0, 0]) + s + d + payload


def _device(key: PrivateKey, peer: PrivateKey, ep, allowed: str) -> Device:  # type: ignore[no-untyped-def]
    return Device(
        key,
        [PeerSpec(peer.public_key(), endpoint=ep, allowed_ips=(allowed,))],
        rng=random.Random(key.raw).randbytes,
    )


def test_runtimes_exchange_batches_through_mmsg() -> None:
    async def main() -> None:
        def side(key: PrivateKey, peer: PrivateKey, ep, allowed: str):  # type: ignore[no-untyped-def]
            dev = _device(key, peer, ep, allowed)
            got: list[bytes] = []
            rt = WgUdpRuntime(
                dev, on_packet=lambda _p, pkt: got.append(pkt), bind_v4="127.0.0.1", bind_v6=None
            )
            return rt, got

        b, got_b = side(KB, KA, None, "10.0.0.1/32")
        await b.start()
        a, got_a = side(KA, KB, ("127.0.0.1", b.port), "10.0.0.0/24")
        await a.start()
        try:
            assert a._mm_cdata and b._mm_cdata  # the batched paths are the ones under test
            want = [ipv4("10.0.0.1", "10.0.0.2", b"%04d" % i * 100) for i in range(300)]
            a.send_packets([(p, None) for p in want[:1]])  # staged until the handshake
            loop = asyncio.get_running_loop()
            end = loop.time() + 5
            while len(got_b) < 1 and loop.time() < end:
                await asyncio.sleep(0.005)
            for i in range(1, 300, 50):  # batches larger than MMSG_BATCH
                a.send_packets([(p, 0) for p in want[i : i + 50]])
                await asyncio.sleep(0.01)
            while len(got_b) < 300 and loop.time() < end:
                await asyncio.sleep(0.005)
            assert got_b == want  # all of them, in order (loopback neither loses nor reorders)
            assert a.stats["send_errors"] == 0
            assert a.stats["tx_datagrams"] >= 300 and b.stats["delivered"] == 300
            b.send_packets([(ipv4("10.0.0.2", "10.0.0.1", b"back"), None)])
            while not got_a and loop.time() < end:
                await asyncio.sleep(0.005)
            assert got_a == [ipv4("10.0.0.2", "10.0.0.1", b"back")]
        finally:
            a.close()
            b.close()

    asyncio.run(main())


def test_each_receive_batch_ends_with_on_batch_end() -> None:
    """Packets arrive with `receiving` set, and the batch that delivered them ends with one
    `on_batch_end()` call in the same callback (the engine flushes then: no loop turn), also
    when the callback fails half way."""

    async def main() -> None:
        def side(key: PrivateKey, peer: PrivateKey, ep, allowed: str):  # type: ignore[no-untyped-def]
            dev = _device(key, peer, ep, allowed)
            log: list[object] = []
            rt = WgUdpRuntime(dev, bind_v4="127.0.0.1", bind_v6=None)
            rt.on_packet = lambda _p, pkt: log.append(("packet", rt.receiving))
            rt.on_batch_end = lambda: log.append("end")
            return rt, log

        b, log_b = side(KB, KA, None, "10.0.0.1/32")
        await b.start()
        a, _ = side(KA, KB, ("127.0.0.1", b.port), "10.0.0.0/24")
        await a.start()
        loop = asyncio.get_running_loop()
        try:
            a.send_packets([(ipv4("10.0.0.1", "10.0.0.2", b"first"), None)])  # + handshake
            end = loop.time() + 5
            while ("packet", True) not in log_b and loop.time() < end:
                await asyncio.sleep(0.005)
            await asyncio.sleep(0.05)
            log_b.clear()
            a.send_packets([(ipv4("10.0.0.1", "10.0.0.2", b"%d" % i), 0) for i in range(5)])
            while log_b.count(("packet", True)) < 5 and loop.time() < end:
                await asyncio.sleep(0.005)
            assert set(log_b) == {("packet", True), "end"} and log_b[-1] == "end"
            assert not b.receiving
            # A failing packet handler: the batch still ends (and `receiving` is reset).
            log_b.clear()

            def boom(_p: int, _pkt: bytes) -> None:
                log_b.append("boom")
                raise RuntimeError("handler bug")

            b.on_packet = boom
            loop.set_exception_handler(lambda _loop, _ctx: None)
            a.send_packets([(ipv4("10.0.0.1", "10.0.0.2", b"x"), 0)])
            while "end" not in log_b and loop.time() < end:
                await asyncio.sleep(0.005)
            assert log_b == ["boom", "end"] and not b.receiving
        finally:
            a.close()
            b.close()

    asyncio.run(main())


def test_a_batch_of_one_does_what_the_batching_loop_does() -> None:
    """send_packets' path for a single packet against its batching loop (single_path off):
    the same sends (sendmmsg for IPv4, one by one for IPv6) and the device's other outputs
    dispatched after the datagram, also when the packet is staged (nothing sent)."""
    from wrapguard.tunnel.events import DropReason, PacketDropped

    class Dev:
        def __init__(self, log: list) -> None:
            self.log = log
            self.peers: list = []

        def seal_packet(self, packet, now, wall, peer, out):  # type: ignore[no-untyped-def]
            if b"out" in packet:
                out.append(PacketDropped(DropReason.STAGED_QUEUE_FULL, 0))
            if b"staged" in packet:
                return None
            ep = ("::1", 5) if b"v6" in packet else ("127.0.0.1", 5)
            return ep, b"sealed " + packet

        def seal_packets(self, *args: object) -> None:
            raise AssertionError("one packet is never sealed as a batch")

        def next_deadline(self) -> None:
            return None

    def run(single: bool) -> list:
        log: list = []
        rt = WgUdpRuntime(Dev(log), bind_v4="127.0.0.1", bind_v6=None)  # type: ignore[arg-type]
        rt._loop = asyncio.new_event_loop()
        rt._mm_cdata = (None, None, None, None, None)
        rt.single_path = single
        rt._send_batch = lambda addr, blobs, lens: log.append(("mmsg", addr, blobs, lens))  # type: ignore[method-assign]
        rt._send_unbatched = lambda addr, blob, lens: log.append(("one", addr, blob, lens))  # type: ignore[method-assign]
        rt._dispatch = lambda outs: log.append(("outs", list(outs)))  # type: ignore[method-assign]
        try:
            for pkt in [b"a", b"b out", b"v6", b"v6 out", b"staged", b"staged out"]:
                rt.send_packets([(pkt, 0)])
                log.append("|")
        finally:
            rt._loop.close()
        return log

    fast, loop = run(True), run(False)
    assert fast == loop
    assert fast[0] == ("mmsg", ("127.0.0.1", 5), [b"sealed a"], [8])
    assert [e[0] for e in fast if e != "|"] == [
        "mmsg",
        "mmsg",
        "outs",
        "one",
        "one",
        "outs",
        "outs",
    ]
