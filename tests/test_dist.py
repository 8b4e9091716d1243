"""`make dist`: the wheel carries the compiled shim and cffi helper, and installs and runs in a
fresh venv without a compiler (issue 12, "For the people who install it")."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


SKIP_DIRS = {".git", ".venv", "build", "dist", "__pycache__", ".pytest_cache", ".mypy_cache"}


def _checkout_files() -> list[str]:
    """The checkout's files: git's tracked and new ones, or (no git) the tree without what
    builds and runs leave behind."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, timeout=60,
    )  # fmt: skip
    if listed.returncode == 0:
        return [n for n in listed.stdout.decode().split("\0") if n]
    out = []
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and not d.endswith(".egg-info")]
        out += [str((Path(dirpath) / f).relative_to(ROOT)) for f in filenames]
    return out


@pytest.mark.timeout(600)
def test_wheel_installs_and_runs_without_a_compiler(tmp_path: Path) -> None:
    out = tmp_path / "dist"
    # From a copy of the checkout's files (tracked and new, not ignored): an in-tree build
    # reuses build/lib, where setuptools keeps modules that were deleted from the source.
    tree = tmp_path / "src"
    for name in _checkout_files():
        if (ROOT / name).is_file():
            (tree / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, tree / name)
    r = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--wheel", "--outdir", str(out), "."],
        cwd=tree, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    (wheel,) = out.glob("wrapguard-*.whl")
    assert "linux" in wheel.name, wheel.name  # a platform wheel, not py3-none-any
    names = zipfile.ZipFile(wheel).namelist()
    assert "wrapguard/_shim.so" in names and any("_fastpath" in n for n in names), names
    # Exactly the package's modules: none left out, none that no longer exists, no demo/tests.
    source = {str(p.relative_to(tree)) for p in (tree / "wrapguard").rglob("*.py")}
    packaged = {n for n in names if n.endswith(".py")}
    assert sorted(source - packaged - {"wrapguard/_fastpath_build.py"}) == []
    assert sorted(packaged - source) == []

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    env = {**os.environ, "CC": "false", "CXX": "false", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env.pop("PYTHONPATH", None)
    r = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", "--only-binary", ":all:", str(wheel)],
        capture_output=True, text=True, timeout=400, env=env,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    # Run it from elsewhere, so nothing comes from the checkout.
    r = subprocess.run(
        [str(venv / "bin" / "wrapguard"), "--version"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert r.returncode == 0 and r.stdout.startswith("wrapguard version "), r
    probe = (
        "import wrapguard, wrapguard.shim as s, os; "
        "p = s.shim_path(); print(p.startswith(os.path.dirname(wrapguard.__file__)), "
        "os.path.exists(p))"
    )
    r = subprocess.run(
        [str(venv / "bin" / "python"), "-c", probe],
        capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert r.stdout.split() == ["True", "True"], r


def test_shell_completion_is_offered() -> None:
    env = {**os.environ, "_WRAPGUARD_COMPLETE": "bash_source"}
    r = subprocess.run(
        [sys.executable, "-m", "wrapguard"], capture_output=True, text=True, timeout=60, env=env
    )
    # click's completion script for bash names the completion function and the variable.
    assert "complete" in r.stdout and "_WRAPGUARD_COMPLETE" in r.stdout, (r.stdout, r.stderr)
