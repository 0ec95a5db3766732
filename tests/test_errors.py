"""Every error a client can see is OpenAI-shaped with the right status (issue 2, point 6).

Before the first byte: a JSON ``{"error": {...}}`` response. After it: a final SSE
``data: {"error": {...}}`` event, then the stream closes without ``[DONE]``. The last
tests check ``errors.translate`` maps every lower-level exception we expect, like httpx's
``tests/test_exceptions.py``.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import re
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from service import errors
from service import provider_client as pc
from service.appkeys import GATE
from service.middleware import error_middleware
from service.settings import Settings
from service.simulator import SimStats
from tests.conftest import AUTH, GatewayFactory, chat_body, with_provider, with_streams
from tests.wire import assert_openai_error, closed_port, sse_data, sse_json

URL = "/v1/chat/completions"


def _quick(settings: Settings, **provider: Any) -> Settings:
    """No grace or drain window (a stalled provider must not hold teardown), plus overrides."""
    settings = with_streams(settings, disconnect_grace_s=0.0)
    settings = replace(settings, server=replace(settings.server, drain_s=0.0))
    return with_provider(settings, **provider) if provider else settings


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """One attempt per request: these tests check how a failure is shown, not retried."""
    return replace(settings, resilience=replace(settings.resilience, retry_max_attempts=1))


# --- before the first byte: client input ---------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        (b"{not json", None),
        (b"", None),
        (b"\xff\xfe", None),
        (b"[]", None),
        (b"null", None),
        (b'{"model": "gpt-4o-mini"}', "messages"),
        (b'{"messages": [{"role": "user", "content": "x"}]}', "model"),
        (b'{"model": 7, "messages": []}', "model"),
        (b'{"model": "gpt-4o-mini", "messages": "hello"}', "messages"),
        (b'{"model": "gpt-4o-mini", "messages": []}', "messages"),
        (b'{"model": "gpt-4o-mini", "messages": [1]}', "messages[0]"),
        (b'{"model": "gpt-4o-mini", "messages": [{"role": "robot"}]}', "messages[0].role"),
        (
            b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": 5}]}',
            "messages[0].content",
        ),
    ],
)
async def test_bad_body_is_400(
    gateway: GatewayFactory, sim_stats: SimStats, raw: bytes, param: str | None
) -> None:
    """Malformed JSON, a missing or mistyped field: 400, naming the parameter when there is one."""
    client = await gateway()
    response = await client.post(URL, data=raw, headers=AUTH)
    assert response.status == 400
    assert response.content_type == "application/json"
    error = assert_openai_error(await response.json(), type_="invalid_request_error")
    assert error["param"] == param
    assert sim_stats.requests == 0


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", "hot"),
        ("temperature", True),
        ("max_tokens", 1.5),
        ("max_tokens", 0),
        ("n", "2"),
        ("stream", "yes"),
        ("stream_options", "usage"),
    ],
)
async def test_wrong_types_name_the_param(gateway: GatewayFactory, field: str, value: Any) -> None:
    """A parameter of the wrong type or range is a 400 whose ``param`` names it."""
    client = await gateway()
    response = await client.post(URL, json=chat_body(**{field: value}), headers=AUTH)
    assert response.status == 400
    error = assert_openai_error(await response.json(), type_="invalid_request_error")
    assert error["param"] == field
    assert field in error["message"]
    assert "bool" not in error["message"].replace("boolean", "")  # JSON's names, not Python's
    assert "dict" not in error["message"]


async def test_both_output_limits_at_once_are_400(
    gateway: GatewayFactory, sim_stats: SimStats
) -> None:
    """``max_tokens`` with ``max_completion_tokens``: OpenAI's 400, before the provider (a
    provider honouring the other one would run past the cap and the budget's hold)."""
    client = await gateway()
    body = chat_body(max_tokens=50_000, max_completion_tokens=200)
    response = await client.post(URL, json=body, headers=AUTH)
    assert response.status == 400
    error = assert_openai_error(await response.json(), type_="invalid_request_error")
    assert (error["param"], error["code"]) == ("max_tokens", "invalid_parameter_combination")
    assert sim_stats.requests == 0
    one_null = chat_body("ok [sim chunks=2]", max_tokens=None, max_completion_tokens=20)
    assert (await client.post(URL, json=one_null, headers=AUTH)).status == 200


