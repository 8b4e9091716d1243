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
