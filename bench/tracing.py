"""Phase 7 (issue 5): the throughput workloads again, with tracing on and spans exported.

The gateway gets ``OTEL_EXPORTER_OTLP_ENDPOINT`` pointing at ``OtlpSink``, a stand-in
collector served by this process, which accepts every OTLP/HTTP (protobuf) POST and counts
its bytes; so the gateway does all of its real tracing work: spans made, batched, encoded
and sent. Two samplers: every trace (``always_on``), and one in ten
(``parentbased_traceidratio`` 0.1, the usual production setting). Only the gateway is
measured: the direct numbers are the main table's.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from .phases import BenchConfig
from .procs import Stack, free_port
from .report import NO_TARGET, Row
from .variants import cpu_rows

SAMPLERS = (
    ("every trace", {"OTEL_TRACES_SAMPLER": "always_on"}),
    (
        "1 in 10 traces",
        {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.1"},
    ),
)


class OtlpSink:
    """A collector that takes every export and keeps only counts (runs on the bench's loop)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.posts = {"traces": 0, "metrics": 0}
        self.trace_bytes = 0
        self._runner: web.AppRunner | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> OtlpSink:
        app = web.Application(client_max_size=256 * 1024 * 1024)
        app.router.add_post("/v1/{signal:traces|metrics}", self._take)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _take(self, request: web.Request) -> web.Response:
        size = len(await request.read())
        signal = request.match_info["signal"]
        self.posts[signal] += 1
        if signal == "traces":
            self.trace_bytes += size
        return web.Response(body=b"", content_type="application/x-protobuf")


async def tracing_phase(
    log_dir: Path, config: BenchConfig, gateway_env: dict[str, str]
) -> list[Row]:
    """Gateway CPU per request with tracing exported, per sampler, against the targets."""
    rows: list[Row] = []
    for label, sampler in SAMPLERS:
        async with OtlpSink() as sink:
            env = {
                **gateway_env,
                **sampler,
                "OTEL_EXPORTER_OTLP_ENDPOINT": sink.endpoint,
                "OTEL_BSP_SCHEDULE_DELAY": "200",  # export within the phase, not after it
            }
            async with Stack(log_dir, "tracing", gateway_env=env) as stack:
                rows += await cpu_rows(stack, config, f"tracing {label}")
            every = sampler["OTEL_TRACES_SAMPLER"] == "always_on"
            rows.append(
                Row(
                    f"tracing, {label}: OTLP exports received (trace posts, KB; metric posts)",
                    NO_TARGET,
                    f"{sink.posts['traces']}, {sink.trace_bytes / 1024:.0f}; "
                    f"{sink.posts['metrics']}",
                    "traces > 0" if every else NO_TARGET,
                    sink.posts["traces"] > 0 if every else None,
                )
            )
    return rows
