"""Telemetry's batch of after-the-fact work: queued, then run together, in order."""

from __future__ import annotations

import logging

import pytest

from service.telemetry.batch import BATCH_S, Later
from tests.streamwire import LoopClock


async def test_jobs_run_together_once_the_period_has_passed(loop_clock: LoopClock) -> None:
    """Nothing runs until the batch period is over; then every job runs, in order."""
    ran: list[int] = []
    later = Later()
    for n in range(3):
        later.add(lambda n=n: ran.append(n))  # type: ignore[misc]
    await loop_clock.advance(BATCH_S / 2)
    assert ran == []
    await loop_clock.advance(BATCH_S / 2)
    assert ran == [0, 1, 2]
    assert later.pending == 0


async def test_run_empties_the_batch_at_once_and_cancels_its_timer(loop_clock: LoopClock) -> None:
    """``run`` (what /metrics and shutdown call) runs everything now; the timer then has
    nothing left to do, and a new job starts a new period."""
    ran: list[str] = []
    later = Later()
    later.add(lambda: ran.append("a"))
    later.run()
    assert ran == ["a"]
    await loop_clock.advance(BATCH_S)
    assert ran == ["a"]
    later.add(lambda: ran.append("b"))
    await loop_clock.advance(BATCH_S)
    assert ran == ["a", "b"]


def test_off_the_loop_a_job_runs_at_once() -> None:
    """With no running loop there is no timer to wait for: the job runs immediately."""
    ran: list[str] = []
    Later().add(lambda: ran.append("now"))
    assert ran == ["now"]


def test_a_failing_job_costs_only_itself(caplog: pytest.LogCaptureFixture) -> None:
    """A job that raises is logged; the jobs after it in the batch still run."""
    ran: list[str] = []
    later = Later()
    later._jobs += [lambda: ran.append("a"), lambda: 1 / 0, lambda: ran.append("c")]
    with caplog.at_level(logging.ERROR, logger="service.telemetry.batch"):
        later.run()
    assert ran == ["a", "c"]
    assert "telemetry job" in caplog.text
