"""The result table: one row per metric, direct vs gateway, with its target and a verdict."""

from __future__ import annotations

import math
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass

import aiohttp

NO_TARGET = "—"


@dataclass(frozen=True, slots=True)
class Row:
    metric: str
    direct: str
    gateway: str
    target: str = NO_TARGET
    passed: bool | None = None  # None: informational, no verdict

    @property
    def verdict(self) -> str:
        return NO_TARGET if self.passed is None else ("pass" if self.passed else "FAIL")


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile (``fraction`` in 0..1); 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(fraction * len(ordered))))
    return ordered[rank - 1]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f}"


def calibration_ms(rounds: int = 5) -> float:
    """The best of ``rounds`` timings of a fixed pure-Python workload (dicts, strings, calls):
    how fast this machine runs Python right now. The CPU figures of two runs compare only
    as far as their calibrations agree (on a shared VM they have differed by 30%)."""

    def work() -> int:
        total = 0
        for i in range(20_000):
            d = {"id": i, "text": f"word{i}", "n": [i, i + 1]}
            total += len(d["text"]) + d["n"][1]
        return total

    best = math.inf
    for _ in range(rounds):
        started = time.process_time()
        work()
        best = min(best, time.process_time() - started)
    return best * 1000


def render(
    rows: Sequence[Row],
    notes: Sequence[str],
    *,
    load_average: float | None = None,
    calibration: float | None = None,
) -> str:
    """The report as markdown: a context line, the table, then notes."""
    context = (
        f"{os.cpu_count()} CPUs shared by the load client, the gateway and the provider; "
        f"Python {platform.python_version()}, aiohttp {aiohttp.__version__}."
    )
    if load_average is not None:
        context += (
            f" 1-minute load average before the run: {load_average:.2f} "
            "(anything else running on the machine skews every number)."
        )
    if calibration is not None:
        context += (
            f" Calibration (a fixed pure-Python loop, best of 5): {calibration:.1f} ms; "
            "compare runs only at similar calibrations."
        )
    lines = [
        context,
        "",
        "| metric | direct | gateway | target | pass/fail |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {r.metric} | {r.direct} | {r.gateway} | {r.target} | {r.verdict} |" for r in rows]
    if notes:
        lines.append("")
        lines += [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"
