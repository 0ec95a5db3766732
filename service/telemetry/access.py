"""The access line: one per request (or per WebSocket stream), fields named for queries.

Fields: request_id, trace_id, method, path, route, status, outcome, user_hash, tenant,
duration_ms, overhead_ms, error_type; and for a request that ran a stream: stream_id,
model, served_model, prompt_tokens, completion_tokens, cost_usd, cache, attempts,
fallback_reason, ttft_ms, stream_ms, error_code. Values are not redacted here: the log
formatter redacts the whole formatted line.

``write_lines`` sends a batch of them through stdlib logging (``sluice.access``) as one
record, each line stamped with the time its request ended (see ``batch.py``, ``logs.py``).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from opentelemetry import trace

from ..checkpoint import billed_tokens
from . import genai
from .records import RequestTrace, StreamTrace

_Finished = tuple[RequestTrace | None, StreamTrace | None, str]  # request, stream, outcome


def write_lines(logger: logging.Logger, finished: list[_Finished]) -> None:
    """The access lines of finished requests (or WebSocket streams) as one record: its
    ``lines`` hold each line's end time, message and fields (see ``logs.py``)."""
    if not finished:
        return
    lines = []
    for rt, st, result in finished:
        fields = access_fields(rt, st, result)
        message = f"{fields['method']} {fields['path']} {fields['status']} {result}"
        lines.append((_ended_at(rt, st), message, fields))
    record = logger.makeRecord(
        logger.name,
        logging.INFO,
        "(access)",
        0,
        "%d access lines",
        (len(lines),),
        None,
        extra={"lines": lines},
    )
    logger.handle(record)


def _ended_at(rt: RequestTrace | None, st: StreamTrace | None) -> float:
    if rt is not None and rt.ended is not None:
        return rt.ended
    if st is not None and st.stream.ended_at is not None:
        return st.stream.ended_at
    return time.time()


def outcome(rt: RequestTrace | None, st: StreamTrace | None) -> str:
    """A chat request's outcome is its stream's (completed, client_gone, ...), unless refused."""
    if st is not None and st.finished and (rt is None or rt.rejection is None):
        return "rejected" if st.rejection else str(st.stream.status)
    if rt is None:
        return "unknown"
    if rt.outcome is not None:
        return rt.outcome
    if rt.status >= 500:
        return "server_error"
    return "client_error" if rt.status >= 400 else "ok"


def access_fields(rt: RequestTrace | None, st: StreamTrace | None, outcome: str) -> dict[str, Any]:
    """The access line's fields (redacted as a whole by the log formatter)."""
    fields: dict[str, Any] = {
        "request_id": rt.id if rt else st.request_id if st else None,
        "trace_id": _trace_id(rt, st),
        "method": rt.method if rt else "WS",
        "path": rt.path if rt else "/v1/ws",
        "route": rt.route if rt else "ws",
        "status": rt.status if rt else None,
        "outcome": outcome,
        "user_hash": rt.user_hash if rt else None,
        "tenant": rt.tenant if rt else None,
    }
    if rt is not None and rt.ended is not None:
        fields["duration_ms"] = round((rt.ended - rt.started) * 1000, 3)
    if rt is not None and rt.header_overhead_s is not None:
        fields["overhead_ms"] = round(rt.header_overhead_s * 1000, 3)
    if rt is not None and rt.error_type is not None:
        fields["error_type"] = rt.error_type
    if st is not None:
        fields.update(_stream_fields(st))
    return fields


def _stream_fields(st: StreamTrace) -> dict[str, Any]:
    stream, checkpoint = st.stream, st.checkpoint
    prompt, completion = billed_tokens(stream, checkpoint) if checkpoint else (None, None)
    fields: dict[str, Any] = {
        "stream_id": stream.id,
        "model": stream.model,
        "served_model": stream.served_model,
        "user_hash": genai.user_hash(stream.owner.user_id),
        "tenant": genai.tenant_label(stream.owner.tenant),
        "prompt_tokens": prompt,  # as the ledger bills them, as spans and metrics have them
        "completion_tokens": completion,
        "cost_usd": st.cost,
        "cache": stream.cache_status,
        "attempts": st.attempt,
    }
    if stream.fallback_reason is not None:
        fields["fallback_reason"] = stream.fallback_reason
    started = st.attempt_started or stream.created_at
    if stream.first_token_at is not None:
        fields["ttft_ms"] = round((stream.first_token_at - started) * 1000, 3)
    if stream.ended_at is not None:
        fields["stream_ms"] = round((stream.ended_at - stream.created_at) * 1000, 3)
    if stream.error is not None:
        fields["error_code"] = stream.error.code
    return fields


def _trace_id(rt: RequestTrace | None, st: StreamTrace | None) -> str | None:
    span = rt.span if rt is not None else None
    if span is None and st is not None:
        span = st.span or trace.get_current_span(st.parent)
    context = span.get_span_context() if span is not None else None
    return f"{context.trace_id:032x}" if context is not None and context.is_valid else None
