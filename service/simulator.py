"""The built-in simulated provider: an OpenAI-compatible upstream that can misbehave on demand.

It serves ``POST /v1/chat/completions`` (JSON and SSE) and ``GET /v1/models``. The text is
derived deterministically from the prompt; every word of it is one token in both
cl100k_base and o200k_base, so ``usage.completion_tokens`` equals the chunk count.

Behaviour is steered per request by a directive in the last user message, e.g.
``[sim chunks=50 delay_ms=20 fail=429 retry_after=2]`` (see ``Directive``). It keeps its own
counts of completed and aborted streams (``SimStats``) so tests can assert what the provider
saw, waiting on a condition rather than sleeping.

Runs inside ``make run`` on an ephemeral loopback port, and alone with
``python -m service.simulator --port N`` for the benchmark.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import math
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import orjson
from aiohttp import web

SIM_STATS: web.AppKey[SimStats] = web.AppKey("sim_stats")
SIM_MODELS = ("gpt-4o-mini", "gpt-4o", "gpt-4.1-mini")

MAX_CHUNKS = 100_000  # the simulator shares the gateway's loop in `make run`: bound its work
MAX_DELAY_MS = 3_600_000.0
MAX_CHOICES = 128  # OpenAI's own limit on ``n``
MAX_CHUNK_EVENTS = 200_000  # chunks x n: one request's answer, bounded as a whole
YIELD_EVERY = 256  # positions sent without a delay before the loop gets a turn
# ``[sim ...]``: what is inside is read strictly, name=value pairs apart by spaces, so a
# misspelt directive is a 400, never a default quietly served.
_DIRECTIVE = re.compile(r"\[sim\b(?P<args>[^\]]*)\]")
_PAIR = re.compile(r"[a-z_]+=[\w.\-]+")
# Each is a single token, with its leading space, in cl100k_base and o200k_base.
_WORDS = (
    " the",
    " river",
    " stone",
    " water",
    " light",
    " over",
    " and",
    " through",
    " valley",
    " quiet",
    " morning",
    " bright",
    " cold",
    " warm",
    " long",
    " road",
    " sound",
    " field",
    " small",
    " green",
    " open",
    " slow",
    " deep",
    " clear",
)


@dataclass(slots=True)
class Directive:
    """Per-request behaviour; every field is settable as ``name=value`` in ``[sim ...]``."""

    chunks: int = 12  # content chunks, one token each
    delay_ms: float = 0.0  # between chunks
    first_delay_ms: float = 0.0  # before the first chunk (after headers)
    after_role_ms: float = 0.0  # streamed: after the role chunk, before the first word
    header_delay_ms: float = 0.0  # before the response headers
    fail: int = 0  # answer with this HTTP status instead
    retry_after: float | None = None  # Retry-After on a failure
    retry_after_ms: float | None = None  # retry-after-ms on a failure (OpenAI's own header)
    fail_times: int = 0  # with ``key``: misbehave only the first N attempts, then succeed
    key: str = ""  # groups attempts for ``fail_times``
    reset_after: int = -1  # drop the connection after N chunks (not streamed: mid-body)
    stall_after: int = -1  # stop sending (but keep the socket) after N chunks (or mid-body)
    malformed_after: int = -1  # send a chunk that is not JSON after N chunks
    finish: str = "stop"
    created: int = 0  # a fixed ``created`` timestamp (0: now), for byte-exact comparisons
    tool_call: str = ""  # after the text, stream a call to this function (finish: tool_calls)
    error_after: int = -1  # send an OpenAI ``data: {"error": ...}`` event after N chunks, stop
    echo_key: int = 0  # 1: error messages quote the Authorization header received (leak tests)
    usage: int = 1  # 0: never stream usage, as OpenAI-compatible servers ignoring stream_options

    @classmethod
    def parse(cls, text: str) -> Directive:
        found = _DIRECTIVE.search(text)
        directive = cls()
        if found is None:
            return directive
        kinds = {f.name: f.type for f in fields(cls)}
        given: set[str] = set()
        for pair in found.group("args").split():
            if not _PAIR.fullmatch(pair):
                raise ValueError(f"sim directives are name=value pairs: {pair!r} is not one")
            name, _, raw = pair.partition("=")
            if name not in kinds:
                raise ValueError(f"unknown sim directive {name!r}")
            if name in given:  # which one was meant? not the last by accident
                raise ValueError(f"sim directive {name!r} is given twice")
            given.add(name)
            setattr(directive, name, _coerce(name, str(kinds[name]), raw))
        directive._check("fail" in given)
        return directive

    def _check(self, fail_given: bool = False) -> None:
        """Refuse values that would make no sense, or let one request hog a shared loop."""
        _bounded("chunks", self.chunks, 0, MAX_CHUNKS)
        for name in ("delay_ms", "first_delay_ms", "header_delay_ms", "after_role_ms"):
            _bounded(name, getattr(self, name), 0, MAX_DELAY_MS)
        if (self.fail or fail_given) and not 400 <= self.fail <= 599:
            raise ValueError("sim directive fail must be an HTTP error status, 400-599")
        if not self.fail and (self.retry_after is not None or self.retry_after_ms is not None):
            raise ValueError("sim directives retry_after and retry_after_ms go with fail")
        if self.retry_after is not None:
            _bounded("retry_after", self.retry_after, 0, MAX_DELAY_MS / 1000)
        if self.retry_after_ms is not None:
            _bounded("retry_after_ms", self.retry_after_ms, 0, MAX_DELAY_MS)
        _bounded("fail_times", self.fail_times, 0, MAX_CHUNKS)
        for name in ("reset_after", "stall_after", "malformed_after", "error_after"):
            _bounded(name, getattr(self, name), -1, self.chunks)  # after the last chunk at most
        _bounded("echo_key", self.echo_key, 0, 1)
        _bounded("usage", self.usage, 0, 1)
        _bounded("created", self.created, 0, 2**31)


def _coerce(name: str, kind: str, raw: str) -> Any:
    try:
        if kind == "int":
            return int(raw)
        if "float" in kind:
            return float(raw)
    except ValueError:
        raise ValueError(f"sim directive {name}={raw!r} is not a number") from None
    return raw


def _bounded(name: str, value: float, low: float, high: float) -> None:
    if not (math.isfinite(value) and low <= value <= high):
        raise ValueError(f"sim directive {name} must be between {low:g} and {high:g}")


class SimStats:
    """What the provider saw: counts plus a condition to wait on instead of sleeping."""

    def __init__(self) -> None:
        self.requests = 0
        self.started = 0
        self.completed = 0
        self.aborted = 0
        self.chunks_sent: list[int] = []  # per aborted stream
        self.open = 0
        self.resets = 0
        self.attempts: dict[str, int] = {}
        self.authorizations: list[str] = []  # the Authorization header of each chat request
        self.traceparents: list[str] = []  # the W3C traceparent header of each chat request
        self.last_body: dict[str, Any] | None = None  # the last chat request, as parsed
        self._changed = asyncio.Event()

    def bump(self, **changes: int) -> None:
        for name, delta in changes.items():
            setattr(self, name, getattr(self, name) + delta)
        self._changed.set()  # wakes every current waiter; they re-check their predicate
        self._changed.clear()

    async def wait_for(self, predicate: Callable[[SimStats], bool], limit_s: float = 10.0) -> None:
        """Return once ``predicate(self)`` holds; the timeout is a safety net, not a clock."""
        async with asyncio.timeout(limit_s):
            while not predicate(self):
                await self._changed.wait()


def prompt_text(body: dict[str, Any]) -> str:
    parts: list[str] = []
    for message in body.get("messages") or []:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            texts = (p.get("text") for p in content if isinstance(p, dict))
            parts.extend(text for text in texts if isinstance(text, str))
    return "\n".join(parts)


def last_user_text(body: dict[str, Any]) -> str:
    for message in reversed(body.get("messages") or []):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            return content if isinstance(content, str) else prompt_text({"messages": [message]})
    return ""


def completion_words(prompt: str, count: int) -> list[str]:
    """The deterministic reply to ``prompt``: ``count`` single-token words."""
    seed = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "big")
    rng = random.Random(seed)
    return [rng.choice(_WORDS) for _ in range(count)]


def approx_prompt_tokens(body: dict[str, Any]) -> int:
    """OpenAI's chat overhead (3 per message + 3 for the reply) plus a word-ish count."""
    messages = body.get("messages") or []
    return 3 + sum(3 + len(re.findall(r"\w+|[^\w\s]", _msg_text(m))) for m in messages)


