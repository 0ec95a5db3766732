"""The benchmark's machinery works end to end at tiny scale: real provider and gateway
processes, every phase, a rendered table, and processes torn down afterwards. Nothing here
asserts a timing or a target; the numbers of a tiny run mean nothing.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from bench.__main__ import run_bench
from bench.phases import QUICK
from bench.procs import Stack, cpu_seconds, rss_kb
from bench.report import Row, percentile, render

TINY = replace(
    QUICK,
    concurrency=2,
    non_stream_requests=6,
    stream_requests=4,
    stream_chunks=3,
    ttft_requests=2,
    held_streams=4,
    hold_batch=2,
    aborts=2,
    abort_wait_s=0.2,
    warmup_requests=2,
    paced_requests=2,
)


async def test_tiny_run_renders_every_phase(tmp_path: Path) -> None:
    """Every phase runs against real processes without a failed request, and the table has
    one row per metric with a verdict wherever there is a target."""
    rows = await run_bench(TINY, tmp_path)
    metrics = " ".join(row.metric for row in rows)
    for phase in (
        "non-stream: throughput",
        "3-chunk stream: **gateway CPU per request",
        "paced",
        "added time to first chunk",
        "RSS per held stream",
        "abort: provider aborted / open / completed",
        "chunks sent per aborted stream",
        "non-stream, limits + budgets + ledger + breaker: **gateway CPU per request",
        "non-stream: bare aiohttp relay CPU per request",
        "3-chunk stream: bare aiohttp relay CPU per request",
        "non-stream, tracing every trace: **gateway CPU per request",
        "3-chunk stream, tracing 1 in 10 traces: **gateway CPU per request",
    ):
        assert phase in metrics
    exports = [row for row in rows if "OTLP exports received" in row.metric]
    assert len(exports) == 2
    assert exports[0].passed, exports[0].gateway  # every trace sampled: spans were sent
    no_errors = [row for row in rows if row.target == "0 errors"]  # throughput and bare relay
    assert len(no_errors) == 5
    assert all(row.passed for row in no_errors), [row.metric for row in no_errors]
    assert all(row.passed is not None for row in rows if row.target != "—")
    table = render(rows, ["a note"], load_average=0.5)
    assert table.count("\n| ") == len(rows) + 1  # header + one line per row
    assert "- a note" in table
    assert _names(tmp_path) >= {"throughput-gateway.log", "throughput-bare.log", "abort-sim.log"}


async def test_stack_tears_down_both_processes_on_error(tmp_path: Path) -> None:
    """A phase that fails still leaves no provider or gateway process behind."""
    pids: list[int] = []

    async def failing_phase() -> None:
        async with Stack(tmp_path, "failing") as stack:
            pids.extend((stack.sim_pid, stack.gateway_pid))
            assert cpu_seconds(stack.gateway_pid) >= 0
            assert rss_kb(stack.gateway_pid) > 0
            raise RuntimeError("phase failed")

    with pytest.raises(RuntimeError, match="phase failed"):
        await failing_phase()
    assert len(pids) == 2
    assert not any(_alive(pid) for pid in pids)


def _names(directory: Path) -> set[str]:
    return {path.name for path in directory.iterdir()}


def _alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def test_percentile_is_nearest_rank() -> None:
    """p50 and p99 pick an observed value by nearest rank; no values give 0."""
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.5) == 50.0
    assert percentile(values, 0.99) == 99.0
    assert percentile([3.0], 0.99) == 3.0
    assert percentile([], 0.5) == 0.0


def test_row_verdicts() -> None:
    """A row without a target has no verdict; one with a target passes or FAILs."""
    assert Row("m", "1", "2").verdict == "—"
    assert Row("m", "1", "2", "≤ 1", True).verdict == "pass"
    assert Row("m", "1", "2", "≤ 1", False).verdict == "FAIL"
