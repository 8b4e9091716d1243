"""Shared fixtures. The real-peer rig lives in tests/rig/ (importable here as `rig.*`).

Fixtures:
- `rig` (function scope): a ready `rig.harness.Rig` - client namespace (no default route, its own
  logging resolver on 127.0.0.1:53), peer namespace with wireguard-go (10.150.0.1/24, fd15::1/64,
  MTU 1420, a peer entry for our key at 10.150.0.2/32 + fd15::2/128) and servers behind it:
  HTTP :8080 (`rig.files` = {name: (size, sha256)}, PUT/POST /upload), TCP echo :9000 (first
  line "ip port"), UDP echo :9001, DNS :53 (`rig.dns_log()`). Options via indirect
  parametrization: `@pytest.mark.parametrize("rig", [{"psk": True}], indirect=True)` with the
  keyword arguments of `make_rig`. Read: rig.client (Netns), rig.peer (.ns, .wg, .public_key,
  .endpoint), rig.peer_public_key, rig.peer_endpoint / peer_endpoint_v6, rig.our_key, rig.psk,
  rig.our_tunnel_v4/v6, rig.peer_tunnel_v4/v6, rig.*_port, rig.url(name); do:
  rig.write_client_config(path, endpoint_v6=False, psk=None, extra_lines=(), endpoint=, dns=),
  rig.start_relay(loss=, dup=, reorder=, seed=), rig.start_kernel_client(endpoint=),
  rig.peer_status(), rig.reset_peer(), rig.dns_log(), rig.client_dns_log() (leaks).
- `make_rig(psk=False, second_peer=False, peer_endpoint_for_us=None, keepalive=None,
  file_sizes=(KiB, MiB), dns_names=None, client_resolver=True, servers=True) -> Rig`: a factory;
  every rig it made is torn down after the test, and teardown fails the test if anything
  (namespace, link, wireguard-go, socket) is left behind.
- `rig_files` (session scope): the FileStore that creates random files once per session.
- `module_rig` (module scope): one rig for all tests of a module, options from the module's
  `RIG_OPTIONS` dict.
- `sshd` (module scope): a real OpenSSH server on the module rig's peer (rig/sshd.py).
- `make_netns(role="x") -> rig.netns.Netns`: bare namespaces (lo up, no links, no routes) with
  `run/popen/python/socket/call/iproute`, deleted (processes killed) after the test.

Markers: tests using `rig`/`make_rig` are marked `root` and `interop` automatically. `root` tests
skip only when not running as root; as root, a missing wireguard-go/wg/ip/curl FAILS (run
`make test`, which installs them). A session-start sweep removes rig namespaces of dead runs.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.append(str(Path(__file__).resolve().parent))
sys.path.append(str(Path(__file__).resolve().parent.parent))  # demo/ (the demo peer)

from rig.harness import FileStore, Rig, build_rig, leftovers
from rig.netns import Netns, sweep_stale

RIG_TOOLS = ("wireguard-go", "wg", "ip", "curl")
NOT_ROOT = "needs root (network namespaces, wireguard-go); CI runs as root and never skips this"


def is_root() -> bool:
    return os.geteuid() == 0


def pytest_sessionstart(session: pytest.Session) -> None:
    if is_root() and shutil.which("ip"):
        removed = sweep_stale()
        if removed:
            print(f"rig: removed {len(removed)} stale namespaces: {', '.join(removed)}")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if "make_netns" in fixtures:
            item.add_marker(pytest.mark.root)
        if {"rig", "make_rig", "module_rig"} & fixtures:
            item.add_marker(pytest.mark.root)
            item.add_marker(pytest.mark.interop)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("root") is not None and not is_root():
        pytest.skip(NOT_ROOT)
    if item.get_closest_marker("interop") is not None:
        require_rig_tools()


def require_rig_tools() -> None:
    """Skip when not root; as root, fail (never skip) if a tool the rig needs is missing."""
    if not is_root():
        pytest.skip(NOT_ROOT)
    missing = [t for t in RIG_TOOLS if shutil.which(t) is None]
    if missing:
        pytest.fail(
            f"{', '.join(missing)} not installed: run `make test`, which installs "
            "wireguard-go, wireguard-tools, iproute2 and curl (apt-get) when run as root",
            pytrace=False,
        )


@pytest.fixture(scope="session")
def rig_files(tmp_path_factory: pytest.TempPathFactory) -> FileStore:
    return FileStore(tmp_path_factory.mktemp("rig-files"))


@pytest.fixture
def make_rig(
    rig_files: FileStore, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., Rig]]:
    require_rig_tools()
    made: list[Rig] = []

    def factory(**kwargs: Any) -> Rig:
        r = build_rig(tmp_path_factory.mktemp("rig"), rig_files, **kwargs)
        made.append(r)
        return r

    yield factory
    problems: list[str] = []
    for r in reversed(made):
        problems += r.close()
        problems += [f"left behind: {x}" for x in leftovers(r.id)]
    if problems:
        pytest.fail("rig teardown:\n  " + "\n  ".join(problems), pytrace=False)


@pytest.fixture(scope="module")
def module_rig(
    request: pytest.FixtureRequest, rig_files: FileStore, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Rig]:
    """One rig shared by the tests of a module (saves the set-up time); its options come from
    the module's `RIG_OPTIONS` dict (make_rig's keyword arguments)."""
    require_rig_tools()
    options: dict[str, Any] = getattr(request.module, "RIG_OPTIONS", {})
    r = build_rig(tmp_path_factory.mktemp("rig"), rig_files, **options)
    yield r
    problems = r.close() + [f"left behind: {x}" for x in leftovers(r.id)]
    if problems:
        pytest.fail("rig teardown:\n  " + "\n  ".join(problems), pytrace=False)


@pytest.fixture(scope="module")
def sshd(module_rig: Rig, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A real OpenSSH server on the module rig's peer tunnel address, port rig.sshd.SSH_PORT;
    yields the client's private key (root login by key)."""
    from rig.sshd import SSH_PORT, start_sshd

    proc, key = start_sshd(
        module_rig.peer.ns, module_rig.peer_tunnel_v4, SSH_PORT, tmp_path_factory.mktemp("sshd")
    )
    yield key
    proc.terminate()
    proc.wait(5)


@pytest.fixture
def make_netns() -> Iterator[Callable[[str], Netns]]:
    """A factory of bare namespaces (lo up, nothing else; `Netns` API), removed after the test."""
    if not is_root():
        pytest.skip(NOT_ROOT)
    made: list[Netns] = []

    def factory(role: str = "x") -> Netns:
        made.append(Netns(role))
        return made[-1]

    yield factory
    problems = [p for ns in reversed(made) for p in ns.close()]
    if problems:
        pytest.fail("netns teardown:\n  " + "\n  ".join(problems), pytrace=False)


@pytest.fixture
def rig(request: pytest.FixtureRequest, make_rig: Callable[..., Rig]) -> Rig:
    params: dict[str, Any] = getattr(request, "param", None) or {}
    return make_rig(**params)
