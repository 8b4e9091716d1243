"""The netstack core and its codecs do no I/O: no forbidden imports (architecture.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import wrapguard

FORBIDDEN = {"socket", "asyncio", "threading", "time", "os", "random", "secrets"}
ROOT = Path(wrapguard.__file__).parent
MODULES = sorted((ROOT / "netstack").glob("*.py")) + [
    ROOT / "wire" / name for name in ("ip.py", "tcp.py", "udp.py", "icmp.py", "checksum.py")
]


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_no_io_imports(path):
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module.split(".")[0])
    assert not found & FORBIDDEN, f"{path.name} imports {found & FORBIDDEN}"
