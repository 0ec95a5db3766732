"""The tracer provider, built from ``TelemetrySettings`` (the standard ``OTEL_*`` variables).

Nothing here touches OpenTelemetry's global provider: the provider is made by the cleanup
context (``telemetry_ctx`` in ``service/telemetry/http.py``) and handed to ``Telemetry``.
With no endpoint configured there is no provider at all and ``Telemetry`` keeps the no-op
tracer. Settings are passed explicitly so the SDK's own environment lookups never decide,
but for what the exporter reads itself (``OTEL_EXPORTER_OTLP_*`` compression and
certificates: the README lists them).
"""

from __future__ import annotations

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    ParentBased,
    Sampler,
    TraceIdRatioBased,
)

from ..settings import TelemetrySettings

SERVICE_VERSION = "0.1.0"


def build_resource(settings: TelemetrySettings) -> Resource:
    """``OTEL_SERVICE_NAME`` and ``OTEL_RESOURCE_ATTRIBUTES``: shared by traces and metrics."""
    return Resource(
        {
            "service.version": SERVICE_VERSION,
            **settings.resource_attributes,
            "service.name": settings.service_name,
        }
    )


def build_sampler(settings: TelemetrySettings) -> Sampler:
    """``OTEL_TRACES_SAMPLER`` (+ ``_ARG``) as the SDK spec defines the names."""
    name = settings.sampler
    root: Sampler
    if name.endswith("traceidratio"):
        root = TraceIdRatioBased(settings.sampler_arg)
    elif name.endswith("always_off"):
        root = ALWAYS_OFF
    else:
        root = ALWAYS_ON
    return ParentBased(root) if name.startswith("parentbased_") else root


def build_tracer_provider(
    settings: TelemetrySettings, *, exporter: SpanExporter | None = None
) -> TracerProvider | None:
    """A provider exporting over OTLP/HTTP in batches, or None when tracing is off."""
    if exporter is None:
        if settings.traces_endpoint is None:
            return None
        exporter = OTLPSpanExporter(
            endpoint=settings.traces_endpoint,
            headers=dict(settings.otlp_headers),
            timeout=settings.otlp_timeout_s,
        )
    provider = TracerProvider(
        sampler=build_sampler(settings), resource=build_resource(settings), shutdown_on_exit=False
    )
    provider.add_span_processor(
        BatchSpanProcessor(
            exporter,
            max_queue_size=settings.bsp_max_queue_size,
            schedule_delay_millis=settings.bsp_schedule_delay_ms,
            max_export_batch_size=min(
                settings.bsp_max_export_batch_size, settings.bsp_max_queue_size
            ),
            export_timeout_millis=settings.otlp_timeout_s * 1000,
        )
    )
    return provider
