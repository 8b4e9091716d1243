"""A real WireGuard peer for the rig: one `wireguard-go` process in a namespace.

`WireGuardGo.start()` runs `wireguard-go -f <ifname>` via `ip netns exec`, waits for its control
socket (/var/run/wireguard/<ifname>.sock, shared by every namespace, hence unique ifnames),
loads keys and peers with `wg setconf` (config on stdin, so no key touches the disk), then sets
MTU, addresses (no DAD) and routes with pyroute2. `stop()` terminates it and makes sure the
socket is gone. `show()` parses `wg show <if> dump` for handshake/transfer assertions.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from dataclasses import dataclass, field
from ipaddress import ip_interface, ip_network
from pathlib import Path
from typing import IO, Any

from rig.netns import WG_SOCK_DIR, Netns

from wrapguard.keys import PresharedKey, PrivateKey, PublicKey

IFA_F_NODAD = 0x02
WG_ENV = {"WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD": "1", "LOG_LEVEL": "error"}


@dataclass(frozen=True, slots=True)
class WgPeer:
    """One [Peer] of a wireguard-go interface."""

    public_key: PublicKey
    allowed_ips: tuple[str, ...]
    endpoint: str | None = None
    psk: PresharedKey | None = None
    keepalive: int | None = None

    def setconf_lines(self) -> list[str]:
        lines = ["[Peer]", f"PublicKey = {self.public_key.to_base64()}"]
        if self.psk is not None:
            lines.append(f"PresharedKey = {_b64(self.psk.raw)}")
        lines.append(f"AllowedIPs = {', '.join(self.allowed_ips)}")
        if self.endpoint:
            lines.append(f"Endpoint = {self.endpoint}")
        if self.keepalive:
            lines.append(f"PersistentKeepalive = {self.keepalive}")
        return lines


@dataclass(frozen=True, slots=True)
class WgPeerStatus:
    """One line of `wg show <if> dump` for a peer (times in seconds since the epoch, 0 = never)."""

    public_key: str
    endpoint: str | None
    allowed_ips: tuple[str, ...]
    latest_handshake: int
    rx_bytes: int
    tx_bytes: int
    keepalive: int | None


def _b64(raw: bytes) -> str:
    import base64

    return base64.b64encode(raw).decode()


@dataclass
class WireGuardGo:
    """wireguard-go in `ns` with interface `ifname` (<= 15 chars, unique machine-wide)."""

    ns: Netns
    ifname: str
    private_key: PrivateKey
    listen_port: int | None
    addresses: tuple[str, ...]
    peers: tuple[WgPeer, ...] = ()
    routes: tuple[str, ...] = ()
    mtu: int = 1420
    log_path: Path | None = None
    proc: subprocess.Popen[Any] | None = field(default=None, init=False)

    @property
    def sock_path(self) -> Path:
        return WG_SOCK_DIR / f"{self.ifname}.sock"

    @property
    def public_key(self) -> PublicKey:
        return self.private_key.public_key()

    def start(self, timeout: float = 10.0) -> WireGuardGo:
        assert len(self.ifname) <= 15, self.ifname
        if self.sock_path.exists():
            raise RuntimeError(f"{self.sock_path} already exists: interface name collision")
        log: IO[bytes] | int = subprocess.DEVNULL
        if self.log_path is not None:
            log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child, closed below
        try:
            self.proc = self.ns.popen(
                ["wireguard-go", "-f", self.ifname],
                env={**os.environ, **WG_ENV},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        finally:
            if not isinstance(log, int):
                log.close()
        self.ns.on_close(self.stop)
        deadline = time.monotonic() + timeout
        while not self.sock_path.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"wireguard-go {self.ifname} exited {self.proc.returncode}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"wireguard-go {self.ifname}: no control socket")
            time.sleep(0.005)
        self.setconf()
        with self.ns.iproute() as ipr:
            idx = _wait_link(ipr, self.ifname, deadline)
            ipr.link("set", index=idx, mtu=self.mtu)
            for addr in self.addresses:
                iface = ip_interface(addr)
                ipr.addr(
                    "add",
                    index=idx,
                    address=str(iface.ip),
                    prefixlen=iface.network.prefixlen,
                    flags=IFA_F_NODAD if iface.version == 6 else 0,
                )
            ipr.link("set", index=idx, state="up")
            for route in self.routes:
                net = ip_network(route)
                ipr.route(
                    "add",
                    dst=str(net.network_address),
                    dst_len=net.prefixlen,
                    oif=idx,
                    family=10 if net.version == 6 else 2,
                )
        if self.listen_port is None:
            out = self.wg(["show", self.ifname, "listen-port"]).stdout
            self.listen_port = int(out.strip())
        return self

    def setconf_text(self) -> str:
        lines = ["[Interface]", f"PrivateKey = {self.private_key.to_base64()}"]
        if self.listen_port is not None:
            lines.append(f"ListenPort = {self.listen_port}")
        for peer in self.peers:
            lines += ["", *peer.setconf_lines()]
        return "\n".join(lines) + "\n"

    def setconf(self) -> None:
        """(Re)load the whole configuration: keys, listen port, peers."""
        self.wg(["setconf", self.ifname, "/dev/stdin"], input=self.setconf_text())

    def wg(self, args: list[str], **kwargs: Any) -> subprocess.CompletedProcess[Any]:
        return self.ns.run(["wg", *args], timeout=10, **kwargs)

    def set_peer(
        self,
        public_key: PublicKey,
        *,
        endpoint: str | None = None,
        keepalive: int | None = None,
        allowed_ips: tuple[str, ...] | None = None,
    ) -> None:
        """Change one peer at runtime with `wg set` (endpoint, keepalive, allowed IPs)."""
        args = ["set", self.ifname, "peer", public_key.to_base64()]
        if endpoint is not None:
            args += ["endpoint", endpoint]
        if keepalive is not None:
            args += ["persistent-keepalive", str(keepalive) if keepalive else "off"]
        if allowed_ips is not None:
            args += ["allowed-ips", ",".join(allowed_ips)]
        self.wg(args)

    def show(self) -> list[WgPeerStatus]:
        """The peers as wireguard-go reports them now."""
        out = self.wg(["show", self.ifname, "dump"]).stdout.splitlines()
        peers = []
        for line in out[1:]:  # the first line is the interface itself
            f = line.split("\t")
            peers.append(
                WgPeerStatus(
                    public_key=f[0],
                    endpoint=None if f[2] == "(none)" else f[2],
                    allowed_ips=tuple(x for x in f[3].split(",") if x and x != "(none)"),
                    latest_handshake=int(f[4]),
                    rx_bytes=int(f[5]),
                    tx_bytes=int(f[6]),
                    keepalive=None if f[7] == "off" else int(f[7]),
                )
            )
        return peers

    def peer_status(self, public_key: PublicKey) -> WgPeerStatus:
        b64 = public_key.to_base64()
        for st in self.show():
            if st.public_key == b64:
                return st
        raise KeyError(public_key)

    def stop(self) -> None:
        """Terminate wireguard-go (it removes its socket on SIGTERM) and make sure it is gone."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(3)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        with contextlib.suppress(FileNotFoundError):
            self.sock_path.unlink()


def _wait_link(ipr: Any, ifname: str, deadline: float) -> int:
    while True:
        found = ipr.link_lookup(ifname=ifname)
        if found:
            return int(found[0])
        if time.monotonic() > deadline:
            raise TimeoutError(f"interface {ifname} did not appear")
        time.sleep(0.005)
