"""The launcher's run: tunnel engine + local channel + the wrapped program, on one loop.

`Launcher.run()` brings the engine up (UDP socket, handshakes for peers with
PersistentKeepalive), starts the channel server, runs the program with the shim preloaded, and
tears everything down on every exit path. The shim's requests are the preload door's
(wrapguard/doors/preload/), which stands on the flow API (runtime/service.py) like every door.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import os
import secrets
import signal
from typing import TYPE_CHECKING

from wrapguard import log, shim, startup
from wrapguard.config import Config
from wrapguard.doors.preload.channel import ChannelServer
from wrapguard.doors.preload.door import PreloadDoor
from wrapguard.errors import WrapguardError
from wrapguard.routing import RoutingTable
from wrapguard.runtime import lifetime, rundir
from wrapguard.runtime.bypass import BypassList
from wrapguard.runtime.child import FORWARDED, KILL_GRACE, raise_fd_limit, run_child
from wrapguard.runtime.engine import Engine, PooledRandom
from wrapguard.runtime.lifetime import StatusLink
from wrapguard.runtime.relay import TcpRelay
from wrapguard.runtime.service import TunnelService
from wrapguard.tunnel.timers import TimerConfig
from wrapguard.wire.ipc import TOKEN_LEN

if TYPE_CHECKING:
    from wrapguard.doors import Door
    from wrapguard.doors.seccomp_listen import SeccompListener
    from wrapguard.launch import Plan

HELLO_TIMEOUT = 3.0  # compat.md: READY from the shim within 3 s
# Seconds without progress before a flow's undelivered data is given up (the environment
# variable is a test knob, documented in docs/testing.md).
DRAIN_STALL = float(os.environ.get("WRAPGUARD_TEST_DRAIN_STALL", "30"))
DRAIN_ANNOUNCE = 1.0  # seconds of draining before one log line says so
DRAIN_POLL = 0.02  # seconds between drain checks (the exit path only)
STAGED_STALL = 5.0  # seconds datagrams may wait for a handshake at exit (Rekey-Timeout [W 6.1])


class TunnelSession:
    """Everything a wrapped program needs on the loop: engine, flow API (service), the
    preload door and its channel, resolver. `start_tunnel()` (the WireGuard socket), then
    `start_channel()`, then `child_env()`; `close()` on every exit path. Used by the launcher
    and by --self-test."""

    def __init__(
        self, config: Config, routing: RoutingTable, *, timers: TimerConfig | None = None
    ) -> None:
        self.config = config
        self.log = log.get("wrapguard.launcher")
        self.engine = Engine(config, routing, timers=timers)
        self.bypass = BypassList()  # one for every door, and the control socket's
        self.key_lock = rundir.KeyLock()
        self._owner_fd: int | None = None  # launcher.pid, locked while we run
        self.service = TunnelService(self)
        self.preload = PreloadDoor(self.service)
        self.channel = ChannelServer(
            self.preload,
            secret=secrets.token_bytes(32),
            uid=os.getuid(),
            tunnel_addrs=self.engine.addresses,
            token_source=PooledRandom(small=TOKEN_LEN),  # a getrandom() per CONNECT otherwise
        )

    async def start_tunnel(self) -> None:
        try:
            await self.engine.start()
        except OSError as exc:
            raise WrapguardError(f"cannot open the WireGuard UDP socket: {exc}") from None

    async def start_channel(self) -> None:
        preload, channel = self.preload, self.channel
        await channel.start()
        assert channel.directory is not None
        self._owner_fd = rundir.mark_owner(channel.directory)
        parent = os.path.dirname(channel.directory)
        rundir.sweep_stale(parent, keep=channel.directory)
        other = self.key_lock.acquire(parent, self.config.interface.private_key.public_key().raw)
        if other is not None:
            self.log.warning(
                "another wrapguard uses this private key: the peer keeps one endpoint per key "
                "and follows whichever client handshook last, so the two will take the tunnel "
                "from each other (give each client its own key)",
                other_pid=other if other > 0 else None,
            )
        await preload.udp.start()
        channel.udp_env = preload.udp.env_value()
        iface = self.config.interface
        if iface.dns_servers:
            from wrapguard.runtime.dns import DnsResolver  # DNS= only (wire/dns.py with it)

            resolver = DnsResolver(self.engine, iface.dns_servers, iface.dns_search)
            resolver.start()
            self.service.resolver = resolver
            channel.resolve_names = True
        else:
            self.log.info("no DNS= in the config: names resolve on the host, outside the tunnel")

    def child_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.channel.env())
        env[shim.ENV_PRELOAD] = shim.preload_value(env.get(shim.ENV_PRELOAD), shim.shim_path())
        return env

    async def drain(self, stall: float = DRAIN_STALL, abandon: asyncio.Event | None = None) -> None:
        """Stay until every byte the program sent is acknowledged by the peer (its FIN too)
        and every datagram it sent has left (a handshake may be under way), giving up after
        `stall` seconds without progress (datagrams: STAGED_STALL), or at once when
        `abandon` is set (a stop signal): one warning naming each flow and what was left
        undelivered, and a reset, so the peer does not wait forever."""
        loop = asyncio.get_running_loop()
        self.preload.udp.take_queued()
        self.engine.flush()
        started = since = loop.time()
        mark: tuple[int, int, int] | None = None
        announced = False
        while True:
            pending = [
                h for h in list(self.engine.handlers.values())
                if isinstance(h, TcpRelay) and not h.delivered()
            ]  # fmt: skip
            staged = self._staged_datagrams()
            if not pending and not staged:
                return
            now_mark = (len(pending), sum(h.undelivered() for h in pending), staged)
            now = loop.time()
            if now_mark != mark:
                mark, since = now_mark, now
            stopped = abandon is not None and abandon.is_set()
            limit = stall if pending else min(stall, STAGED_STALL)
            if stopped or now - since >= limit:
                why = "stopped by a signal" if stopped else "no progress"
                for h in pending:
                    self.log.warning(
                        f"flow reset with data undelivered: {why}",
                        flow=h.describe(),
                        undelivered_bytes=h.undelivered(),
                        stalled_s=round(now - since, 1),
                    )
                    h.abort()
                if staged:
                    self.log.warning(
                        f"datagrams never sent: the peer did not answer our handshake ({why})",
                        datagrams=staged,
                    )
                self.engine.flush()
                return
            if not announced and now - started >= DRAIN_ANNOUNCE:
                announced = True
                self.log.info(
                    "delivering what the program sent before it exited",
                    flows=now_mark[0],
                    undelivered_bytes=now_mark[1],
                    datagrams=staged,
                )
            await asyncio.sleep(DRAIN_POLL)

    def _staged_datagrams(self) -> int:
        """UDP packets waiting in the peers' staged queues for a handshake (TCP segments
        there are the flows' own business: they retransmit and are drained as flows)."""
        n = 0
        for peer in self.engine.device.peers:
            for pkt in peer.staged:
                proto = pkt[9] if pkt[0] >> 4 == 4 else pkt[6]
                n += proto == 17
        return n

    def stats(self) -> dict[str, object]:
        """Every counter the run kept: traffic, and each drop by its reason (non-zero only)."""
        engine = self.engine
        return {
            "wireguard_udp": dict(engine.wg.stats),
            "tunnel_drops": {r.name: n for r, n in engine.device.counters.items() if n},
            "stack_drops": {r.name: n for r, n in engine.stack.drops.items() if n},
            "tcp": engine.stack.tcp_counters(),
            "unrouted_drops": engine.unrouted_drops,
            "channel": dataclasses.asdict(self.channel.stats),
            "udp_relay": dataclasses.asdict(self.preload.udp.stats),
        }

    def close(self) -> None:
        with contextlib.suppress(Exception):  # counters must never stop the teardown
            self.log.info("run statistics", **self.stats())
        self.key_lock.release()
        if self._owner_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._owner_fd)
            self._owner_fd = None
        self.preload.close()
        self.channel.close()
        self.preload.udp.close()
        if self.service.resolver is not None:
            self.service.resolver.close()
        self.engine.close()


