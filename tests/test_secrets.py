"""The provider key never leaves the gateway (issue 2, point 3).

The gateway runs in ``openai`` provider mode with a distinctive fake key, in front of the
simulator, and is made to fail in every way it supports. Every response status line,
header and body (SSE included), every log record at DEBUG from every logger, and all of
stdout/stderr are searched for the key. The simulator's ``echo_key=1`` directive makes it
quote the Authorization header it received in its error messages, as careless providers
do, so the gateway's scrubbing is exercised rather than assumed. The same failures are
also requested over the WebSocket route, every span is exported to a real OTLP receiver
and searched too, and a breaker that opens and a provider that never accepts the TCP
connection add their own outputs. ``test_process_output_never_has_the_key`` does the same
for ``python -m service`` itself: its banner and its real log format, at DEBUG.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import secrets
import signal
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from service.appkeys import GATE, STREAMS, TELEMETRY
from service.auth import add_key
from service.settings import AuthSettings, ProviderSettings, Secret, Settings
from service.simulator import SimStats
from tests.conftest import GatewayFactory, chat_body
from tests.otlp import RECEIVED, receiver_app
from tests.processes import python_module
from tests.wire import closed_port

URL = "/v1/chat/completions"
CORE = secrets.token_hex(16)
PROVIDER_KEY = f"sk-proj-LEAKCANARY{CORE}"

# Each: (last user message, stream?). Between them every failure the gateway supports.
FAILING_REQUESTS = [
    ("[sim fail=401 echo_key=1]", True),
    ("[sim fail=403 echo_key=1]", False),
    ("[sim fail=400 echo_key=1]", True),
    ("[sim fail=400 echo_key=1]", False),
    ("[sim fail=404 echo_key=1]", False),
    ("[sim fail=422 echo_key=1]", True),
    ("[sim fail=429 echo_key=1]", True),
    ("[sim fail=500 echo_key=1]", True),
    ("[sim fail=503 echo_key=1]", False),
    ("[sim chunks=6 error_after=2 echo_key=1]", True),
    ("[sim chunks=6 reset_after=2 echo_key=1]", True),
    ("[sim chunks=6 malformed_after=1 echo_key=1]", True),
    ("[sim chunks=6 stall_after=2 echo_key=1]", True),
    ("[sim header_delay_ms=600000 echo_key=1]", True),
    ("[sim first_delay_ms=600000 echo_key=1]", True),
    ("[sim first_delay_ms=600000 echo_key=1]", False),
    ("[sim bogus=1]", True),  # the provider rejects an unknown directive: a 400 of its own
    ("fine [sim chunks=3]", True),
    ("fine [sim chunks=3]", False),
]


def _openai_mode(sim_url: str, keys_file: Path, traces: str | None = None) -> Settings:
    """SLUICE_PROVIDER=openai semantics: a real key, a keys file, no dev key; ``traces``:
    the OTLP endpoint spans are exported to."""
    settings = Settings(
        provider=ProviderSettings(
            kind="openai",
            name="openai",
            base_url=sim_url,
            api_key=Secret(PROVIDER_KEY),
            models=(),
            # Short, for the stalled cases; not so short that a loaded machine trips them
            # on the requests that fail for other reasons (their statuses are asserted).
            first_token_timeout_s=0.5,
            idle_timeout_s=0.5,
            completion_timeout_s=0.5,
        ),
        auth=AuthSettings(client_keys_file=keys_file, dev_key=None),
    )
    settings = replace(
        settings,
        resilience=replace(
            settings.resilience,
            retry_max_attempts=2,  # a retry, so the retry path's logs are searched too
            retry_base_delay_s=0.001,
            retry_max_delay_s=0.001,
            breaker_fail_max=1000,  # every request must reach the provider
        ),
        server=replace(settings.server, drain_s=0.0),
        telemetry=replace(settings.telemetry, traces_endpoint=traces, otlp_timeout_s=2.0),
    )
    return replace(settings, streams=replace(settings.streams, disconnect_grace_s=0.0))


class Transcript:
    """Everything a client could see, as text."""

    def __init__(self) -> None:
        self.parts: list[str] = []

    async def record(self, response: aiohttp.ClientResponse) -> str:
        body = await response.text(errors="replace")
        self.parts.append(f"{response.status} {response.reason}")
        self.parts.extend(f"{name}: {value}" for name, value in response.headers.items())
        self.parts.append(body)
        return body

    async def record_ws(self, client: TestClient[Any, Any], headers: dict[str, str]) -> int:
        """Every failing streamed request over ``/v1/ws``; every frame kept. Returns errors."""
        errors = 0
        async with client.ws_connect("/v1/ws", headers=headers) as ws:
            for index, (text, _) in enumerate(FAILING_REQUESTS):
                frame = {"type": "chat.completion.create", "request_id": index}
                await ws.send_str(orjson.dumps({**frame, "body": chat_body(text)}).decode())
                while True:
                    message = await ws.receive_str()
                    self.parts.append(message)
                    kind = orjson.loads(message)["type"]
                    if kind in ("done", "error"):
                        errors += kind == "error"
                        break
        return errors


@pytest.fixture
async def receiver(aiohttp_server: Any) -> TestServer:
    server: TestServer = await aiohttp_server(receiver_app())
    return server


@pytest.fixture
def keys_file(tmp_path: Path) -> tuple[Path, str]:
    path = tmp_path / "keys.json"
    client_key = add_key(path, user="alice", tenant="acme", admin=True)
    return path, client_key


async def test_provider_key_never_leaks(
    gateway: GatewayFactory,
    sim: TestServer,
    sim_url: str,
    sim_stats: SimStats,
    keys_file: tuple[Path, str],
    receiver: TestServer,
    unanswered_port: int,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """No failure mode puts the provider key in a response, a header, a WebSocket frame,
    a span, a log line or stderr."""
    caplog.set_level(logging.DEBUG)  # the root logger: every logger propagates here
    path, client_key = keys_file
    auth = {"Authorization": f"Bearer {client_key}"}
    transcript = Transcript()
    client = await gateway(_openai_mode(sim_url, path, str(receiver.make_url("/v1/traces"))))

    statuses = []
    stream_ids = []
    for text, stream in FAILING_REQUESTS:
        response = await client.post(URL, json=chat_body(text, stream=stream), headers=auth)
        statuses.append(response.status)
        stream_ids.append(response.headers.get("X-Sluice-Stream-Id"))
        await transcript.record(response)
    # Bad client input, including a client that presents the provider key as its own.
    for headers, data in [
        (auth, b"{not json"),
        (auth, b'{"model": "gpt-4o-mini"}'),
        ({"Authorization": f"Bearer {PROVIDER_KEY}"}, b"{}"),
        ({"Authorization": PROVIDER_KEY}, b"{}"),
        ({}, b"{}"),
    ]:
        await transcript.record(await client.post(URL, data=data, headers=headers))
    # What else a client can read back: checkpoints (with their errors), models, metrics.
    for stream_id in filter(None, stream_ids):
        await transcript.record(await client.get(f"/v1/streams/{stream_id}", headers=auth))
    await transcript.record(await client.get("/v1/models", headers=auth))
    await transcript.record(await client.get("/metrics", headers=auth))
    # The same failures over the WebSocket route; then a socket that presents our key.
    assert await transcript.record_ws(client, auth) >= 10
    for header in (f"Bearer {PROVIDER_KEY}", PROVIDER_KEY):
        await transcript.record(await client.get("/v1/ws", headers={"Authorization": header}))

    # The provider was really asked, with the key, so the searches below could have failed.
    assert sim_stats.requests >= len(FAILING_REQUESTS)
    assert f"Bearer {PROVIDER_KEY}" in sim_stats.authorizations
    assert set(sim_stats.authorizations) == {f"Bearer {PROVIDER_KEY}"}
    assert statuses[:9] == [502, 502, 400, 400, 404, 422, 429, 502, 502]
    assert statuses[-2:] == [200, 200]

    # A provider that is not there at all (connect refused), same key.
    settings = _openai_mode(sim_url, path)
    dead = f"http://127.0.0.1:{closed_port()}/v1"
    broken = await gateway(replace(settings, provider=replace(settings.provider, base_url=dead)))
    for stream in (True, False):
        response = await broken.post(URL, json=chat_body(stream=stream), headers=auth)
        assert response.status == 502
        await transcript.record(response)
    await transcript.record(await broken.get("/v1/models", headers=auth))
    # A provider that never completes the TCP handshake (504), and a breaker that opens (503).
    hung = f"http://127.0.0.1:{unanswered_port}/v1"
    slow = replace(settings.provider, base_url=hung, connect_timeout_s=0.05)
    timing_out = await gateway(replace(settings, provider=slow))
    response = await timing_out.post(URL, json=chat_body(), headers=auth)
    assert response.status == 504
    await transcript.record(response)
    tripping = await gateway(
        replace(settings, resilience=replace(settings.resilience, breaker_fail_max=1))
    )
    for _ in range(2):
        body = chat_body("[sim fail=500 echo_key=1]", stream=False)
        await transcript.record(await tripping.post(URL, json=body, headers=auth))
    assert "circuit_open" in transcript.parts[-1]

    assert await client.app[TELEMETRY].flush()
    spans = receiver.app[RECEIVED]
    assert any(span.status_message for span in spans)  # failures were traced, with messages

    out, err = capfd.readouterr()
    logs = "\n".join(
        f"{r.name} {r.levelname} {r.getMessage()} {r.exc_text or ''}" for r in caplog.records
    )
    everything = {
        "responses": "\n".join(transcript.parts),
        "spans": "\n".join(span.text() + repr(span.resource) for span in spans),
        "logs": logs,
        "out": out,
        "err": err,
    }
    for where, text in everything.items():
        assert PROVIDER_KEY not in text, f"provider key leaked in {where}"
        assert CORE not in text, f"part of the provider key leaked in {where}"
    assert "[redacted]" in everything["responses"]  # the echoing provider was scrubbed
    assert caplog.records  # logging was on, so "no key in the logs" means something


async def test_echoing_provider_really_echoes(
    sim: TestServer, sim_url: str, aiohttp_client: Any
) -> None:
    """Control: the simulator's echo_key=1 error does contain the key it was sent."""
    async with aiohttp.ClientSession() as session:
        response = await session.post(
            f"{sim_url}/chat/completions",
            json=chat_body("[sim fail=400 echo_key=1]", stream=False),
            headers={"Authorization": f"Bearer {PROVIDER_KEY}"},
        )
        assert response.status == 400
        assert PROVIDER_KEY in await response.text()
        streamed = await session.post(
            f"{sim_url}/chat/completions",
            json=chat_body("[sim chunks=4 error_after=1 echo_key=1]"),
            headers={"Authorization": f"Bearer {PROVIDER_KEY}"},
        )
        assert PROVIDER_KEY in await streamed.text()


