"""DeadlineTimer: one call_at handle following a core's next deadline."""

from __future__ import annotations

import asyncio

from wrapguard.runtime.timer import DeadlineTimer


def test_exact_timer_follows_the_deadline_both_ways() -> None:
    async def main() -> list[float]:
        loop = asyncio.get_running_loop()
        fired: list[float] = []
        t = DeadlineTimer(loop, lambda: fired.append(loop.time()))
        start = loop.time()
        t.arm(start + 0.05)
        t.arm(start + 0.2)  # later: exact mode moves it
        await asyncio.sleep(0.1)
        assert fired == []
        t.arm(None)  # no deadline: cancelled
        await asyncio.sleep(0.15)
        assert fired == []
        t.arm(loop.time() + 0.01)
        await asyncio.sleep(0.05)
        return fired

    assert len(asyncio.run(main())) == 1


def test_lazy_timer_only_moves_earlier() -> None:
    async def main() -> list[float]:
        loop = asyncio.get_running_loop()
        fired: list[float] = []
        t = DeadlineTimer(loop, lambda: fired.append(loop.time()), lazy=True)
        start = loop.time()
        t.arm(start + 0.03)
        t.arm(start + 1.0)  # later: lazy mode keeps the earlier one (an early firing is fine)
        t.arm(None)  # no deadline: lazy mode keeps it too
        await asyncio.sleep(0.08)
        assert len(fired) == 1 and fired[0] < start + 0.5
        t.arm(loop.time() + 0.5)
        t.arm(loop.time() + 0.01)  # earlier: re-armed
        await asyncio.sleep(0.05)
        t.cancel()
        return fired

    assert len(asyncio.run(main())) == 2
