"""One asyncio timer that follows a sans-IO core's `next_deadline()`.

Every core reports its next deadline; the runtime keeps one `call_at` handle per core and
re-arms it after each input. `exact` re-arms whenever the deadline moves; `lazy` (for data
paths whose deadlines move later on every packet) keeps an armed timer that is not later than
the deadline and re-arms only to fire sooner: an early firing finds nothing due and re-arms.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class DeadlineTimer:
    __slots__ = ("_at", "_callback", "_handle", "_lazy", "_loop")

    def __init__(
        self, loop: asyncio.AbstractEventLoop, callback: Callable[[], None], *, lazy: bool = False
    ) -> None:
        self._loop = loop
        self._callback = callback
        self._lazy = lazy
        self._handle: asyncio.TimerHandle | None = None
        self._at: float | None = None

    def arm(self, deadline: float | None) -> None:
        """Fire `callback` at `deadline` (None: no deadline)."""
        at = self._at
        if self._lazy:
            if deadline is None or (at is not None and at <= deadline):
                return
        elif deadline == at:
            return
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._at = deadline
        if deadline is not None:
            self._handle = self._loop.call_at(deadline, self._fire)

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._handle = None
        self._at = None

    def _fire(self) -> None:
        self._handle = None
        self._at = None
        self._callback()
