"""Observability: OpenTelemetry traces (GenAI conventions), Prometheus metrics, redacted logs.

    core.py        Telemetry: tracer, metrics, access log, and the hooks other modules call
    records.py     what is remembered per request and per generation while they run
    access.py      the access line's fields and a request's outcome
    http.py        the middleware, X-Sluice-Overhead-Ms, GET /metrics, the cleanup contexts
    cost.py        a stream's USD cost, by the ledger's rule
    genai.py       pure: a chat call as GenAI semantic-convention attributes
    redaction.py   pure: what never reaches a log line, span attribute or metric label
    metrics.py     the Prometheus instruments on the app's own registry
    tracing.py     the tracer provider from the OTEL_* settings (OTLP/HTTP, batched)
    otlp_metrics.py the Prometheus registry pushed over OTLP/HTTP, when configured
    logs.py        JSON/text formatters, redacting, and the process's logging setup

Only ``Telemetry`` is exported here: ``http.py`` depends on ``appkeys`` and is imported
from where the app is assembled.
"""

from .core import Telemetry

__all__ = ["Telemetry"]
