"""The result table: one row per metric, direct vs gateway, with its target and a verdict."""

from __future__ import annotations

import math
import os
import platform
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


def render(rows: Sequence[Row], notes: Sequence[str], *, load_average: float | None = None) -> str:
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
