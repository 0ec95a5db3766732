"""Converting a chat completion between its two wire forms, so one cached answer serves both.

``assemble`` folds a stream's chunk payloads into the ``chat.completion`` JSON OpenAI would
have returned for the same request: per choice, content and refusal are concatenated and
tool-call fragments merged by their ``index`` (id, type and name from the first fragment,
``arguments`` concatenated). ``chunks`` does the reverse: one role-and-content chunk per
choice, one chunk with its tool calls, one with its finish reason. ``usage_chunk`` is the
final usage-only chunk sent to clients that asked for ``include_usage``. ``merge_calls``
gives a checkpoint the tool calls streamed so far, merged the same way.

Pure: bytes in, bytes out, nothing else imported. Off the hot path (cache fills and hits).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import orjson

from .jsonbytes import dumps_kept

_ENVELOPE = ("id", "object", "created", "model", "system_fingerprint", "service_tier")
_CARRIED = frozenset({"role", "content", "refusal", "tool_calls"})  # what conversion keeps


def assemble(payloads: Iterable[bytes], usage: dict[str, Any] | None) -> bytes:
    """The JSON completion equivalent to a stream of chunk payloads."""
    envelope: dict[str, Any] | None = None
    choices: dict[int, dict[str, Any]] = {}
    for raw in payloads:
        chunk = orjson.loads(raw)
        if envelope is None:
            envelope = _envelope(chunk, "chat.completion")
        for choice in chunk.get("choices") or ():
            _fold(choices, choice)
    body = envelope or {"object": "chat.completion"}
    body["choices"] = [_finished(choices[index]) for index in sorted(choices)]
    body["usage"] = usage
    return dumps_kept(body)


def chunks(completion: bytes) -> list[bytes]:
    """Stream chunk payloads equivalent to a JSON completion (without usage or [DONE])."""
    body = orjson.loads(completion)
    base = _envelope(body, "chat.completion.chunk")
    out: list[bytes] = []
    for choice in body.get("choices") or ():
        index = choice.get("index", 0)
        message = choice.get("message") or {}
        delta = {"role": message.get("role") or "assistant", "content": message.get("content")}
        if message.get("refusal") is not None:
            delta["refusal"] = message["refusal"]
        out.append(_chunk(base, index, delta, None))
        calls = message.get("tool_calls")
        if calls:
            indexed = [{"index": i, **call} for i, call in enumerate(calls)]
            out.append(_chunk(base, index, {"tool_calls": indexed}, None))
        out.append(_chunk(base, index, {}, choice.get("finish_reason")))
    return out


def convertible(payloads: Iterable[bytes], streaming: bool) -> bool:
    """Whether the other wire form carries all of this answer (``streaming``: chunk
    payloads, else one completion): text, refusals and tool calls, nothing else. A legacy
    ``function_call``, ``annotations``, ``audio`` or ``logprobs`` would be lost."""
    part = "delta" if streaming else "message"
    for raw in payloads:
        for choice in orjson.loads(raw).get("choices") or ():
            if choice.get("logprobs") or not _CARRIED.issuperset(
                name for name, value in (choice.get(part) or {}).items() if value
            ):
                return False
    return True


def usage_chunk(template: bytes, usage: dict[str, Any]) -> bytes:
    """The usage-only chunk, with the envelope (id, model, ...) of ``template``."""
    base = _envelope(orjson.loads(template), "chat.completion.chunk")
    return dumps_kept({**base, "choices": [], "usage": usage})


def is_usage_only(payload: bytes) -> bool:
    chunk = orjson.loads(payload)
    return not chunk.get("choices") and chunk.get("usage") is not None


def _envelope(source: dict[str, Any], kind: str) -> dict[str, Any]:
    """The top-level fields of ``source`` in OpenAI's order, with ``object`` set to ``kind``."""
    return {
        name: kind if name == "object" else source[name]
        for name in _ENVELOPE
        if name in source or name == "object"
    }


def _chunk(base: dict[str, Any], index: int, delta: dict[str, Any], finish: str | None) -> bytes:
    choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
    return dumps_kept({**base, "choices": [choice]})


def _fold(choices: dict[int, dict[str, Any]], choice: dict[str, Any]) -> None:
    index = choice.get("index", 0)
    slot = choices.get(index)
    if slot is None:
        message = {"role": "assistant", "content": None, "refusal": None}
        slot = choices[index] = {"index": index, "message": message, "finish_reason": None}
    message = slot["message"]
    delta = choice.get("delta") or {}
    if delta.get("role"):
        message["role"] = delta["role"]
    for name in ("content", "refusal"):
        if delta.get(name) is not None:
            message[name] = (message[name] or "") + delta[name]
    for fragment in delta.get("tool_calls") or ():
        _fold_call(message.setdefault("tool_calls", {}), fragment)
    if choice.get("finish_reason"):
        slot["finish_reason"] = choice["finish_reason"]


def merge_calls(calls: Iterable[Any]) -> list[Any]:
    """Tool calls as a message has them: streamed fragments (they carry an ``index``)
    merged, as ``assemble`` merges them; whole calls (a message's, no index) as they are."""
    merged: dict[int, dict[str, Any]] = {}
    whole = []
    for call in calls:
        if isinstance(call, dict) and type(call.get("index")) is int:
            _fold_call(merged, call)
        else:
            whole.append(call)
    return whole + [merged[i] for i in sorted(merged)]


def _fold_call(calls: dict[int, dict[str, Any]], fragment: dict[str, Any]) -> None:
    """One fragment into its call; fields of the wrong type (the provider's) are left out."""
    call = calls.setdefault(
        fragment.get("index", 0), {"id": None, "type": "function", "function": {}}
    )
    if fragment.get("id"):
        call["id"] = fragment["id"]
    if fragment.get("type"):
        call["type"] = fragment["type"]
    function = fragment.get("function")
    if not isinstance(function, dict):
        return
    target = call["function"]
    name, arguments = function.get("name"), function.get("arguments")
    if isinstance(name, str) and name:
        target["name"] = target.get("name", "") + name
    if isinstance(arguments, str):
        target["arguments"] = target.get("arguments", "") + arguments


def _finished(slot: dict[str, Any]) -> dict[str, Any]:
    message = slot["message"]
    calls = message.get("tool_calls")
    if calls:
        message["tool_calls"] = [calls[i] for i in sorted(calls)]
        if not message["content"]:
            message["content"] = None  # OpenAI sends null content alongside tool calls
    return {
        "index": slot["index"],
        "message": message,
        "logprobs": None,
        "finish_reason": slot["finish_reason"],
    }