async def test_stream_options_without_stream_is_400(gateway: GatewayFactory) -> None:
    """stream_options on a non-streamed request is rejected as OpenAI does."""
    client = await gateway()
    body = chat_body(stream=False, stream_options={"include_usage": True})
    response = await client.post(URL, json=body, headers=AUTH)
    assert response.status == 400
    assert assert_openai_error(await response.json())["param"] == "stream_options"


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic c2x1aWNlLWRldi1rZXk="}],
)
async def test_missing_or_wrong_key_is_401(
    gateway: GatewayFactory, sim_stats: SimStats, headers: dict[str, str]
) -> None:
    """No key, a wrong key, or a non-Bearer scheme: 401 invalid_api_key."""
    client = await gateway()
    response = await client.post(URL, json=chat_body(), headers=headers)
    assert response.status == 401
    error = assert_openai_error(await response.json(), type_="invalid_request_error")
    if headers:
        assert error["code"] == "invalid_api_key"
    assert sim_stats.requests == 0


async def test_unknown_route_is_404(gateway: GatewayFactory) -> None:
    """An unknown path is a JSON 404 (not aiohttp's text page), with or without a key."""
    client = await gateway()
    for headers in ({}, AUTH):
        response = await client.get("/v1/nothing-here", headers=headers)
        assert response.status == 404
        assert response.content_type == "application/json"
        error = assert_openai_error(await response.json())
        assert "/v1/nothing-here" in error["message"]


async def test_wrong_method_is_405(gateway: GatewayFactory) -> None:
    """GET on the chat route is a JSON 405 and keeps aiohttp's Allow header."""
    client = await gateway()
    response = await client.get(URL, headers=AUTH)
    assert response.status == 405
    error = assert_openai_error(await response.json())
    assert error["code"] == "method_not_allowed"
    assert response.headers["Allow"] == "POST"