def _msg_text(message: Any) -> str:
    return prompt_text({"messages": [message]}) if isinstance(message, dict) else ""


class Simulator:
    """Request handlers of the simulated provider; ``prompt_tokens`` is injectable."""

    def __init__(self, prompt_tokens: Callable[[dict[str, Any]], int] = approx_prompt_tokens):
        self._prompt_tokens = prompt_tokens

    async def models(self, request: web.Request) -> web.Response:
        data = [
            {"id": m, "object": "model", "created": 0, "owned_by": "sluice-sim"} for m in SIM_MODELS
        ]
        return _json({"object": "list", "data": data})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        stats = request.app[SIM_STATS]
        stats.authorizations.append(request.headers.get("Authorization", ""))
        stats.traceparents.append(request.headers.get("traceparent", ""))
        stats.bump(requests=1)
        try:
            body = orjson.loads(await request.read())
            if not isinstance(body, dict):
                raise ValueError("the request body must be a JSON object")
            stats.last_body = body
            _check_shapes(body)
            directive = Directive.parse(last_user_text(body))
            choices = _choices(body)
            if directive.chunks * choices > MAX_CHUNK_EVENTS:
                raise ValueError(f"chunks x n must be at most {MAX_CHUNK_EVENTS}")
        except ValueError as exc:
            return _error(400, str(exc), "invalid_request_error")
        misbehave = _misbehaves(directive, stats)
        if directive.fail and misbehave:  # at once: header_delay_ms holds the answer only
            return self._failure(directive, _echo(request, directive))
        prompt = prompt_text(body)
        # Choice 0 is the reply to the prompt; choice i (n > 1) the reply to "prompt#i".
        replies = [
            completion_words(f"{prompt}#{i}" if i else prompt, directive.chunks)
            for i in range(choices)
        ]
        usage = self._usage(body, directive.chunks * choices)
        try:
            await _sleep_ms(directive.header_delay_ms)
            if not body.get("stream"):
                await _sleep_ms(directive.first_delay_ms)
                completion = _json(_completion(body, replies, usage, directive))
                broken = directive.reset_after >= 0 or directive.stall_after >= 0
                if broken and misbehave:
                    return await _broken(request, completion, reset=directive.reset_after >= 0)
                return completion
        except asyncio.CancelledError:  # the gateway hung up before we answered
            stats.chunks_sent.append(0)
            stats.bump(aborted=1)
            raise
        return await self._stream(request, body, replies, usage, directive)

    def _failure(self, directive: Directive, echo: str) -> web.Response:
        headers = {}
        if directive.retry_after is not None:
            headers["Retry-After"] = f"{directive.retry_after:g}"
        if directive.retry_after_ms is not None:
            headers["retry-after-ms"] = f"{directive.retry_after_ms:g}"
        kind = "rate_limit_error" if directive.fail == 429 else "server_error"
        if directive.fail < 500 and directive.fail != 429:
            kind = "invalid_request_error"
        message = f"simulated failure {directive.fail}{echo}"
        code = "rate_limit_exceeded" if directive.fail == 429 else None  # as OpenAI sends it
        return _error(directive.fail, message, kind, headers, code=code, echo=echo)

    def _usage(self, body: dict[str, Any], completion: int) -> dict[str, int]:
        prompt = self._prompt_tokens(body)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }

    async def _stream(
        self,
        request: web.Request,
        body: dict[str, Any],
        replies: list[list[str]],
        usage: dict[str, int],
        directive: Directive,
    ) -> web.StreamResponse:
        stats = request.app[SIM_STATS]
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        stats.bump(started=1, open=1)
        progress = [0]
        try:
            await self._send_chunks(
                response, body, replies, usage, directive, progress, _echo(request, directive)
            )
        except _Reset:
            stats.bump(resets=1, open=-1)
            if request.transport is not None:
                request.transport.abort()
            return response
        except BaseException:
            stats.chunks_sent.append(progress[0])
            stats.bump(aborted=1, open=-1)
            raise
        stats.bump(completed=1, open=-1)
        return response

    async def _send_chunks(
        self,
        response: web.StreamResponse,
        body: dict[str, Any],
        replies: list[list[str]],
        usage: dict[str, int],
        directive: Directive,
        progress: list[int],
        echo: str = "",
    ) -> None:
        """Send the stream, counting content positions in ``progress[0]``.

        With ``n`` > 1 the choices' chunks interleave, one word of each per position, as
        OpenAI sends them; the directive's counts are positions.
        """
        base = _chunk_base(body, directive)
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        include_usage = include_usage and bool(directive.usage)
        await _sleep_ms(directive.first_delay_ms)
        role = {"role": "assistant", "content": ""}
        await response.write(
            b"".join(_event(base, role, None, include_usage, i) for i in range(len(replies)))
        )
        await _sleep_ms(directive.after_role_ms)  # a long prefill, or a model thinking
        for index in range(directive.chunks + 1):
            # Misbehaviour after ``index`` chunks (after all of them: before the finish).
            if index == directive.reset_after:
                raise _Reset
            if index == directive.stall_after:
                await asyncio.Event().wait()  # hold the socket open, send nothing, forever
            if index == directive.malformed_after:
                await response.write(b'data: {"id": "broken", "choices": [\n\n')
            if index == directive.error_after:
                await response.write(_error_event(echo))
                return
            if index == directive.chunks:
                break
            if index and directive.delay_ms:
                await _sleep_ms(directive.delay_ms)
            elif index % YIELD_EVERY == YIELD_EVERY - 1:
                await asyncio.sleep(0)  # a long undelayed stream lets the loop's others in
            for choice, words in enumerate(replies):
                await response.write(
                    _event(base, {"content": words[index]}, None, include_usage, choice)
                )
            progress[0] = index + 1
        for choice in range(len(replies)):
            for delta in _tool_call_deltas(directive.tool_call):
                await response.write(_event(base, delta, None, include_usage, choice))
            await response.write(_event(base, {}, _finish(directive), include_usage, choice))
        if include_usage:
            await response.write(
                b"data: " + orjson.dumps({**base, "choices": [], "usage": usage}) + b"\n\n"
            )
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()


