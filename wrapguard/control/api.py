"""The control socket's endpoints: one request (method, target, body) in, one `Reply` out,
straight from the service, no I/O (docs/control.md). Imported at the first connection, with
httpconn.py: a run that nobody asks about never loads it (start-up time, bench row 5).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from wrapguard import log
from wrapguard.control.server import ControlStats
from wrapguard.errors import UsageError
from wrapguard.runtime.bypass import parse_entry

if TYPE_CHECKING:
    from wrapguard.runtime.service import TunnelService

JSON = "application/json"
PROMETHEUS = "text/plain; version=0.0.4; charset=utf-8"


@dataclass(frozen=True, slots=True)
class Reply:
    """One HTTP response: status, body and its type, extra headers."""

    status: int
    body: bytes
    content_type: str = JSON
    headers: tuple[tuple[str, str], ...] = ()


def json_reply(status: int, value: object) -> Reply:
    text = json.dumps(value, indent=2, default=str, ensure_ascii=False) + "\n"
    return Reply(status, text.encode(), JSON)


def error_reply(status: int, message: str, **fields: object) -> Reply:
    return json_reply(status, {"error": message, **fields})


# -- the endpoints (no I/O) ------------------------------------------------------------------

ROUTES: dict[str, tuple[str, ...]] = {
    "/state": ("GET", "HEAD"),
    "/bypass": ("GET", "HEAD", "POST", "DELETE"),
    "/metrics": ("GET", "HEAD"),
}


class Api:
    """One request in, one `Reply` out, straight from the service."""

    def __init__(self, service: TunnelService, stats: ControlStats) -> None:
        self.service = service
        self.stats = stats
        self.log = log.get("wrapguard.control")

    def handle(self, method: str, target: str, body: bytes) -> Reply:
        path = urlsplit(target).path or "/"  # origin form, or absolute form (RFC 9112 3.2)
        if len(path) > 1:
            path = path.rstrip("/")
        allowed = ROUTES.get(path)
        if allowed is None:
            return error_reply(404, f"no such endpoint: {path}", endpoints=sorted(ROUTES))
        if method not in allowed:
            reply = error_reply(405, f"{method} is not allowed on {path}", allowed=allowed)
            return Reply(reply.status, reply.body, JSON, (("allow", ", ".join(allowed)),))
        self.stats.requests += 1
        if path == "/state":
            return json_reply(200, self.service.state())
        if path == "/metrics":
            text = render_metrics(self.service.state(), self.stats)
            return Reply(200, text.encode(), PROMETHEUS)
        bypass = self.service.bypass
        if method == "POST":
            return self._add_bypass(body)
        if method == "DELETE":
            n = bypass.clear()
            if n:
                self.log.info("bypass list cleared", removed=n)
            return json_reply(200, bypass.entries())
        return json_reply(200, bypass.entries())

    def _add_bypass(self, body: bytes) -> Reply:
        want = 'a JSON list of IP addresses or CIDRs, e.g. ["10.150.0.0/24"]'
        if not body.strip():
            return error_reply(400, f"empty body: expected {want}")
        try:
            value = json.loads(body)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError
            return error_reply(400, f"body is not JSON ({exc}): expected {want}")
        if isinstance(value, dict) and set(value) == {"add"}:
            value = value["add"]
        if not isinstance(value, list):
            return error_reply(400, f'expected {want} (or {{"add": [...]}})')
        for entry in value:  # all or nothing: name the first bad one, add none
            try:
                parse_entry(entry)
            except UsageError as exc:
                return error_reply(400, str(exc), entry=entry)
        try:
            added = self.service.bypass.add(value)
        except UsageError as exc:
            return error_reply(400, str(exc))
        if added:
            self.log.info("bypass list: entries added", added=[str(n) for n in added])
        return json_reply(200, self.service.bypass.entries())


# -- Prometheus text exposition format 0.0.4 ---------------------------------------------------

# Counters of `session.stats()` that count work done, not something dropped; every other
# counter in a group is a drop reason (so a new drop counter shows up without a change here).
NOT_DROPS = frozenset(
    {"requests", "to_tunnel", "from_tunnel", "errors_sent", "tx_datagrams", "rx_datagrams",
     "delivered", "rx_packets", "tx_packets", "rx_bytes", "tx_bytes"}
)  # fmt: skip


@dataclass
class _Family:
    """One metric family of the Prometheus text format: samples with their labels."""

    name: str
    kind: str  # "counter" or "gauge"
    help: str
    samples: list[tuple[dict[str, str], float]] = field(default_factory=list)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, int) or float(value).is_integer():
        return str(int(value))
    return repr(float(value))


def _drops(counters: dict[str, Any], stats: ControlStats) -> tuple[_Family, _Family]:
    drops = _Family(
        "wrapguard_drops_total", "counter", "Packets, requests or datagrams dropped, by reason."
    )
    events = _Family(
        "wrapguard_events_total", "counter", "Work done by each layer (requests, datagrams)."
    )
    for group, value in counters.items():
        if isinstance(value, bool):
            continue
        if isinstance(value, int | float):  # the engine's own, e.g. "unrouted_drops": 3
            reason = group.removesuffix("_drops")
            drops.samples.append(({"layer": "engine", "reason": reason}, value))
        elif isinstance(value, dict):
            layer = group.removesuffix("_drops")
            for name, n in value.items():
                if not isinstance(n, int | float) or isinstance(n, bool):
                    continue
                if name in NOT_DROPS and not group.endswith("_drops"):
                    events.samples.append(({"layer": layer, "event": str(name)}, n))
                else:
                    drops.samples.append(({"layer": layer, "reason": str(name).lower()}, n))
    for reason in ("other_uid", "bad_request", "too_many"):
        drops.samples.append(({"layer": "control", "reason": reason}, getattr(stats, reason)))
    events.samples.append(({"layer": "control", "event": "requests"}, stats.requests))
    return drops, events


def render_metrics(state: dict[str, Any], stats: ControlStats) -> str:
    """The state as Prometheus text (exposition format 0.0.4): # HELP, # TYPE, samples."""
    rx = _Family("wrapguard_peer_rx_bytes", "counter", "Bytes received from the peer.")
    tx = _Family("wrapguard_peer_tx_bytes", "counter", "Bytes sent to the peer.")
    hs = _Family(
        "wrapguard_peer_latest_handshake_seconds",
        "gauge",
        "Unix time of the latest handshake with the peer (0: none yet).",
    )
    for peer in state.get("peers", []):
        labels = {"peer": str(peer.get("public_key", ""))}
        rx.samples.append((labels, peer.get("rx_bytes") or 0))
        tx.samples.append((labels, peer.get("tx_bytes") or 0))
        hs.samples.append((labels, peer.get("latest_handshake") or 0))
    flows = _Family("wrapguard_flows", "gauge", "Flows open now, by protocol.")
    for proto in ("tcp", "udp"):
        flows.samples.append(({"proto": proto}, state.get("flows", {}).get(proto, 0)))
    frontends = _Family(
        "wrapguard_frontend_flows_total", "counter", "Flows opened through each front-end kind."
    )
    by_kind: dict[str, int] = {}
    for f in state.get("frontends", []):
        kind = str(f.get("kind", ""))
        by_kind[kind] = by_kind.get(kind, 0) + int(f.get("flows", 0) or 0)
    frontends.samples += [({"kind": k}, n) for k, n in by_kind.items()]
    bypass = _Family("wrapguard_bypass_entries", "gauge", "Entries in the bypass list.")
    bypass.samples.append(({}, len(state.get("bypass", []))))
    uptime = _Family("wrapguard_uptime_seconds", "gauge", "Seconds since the tunnel started.")
    uptime.samples.append(({}, state.get("uptime_s", 0) or 0))
    drops, events = _drops(state.get("counters", {}) or {}, stats)
    lines: list[str] = []
    for fam in (rx, tx, hs, flows, frontends, drops, events, bypass, uptime):
        lines += [f"# HELP {fam.name} {fam.help}", f"# TYPE {fam.name} {fam.kind}"]
        for labels, value in fam.samples:
            inner = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
            name = f"{fam.name}{{{inner}}}" if inner else fam.name
            lines.append(f"{name} {_number(value)}")
    return "\n".join(lines) + "\n"


__all__ = ["Api", "Reply", "error_reply", "json_reply", "render_metrics"]
