"""``Telemetry``: the app's tracer, metrics and access log, and the hooks other modules call.

Two traces meet here. A *request* (``RequestTrace``) is one HTTP request, with its SERVER
span, opened and closed by the middleware (``http.py``). A *generation* (``StreamTrace``)
belongs to a stream and lives in the registry's task, which may outlive the request: it
has one CLIENT span per provider attempt (``attempt``), parented on the SERVER span that
was current when the stream was created, and the last one is ended by the registry's
finish hook (``stream_finished``) with the stream's real status, whatever the end reason.

One access line and one ``sluice_requests_total`` count are emitted per request; for a
request that started a stream they wait until both the response and the stream are over,
so the line carries the stream's final outcome and tokens.

Hooks for other modules (all cheap, all safe to call with tracing off):
``attempt(model)`` (a context manager around one provider call), ``retry_scheduled``,
``breaker_listener``/``breaker_state_changed``, ``rejected``, ``stream_event``
(registry observer: client disconnected, grace expired), ``stream_resumed``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import time
from collections.abc import Awaitable, Callable, Coroutine
from contextvars import ContextVar, Token
from typing import Any, TypeGuard

import pybreaker
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import NoOpTracer, Span, SpanKind, Status, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from prometheus_client import CollectorRegistry

from ..checkpoint import Checkpoint, billed_tokens
from ..errors import ProviderError, SluiceError, TokenRateLimitError
from ..settings import Settings
from ..stream import Stream, StreamStatus
from . import access, genai
from .batch import Later
from .logs import ACCESS_LOGGER
from .metrics import Metrics
from .otlp_metrics import MetricsPusher
from .records import RequestTrace, StreamTrace
from .redaction import LabelGuard, Redactor
from .tracing import SERVICE_VERSION

log = logging.getLogger(__name__)

CostFunction = Callable[[Stream, Checkpoint], float | None]

# Error codes that mean "refused before the provider", and the reason label for each.
REJECTION_REASONS = {
    "rate_limit_exceeded": "rate",
    "concurrent_streams_exceeded": "concurrency",
    "budget_exceeded": "budget",
    "circuit_open": "breaker",
    "context_length_exceeded": "context_length",
    "too_many_streams_on_socket": "concurrency",
    "too_many_remote_readers": "concurrency",
}
# Ends the client chose: not the gateway's failures (a SERVER span's status stays unset).
RUNNING = StreamStatus.RUNNING
_CLIENT_ENDED = frozenset({StreamStatus.CANCELLED, StreamStatus.CLIENT_GONE})
_FAILED = frozenset({StreamStatus.PROVIDER_ERROR, StreamStatus.TIMEOUT})
STREAM_EVENTS = {
    "client_disconnected": "sluice.client.disconnected",
    "grace_expired": "sluice.grace.expired",
}

# The request being served in this task (set by the middleware) and the generation this
# task runs (set by ``traced``): how hooks deep in other modules find their trace.
_REQUEST: ContextVar[RequestTrace | None] = ContextVar("sluice_request", default=None)
_GENERATION: ContextVar[StreamTrace | None] = ContextVar("sluice_generation", default=None)


class Telemetry:
    """Tracing (no-op until a provider is installed), metrics, and the access log."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings.telemetry
        self.redactor = Redactor.from_settings(settings)
        self.metrics = Metrics(
            CollectorRegistry(auto_describe=True),
            LabelGuard(self.redactor),
            LabelGuard(self.redactor),
        )
        self.provider_name = settings.provider.name
        self.tracer: Tracer = NoOpTracer()
        self.tracer_provider: TracerProvider | None = None
        self.metrics_pusher: MetricsPusher | None = None  # OTLP metrics, when configured
        self.propagator = TraceContextTextMapPropagator()
        self.cost_of: CostFunction | None = None
        self.access = logging.getLogger(ACCESS_LOGGER)
        # Access lines and stream metrics, off the request's path; lines go out per batch.
        self._finished: list[tuple[RequestTrace | None, StreamTrace | None, str]] = []
        self.later = Later(after=self._write_access_lines)
        self._streams: dict[str, StreamTrace] = {}

    # --- the tracer provider (installed and shut down by ``telemetry_ctx``) -----------------

    @property
    def recording(self) -> bool:
        return self.tracer_provider is not None

    def install(self, provider: TracerProvider) -> None:
        self.tracer_provider = provider
        self.tracer = provider.get_tracer("sluice", SERVICE_VERSION)

    async def flush(self, timeout_ms: int = 30_000) -> bool:
        """Export every ended span now (in a thread: the exporter blocks)."""
        provider = self.tracer_provider
        if provider is None:
            return True
        return await asyncio.to_thread(provider.force_flush, timeout_ms)

    async def shutdown(self) -> None:
        """End spans of generations that never finished, flush, and stop exporting (the
        final metrics push included)."""
        self.later.run()
        pusher, self.metrics_pusher = self.metrics_pusher, None
        if pusher is not None:
            await pusher.close()
        for st in list(self._streams.values()):
            for span in (st.failed, st.span, st.server_span):
                if span is not None and span.is_recording():
                    span.set_status(Status(StatusCode.ERROR, "gateway stopped"))
                    span.end()
        provider = self.tracer_provider
        if provider is not None:
            self.tracer = NoOpTracer()
            self.tracer_provider = None
            await asyncio.to_thread(provider.shutdown)

    # --- requests (called by the middleware) --------------------------------------------------

    def begin_request(
        self, method: str, route: str, path: str, headers: Any, request_id: str | None
    ) -> RequestTrace:
        rt = RequestTrace(request_id or f"req_{random.getrandbits(64):016x}", method, route, path)
        if self.recording:
            parent = self.propagator.extract(headers)
            rt.span = span = self.tracer.start_span(
                f"{method} {route}", context=parent, kind=SpanKind.SERVER
            )
            if span.is_recording():  # sampled: attributes cost CPU here and in the exporter
                span.set_attributes(
                    {
                        "http.request.method": method,
                        "http.route": route,
                        "url.path": self.redactor.redact(path),
                    }
                )
            rt.context_token = otel_context.attach(trace.set_span_in_context(rt.span))
        return rt

    def serving(self, rt: RequestTrace) -> Serving:
        """Make ``rt`` the current request of this task for the block."""
        return Serving(rt)

    def request_failed(self, rt: RequestTrace, status: int, error: BaseException) -> None:
        rt.status = status
        rt.error_type = self.redactor.value(genai.failure_type(error))  # a provider's code
        if _ours(error) and rt.rejection is None:
            reason = rejection_reason(error)
            if reason is not None:
                self.rejected(reason, request=rt)

    def _ended_type(self, stream: Stream) -> str | None:
        """``error.type`` for an ended stream, redacted: it may be a provider's own code."""
        error = genai.error_type(stream.status, stream.error)
        return None if error is None else self.redactor.value(error)

    def end_request(self, rt: RequestTrace, *, user_id: str | None, tenant: str | None) -> None:
        rt.ended = now = time.time()
        if user_id is not None:
            rt.user_hash = genai.user_hash(user_id)
            rt.tenant = genai.tenant_label(tenant) if tenant is not None else None
        if rt.sse:
            self.metrics.open_streams.labels("sse").dec()
        st = rt.stream
        # A request that relayed a stream made elsewhere (a resume, a socket) has no overhead
        # of its own to tell: its time is the stream's.
        follower = st is None and (rt.sse or rt.websocket)
        ended = st is None or st.finished or not st.stream.running
        if rt.outcome != "client_gone" and not follower and ended:
            overhead = now - rt.started - (st.provider_s(now, whole=True) if st else 0.0)
            self.metrics.overhead.labels(rt.route, "total").observe(max(0.0, overhead))
        span = rt.span
        if span is not None:
            self._end_server_span(rt, span)
        if rt.context_token is not None:
            otel_context.detach(rt.context_token)  # type: ignore[arg-type]
        rt.done = True
        if st is None or st.finished:
            self._account(rt, st)

    def response_started(self, rt: RequestTrace, *, event_stream: bool) -> float:
        """Headers are going out: return Sluice's own time so far (for the header)."""
        now = time.time()
        st = rt.stream
        provider = st.provider_s(now, whole=not st.stream.streaming) if st else 0.0
        overhead = max(0.0, now - rt.started - provider)
        rt.header_overhead_s = overhead
        self.metrics.overhead.labels(rt.route, "headers").observe(overhead)
        if event_stream and not rt.done:
            rt.sse = True
            self.metrics.open_streams.labels("sse").inc()
        return overhead

    def _end_server_span(self, rt: RequestTrace, span: Span) -> None:
        if not span.is_recording():
            span.end()
            return
        attributes: dict[str, Any] = {"http.response.status_code": rt.status}
        if rt.user_hash is not None:
            attributes["sluice.user.hash"] = rt.user_hash
        if rt.stream is not None:  # the rest is on the CLIENT span, if the provider was called
            stream = rt.stream.stream
            attributes["sluice.stream.id"] = stream.id
            attributes["sluice.cache.result"] = stream.cache_status
            if stream.fallback_reason is not None:  # (a cache replay calls no provider)
                attributes["sluice.fallback.reason"] = stream.fallback_reason
        if rt.header_overhead_s is not None:
            attributes["sluice.overhead_ms"] = round(rt.header_overhead_s * 1000, 3)
        outcome = rt.outcome
        if outcome is None and rt.stream is not None and rt.stream.stream.status is not RUNNING:
            outcome = str(rt.stream.stream.status)  # the response relayed the stream's end
        if outcome is not None:
            attributes["sluice.outcome"] = outcome
        if rt.error_type is not None and (rt.status >= 500 or rt.rejection):
            attributes["error.type"] = rt.error_type
        elif rt.stream is not None and rt.stream.stream.status in _FAILED:
            # A 200 whose stream then failed (the error went out as its last event).
            stream = rt.stream.stream
            attributes["error.type"] = self._ended_type(stream) or ""
        span.set_attributes(attributes)
        if rt.status >= 500:
            span.set_status(Status(StatusCode.ERROR))
        span.end()

    # --- generations (the registry's task) ----------------------------------------------------

    def traced(self, stream: Stream, work: Awaitable[None]) -> Coroutine[Any, Any, None]:
        """Wrap a stream's generation; call where the stream is created (in the request)."""
        rt = _REQUEST.get()
        if rt is not None and rt.websocket:
            st = StreamTrace(stream, otel_context.get_current(), None)
            st.websocket = True
            st.request_id = rt.id  # the socket's: its access lines join the upgrade's
            self._start_message_span(st)
        else:
            st = StreamTrace(stream, otel_context.get_current(), rt)
            if rt is not None:
                rt.stream = st
        self._streams[stream.id] = st
        self.metrics.generations.inc()
        return self._generation(st, work)

    def ws_relaying(self, change: int) -> None:
        """A WebSocket began (+1) or stopped (-1) relaying a stream to its client: the open
        streams are connections receiving one (a generation may outlive its socket)."""
        self.metrics.open_streams.labels("ws").inc(change)

    def _start_message_span(self, st: StreamTrace) -> None:
        """A WebSocket message stream gets its own SERVER span, under the socket's."""
        if not self.recording:
            return
        stream = st.stream
        st.server_span = span = self.tracer.start_span(
            "WS chat.completion.create",
            context=st.parent,
            kind=SpanKind.SERVER,
            attributes={
                "sluice.stream.id": stream.id,
                "sluice.user.hash": genai.user_hash(stream.owner.user_id),
                "sluice.tenant": self.redactor.value(genai.tenant_label(stream.owner.tenant)),
            },
        )
        st.parent = trace.set_span_in_context(span, st.parent)

    async def _generation(self, st: StreamTrace, work: Awaitable[None]) -> None:
        token = _GENERATION.set(st)
        try:
            await work
        finally:
            _GENERATION.reset(token)

    def attempt(self, model: str) -> Attempt:
        """One provider call (until its status line), as a ``with`` block; its CLIENT span
        is current inside."""
        return Attempt(self, model)

    def _attempt_began(self, st: StreamTrace, model: str) -> Span | None:
        self._end_failed(st)
        st.attempt += 1
        st.attempt_started = now = time.time()
        if st.provider_started is None:
            st.provider_started = now
        # A parent the sampler dropped has children it drops too (ParentBased; and a ratio
        # sampler decides by trace id, the same for both): skip making one. The provider
        # then gets the parent's context, flagged not sampled, which is all it needs.
        # The parent's sampling decision, not whether it still records: a retry after the
        # client left (its SERVER span ended) still gets its CLIENT span.
        sampled = (
            self.recording
            and trace.get_current_span(st.parent).get_span_context().trace_flags.sampled
        )
        span = self._start_attempt_span(st, model) if sampled else None
        st.span = span  # in flight: a disconnect or the grace window's end is an event on it
        return span

    def _attempt_ended(self, st: StreamTrace, span: Span | None, exc: BaseException | None) -> None:
        if exc is None:
            st.answered_at = time.time()
        elif not isinstance(exc, asyncio.CancelledError):  # (stopped: its span ends later)
            st.span = None
            if span is not None:
                _mark_failed(span, exc, self.redactor)
                st.failed = span

    def _start_attempt_span(self, st: StreamTrace, model: str) -> Span:
        model = self.redactor.value(model)  # a client's words (passthrough models): redacted
        span = self.tracer.start_span(
            genai.span_name(model), context=st.parent, kind=SpanKind.CLIENT
        )
        if span.is_recording():
            span.set_attributes(self._attempt_attributes(st, model))
        return span

    def _attempt_attributes(self, st: StreamTrace, model: str) -> dict[str, Any]:
        stream = st.stream
        attributes = genai.request_attributes(
            stream.body, model=model, provider=self.provider_name, streaming=stream.streaming
        )
        stop = attributes.get("gen_ai.request.stop_sequences")
        if stop:  # the client's text
            attributes["gen_ai.request.stop_sequences"] = [self.redactor.redact(s) for s in stop]
        attributes.update(
            genai.sluice_attributes(
                stream_id=stream.id,
                user_id=stream.owner.user_id,
                tenant=self.redactor.value(genai.tenant_label(stream.owner.tenant)),
                attempt=st.attempt,
            )
        )
        if stream.fallback_reason is not None:
            attributes["sluice.fallback.reason"] = stream.fallback_reason
        if self.settings.capture_content:
            attributes["gen_ai.input.messages"] = self.redactor.redact(
                genai.input_messages(stream.body)
            )
        return attributes

    def retry_scheduled(self, delay_s: float, error: BaseException) -> None:
        """The failed attempt will be retried after ``delay_s`` (call before sleeping)."""
        kind = genai.failure_type(error)
        m = self.metrics
        m.retries.labels(m.fixed(self.provider_name), m.label(kind)).inc()
        st = _GENERATION.get()
        if st is None or st.failed is None:
            return
        st.failed.add_event(
            "sluice.retry.scheduled",
            {"sluice.retry.delay_s": delay_s, "sluice.retry.attempt": st.attempt + 1},
        )
        self._end_failed(st)

    def _end_failed(self, st: StreamTrace, end_time: int | None = None) -> None:
        if st.failed is not None:
            st.failed.end(end_time)
            st.failed = None

    async def stream_finished(self, stream: Stream, checkpoint: Checkpoint) -> None:
        """Registry finish hook: end the last attempt's span with the stream's real status."""
        st = self._streams.pop(stream.id, None)
        if st is None:
            return
        st.finished = True
        self.metrics.generations.dec()
        last = st.span
        if last is None:  # the last attempt failed: its span carries what is billed for it
            last, st.failed = st.failed, None
        # Spans end when the stream did, not when its batch was retired (``registry.py``).
        ended = _ns(stream.ended_at) if stream.ended_at is not None else None
        self._end_failed(st, ended)
        st.checkpoint = checkpoint
        st.cost = cost = self._cost(stream, checkpoint)
        error = self._ended_type(stream)
        if last is not None:
            self._end_attempt_span(st, last, checkpoint, cost, error, ended)
        if st.websocket:
            error_ = stream.error
            reason = rejection_reason(error_) if _ours(error_) else None
            if reason is not None:  # no middleware saw this refusal (breaker): count it here
                st.rejection = reason
                self.rejected(reason, span=st.server_span)
        if st.server_span is not None:
            self._end_message_span(st, st.server_span, error, ended)
        self.later.add(functools.partial(self._stream_metrics, st, checkpoint, cost, error))
        rt = st.request
        if rt is None or rt.done:
            self._account(rt, st)

    def _end_message_span(
        self, st: StreamTrace, span: Span, error: str | None, end_time: int | None
    ) -> None:
        """A WebSocket message's SERVER span: its stream's outcome, an error when it failed.

        As for an HTTP SERVER span, only the gateway's or provider's failures are errors; a
        stream the client cancelled or left, or one refused (a 429 over HTTP), still says
        why it ended, in ``error.type``.
        """
        stream = st.stream
        if span.is_recording():
            outcome = "rejected" if st.rejection else str(stream.status)
            span.set_attribute("sluice.outcome", outcome)
            if stream.fallback_reason is not None:
                span.set_attribute("sluice.fallback.reason", stream.fallback_reason)
            if error is not None:
                span.set_attribute("error.type", error)
                if stream.status not in _CLIENT_ENDED and not st.rejection:
                    span.set_status(Status(StatusCode.ERROR))
        span.end(end_time)

    def _cost(self, stream: Stream, checkpoint: Checkpoint) -> float | None:
        try:  # never let pricing keep a span open
            return self.cost_of(stream, checkpoint) if self.cost_of is not None else None
        except Exception:
            log.exception("cost of stream %s could not be computed", stream.id)
            return None

    def _end_attempt_span(
        self,
        st: StreamTrace,
        span: Span,
        checkpoint: Checkpoint,
        cost: float | None,
        error: str | None,
        end_time: int | None,
    ) -> None:
        if not span.is_recording():
            span.end(end_time)
            return
        stream = st.stream
        attributes = genai.response_attributes(
            checkpoint,
            started_at=st.attempt_started or stream.created_at,
            response_id=stream.progress.response_id,
            first_chunk_at=stream.first_chunk_at,
        )
        prompt, completion = billed_tokens(stream, checkpoint)  # as the ledger has them
        if "gen_ai.response.model" in attributes:  # the provider's words
            attributes["gen_ai.response.model"] = self.redactor.value(
                str(attributes["gen_ai.response.model"])
            )
        if "gen_ai.response.id" in attributes:  # (one a stream: not for value()'s memo)
            attributes["gen_ai.response.id"] = self.redactor.redact(
                str(attributes["gen_ai.response.id"])
            )
        if "gen_ai.response.finish_reasons" in attributes:
            attributes["gen_ai.response.finish_reasons"] = [
                self.redactor.value(str(checkpoint.finish_reason))
            ]
        attributes["gen_ai.usage.input_tokens"] = prompt
        attributes["gen_ai.usage.output_tokens"] = completion
        attributes["sluice.cache.result"] = stream.cache_status
        if cost is not None:
            attributes["sluice.cost_usd"] = cost
        if self.settings.capture_content:
            attributes["gen_ai.output.messages"] = self.redactor.redact(
                genai.output_messages(checkpoint)
            )
        span.set_attributes(attributes)
        if stream.first_token_at is not None:
            span.add_event("sluice.first_token", timestamp=_ns(stream.first_token_at))
        if error is not None:
            span.set_attribute("error.type", error)
            message = stream.error.message if stream.error is not None else error
            span.set_status(Status(StatusCode.ERROR, self.redactor.redact(message)))
        span.end(end_time)

    def _stream_metrics(
        self, st: StreamTrace, checkpoint: Checkpoint, cost: float | None, error: str | None
    ) -> None:
        stream, m = st.stream, self.metrics
        m.cache.labels(stream.cache_status).inc()
        model = m.label(stream.served_model)
        if cost:  # tenants are the operator's (the keys file): not crowded out by models
            m.cost.labels(m.fixed(genai.tenant_label(stream.owner.tenant)), model).inc(cost)
        if st.attempt == 0 or stream.cache_hit:
            return  # no provider call: nothing for the GenAI client metrics
        labels = (genai.OPERATION, m.fixed(self.provider_name), model)
        prompt, completion = billed_tokens(stream, checkpoint)  # as the ledger has them
        m.token_usage.labels(*labels, "input").observe(prompt)
        m.token_usage.labels(*labels, "output").observe(completion)
        started = st.attempt_started or stream.created_at
        if stream.ended_at is not None:
            outcome = m.label(error) if error else ""  # a provider's code: guarded, bounded
            m.operation_duration.labels(*labels, outcome).observe(stream.ended_at - started)
        if stream.first_chunk_at is not None:
            m.time_to_first_chunk.labels(*labels).observe(max(0.0, stream.first_chunk_at - started))

    # --- hooks for the other modules ------------------------------------------------------------

    def rejected(
        self, reason: str, *, request: RequestTrace | None = None, span: Span | None = None
    ) -> None:
        """A request was refused before the provider (rate, tokens, budget, breaker, ...);
        the event goes on ``span``, by default the current one."""
        self.metrics.rejections.labels(self.metrics.fixed(reason)).inc()
        rt = request or _REQUEST.get()
        if rt is not None and not rt.websocket:  # a socket is not refused for one message
            rt.rejection = reason
            rt.outcome = "rejected"
        span = span or trace.get_current_span()
        if span.is_recording():
            span.add_event("sluice.rejected", {"sluice.rejection.reason": reason})

    def message_refused(self, error: SluiceError, *, user_id: str, tenant: str) -> None:
        """A WebSocket ``chat.completion.create`` frame was refused before its stream existed
        (bad body, rate, budget, ...), or a ``resume`` by a bound: counted and logged like
        a refused HTTP request."""
        socket = _REQUEST.get()
        rt = RequestTrace(
            socket.id if socket is not None else f"req_{random.getrandbits(64):016x}",
            "WS",
            "ws",
            "/v1/ws",
        )
        rt.span = socket.span if socket is not None else None  # the access line's trace id
        rt.user_hash, rt.tenant = genai.user_hash(user_id), genai.tenant_label(tenant)
        self.request_failed(rt, error.http_status, error)  # a rejection: metric and event
        rt.ended = time.time()
        rt.done = True
        self._account(rt, None)

    def breaker_state_changed(self, breaker: str, old: str | None, new: str) -> None:
        """A circuit breaker moved (closed, open, half-open): gauge and span event."""
        self.metrics.breaker(breaker, new)
        span = trace.get_current_span()
        if span.is_recording():
            span.add_event(
                "sluice.breaker.state_change",
                {
                    "sluice.breaker.name": breaker,
                    "sluice.breaker.from": old or "",
                    "sluice.breaker.to": new,
                },
            )

    def breaker_listener(self) -> pybreaker.CircuitBreakerListener:
        """A pybreaker listener feeding ``breaker_state_changed``; add it to every breaker."""
        return _BreakerListener(self)

    def stream_event(self, stream: Stream, event: str) -> None:
        """Registry observer: ``client_disconnected`` (last reader left), ``grace_expired``."""
        st = self._streams.get(stream.id)
        name = STREAM_EVENTS.get(event, f"sluice.{event}")
        for span in (st.span, st.failed) if st is not None else ():
            if span is not None and span.is_recording():
                span.add_event(name, {"sluice.stream.readers": stream.readers})
                return
        if st is not None and st.parent is not None:
            parent = trace.get_current_span(st.parent)
            if parent.is_recording():
                parent.add_event(name)

    def stream_resumed(self, stream_id: str, after: int) -> None:
        """A client re-attached to a stream after event ``after`` (SSE or WebSocket): the
        request's span gets the event, and so does the stream's CLIENT span when the stream
        is generated here (not when it is followed from another replica's journal)."""
        attributes: dict[str, str | int] = {
            "sluice.stream.id": stream_id,
            "sluice.resume.after": after,
        }
        st = self._streams.get(stream_id)
        if st is not None and st.span is not None and st.span.is_recording():
            st.span.add_event("sluice.stream.resumed", attributes)
        current = trace.get_current_span()
        if current.is_recording():
            current.add_event("sluice.stream.resumed", attributes)
        rt = _REQUEST.get()
        if rt is not None and rt.span is not None and rt.span.is_recording():
            rt.span.set_attribute("sluice.stream.id", stream_id)

    # --- the access line and request counts -----------------------------------------------------

    def _account(self, rt: RequestTrace | None, st: StreamTrace | None) -> None:
        """Once per request (or per stream without one): the count and the access line."""
        self.later.add(functools.partial(self._account_now, rt, st))

    def _account_now(self, rt: RequestTrace | None, st: StreamTrace | None) -> None:
        outcome = access.outcome(rt, st)
        if rt is not None:
            self.metrics.requests.labels(rt.route, rt.method, str(rt.status), outcome).inc()
        else:
            self.metrics.requests.labels("ws", "WS", "", outcome).inc()
        if self.settings.access_log and self.access.isEnabledFor(logging.INFO):
            self._finished.append((rt, st, outcome))

    def _write_access_lines(self) -> None:
        finished, self._finished = self._finished, []
        access.write_lines(self.access, finished)