class Launcher:
    """One run: everything up, the program to its end (or, with no program, a proxy daemon
    until SIGINT/SIGTERM), the tunnel for as long as it is used, every flow drained,
    everything down (docs/architecture.md, "Lifetime")."""

    def __init__(
        self,
        plan: Plan,
        executable: str | None,
        *,
        timers: TimerConfig | None = None,
        link: StatusLink | None = None,
    ) -> None:
        self.plan = plan
        self.config = plan.config
        self.routing = plan.routing
        self.argv = list(plan.options.command)
        self.executable = executable
        self.timers = timers
        self.link = link or StatusLink(None, None)
        self.log = log.get("wrapguard.launcher")
        self.doors: list[Door] = []
        self.seccomp: SeccompListener | None = None

    async def _start_doors(self, service: TunnelService) -> None:
        """The control socket, then each proxy the flags or the config ask for."""
        if self.plan.control is not None:
            from wrapguard.control import server as control

            path = self.plan.control
            try:
                ctl: Door = await control.start(service, path)
            except (WrapguardError, OSError):
                if self.plan.options.control is not None:
                    raise  # the user's own path: say why it cannot be used
                # The default path is taken (another run with the same config): one per run.
                root, ext = os.path.splitext(path)
                ctl = await control.start(service, f"{root}-{os.getpid()}{ext}")
            self.doors.append(ctl)
            self.log.info("control socket", path=ctl.address)
        for spec in self.plan.proxies:
            if spec.kind == "socks5":
                from wrapguard.doors import socks5 as module
            else:
                from wrapguard.doors import httpproxy as module  # type: ignore[no-redef]
            try:
                door: Door = await module.start(service, spec)
            except OSError as exc:
                raise WrapguardError(
                    f"cannot listen for the {spec.kind} proxy on {spec.address}: "
                    f"{exc.strerror or exc}"
                ) from None
            self.doors.append(door)
            self.log.info(f"{spec.kind} proxy listening", address=door.address, auth=spec.auth)

    async def _close_doors(self) -> None:
        for door in reversed(self.doors):
            with contextlib.suppress(Exception):
                await door.close()
        self.doors.clear()
        if self.plan.control is not None and self.plan.options.control is None:
            # The default directory (or a private fallback made for this run): leave nothing
            # behind once the last run using it is gone (rmdir fails while it is not empty).
            with contextlib.suppress(OSError):
                os.rmdir(os.path.dirname(self.plan.control))

    async def run(self) -> int:
        shim_path = shim.shim_path()
        raise_fd_limit()
        session = TunnelSession(self.config, self.routing, timers=self.timers)
        forwarded: list[signal.Signals] = []
        try:
            await session.start_tunnel()
            await session.start_channel()
            await self._start_doors(session.service)
            startup.resume()  # set up: the collector runs again (startup.py)
            if self.executable is None:
                status = await self._serve(session)
            else:
                status = await self._wrap(session, shim_path, forwarded)
        finally:
            await self._close_doors()
            session.close()
        self.link.report(status)  # everything is closed: the caller may go on
        return status

    async def _serve(self, session: TunnelSession) -> int:
        """The proxy daemon: until SIGINT/SIGTERM/SIGHUP; then the doors close and the flows
        drain (briefly: the user asked us to stop). Exit status 0."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in FORWARDED:
            loop.add_signal_handler(sig, stop.set)
        try:
            self.log.info("serving until SIGINT or SIGTERM", pid=os.getpid())
            await stop.wait()
            self.log.info("stopping")
            await self._close_doors()
            stop.clear()
            await session.drain(min(KILL_GRACE, DRAIN_STALL), abandon=stop)
        finally:
            for sig in FORWARDED:
                loop.remove_signal_handler(sig)
        return 0

    async def _start_seccomp(self, session: TunnelSession) -> SeccompListener | None:
        """The seccomp door, when this system can run it (docs/seccomp.md): for the program
        itself (--intercept seccomp, or a static/Go program), and for the static or Go
        programs a shimmed program execs later (csrc/exec.c hands them to its helper)."""
        from wrapguard.intercept import seccomp_unavailable

        why = seccomp_unavailable()
        if why is not None:
            self.log.debug("no seccomp door", reason=why)
            return None
        from wrapguard.doors import seccomp_listen

        assert session.channel.directory is not None
        try:
            door = await seccomp_listen.start(session.service, session.channel.directory)
        except OSError as exc:
            if self.plan.door == "seccomp":
                raise WrapguardError(f"cannot start the seccomp door: {exc}") from None
            self.log.warning(
                "no seccomp door: static and Go programs a wrapped program starts will be refused",
                error=str(exc),
            )
            return None
        self.doors.append(door)
        self.seccomp = door
        return door

    async def _wrap(
        self, session: TunnelSession, shim_path: str, forwarded: list[signal.Signals]
    ) -> int:
        assert self.executable is not None
        argv, executable = self.argv, self.executable
        # --intercept preload: the shim alone (static and Go programs refused, as before)
        door = (
            None if self.plan.options.intercept == "preload" else await self._start_seccomp(session)
        )
        if self.plan.door == "seccomp":
            assert door is not None  # launch.choose_door checked that it can run
            argv = door.helper_argv(executable, argv)
            executable = argv[0]
            env = dict(os.environ)
            ready = door.ready
            self.log.debug("starting program", program=self.argv[0], door="seccomp")
        else:
            front = session.preload.frontend
            front.address = session.channel.ctl_path or ""
            session.service.add_frontend(front)
            env = session.child_env()
            if door is not None:  # a static or Go program exec'ed later goes through it
                env.update(door.env())
            ready = session.preload.hello_event
            self.log.debug("starting program", program=self.argv[0], shim=shim_path)
        loop = asyncio.get_running_loop()
        program: list[int] = []

        def started(pgid: int) -> None:  # the program leads its own group: pgid == pid
            program.append(pgid)
            self.link.program_started(pgid)

        def reap() -> None:  # orphans come to us (subreaper): reap them as they exit
            if program:
                lifetime.reap_except(program[0])

        loop.add_signal_handler(signal.SIGCHLD, reap)
        try:
            status = await run_child(
                argv,
                executable,
                env,
                ready=ready,
                ready_timeout=HELLO_TIMEOUT,
                on_started=started,
                forwarded=forwarded,
            )
        finally:
            loop.remove_signal_handler(signal.SIGCHLD)
        self.link.program_gone()
        after = lifetime.Afterlife(self.log)
        after.install()
        try:
            if forwarded:  # the user asked the program to stop: so do what it left
                after.stop_children(signal.SIGTERM)
            if lifetime.reap():
                # The program left processes behind: they keep the tunnel; the caller gets
                # the program's status now.
                self.log.info(
                    "program exited; the tunnel stays up in the background for the "
                    "processes it started (SIGTERM to the launcher ends them)",
                    status=status,
                    pids=lifetime.children(),
                    launcher_pid=os.getpid(),
                )
                self.link.report(status)
                lifetime.release_stdio()
                await after.outlive()
                self.log.info("the last wrapped process exited: tunnel down")
                if after.stopping.is_set():
                    forwarded.append(signal.SIGTERM)
                after.stopping.clear()  # that signal was for them; a new one ends the drain
            # The doors (proxies) close with the program; then what was handed over drains.
            # Stopped by a signal: deliver, but do not wait long for a peer that does not
            # answer (the user asked us to end).
            await self._close_doors()
            stall = min(KILL_GRACE, DRAIN_STALL) if forwarded else DRAIN_STALL
            await session.drain(stall, abandon=after.stopping)
        finally:
            after.remove()
        return status


def run(plan: Plan, executable: str | None, link: StatusLink | None = None) -> int:
    """Run the program inside the tunnel (or, with none, the proxy daemon); returns the exit
    status."""
    tune_gc()
    return asyncio.run(Launcher(plan, executable, link=link).run())


GC_GEN0 = 10_000  # container allocations between young collections (the default is 700)


def tune_gc() -> None:
    """For the launcher process (run() calls it; the library code that tests import does
    not, so they keep the defaults; an in-process caller of run() is tuned too): what was
    built until now (modules, the config) is never garbage, so collections stop walking it
    (gc.freeze: a full collection of them took 6 ms in bench/connect_legs.py), and young
    collections run every GC_GEN0 net container allocations, not 700. With the defaults a
    run of sequential connects paid a young collection every ~17 connects, a middle one
    every ~200 and a full one every ~1,000 (bench/connect_legs.py: ~12 us of CPU a connect,
    the SYN-ACK leg 60 -> 51 us); tuned, a young one every ~370 and no full one. Cyclic
    garbage waits longer: at most GC_GEN0 containers' worth."""
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0, gen1, gen2)