def _careless_provider() -> web.Application:
    """A provider that puts the key it is sent wherever it can: in its 2xx answers (ids,
    model names, text, finish reasons, its model list) and in its Retry-After headers."""

    def key_of(request: web.Request) -> str:
        return request.headers["Authorization"].removeprefix("Bearer ")

    async def chat(request: web.Request) -> web.StreamResponse:
        key, body = key_of(request), await request.json()
        if "refuse" in body["messages"][-1]["content"]:
            headers = {"Retry-After": key, "retry-after-ms": key}
            error = {"error": {"message": "slow down", "type": "rate_limit"}}
            return web.json_response(error, status=429, headers=headers)
        chunk = {"id": key, "object": "chat.completion.chunk", "created": 1, "model": key}
        if not body.get("stream"):
            message = {"role": "assistant", "content": f"the key is {key}"}
            choice = {"index": 0, "message": message, "finish_reason": key}
            usage = {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
            return web.json_response({**chunk, "choices": [choice], "usage": usage})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        # "unterminated": the last event has no blank line after it, and no [DONE] follows
        # (the decoder's flush hands it on at the end of the body).
        unterminated = "unterminated" in body["messages"][-1]["content"]
        for delta, finish in (({"content": f"the key is {key}"}, None), ({}, key)):
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
            event = orjson.dumps({**chunk, "choices": [choice]})
            last = unterminated and finish is not None
            await response.write(b"data: %b" % event if last else b"data: %b\n\n" % event)
        if not unterminated:
            await response.write(b"data: [DONE]\n\n")
        return response

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"data": [{"id": "gpt-4o-mini", "owned_by": key_of(request)}]})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/v1/models", models)
    return app


