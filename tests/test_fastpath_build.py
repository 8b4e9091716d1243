"""The cffi helper builds without libcrypto's headers too (sealing then stays in Python)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

BUILD = Path(__file__).resolve().parent.parent / "wrapguard" / "_fastpath_build.py"


def _build(tmp_path: Path, **env: str) -> str:
    """Compile the helper into tmp_path and report which functions it has."""
    code = textwrap.dedent(
        f"""
        import importlib.util, sys
        sys.path.insert(0, {str(tmp_path)!r})
        spec = importlib.util.spec_from_file_location("fb", {str(BUILD)!r})
        fb = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(fb)
        fb.ffibuilder.compile(tmpdir={str(tmp_path)!r})
        from wrapguard import _fastpath
        print(fb.HAVE_LIBCRYPTO, hasattr(_fastpath.lib, "wg_seal_batch"),
              hasattr(_fastpath.lib, "wg_sendmmsg"))
        """
    )
    (tmp_path / "wrapguard").mkdir(exist_ok=True)
    (tmp_path / "wrapguard" / "__init__.py").write_text("")
    r = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env},
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_without_libcrypto_the_helper_builds_without_the_seal(tmp_path: Path) -> None:
    assert _build(tmp_path, WRAPGUARD_NO_LIBCRYPTO="1") == "False False True"


def test_with_libcrypto_the_helper_has_the_seal(tmp_path: Path) -> None:
    # install-system-deps.sh installs libssl-dev, so the machines that run the tests have it
    assert _build(tmp_path) == "True True True"
