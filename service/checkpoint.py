"""Checkpoints: the durable summary of a stream once it ends, and where they are kept.

``CheckpointStore`` is the storage seam: the in-memory store below is the default and the
test double; a shared store (Redis) implements the same protocol for many replicas.
Completion tokens come from the provider's usage when it arrived, else are counted from
the text and tool-call deltas generated so far, so a partial stream is never recorded as
zero (the ledger bills this same count).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Protocol, TypeGuard

from .assemble import merge_calls
from .stream import Progress, Stream, StreamStatus, function_text

TokenCounter = Callable[[str, str], int]  # (model, text) -> tokens
PromptCounter = Callable[[str, dict[str, Any]], int]  # (model, request body) -> tokens


@dataclass(frozen=True, slots=True)
class Checkpoint:
    stream_id: str
    user_id: str
    tenant: str
    key_id: str
    model: str
    response_model: str | None
    status: StreamStatus
    text: str
    tool_calls: list[Any]
    finish_reason: str | None
    chunks: int
    last_seq: int
    prompt_tokens: int
    completion_tokens: int
    usage_reported: bool
    error: dict[str, Any] | None
    created_at: float
    first_token_at: float | None
    ended_at: float | None

    def to_json(self) -> dict[str, Any]:
        """The public shape returned by ``GET /v1/streams/{id}``."""
        data = asdict(self)
        data["status"] = str(self.status)
        data["object"] = "sluice.stream"
        data["id"] = data.pop("stream_id")
        return data


def checkpoint_of(
    stream: Stream,
    count_text: TokenCounter,
    count_prompt: PromptCounter,
    *,
    counted: bool = True,
    scrub: Callable[[str], str] | None = None,
) -> Checkpoint:
    """Summarise ``stream`` as it stands; counts tokens when the provider did not. With
    ``counted=False`` (the last resort, after counting failed) they are 0, and the tool
    calls are left out."""
    progress = stream.progress
    counts = usage_counts(progress.usage)
    reported = counts is not None
    if counts is not None:
        prompt, completion = counts
    elif counted:  # no usage, or none we can trust: count what was sent and generated,
        served = stream.served_model or stream.model  # in the tokenizer of what served it
        known = stream.prompt_counts.get(served)  # admission's (off the loop when large)
        prompt = known if known is not None else count_prompt(served, stream.body)
        completion = _generated_tokens(stream, served, count_text)
    else:
        prompt = completion = 0
    return Checkpoint(
        stream_id=stream.id,
        user_id=stream.owner.user_id,
        tenant=stream.owner.tenant,
        key_id=stream.owner.key_id,
        model=stream.model,
        response_model=progress.response_model,
        status=stream.status,
        # ``scrub``: joined, a credential a provider split across chunks is whole here.
        text=scrub(progress.text) if scrub is not None else progress.text,
        tool_calls=_calls(progress, scrub) if counted else [],
        finish_reason=progress.finish_reason,
        chunks=progress.chunks,
        last_seq=stream.last_seq,
        prompt_tokens=prompt,
        completion_tokens=completion,
        usage_reported=reported,
        error=stream.error.payload()["error"] if stream.error else None,
        created_at=stream.created_at,
        first_token_at=stream.first_token_at,
        ended_at=stream.ended_at,
    )


def _calls(progress: Progress, scrub: Callable[[str], str] | None) -> list[Any]:
    """The tool calls, merged (streamed fragments joined), each function's name and
    arguments ``scrub``bed: copies, the progress's own left as they came."""
    calls = merge_calls(progress.tool_calls or ())
    if scrub is None:
        return calls
    return [_scrubbed_call(call, scrub) for call in calls]


def _scrubbed_call(call: Any, scrub: Callable[[str], str]) -> Any:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict):
        return call
    fields = {k: scrub(v) for k in ("name", "arguments") if isinstance(v := function.get(k), str)}
    return {**call, "function": {**function, **fields}}


