"""What real OpenAI-compatible servers do that the simulator does not: a stream without
``[DONE]``, chunks of the wrong shape, a 200 that is an error, other error-body shapes, a
401 about our own key, a malformed model list. A stand-in provider (a small aiohttp app on
a real port) answers each test's way; the gateway in front of it is the real one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from service import generation, tokens, upstream
from service.appkeys import GATE, RESILIENCE, STREAMS
from service.settings import Settings
from tests.conftest import AUTH, GatewayFactory, chat_body, with_provider
from tests.resilient import with_resilience
from tests.streamwire import LoopClock
from tests.test_ledger import finished
from tests.wire import assert_openai_error, sse_data

URL = "/v1/chat/completions"
Answer = Callable[[web.Request], Awaitable[web.StreamResponse]]

CHUNK = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m"}


def _event(payload: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def _delta(content: str | None, finish: str | None = None) -> bytes:
    delta = {"content": content} if content is not None else {}
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    return _event({**CHUNK, "choices": [choice]})


async def _stream(request: web.Request, *events: bytes) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for event in events:
        await response.write(event)
    await response.write_eof()
    return response


async def _error_of(response: Any, stream: bool) -> dict[str, Any]:
    """The error a request ended with: its stream's last event, or its 502's body."""
    if stream:
        *_, last = sse_data(await response.text())
        body = orjson.loads(last)
    else:
        assert response.status == 502
        body = await response.json()
    error: dict[str, Any] = body["error"]
    return error


async def _gateway(
    aiohttp_server: Any, gateway: GatewayFactory, settings: Settings, answer: Answer
) -> TestClient[Any, Any]:
    app = web.Application()
    app.router.add_post("/v1/chat/completions", answer)
    app.router.add_get("/v1/models", answer)
    provider = await aiohttp_server(app)
    custom = with_provider(settings, base_url=str(provider.make_url("/v1")), models=())
    client: TestClient[Any, Any] = await gateway(custom)
    return client


@pytest.mark.parametrize("stream", [True, False])
@pytest.mark.parametrize("broken", ["129 headers", "gzip"])
async def test_an_answer_begun_and_unreadable_is_billed_and_never_asked_again(
    aiohttp_server: Any, gateway: GatewayFactory, settings: Settings, stream: bool, broken: str
) -> None:
    """A 200 whose head the gateway refuses (too many headers), or whose body comes encoded
    when identity was asked for: the provider answered, so it may have generated (a JSON
    answer is whole before its head goes). A 502, its prompt billed, and no second call."""
    calls: list[bytes] = []

    async def answer(request: web.Request) -> web.StreamResponse:
        calls.append(await request.read())
        if broken == "gzip":
            headers = {"Content-Encoding": "gzip", "Content-Type": "application/json"}
            return web.Response(body=b"\x1f\x8b not really", headers=headers)
        return web.Response(body=b"{}", headers={f"X-N-{n}": "v" for n in range(129)})

    custom = with_resilience(settings, retry_max_attempts=3)
    client = await _gateway(aiohttp_server, gateway, custom, answer)
    response = await client.post(URL, json=chat_body("hi", stream=stream), headers=AUTH)
    assert response.status == 502
    error = assert_openai_error(await response.json())
    assert error["code"] == "provider_protocol_error"
    assert ("gzip" in error["message"]) is (broken == "gzip")
    assert len(calls) == 1
    await client.app[STREAMS].retire_now()
    (row,) = await client.app[GATE].ledger.entries()
    assert (row.status, row.prompt_tokens > 0) == ("provider_error", True)


@pytest.mark.parametrize(
    ("event", "message"),
    [
        (b'event: error\ndata: {"message": "overloaded"}\n\n', "overloaded"),
        (b"event: error\ndata: the queue is full\n\n", "the queue is full"),
        (b'event:error\ndata: {"error": {"message": "as openai"}}\n\n', "as openai"),
        (_event({"object": "error", "message": "old vllm", "type": "BadRequestError"}), "old vllm"),
    ],
    ids=["event-object", "event-text", "event-openai", "object-error"],
)
async def test_an_error_in_another_server_s_words_ends_the_stream_with_it(
    aiohttp_server: Any, gateway: GatewayFactory, settings: Settings, event: bytes, message: str
) -> None:
    """An ``event: error`` (some servers' and proxies') or an older vLLM's ``{"object":
    "error"}`` chunk mid-stream is the provider's error: the stream ends with it, its
    message kept, not relayed as a chunk and then called an early end."""

    async def answer(request: web.Request) -> web.StreamResponse:
        return await _stream(request, _delta("Hi"), event)

    client = await _gateway(aiohttp_server, gateway, settings, answer)
    response = await client.post(URL, json=chat_body("x"), headers=AUTH)
    *chunks, last = sse_data(await response.text())
    assert len(chunks) == 1
    assert orjson.loads(last)["error"]["message"] == message


async def test_a_finished_stream_without_done_completes(
    aiohttp_server: Any, gateway: GatewayFactory, settings: Settings
) -> None:
    """Content, a finish reason, then the body ends without ``[DONE]``: the client gets
    the stream completed, ``[DONE]`` included, as it would from the provider directly."""

    async def answer(request: web.Request) -> web.StreamResponse:
        return await _stream(request, _delta("Hi"), _delta(None, "stop"))

    client = await _gateway(aiohttp_server, gateway, settings, answer)
    data = sse_data(await (await client.post(URL, json=chat_body("x"), headers=AUTH)).text())
    assert data[-1] == "[DONE]"
    assert not any("error" in orjson.loads(d) for d in data[:-1])


async def test_a_byte_order_mark_and_empty_events_lose_nothing(
    aiohttp_server: Any, gateway: GatewayFactory, settings: Settings
) -> None:
    """A stream that starts with a UTF-8 BOM and has an event with empty data between its
    chunks (both allowed by the SSE spec; the empty event is no event): the whole text, no
    error."""

    async def answer(request: web.Request) -> web.StreamResponse:
        events = (b"\xef\xbb\xbf" + _delta("Hi"), b"data: \n\n", _delta(" there"))
        return await _stream(request, *events, _delta(None, "stop"), b"data:\n\n")

    client = await _gateway(aiohttp_server, gateway, settings, answer)
    data = sse_data(await (await client.post(URL, json=chat_body("x"), headers=AUTH)).text())
    assert data[-1] == "[DONE]"
    chunks = [orjson.loads(d) for d in data[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == "Hi there"


async def test_a_chunk_that_says_error_null_is_not_an_error(
    aiohttp_server: Any, gateway: GatewayFactory, settings: Settings
) -> None:
    async def answer(request: web.Request) -> web.StreamResponse:
        chunk = {**CHUNK, "error": None, "choices": [{"index": 0, "delta": {"content": "a"}}]}
        return await _stream(request, _event(chunk), _delta(None, "stop"), b"data: [DONE]\n\n")

    client = await _gateway(aiohttp_server, gateway, settings, answer)
    data = sse_data(await (await client.post(URL, json=chat_body("x"), headers=AUTH)).text())
    assert data[-1] == "[DONE]"


@pytest.mark.parametrize("stream", [True, False])
async def test_a_chunk_of_the_wrong_shape_is_a_protocol_error(
    aiohttp_server: Any, gateway: GatewayFactory, settings: Settings, stream: bool
) -> None:
    """Valid JSON, wrong shape: a 502 (or the stream's error event), never a 500."""

    async def answer(request: web.Request) -> web.StreamResponse:
        if stream:
            bad = _event({**CHUNK, "choices": [{"index": 0, "delta": "oops"}]})
            return await _stream(request, _delta("fine"), bad)
        return web.json_response({**CHUNK, "choices": {"a": 1}})

    client = await _gateway(aiohttp_server, gateway, settings, answer)
    response = await client.post(URL, json=chat_body("x", stream=stream), headers=AUTH)
    assert (await _error_of(response, stream))["code"] == "provider_protocol_error"


@pytest.mark.parametrize("escaped", [False, True], ids=["plain", "escaped-key"])
@pytest.mark.parametrize("stream", [True, False])
async def test_a_200_that_is_an_error_is_a_502_with_the_providers_message(
    aiohttp_server: Any, gateway: GatewayFactory, settings: Settings, stream: bool, escaped: bool
) -> None:
    async def answer(request: web.Request) -> web.StreamResponse:
        if escaped:  # the same JSON, its key written as JSON may write it
            body = b'{"\\u0065rror": {"message": "model overloaded", "type": "x"}}'
            return web.Response(body=body, content_type="application/json")
        return web.json_response({"error": {"message": "model overloaded", "type": "x"}})

    one_try = replace(settings, resilience=replace(settings.resilience, retry_max_attempts=1))
    client = await _gateway(aiohttp_server, gateway, one_try, answer)
    body = chat_body("x", stream=stream, temperature=0)
    response = await client.post(URL, json=body, headers=AUTH)
    assert response.status == 502
    assert (await response.json())["error"]["message"] == "model overloaded"
    again = await client.post(URL, json=body, headers=AUTH)
    assert again.headers["X-Sluice-Cache"] != "hit"  # nothing of it was cached
    for row in await client.app[GATE].ledger.entries():  # a refusal: nothing to bill
        assert (row.status, row.prompt_tokens, row.cost_usd) == ("provider_error", 0, 0.0)
    # A failure of the provider's, streamed or not (the whole answer's counted as a
    # success: it was judged after the attempt had ended).
    assert client.app[RESILIENCE].breakers.for_model("gpt-4o-mini").fail_counter == 2


@pytest.mark.parametrize(
    ("status", "payload", "message"),
    [
        (422, {"error": "Input validation error: too long"}, "Input validation error: too long"),
        (400, {"object": "error", "message": "maximum context length"}, "maximum context length"),
    ],
)
async def test_other_servers_error_shapes_keep_their_message(
    aiohttp_server: Any,
    gateway: GatewayFactory,
    settings: Settings,
    status: int,
    payload: dict[str, Any],
    message: str,
) -> None:
    """TGI's ``{"error": "text"}`` and older vLLM's top-level ``message`` are understood."""

    async def answer(request: web.Request) -> web.StreamResponse:
        return web.json_response(payload, status=status)

    client = await _gateway(aiohttp_server, gateway, settings, answer)
    response = await client.post(URL, json=chat_body("x", stream=False), headers=AUTH)
    assert response.status == status
    assert (await response.json())["error"]["message"] == message


async def test_a_provider_401_about_our_key_tells_the_client_nothing_of_it(
    aiohttp_server: Any, gateway: GatewayFactory, settings: Settings
) -> None:
    async def answer(request: web.Request) -> web.StreamResponse:
        error = {"message": "Incorrect API key provided: sk-proj-****wxyz", "code": "x"}
        return web.json_response({"error": error}, status=401)

    client = await _gateway(aiohttp_server, gateway, settings, answer)
    response = await client.post(URL, json=chat_body("x", stream=False), headers=AUTH)
    assert response.status == 502
    error = (await response.json())["error"]
    assert error["code"] == "provider_auth_failed"
    assert "wxyz" not in error["message"]


async def test_a_malformed_model_list_is_a_502(
    aiohttp_server: Any, gateway: GatewayFactory, settings: Settings
) -> None:
    async def answer(request: web.Request) -> web.StreamResponse:
        return web.json_response({"data": None})

    client = await _gateway(aiohttp_server, gateway, settings, answer)
    response = await client.get("/v1/models", headers=AUTH)
    assert response.status == 502
    assert (await response.json())["error"]["code"] == "provider_protocol_error"


@pytest.mark.parametrize("stream", [True, False])
async def test_cached_prompt_tokens_are_billed_at_the_cached_price(
    aiohttp_server: Any, gateway: GatewayFactory, settings: Settings, stream: bool
) -> None:
    """The provider's usage says part of the prompt was cached: the row keeps that count and
    the cost prices those tokens at the cached input rate (the provider's own bill)."""
    usage = {
        "prompt_tokens": 1000,
        "completion_tokens": 10,
        "prompt_tokens_details": {"cached_tokens": 600},
    }

    async def answer(request: web.Request) -> web.StreamResponse:
        if not stream:
            message = {"role": "assistant", "content": "a b"}
            choice = {"index": 0, "message": message, "finish_reason": "stop"}
            return web.json_response({**CHUNK, "choices": [choice], "usage": usage})
        last = _event({**CHUNK, "choices": [], "usage": usage})
        return await _stream(request, _delta("a"), _delta(" b", "stop"), last, b"data: [DONE]\n\n")

    client = await _gateway(aiohttp_server, gateway, settings, answer)
    response = await client.post(URL, json=chat_body("hi", stream=stream), headers=AUTH)
    await response.read()
    await finished(client, response)
    (row,) = await client.app[GATE].ledger.entries()
    prices = client.app[GATE].prices
    assert (row.prompt_tokens, row.cached_tokens, row.completion_tokens) == (1000, 600, 10)
    assert row.cost_usd == float(prices.cost("gpt-4o-mini", 1000, 10, 600))
    assert row.cost_usd < float(prices.cost("gpt-4o-mini", 1000, 10))


async def test_the_provider_s_model_list_is_asked_once_a_minute(
    aiohttp_server: Any, gateway: GatewayFactory, settings: Settings, loop_clock: LoopClock
) -> None:
    """Passthrough ``/v1/models``: callers at once share one provider call, its answer
    serves for a minute (each client's call was one to the provider, with the gateway's
    key), and a failure is not kept."""
    calls: list[str] = []

    async def answer(request: web.Request) -> web.StreamResponse:
        calls.append(request.path)
        if len(calls) == 1:
            return web.json_response({"error": {"message": "busy"}}, status=503)
        return web.json_response({"object": "list", "data": [{"id": "m", "object": "model"}]})

    client = await _gateway(aiohttp_server, gateway, settings, answer)
    assert (await client.get("/v1/models", headers=AUTH)).status == 502
    at_once = await asyncio.gather(*(client.get("/v1/models", headers=AUTH) for _ in range(5)))
    assert [r.status for r in at_once] == [200] * 5
    assert len(calls) == 2  # the failure, then one for the five
    await loop_clock.advance(59)
    assert (await client.get("/v1/models/m", headers=AUTH)).status == 200
    assert len(calls) == 2
    await loop_clock.advance(2)
    assert (await client.get("/v1/models", headers=AUTH)).status == 200
    assert len(calls) == 3


async def test_a_fallback_without_usage_is_counted_in_its_own_tokenizer(
    aiohttp_server: Any, gateway: GatewayFactory, settings: Settings
) -> None:
    """gpt-4o-mini (o200k) fails and gpt-4 (cl100k) serves, sending no usage: the tokens
    billed are counted as gpt-4 counts them (priced at its rates with the other model's
    counts, a budget was overspent by half), the prompt as admission counted it for gpt-4."""
    text = "Déjà vu: naïve façade, coöperate; 東京 ✓ " * 4

    async def answer(request: web.Request) -> web.StreamResponse:
        if (await request.json())["model"] == "gpt-4o-mini":
            return web.json_response({"error": {"message": "down"}}, status=503)
        return await _stream(request, _delta(text), _delta(None, "stop"), b"data: [DONE]\n\n")

    custom = with_resilience(settings, fallbacks={"gpt-4o-mini": ("gpt-4",)}, retry_max_attempts=1)
    client = await _gateway(aiohttp_server, gateway, custom, answer)
    registry = client.app[STREAMS]
    recounted: list[str] = []
    count = registry.count_prompt
    registry.count_prompt = lambda model, body: recounted.append(model) or count(model, body)
    body = chat_body("Ünïcödé prompt, ☃ and 東京, counted differently by each tokenizer")
    response = await client.post(URL, json=body, headers=AUTH)
    assert response.headers["X-Sluice-Model"] == "gpt-4"
    await response.read()
    await finished(client, response)
    assert recounted == []  # admission's count in gpt-4's tokenizer, not a recount on the loop
    (row,) = await client.app[GATE].ledger.entries()
    assert row.usage_reported is False
    assert row.prompt_tokens == tokens.count_chat("gpt-4", body)
    assert row.completion_tokens == tokens.count_text("gpt-4", text)
    assert row.prompt_tokens != tokens.count_chat("gpt-4o-mini", body)


@pytest.mark.parametrize(
    "usage",
    [  # odd shapes of what OpenAI sends as {"prompt_tokens": n, "completion_tokens": m, ...}
        {"prompt_tokens": "12", "completion_tokens": 2},
        {"completion_tokens": 2},
        {"prompt_tokens": 5, "completion_tokens": -1},
        {"prompt_tokens": 5, "completion_tokens": 2, "prompt_tokens_details": "none"},
        {
            "prompt_tokens": 5,
            "completion_tokens": 2,
            "prompt_tokens_details": {"cached_tokens": "x"},
        },
        7,
        ["odd"],
    ],
    ids=["string", "no-prompt", "negative", "details-text", "cached-text", "number", "list"],
)
async def test_odd_usage_never_loses_the_ledger_row(
    aiohttp_server: Any, gateway: GatewayFactory, settings: Settings, usage: object
) -> None:
    """Usage that is not two counts is not trusted: the request still gets its one row,
    billed from what was counted (or from the counts it did have), never a crash."""

    async def answer(request: web.Request) -> web.StreamResponse:
        last = _event({**CHUNK, "choices": [], "usage": usage})
        return await _stream(request, _delta("a"), _delta(" b", "stop"), last, b"data: [DONE]\n\n")

    client = await _gateway(aiohttp_server, gateway, settings, answer)
    response = await client.post(URL, json=chat_body("hi"), headers=AUTH)
    assert sse_data(await response.text())[-1] == "[DONE]"
    stream = client.app[STREAMS].get(response.headers["X-Sluice-Stream-Id"])
    assert stream is not None
    await client.app[STREAMS].settled(stream)
    (row,) = await client.app[GATE].ledger.entries()
    assert row.status == "completed"
    assert row.prompt_tokens > 0
    assert row.completion_tokens >= 2
    assert row.cached_tokens == 0
    assert row.cost_usd > 0


@pytest.mark.parametrize("stream", [True, False])
@pytest.mark.parametrize(
    "odd",
    [
        {"model": 123},
        {"id": ["x"], "model": {"a": 1}},
        {"choices": [{"index": 0, "delta": {"content": 5}}]},
        {"choices": [{"index": 0, "delta": {"refusal": ["no"]}}]},
        {"choices": [{"index": 0, "delta": {"content": "a"}, "finish_reason": 7}]},
        {"choices": [{"index": 1, "delta": "oops"}]},
        {"choices": [{"index": 1, "delta": {"tool_calls": 5, "content": 6}}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": "x"}]}}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [{"function": {"arguments": {}}}]}}]},
    ],
    ids=[
        "model",
        "id",
        "content",
        "refusal",
        "finish",
        "other-choice",
        "other-choice-calls",
        "call-function",
        "call-arguments",
    ],
)
async def test_odd_types_from_the_provider_never_leave_a_request_unsettled(
    aiohttp_server: Any, gateway: GatewayFactory, settings: Settings, odd: Any, stream: bool
) -> None:
    """A name, id or text of the wrong type: the answer is relayed or refused as a protocol
    error, and either way the request gets its ledger row and frees its stream slot and
    reservations (a non-string model or text broke the settlement after the response)."""

    async def answer(request: web.Request) -> web.StreamResponse:
        if not stream:  # the same oddity in a whole completion
            choices = [
                {("message" if key == "delta" else key): value for key, value in c.items()}
                for c in odd.get("choices") or [{"index": 0, "delta": {"content": "a"}}]
            ]
            return web.json_response({**CHUNK, **odd, "choices": choices})
        return await _stream(request, _event({**CHUNK, "choices": [], **odd}), _delta("b", "stop"))

    custom = replace(settings, limits=replace(settings.limits, max_streams_per_user=1))
    client = await _gateway(aiohttp_server, gateway, custom, answer)
    for _ in range(2):  # the second finds the user's one stream slot free again
        response = await client.post(URL, json=chat_body("x", stream=stream), headers=AUTH)
        assert response.status in (200, 502)
        await response.read()
        stream_id = response.headers["X-Sluice-Stream-Id"]
        settled = client.app[STREAMS].get(stream_id)
        assert settled is not None
        await client.app[STREAMS].settled(settled)
        checkpoint = await client.get(f"/v1/streams/{stream_id}", headers=AUTH)
        assert checkpoint.status == 200
    rows = await client.app[GATE].ledger.entries()
    assert len(rows) == 2
    assert all(row.status in ("completed", "provider_error") for row in rows)


async def test_reasoning_streamed_as_such_is_billed_when_usage_never_comes(
    aiohttp_server: Any, gateway: GatewayFactory, settings: Settings
) -> None:
    """vLLM, llama.cpp and DeepSeek stream ``reasoning_content`` (Ollama ``reasoning``)
    before the answer; a stream cut off in it was billed no output at all."""

    async def answer(request: web.Request) -> web.StreamResponse:
        thinking = [{"index": 0, "delta": {"reasoning_content": " step by step"}}]
        ollama = [{"index": 0, "delta": {"reasoning": " and more"}}]
        events = [_event({**CHUNK, "choices": thinking})] * 20
        events += [_event({**CHUNK, "choices": ollama})] * 20
        return await _stream(request, *events)  # then the body ends: no usage, no [DONE]

    client = await _gateway(aiohttp_server, gateway, settings, answer)
    response = await client.post(URL, json=chat_body("hi"), headers=AUTH)
    *_, last = sse_data(await response.text())
    assert "error" in orjson.loads(last)  # the provider ended it early
    await client.app[STREAMS].retire_now()
    (row,) = await client.app[GATE].ledger.entries()
    assert row.completion_tokens >= 40 * 2
    assert row.cost_usd > 0


async def test_time_to_first_token_is_not_the_opening_role_chunk_s(
    aiohttp_server: Any, gateway: GatewayFactory, settings: Settings
) -> None:
    """A provider (vLLM) may send the role chunk at once and prefill afterwards: the first
    token is the first chunk with output, for the ledger's ``ttft_ms`` and telemetry."""
    prefilled = asyncio.Event()

    async def answer(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        role = {"index": 0, "delta": {"role": "assistant", "content": ""}}
        await response.write(_event({**CHUNK, "choices": [role]}))
        await prefilled.wait()
        for event in (_delta("hi"), _delta(None, "stop"), b"data: [DONE]\n\n"):
            await response.write(event)
        await response.write_eof()
        return response

    client = await _gateway(aiohttp_server, gateway, settings, answer)
    response = await client.post(URL, json=chat_body("hi"), headers=AUTH)
    await response.content.readuntil(b"\n\n")  # the role chunk reached the client
    stream = client.app[STREAMS].get(response.headers["X-Sluice-Stream-Id"])
    assert stream is not None
    assert stream.first_token_at is None
    assert stream.first_chunk_at is not None  # (the GenAI metric's first chunk: any)
    prefilled.set()
    await response.read()
    await client.app[STREAMS].retire_now()
    assert stream.first_token_at is not None
    assert stream.first_token_at > stream.first_chunk_at
    (row,) = await client.app[GATE].ledger.entries()
    assert row.ttft_ms == pytest.approx(
        (stream.first_token_at - stream.created_at) * 1000, abs=0.01
    )


@pytest.mark.parametrize("stream", [True, False])
async def test_legacy_function_calls_and_other_choices_reasoning_are_billed_without_usage(
    aiohttp_server: Any, gateway: GatewayFactory, settings: Settings, stream: bool
) -> None:
    """A legacy ``function_call``'s arguments, and the reasoning of a choice past 0, are
    generated tokens: with no usage from the provider they were billed as none."""
    arguments = '{"city": "Paris"}' * 20
    call = {"name": "weather", "arguments": arguments}

    async def answer(request: web.Request) -> web.StreamResponse:
        if not stream:
            first = {"index": 0, "message": {"role": "assistant", "function_call": call}}
            second = {"index": 1, "message": {"content": "ok", "reasoning_content": "hm " * 50}}
            choices = [{**first, "finish_reason": "function_call"}, second]
            return web.json_response({**CHUNK, "object": "chat.completion", "choices": choices})
        deltas = [{"index": 0, "delta": {"function_call": call}, "finish_reason": None}]
        deltas.append({"index": 1, "delta": {"reasoning_content": "hm " * 50}})
        done = [{"index": i, "delta": {}, "finish_reason": "stop"} for i in (0, 1)]
        events = [_event({**CHUNK, "choices": [d]}) for d in deltas]
        return await _stream(
            request, *events, _event({**CHUNK, "choices": done}), b"data: [DONE]\n\n"
        )

    client = await _gateway(aiohttp_server, gateway, settings, answer)
    response = await client.post(URL, json=chat_body("hi", stream=stream, n=2), headers=AUTH)
    assert response.status == 200
    await response.read()
    await client.app[STREAMS].retire_now()
    (row,) = await client.app[GATE].ledger.entries()
    expected = tokens.count_text("gpt-4o-mini", "weather" + arguments + "hm " * 50)
    assert row.completion_tokens >= expected - 2  # ("ok" too, for the whole answer)


async def test_an_answer_conversion_would_cut_serves_only_its_own_form_from_the_cache(
    aiohttp_server: Any, gateway: GatewayFactory, settings: Settings
) -> None:
    """A streamed legacy ``function_call`` cannot be rebuilt as JSON by the cache's
    conversion: a JSON request for it is a miss (it got ``function_call: null``)."""
    calls = []

    async def answer(request: web.Request) -> web.StreamResponse:
        calls.append(orjson.loads(await request.read()).get("stream"))
        call = {"function_call": {"name": "lookup", "arguments": '{"q": 1}'}}
        if not calls[-1]:
            message = {"role": "assistant", "content": None, **call}
            choice = {"index": 0, "message": message, "finish_reason": "function_call"}
            return web.json_response({**CHUNK, "choices": [choice]})
        done = {"index": 0, "delta": {}, "finish_reason": "function_call"}
        events = [_event({**CHUNK, "choices": [{"index": 0, "delta": call}]})]
        return await _stream(request, *events, _event({**CHUNK, "choices": [done]}))

    client = await _gateway(aiohttp_server, gateway, settings, answer)
    for stream in (True, False, False):
        body = chat_body("call it", stream=stream, temperature=0)
        response = await client.post(URL, json=body, headers=AUTH)
        await response.read()
        served = client.app[STREAMS].get(response.headers["X-Sluice-Stream-Id"])
        assert served is not None
        await client.app[STREAMS].settled(served)  # retired: the cache holds the answer
    assert calls == [True, False]  # the second JSON request was the cache's
    assert response.headers["X-Sluice-Cache"] == "hit"
    message = (await response.json())["choices"][0]["message"]
    assert message["function_call"] == {"name": "lookup", "arguments": '{"q": 1}'}


@pytest.mark.parametrize("finished", [(0,), (0, 1)], ids=["one-of-two", "both"])
async def test_a_stream_without_done_completes_only_once_every_choice_finished(
    aiohttp_server: Any, gateway: GatewayFactory, settings: Settings, finished: tuple[int, ...]
) -> None:
    """``n`` = 2 and the body ends without ``[DONE]``: complete when both choices have their
    finish reason; with choice 1 cut off, it is the provider's error (it was completed,
    choice 1 truncated without a word, and cached as complete)."""

    async def answer(request: web.Request) -> web.StreamResponse:
        events = [
            _event({**CHUNK, "choices": [{"index": i, "delta": {"content": f"c{i}"}}]})
            for i in (0, 1)
        ]
        events += [
            _event({**CHUNK, "choices": [{"index": i, "delta": {}, "finish_reason": "stop"}]})
            for i in finished
        ]
        return await _stream(request, *events)

    client = await _gateway(aiohttp_server, gateway, settings, answer)
    response = await client.post(URL, json=chat_body("x", n=2), headers=AUTH)
    last = sse_data(await response.text())[-1]
    if finished == (0, 1):
        assert last == "[DONE]"
    else:
        assert orjson.loads(last)["error"]["code"] == "provider_connection_error"


async def test_a_whole_completion_where_a_stream_was_asked_is_not_asked_for_again(
    aiohttp_server: Any, gateway: GatewayFactory, settings: Settings
) -> None:
    """A provider that ignores ``stream`` answers 200 with the whole completion: generated
    and billed already, so one 502 to the client, never a retry (it was asked three times,
    each a breaker failure)."""
    calls = []

    async def answer(request: web.Request) -> web.StreamResponse:
        calls.append(1)
        choice = {"index": 0, "message": {"role": "assistant", "content": "hi"}}
        return web.json_response({**CHUNK, "object": "chat.completion", "choices": [choice]})

    client = await _gateway(aiohttp_server, gateway, settings, answer)
    response = await client.post(URL, json=chat_body("x"), headers=AUTH)
    assert response.status == 502
    assert (await response.json())["error"]["message"] == "The provider sent no stream."
    assert len(calls) == 1


@pytest.mark.parametrize("status", [429, 500])
async def test_a_provider_s_x_should_retry_false_is_obeyed_and_passed_on(
    aiohttp_server: Any, gateway: GatewayFactory, settings: Settings, status: int
) -> None:
    """OpenAI's 429 ``insufficient_quota`` says ``x-should-retry: false``, and the SDKs obey
    it: the gateway asked twice more, and its answer (with one attempt) had no such header,
    so the client's SDK asked twice more again."""
    calls = []

    async def answer(request: web.Request) -> web.StreamResponse:
        calls.append(1)
        error = {"error": {"message": "quota", "type": "insufficient_quota", "code": "q"}}
        return web.json_response(error, status=status, headers={"x-should-retry": "false"})

    client = await _gateway(aiohttp_server, gateway, settings, answer)  # (3 attempts)
    response = await client.post(URL, json=chat_body("x", stream=False), headers=AUTH)
    assert response.status == (429 if status == 429 else 502)
    assert response.headers["x-should-retry"] == "false"
    assert len(calls) == 1


@pytest.mark.parametrize(
    "retry_after",
    ["Mon, 01 Jan 99999999999 00:00:00 GMT", "99999999999"],
    ids=["overflowing-date", "eleven-digits"],
)
async def test_any_retry_after_a_provider_sends_is_a_clean_answer(
    aiohttp_server: Any, gateway: GatewayFactory, settings: Settings, retry_after: str
) -> None:
    """A date no datetime holds was a 500 from the gateway (and no breaker failure); a wait
    of eleven digits was dropped, so the gateway retried at once and the client never saw
    it. Now: the provider's 503 as a 502, and a wait that long is the client's to honour."""
    calls = []

    async def answer(request: web.Request) -> web.StreamResponse:
        calls.append(1)
        error = {"error": {"message": "busy", "type": "server_error"}}
        return web.json_response(error, status=503, headers={"Retry-After": retry_after})

    if not retry_after.isdigit():  # one attempt: no backoff to wait out here
        settings = replace(settings, resilience=replace(settings.resilience, retry_max_attempts=1))
    client = await _gateway(aiohttp_server, gateway, settings, answer)
    response = await client.post(URL, json=chat_body("x"), headers=AUTH)
    assert response.status == 502
    assert_openai_error(await response.json())
    if retry_after.isdigit():
        assert response.headers["Retry-After"] == retry_after
        assert len(calls) == 1  # longer than the retry budget: not retried early


async def test_a_retry_after_with_whitespace_after_it_is_still_the_providers_wait(
    aiohttp_server: Any, gateway: GatewayFactory, settings: Settings
) -> None:
    """``Retry-After: 120 `` (whitespace after the value, which HTTP allows): the wait is
    120 s, longer than the retry budget, so the 429 goes back with it after one call."""
    calls = []

    async def answer(request: web.Request) -> web.StreamResponse:
        calls.append(1)
        error = {"error": {"message": "slow down", "type": "rate_limit"}}
        return web.json_response(error, status=429, headers={"Retry-After": "120 "})

    client = await _gateway(aiohttp_server, gateway, settings, answer)
    response = await client.post(URL, json=chat_body("x", stream=False), headers=AUTH)
    assert response.status == 429
    assert response.headers.get("Retry-After") == "120"
    assert len(calls) == 1


@pytest.mark.parametrize("stream", [True, False])
async def test_an_answer_past_the_gateway_s_bounds_is_a_502_not_a_swollen_process(
    aiohttp_server: Any,
    gateway: GatewayFactory,
    settings: Settings,
    stream: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A non-streamed answer past ``MAX_ANSWER_BYTES``, a stream whose journal passes
    ``MAX_STREAM_BYTES``: each ends as a 502 (the stream's last event)
    ``provider_answer_too_large``, the provider's connection dropped, never retried."""
    monkeypatch.setattr(upstream, "MAX_ANSWER_BYTES", 4000)
    monkeypatch.setattr(generation, "MAX_STREAM_BYTES", 4000)
    calls = []

    async def answer(request: web.Request) -> web.StreamResponse:
        calls.append(1)
        if stream:
            return await _stream(request, *[_delta("word " * 20)] * 100)
        message = {"role": "assistant", "content": "word " * 2000}
        body = {**CHUNK, "choices": [{"index": 0, "message": message, "finish_reason": "stop"}]}
        return web.json_response(body)

    client = await _gateway(aiohttp_server, gateway, settings, answer)
    response = await client.post(URL, json=chat_body("x", stream=stream), headers=AUTH)
    assert (await _error_of(response, stream))["code"] == "provider_answer_too_large"
    assert len(calls) == 1


async def test_a_provider_s_endless_error_message_is_cut_short(
    aiohttp_server: Any, gateway: GatewayFactory, settings: Settings
) -> None:
    async def answer(request: web.Request) -> web.StreamResponse:
        error = {"error": {"message": "why " * 10_000, "type": "invalid_request_error"}}
        return web.json_response(error, status=400)

    client = await _gateway(aiohttp_server, gateway, settings, answer)
    response = await client.post(URL, json=chat_body("x", stream=False), headers=AUTH)
    assert response.status == 400
    message = (await response.json())["error"]["message"]
    assert message.startswith("why why")
    assert len(message) <= upstream.MAX_MESSAGE_CHARS


async def test_a_model_list_past_its_bound_is_a_502(
    aiohttp_server: Any,
    gateway: GatewayFactory,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(upstream, "MAX_MODELS_BYTES", 1000)

    async def answer(request: web.Request) -> web.StreamResponse:
        return web.json_response({"data": [{"id": f"model-{n}"} for n in range(200)]})

    client = await _gateway(aiohttp_server, gateway, settings, answer)
    response = await client.get("/v1/models", headers=AUTH)
    assert response.status == 502
    assert (await response.json())["error"]["code"] == "provider_protocol_error"
