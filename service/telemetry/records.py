"""What telemetry remembers about one request and one generation while they run.

``RequestTrace``: one HTTP request (its SERVER span, status, timings). ``StreamTrace``: one
generation (its provider attempts' CLIENT spans and their timing). Plain slotted records;
``core.py`` fills them, ``access.py`` turns them into the access line.
"""

from __future__ import annotations

import time

from opentelemetry.context import Context
from opentelemetry.trace import Span

from ..checkpoint import Checkpoint
from ..stream import Stream


class RequestTrace:
    """One HTTP request: its SERVER span and what its access line will say."""

    __slots__ = (
        "context_token",
        "done",
        "ended",
        "error_type",
        "header_overhead_s",
        "id",
        "method",
        "outcome",
        "path",
        "rejection",
        "route",
        "span",
        "sse",
        "started",
        "status",
        "stream",
        "tenant",
        "user_hash",
        "websocket",
    )

    def __init__(self, request_id: str, method: str, route: str, path: str) -> None:
        self.id = request_id
        self.method = method
        self.route = route
        self.path = path
        self.started = time.time()
        self.ended: float | None = None
        self.status = 0
        self.outcome: str | None = None
        self.error_type: str | None = None
        self.rejection: str | None = None
        self.span: Span | None = None
        self.context_token: object | None = None
        self.stream: StreamTrace | None = None
        self.user_hash: str | None = None
        self.tenant: str | None = None
        self.header_overhead_s: float | None = None
        self.sse = False
        self.websocket = False  # its streams are accounted one by one, each with a span
        self.done = False


class StreamTrace:
    """One generation: its provider attempts (CLIENT spans) and their timing."""

    __slots__ = (
        "answered_at",
        "attempt",
        "attempt_started",
        "checkpoint",
        "cost",
        "failed",
        "finished",
        "parent",
        "provider_started",
        "rejection",
        "request",
        "request_id",
        "server_span",
        "span",
        "stream",
        "websocket",
    )

    def __init__(self, stream: Stream, parent: Context, request: RequestTrace | None) -> None:
        self.stream = stream
        self.parent = parent
        self.request = request
        self.request_id: str | None = None  # a WebSocket stream's: its socket's request id
        self.server_span: Span | None = None  # a WebSocket message stream's own SERVER span
        self.rejection: str | None = None  # a WebSocket stream refused (its reason label)
        self.span: Span | None = None  # the attempt that answered 2xx (or is in flight)
        self.failed: Span | None = None  # a failed attempt, until a retry is scheduled
        self.attempt = 0
        self.provider_started: float | None = None
        self.attempt_started: float | None = None
        self.answered_at: float | None = None
        self.checkpoint: Checkpoint | None = None
        self.cost: float | None = None
        self.finished = False
        self.websocket = False

    def provider_s(self, now: float, *, whole: bool) -> float:
        """Wall time spent waiting on the provider up to its answer's headers (or its end)."""
        if self.provider_started is None:  # (a cache hit after failed attempts counts them)
            return 0.0
        end = None if whole else self.answered_at
        end = min(end or self.stream.ended_at or now, now)
        return max(0.0, end - self.provider_started)
