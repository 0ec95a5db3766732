"""The GenAI semantic-convention mapping, alone: bodies and checkpoints in, attributes out."""

from __future__ import annotations

import hashlib
from dataclasses import replace

import orjson
import pytest

from service.checkpoint import Checkpoint
from service.errors import ProviderStatusError, ProviderTimeoutError, StreamEndedError
from service.stream import StreamStatus
from service.telemetry import genai

CHECKPOINT = Checkpoint(
    stream_id="strm_1",
    user_id="alice",
    tenant="acme",
    key_id="k",
    model="gpt-4o",
    response_model="gpt-4o-2024-08-06",
    status=StreamStatus.COMPLETED,
    text="Hello there",
    tool_calls=[],
    finish_reason="stop",
    chunks=4,
    last_seq=5,
    prompt_tokens=12,
    completion_tokens=3,
    usage_reported=True,
    error=None,
    created_at=100.0,
    first_token_at=100.25,
    ended_at=101.0,
)


def test_request_attributes_follow_the_conventions() -> None:
    """Model, provider, stream flag and the sampling parameters map to gen_ai.request.*."""
    body = {
        "model": "gpt-4o",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 100,
        "max_completion_tokens": 200,
        "temperature": 0,
        "top_p": 0.5,
        "seed": 7,
        "n": 2,
        "stop": "END",
    }
    attributes = genai.request_attributes(body, model="gpt-4o", provider="openai", streaming=True)
    assert attributes == {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "openai",
        "gen_ai.request.model": "gpt-4o",
        "gen_ai.request.stream": True,
        "gen_ai.request.max_tokens": 200,  # max_completion_tokens wins, as OpenAI reads it
        "gen_ai.request.temperature": 0,
        "gen_ai.request.top_p": 0.5,
        "gen_ai.request.seed": 7,
        "gen_ai.request.choice.count": 2,
        "gen_ai.request.stop_sequences": ["END"],
    }


def test_request_attributes_skip_absent_and_mistyped_values() -> None:
    """A bool is not a number, n=1 is the default, and nothing is invented."""
    body = {"temperature": True, "n": 1, "stop": ["a", 1], "max_tokens": "9"}
    attributes = genai.request_attributes(body, model="m", provider="p", streaming=False)
    assert set(attributes) == {
        "gen_ai.operation.name",
        "gen_ai.provider.name",
        "gen_ai.request.model",
        "gen_ai.request.stream",
    }


def test_response_attributes_from_a_checkpoint() -> None:
    """Usage, ids and finish reasons come from the checkpoint."""
    attributes = genai.response_attributes(
        CHECKPOINT, started_at=100.05, response_id="chatcmpl-1", first_chunk_at=100.25
    )
    assert attributes["gen_ai.response.id"] == "chatcmpl-1"
    assert attributes["gen_ai.response.model"] == "gpt-4o-2024-08-06"
    assert attributes["gen_ai.response.finish_reasons"] == ["stop"]
    assert attributes["gen_ai.usage.input_tokens"] == 12
    assert attributes["gen_ai.usage.output_tokens"] == 3
    assert attributes["gen_ai.response.time_to_first_chunk"] == pytest.approx(0.2)
    assert attributes["sluice.stream.status"] == "completed"


def test_partial_checkpoint_has_no_first_chunk_or_finish_reason() -> None:
    """A stream that never produced output reports neither."""
    empty = replace(CHECKPOINT, first_token_at=None, finish_reason=None, response_model=None)
    attributes = genai.response_attributes(
        empty, started_at=100.0, response_id=None, first_chunk_at=None
    )
    for name in (
        "gen_ai.response.time_to_first_chunk",
        "gen_ai.response.finish_reasons",
        "gen_ai.response.model",
        "gen_ai.response.id",
    ):
        assert name not in attributes


@pytest.mark.parametrize(
    ("status", "error", "expected"),
    [
        (StreamStatus.COMPLETED, None, None),
        (StreamStatus.CLIENT_GONE, StreamEndedError("x", code="client_gone"), "client_gone"),
        (StreamStatus.CANCELLED, StreamEndedError("x"), "cancelled"),
        (StreamStatus.SHUTDOWN, StreamEndedError("x"), "shutdown"),
        (StreamStatus.TIMEOUT, ProviderTimeoutError("x"), "provider_timeout"),
        (
            StreamStatus.PROVIDER_ERROR,
            ProviderStatusError("x", provider_status=500),
            "provider_error",
        ),
    ],
)
def test_error_type_names_every_end_reason(
    status: StreamStatus, error: Exception | None, expected: str | None
) -> None:
    """error.type is absent on success and low-cardinality otherwise."""
    assert genai.error_type(status, error) == expected  # type: ignore[arg-type]


def test_failure_type_prefers_the_code() -> None:
    """An error with a code is named by it; anything else by its class."""
    assert genai.failure_type(ProviderStatusError("x", provider_status=429, code="rate")) == "rate"
    assert genai.failure_type(ValueError("x")) == "ValueError"


def test_content_mapping_is_structured_json() -> None:
    """Opt-in content: messages as role + parts; the output carries text and finish reason."""
    body = {
        "messages": [{"role": "system", "content": "Be brief"}, {"role": "user", "content": []}]
    }
    assert orjson.loads(genai.input_messages(body)) == [
        {"role": "system", "parts": [{"type": "text", "content": "Be brief"}]},
        {"role": "user", "parts": []},
    ]
    assert orjson.loads(genai.output_messages(CHECKPOINT)) == [
        {
            "role": "assistant",
            "parts": [{"type": "text", "content": "Hello there"}],
            "finish_reason": "stop",
        }
    ]


def test_names_and_pseudonyms() -> None:
    """Span name is "{operation} {model}"; the user hash is stable and not the id."""
    assert genai.span_name("gpt-4o") == "chat gpt-4o"
    assert genai.user_hash("alice") == hashlib.sha256(b"alice").hexdigest()[:16]
    assert "alice" not in genai.user_hash("alice")
    attributes = genai.sluice_attributes(stream_id="s", user_id="alice", tenant="t", attempt=2)
    assert attributes["sluice.retry.attempt"] == 2
    assert attributes["sluice.user.hash"] == genai.user_hash("alice")
