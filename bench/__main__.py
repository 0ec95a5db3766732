"""``python -m bench [--quick] [--out PATH]``: run every phase, print the table, save it.

Each group of phases gets fresh provider and gateway processes (so one phase's leftovers, such
as retained journals or provider counters, do not colour the next). Set
``SLUICE_BENCH_PROFILE=<file>`` to run the throughput phases' gateway under cProfile with a
CPU-time clock (``bench/profiled.py``) and dump its stats there; the table's numbers are then
several times slower: read the profile for where the time goes, not the table.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import sys
import time
from pathlib import Path

from .held import abort_phase, memory_phase
from .phases import QUICK, BenchConfig, throughput_phases
from .procs import Stack
from .report import Row, calibration_ms, render
from .tracing import tracing_phase
from .variants import protection_phase

DEFAULT_OUT = Path(".bench/latest.md")
PROFILE_ENV = "SLUICE_BENCH_PROFILE"
# Defaults everywhere else. Grace 0 so dropped clients cancel at once; timeouts long enough
# and a stream cap high enough that 2,000 stalled streams of the one bench user stay open;
# no response cache, so every request reaches the provider (the bench repeats one prompt).
GATEWAY_ENV = {
    "SLUICE_DISCONNECT_GRACE_S": "0",
    "SLUICE_FIRST_TOKEN_TIMEOUT_S": "600",
    "SLUICE_IDLE_TIMEOUT_S": "600",
    "SLUICE_MAX_STREAMS_PER_USER": "100000",
    "SLUICE_CACHE": "false",
}


def raise_fd_limit(wanted: int) -> int:
    """Raise RLIMIT_NOFILE towards ``wanted`` (up to the hard limit); return the new soft one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return target
    return soft


async def run_bench(
    config: BenchConfig, log_dir: Path, *, profile_to: Path | None = None
) -> list[Row]:
    """Run every phase on fresh processes and return the table's rows (logs in ``log_dir``)."""
    rows: list[Row] = []
    async with Stack(
        log_dir, "throughput", gateway_env=GATEWAY_ENV, profile_to=profile_to, bare=True
    ) as s:
        rows += await throughput_phases(s, config)
    async with Stack(log_dir, "memory", gateway_env=GATEWAY_ENV) as s:
        rows += await memory_phase(s, config)
    async with Stack(log_dir, "abort", gateway_env=GATEWAY_ENV) as s:
        rows += await abort_phase(s, config)
    rows += await protection_phase(log_dir, config, GATEWAY_ENV)
    rows += await tracing_phase(log_dir, config, GATEWAY_ENV)
    return rows


def notes(config: BenchConfig, elapsed_s: float) -> list[str]:
    return [
        "Loopback, one machine: the bench's aiohttp client, the gateway and the simulated "
        "provider are separate processes competing for the same CPUs, so throughput and "
        "latency are lower bounds shaped by that contention; CPU per request is the gateway "
        "process's own utime+stime (from /proc) divided by the requests it served.",
        "One load-client process: 'cores busy' shows who limits throughput. The gateway is "
        "one process on one core, so near 1.0 it is the bottleneck; client + provider near "
        "2.0 means the machine is (the usual case for direct non-stream).",
        f"Streams ask for {config.stream_chunks} chunks plus usage; the time to first chunk "
        "is measured to the first body bytes of a 5-chunk stream.",
        "RSS per held stream: streams stalled by the provider after their first chunk, held "
        "open by the client; the growth in RSS from half as many held to half as many again "
        "more (from none, the first streams reuse memory freed by earlier ones and read low); "
        "kernel socket buffers are not in RSS.",
        "The main rows use the defaults (SQLite ledger, breaker, access log and metrics on; no "
        "limits or budgets configured), in simulated mode (text logs, the dev key), except: the "
        "response cache off (the bench repeats one prompt; no request here is deterministic, "
        "so it would only look and miss), grace 0, long timeouts and a high stream cap (for the "
        "held streams). The 'limits + budgets' rows add rate limits (user, "
        "tenant, global; requests and tokens) and USD budgets, set far above the load, so "
        "each request reserves and settles in all of them.",
        "Tracing rows: the same gateway with spans exported over OTLP/HTTP to a stand-in "
        "collector in the bench process; the OpenTelemetry SDK's span encoding (in its "
        "export thread) is most of what tracing every request costs.",
        f"Whole run: {elapsed_s:.0f} s.",
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks, not numbers")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="markdown report path")
    args = parser.parse_args(argv)
    config = QUICK if args.quick else BenchConfig()
    raise_fd_limit(4 * config.held_streams + 1024)
    profile = os.environ.get(PROFILE_ENV)
    try:
        import uvloop
    except ImportError:
        runner = asyncio.run
    else:
        runner = uvloop.run
    args.out.parent.mkdir(parents=True, exist_ok=True)
    load_average = os.getloadavg()[0]
    calibration = calibration_ms()
    started = time.monotonic()
    rows = runner(run_bench(config, args.out.parent, profile_to=Path(profile) if profile else None))
    table = render(
        rows,
        notes(config, time.monotonic() - started),
        load_average=load_average,
        calibration=calibration,
    )
    args.out.write_text(table)
    sys.stdout.write(table)


if __name__ == "__main__":
    main()
