"""When to look up a peer's Endpoint host name again, and whether to use the answer.

wg(8) resolves a host name once, so a peer whose address changes (dynamic DNS) is lost until a
restart. `Reresolver` asks for a lookup at start, every `interval` (+ jitter) and when the Device
emits `ResolveEndpoint` (the peer stopped answering [W 6.2, 6.4]); one lookup per peer at a time.
The rule, for an answer R (best address first), the endpoint E in use and the previous answer L:
no E yet, or handshakes go unanswered: move to R[0] unless E is in R. Otherwise (periodic) only
if the name moved (R != L), E is not in R, and E came from the name (E in L) or has had no
handshake for STALE_AFTER. An endpoint the peer roamed to [W 6.5] is not fought while it works.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from wrapguard.tunnel.peer import normalize_endpoint

Addr = tuple[str, int]

# Rekey-After-Time [W 6.1]: a session in use makes a handshake about this often, so a lookup
# per interval costs at most one query per handshake. This is the backstop for idle tunnels;
# an active one re-resolves within Keepalive + Rekey-Timeout of the peer falling silent.
RERESOLVE_INTERVAL = 120.0
RERESOLVE_JITTER = 12.0  # spread out lookups of many peers or launchers started together
# wireguard-tools' contrib/reresolve-dns.sh leaves a peer alone whose latest handshake is at
# most 135 s old (Rekey-After-Time + Keepalive-Timeout + Rekey-Timeout): it is working.
STALE_AFTER = 135.0


class Trigger(enum.Enum):
    START = "start"
    PERIODIC = "periodic"
    UNANSWERED = "unanswered"  # the Device's ResolveEndpoint: the peer stopped answering


@dataclass(frozen=True, slots=True)
class Lookup:
    """Resolve `host` (off the loop) and report with `answered()` or `failed()`."""

    peer: int
    host: str
    port: int
    trigger: Trigger


@dataclass(frozen=True, slots=True)
class UseEndpoint:
    """Give `peer` the endpoint `new` (Device.move_endpoint); `old` was in use before."""

    peer: int
    host: str
    old: Addr | None
    new: Addr
    trigger: Trigger


@dataclass(frozen=True, slots=True)
class KeepEndpoint:
    """The answer changes nothing: `endpoint` stays (it is in the answer, or roamed)."""

    peer: int
    host: str
    endpoint: Addr | None
    answer: tuple[Addr, ...]
    trigger: Trigger


@dataclass(frozen=True, slots=True)
class LookupFailing:
    """The host name stopped resolving (said once per change of state, not per lookup)."""

    peer: int
    host: str
    error: str


@dataclass(frozen=True, slots=True)
class LookupWorks:
    """The host name resolves again after `LookupFailing`."""

    peer: int
    host: str


Output = UseEndpoint | KeepEndpoint | LookupFailing | LookupWorks


class _Name:
    __slots__ = ("due", "failing", "host", "in_flight", "last", "last_handshake", "port")

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.last: frozenset[Addr] | None = None  # L: the previous successful answer
        self.in_flight: Trigger | None = None
        self.due: float | None = None  # the next periodic lookup
        self.last_handshake: float | None = None
        self.failing = False


class Reresolver:
    """The re-resolve policy for the host-name peers (see the module docstring).

    Inputs take `now` (monotonic seconds); randomness (jitter) comes from `rng(n) -> bytes`.
    `next_deadline()` / `handle_timeout(now)` drive the periodic lookups.
    """

    def __init__(
        self,
        hosts: Mapping[int, Addr],
        *,
        rng: Callable[[int], bytes],
        interval: float = RERESOLVE_INTERVAL,
        jitter: float = RERESOLVE_JITTER,
        stale_after: float = STALE_AFTER,
    ) -> None:
        self._names = {peer: _Name(host, port) for peer, (host, port) in hosts.items()}
        self._rng = rng
        self.interval = interval
        self.jitter = jitter
        self.stale_after = stale_after

    @property
    def peers(self) -> list[int]:
        return list(self._names)

    def start(self, now: float) -> list[Lookup]:
        """The first lookup of every name."""
        return [lk for peer in self._names if (lk := self.request(peer, Trigger.START, now))]

    def request(self, peer: int, trigger: Trigger, now: float) -> Lookup | None:
        """A lookup to start now, or None: not a host-name peer, or one is in flight already
        (then an UNANSWERED request upgrades it: its answer is judged by that rule)."""
        n = self._names.get(peer)
        if n is None:
            return None
        if n.in_flight is not None:
            if trigger is not Trigger.PERIODIC:
                n.in_flight = trigger
            return None
        n.in_flight = trigger
        n.due = None  # re-armed when this lookup ends
        return Lookup(peer, n.host, n.port, trigger)

    def handshake_completed(self, peer: int, now: float) -> None:
        n = self._names.get(peer)
        if n is not None:
            n.last_handshake = now

    def next_deadline(self) -> float | None:
        dues = [n.due for n in self._names.values() if n.due is not None]
        return min(dues) if dues else None

    def handle_timeout(self, now: float) -> list[Lookup]:
        out: list[Lookup] = []
        for peer, n in self._names.items():
            if n.due is not None and n.due <= now:
                n.due = None  # set again when the lookup (this one, or one in flight) ends
                lk = self.request(peer, Trigger.PERIODIC, now)
                if lk is not None:
                    out.append(lk)
        return out

    def answered(
        self, peer: int, addrs: Iterable[Addr], endpoint: Addr | None, now: float
    ) -> list[Output]:
        """The lookup for `peer` returned `addrs` (best first); `endpoint` is E, read now."""
        n = self._names[peer]
        answer = tuple(dict.fromkeys(a for a in map(normalize_endpoint, addrs) if a is not None))
        if not answer:
            return self.failed(peer, "the name has no usable address", now)
        trigger = n.in_flight or Trigger.PERIODIC
        self._done(n, now)
        out: list[Output] = []
        if n.failing:
            n.failing = False
            out.append(LookupWorks(peer, n.host))
        new, last = frozenset(answer), n.last
        n.last = new
        if endpoint is None or (
            endpoint not in new and self._may_move(n, trigger, new, last, endpoint, now)
        ):
            out.append(UseEndpoint(peer, n.host, endpoint, answer[0], trigger))
        else:
            out.append(KeepEndpoint(peer, n.host, endpoint, answer, trigger))
        return out

    def failed(self, peer: int, error: str, now: float) -> list[Output]:
        """The lookup for `peer` failed; the endpoint in use stays."""
        n = self._names[peer]
        self._done(n, now)
        if n.failing:
            return []
        n.failing = True
        return [LookupFailing(peer, n.host, error)]

    # ------------------------------------------------------------------ the rule

    def _may_move(
        self,
        n: _Name,
        trigger: Trigger,
        new: frozenset[Addr],
        last: frozenset[Addr] | None,
        endpoint: Addr,
        now: float,
    ) -> bool:
        if trigger is Trigger.UNANSWERED:
            return True  # the endpoint in use does not answer: try the name's address
        # Periodic, or start-up after the peer reached us first (E roamed during start).
        if new == last:
            return False  # the name did not move: E is where the peer roamed to [W 6.5]
        if last is not None and endpoint in last:
            return True  # E came from the name, which moved: follow it
        # E is a roamed endpoint and the name moved too: keep E while it works.
        hs = n.last_handshake
        return hs is None or now - hs > self.stale_after

    def _done(self, n: _Name, now: float) -> None:
        n.in_flight = None
        n.due = now + self.interval + self._jitter()

    def _jitter(self) -> float:
        ms = int(self.jitter * 1000)
        if ms <= 0:
            return 0.0
        return (int.from_bytes(self._rng(4), "little") % (ms + 1)) / 1000.0
