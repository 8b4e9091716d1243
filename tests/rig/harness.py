"""The rig: a client namespace, a real WireGuard peer (wireguard-go) and servers behind it.

`build_rig()` creates, under one short random id: the client namespace (lo, a veth to the peer,
no default route, a logging DNS resolver of its own), the peer namespace (veth, wireguard-go with
10.150.0.1/24 + fd15::1/64, HTTP/TCP-echo/UDP-echo/UDP-sink/DNS servers from servers.py),
optionally a second peer (10.150.1.1/24 + fd15:1::1/64) on its own veth, and the keys "our" side
(the program under test) uses. Every step registers its undo before it runs; `Rig.close()` undoes
everything even after a half-finished setup, and `support.leftovers()` says what, if anything,
survived.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rig.netns import NETNS_ETC, Netns, new_id
from rig.relay import UdpRelay, format_hostport
from rig.support import (
    FileStore,
    KiB,
    MiB,
    b64,
    file_name,
    leftovers,
    read_jsonl,
    spawn_servers,
    veth,
    wait_ready,
)
from rig.wg import WgPeer, WgPeerStatus, WireGuardGo

from wrapguard.keys import PresharedKey, PrivateKey, PublicKey

__all__ = [
    "DEFAULT_DNS_NAMES",
    "FileStore",
    "KiB",
    "MiB",
    "PeerSide",
    "Rig",
    "build_rig",
    "leftovers",
]

HTTP_PORT = 8080
TCP_ECHO_PORT = 9000
UDP_ECHO_PORT = 9001
UDP_SINK_PORT = 9400  # servers.py udpsink, bench rows 7, 7r (tests use 9002-9011 ad hoc)
DNS_PORT = 53
RELAY = Path(__file__).with_name("relay.py")  # ns.python_popen([str(RELAY), "--target", ...])

OUR_TUNNEL_V4 = "10.150.0.2"
OUR_TUNNEL_V6 = "fd15::2"
PEER_TUNNEL_V4 = "10.150.0.1"
PEER_TUNNEL_V6 = "fd15::1"
PEER2_TUNNEL_V4 = "10.150.1.1"
PEER2_TUNNEL_V6 = "fd15:1::1"

DEFAULT_DNS_NAMES: dict[str, list[str]] = {
    "web.wg.test": [PEER_TUNNEL_V4, PEER_TUNNEL_V6],
    "v4only.wg.test": [PEER_TUNNEL_V4],
    "v6only.wg.test": [PEER_TUNNEL_V6],
    "peer2.wg.test": [PEER2_TUNNEL_V4, PEER2_TUNNEL_V6],
}


@dataclass
class PeerSide:
    """A WireGuard peer in its own namespace, as our side sees it."""

    ns: Netns
    wg: WireGuardGo
    veth_v4: str  # the peer's veth address (its endpoint host)
    veth_v6: str
    tunnel_v4: str
    tunnel_v6: str
    tunnel_net_v4: str
    tunnel_net_v6: str

    @property
    def public_key(self) -> PublicKey:
        return self.wg.public_key

    @property
    def port(self) -> int:
        assert self.wg.listen_port is not None
        return self.wg.listen_port

    @property
    def endpoint(self) -> tuple[str, int]:
        return (self.veth_v4, self.port)

    @property
    def endpoint_v6(self) -> tuple[str, int]:
        return (self.veth_v6, self.port)

    def endpoint_str(self, v6: bool = False) -> str:
        return format_hostport(*(self.endpoint_v6 if v6 else self.endpoint))

    @property
    def allowed_ips(self) -> tuple[str, str]:
        return (self.tunnel_net_v4, self.tunnel_net_v6)


@dataclass
class Rig:
    """Everything a test needs; build with build_rig(), always close()."""

    id: str
    n: int
    workdir: Path
    store: FileStore
    our_key: PrivateKey
    psk: PresharedKey | None
    client: Netns
    peer_ns: Netns | None = None
    peer2_ns: Netns | None = None
    peer: PeerSide = field(init=False)
    peer2: PeerSide | None = None
    files: dict[str, tuple[int, str]] = field(default_factory=dict)
    dns_names: dict[str, list[str]] = field(default_factory=dict)
    client_veth_v4: str = ""
    client_veth_v6: str = ""
    client_veth2_v4: str | None = None
    client_veth2_v6: str | None = None
    our_tunnel_v4: str = OUR_TUNNEL_V4
    our_tunnel_v6: str = OUR_TUNNEL_V6
    peer_tunnel_v4: str = PEER_TUNNEL_V4
    peer_tunnel_v6: str = PEER_TUNNEL_V6
    http_port: int = HTTP_PORT
    tcp_echo_port: int = TCP_ECHO_PORT
    udp_echo_port: int = UDP_ECHO_PORT
    udp_sink_port: int = UDP_SINK_PORT
    dns_port: int = DNS_PORT
    kernel_client: WireGuardGo | None = None
    _closed: bool = False

    # -- what tests read --------------------------------------------------------------------
    @property
    def our_public_key(self) -> PublicKey:
        return self.our_key.public_key()

    @property
    def peer_public_key(self) -> PublicKey:
        return self.peer.public_key

    @property
    def peer_endpoint(self) -> tuple[str, int]:
        return self.peer.endpoint

    @property
    def peer_endpoint_v6(self) -> tuple[str, int]:
        return self.peer.endpoint_v6

    @property
    def files_dir(self) -> Path:
        return self.store.dir

    @property
    def dns_log_path(self) -> Path:
        return self.workdir / "dns-peer.log"

    @property
    def client_dns_log_path(self) -> Path:
        return self.workdir / "dns-client.log"

    def url(self, name: str, v6: bool = False, port: int | None = None) -> str:
        host = f"[{self.peer_tunnel_v6}]" if v6 else self.peer_tunnel_v4
        return f"http://{host}:{port or self.http_port}/{name}"

    def dns_log(self) -> list[dict[str, Any]]:
        """Queries the peer's DNS server (10.150.0.1:53, fd15::1:53) received, oldest first."""
        return read_jsonl(self.dns_log_path)

    def client_dns_log(self) -> list[dict[str, Any]]:
        """Queries the client namespace's own resolver (127.0.0.1:53 there) received: leaks."""
        return read_jsonl(self.client_dns_log_path)

    def peer_status(self) -> WgPeerStatus:
        """The peer's view of us: endpoint, latest handshake, transfer counters."""
        return self.peer.wg.peer_status(self.our_public_key)

    def set_peer_endpoint_for_us(self, endpoint: str, keepalive: int | None = None) -> None:
        """Tell the peer where we are (and its keepalive towards us), as `wg set` would."""
        self.peer.wg.set_peer(self.our_public_key, endpoint=endpoint, keepalive=keepalive)
        wg = self.peer.wg
        wg.peers = tuple(
            dataclasses.replace(p, endpoint=endpoint, keepalive=keepalive or p.keepalive)
            if p.public_key == self.our_public_key
            else p
            for p in wg.peers
        )

    def move_peer(self, new_v4: str) -> None:
        """Give the peer's veth the IPv4 address `new_v4` (198.18.N.x) instead of its current
        one, as a host whose address changes (wireguard-go listens on all addresses).
        `rig.peer.veth_v4` (and `peer_endpoint`) follow. The old address goes first: deleting
        a primary address also deletes the secondaries of its subnet (promote_secondaries=0)."""
        p = self.peer
        with p.ns.iproute() as ipr:
            idx = ipr.link_lookup(ifname=f"wgr{self.id}b")[0]
            ipr.addr("del", index=idx, address=p.veth_v4, prefixlen=24)
            ipr.addr("add", index=idx, address=new_v4, prefixlen=24)
            have = {a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=idx, family=2)}
        assert have == {new_v4}, have
        p.veth_v4 = new_v4

    def reset_peer(self) -> None:
        """Make the peer forget its sessions with us (our [Peer] removed and loaded again):
        the next packet either way starts a fresh handshake, with no Rekey-Timeout wait."""
        wg = self.peer.wg
        wg.wg(["set", wg.ifname, "peer", self.our_public_key.to_base64(), "remove"])
        wg.setconf()

    def write_client_config(
        self,
        path: Path | str,
        endpoint_v6: bool = False,
        psk: bool | PresharedKey | None = None,
        extra_lines: Sequence[str] = (),
        *,
        endpoint: str | None = None,
        dns: bool = False,
        address: str | None = None,
        allowed_ips: str | None = None,
        keepalive: int | None = None,
        listen_port: int | None = None,
        mtu: int | None = None,
        interface_lines: Sequence[str] = (),
        second_peer: bool = True,
    ) -> Path:
        """Write a wg-quick config for OUR side (the program under test) and return its path.

        psk: None = the rig's PSK if it has one, False = none, or a specific key (e.g. a wrong
        one). endpoint overrides the peer's (e.g. a relay's). extra_lines go at the very end.
        """
        psk_key = self.psk if psk is None or psk is True else psk or None
        lines = ["[Interface]", f"PrivateKey = {self.our_key.to_base64()}"]
        lines.append(f"Address = {address or f'{self.our_tunnel_v4}/32, {self.our_tunnel_v6}/128'}")
        if dns:
            lines.append(f"DNS = {self.peer_tunnel_v4}")
        if listen_port is not None:
            lines.append(f"ListenPort = {listen_port}")
        if mtu is not None:
            lines.append(f"MTU = {mtu}")
        lines += list(interface_lines)
        peers = [self.peer] + ([self.peer2] if self.peer2 is not None and second_peer else [])
        for i, p in enumerate(peers):
            lines += ["", "[Peer]", f"PublicKey = {p.public_key.to_base64()}"]
            if psk_key is not None:
                lines.append(f"PresharedKey = {b64(psk_key.raw)}")
            ep = endpoint if endpoint is not None and i == 0 else p.endpoint_str(endpoint_v6)
            lines.append(f"Endpoint = {ep}")
            aips = allowed_ips if allowed_ips is not None and i == 0 else ", ".join(p.allowed_ips)
            lines.append(f"AllowedIPs = {aips}")
            if keepalive:
                lines.append(f"PersistentKeepalive = {keepalive}")
        lines += list(extra_lines)
        path = Path(path)
        path.write_text("\n".join(lines) + "\n")
        path.chmod(0o600)
        return path

    # -- extra parts a test may add -----------------------------------------------------------
    def start_relay(
        self,
        *,
        loss: float = 0.0,
        dup: float = 0.0,
        reorder: float = 0.0,
        seed: int = 0,
        v6: bool = False,
        target: tuple[str, int] | None = None,
        **kwargs: Any,
    ) -> UdpRelay:
        """A lossy relay in the client namespace ([::1] or 127.0.0.1, ephemeral port) to the
        peer's endpoint; give our side `Endpoint = relay.endpoint`. Stopped by close()."""
        relay = UdpRelay(
            target or (self.peer_endpoint_v6 if v6 else self.peer_endpoint),
            listen=("::1" if v6 else "127.0.0.1", 0),
            loss=loss,
            dup=dup,
            reorder=reorder,
            seed=seed,
            sock_factory=self.client.socket,
            **kwargs,
        )
        self.client.on_close(relay.stop)
        return relay.start()

    def start_kernel_client(
        self,
        endpoint: str | None = None,
        endpoint_v6: bool = False,
        keepalive: int | None = None,
        listen_port: int | None = None,
    ) -> WireGuardGo:
        """wireguard-go in the CLIENT namespace posing as our side (our key, 10.150.0.2, fd15::2)
        so that the kernel's TCP/UDP stack can be used as a reference client."""
        assert self.kernel_client is None, "one kernel client per rig"
        peers = [self.peer] + ([self.peer2] if self.peer2 is not None else [])
        wg = WireGuardGo(
            self.client,
            f"wgr{self.id}k",
            private_key=self.our_key,
            listen_port=listen_port,
            addresses=(f"{self.our_tunnel_v4}/24", f"{self.our_tunnel_v6}/64"),
            peers=tuple(
                WgPeer(
                    p.public_key,
                    p.allowed_ips,
                    endpoint=(endpoint if endpoint and i == 0 else p.endpoint_str(endpoint_v6)),
                    psk=self.psk,
                    keepalive=keepalive,
                )
                for i, p in enumerate(peers)
            ),
            routes=tuple(a for p in peers[1:] for a in p.allowed_ips),
            log_path=self.workdir / "wg-kernel-client.log",
        )
        self.kernel_client = wg
        return wg.start()

    # -- teardown -----------------------------------------------------------------------------
    def namespaces(self) -> list[Netns]:
        return [ns for ns in (self.client, self.peer_ns, self.peer2_ns) if ns is not None]

    def close(self) -> list[str]:
        """Tear everything down; returns the problems met (never raises)."""
        if self._closed:
            return []
        self._closed = True
        problems: list[str] = []
        for ns in reversed(self.namespaces()):
            problems += ns.close()
        return problems