def usage_counts(usage: dict[str, Any] | None) -> tuple[int, int] | None:
    """(prompt, completion) tokens from a provider's usage, if it has both as counts."""
    if not usage:
        return None
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if is_count(prompt) and is_count(completion):
        return prompt, completion
    return None


def is_count(value: object) -> TypeGuard[int]:
    """A non-negative integer (not a bool, a float or a string)."""
    return type(value) is int and value >= 0


def _generated_tokens(stream: Stream, model: str, count_text: TokenCounter) -> int:
    """Every choice's text and tool calls (``n`` > 1 generates, and costs, each of them),
    and the reasoning a provider streamed as such (vLLM, llama.cpp, Ollama, DeepSeek), in
    ``model``'s tokens."""
    progress = stream.progress
    text = progress.text + "".join(progress.unseen or ())
    calls = list(progress.tool_calls or ())
    if progress.others:  # (deltas checked to be objects; their fields are the provider's)
        text += "".join(_other_text(d) for d in progress.others)
        calls += [c for d in progress.others for c in _listed(d.get("tool_calls"))]
    tokens = count_text(model, text)
    if calls:  # a function call's name and arguments are generated tokens too
        tokens += count_text(model, tool_call_text(calls))
    return tokens


def _other_text(delta: dict[str, Any]) -> str:
    """What a choice past 0 generated besides tool calls: text or refusal, reasoning, a
    legacy function call."""
    parts = (
        delta.get("content") or delta.get("refusal"),
        delta.get("reasoning_content") or delta.get("reasoning"),
    )
    return "".join(str(p) for p in parts if p) + function_text(delta.get("function_call"))


def _listed(value: Any) -> list[Any]:
    return value if type(value) is list else []


def tool_call_text(tool_calls: list[Any]) -> str:
    """The names and argument fragments of streamed tool-call deltas, joined."""
    return "".join(function_text(c.get("function")) for c in tool_calls if isinstance(c, dict))


class CheckpointStore(Protocol):
    """Where checkpoints live until they expire."""

    async def put(self, checkpoint: Checkpoint, ttl_s: float) -> None: ...

    async def get(self, stream_id: str) -> Checkpoint | None: ...


class MemoryCheckpointStore:
    """Process-local checkpoints with expiry; bounded so a flood cannot exhaust memory."""

    def __init__(self, *, max_entries: int = 100_000, clock: Callable[[], float] = time.monotonic):
        self._entries: OrderedDict[str, tuple[float, Checkpoint]] = OrderedDict()
        self._max = max_entries
        self._clock = clock

    async def put(self, checkpoint: Checkpoint, ttl_s: float) -> None:
        self._entries[checkpoint.stream_id] = (self._clock() + ttl_s, checkpoint)
        self._entries.move_to_end(checkpoint.stream_id)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)

    async def get(self, stream_id: str) -> Checkpoint | None:
        entry = self._entries.get(stream_id)
        if entry is None:
            return None
        if entry[0] <= self._clock():
            del self._entries[stream_id]
            return None
        return entry[1]


def approx_text_tokens(model: str, text: str) -> int:
    """A fallback counter (about 4 characters a token) until tiktoken is wired in."""
    return (len(text) + 3) // 4


def approx_prompt_tokens(model: str, body: dict[str, Any]) -> int:
    messages = body.get("messages") or []
    chars = sum(len(str(m.get("content") or "")) for m in messages if isinstance(m, dict))
    return 3 + 4 * len(messages) + (chars + 3) // 4


def billed_tokens(stream: Stream, checkpoint: Checkpoint) -> tuple[int, int]:
    """(prompt, completion) tokens as the ledger bills them (the telemetry reports the
    same): the provider's usage when it came; else the counted prompt and text when the
    provider may have worked on the request (it sent something, or the request had gone out
    when the stream ended); else nothing: it was never asked, or it refused or failed
    before answering, however the stream then ended (client gone, cancelled, ...)."""
    billable = checkpoint.usage_reported or stream.progress.chunks or stream.provider_engaged
    if not billable:
        return 0, 0
    return checkpoint.prompt_tokens, checkpoint.completion_tokens
