"""A real OTLP/HTTP receiver for tests, and readable views of what it received.

The gateway's exporters POST protobuf ``ExportTraceServiceRequest`` bodies to ``/v1/traces``
and ``ExportMetricsServiceRequest`` bodies to ``/v1/metrics`` on an aiohttp test server; the
receiver decodes them with opentelemetry-proto (independently of the SDK that encoded them)
into ``Received`` spans and ``Pushed`` metric exports. ``Ended`` is a span
processor the test adds to the injected provider: it tells when spans *ended* (in the
loop's thread), so a test waits on that, then flushes, instead of sleeping.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span as ProtoSpan
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor

SERVER = ProtoSpan.SpanKind.SPAN_KIND_SERVER
CLIENT = ProtoSpan.SpanKind.SPAN_KIND_CLIENT
STATUS_UNSET, STATUS_OK, STATUS_ERROR = 0, 1, 2

RECEIVED: web.AppKey[list[Received]] = web.AppKey("received")
PUSHED: web.AppKey[Pushes] = web.AppKey("pushed")


@dataclass
class Received:
    """One exported span, decoded."""

    name: str
    kind: int
    trace_id: str
    span_id: str
    parent_id: str
    attributes: dict[str, Any]
    events: list[tuple[str, dict[str, Any]]]
    status_code: int
    status_message: str
    resource: dict[str, Any] = field(default_factory=dict)
    end_ns: int = 0  # when the span ended, in Unix nanoseconds

    def event(self, name: str) -> dict[str, Any]:
        for event_name, attributes in self.events:
            if event_name == name:
                return attributes
        raise AssertionError(f"{self.name} has no event {name}: {[e for e, _ in self.events]}")

    def text(self) -> str:
        """Everything the span says, as one string, for leak searches."""
        return repr((self.name, self.attributes, self.events, self.status_message))


@dataclass
class Pushed:
    """One metric of one export, decoded: its kind (sum, gauge, histogram) and points."""

    name: str
    unit: str
    kind: str
    points: list[dict[str, Any]]
    monotonic: bool
    temporality: int
    resource: dict[str, Any]

    def point(self, **attributes: Any) -> dict[str, Any]:
        """The one point whose attributes include ``attributes``."""
        found = [p for p in self.points if attributes.items() <= p["attributes"].items()]
        assert len(found) == 1, (self.name, attributes, self.points)
        return found[0]


class Pushes:
    """Every metrics export received, in order; wakes waiters on each."""

    def __init__(self) -> None:
        self.exports: list[dict[str, Pushed]] = []
        self._changed = asyncio.Event()

    def add(self, export: dict[str, Pushed]) -> None:
        self.exports.append(export)
        self._changed.set()
        self._changed.clear()

    async def wait_for(self, predicate: Callable[[list[dict[str, Pushed]]], bool]) -> None:
        async with asyncio.timeout(10):
            while not predicate(self.exports):
                await self._changed.wait()


def receiver_app() -> web.Application:
    app = web.Application()
    app[RECEIVED] = []
    app[PUSHED] = Pushes()

    async def metrics(request: web.Request) -> web.Response:
        assert request.content_type == "application/x-protobuf"
        export = ExportMetricsServiceRequest.FromString(await request.read())
        decoded: dict[str, Pushed] = {}
        for resource_metrics in export.resource_metrics:
            resource = _attributes(resource_metrics.resource.attributes)
            for scope in resource_metrics.scope_metrics:
                for metric in scope.metrics:
                    decoded[metric.name] = _decode_metric(metric, resource)
        app[PUSHED].add(decoded)
        return web.Response(
            body=ExportMetricsServiceResponse().SerializeToString(),
            content_type="application/x-protobuf",
        )

    app.router.add_post("/v1/metrics", metrics)

    async def traces(request: web.Request) -> web.Response:
        assert request.content_type == "application/x-protobuf"
        export = ExportTraceServiceRequest.FromString(await request.read())
        for resource_spans in export.resource_spans:
            resource = _attributes(resource_spans.resource.attributes)
            for scope in resource_spans.scope_spans:
                app[RECEIVED].extend(_decode(span, resource) for span in scope.spans)
        return web.Response(
            body=ExportTraceServiceResponse().SerializeToString(),
            content_type="application/x-protobuf",
        )

    app.router.add_post("/v1/traces", traces)
    return app


class Ended(SpanProcessor):
    """Records the names of ended spans and wakes waiters (``on_end`` runs in the loop)."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self._changed = asyncio.Event()

    def on_end(self, span: ReadableSpan) -> None:
        self.names.append(span.name)
        self._changed.set()
        self._changed.clear()

    async def wait_for(self, predicate: Callable[[list[str]], bool]) -> None:
        async with asyncio.timeout(10):
            while not predicate(self.names):
                await self._changed.wait()


def _decode(span: ProtoSpan, resource: dict[str, Any]) -> Received:
    return Received(
        name=span.name,
        kind=span.kind,
        trace_id=span.trace_id.hex(),
        span_id=span.span_id.hex(),
        parent_id=span.parent_span_id.hex(),
        attributes=_attributes(span.attributes),
        events=[(e.name, _attributes(e.attributes)) for e in span.events],
        status_code=span.status.code,
        status_message=span.status.message,
        resource=resource,
        end_ns=span.end_time_unix_nano,
    )


def _decode_metric(metric: Any, resource: dict[str, Any]) -> Pushed:
    kind = metric.WhichOneof("data")
    data = getattr(metric, kind)
    points = []
    for point in data.data_points:
        decoded: dict[str, Any] = {
            "attributes": _attributes(point.attributes),
            "start": point.start_time_unix_nano,
            "time": point.time_unix_nano,
        }
        if kind == "histogram":
            decoded.update(
                count=point.count,
                sum=point.sum,
                bucket_counts=list(point.bucket_counts),
                explicit_bounds=list(point.explicit_bounds),
            )
        else:
            decoded["value"] = getattr(point, point.WhichOneof("value"))
        points.append(decoded)
    return Pushed(
        name=metric.name,
        unit=metric.unit,
        kind=kind,
        points=points,
        monotonic=getattr(data, "is_monotonic", False),
        temporality=getattr(data, "aggregation_temporality", 0),
        resource=resource,
    )


def _attributes(pairs: Any) -> dict[str, Any]:
    return {pair.key: _value(pair.value) for pair in pairs}


def _value(value: AnyValue) -> Any:
    which = value.WhichOneof("value")
    if which == "array_value":
        return [_value(v) for v in value.array_value.values]
    return getattr(value, which) if which else None