async def test_a_provider_echoing_the_key_in_its_answers_is_scrubbed(
    gateway: GatewayFactory,
    aiohttp_server: Any,
    keys_file: tuple[Path, str],
    receiver: TestServer,
) -> None:
    """2xx answers are relayed as they come, but not our key in them: not in the SSE or
    JSON body, the checkpoint, the ledger, the spans or the model list; and a Retry-After
    that is not a time is not passed on."""
    provider = await aiohttp_server(_careless_provider())
    path, client_key = keys_file
    auth = {"Authorization": f"Bearer {client_key}"}
    traces = str(receiver.make_url("/v1/traces"))
    settings = _openai_mode(str(provider.make_url("/v1")), path, traces)
    settings = replace(settings, resilience=replace(settings.resilience, retry_max_attempts=1))
    client = await gateway(settings)
    transcript = Transcript()
    for stream in (True, False):
        response = await client.post(URL, json=chat_body("hi", stream=stream), headers=auth)
        assert response.status == 200
        assert "[redacted]" in await transcript.record(response)
        stream_id = response.headers["X-Sluice-Stream-Id"]
        await transcript.record(await client.get(f"/v1/streams/{stream_id}", headers=auth))
    unterminated = await client.post(URL, json=chat_body("unterminated"), headers=auth)
    assert unterminated.status == 200
    assert "[redacted]" in await transcript.record(unterminated)
    refused = await client.post(URL, json=chat_body("refuse", stream=False), headers=auth)
    assert refused.status == 429
    assert "Retry-After" not in refused.headers  # the provider's was no time at all
    await transcript.record(refused)
    await transcript.record(await client.get("/v1/models", headers=auth))
    await client.app[STREAMS].retire_now()  # their spans end as they are retired
    assert await client.app[TELEMETRY].flush()
    spans = receiver.app[RECEIVED]
    assert any("gen_ai.response.id" in span.text() for span in spans)
    rows = await client.app[GATE].ledger.entries()
    assert {row.status for row in rows} == {"completed", "provider_error"}
    everything = "\n".join([*transcript.parts, *(span.text() for span in spans), *map(repr, rows)])
    assert PROVIDER_KEY not in everything
    assert CORE not in everything


