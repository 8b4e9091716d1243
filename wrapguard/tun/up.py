"""`wrapguard up`: the whole host through the tunnel, until SIGINT/SIGTERM (docs/tun.md).

Everything that can be wrong is found before the host is touched: whether we may administer
the network at all (CAP_NET_ADMIN), the config, --route and --exit-node (routing.py), the
interface name, the control socket's directory. Then, in this order: leftovers of a killed
run are removed, the TUN link comes up with its addresses and MTU, the UDP road opens (endpoint
names resolve) and every peer endpoint gets its bypass route, the tunnel's routes go in, the
control socket and DNS= follow. On the way out (a signal, or a fatal error) the same in
reverse: nothing of ours is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from wrapguard import log
from wrapguard.config import Config, IPAddress, IPNetwork, load_config
from wrapguard.errors import WrapguardError
from wrapguard.routing import RoutingTable
from wrapguard.tun.tundev import valid_ifname

CAP_NET_ADMIN = 12
DEFAULT_IFNAME = "wrapguard0"
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@dataclass(frozen=True, slots=True)
class UpOptions:
    config_path: str
    tun: str | None = None
    exit_node: IPAddress | None = None
    routes: tuple[tuple[IPNetwork, IPAddress], ...] = ()
    control: str | None = None


@dataclass(frozen=True, slots=True)
class UpPlan:
    config: Config
    routing: RoutingTable
    ifname: str
    tunnel_routes: tuple[IPNetwork, ...]
    control: str


def has_net_admin() -> bool:
    """CAP_NET_ADMIN in our effective set (root has it, unless it was dropped)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> CAP_NET_ADMIN & 1)
    except (OSError, ValueError):
        pass
    return os.geteuid() == 0


def tunnel_routes(config: Config, routing: RoutingTable) -> tuple[IPNetwork, ...]:
    """The prefixes the kernel must send to the TUN device: every peer's AllowedIPs and every
    policy route (--route, --exit-node, Route=), a /0 as two /1 halves (netconf)."""
    from wrapguard.tun.netconf import split_default

    nets: list[IPNetwork] = [n for p in config.peers for n in p.allowed_ips]
    nets += [r.spec.network for r in routing.routes]
    out = [half for n in dict.fromkeys(nets) for half in split_default(n)]
    return tuple(dict.fromkeys(out))


def prepare(opts: UpOptions) -> UpPlan:
    """Read and check everything; touches nothing. WrapguardError/UsageError: one line."""
    from wrapguard.launch import _default_control
    from wrapguard.runtime.lifetime import make_undumpable

    make_undumpable()
    config = load_config(opts.config_path)
    if not config.peers:
        raise WrapguardError(f"{opts.config_path}: no [Peer] section: nothing to tunnel")
    if not config.interface.addresses:
        raise WrapguardError(f"{opts.config_path}: [Interface] has no Address: the TUN device "
                             "needs one")  # fmt: skip
    for peer in config.peers:
        if peer.stream is not None:  # its relay would need a road and an endpoint bypass here
            raise WrapguardError(
                f"{opts.config_path}:{peer.line}: [Peer] with Endpoint = {peer.stream.url}: the "
                "stream road (docs/streams.md) is not available in TUN mode yet; use the wrapped "
                "mode or the proxies for this peer"
            )
    logger = log.get()
    for notice in config.notices:
        fields = {"file": notice.path, "line": notice.line, "key": notice.key}
        (logger.warning if notice.level == "warning" else logger.debug)(notice.message, **fields)
    routing = RoutingTable.build(config, list(opts.routes), opts.exit_node)
    ifname = opts.tun or _default_ifname(opts.config_path)
    if not valid_ifname(ifname):
        raise WrapguardError(
            f"--tun {ifname!r}: not a valid interface name (1-15 characters, no '/', ':' or spaces)"
        )
    control = os.path.abspath(opts.control or _default_control(opts.config_path))
    from wrapguard.control.paths import check_parent

    check_parent(os.path.dirname(control))  # a bad --control fails before anything is made
    return UpPlan(config, routing, ifname, tunnel_routes(config, routing), control)


def _default_ifname(config_path: str) -> str:
    """The config's stem, as wg-quick names its interface (wg0.conf: wg0)."""
    stem = os.path.splitext(os.path.basename(config_path))[0]
    return stem if valid_ifname(stem) else DEFAULT_IFNAME


def run_up(opts: UpOptions) -> int:
    if not has_net_admin():  # first: whatever else is wrong, this is what the user must know
        raise WrapguardError(
            "wrapguard up needs root or CAP_NET_ADMIN (it creates a TUN device and routes); "
            "without them, wrap one program instead: wrapguard --config F -- CMD"
        )
    return asyncio.run(_up(prepare(opts)))


