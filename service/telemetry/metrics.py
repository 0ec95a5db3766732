"""Prometheus metrics on the app's own ``CollectorRegistry`` (never the global one).

GenAI client metrics follow the semantic conventions' names, with dots made underscores
and the unit suffixed as Prometheus does (``gen_ai.client.operation.duration`` becomes
``gen_ai_client_operation_duration_seconds``). Gateway metrics are ``sluice_*``. Every label
value passes through ``LabelGuard``: redacted, and bounded in cardinality. The instruments
are ``instruments.py``'s (plain numbers, read when the registry is collected), exposed as
prometheus_client's own would be.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from .instruments import Instruments
from .redaction import LabelGuard

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Bucket boundaries advised by the GenAI conventions.
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304)
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48)
CHUNK_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5)
BREAKER_STATES = {"closed": 0, "half-open": 1, "open": 2}

_GENAI = ("gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_request_model")


class Metrics:
    """Every instrument Sluice exports, and the one place labels are cleaned."""

    def __init__(
        self, registry: CollectorRegistry, labels: LabelGuard, operator: LabelGuard | None = None
    ) -> None:
        self.registry = registry
        self.label = labels  # values clients influence: models, provider codes
        # Values the operator sets (provider, breaker names, tenants) or Sluice fixes
        # (reasons): a budget of their own, so a flood of client values cannot turn them
        # into "other".
        self.fixed = operator or labels
        new = Instruments(registry)
        self.token_usage = new.histogram(
            "gen_ai_client_token_usage",
            "Tokens per provider operation (gen_ai.client.token.usage), by gen_ai.token.type.",
            [*_GENAI, "gen_ai_token_type"],
            buckets=TOKEN_BUCKETS,
        )
        self.operation_duration = new.histogram(
            "gen_ai_client_operation_duration_seconds",
            "Provider operation duration (gen_ai.client.operation.duration), last attempt.",
            [*_GENAI, "error_type"],
            buckets=DURATION_BUCKETS,
        )
        self.time_to_first_chunk = new.histogram(
            "gen_ai_client_operation_time_to_first_chunk_seconds",
            "From the provider call to its first chunk "
            "(gen_ai.client.operation.time_to_first_chunk).",
            list(_GENAI),
            buckets=CHUNK_BUCKETS,
        )
        self.open_streams = new.gauge(
            "sluice_open_streams",
            "Client connections currently receiving a stream, by transport (sse, ws).",
            ["transport"],
        )
        self.generations = new.gauge(
            "sluice_generations_running",
            "Generations in flight (they may outlive their client by the grace window).",
        ).labels()  # one series, shown from the start
        self.requests = new.counter(
            "sluice_requests",
            "Finished requests by route and outcome (a chat request's outcome is its stream's).",
            ["route", "method", "status", "outcome"],
        )
        self.rejections = new.counter(
            "sluice_rejections",
            "Requests refused before the provider, by reason (rate, tokens, budget, breaker, ...).",
            ["reason"],
        )
        self.breaker_state = new.gauge(
            "sluice_breaker_state",
            "Circuit breaker state per provider (or provider/model): "
            "0 closed, 1 half-open, 2 open.",
            ["provider"],
        )
        self.breaker_transitions = new.counter(
            "sluice_breaker_transitions",
            "Circuit breaker state changes, by provider and new state.",
            ["provider", "state"],
        )
        self.cost = new.counter(
            "sluice_cost_usd",
            "Provider cost in USD, by tenant and served model.",
            ["tenant", "model"],
        )
        self.overhead = new.histogram(
            "sluice_gateway_overhead_seconds",
            "Time spent in Sluice itself: request time minus provider time (see README), "
            "up to the response headers (phase=headers) and for the whole response (total).",
            ["route", "phase"],
            buckets=OVERHEAD_BUCKETS,
        )
        self.cache = new.counter(
            "sluice_cache_lookups",
            "Response cache results (hit, miss, bypass).",
            ["result"],
        )
        self.retries = new.counter(
            "sluice_provider_retries",
            "Provider attempts retried, by provider and error type.",
            ["provider", "error_type"],
        )

    def render(self) -> bytes:
        """The registry in Prometheus text format."""
        return generate_latest(self.registry)

    def breaker(self, provider: str, state: str) -> None:
        name = self.fixed(provider)
        self.breaker_state.labels(name).set(BREAKER_STATES.get(state, -1))
        self.breaker_transitions.labels(name, state).inc()
