"""Everything `wrapguard up` changes on the host, through netlink (pyroute2), and nothing else.

What it makes: one TUN link (its addresses and the kernel's routes for them go with it), and
routes in the main table: the tunnel's prefixes via the TUN device (a /0 as two /1 halves, so
the host's own default route stays as it was and wins back when the link goes), and bypass
host routes (peer endpoints, user entries) via the route the destination had without us.

How it is owned: every route carries the protocol number RTPROT_WRAPGUARD (`ip route show
proto 87`), and a ledger file under /run/wrapguard/ (one per network namespace and link) lists
each item before it is made. `HostNet.teardown()` removes exactly what the ledger lists; a run
that finds the ledger of a dead run in its namespace removes that run's leftovers first. A
route delete always names our protocol, so the kernel never matches someone else's route.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import json
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wrapguard import log
from wrapguard.errors import WrapguardError
from wrapguard.tun.tundev import open_tun

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface

RTPROT_WRAPGUARD = 87  # free in /etc/iproute2/rt_protos
MAIN_TABLE = 254
RTN_UNICAST, RTN_LOCAL, RTN_THROW = 1, 2, 9
SCOPE_LINK, SCOPE_NOWHERE = 253, 255
IFA_F_NODAD = 0x02
AF = {4: 2, 6: 10}  # AF_INET, AF_INET6
STATE_DIR_ENV = "WRAPGUARD_STATE_DIR"  # tests only; the default is /run/wrapguard
STATE_DIR = "/run/wrapguard"


def state_dir() -> Path:
    return Path(os.environ.get(STATE_DIR_ENV) or STATE_DIR)


def netns_id() -> str:
    """Which network namespace this process is in (device:inode of /proc/self/ns/net)."""
    st = os.stat("/proc/self/ns/net")
    return f"{st.st_dev:x}-{st.st_ino}"


def process_start(pid: int) -> str | None:
    """The start time of `pid` (field 22 of /proc/PID/stat), None if it is gone: a pid and
    its start time name one process, even after the pid is reused."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()[19]


def split_default(net: IPNetwork) -> list[IPNetwork]:
    """A default route as two halves (0/1 and 128/1; ::/1 and 8000::/1): more specific than
    the host's default, so it wins without being replaced."""
    if net.prefixlen:
        return [net]
    return list(net.subnets(prefixlen_diff=1))


@dataclass(frozen=True, slots=True)
class Via:
    """How a destination leaves the host without the tunnel: a gateway and/or a device, or
    nothing at all (no route: a `throw` route then keeps it from the tunnel's routes)."""

    oif: int | None = None
    gateway: str | None = None

    def describe(self, ifname: str) -> str:
        if self.oif is None:
            return "throw (no route outside the tunnel: unreachable)"
        return f"via {self.gateway} dev {ifname}" if self.gateway else f"dev {ifname}"


class Ledger:
    """The state file: what this run has made, written (atomically) before each change."""

    def __init__(self, path: Path, data: dict[str, Any]) -> None:
        self.path = path
        self.data = data
        self.written = False  # by this process: only then is the file ours to remove

    @classmethod
    def for_link(cls, ifname: str) -> Ledger:
        d = state_dir()
        path = d / f"tun-{netns_id()}-{ifname}.json"
        data: dict[str, Any] = {
            "pid": os.getpid(),
            "start": process_start(os.getpid()),
            "ifname": ifname,
            "ifindex": None,
            "routes": [],
        }
        return cls(path, data)

    @property
    def routes(self) -> list[dict[str, Any]]:
        routes: list[dict[str, Any]] = self.data["routes"]
        return routes

    def save(self) -> None:
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(self.data, f)
            os.replace(tmp, self.path)
            self.written = True
        except OSError as exc:
            raise WrapguardError(
                f"cannot write the state file {self.path}: {exc.strerror or exc} (it records "
                "what wrapguard up makes, so that it can always be removed)"
            ) from None

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self.written = False

    def alive(self) -> bool:
        """Is the run that wrote it still running?"""
        start = self.data.get("start")
        pid = self.data.get("pid")
        return isinstance(pid, int) and start is not None and process_start(pid) == start


def _ledgers_here() -> Iterable[Ledger]:
    d = state_dir()
    prefix = f"tun-{netns_id()}-"
    with contextlib.suppress(OSError):
        for path in sorted(d.glob(f"{prefix}*.json")):
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(data, dict) and isinstance(data.get("routes"), list):
                yield Ledger(path, data)


def _attr(msg: Any, name: str) -> Any:
    return msg.get_attr(name)