def test_secret_repr_hides_the_key() -> None:
    """The settings objects print without the key, so a logged config cannot leak it."""
    provider = ProviderSettings(kind="openai", api_key=Secret(PROVIDER_KEY))
    for text in (repr(provider), str(provider), repr(Settings(provider=provider))):
        assert PROVIDER_KEY not in text
    assert Secret(PROVIDER_KEY).reveal() == PROVIDER_KEY


async def _collect(stream: asyncio.StreamReader, lines: list[bytes]) -> None:
    while line := await stream.readline():
        lines.append(line)


@pytest.mark.parametrize("log_format", ["json", "text"])
async def test_process_output_never_has_the_key(
    sim: TestServer,
    sim_url: str,
    sim_stats: SimStats,
    keys_file: tuple[Path, str],
    tmp_path: Path,
    log_format: str,
) -> None:
    """``python -m service`` with the key in a file (a Kubernetes secret mount), logging at
    DEBUG in its real format: nothing it prints, from start to SIGTERM, holds the key."""
    path, client_key = keys_file
    key_file = tmp_path / "openai-key"
    key_file.write_text(PROVIDER_KEY + "\n")
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(tmp_path),
        "SLUICE_DATA_DIR": str(tmp_path / "data"),  # the ledger: not the checkout's ./data
        "SLUICE_PORT": "0",
        "OPENAI_API_KEY_FILE": str(key_file),
        "OPENAI_BASE_URL": sim_url,
        "SLUICE_CLIENT_KEYS_FILE": str(path),
        "SLUICE_LOG_LEVEL": "DEBUG",
        "SLUICE_LOG_FORMAT": log_format,
        "SLUICE_FIRST_TOKEN_TIMEOUT_S": "0.1",
        "SLUICE_COMPLETION_TIMEOUT_S": "0.1",
        "SLUICE_IDLE_TIMEOUT_S": "0.1",
        "SLUICE_RETRY_MAX_ATTEMPTS": "2",
        "SLUICE_RETRY_BASE_DELAY_S": "0.001",
        "SLUICE_RETRY_MAX_DELAY_S": "0.001",
        "SLUICE_BREAKER_FAIL_MAX": "1000",
        "SLUICE_DISCONNECT_GRACE_S": "0",
        "SLUICE_DRAIN_S": "0",
    }
    process = await python_module(
        "service",
        env=env,
    )
    assert process.stdout is not None
    assert process.stderr is not None
    transcript = Transcript()
    stderr: list[bytes] = []
    try:
        async with asyncio.timeout(60):  # a safety net, not a clock
            while b"Running on" not in (line := await process.stderr.readline()):
                assert line, b"".join(stderr).decode(errors="replace")
                stderr.append(line)
            stderr.append(line)
            port = re.search(rb"Running on http://127\.0\.0\.1:(\d+)", line)
            assert port is not None
            base = f"http://127.0.0.1:{int(port.group(1))}"
            logs = asyncio.ensure_future(_collect(process.stderr, stderr))  # never let it block
            auth = {"Authorization": f"Bearer {client_key}"}
            async with aiohttp.ClientSession() as session:
                for text, stream in FAILING_REQUESTS:
                    body = chat_body(text, stream=stream)
                    response = await session.post(f"{base}{URL}", json=body, headers=auth)
                    await transcript.record(response)
                for headers in ({"Authorization": f"Bearer {PROVIDER_KEY}"}, {}):
                    response = await session.get(f"{base}/v1/models", headers=headers)
                    await transcript.record(response)
            process.send_signal(signal.SIGTERM)
            out = await process.stdout.read()
            await process.wait()
            await logs
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0
    assert set(sim_stats.authorizations) == {f"Bearer {PROVIDER_KEY}"}  # it was really used
    output = (out + b"".join(stderr)).decode(errors="replace")
    assert "sluice.access" in output or '"sluice.access"' in output  # DEBUG logs were on
    assert output.count("\n") > len(FAILING_REQUESTS)
    for where, text in {"output": output, "responses": "\n".join(transcript.parts)}.items():
        assert PROVIDER_KEY not in text, f"provider key leaked in the process {where}"
        assert CORE not in text, f"part of the provider key leaked in the process {where}"
    assert "[redacted]" in "\n".join(transcript.parts)
