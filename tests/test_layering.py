"""Architecture rules that a test enforces: sans-IO cores import no I/O modules."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "wrapguard"
CORES = ["wire", "noise", "tunnel", "netstack"]
FORBIDDEN = {
    "socket",
    "asyncio",
    "threading",
    "time",
    "os",
    "random",
    "secrets",
    "subprocess",
    "selectors",
}


def core_files() -> list[Path]:
    files = [p for core in CORES for p in sorted((ROOT / core).rglob("*.py"))]
    files.append(ROOT / "routing.py")
    return [f for f in files if f.exists()]


def imported_roots(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def test_cores_exist() -> None:
    assert len(core_files()) >= 1


@pytest.mark.parametrize("path", core_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_core_module_does_no_io(path: Path) -> None:
    bad = imported_roots(path) & FORBIDDEN
    assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}; cores must stay sans-IO"


# The package order (architecture.md, "Where it grows"): a package may import only those
# listed for it among wrapguard's own packages; everything above the cores (runtime, doors,
# control, cli) may import the cores, never the other way round.
LEAVES = {"errors", "keys", "_fastpath"}  # no imports of ours (the cffi helper is compiled)
ALLOWED = {
    "wire": {"wire"} | LEAVES,
    "noise": {"wire", "noise"} | LEAVES,
    "tunnel": {"wire", "noise", "tunnel"} | LEAVES,
    "netstack": {"wire", "netstack"} | LEAVES,
}
UPPER = {
    "runtime", "config", "log", "cli", "launch", "doors", "control", "doctor", "selftest", "tun"
}  # fmt: skip


def wrapguard_imports(path: Path) -> set[str]:
    """wrapguard's own top-level modules/packages that `path` imports, relative imports
    resolved against its package."""
    tree = ast.parse(path.read_text(), filename=str(path))
    pkg = path.relative_to(ROOT).parts[:-1]
    out: set[str] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(pkg[: len(pkg) - node.level + 1])
                mod = ".".join(["wrapguard", *base, *([node.module] if node.module else [])])
                names = [mod] if node.module else [f"{mod}.{a.name}" for a in node.names]
            elif node.module:
                names = [node.module]
        for name in names:
            parts = name.split(".")
            if parts[0] == "wrapguard" and len(parts) > 1:
                out.add(parts[1])
    return out


@pytest.mark.parametrize(
    "path",
    [p for core in ALLOWED for p in sorted((ROOT / core).rglob("*.py"))],
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_package_order(path: Path) -> None:
    core = path.relative_to(ROOT).parts[0]
    used = wrapguard_imports(path)
    assert not used & UPPER, f"{path.relative_to(ROOT)} imports {sorted(used & UPPER)}"
    extra = used - ALLOWED[core]
    assert not extra, f"{path.relative_to(ROOT)} ({core}) may not import {sorted(extra)}"


def test_relative_imports_are_resolved() -> None:
    """The checker itself: a relative import counts (a test that cannot fail is a defect)."""
    sample = ROOT / "netstack" / "_layering_probe.py"
    try:
        sample.write_text("from ..runtime import engine\n")
        assert "runtime" in wrapguard_imports(sample)
    finally:
        sample.unlink()


# The doors stand on the flow API (runtime/service.py, issue 12): none imports the netstack, the
# tunnel or the engine, or touches the engine's insides (its stack, handler table, device, UDP
# road, flushes), directly or through a flow's or the service's private parts.
DOOR_DIRS = ["doors", "control"]
ENGINE_INSIDES = {"stack", "handlers", "schedule_flush", "engine", "device", "wg", "session"}
STDIO = {"sys.stdout", "sys.stderr"}  # their flush() is fine


def door_files() -> list[Path]:
    return [p for d in DOOR_DIRS for p in sorted((ROOT / d).rglob("*.py"))]


def reach_throughs(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            name = node.attr
            if name in ENGINE_INSIDES or (name.startswith("_") and name[1:] in ENGINE_INSIDES):
                found.append(f"line {node.lineno}: .{name}")
            elif name == "flush" and ast.unparse(node.value) not in STDIO:
                found.append(f"line {node.lineno}: .flush")
        elif isinstance(node, ast.ImportFrom) and node.module == "wrapguard.runtime":
            if any(a.name == "engine" for a in node.names):
                found.append(f"line {node.lineno}: imports wrapguard.runtime.engine")
        elif isinstance(node, ast.Call) and ast.unparse(node.func) == "getattr":
            what = node.args[1] if len(node.args) > 1 else None
            if isinstance(what, ast.Constant) and str(what.value).lstrip("_") in ENGINE_INSIDES:
                found.append(f"line {node.lineno}: getattr(..., {what.value!r})")
    for name in sorted(wrapguard_imports(path) & {"netstack", "tunnel"}):
        found.append(f"imports wrapguard.{name}")
    if "wrapguard.runtime.engine" in path.read_text():
        found.append("imports wrapguard.runtime.engine")
    return found


@pytest.mark.parametrize("path", door_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_doors_use_only_the_flow_api(path: Path) -> None:
    bad = reach_throughs(path)
    assert not bad, f"{path.relative_to(ROOT)} reaches into the engine: {bad}"


def test_a_reach_through_is_found() -> None:
    sample = ROOT / "doors" / "_reach_probe.py"
    probe = (
        "from wrapguard.runtime import engine as eng\n"
        "import sys\n"
        "def f(service, flow, s):\n"
        "    s.engine.stack.send(1)\n"  # .engine, .stack
        "    s.schedule_flush()\n"
        "    service.session.wg.send_packet(b'')\n"  # .session, .wg
        "    flow._engine.flush()\n"  # ._engine, .flush
        "    getattr(service, 'eng' 'ine')\n"
        "    sys.stdout.flush()\n"  # allowed
        "    return eng.Engine\n"
    )
    try:
        sample.write_text(probe)
        assert len(reach_throughs(sample)) == 9, reach_throughs(sample)
    finally:
        sample.unlink()