async def test_body_over_limit_is_413(
    gateway: GatewayFactory, settings: Settings, sim_stats: SimStats
) -> None:
    """A body over SLUICE_MAX_BODY_BYTES is a 413; one just under it is served."""
    limit = 2048
    client = await gateway(replace(settings, server=replace(settings.server, max_body_bytes=limit)))
    big = orjson.dumps(chat_body("x" * limit, stream=False))
    response = await client.post(URL, data=big, headers=AUTH)
    assert response.status == 413
    assert assert_openai_error(await response.json())["code"] == "request_too_large"
    assert sim_stats.requests == 0
    small = orjson.dumps(chat_body("x" * (limit // 2), stream=False))
    assert len(small) < limit
    ok = await client.post(URL, data=small, headers=AUTH)
    assert ok.status == 200


async def test_body_over_limit_without_a_length_is_413(
    gateway: GatewayFactory, settings: Settings, sim_stats: SimStats
) -> None:
    """The limit holds for a chunked body (no Content-Length to check up front) and for a
    small gzip body that inflates past it: counted as read, decompressed."""
    limit = 2048
    client = await gateway(replace(settings, server=replace(settings.server, max_body_bytes=limit)))
    big = orjson.dumps(chat_body("x" * limit, stream=False))

    async def chunked() -> AsyncIterator[bytes]:
        for start in range(0, len(big), 256):
            yield big[start : start + 256]

    response = await client.post(URL, data=chunked(), headers=AUTH)
    assert response.status == 413
    assert assert_openai_error(await response.json())["code"] == "request_too_large"
    bomb = gzip.compress(orjson.dumps(chat_body("x" * 50 * limit, stream=False)))
    assert len(bomb) < limit
    headers = {**AUTH, "Content-Encoding": "gzip"}
    response = await client.post(URL, data=bomb, headers=headers)
    assert response.status == 413
    assert assert_openai_error(await response.json())["code"] == "request_too_large"
    assert sim_stats.requests == 0


async def test_no_input_gives_a_500(gateway: GatewayFactory) -> None:
    """A spread of odd requests never yields a 500 or a traceback."""
    client = await gateway()
    requests: list[tuple[str, str, Any]] = [
        ("POST", URL, b"\x00" * 64),
        ("POST", URL, b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": {}}]}'),
        ("POST", URL, b'{"model": "", "messages": null}'),
        ("PUT", "/v1/models", b""),
        ("DELETE", URL, b""),
        ("POST", "/v1/streams/nope/cancel", b""),
        ("GET", "/v1/streams/nope/events?last_event_id=abc", b""),
    ]
    for method, path, data in requests:
        response = await client.request(method, path, data=data, headers=AUTH)
        text = await response.text()
        assert response.status < 500, (method, path, response.status, text)
        assert "Traceback" not in text
        assert_openai_error(orjson.loads(text))


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"messages": [{"role": "user", "content": [1]}]}, "messages[0].content[0]"),
        ({"messages": [{"role": "user", "content": [{"text": "x"}]}]}, "messages[0].content[0]"),
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
            "messages[0].content[0].text",
        ),
        ({"stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
        ({"tools": {"type": "function"}}, "tools"),
        ({"messages": [{"role": ["user"], "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": {"user": 1}, "content": "x"}]}, "messages[0].role"),
        ({"tools": [1]}, "tools[0]"),
        ({"tools": [{"type": "function", "function": "f"}]}, "tools[0].function"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]},
            "tools[0].function.parameters",
        ),
        ({"functions": [1]}, "functions[0]"),
        ({"functions": [{"name": "f", "parameters": [1]}]}, "functions[0].parameters"),
        ({"tool_choice": 1}, "tool_choice"),
        ({"stop": 5}, "stop"),
        ({"user": ["alice"]}, "user"),
        ({"response_format": "json"}, "response_format"),
        ({"logit_bias": [1]}, "logit_bias"),
        ({"logprobs": "true"}, "logprobs"),
        ({"top_logprobs": 1.5}, "top_logprobs"),
        ({"parallel_tool_calls": 1}, "parallel_tool_calls"),
        ({"n": 0}, "n"),
        ({"max_tokens": 10**30}, "max_tokens"),  # beyond a 64-bit integer
    ],
)
async def test_more_wrong_types_name_the_param(
    gateway: GatewayFactory, sim_stats: SimStats, extra: dict[str, Any], param: str
) -> None:
    """Content parts, stream_options and the other typed parameters: 400 naming the field."""
    client = await gateway()
    response = await client.post(URL, json=chat_body(**extra), headers=AUTH)
    assert response.status == 400, await response.text()
    error = assert_openai_error(await response.json(), type_="invalid_request_error")
    assert error["param"] == param
    assert sim_stats.requests == 0


@pytest.mark.parametrize(
    "raw",
    [
        b'{"model": "gpt-4o-mini", "temperature": NaN, "messages": []}',
        b'{"model": "gpt-4o-mini", "max_tokens": 1e400, "messages": []}',
        b'{"model": "gpt-4o-mini", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}",
        b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "\xff\xfe"}]}',
        b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "\\ud800"}]}',
        b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "\xc3"}]}',
        '{"model": "gpt-4o-mini"}'.encode("utf-16"),
        b"\xef\xbb\xbf{}",
    ],
)
async def test_json_edge_cases_are_400(
    gateway: GatewayFactory, sim_stats: SimStats, raw: bytes
) -> None:
    """NaN, overflowing numbers, deep nesting, bytes that are not UTF-8 (raw or a lone
    surrogate escape), UTF-16, a BOM: all a 400 "could not parse", none reach the provider."""
    client = await gateway()
    response = await client.post(URL, data=raw, headers=AUTH)
    assert response.status == 400
    error = assert_openai_error(await response.json(), type_="invalid_request_error")
    assert "parse the JSON body" in error["message"]
    assert sim_stats.requests == 0