def build_rig(
    workdir: Path,
    store: FileStore,
    *,
    psk: bool = False,
    second_peer: bool = False,
    peer_endpoint_for_us: str | int | None = None,
    keepalive: int | None = None,
    file_sizes: Sequence[int] | Mapping[str, int] = (KiB, MiB),
    dns_names: Mapping[str, list[str]] | None = None,
    client_resolver: bool = True,
    servers: bool = True,
) -> Rig:
    """Create a rig (see the module docstring). On any failure, everything made is removed.

    peer_endpoint_for_us: the Endpoint the peer has for us; an int means port P on the client's
    veth address (198.18.N.1:P), a string is used as is. keepalive: the peer's
    PersistentKeepalive towards us.
    """
    rig_id = new_id()
    n = int(rig_id, 16) % 250 + 2
    workdir.mkdir(parents=True, exist_ok=True)
    rig = Rig(
        id=rig_id,
        n=n,
        workdir=workdir,
        store=store,
        our_key=PrivateKey.generate(),
        psk=PresharedKey(os.urandom(32)) if psk else None,
        client=Netns("c", rig_id),
        dns_names=dict(dns_names if dns_names is not None else DEFAULT_DNS_NAMES),
    )
    try:
        _populate(rig, second_peer, peer_endpoint_for_us, keepalive, file_sizes, client_resolver)
        if servers:
            _start_all_servers(rig)
    except BaseException:
        problems = rig.close()
        if problems:
            print("rig teardown after failed setup:", *problems, sep="\n  ", file=sys.stderr)
        raise
    return rig


