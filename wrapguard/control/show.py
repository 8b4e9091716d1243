"""`wrapguard show [--control PATH]`: a running wrapguard's state, printed as `wg show` does.

GET /state over the control socket (http.client on a connected unix socket: no other
dependency), then the interface, each peer (endpoint, allowed ips, latest handshake,
transfer, transport), the front-ends, the bypass list and the open flows. Without a path it
uses the one control socket in the default directories (control/paths.py). Every failure is
one line on stderr and exit status 1; never a traceback.
"""

from __future__ import annotations

import http.client
import json
import socket
import sys
import time
from typing import Any

from wrapguard.control.paths import default_directories, find_control_socket
from wrapguard.errors import WrapguardError

TIMEOUT = 5.0  # s for the whole request: a live launcher answers in milliseconds


class _UnixConnection(http.client.HTTPConnection):
    """http.client over a unix stream socket (the Host header says "localhost")."""

    def __init__(self, path: str, timeout: float = TIMEOUT) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.unix_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def request(path: str, method: str = "GET", target: str = "/state", body: Any = None) -> Any:
    """One request to the control socket at `path`; the decoded JSON answer. Raises
    WrapguardError with one line when it cannot be reached or answers with an error."""
    conn = _UnixConnection(path)
    try:
        data = None if body is None else json.dumps(body).encode()
        headers = {} if data is None else {"Content-Type": "application/json"}
        conn.request(method, target, body=data, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
    except (OSError, http.client.HTTPException) as exc:
        why = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise WrapguardError(
            f"cannot reach the control socket {path}: {why} (is wrapguard running?)"
        ) from None
    finally:
        conn.close()
    try:
        value = json.loads(raw)
    except ValueError:
        raise WrapguardError(f"{path}: the answer is not JSON (not a wrapguard socket?)") from None
    if resp.status != 200:
        error = value.get("error") if isinstance(value, dict) else None
        raise WrapguardError(f"{path}: {resp.status} {error or resp.reason}")
    return value


def _answers(path: str) -> bool:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(1.0)
    try:
        sock.connect(path)
    except OSError:
        return False
    finally:
        sock.close()
    return True


def choose_socket() -> str:
    """The one running control socket in the default directories, else WrapguardError."""
    found = [p for p in find_control_socket() if _answers(p)]
    if len(found) == 1:
        return found[0]
    if not found:
        where = " or ".join(default_directories()) or "the default directories"
        raise WrapguardError(f"no running wrapguard found (no control socket in {where})")
    raise WrapguardError(
        f"{len(found)} wrapguards are running: pass --control with one of {', '.join(found)}"
    )


# -- formatting, as wg(8) show does ----------------------------------------------------------


def _plural(n: int, unit: str) -> str:
    return f"{n} {unit}{'' if n == 1 else 's'}"


def ago(seconds: float) -> str:
    """ "1 minute, 5 seconds ago", as wg show prints a latest handshake."""
    left = max(int(seconds), 0)
    if left == 0:
        return "Now"
    parts = []
    for unit, size in (("year", 365 * 86400), ("day", 86400), ("hour", 3600), ("minute", 60)):
        if left >= size:
            parts.append(_plural(left // size, unit))
            left %= size
    if left:
        parts.append(_plural(left, "second"))
    return ", ".join(parts) + " ago"


def size(n: float) -> str:
    """Bytes as wg show prints a transfer: "1.23 KiB", "512 B"."""
    if n < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if n < 1024 or unit == "TiB":
            break
    return f"{n:.2f} {unit}"


def render(state: dict[str, Any], now: float | None = None) -> str:
    """The state as `wg show` lays it out, plus what wrapguard adds (front-ends, bypass)."""
    now = time.time() if now is None else now
    iface = state.get("interface") or {}
    lines = ["interface: wrapguard"]
    lines.append(f"  public key: {iface.get('public_key', '(unknown)')}")
    if iface.get("listen_port"):
        lines.append(f"  listening port: {iface['listen_port']}")
    if iface.get("addresses"):
        lines.append(f"  addresses: {', '.join(map(str, iface['addresses']))}")
    if iface.get("mtu"):
        lines.append(f"  mtu: {iface['mtu']}")
    if iface.get("dns"):
        lines.append(f"  dns: {', '.join(map(str, iface['dns']))}")
    for peer in state.get("peers") or []:
        lines += ["", f"peer: {peer.get('public_key', '(unknown)')}"]
        endpoint = peer.get("endpoint") or peer.get("configured_endpoint")
        if endpoint:
            lines.append(f"  endpoint: {endpoint}")
        lines.append(f"  allowed ips: {', '.join(peer.get('allowed_ips') or []) or '(none)'}")
        if peer.get("latest_handshake"):
            lines.append(f"  latest handshake: {ago(now - float(peer['latest_handshake']))}")
        rx, tx = peer.get("rx_bytes") or 0, peer.get("tx_bytes") or 0
        if rx or tx:
            lines.append(f"  transfer: {size(rx)} received, {size(tx)} sent")
        if peer.get("persistent_keepalive"):
            every = _plural(int(peer["persistent_keepalive"]), "second")
            lines.append(f"  persistent keepalive: every {every}")
        if peer.get("transport"):
            road = peer.get("stream")
            text = str(peer["transport"])
            if isinstance(road, dict):
                text += f" stream ({road.get('state')}, {road.get('connects')} connects"
                if road.get("proxy"):
                    text += f", via {road['proxy']}"
                text += ")"
                if road.get("last_error"):
                    text += f"; last problem: {road['last_error']}"
            lines.append(f"  transport: {text}")
    frontends = state.get("frontends") or []
    if frontends:
        lines += ["", "front-ends:"]
        for f in frontends:
            where = f" {f['address']}" if f.get("address") else ""
            auth = ", password" if f.get("auth") else ""
            lines.append(
                f"  {f.get('kind', '?')}{where} ({_plural(f.get('flows', 0), 'flow')}{auth})"
            )
    bypass = state.get("bypass") or []
    if bypass:
        lines += ["", "bypass:"]
        for b in bypass:
            why = f" (automatic: {b.get('reason', '')})" if b.get("automatic") else ""
            lines.append(f"  {b.get('cidr', '?')}{why}")
    flows = state.get("flows") or {}
    lines += ["", f"flows: {flows.get('tcp', 0)} tcp, {flows.get('udp', 0)} udp"]
    return "\n".join(lines) + "\n"


def main(path: str | None) -> int:
    """Print the state of the wrapguard serving `path` (or the one found); exit status."""
    try:
        path = path or choose_socket()
        state = request(path)
        if not isinstance(state, dict):
            raise WrapguardError(f"{path}: the answer is not a wrapguard state")
        sys.stdout.write(render(state))
        sys.stdout.flush()
    except WrapguardError as exc:
        print(f"wrapguard show: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 1
    except Exception as exc:  # the last line of defence: one line, never a traceback
        print(f"wrapguard show: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


__all__ = ["choose_socket", "main", "render", "request"]