async def test_undecodable_body_is_400(
    gateway: GatewayFactory, sim_stats: SimStats, caplog: pytest.LogCaptureFixture
) -> None:
    """A Content-Encoding the body does not match is the client's error: 400, not a 500."""
    client = await gateway()
    caplog.set_level(logging.ERROR)
    for encoding in ("gzip", "deflate"):
        headers = {**AUTH, "Content-Encoding": encoding, "Content-Type": "application/json"}
        response = await client.post(URL, data=b"this is not compressed", headers=headers)
        assert response.status == 400
        error = assert_openai_error(await response.json(), type_="invalid_request_error")
        assert "could not be decoded" in error["message"]
    assert not caplog.records  # no traceback logged, by us or by aiohttp
    # A body that really is gzip-compressed JSON is served.
    body = gzip.compress(orjson.dumps(chat_body("[sim chunks=2]", stream=False)))
    ok = await client.post(URL, data=body, headers={**AUTH, "Content-Encoding": "gzip"})
    assert ok.status == 200
    assert sim_stats.requests == 1


@pytest.mark.parametrize(
    ("content_type", "status"),
    [
        ("application/json", 200),
        ("application/json; charset=utf-8", 200),
        ("text/plain", 200),  # lenient: a JSON body is read as JSON whatever it is labelled
        ("application/x-www-form-urlencoded", 200),  # what `curl -d` sends without -H
        (None, 200),
    ],
)
async def test_content_type_is_not_required(
    gateway: GatewayFactory, content_type: str | None, status: int
) -> None:
    """A JSON body is accepted under any Content-Type; a body that is not JSON is a 400."""
    client = await gateway()
    headers = {**AUTH, **({"Content-Type": content_type} if content_type else {})}
    good = orjson.dumps(chat_body("[sim chunks=2]", stream=False))
    response = await client.post(URL, data=good, headers=headers)
    assert response.status == status
    form = await client.post(URL, data=b"model=gpt-4o-mini&messages=hi", headers=headers)
    assert form.status == 400
    assert "parse the JSON body" in assert_openai_error(await form.json())["message"]


