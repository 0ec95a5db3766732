"""The throughput phases (1-4) and the sizes of every phase. Each measures the same workload
twice, straight at the provider ("direct") and through the gateway, and turns the pair into
table rows; ``held.py`` has the phases that hold or drop streams.

CPU figures come from ``/proc/<pid>/stat`` deltas over a phase divided by its requests, so
they include everything the process did meanwhile (the event loop, the GC, the registry tick).
A figure held against a target is the median of several rounds (``cpu_rounds``).
"""

from __future__ import annotations

import resource
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import aiohttp

from .load import LoadResult, chat_body, new_session, run_load
from .procs import Stack, cpu_seconds, rss_kb
from .report import NO_TARGET, Row, ms, percentile

CPU_NON_STREAM_MS = 0.4
CPU_STREAM_MS = 0.6
ADDED_TTFT_MS = 1.0
CHAT_PATH = "/v1/chat/completions"


@dataclass(frozen=True, slots=True)
class BenchConfig:
    """Sizes of every phase; ``QUICK`` is for smoke runs, not for numbers."""

    concurrency: int = 64
    non_stream_requests: int = 4000
    stream_requests: int = 1500
    stream_chunks: int = 50
    ttft_requests: int = 300
    ttft_concurrency: int = 1
    held_streams: int = 2000
    hold_batch: int = 200
    aborts: int = 100
    abort_events: int = 3
    abort_wait_s: float = 2.0
    phase_limit_s: float = 20.0
    warmup_requests: int = 200
    paced_delay_ms: float = 2.0  # a provider that paces its tokens: one read per chunk
    paced_requests: int = 640
    cpu_rounds: int = 5  # of each workload held against a CPU target (see ``cpu_rounds``)


QUICK = BenchConfig(
    concurrency=8,
    non_stream_requests=80,
    stream_requests=40,
    stream_chunks=10,
    ttft_requests=10,
    held_streams=40,
    hold_batch=20,
    aborts=8,
    abort_wait_s=1.0,
    phase_limit_s=10.0,
    warmup_requests=10,
    paced_requests=16,
    cpu_rounds=2,
)


@dataclass(frozen=True, slots=True)
class Measured:
    """A load run plus the CPU each process spent during it, in seconds."""

    load: LoadResult
    gateway_cpu_s: float
    provider_cpu_s: float
    client_cpu_s: float

    def per_request_ms(self, cpu_s: float) -> float:
        return cpu_s * 1000 / self.load.requests if self.load.requests else 0.0

    def cores(self) -> str:
        """CPU seconds per wall second of each process: 1.0 is one core saturated."""
        wall = self.load.elapsed_s or 1.0
        return " / ".join(
            f"{cpu / wall:.2f}"
            for cpu in (self.client_cpu_s, self.gateway_cpu_s, self.provider_cpu_s)
        )


def _client_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass(frozen=True, slots=True)
class _Workload:
    label: str
    body: bytes
    streaming: bool
    total: int
    target_ms: float | None  # gateway CPU per request; None: informational only


