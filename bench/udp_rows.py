"""Rows 7, 7r and 8 of `make bench` (root): UDP through our launcher against the kernel path.

7: a program in the client namespace sends an unpaced burst to the rig's UDP sink (servers.py
udpsink, peer namespace, behind wireguard-go), which counts the distinct sequence numbers that
arrived. 7r: the other direction, the sink bursts to a receiving program. 8: sequential 64-byte
round trips to the rig's UDP echo server. The same client script runs wrapped and directly
through the kernel client (RigBench.kernel_up()), turns interleaved, a fresh handshake each.
Where datagrams went missing is read from the namespaces' UDP counters (/proc/net/snmp), the
interfaces' drop counters and our launcher's exit statistics ("run statistics", info level).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Mapping
from typing import Any

from procs import Row, Stat, ratio, run_tracked, tail
from rig.netns import Netns
from rig_rows import RigBench, _raise_nofile


def counters(ns: Netns, rig_id: str, ports: Mapping[int, str]) -> dict[str, int]:
    """In `ns`: the UDP error counters, every UDP socket's drops (/proc/net/udp, named by
    `ports` where known) and every interface's dropped packets, by a short name."""
    cmd = "cat /proc/net/snmp; echo @@; cat /proc/net/udp /proc/net/udp6; echo @@; ip -j -s link"
    snmp, socks, links = ns.run(["sh", "-c", cmd]).stdout.split("@@\n")
    rows = [line.split() for line in snmp.splitlines() if line.startswith("Udp:")]
    udp = {k: int(v) for k, v in zip(rows[0][1:], rows[1][1:], strict=True)}
    res = {
        "Udp.RcvbufErrors": udp["RcvbufErrors"],  # a socket's receive buffer was full
        "Udp.SndbufErrors": udp["SndbufErrors"],  # a send found no room (ENOBUFS, qdisc)
        "Udp.InErrors other": udp["InErrors"] - udp["RcvbufErrors"],
    }
    for line in socks.splitlines():
        f = line.split()
        if len(f) > 12 and f[0] != "sl":  # the last field is the socket's drop count
            port = int(f[1].rsplit(":", 1)[1], 16)
            name = ports.get(port, f"socket :{port}")
            res[f"{name} drops"] = res.get(f"{name} drops", 0) + int(f[-1])
    names = {"a": "client veth", "b": "peer veth", "p": "peer tun", "k": "kernel tun"}
    for link in json.loads(links):
        ifname = str(link["ifname"])
        short = names.get(ifname.removeprefix(f"wgr{rig_id}"), ifname)
        stats = link.get("stats64", {})
        for way in ("rx", "tx"):
            res[f"{short} {way}_dropped"] = int(stats.get(way, {}).get("dropped", 0))
    return res


def _delta(before: Mapping[str, int], after: Mapping[str, int]) -> dict[str, int]:
    return {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}


class Losses:
    """Sums of counter deltas over a path's turns: where its datagrams went missing."""

    def __init__(self) -> None:
        self.sums: dict[str, int] = {}

    def add(self, where: str, delta: Mapping[str, Any]) -> None:
        for k, v in delta.items():
            if isinstance(v, int) and v:
                self.sums[f"{where} {k}"] = self.sums.get(f"{where} {k}", 0) + v

    def fmt(self) -> str:
        return ", ".join(f"{k} {v}" for k, v in sorted(self.sums.items())) or "no drop counted"


def _launcher_drops(stderr: str) -> dict[str, int]:
    """The drop and failure counters of our launcher's "run statistics" line (non-zero only;
    {"statistics line missing": 1} when there is none)."""
    for line in reversed(stderr.splitlines()):
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        if not isinstance(ev, dict) or ev.get("message") != "run statistics":
            continue
        out = {
            f"{g}.{k}": int(v) for g in ("tunnel_drops", "stack_drops") for k, v in ev[g].items()
        }
        out["unrouted_drops"] = int(ev.get("unrouted_drops", 0))
        out["wireguard_udp.send_errors"] = int(ev["wireguard_udp"].get("send_errors", 0))
        for k in ("send_failed", "malformed"):
            out[f"udp_relay.{k}"] = int(ev["udp_relay"].get(k, 0))
        return {k: v for k, v in out.items() if v}
    return {"statistics line missing": 1}


def _sink_count(bench: RigBench, tag: str) -> int:
    """Distinct sequence numbers the sink has for `tag`, once the count stops growing (asked
    from inside the peer namespace, not through the tunnel)."""
    assert bench.rig.peer_ns is not None
    with bench.rig.peer_ns.socket(socket.AF_INET, socket.SOCK_DGRAM) as q:
        q.settimeout(2)
        last, stable = -1, 0
        for _ in range(40):
            q.sendto(b"?" + bytes.fromhex(tag), ("127.0.0.1", bench.rig.udp_sink_port))
            now = int(json.loads(q.recvfrom(65535)[0])["distinct"])
            stable = stable + 1 if now == last else 0
            if stable >= 3:  # nothing new for 0.3 s: our launcher may still be draining
                break
            last = now
            time.sleep(0.1)
        return last