async def _raw_http(port: int, request: bytes) -> tuple[int, bytes]:
    """Send ``request`` as raw bytes (so headers need not be valid UTF-8); status and body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(re.search(rb"Content-Length: (\d+)", head).group(1))  # type: ignore[union-attr]
        return int(head.split(b" ", 2)[1]), await reader.readexactly(length)
    finally:
        writer.close()
        await writer.wait_closed()


@pytest.mark.parametrize(
    "authorization",
    [b"Bearer \xff\xfe\xfd", b"Bearer sluice-dev-key\xc3", b"\xe2\x82\xac", b"Bearer  "],
)
async def test_authorization_that_is_not_utf8_is_401(
    gateway: GatewayFactory, authorization: bytes
) -> None:
    """Header bytes that are not UTF-8 are just a wrong key: 401, not a 500."""
    client = await gateway()
    assert client.server.port is not None
    status, body = await _raw_http(
        client.server.port,
        b"GET /v1/models HTTP/1.1\r\nHost: sluice\r\nAuthorization: "
        + authorization
        + b"\r\nConnection: close\r\n\r\n",
    )
    assert status == 401
    assert assert_openai_error(orjson.loads(body))["code"] == "invalid_api_key"


@pytest.mark.parametrize(
    ("status", "type_"),
    [(408, "invalid_request_error"), (415, "invalid_request_error"), (503, "server_error")],
)
async def test_other_http_exceptions_keep_their_status(
    aiohttp_client: Any, status: int, type_: str
) -> None:
    """An aiohttp HTTP exception without a leaf of its own keeps its status, OpenAI-shaped."""

    async def handler(request: web.Request) -> web.Response:
        raise _http_exception(status)

    app = web.Application(middlewares=[error_middleware])
    app.router.add_get("/", handler)
    client = await aiohttp_client(app)
    response = await client.get("/")
    assert response.status == status
    error = assert_openai_error(await response.json(), type_=type_)
    assert error["code"] == str(status)


def _http_exception(status: int) -> Exception:
    kinds = {
        408: web.HTTPRequestTimeout,
        415: web.HTTPUnsupportedMediaType,
        503: web.HTTPServiceUnavailable,
    }
    return kinds[status]()


# --- before the first byte: the provider ---------------------------------------------------


@pytest.mark.parametrize(("status", "stream"), [(400, True), (404, False), (422, True)])
async def test_provider_4xx_passes_through(
    gateway: GatewayFactory, status: int, stream: bool
) -> None:
    """A provider 4xx keeps its status and its message, streamed or not."""
    client = await gateway()
    body = chat_body(f"hi [sim fail={status}]", stream=stream)
    response = await client.post(URL, json=body, headers=AUTH)
    assert response.status == status
    assert response.content_type == "application/json"
    error = assert_openai_error(await response.json())
    assert error["message"] == f"simulated failure {status}"
    assert error["code"] is None  # as the provider sent it: no code of ours in its place
    assert response.headers["X-Sluice-Stream-Id"].startswith("strm_")


@pytest.mark.parametrize("status", [401, 403])
async def test_provider_auth_failure_is_502(gateway: GatewayFactory, status: int) -> None:
    """Our credentials' trouble is not the client's: a provider 401/403 becomes 502."""
    client = await gateway()
    response = await client.post(URL, json=chat_body(f"[sim fail={status}]"), headers=AUTH)
    assert response.status == 502
    assert_openai_error(await response.json())


@pytest.mark.parametrize(("status", "stream"), [(500, True), (503, False), (529, True)])
async def test_provider_5xx_is_502(gateway: GatewayFactory, status: int, stream: bool) -> None:
    """A provider 5xx is a 502 upstream_error, before any byte of a stream is sent."""
    client = await gateway()
    response = await client.post(
        URL, json=chat_body(f"[sim fail={status}]", stream=stream), headers=AUTH
    )
    assert response.status == 502
    assert response.content_type == "application/json"
    error = assert_openai_error(await response.json())
    assert error["message"] == f"simulated failure {status}"  # the provider's words, kept
    assert error["code"] == "provider_error"


async def test_provider_retry_after_passes_through(gateway: GatewayFactory) -> None:
    """A provider 429's Retry-After reaches the client with the 429."""
    client = await gateway()
    body = chat_body("[sim fail=429 retry_after=3]")
    response = await client.post(URL, json=body, headers=AUTH)
    assert response.status == 429
    assert response.headers["Retry-After"] == "3"
    assert assert_openai_error(await response.json())["type"] == "rate_limit_error"


@pytest.mark.parametrize("stream", [True, False])
async def test_connect_refused_is_502(
    gateway: GatewayFactory, settings: Settings, stream: bool
) -> None:
    """Nothing listening at the provider URL: 502 provider_connection_error."""
    port = closed_port()
    client = await gateway(_quick(settings, base_url=f"http://127.0.0.1:{port}/v1"))
    response = await client.post(URL, json=chat_body(stream=stream), headers=AUTH)
    assert response.status == 502
    error = assert_openai_error(await response.json(), type_="upstream_error")
    assert error["code"] == "provider_connection_error"
    assert str(port) not in error["message"]
    assert "127.0.0.1" not in error["message"]


async def test_connect_timeout_is_504(
    gateway: GatewayFactory, settings: Settings, unanswered_port: int
) -> None:
    """A provider that never completes the TCP handshake: 504 after connect_timeout_s."""
    url = f"http://127.0.0.1:{unanswered_port}/v1"
    client = await gateway(_quick(settings, base_url=url, connect_timeout_s=0.05))
    response = await client.post(URL, json=chat_body(), headers=AUTH)
    assert response.status == 504
    error = assert_openai_error(await response.json(), type_="upstream_error")
    assert error["code"] == "provider_connect_timeout"