class _BreakerListener(pybreaker.CircuitBreakerListener):
    def __init__(self, telemetry: Telemetry) -> None:
        self._telemetry = telemetry

    def state_change(self, cb: Any, old_state: Any, new_state: Any) -> None:
        old = getattr(old_state, "name", None)
        self._telemetry.breaker_state_changed(str(cb.name), old, str(new_state.name))


class Attempt:
    """``Telemetry.attempt``'s block (a class, not a generator: one an attempt)."""

    __slots__ = ("_model", "_span", "_st", "_telemetry", "_token")

    def __init__(self, telemetry: Telemetry, model: str) -> None:
        self._telemetry = telemetry
        self._model = model
        self._st: StreamTrace | None = None
        self._span: Span | None = None
        self._token: Token[otel_context.Context] | None = None

    def __enter__(self) -> None:
        st = self._st = _GENERATION.get()
        if st is not None:
            span = self._span = self._telemetry._attempt_began(st, self._model)
            if span is not None:
                self._token = otel_context.attach(trace.set_span_in_context(span))

    def __exit__(self, kind: object, exc: BaseException | None, tb: object) -> None:
        st = self._st
        if st is None:
            return
        try:
            self._telemetry._attempt_ended(st, self._span, exc)
        finally:
            if self._token is not None:
                otel_context.detach(self._token)