class UdpBench:
    """Rows 7, 7r and 8 on one RigBench."""

    def __init__(self, bench: RigBench) -> None:
        self.b = bench
        self.host = bench.rig.peer_tunnel_v4

    def _run(self, ours: bool, args: list[str]) -> tuple[dict[str, Any], dict[str, int]]:
        """One client run on one path: (its JSON line, our launcher's drop counters)."""
        # Ours logs its exit statistics at info level (the last --log-level given wins).
        argv = self.b.wrapped(args, ("--log-level", "info")) if ours else self.b.direct(args)
        t = run_tracked(argv, timeout=60, env=self.b.env, preexec_fn=_raise_nofile)
        if t.returncode != 0:
            raise RuntimeError(f"exit {t.returncode}: {tail(t.stderr or t.stdout)}")
        drops = _launcher_drops(t.stderr) if ours else {}
        return json.loads(t.stdout.strip().splitlines()[-1]), drops

    def _snapshot(self) -> dict[str, dict[str, int]]:
        rig = self.b.rig
        assert rig.peer_ns is not None
        peer_ports = {rig.peer.port: "wireguard-go socket", rig.udp_sink_port: "sink socket"}
        kc = rig.kernel_client
        client_ports = {kc.listen_port: "wireguard-go socket"} if kc and kc.listen_port else {}
        return {
            "peer": counters(rig.peer_ns, rig.id, peer_ports),
            "client": counters(rig.client, rig.id, client_ports),
        }

    def _burst(self, ours: bool, mode: str, count: int, size: int, losses: Losses) -> dict:
        tag = os.urandom(8).hex()
        script = str(self.b.scripts["udp_burst.py"])
        args = [sys.executable, script, mode, self.host, str(self.b.rig.udp_sink_port)]
        before = self._snapshot()
        out, ours_drops = self._run(ours, [*args, str(count), str(size), tag])
        out["delivered"] = _sink_count(self.b, tag) if mode == "send" else out["distinct"]
        after = self._snapshot()
        deltas = {w: _delta(before[w], after[w]) for w in ("peer", "client")}
        for where, delta in deltas.items():
            losses.add(f"{where} ns", delta)
        # Lost before the tunnel: what the sink could not put into the peer's TUN (row 7r).
        out["entered"] = count - deltas["peer"].get("peer tun tx_dropped", 0)
        losses.add("launcher", ours_drops)
        if mode == "recv":
            losses.add("client ns", {"receiving program's socket drops": out.get("drops", 0)})
        return out

    def rows_burst(self, rounds: int, count: int = 2000, size: int = 1200) -> list[Row]:
        """Rows 7 (our program sends) and 7r (it receives), % of `count` delivered."""
        got: dict[tuple[str, bool], list[dict]] = {}
        losses = {(m, o): Losses() for m in ("send", "recv") for o in (True, False)}
        for r in range(rounds):
            for ours in [True, False] if r % 2 == 0 else [False, True]:
                if not ours:
                    self.b.kernel_up()
                try:
                    for mode in ("send", "recv"):
                        out = self._burst(ours, mode, count, size, losses[(mode, ours)])
                        got.setdefault((mode, ours), []).append(out)
                finally:
                    if not ours:
                        self.b.kernel_down()
        rows = []
        for mode, key, label in (
            ("send", "7", f"UDP burst, {count} x {size} B unpaced, our program sends to a sink "
                          "behind wireguard-go (% delivered)"),
            ("recv", "7r", f"UDP burst, {count} x {size} B unpaced, a sink behind wireguard-go "
                           "sends to our program (% delivered)"),
        ):  # fmt: skip
            o = Stat.of([100 * x["delivered"] / count for x in got[(mode, True)]])
            k = Stat.of([100 * x["delivered"] / count for x in got[(mode, False)]])
            so = Stat.of([x["secs"] * 1e3 for x in got[(mode, True)]])
            sk = Stat.of([x["secs"] * 1e3 for x in got[(mode, False)]])
            row = Row(key, label, o.fmt(), k.fmt(), ratio(o.median, k.median))
            what = "sent in" if mode == "send" else "received over"
            entered = ""
            if mode == "recv":
                eo, ek = (
                    Stat.of([100 * x["delivered"] / max(1, x["entered"]) for x in got[(mode, w)]])
                    for w in (True, False)
                )
                entered = (
                    f"% of what entered the tunnel (the burst less the peer TUN's tx drops) "
                    f"ours {eo.fmt()}, kernel {ek.fmt()}; "
                )
            row.notes = (
                f"ours {o.spread()}, kernel {k.spread()}; {entered}{what} {so.fmt(0)} vs "
                f"{sk.fmt(0)} ms; "
                f"counted losses ours: {losses[(mode, True)].fmt()}; kernel: "
                f"{losses[(mode, False)].fmt()}"
            )
            rows.append(row)
        return rows

    def row_rtt(self, rounds: int, n: int = 500) -> Row:
        """Row 8: n sequential 64-byte round trips to the UDP echo server, median us."""
        row = Row("8", f"UDP echo round trip, {n} sequential 64 B sendto+recvfrom (median us)")
        args = [sys.executable, str(self.b.scripts["udp_rtt.py"]), self.host]
        args += [str(self.b.rig.udp_echo_port), str(n)]
        samples: dict[bool, list[float]] = {True: [], False: []}
        per_round: dict[bool, list[float]] = {True: [], False: []}
        lost = {True: 0, False: 0}
        for r in range(rounds):
            for ours in [True, False] if r % 2 == 0 else [False, True]:
                if not ours:
                    self.b.kernel_up()
                try:
                    out, _ = self._run(ours, args)
                finally:
                    if not ours:
                        self.b.kernel_down()
                samples[ours] += out["rtt"]
                per_round[ours].append(Stat.of(out["rtt"]).median)
                lost[ours] += out["lost"]
        o, k = Stat.of(samples[True]), Stat.of(samples[False])
        ro, rk = Stat.of(per_round[True]), Stat.of(per_round[False])
        row.ours, row.ref, row.ratio = o.fmt(0), k.fmt(0), ratio(o.median, k.median)
        row.notes = (
            f"per-round medians ours {ro.spread(0)}, kernel {rk.spread(0)}; all samples ours "
            f"{o.spread(0)}, kernel {k.spread(0)}; lost (1 s) ours {lost[True]}, kernel "
            f"{lost[False]}"
        )
        return row
