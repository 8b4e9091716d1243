"""The launcher process's own settings (runtime/launcher.py)."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_only_the_launcher_tunes_the_garbage_collector() -> None:
    """Importing the launcher (as tests and the library do) keeps the defaults; run() freezes
    what start-up built and collects young objects less often."""
    code = textwrap.dedent(
        """
        import gc
        from wrapguard.runtime import launcher
        assert gc.get_threshold()[0] == 700 and gc.get_freeze_count() == 0
        launcher.tune_gc()
        assert gc.get_threshold()[0] == launcher.GC_GEN0 > 700
        assert gc.get_freeze_count() > 1000
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