async def throughput_phases(stack: Stack, config: BenchConfig) -> list[Row]:
    """Phases 1-4: non-stream and stream throughput, gateway CPU per request, TTFT."""
    chunks = config.stream_chunks
    plain = chat_body(f"chunks={chunks}", stream=False)
    streamed = chat_body(f"chunks={chunks}", stream=True)
    workloads = (
        _Workload("non-stream", plain, False, config.non_stream_requests, CPU_NON_STREAM_MS),
        _Workload(f"{chunks}-chunk stream", streamed, True, config.stream_requests, CPU_STREAM_MS),
        _Workload(
            f"{chunks}-chunk stream paced {config.paced_delay_ms:g} ms/chunk",
            chat_body(f"chunks={chunks} delay_ms={config.paced_delay_ms:g}", stream=True),
            True,
            config.paced_requests,
            None,
        ),
    )
    urls = (stack.sim_url + CHAT_PATH, stack.gateway_url + CHAT_PATH)
    rows: list[Row] = []
    rss_at_start = (rss_kb(stack.sim_pid), rss_kb(stack.gateway_pid))
    async with new_session() as session:
        warm = (*urls, stack.bare_url + CHAT_PATH) if stack.bare_url else urls
        for url in warm:  # warm every path measured: imports, pools, lazy allocations
            for work in workloads[:2]:
                await _run(session, url, work.body, config.warmup_requests, config, work.streaming)
        for work in workloads:
            direct, gateway = [
                await _measure(
                    stack,
                    session,
                    url,
                    work.body,
                    total=work.total,
                    concurrency=config.concurrency,
                    config=config,
                    streaming=work.streaming,
                )
                for url in urls
            ]
            if work.target_ms is None:
                rows += _throughput_rows(work, direct, gateway, config.concurrency, None)
                continue
            targets = [(stack.gateway_url + CHAT_PATH, stack.gateway_pid)]
            if stack.bare_url is not None:
                targets.append((stack.bare_url + CHAT_PATH, stack.bare_pid))
            cpu = await cpu_rounds(session, targets, work.body, work.total, config, work.streaming)
            rows += _throughput_rows(work, direct, gateway, config.concurrency, cpu[0])
            if len(cpu) > 1:
                rows.append(_bare_row(work, cpu[0], cpu[1]))
        short = chat_body("chunks=5", stream=True)
        ttft = [
            await _run(session, url, short, config.ttft_requests, config, True, ttft=True)
            for url in urls
        ]
    rows += _ttft_rows(ttft[0], ttft[1], config.ttft_concurrency)
    rss_at_end = (rss_kb(stack.sim_pid), rss_kb(stack.gateway_pid))
    rows.append(
        Row(
            "process RSS when ready → after the throughput phases, MB "
            "(the gateway keeps ended streams for replay)",
            f"{rss_at_start[0] / 1024:.0f} → {rss_at_end[0] / 1024:.0f}",
            f"{rss_at_start[1] / 1024:.0f} → {rss_at_end[1] / 1024:.0f}",
        )
    )
    return rows


async def _run(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    total: int,
    config: BenchConfig,
    streaming: bool,
    *,
    ttft: bool = False,
) -> LoadResult:
    return await run_load(
        session,
        url,
        body,
        total=total,
        concurrency=config.ttft_concurrency if ttft else config.concurrency,
        time_limit_s=config.phase_limit_s,
        streaming=streaming,
    )


async def _measure(
    stack: Stack,
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    *,
    total: int,
    concurrency: int,
    config: BenchConfig,
    streaming: bool,
) -> Measured:
    """A load run bracketed by CPU readings of the gateway, the provider and this process.

    Also used by ``bench.shared``; keep the signature.
    """
    marks = (cpu_seconds(stack.gateway_pid), cpu_seconds(stack.sim_pid), _client_cpu_s())
    load = await run_load(
        session,
        url,
        body,
        total=total,
        concurrency=concurrency,
        time_limit_s=config.phase_limit_s,
        streaming=streaming,
    )
    return Measured(
        load,
        cpu_seconds(stack.gateway_pid) - marks[0],
        cpu_seconds(stack.sim_pid) - marks[1],
        _client_cpu_s() - marks[2],
    )


def _throughput_rows(
    work: _Workload,
    direct: Measured,
    gateway: Measured,
    concurrency: int,
    cpu: CpuRounds | None,
) -> list[Row]:
    """The throughput run's rows; the CPU row from ``cpu``'s rounds when the workload has a
    target (``None``: from the throughput run, informational)."""
    d, g = direct.load, gateway.load
    label = work.label
    rows = [
        Row(
            f"{label}: throughput @{concurrency} concurrent, req/s "
            f"(ok / errors: {d.requests}/{d.errors} direct, {g.requests}/{g.errors} gateway)",
            f"{d.rps:.0f}",
            f"{g.rps:.0f}",
            "0 errors",
            d.errors == 0 and g.errors == 0,
        ),
        Row(
            f"{label}: latency p50 / p99, ms",
            f"{ms(percentile(d.latencies_s, 0.5))} / {ms(percentile(d.latencies_s, 0.99))}",
            f"{ms(percentile(g.latencies_s, 0.5))} / {ms(percentile(g.latencies_s, 0.99))}",
        ),
    ]
    provider = Row(
        f"{label}: provider CPU per request, ms",
        f"{direct.per_request_ms(direct.provider_cpu_s):.3f}",
        f"{gateway.per_request_ms(gateway.provider_cpu_s):.3f}",
    )
    if work.target_ms is None or cpu is None:
        measured = gateway.per_request_ms(gateway.gateway_cpu_s)
        return [
            *rows,
            Row(f"{label}: gateway CPU per request, ms", NO_TARGET, f"{measured:.3f}"),
            provider,
        ]
    return [
        *rows,
        cpu_row(f"{label}: **gateway CPU per request, ms**", cpu, work.target_ms),
        provider,
        Row(
            f"{label}: cores busy, load client / gateway / provider (saturation check)",
            direct.cores(),
            gateway.cores(),
        ),
    ]