class Serving:
    """``Telemetry.serving``'s block (a class, not a generator: held for a whole stream)."""

    __slots__ = ("_rt", "_token")

    def __init__(self, rt: RequestTrace) -> None:
        self._rt = rt
        self._token: Token[RequestTrace | None] | None = None

    def __enter__(self) -> RequestTrace:
        self._token = _REQUEST.set(self._rt)
        return self._rt

    def __exit__(self, *exc_info: object) -> None:
        if self._token is not None:
            _REQUEST.reset(self._token)


def _mark_failed(span: Span, error: BaseException, redactor: Redactor) -> None:
    span.set_attribute("error.type", redactor.value(genai.failure_type(error)))
    status = getattr(error, "provider_status", None)
    if isinstance(status, int):
        span.set_attribute("http.response.status_code", status)
    message = error.message if isinstance(error, SluiceError) else type(error).__name__
    span.set_status(Status(StatusCode.ERROR, redactor.redact(message)))


def rejection_reason(error: SluiceError) -> str | None:
    """The ``reason`` label of a refusal before the provider, None for other errors."""
    if isinstance(error, TokenRateLimitError):
        return "tokens"
    return REJECTION_REASONS.get(error.code or "")


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


def _ours(error: BaseException | None) -> TypeGuard[SluiceError]:
    """A refusal the gateway made, not a provider's error carrying the same code (a
    provider's 429 or ``context_length_exceeded`` is its failure, not our rejection)."""
    return isinstance(error, SluiceError) and not isinstance(error, ProviderError)
