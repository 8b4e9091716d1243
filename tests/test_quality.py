"""ruff on the whole tree and mypy --strict on the protocol cores keep main clean."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORES = [
    "wrapguard/wire",
    "wrapguard/noise",
    "wrapguard/tunnel",
    "wrapguard/netstack",
    "wrapguard/routing.py",
]


def tool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def test_ruff_clean() -> None:
    targets = [d for d in ("wrapguard", "tests", "bench", "setup.py") if (ROOT / d).exists()]
    r = tool("ruff", "check", *targets)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.timeout(600)
def test_mypy_strict_on_cores() -> None:
    targets = [c for c in CORES if (ROOT / c).exists()]
    r = tool("mypy", "--strict", *targets)
    assert r.returncode == 0, r.stdout + r.stderr
