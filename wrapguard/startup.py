"""Start-up without the cyclic garbage collector (bench row 5, issue 14).

A start imports ~300 modules and builds ~100 dataclasses: some 150,000 objects that live as
long as the process. With the collector on, the allocation count triggers ~50 young and ~5
middle-generation collections that walk them again and again and find nothing to free
(~10 ms of a ~130 ms start). `pause()` at the entry point (cli.main) turns it off; `resume()`,
once the process has what it keeps (the launcher: set up, its program about to start; the
waiter: forked), moves everything allocated so far out of the collector's sight (gc.freeze:
it is not garbage, and walking it later would cost the same again) and turns the collector
back on. Both are no-ops when the process did
not start through `pause()` (a test calling library code in-process keeps its collector).
"""

from __future__ import annotations

import gc

_paused = False


def pause() -> None:
    """Turn the collector off for the start-up (the entry point's first call)."""
    global _paused
    if gc.isenabled():
        gc.disable()
        _paused = True


def resume(*, freeze: bool = True) -> None:
    """The start-up is over: collect as usual from now on. With `freeze`, what exists now is
    kept out of every later collection (gc.freeze); without, it stays collectable (an
    in-process caller of `cli.main` gets its collector back as it was)."""
    global _paused
    if not _paused:
        return
    _paused = False
    if freeze:
        gc.freeze()
    gc.enable()