@pytest.mark.parametrize(
    ("directive", "stream"),
    [
        ("header_delay_ms=600000", True),
        ("header_delay_ms=600000", False),
        ("first_delay_ms=600000", False),  # a non-streamed body comes with its headers
        ("stall_after=1", False),  # half a body, then silence: one deadline for all of it
    ],
)
async def test_first_token_timeout_is_504(
    gateway: GatewayFactory, settings: Settings, directive: str, stream: bool
) -> None:
    """No headers or no first event within first_token_timeout_s (a stream), no whole answer
    within completion_timeout_s (not streamed; the other deadline then does not apply):
    504 provider_timeout."""
    deadline = {"first_token_timeout_s" if stream else "completion_timeout_s": 0.05}
    client = await gateway(_quick(settings, **deadline))
    body = chat_body(f"[sim {directive}]", stream=stream)
    response = await client.post(URL, json=body, headers=AUTH)
    assert response.status == 504
    error = assert_openai_error(await response.json(), type_="upstream_error")
    assert error["code"] == "provider_timeout"


async def test_first_token_timeout_after_headers_is_error_event(
    gateway: GatewayFactory, settings: Settings
) -> None:
    """Headers arrived but no first event in time: our 200 is out (keepalives may flow while
    waiting), so the timeout is the stream's only event: a provider_timeout error, no [DONE]."""
    client = await gateway(_quick(settings, first_token_timeout_s=0.05))
    body = chat_body("[sim first_delay_ms=600000]")
    response = await client.post(URL, json=body, headers=AUTH)
    assert response.status == 200
    text = await response.text()
    payloads = sse_json(text)
    assert len(payloads) == 1
    error = assert_openai_error(payloads[0], type_="upstream_error")
    assert error["code"] == "provider_timeout"
    assert "[DONE]" not in sse_data(text)


@pytest.mark.parametrize(("model", "status"), [("gpt-4o-mini", 504), ("o3-mini", 200)])
async def test_a_reasoning_model_has_its_own_first_token_deadline(
    gateway: GatewayFactory, settings: Settings, model: str, status: int
) -> None:
    """OpenAI's reasoning models think for minutes before their first token, streaming none
    of it: the 60 s first-token deadline ended them (``provider_timeout``) where the SDK,
    calling OpenAI itself, waits 600 s. They have their own, ten times as long."""
    deadlines = {"first_token_timeout_s": 0.05, "reasoning_first_token_timeout_s": 600.0}
    client = await gateway(_quick(settings, models=("gpt-4o-mini", "o3-mini"), **deadlines))
    body = chat_body("[sim header_delay_ms=300]", stream=True, model=model)
    response = await client.post(URL, json=body, headers=AUTH)
    assert response.status == status
    if status == 200:
        assert sse_data(await response.text())[-1] == "[DONE]"


# --- after the first byte ------------------------------------------------------------------


async def _stream_text(client: Any, text: str) -> tuple[aiohttp.ClientResponse, str]:
    response = await client.post(URL, json=chat_body(text), headers=AUTH)
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/event-stream")
    return response, await response.text()


