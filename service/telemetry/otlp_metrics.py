"""Metrics over OTLP/HTTP: the Prometheus registry, translated and pushed on an interval.

The instruments exist once, on the Prometheus registry (``metrics.py``, ``instruments.py``):
no second set of OpenTelemetry instruments is updated on the hot path. Every
``OTEL_METRIC_EXPORT_INTERVAL``, and once more at shutdown after the streams drained, the
registry is collected and translated into the SDK's ``MetricsData`` (counters as cumulative
monotonic sums, gauges as gauges, histograms as cumulative explicit-bucket histograms)
under the OpenTelemetry names (``gen_ai.client.token.usage``, ...), and the SDK's
OTLP/HTTP exporter sends it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Gauge,
    Histogram,
    HistogramDataPoint,
    Metric,
    MetricExporter,
    MetricExportResult,
    MetricsData,
    NumberDataPoint,
    ResourceMetrics,
    ScopeMetrics,
    Sum,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric as Family

from ..settings import TelemetrySettings
from .tracing import SERVICE_VERSION, build_resource

log = logging.getLogger(__name__)

CUMULATIVE = AggregationTemporality.CUMULATIVE
# Prometheus family -> (OpenTelemetry name, unit): the GenAI conventions' own names.
OTEL_NAMES = {
    "gen_ai_client_token_usage": ("gen_ai.client.token.usage", "{token}"),
    "gen_ai_client_operation_duration_seconds": ("gen_ai.client.operation.duration", "s"),
    "gen_ai_client_operation_time_to_first_chunk_seconds": (
        "gen_ai.client.operation.time_to_first_chunk",
        "s",
    ),
}
# Prometheus label -> OpenTelemetry attribute (Prometheus forbids the dots).
OTEL_LABELS = {
    "gen_ai_operation_name": "gen_ai.operation.name",
    "gen_ai_provider_name": "gen_ai.provider.name",
    "gen_ai_request_model": "gen_ai.request.model",
    "gen_ai_token_type": "gen_ai.token.type",
    "error_type": "error.type",
}


def translate(
    families: Iterable[Family], resource: Resource, *, start_ns: int, now_ns: int
) -> MetricsData:
    """One collection of the registry as ``MetricsData`` (cumulative since ``start_ns``)."""
    metrics = [m for family in families if (m := _metric(family, start_ns, now_ns)) is not None]
    scope = ScopeMetrics(InstrumentationScope("sluice", SERVICE_VERSION), metrics, "")
    return MetricsData([ResourceMetrics(resource, [scope], "")])


def _metric(family: Family, start_ns: int, now_ns: int) -> Metric | None:
    name, unit = OTEL_NAMES.get(family.name, (family.name, _unit(family)))
    data: Sum | Gauge | Histogram
    if family.type == "counter":
        points = list(_numbers(family, "_total", start_ns, now_ns))
        data = Sum(points, CUMULATIVE, is_monotonic=True)
    elif family.type == "gauge":
        points = list(_numbers(family, "", start_ns, now_ns))
        data = Gauge(points)
    elif family.type == "histogram":
        data = Histogram(list(_histograms(family, start_ns, now_ns)), CUMULATIVE)
    else:
        return None  # Sluice registers no summaries or info metrics
    if not data.data_points:
        return None
    return Metric(name, family.documentation, unit, data)


def _numbers(family: Family, suffix: str, start_ns: int, now_ns: int) -> Iterator[NumberDataPoint]:
    created = _created(family)
    for sample in family.samples:
        if sample.name == family.name + suffix:
            key = _key(sample.labels)
            yield NumberDataPoint(
                _attributes(sample.labels), created.get(key, start_ns), now_ns, sample.value
            )


def _histograms(family: Family, start_ns: int, now_ns: int) -> Iterator[HistogramDataPoint]:
    created = _created(family)
    series: dict[tuple[tuple[str, str], ...], dict[str, Any]] = {}
    for sample in family.samples:
        labels = {k: v for k, v in sample.labels.items() if k != "le"}
        entry = series.setdefault(_key(labels), {"labels": labels, "buckets": []})
        if sample.name.endswith("_bucket"):
            entry["buckets"].append((float(sample.labels["le"]), sample.value))
        elif sample.name.endswith("_count"):
            entry["count"] = sample.value
        elif sample.name.endswith("_sum"):
            entry["sum"] = sample.value
    for key, entry in series.items():
        buckets = sorted(entry["buckets"])
        cumulative = [int(count) for _, count in buckets]
        counts = [c - p for c, p in zip(cumulative, [0, *cumulative[:-1]], strict=True)]
        yield HistogramDataPoint(
            attributes=_attributes(entry["labels"]),
            start_time_unix_nano=created.get(key, start_ns),
            time_unix_nano=now_ns,
            count=int(entry.get("count", 0)),
            sum=entry.get("sum", 0.0),
            bucket_counts=counts,
            explicit_bounds=[bound for bound, _ in buckets if bound != float("inf")],
            min=None,  # type: ignore[arg-type]  # optional in OTLP; Prometheus keeps neither
            max=None,  # type: ignore[arg-type]
        )


def _created(family: Family) -> dict[tuple[tuple[str, str], ...], int]:
    """Each series' ``_created`` time (its cumulative start), in ns."""
    suffix = "_created"
    return {_key(s.labels): int(s.value * 1e9) for s in family.samples if s.name.endswith(suffix)}