def _misbehaves(directive: Directive, stats: SimStats) -> bool:
    """False once ``fail_times`` attempts with the directive's ``key`` have misbehaved."""
    if not directive.fail_times:
        return True
    seen = stats.attempts.get(directive.key, 0)
    stats.attempts[directive.key] = seen + 1
    return seen < directive.fail_times


async def _broken(request: web.Request, whole: web.Response, *, reset: bool) -> web.StreamResponse:
    """A non-streamed answer cut off: its headers and half its body, then a reset or silence."""
    stats = request.app[SIM_STATS]
    body = whole.body
    assert isinstance(body, bytes)
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    response.content_length = len(body)
    await response.prepare(request)
    await response.write(body[: len(body) // 2])
    if not reset:
        await asyncio.Event().wait()  # hold the socket open, send nothing, forever
    stats.bump(resets=1)
    if request.transport is not None:
        request.transport.abort()
    return response


def _echo(request: web.Request, directive: Directive) -> str:
    """With ``echo_key=1``, a careless provider's habit: quoting the credential it got (in
    an error's message, and in its ``param`` and ``code`` too)."""
    if not directive.echo_key:
        return ""
    return f" (received Authorization: {request.headers.get('Authorization', '')})"


def _error_event(echo: str) -> bytes:
    error = {"message": f"simulated mid-stream error{echo}", "type": "server_error"}
    echoed = echo.strip() or None
    return b"data: " + orjson.dumps({"error": {**error, "param": echoed, "code": echoed}}) + b"\n\n"


class _Reset(Exception):
    """Raised inside the simulator to drop the connection mid-stream."""


def _chunk_base(body: dict[str, Any], directive: Directive) -> dict[str, Any]:
    digest = hashlib.sha256(prompt_text(body).encode()).hexdigest()[:24]
    return {
        "id": f"chatcmpl-sim{digest}",
        "object": "chat.completion.chunk",
        "created": directive.created or int(time.time()),
        "model": str(body.get("model") or SIM_MODELS[0]),
        "system_fingerprint": "fp_sluice_sim",
    }


def _tool_call_deltas(name: str) -> list[dict[str, Any]]:
    """A function call split the way OpenAI streams it: id and name first, then arguments."""
    if not name:
        return []
    head = {"index": 0, "id": f"call_sim_{name}", "type": "function"}
    return [
        {"tool_calls": [{**head, "function": {"name": name, "arguments": ""}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": '{"query": '}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": '"sim"}'}}]},
    ]


def _finish(directive: Directive) -> str:
    return "tool_calls" if directive.tool_call and directive.finish == "stop" else directive.finish


def _event(
    base: dict[str, Any],
    delta: dict[str, Any],
    finish: str | None,
    usage_field: bool,
    choice: int = 0,
) -> bytes:
    chunk: dict[str, Any] = {
        **base,
        "choices": [{"index": choice, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }
    if usage_field:
        chunk["usage"] = None
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


def _completion(
    body: dict[str, Any], replies: list[list[str]], usage: dict[str, int], d: Directive
) -> dict[str, Any]:
    base = _chunk_base(body, d)
    choices = [
        {
            "index": index,
            "message": _message("".join(words), d.tool_call),
            "logprobs": None,
            "finish_reason": _finish(d),
        }
        for index, words in enumerate(replies)
    ]
    return {**base, "object": "chat.completion", "choices": choices, "usage": usage}


def _message(text: str, tool_call: str) -> dict[str, Any]:
    """A whole answer: the text, and the call the stream would have made (``tool_call``)."""
    message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
    if tool_call:
        function = {"name": tool_call, "arguments": '{"query": "sim"}'}
        message["tool_calls"] = [
            {"id": f"call_sim_{tool_call}", "type": "function", "function": function}
        ]
    return message


def _check_shapes(body: dict[str, Any]) -> None:
    """The fields the simulator reads, of the types it reads them as (else a 400)."""
    if not isinstance(body.get("messages"), list):
        raise ValueError("messages must be a list")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise ValueError("stream_options must be an object")


def _choices(body: dict[str, Any]) -> int:
    """``n``: how many independent replies to generate."""
    n = body.get("n")
    if n is None:
        return 1
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_CHOICES:
        raise ValueError(f"n must be an integer between 1 and {MAX_CHOICES}")
    return n


def _error(
    status: int,
    message: str,
    kind: str,
    headers: dict[str, str] | None = None,
    *,
    code: str | None = None,
    echo: str = "",
) -> web.Response:
    echoed = echo.strip() or None
    error = {"message": message, "type": kind, "param": echoed, "code": echoed or code}
    return _json({"error": error}, status, headers)


def _json(
    payload: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=orjson.dumps(payload), status=status, headers=headers, content_type="application/json"
    )


async def _sleep_ms(milliseconds: float) -> None:
    if milliseconds > 0:
        await asyncio.sleep(milliseconds / 1000)


def create_simulator_app(simulator: Simulator | None = None) -> web.Application:
    """The simulated provider as an aiohttp application (mount at any port)."""
    sim = simulator or Simulator()
    app = web.Application()
    app[SIM_STATS] = SimStats()
    app.router.add_post("/v1/chat/completions", sim.chat)
    app.router.add_get("/v1/models", sim.models)
    app.router.add_get("/stats", stats_json)
    return app


async def stats_json(request: web.Request) -> web.Response:
    """``GET /stats``: the ``SimStats`` counters, for a provider running in its own process."""
    stats = request.app[SIM_STATS]
    return _json(
        {
            "requests": stats.requests,
            "started": stats.started,
            "completed": stats.completed,
            "aborted": stats.aborted,
            "open": stats.open,
            "resets": stats.resets,
            "chunks_sent": stats.chunks_sent,
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description="Sluice's simulated OpenAI-compatible provider")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081)
    args = parser.parse_args()
    from .tokens import count_body  # usage counted as the gateway counts: with tiktoken

    web.run_app(
        create_simulator_app(Simulator(prompt_tokens=count_body)),
        host=args.host,
        port=args.port,
        handler_cancellation=True,
        print=None,
    )


if __name__ == "__main__":
    main()