@pytest.mark.parametrize(
    ("directive", "code", "words"),
    [
        ("stall_after=3", "provider_timeout", 3),
        ("reset_after=2", "provider_connection_error", 2),
        ("malformed_after=4", "provider_protocol_error", 4),
    ],
)
async def test_midstream_failure_is_final_error_event(
    gateway: GatewayFactory,
    settings: Settings,
    sim_stats: SimStats,
    directive: str,
    code: str,
    words: int,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """After the first byte a provider failure is the last event; no [DONE]; then EOF. An
    expected provider failure is translated where it is read: no "unexpected" traceback."""
    caplog.set_level(logging.ERROR)
    client = await gateway(_quick(settings, idle_timeout_s=0.05))
    _, text = await _stream_text(client, f"go [sim chunks=10 {directive}]")
    data = sse_data(text)
    assert "[DONE]" not in data
    payloads = sse_json(text)
    assert len(payloads) == 1 + words + 1  # role, the words sent, the error
    assert all("error" not in p for p in payloads[:-1])
    error = assert_openai_error(payloads[-1], type_="upstream_error")
    assert error["code"] == code
    assert text.endswith("\n\n")
    assert not caplog.records


async def test_provider_error_event_midstream_is_relayed(
    gateway: GatewayFactory, settings: Settings
) -> None:
    """A provider's own ``data: {"error": ...}`` event ends our stream with an error event."""

    async def chat(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        chunk = {"id": "c1", "choices": [{"index": 0, "delta": {"content": "hi"}}]}
        await response.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
        failure = {"error": {"message": "overloaded mid-flight", "type": "server_error"}}
        await response.write(b"data: " + orjson.dumps(failure) + b"\n\n")
        return response

    provider = web.Application()
    provider.router.add_post("/v1/chat/completions", chat)
    runner = web.AppRunner(provider)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        host, port = runner.addresses[0][:2]
        client = await gateway(_quick(settings, base_url=f"http://{host}:{port}/v1"))
        _, text = await _stream_text(client, "hi")
    finally:
        await runner.cleanup()
    payloads = sse_json(text)
    assert payloads[0]["choices"][0]["delta"]["content"] == "hi"
    error = assert_openai_error(payloads[-1])
    assert error["message"] == "overloaded mid-flight"
    assert "[DONE]" not in sse_data(text)


# --- translate: every lower-level exception is mapped ---------------------------------------


@pytest.mark.parametrize(
    ("exc", "expected", "status"),
    [
        (pc.ConnectError("to secret-host.internal"), errors.ProviderConnectionError, 502),
        (pc.BodyError("secret-host.internal cut"), errors.ProviderConnectionError, 502),
        (pc.ClientError("secret-host.internal closed"), errors.ProviderConnectionError, 502),
        (pc.ConnectTimeout("secret-host.internal"), errors.ProviderConnectTimeoutError, 504),
        (TimeoutError(), errors.ProviderTimeoutError, 504),
        (OSError(113, "No route to host"), errors.ProviderConnectionError, 502),
        (ConnectionResetError(104, "reset"), errors.ProviderConnectionError, 502),
        (ValueError("bad chunk from secret-host.internal"), errors.ProviderProtocolError, 502),
        (orjson.JSONDecodeError("bad", "doc", 0), errors.ProviderProtocolError, 502),
        (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid"), errors.ProviderProtocolError, 502),
    ],
)
def test_translate_maps_lower_level_errors(
    exc: BaseException, expected: type[errors.SluiceError], status: int
) -> None:
    """Each library/OS exception maps to its leaf; the message is ours, not the library's."""
    mapped = errors.translate(exc)
    assert type(mapped) is expected
    assert mapped.http_status == status
    assert str(exc) not in mapped.message or not str(exc)
    assert "secret-host" not in mapped.message
    assert_openai_error(mapped.payload(), type_="upstream_error")


def test_translate_keeps_sluice_errors() -> None:
    """An error already in the tree is returned as is."""
    original = errors.RateLimitError("slow down", headers={"Retry-After": "1"})
    assert errors.translate(original) is original


def test_translate_unknown_is_generic() -> None:
    """Anything unexpected is a generic server_error without the original text."""
    mapped = errors.translate(RuntimeError("internal detail /etc/passwd"))
    assert type(mapped) is errors.InternalError
    assert mapped.http_status == 500
    assert "internal detail" not in mapped.message


def test_provider_status_error_statuses() -> None:
    """4xx pass through except 401/403; everything else is 502; the provider type is kept."""
    cases = {400: 400, 404: 404, 422: 422, 429: 429, 401: 502, 403: 502, 500: 502, 503: 502}
    for provider_status, client_status in cases.items():
        error = errors.ProviderStatusError(
            "m", provider_status=provider_status, type_="invalid_request_error"
        )
        assert error.http_status == client_status
        assert error.payload()["error"]["type"] == "invalid_request_error"
        # A passed-through 4xx keeps the provider's code (none here); our 502 has its own.
        assert error.payload()["error"]["code"] == (
            None if client_status < 500 else "provider_error"
        )


def _nested(depth: int) -> Any:
    value: Any = []
    for _ in range(depth - 1):
        value = [value]
    return value


async def test_a_body_nested_past_the_limit_is_a_400_with_its_ledger_row(
    gateway: GatewayFactory, sim_stats: SimStats
) -> None:
    """Arrays and objects more than 128 deep, anywhere in the body (an unknown field, a
    message, a tool's schema), over HTTP or a WebSocket: a 400 and a ``rejected`` row, no
    provider call. 100 deep is fine."""
    client = await gateway()
    deep = _nested(300)
    tool = {"type": "function", "function": {"name": "f", "parameters": {"a": deep}}}
    message = {"role": "user", "content": "hi", "x": deep}
    bodies = [
        {**chat_body("hi"), "foo": deep},
        {**chat_body("hi", stream=False), "messages": [message]},
        {**chat_body("hi"), "tools": [tool]},
    ]
    for body in bodies:
        response = await client.post("/v1/chat/completions", json=body, headers=AUTH)
        assert response.status == 400
        assert_openai_error(await response.json(), type_="invalid_request_error")
    async with client.ws_connect("/v1/ws", headers=AUTH) as ws:
        frame = {"type": "chat.completion.create", "request_id": "r", "body": bodies[0]}
        await ws.send_str(json.dumps(frame))  # (deeper than orjson writes)
        refused = orjson.loads(await ws.receive_str())
    assert (refused["type"], refused["error"]["type"]) == ("error", "invalid_request_error")
    rows = await client.app[GATE].ledger.entries()
    assert [row.status for row in rows] == ["rejected"] * 4
    assert sim_stats.requests == 0
    fine = {**chat_body("hi", stream=False), "foo": _nested(100)}
    assert (await client.post("/v1/chat/completions", json=fine, headers=AUTH)).status == 200


async def test_a_model_name_past_256_characters_is_a_400(gateway: GatewayFactory) -> None:
    """A model name becomes a breaker's name, a metric label and a response header."""
    client = await gateway()
    body = {**chat_body("hi", stream=False), "model": "m" * 257}
    response = await client.post("/v1/chat/completions", json=body, headers=AUTH)
    assert response.status == 400
    assert assert_openai_error(await response.json())["param"] == "model"


@pytest.mark.parametrize("model", ["gpt-4o-mini\r\nX-Injected: 1", "gpt-4o-mini\x01", "a\x7f"])
async def test_a_model_name_with_control_characters_is_a_400_before_the_provider(
    gateway: GatewayFactory, settings: Settings, sim_stats: SimStats, model: str
) -> None:
    """The served model goes out in a response header, which cannot carry a control
    character: such a name was called, billed, and then answered with a broken response."""
    client = await gateway(with_provider(settings, models=()))  # passthrough: any name
    for stream in (True, False):
        body = {**chat_body("hi [sim chunks=2]", stream=stream), "model": model}
        response = await client.post("/v1/chat/completions", json=body, headers=AUTH)
        assert response.status == 400
        assert assert_openai_error(await response.json())["param"] == "model"
    async with client.ws_connect("/v1/ws", headers=AUTH) as ws:
        body = {**chat_body("hi [sim chunks=2]"), "model": model}
        frame = {"type": "chat.completion.create", "request_id": "r", "body": body}
        await ws.send_str(json.dumps(frame))
        refused = orjson.loads(await ws.receive_str())
    assert (refused["type"], refused["error"]["param"]) == ("error", "model")
    assert sim_stats.requests == 0
    rows = await client.app[GATE].ledger.entries()
    assert [row.status for row in rows] == ["rejected"] * 3
