"""The phases that hold streams open (5: memory per held stream) or drop them (6: aborts with
grace 0, issue 3), each run straight at the provider ("direct") and through the gateway.
"""

from __future__ import annotations

import asyncio
import statistics
from typing import Any

import aiohttp
import orjson

from .load import abort_many, chat_body, hold_streams, new_session, release
from .phases import CHAT_PATH, BenchConfig
from .procs import Stack, rss_kb
from .report import Row

RSS_PER_STREAM_KB = 40.0
ABORT_CHUNKS = 1000  # long enough that nothing completes on its own within the wait
ABORT_DELAY_MS = 20.0  # between provider chunks: at most one is in flight when the abort lands


async def memory_phase(stack: Stack, config: BenchConfig) -> list[Row]:
    """Phase 5: resident memory per stream held open (stalled after its first chunks).

    The growth from ``held_streams / 2`` streams held to that many more: the cost of one
    more stream. (Measured from none held, the first streams reuse memory that earlier
    ones left free in the process, and the figure reads ~10% low.)"""
    body = chat_body("chunks=50 stall_after=1", stream=True)
    direct, gateway = stack.sim_url + CHAT_PATH, stack.gateway_url + CHAT_PATH
    async with new_session(timeout_s=None) as session:
        direct_kb = await _held_kb(session, direct, body, stack.sim_pid, config)
        gateway_kb = await _held_kb(session, gateway, body, stack.gateway_pid, config)
    return [
        Row(
            f"**RSS per held stream, KB** (growth from {config.held_streams // 2} to "
            f"{config.held_streams * 3 // 2} open; direct = the provider's)",
            f"{direct_kb:.1f}",
            f"{gateway_kb:.1f}",
            f"≤ {RSS_PER_STREAM_KB:.0f}",
            gateway_kb <= RSS_PER_STREAM_KB,
        )
    ]


async def _held_kb(
    session: aiohttp.ClientSession, url: str, body: bytes, pid: int, config: BenchConfig
) -> float:
    batch = config.hold_batch
    base = await hold_streams(session, url, body, count=config.held_streams // 2, batch=batch)
    try:
        before = rss_kb(pid)
        held = await hold_streams(session, url, body, count=config.held_streams, batch=batch)
        try:
            after = rss_kb(pid)
        finally:
            release(held)
    finally:
        release(base)
    return (after - before) / config.held_streams


async def abort_phase(stack: Stack, config: BenchConfig) -> list[Row]:
    """Phase 6 (issue 3): streams the client drops after a few events, with grace 0."""
    body = chat_body(f"chunks={ABORT_CHUNKS} delay_ms={ABORT_DELAY_MS:g}", stream=True)
    results: list[tuple[int, int, int, list[int]]] = []
    async with new_session() as session:
        for url in (stack.sim_url + CHAT_PATH, stack.gateway_url + CHAT_PATH):
            before = await _sim_stats(session, stack)
            await abort_many(session, url, body, count=config.aborts, events=config.abort_events)
            await asyncio.sleep(config.abort_wait_s)  # the fixed observation point
            after = await _sim_stats(session, stack)
            results.append(
                (
                    after["aborted"] - before["aborted"],
                    after["open"] - before["open"],
                    after["completed"] - before["completed"],
                    after["chunks_sent"][len(before["chunks_sent"]) :],
                )
            )
    return _abort_rows(results[0], results[1], config)


def _abort_rows(
    direct: tuple[int, int, int, list[int]],
    gateway: tuple[int, int, int, list[int]],
    config: BenchConfig,
) -> list[Row]:
    def counts(r: tuple[int, int, int, list[int]]) -> str:
        return f"{r[0]} / {r[1]} / {r[2]}"

    def chunks(sent: list[int]) -> str:
        return f"{max(sent)} / {statistics.fmean(sent):.2f}" if sent else "none"

    expected = (config.aborts, 0, 0)
    allowed = config.abort_events + 1  # at ABORT_DELAY_MS per chunk, one can be in flight
    return [
        Row(
            f"**abort: provider aborted / open / completed** {config.abort_wait_s:g} s after "
            f"{config.aborts} clients left at {config.abort_events} events (grace 0)",
            counts(direct),
            counts(gateway),
            f"{config.aborts} / 0 / 0",
            gateway[:3] == expected,
        ),
        Row(
            "**abort: provider chunks sent per aborted stream, max / mean**",
            chunks(direct[3]),
            chunks(gateway[3]),
            f"≤ {config.abort_events} + in-flight (≤ {allowed})",
            bool(gateway[3]) and max(gateway[3]) <= allowed,
        ),
    ]


async def _sim_stats(session: aiohttp.ClientSession, stack: Stack) -> dict[str, Any]:
    async with session.get(stack.sim_url + "/stats") as response:
        stats: dict[str, Any] = orjson.loads(await response.read())
        return stats
