"""The lossy UDP relay on loopback (no root needed): forwarding, impairments, determinism, CLI."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from rig.relay import UdpRelay, format_hostport, parse_hostport

RELAY = Path(__file__).with_name("relay.py")


class Echo:
    """A UDP echo on 127.0.0.1 that also records what it received and from where."""

    def __init__(self, echo: bool = True) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.addr = self.sock.getsockname()
        self.got: list[tuple[bytes, tuple[str, int]]] = []
        self.echo = echo
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                data, addr = self.sock.recvfrom(65535)
            except OSError:
                return
            self.got.append((data, addr))
            if self.echo:
                self.sock.sendto(data, addr)

    def wait_for(self, n: int, timeout: float = 5) -> None:
        deadline = time.monotonic() + timeout
        while len(self.got) < n and time.monotonic() < deadline:
            time.sleep(0.005)


@pytest.fixture
def echo() -> Iterator[Echo]:
    e = Echo()
    yield e
    e.sock.close()


def client(relay: UdpRelay) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(2)
    s.connect(relay.address)
    return s


def ping_pong(relay: UdpRelay, n: int) -> list[int]:
    """Send n numbered datagrams; return the numbers that came back, sorted."""
    back = []
    with client(relay) as s:
        for i in range(n):
            s.send(b"%d" % i)
        s.settimeout(0.3)
        try:
            while True:
                back.append(int(s.recv(100)))
        except TimeoutError:
            pass
    return sorted(back)


def test_hostport() -> None:
    assert parse_hostport("[fd18:1::2]:51820") == ("fd18:1::2", 51820)
    assert parse_hostport("198.18.1.2:7") == ("198.18.1.2", 7)
    assert format_hostport("fd18:1::2", 51820) == "[fd18:1::2]:51820"


def test_lossless_forwards_everything_in_order(echo: Echo) -> None:
    with UdpRelay(echo.addr) as relay, client(relay) as s:
        for i in range(200):
            s.send(b"%d" % i)
            assert s.recv(100) == b"%d" % i
    st = relay.stats
    assert (st.up.received, st.up.sent, st.down.received, st.down.sent) == (200, 200, 200, 200)
    assert st.total("dropped") == st.total("duplicated") == st.total("reordered") == 0


def test_loss_is_seeded_and_about_the_share_asked(echo: Echo) -> None:
    runs = []
    for _ in range(2):
        with UdpRelay(echo.addr, loss=0.3, seed=42, directions="up") as relay:
            runs.append(ping_pong(relay, 200))
        assert relay.stats.up.dropped == 200 - len(runs[-1])
        assert relay.stats.down.dropped == 0
    assert runs[0] == runs[1]  # same seed, same datagrams lost
    assert 0.15 < 1 - len(runs[0]) / 200 < 0.45


def test_duplicates(echo: Echo) -> None:
    with UdpRelay(echo.addr, dup=1.0, directions="up") as relay, client(relay) as s:
        s.send(b"x")
        assert s.recv(10) == b"x"
        assert s.recv(10) == b"x"
    assert relay.stats.up.duplicated == 1
    assert relay.stats.up.sent == 2


def test_reorder_permutes_but_delivers_all() -> None:
    sink = Echo(echo=False)
    try:
        with UdpRelay(sink.addr, reorder=0.3, seed=3) as relay, client(relay) as s:
            for i in range(100):
                s.send(b"%d" % i)
            sink.wait_for(100)
        order = [int(d) for d, _ in sink.got]
        assert sorted(order) == list(range(100))
        assert order != list(range(100))
        assert relay.stats.up.reordered > 0
        assert relay.stats.up.reordered + relay.stats.up.held_timeouts > 10
    finally:
        sink.sock.close()


def test_held_datagram_is_released_by_timer(echo: Echo) -> None:
    with UdpRelay(echo.addr, reorder=1.0, hold=0.05, directions="up") as relay, client(relay) as s:
        t0 = time.monotonic()
        s.send(b"late")
        assert s.recv(10) == b"late"
        assert time.monotonic() - t0 >= 0.04
    assert relay.stats.up.held_timeouts == 1 and relay.stats.up.reordered == 0


def test_each_client_gets_its_own_mapping(echo: Echo) -> None:
    with UdpRelay(echo.addr) as relay, client(relay) as a, client(relay) as b:
        a.send(b"a")
        b.send(b"b")
        assert (a.recv(10), b.recv(10)) == (b"a", b"b")
    assert len({addr for _, addr in echo.got}) == 2


def test_black_hole_at_runtime(echo: Echo) -> None:
    with UdpRelay(echo.addr) as relay, client(relay) as s:
        s.send(b"1")
        assert s.recv(10) == b"1"
        relay.set(loss=1.0)
        s.send(b"2")
        s.settimeout(0.2)
        with pytest.raises(TimeoutError):
            s.recv(10)
    assert relay.stats.up.dropped == 1


def test_as_a_process(echo: Echo) -> None:
    proc = subprocess.Popen(
        [sys.executable, str(RELAY), "--target", format_hostport(*echo.addr), "--dup", "1"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        word, host, port = proc.stdout.readline().split()
        assert word == "READY"
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(2)
            s.connect((host, int(port)))
            s.send(b"hi")
            assert [s.recv(10) for _ in range(4)] == [b"hi"] * 4  # dup both ways
        proc.terminate()
        stats = json.loads(proc.stdout.readline())
        assert stats["up"]["duplicated"] == 1 and stats["down"]["duplicated"] == 2
        assert proc.wait(5) == 0
    finally:
        proc.kill()
        proc.wait()
