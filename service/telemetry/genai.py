"""The OpenTelemetry GenAI semantic conventions for a chat call, as a pure mapping.

Streams, requests and checkpoints in; attribute dicts out (``gen_ai.*`` from the
conventions, ``sluice.*`` for the gateway's own facts). No SDK objects, no server objects:
unit-tested alone. Content (``gen_ai.input.messages`` / ``gen_ai.output.messages``) is
mapped only when the caller opted in. Reference:
https://opentelemetry.io/docs/specs/semconv/gen-ai/gen-ai-spans/
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Mapping
from typing import Any

import orjson

from ..checkpoint import Checkpoint
from ..errors import SluiceError
from ..stream import StreamStatus

Attributes = dict[str, Any]

OPERATION = "chat"
# An ended stream's status as the span's error.type; COMPLETED is not an error.
_ENDED_TYPES = {
    StreamStatus.CANCELLED: "cancelled",
    StreamStatus.CLIENT_GONE: "client_gone",
    StreamStatus.SHUTDOWN: "shutdown",
    StreamStatus.TIMEOUT: "timeout",
    StreamStatus.PROVIDER_ERROR: "provider_error",
}
_NUMBERS = {
    "temperature": "gen_ai.request.temperature",
    "top_p": "gen_ai.request.top_p",
    "frequency_penalty": "gen_ai.request.frequency_penalty",
    "presence_penalty": "gen_ai.request.presence_penalty",
    "seed": "gen_ai.request.seed",
}


def span_name(model: str) -> str:
    """``{gen_ai.operation.name} {gen_ai.request.model}``."""
    return f"{OPERATION} {model}"


@functools.lru_cache(maxsize=4096)  # a few users make most requests; each line needs it
def user_hash(user_id: str) -> str:
    """A stable pseudonym for a user id: telemetry joins on it without holding the id."""
    return hashlib.sha256(user_id.encode()).hexdigest()[:16]


def tenant_label(tenant: str) -> str:
    """A tenant as telemetry shows it: a key with no tenant has ``user:<its user id>``
    (``auth.py``), and a user id never leaves; its pseudonym does."""
    return f"user:{user_hash(tenant[5:])}" if tenant.startswith("user:") else tenant


def request_attributes(
    body: Mapping[str, Any], *, model: str, provider: str, streaming: bool
) -> Attributes:
    """The ``gen_ai.request.*`` attributes of a chat request body (known before the call)."""
    attributes: Attributes = {
        "gen_ai.operation.name": OPERATION,
        "gen_ai.provider.name": provider,
        "gen_ai.request.model": model,
        "gen_ai.request.stream": streaming,
    }
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
    if _is_int(max_tokens):
        attributes["gen_ai.request.max_tokens"] = max_tokens
    for field, name in _NUMBERS.items():
        value = body.get(field)
        if _is_number(value):
            attributes[name] = value
    choices = body.get("n")
    if _is_int(choices) and choices != 1:
        attributes["gen_ai.request.choice.count"] = choices
    stop = body.get("stop")
    if isinstance(stop, str):
        attributes["gen_ai.request.stop_sequences"] = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        attributes["gen_ai.request.stop_sequences"] = stop
    return attributes


def sluice_attributes(*, stream_id: str, user_id: str, tenant: str, attempt: int = 1) -> Attributes:
    """Sluice's own attributes of a provider attempt (the raw user id never leaves)."""
    return {
        "sluice.stream.id": stream_id,
        "sluice.user.hash": user_hash(user_id),
        "sluice.tenant": tenant,
        "sluice.retry.attempt": attempt,
    }


def response_attributes(
    checkpoint: Checkpoint,
    *,
    started_at: float,
    response_id: str | None,
    first_chunk_at: float | None,
) -> Attributes:
    """What the provider answered: ids, finish reasons, usage, time to first chunk (of any
    kind: an opening role chunk too, as the convention has it)."""
    attributes: Attributes = {
        "gen_ai.usage.input_tokens": checkpoint.prompt_tokens,
        "gen_ai.usage.output_tokens": checkpoint.completion_tokens,
        "sluice.usage.reported": checkpoint.usage_reported,
        "sluice.stream.status": str(checkpoint.status),
    }
    if response_id:
        attributes["gen_ai.response.id"] = response_id
    if checkpoint.response_model:
        attributes["gen_ai.response.model"] = checkpoint.response_model
    if checkpoint.finish_reason:
        attributes["gen_ai.response.finish_reasons"] = [checkpoint.finish_reason]
    if first_chunk_at is not None:
        ttfc = max(0.0, first_chunk_at - started_at)
        attributes["gen_ai.response.time_to_first_chunk"] = ttfc
    return attributes


def error_type(status: StreamStatus, error: SluiceError | None) -> str | None:
    """``error.type`` for an ended stream: None when it completed."""
    if status is StreamStatus.COMPLETED:
        return None
    if status in (StreamStatus.PROVIDER_ERROR, StreamStatus.TIMEOUT) and error is not None:
        return failure_type(error)
    return _ENDED_TYPES.get(status, str(status))


def failure_type(error: BaseException) -> str:
    """A low-cardinality name for a failure: the error code, else the class name."""
    code = getattr(error, "code", None)
    return code if isinstance(code, str) and code else type(error).__name__


def input_messages(body: Mapping[str, Any]) -> str:
    """``gen_ai.input.messages`` (opt-in content): the chat history as parts, in JSON."""
    messages = body.get("messages")
    out = []
    for message in messages if isinstance(messages, list) else ():
        if not isinstance(message, dict):
            continue
        content = message.get("content")
        parts = (
            [{"type": "text", "content": content}]
            if isinstance(content, str)
            else [p for p in content if isinstance(p, dict)]
            if isinstance(content, list)
            else []
        )
        out.append({"role": message.get("role"), "parts": parts})
    return orjson.dumps(out).decode()


def output_messages(checkpoint: Checkpoint) -> str:
    """``gen_ai.output.messages`` (opt-in content): the assistant's text so far."""
    parts: list[dict[str, Any]] = []
    if checkpoint.text:
        parts.append({"type": "text", "content": checkpoint.text})
    parts.extend({"type": "tool_call", "delta": call} for call in checkpoint.tool_calls)
    message = {"role": "assistant", "parts": parts, "finish_reason": checkpoint.finish_reason}
    return orjson.dumps([message]).decode()


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