class _Netlink:
    """pyroute2's IPRoute on a thread of its own: its synchronous API runs an event loop of
    its own, which cannot run inside ours. Each call waits for its answer (local netlink:
    quick), results come back as lists."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="wrapguard-netlink")
        self._ipr: Any = self._pool.submit(self._open).result()

    @staticmethod
    def _open() -> Any:
        from pyroute2 import IPRoute

        return IPRoute()

    def _call(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        out = getattr(self._ipr, name)(*args, **kwargs)
        if out is not None and not isinstance(out, list | tuple | dict | int | str):
            with contextlib.suppress(TypeError):
                out = list(out)
        return out

    def __getattr__(self, name: str) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            return self._pool.submit(self._call, name, args, kwargs).result()

        return call

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._pool.submit(self._ipr.close).result()
        self._pool.shutdown(wait=True)


class HostNet:
    """The one owner of our netlink changes (one IPRoute socket, in this namespace)."""

    def __init__(self, ifname: str) -> None:
        self.log = log.get("wrapguard.tun")
        self.ipr = _Netlink()
        self.ifname = ifname
        self.ledger = Ledger.for_link(ifname)
        self.fd: int | None = None
        self.index: int | None = None

    # -- leftovers ------------------------------------------------------------------------------

    def sweep_leftovers(self) -> None:
        """Remove what dead runs in this namespace left (their ledgers say what); refuse if a
        live run owns our link name."""
        for old in _ledgers_here():
            if old.alive():
                if old.data.get("ifname") == self.ifname:
                    raise WrapguardError(
                        f"{self.ifname} is in use by another wrapguard up (pid "
                        f"{old.data.get('pid')}): pass another --tun NAME"
                    )
                continue
            removed = self._undo(old)
            old.remove()
            self.log.info(
                "removed what an earlier run left behind",
                pid=old.data.get("pid"),
                link=old.data.get("ifname"),
                routes=removed,
            )

    def _undo(self, ledger: Ledger) -> int:
        n = 0
        for rec in reversed(ledger.routes):
            if self._del_route(rec):
                n += 1
        name, index = ledger.data.get("ifname"), ledger.data.get("ifindex")
        if isinstance(name, str) and isinstance(index, int) and self._is_our_link(name, index):
            with contextlib.suppress(Exception):
                self.ipr.link("del", index=index)
        return n

    def _is_our_link(self, name: str, index: int) -> bool:
        try:
            links = self.ipr.get_links(index)
        except Exception:
            return False
        for link in links:
            info = _attr(link, "IFLA_LINKINFO")
            kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
            if _attr(link, "IFLA_IFNAME") == name and kind == "tun":
                return True
        return False

    def ifname_of(self, index: int | None) -> str:
        if index is None:
            return ""
        with contextlib.suppress(Exception):
            for link in self.ipr.get_links(index):
                return str(_attr(link, "IFLA_IFNAME"))
        return f"if{index}"

    def link_exists(self, name: str) -> bool:
        return bool(self.ipr.link_lookup(ifname=name))

    # -- the link -------------------------------------------------------------------------------

    def create(self, addresses: Iterable[IPInterface], mtu: int) -> None:
        """The TUN link, its MTU and addresses (IPv6 without DAD), up."""
        if self.link_exists(self.ifname):
            raise WrapguardError(
                f"a network interface named {self.ifname} already exists: pass --tun NAME"
            )
        self.ledger.save()  # before anything exists: a kill from here on leaves a record
        self.fd, name = open_tun(self.ifname)
        idx = self.ipr.link_lookup(ifname=name)
        if not idx:
            raise WrapguardError(f"the TUN device {name} vanished as it was made")
        self.index = idx[0]
        self.ledger.data["ifindex"] = self.index
        self.ledger.save()
        try:
            self.ipr.link("set", index=self.index, mtu=mtu)
            for a in addresses:
                self.ipr.addr(
                    "add",
                    index=self.index,
                    address=str(a.ip),
                    prefixlen=a.network.prefixlen,
                    flags=IFA_F_NODAD if a.version == 6 else 0,
                )
            self.ipr.link("set", index=self.index, state="up")
        except Exception as exc:
            raise WrapguardError(f"cannot set up {self.ifname}: {_why(exc)}") from None

    # -- routes ---------------------------------------------------------------------------------

    def add_tunnel_route(self, net: IPNetwork) -> dict[str, Any]:
        assert self.index is not None
        return self.add_route(net, Via(oif=self.index))

    def add_route(self, net: IPNetwork, via: Via) -> dict[str, Any]:
        """One route of ours in the main table; WrapguardError naming it if the kernel says
        no (e.g. the host already has that exact route)."""
        rec: dict[str, Any] = {
            "family": AF[net.version],
            "dst": str(net.network_address),
            "dst_len": net.prefixlen,
            "table": MAIN_TABLE,
            "type": RTN_UNICAST if via.oif is not None else RTN_THROW,
        }
        if via.oif is not None:
            rec["oif"] = via.oif
        if via.gateway:
            rec["gateway"] = via.gateway
        self.ledger.routes.append(rec)
        self.ledger.save()
        scope = SCOPE_LINK if net.version == 4 and via.oif is not None and not via.gateway else 0
        try:
            self.ipr.route("add", proto=RTPROT_WRAPGUARD, scope=scope, **rec)
        except Exception as exc:
            self.ledger.routes.remove(rec)
            self.ledger.save()
            if getattr(exc, "code", None) == errno.EEXIST:
                raise WrapguardError(
                    f"cannot add the route {net}: this host already has a route to exactly "
                    f"{net} (not ours; remove it, or leave {net} out of AllowedIPs/--route)"
                ) from None
            raise WrapguardError(f"cannot add the route {net}: {_why(exc)}") from None
        return rec

    def remove_route(self, rec: dict[str, Any]) -> None:
        with contextlib.suppress(ValueError):
            self.ledger.routes.remove(rec)
        self._del_route(rec)
        self.ledger.save()

    def _del_route(self, rec: dict[str, Any]) -> bool:
        fields = {k: rec[k] for k in ("family", "dst", "dst_len", "table", "type") if k in rec}
        try:
            # RT_SCOPE_NOWHERE: any scope (as `ip route del` asks); our protocol: only ours.
            self.ipr.route("del", proto=RTPROT_WRAPGUARD, scope=SCOPE_NOWHERE, **fields)
        except Exception as exc:
            if getattr(exc, "code", None) not in (errno.ESRCH, errno.ENOENT, errno.ENODEV):
                self.log.warning("cannot remove a route of ours", route=rec, error=_why(exc))
            return False
        return True

    def underlying(self, ip: IPAddress) -> Via | None:
        """How `ip` leaves the host without our tunnel routes: the kernel's answer when it is
        not ours (it also knows policy rules), else the main table's best route that is not
        ours. None: local or loopback (nothing to bypass)."""
        try:
            got = self.ipr.route("get", dst=str(ip))
        except Exception as exc:
            if getattr(exc, "code", None) not in (errno.ENETUNREACH, errno.EHOSTUNREACH):
                self.log.warning("route lookup failed", dst=str(ip), error=_why(exc))
            got = []
        for msg in got:
            if msg["type"] == RTN_LOCAL:
                return None
            oif = _attr(msg, "RTA_OIF")
            if oif is not None and oif != self.index:
                return Via(oif=oif, gateway=_attr(msg, "RTA_GATEWAY"))
        return self._main_lookup(ip)

    def _main_lookup(self, ip: IPAddress) -> Via:
        best: tuple[int, int, Via] | None = None
        for msg in self.ipr.get_routes(family=AF[ip.version], table=MAIN_TABLE):
            if msg["proto"] == RTPROT_WRAPGUARD or msg["type"] != RTN_UNICAST:
                continue
            dst = _attr(msg, "RTA_DST") or ("0.0.0.0" if ip.version == 4 else "::")
            net = ipaddress.ip_network(f"{dst}/{msg['dst_len']}", strict=False)
            if ip not in net:
                continue
            oif, gw = _attr(msg, "RTA_OIF"), _attr(msg, "RTA_GATEWAY")
            hops = _attr(msg, "RTA_MULTIPATH")
            if oif is None and hops:
                oif = hops[0]["oif"]
                gw = hops[0].get_attr("RTA_GATEWAY")
            if oif is None or oif == self.index:
                continue
            key = (-msg["dst_len"], _attr(msg, "RTA_PRIORITY") or 0)
            if best is None or key < best[:2]:
                best = (*key, Via(oif=oif, gateway=gw))
        return best[2] if best is not None else Via()

    # -- teardown -------------------------------------------------------------------------------

    def teardown(self) -> None:
        """Remove everything this run made (the ledger's list), then the ledger."""
        for rec in reversed(list(self.ledger.routes)):
            self._del_route(rec)
        self.ledger.routes.clear()
        if self.fd is not None:
            os.close(self.fd)  # a non-persistent TUN link goes with its last fd
            self.fd = None
        if self.index is not None and self._is_our_link(self.ifname, self.index):
            with contextlib.suppress(Exception):
                self.ipr.link("del", index=self.index)
        self.index = None
        if self.ledger.written:  # never the ledger of a live run that refused us
            self.ledger.remove()
        with contextlib.suppress(Exception):
            self.ipr.close()


def _why(exc: BaseException) -> str:
    code = getattr(exc, "code", None)
    if isinstance(code, int) and code > 0:
        return os.strerror(code)
    return str(exc) or type(exc).__name__


__all__ = ["RTPROT_WRAPGUARD", "HostNet", "Ledger", "Via", "split_default"]