def _key(labels: dict[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(labels.items()))


def _attributes(labels: dict[str, str]) -> dict[str, str]:
    return {OTEL_LABELS.get(k, k): v for k, v in labels.items()}


def _unit(family: Family) -> str:
    if family.name.endswith("_seconds"):
        return "s"
    return "USD" if family.name.endswith("_usd") else ""


class MetricsPusher:
    """Pushes the registry every ``interval_s`` and once more on ``close``."""

    def __init__(
        self,
        registry: CollectorRegistry,
        exporter: MetricExporter,
        resource: Resource,
        *,
        interval_s: float,
        timeout_s: float,
        before: Callable[[], None] | None = None,
    ) -> None:
        self._registry = registry
        self._before = before  # brings the registry up to date (telemetry's pending batch)
        self._exporter = exporter
        self._resource = resource
        self._interval_s = interval_s
        self._timeout_ms = timeout_s * 1000
        self._start_ns = time.time_ns()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="sluice-otlp-metrics")

    async def export(self) -> bool:
        """Collect and send now (the exporter blocks: in a thread); False if it failed."""
        if self._before is not None:
            self._before()
        data = translate(
            self._registry.collect(), self._resource, start_ns=self._start_ns, now_ns=time.time_ns()
        )
        result = await asyncio.to_thread(self._exporter.export, data, self._timeout_ms)
        return result is MetricExportResult.SUCCESS

    async def close(self) -> None:
        """Stop the interval, push the final values, and shut the exporter down."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        try:
            await self.export()
        finally:
            await asyncio.to_thread(self._exporter.shutdown)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            try:
                if not await self.export():
                    log.warning("OTLP metrics export failed; retrying next interval")
            except Exception:  # an exporter bug must not end the schedule
                log.exception("OTLP metrics export raised")


def build_metrics_pusher(
    settings: TelemetrySettings,
    registry: CollectorRegistry,
    *,
    exporter: MetricExporter | None = None,
    before: Callable[[], None] | None = None,
) -> MetricsPusher | None:
    """A pusher to the configured OTLP/HTTP endpoint, or None when metrics export is off."""
    if exporter is None:
        if settings.metrics_endpoint is None:
            return None
        exporter = OTLPMetricExporter(
            endpoint=settings.metrics_endpoint,
            headers=dict(settings.metrics_headers),
            timeout=settings.metrics_timeout_s,
        )
    return MetricsPusher(
        registry,
        exporter,
        build_resource(settings),
        interval_s=settings.metric_export_interval_s,
        timeout_s=settings.metrics_timeout_s,
        before=before,
    )