def _populate(
    rig: Rig,
    second_peer: bool,
    peer_endpoint_for_us: str | int | None,
    keepalive: int | None,
    file_sizes: Sequence[int] | Mapping[str, int],
    client_resolver: bool,
) -> None:
    n, rid = rig.n, rig.id
    rig.client_veth_v4, rig.client_veth_v6 = f"198.18.{n}.1", f"fd18:{n}::1"
    if client_resolver:
        rig.client.resolv_conf("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
    rig.peer_ns = Netns("p", rid)
    veth(
        rig.client,
        rig.peer_ns,
        f"wgr{rid}a",
        f"wgr{rid}b",
        (rig.client_veth_v4, rig.client_veth_v6, f"198.18.{n}.2", f"fd18:{n}::2"),
    )
    if isinstance(peer_endpoint_for_us, int):
        peer_endpoint_for_us = f"{rig.client_veth_v4}:{peer_endpoint_for_us}"
    us = (f"{OUR_TUNNEL_V4}/32", f"{OUR_TUNNEL_V6}/128")
    wg = WireGuardGo(
        rig.peer_ns,
        f"wgr{rid}p",
        private_key=PrivateKey.generate(),
        listen_port=None,
        addresses=(f"{PEER_TUNNEL_V4}/24", f"{PEER_TUNNEL_V6}/64"),
        peers=(WgPeer(rig.our_public_key, us, peer_endpoint_for_us, rig.psk, keepalive),),
        log_path=rig.workdir / "wg-peer.log",
    ).start()
    rig.peer = PeerSide(
        rig.peer_ns, wg, f"198.18.{n}.2", f"fd18:{n}::2", PEER_TUNNEL_V4, PEER_TUNNEL_V6,
        "10.150.0.0/24", "fd15::/64",
    )  # fmt: skip
    if second_peer:
        rig.peer2_ns = Netns("q", rid)
        rig.client_veth2_v4, rig.client_veth2_v6 = f"198.19.{n}.1", f"fd18:{n}:1::1"
        veth(
            rig.client,
            rig.peer2_ns,
            f"wgr{rid}c",
            f"wgr{rid}d",
            (rig.client_veth2_v4, rig.client_veth2_v6, f"198.19.{n}.2", f"fd18:{n}:1::2"),
        )
        wg2 = WireGuardGo(
            rig.peer2_ns,
            f"wgr{rid}q",
            private_key=PrivateKey.generate(),
            listen_port=None,
            addresses=(f"{PEER2_TUNNEL_V4}/24", f"{PEER2_TUNNEL_V6}/64"),
            peers=(WgPeer(rig.our_public_key, us, None, rig.psk, None),),
            routes=us,
            log_path=rig.workdir / "wg-peer2.log",
        ).start()
        rig.peer2 = PeerSide(
            rig.peer2_ns, wg2, f"198.19.{n}.2", f"fd18:{n}:1::2", PEER2_TUNNEL_V4,
            PEER2_TUNNEL_V6, "10.150.1.0/24", "fd15:1::/64",
        )  # fmt: skip
    items = file_sizes.items() if isinstance(file_sizes, Mapping) else [
        (file_name(s), s) for s in file_sizes
    ]  # fmt: skip
    for name, size in items:
        rig.files[name] = rig.store.get(name, size)


def _start_all_servers(rig: Rig) -> None:
    common = ["--http", str(rig.http_port), "--dir", str(rig.files_dir)]
    common += ["--tcpecho", str(rig.tcp_echo_port), "--udpecho", str(rig.udp_echo_port)]
    common += ["--udpsink", str(rig.udp_sink_port)]
    assert rig.peer_ns is not None
    dns = ["--dns", str(rig.dns_port), "--names", json.dumps(rig.dns_names)]
    w, rid = rig.workdir, rig.id
    procs = spawn_servers(
        rig.peer_ns, w, f"{rid}-peer", [["all", *common, *dns, "--log", str(rig.dns_log_path)]]
    )
    if rig.peer2_ns is not None:
        procs += spawn_servers(rig.peer2_ns, w, f"{rid}-peer2", [["all", *common]])
    if (NETNS_ETC / rig.client.name / "resolv.conf").exists():
        client_dns = ["dns", "--port", "53", "--names", "{}", "--log", str(rig.client_dns_log_path)]
        procs += spawn_servers(rig.client, w, f"{rid}-client", [client_dns])
    wait_ready(procs)
