"""The journal's wake-up primitives: Latch (set once) and Pulse (wake current waiters)."""

from __future__ import annotations

import asyncio

import pytest

from service.latch import Latch, Pulse


async def test_latch_wakes_waiters_and_stays_set() -> None:
    """Waiters before ``set`` wake; a wait after it returns at once."""
    latch = Latch()
    waiting = [asyncio.ensure_future(latch.wait()) for _ in range(3)]
    await asyncio.sleep(0)
    assert not any(w.done() for w in waiting)
    latch.set()
    await asyncio.gather(*waiting)
    assert latch.is_set()
    await asyncio.wait_for(latch.wait(), timeout=1)  # already set: no parking


async def test_a_cancelled_waiter_leaves_no_future_behind() -> None:
    """Cancelling a wait removes its future, so a later set wakes only live waiters."""
    latch = Latch()
    gone = asyncio.ensure_future(latch.wait())
    stays = asyncio.ensure_future(latch.wait())
    await asyncio.sleep(0)
    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert latch._waiters is not None
    assert len(latch._waiters) == 1
    latch.set()
    await stays


async def test_pulse_wakes_only_the_tasks_waiting_when_it_fires() -> None:
    """A pulse is not remembered: a wait that starts after it waits for the next one."""
    pulse = Pulse()
    first = asyncio.ensure_future(pulse.wait())
    await asyncio.sleep(0)
    pulse.fire()
    await first
    later = asyncio.ensure_future(pulse.wait())
    await asyncio.sleep(0)
    assert not later.done()
    pulse.fire()
    await later


async def test_a_wait_until_a_time_answers_whether_the_latch_was_set() -> None:
    """Set before the time: True at once. The time passes first: False, and the latch
    keeps no future of it. A cancelled one leaves none either."""
    loop = asyncio.get_running_loop()
    latch = Latch()
    assert await latch.wait_until(loop.time() - 1, loop) is False  # already past: one loop turn
    assert latch._waiters == []
    cancelled = asyncio.ensure_future(latch.wait_until(loop.time() + 3600, loop))
    setter = asyncio.ensure_future(latch.wait_until(loop.time() + 3600, loop))
    await asyncio.sleep(0)
    cancelled.cancel()
    await asyncio.gather(cancelled, return_exceptions=True)
    assert latch._waiters is not None
    assert len(latch._waiters) == 1  # the setter's only
    latch.set()
    assert await setter is True
    assert await latch.wait_until(loop.time() - 1, loop) is True
