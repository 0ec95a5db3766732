"""Gateway-only variants of the throughput workloads: the same gateway with one thing
turned on (protection: rate limits and budgets; tracing: see ``tracing.py``), measured for
CPU per request against the core targets. The direct numbers are the main table's.
"""

from __future__ import annotations

from pathlib import Path

from .load import chat_body, new_session
from .phases import (
    CHAT_PATH,
    CPU_NON_STREAM_MS,
    CPU_STREAM_MS,
    BenchConfig,
    _run,
    cpu_rounds,
    cpu_row,
)
from .procs import Stack
from .report import Row

# Protection on, as deployed (issue 4): requests and tokens per minute for the user, the
# tenant and globally, and USD budgets per user per day and per tenant per month, all far
# above what the bench uses, so every request reserves and settles in each of them (the
# SQLite ledger and the breaker are on by default).
PROTECTION_ENV = {
    "SLUICE_RPM_PER_USER": "100000000",
    "SLUICE_TPM_PER_USER": "10000000000",
    "SLUICE_RPM_PER_TENANT": "100000000",
    "SLUICE_TPM_PER_TENANT": "10000000000",
    "SLUICE_RPM_GLOBAL": "100000000",
    "SLUICE_TPM_GLOBAL": "10000000000",
    "SLUICE_BUDGET_USER_DAILY_USD": "1000000",
    "SLUICE_BUDGET_TENANT_MONTHLY_USD": "1000000",
}


async def protection_phase(
    log_dir: Path, config: BenchConfig, gateway_env: dict[str, str]
) -> list[Row]:
    """Gateway CPU per request with every limit and budget on."""
    env = {**gateway_env, **PROTECTION_ENV}
    async with Stack(log_dir, "protection", gateway_env=env) as stack:
        return await cpu_rows(stack, config, "limits + budgets + ledger + breaker")


async def cpu_rows(stack: Stack, config: BenchConfig, label: str) -> list[Row]:
    """Gateway CPU per request of the non-stream and stream workloads, against the targets."""
    url = stack.gateway_url + CHAT_PATH
    chunks = config.stream_chunks
    workloads = (
        ("non-stream", chat_body(f"chunks={chunks}", stream=False), False, CPU_NON_STREAM_MS),
        (f"{chunks}-chunk stream", chat_body(f"chunks={chunks}", stream=True), True, CPU_STREAM_MS),
    )
    rows = []
    async with new_session() as session:
        for _, body, streaming, _ in workloads:
            await _run(session, url, body, config.warmup_requests, config, streaming)
        for name, body, streaming, target in workloads:
            total = config.non_stream_requests if not streaming else config.stream_requests
            targets = [(url, stack.gateway_pid)]
            [cpu] = await cpu_rounds(session, targets, body, total, config, streaming)
            rows.append(cpu_row(f"{name}, {label}: **gateway CPU per request, ms**", cpu, target))
    return rows