def _bare_row(work: _Workload, gateway: CpuRounds, bare: CpuRounds) -> Row:
    """The same workload through ``bench/bare.py``: what the gateway costs over the floor."""
    ratio = gateway.median_ms / bare.median_ms if bare.median_ms else 0.0
    return Row(
        f"{work.label}: bare aiohttp relay CPU per request, ms (reference: no features; "
        f"{bare.described()}; gateway ÷ bare = {ratio:.1f}×; "
        f"ok / errors {bare.requests}/{bare.errors})",
        NO_TARGET,
        bare.text(),
        "0 errors",
        bare.errors == 0 and bare.requests > 0,
    )


def _ttft_rows(direct: LoadResult, gateway: LoadResult, concurrency: int) -> list[Row]:
    added = percentile(gateway.ttfts_s, 0.5) - percentile(direct.ttfts_s, 0.5)
    clean = all(r.errors == 0 and r.ttfts_s for r in (direct, gateway))  # no empty sample
    return [
        Row(
            f"time to first chunk @{concurrency} concurrent, p50 / p99, ms "
            f"(ok / errors: {direct.requests}/{direct.errors} direct, "
            f"{gateway.requests}/{gateway.errors} gateway)",
            f"{ms(percentile(direct.ttfts_s, 0.5))} / {ms(percentile(direct.ttfts_s, 0.99))}",
            f"{ms(percentile(gateway.ttfts_s, 0.5))} / {ms(percentile(gateway.ttfts_s, 0.99))}",
        ),
        Row(
            "**added time to first chunk, p50, ms** (gateway − direct)",
            NO_TARGET,
            ms(added),
            f"≤ {ADDED_TTFT_MS}",
            clean and added * 1000 <= ADDED_TTFT_MS,
        ),
    ]


@dataclass(frozen=True, slots=True)
class CpuRounds:
    """One process's CPU per request over rounds of one workload.

    On a shared VM a round of a second or two samples the neighbours' load as much as ours
    (two rounds a minute apart have differed by 20%), so a figure held against a target is
    the median of rounds, taken in turn with its reference (the bare relay) so both see the
    same machine; the table shows the spread too."""

    rounds_ms: tuple[float, ...]
    requests: int
    errors: int

    @property
    def median_ms(self) -> float:
        return statistics.median(self.rounds_ms)

    def text(self) -> str:
        """The median, and the range of the rounds when there are several."""
        if len(self.rounds_ms) < 2:
            return f"{self.median_ms:.3f}"
        return f"{self.median_ms:.3f} ({min(self.rounds_ms):.3f}–{max(self.rounds_ms):.3f})"

    def described(self) -> str:
        return f"median of {len(self.rounds_ms)} rounds (min–max)"


def cpu_row(label: str, cpu: CpuRounds, target_ms: float) -> Row:
    """A CPU-per-request row held against ``target_ms``: its median, with no failed request."""
    return Row(
        f"{label} ({cpu.described()}; ok / errors {cpu.requests}/{cpu.errors})",
        NO_TARGET,
        cpu.text(),
        f"≤ {target_ms}",
        cpu.median_ms <= target_ms and cpu.errors == 0 and cpu.requests > 0,
    )


async def cpu_rounds(
    session: aiohttp.ClientSession,
    targets: Sequence[tuple[str, int]],
    body: bytes,
    total: int,
    config: BenchConfig,
    streaming: bool,
) -> list[CpuRounds]:
    """``config.cpu_rounds`` rounds of ``total`` requests at each target ``(url, pid)``, the
    targets in turn and their order reversed each round; one ``CpuRounds`` a target."""
    rounds: list[list[float]] = [[] for _ in targets]
    requests, errors = [0] * len(targets), [0] * len(targets)
    for number in range(config.cpu_rounds):
        order = range(len(targets)) if number % 2 == 0 else reversed(range(len(targets)))
        for index in order:
            url, pid = targets[index]
            before = cpu_seconds(pid)
            load = await _run(session, url, body, total, config, streaming)
            rounds[index].append((cpu_seconds(pid) - before) * 1000 / max(load.requests, 1))
            requests[index] += load.requests
            errors[index] += load.errors
    return [CpuRounds(tuple(r), q, e) for r, q, e in zip(rounds, requests, errors, strict=True)]
