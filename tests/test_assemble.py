"""Converting completions between the streamed and the JSON form (for cache hits)."""

from __future__ import annotations

from typing import Any

import orjson

from service.assemble import (
    assemble,
    chunks,
    convertible,
    is_usage_only,
    merge_calls,
    usage_chunk,
)

BASE = {
    "id": "chatcmpl-1",
    "object": "chat.completion.chunk",
    "created": 7,
    "model": "gpt-4o",
    "system_fingerprint": "fp_1",
}
USAGE = {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13}


def chunk(index: int, delta: dict[str, Any], finish: str | None = None) -> bytes:
    choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
    return orjson.dumps({**BASE, "choices": [choice]})


TOOL_STREAM = [
    chunk(0, {"role": "assistant", "content": None}),
    chunk(0, {"tool_calls": [{"index": 0, "id": "call_a", "type": "function",
                              "function": {"name": "lookup", "arguments": ""}}]}),
    chunk(0, {"tool_calls": [{"index": 0, "function": {"arguments": '{"q": '}}]}),
    chunk(0, {"tool_calls": [{"index": 1, "id": "call_b", "type": "function",
                              "function": {"name": "now", "arguments": "{}"}}]}),
    chunk(0, {"tool_calls": [{"index": 0, "function": {"arguments": '"x"}'}}]}),
    chunk(0, {}, "tool_calls"),
]  # fmt: skip


def test_text_stream_with_two_choices_assembles_per_choice() -> None:
    """Each choice's deltas are concatenated in order; finish reasons kept per choice."""
    stream = [
        chunk(0, {"role": "assistant", "content": ""}),
        chunk(1, {"role": "assistant", "content": ""}),
        chunk(0, {"content": "Hel"}),
        chunk(1, {"content": "Bon"}),
        chunk(0, {"content": "lo"}),
        chunk(1, {"content": "jour"}),
        chunk(0, {}, "stop"),
        chunk(1, {}, "length"),
    ]
    body = orjson.loads(assemble(stream, USAGE))
    assert {k: body[k] for k in BASE} == {**BASE, "object": "chat.completion"}
    assert body["usage"] == USAGE
    assert [(c["message"]["content"], c["finish_reason"]) for c in body["choices"]] == [
        ("Hello", "stop"),
        ("Bonjour", "length"),
    ]
    assert body["choices"][0]["message"] == {
        "role": "assistant",
        "content": "Hello",
        "refusal": None,
    }


def test_tool_call_fragments_merge_by_index() -> None:
    """Fragments of interleaved calls join by index: id/name once, arguments concatenated."""
    message = orjson.loads(assemble(TOOL_STREAM, None))["choices"][0]["message"]
    assert message["content"] is None
    lookup = {"name": "lookup", "arguments": '{"q": "x"}'}
    assert message["tool_calls"] == [
        {"id": "call_a", "type": "function", "function": lookup},
        {"id": "call_b", "type": "function", "function": {"name": "now", "arguments": "{}"}},
    ]


def test_json_to_chunks_and_back_is_lossless() -> None:
    """A completion turned into chunks assembles back into the same completion."""
    completion = assemble(TOOL_STREAM, USAGE)
    streamed = chunks(completion)
    assert all(orjson.loads(c)["object"] == "chat.completion.chunk" for c in streamed)
    assert orjson.loads(streamed[-1])["choices"][0]["finish_reason"] == "tool_calls"
    assert orjson.loads(assemble(streamed, USAGE)) == orjson.loads(completion)


def test_refusal_survives_both_ways() -> None:
    """A refusal is concatenated like content and re-sent in the role chunk."""
    stream = [chunk(0, {"role": "assistant", "refusal": "I can"}), chunk(0, {"refusal": "'t."})]
    completion = assemble([*stream, chunk(0, {}, "stop")], None)
    assert orjson.loads(completion)["choices"][0]["message"]["refusal"] == "I can't."
    first = orjson.loads(chunks(completion)[0])["choices"][0]["delta"]
    assert first["refusal"] == "I can't."


def test_usage_chunk_carries_the_envelope() -> None:
    """The usage-only chunk has no choices, the usage, and the stream's id and model."""
    raw = usage_chunk(TOOL_STREAM[0], USAGE)
    assert is_usage_only(raw)
    assert not is_usage_only(TOOL_STREAM[0])
    assert orjson.loads(raw) == {**BASE, "choices": [], "usage": USAGE}


def test_only_answers_the_other_form_carries_whole_are_convertible() -> None:
    """Text, refusals and tool calls convert; a legacy function_call, annotations, audio
    or logprobs would be lost, so such an answer serves its own form only."""
    assert convertible(TOOL_STREAM, streaming=True)
    assert convertible([chunk(0, {"role": "assistant", "content": "hi", "refusal": None})], True)
    legacy = chunk(0, {"function_call": {"name": "lookup", "arguments": ""}})
    cited = chunk(0, {"content": "x", "annotations": [{"type": "url_citation"}]})
    assert not convertible([*TOOL_STREAM, legacy], streaming=True)
    assert not convertible([cited], streaming=True)
    with_logprobs = {**BASE, "choices": [{"index": 0, "delta": {}, "logprobs": {"content": []}}]}
    assert not convertible([orjson.dumps(with_logprobs)], streaming=True)
    message = {"role": "assistant", "content": "hi", "refusal": None, "annotations": []}
    completion = {**BASE, "choices": [{"index": 0, "message": message, "logprobs": None}]}
    assert convertible([orjson.dumps(completion)], streaming=False)  # empty: nothing lost
    message["audio"] = {"id": "audio_1", "data": "AAAA"}
    assert not convertible([orjson.dumps(completion)], streaming=False)


def test_a_checkpoint_s_calls_merge_fragments_and_keep_whole_calls() -> None:
    """Streamed fragments (with an ``index``) become one call each, in index order; calls
    from a whole message (no index) stay as they are."""
    fragments = [
        {"index": 1, "id": "c2", "type": "function", "function": {"name": "b", "arguments": ""}},
        {"index": 0, "id": "c1", "type": "function", "function": {"name": "a", "arguments": ""}},
        {"index": 0, "function": {"arguments": '{"x":'}},
        {"index": 1, "function": {"arguments": "{}"}},
        {"index": 0, "function": {"arguments": " 1}"}},
    ]
    assert merge_calls(fragments) == [
        {"id": "c1", "type": "function", "function": {"name": "a", "arguments": '{"x": 1}'}},
        {"id": "c2", "type": "function", "function": {"name": "b", "arguments": "{}"}},
    ]
    whole = [{"id": "c9", "type": "function", "function": {"name": "z", "arguments": "{}"}}]
    assert merge_calls(whole) == whole