async def _up(plan: UpPlan) -> int:
    from wrapguard.tun.engine import TunEngine, TunService
    from wrapguard.tun.netconf import HostNet

    logger = log.get("wrapguard.tun")
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in STOP_SIGNALS:  # before the first change: a signal now still cleans up
        loop.add_signal_handler(sig, stop.set)

    def on_error(_loop: asyncio.AbstractEventLoop, context: dict[str, object]) -> None:
        # A bug in one callback: one log line (never a traceback on the terminal), go on.
        exc = context.get("exception")
        logger.error(
            "internal error in the event loop",
            where=str(context.get("message", "")),
            error=repr(exc) if exc is not None else "",
        )

    loop.set_exception_handler(on_error)
    net = HostNet(plan.ifname)
    engine: TunEngine | None = None
    door = None
    undo_dns: Callable[[], None] | None = None
    status = 0
    try:
        net.sweep_leftovers()
        iface = plan.config.interface
        net.create(iface.addresses, iface.mtu)
        assert net.fd is not None
        engine = TunEngine(plan.config, plan.routing, net)
        await engine.start(net.fd)
        for prefix in plan.tunnel_routes:
            net.add_tunnel_route(prefix)
        from wrapguard.control import server as control

        service = TunService(engine, plan.ifname, {})
        door = await control.start(service, plan.control)  # type: ignore[arg-type]
        undo_dns = apply_dns(plan.ifname, iface.dns_servers, iface.dns_search)
        logger.info(
            "up: the host's traffic to the tunnel's routes goes through it",
            tun=plan.ifname,
            addresses=[str(a) for a in iface.addresses],
            routes=[str(r) for r in plan.tunnel_routes],
            control=door.address,
            listen_port=engine.wg.port,
            pid=os.getpid(),
        )
        assert engine.fatal is not None
        stopper: asyncio.Future[object] = asyncio.ensure_future(stop.wait())
        fatal: asyncio.Future[object] = engine.fatal  # type: ignore[assignment]
        done, _ = await asyncio.wait({stopper, fatal}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        if fatal in done:
            exc = engine.fatal.result()
            why = getattr(exc, "strerror", None) or str(exc)
            logger.error(
                "the TUN device failed (deleted from outside?); shutting down",
                tun=plan.ifname,
                error=why,
            )
            status = 1
        else:
            logger.info("stopping")
    finally:
        # The signal handlers stay until the end: a second Ctrl-C must not cut the teardown.
        if door is not None:
            with contextlib.suppress(Exception):
                await door.close()
        if undo_dns is not None:
            with contextlib.suppress(Exception):
                undo_dns()
        if engine is not None:
            with contextlib.suppress(Exception):
                counters = TunService(engine, plan.ifname, {}).state()["counters"]
                logger.info("run statistics", **counters)
            with contextlib.suppress(Exception):
                engine.close()
        net.teardown()
        logger.info("down: everything wrapguard up made is removed", tun=plan.ifname)
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)
    return status


def apply_dns(
    ifname: str, servers: Sequence[IPAddress], search: Sequence[str]
) -> Callable[[], None] | None:
    """DNS= for this link through systemd-resolved when it runs here (undone by `resolvectl
    revert`, and by the link going away); otherwise one line, and /etc/resolv.conf is left
    alone. Returns the undo, or None."""
    if not servers:
        return None
    logger = log.get("wrapguard.tun")
    resolvectl = shutil.which("resolvectl")
    if resolvectl is None or not os.path.exists("/run/systemd/resolve/io.systemd.Resolve"):
        logger.warning(
            "DNS= not applied: systemd-resolved is not running here, and /etc/resolv.conf is "
            "left alone (set the resolver yourself)",
            dns=[str(s) for s in servers],
        )
        return None
    domains = [*search, "~."]
    try:
        subprocess.run([resolvectl, "dns", ifname, *map(str, servers)], check=True,
                       capture_output=True, timeout=10)  # fmt: skip
        subprocess.run([resolvectl, "domain", ifname, *domains], check=True,
                       capture_output=True, timeout=10)  # fmt: skip
    except (OSError, subprocess.SubprocessError) as exc:
        logger.warning("DNS= not applied: resolvectl failed", error=str(exc))
        return None
    logger.info("DNS= applied through systemd-resolved", tun=ifname, dns=[str(s) for s in servers])

    def undo() -> None:
        subprocess.run([resolvectl, "revert", ifname], capture_output=True, timeout=10)

    return undo


__all__ = ["UpOptions", "has_net_admin", "prepare", "run_up", "tunnel_routes"]
