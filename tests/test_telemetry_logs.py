"""Logs: one access line per request (JSON or text), redacted like every other line."""

from __future__ import annotations

import asyncio
import io
import logging
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import orjson
import pytest

from service import registry as registry_module
from service.appkeys import GATE, RESILIENCE, STREAMS, TELEMETRY
from service.settings import Secret, Settings, TelemetrySettings
from service.telemetry import core as telemetry_core
from service.telemetry.batch import BATCH_S
from service.telemetry.genai import user_hash
from service.telemetry.logs import JsonFormatter, TextFormatter, configure_logging
from service.telemetry.redaction import Redactor
from tests.conftest import AUTH, GatewayFactory, chat_body, with_provider
from tests.otlp import receiver_app
from tests.streamwire import LoopClock
from tests.test_telemetry_metrics import samples, value
from tests.test_telemetry_traces import traced

URL = "/v1/chat/completions"
PROVIDER_KEY = "sk-provider-logs-0123456789"


@pytest.fixture
def captured(settings: Settings) -> Iterator[tuple[io.StringIO, Settings]]:
    """The process's logging set up as ``python -m service`` does, into a buffer (JSON)."""
    custom = with_provider(settings, api_key=Secret(PROVIDER_KEY))
    custom = replace(custom, telemetry=replace(custom.telemetry, log_format="json"))
    buffer = io.StringIO()
    handler = configure_logging(custom.telemetry, Redactor.from_settings(custom), stream=buffer)
    try:
        yield buffer, custom
    finally:
        logging.getLogger().removeHandler(handler)


def lines(buffer: io.StringIO) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in buffer.getvalue().splitlines() if line]


async def finished(client: Any) -> None:
    """Every stream ended and every access line written (they go out in batches)."""
    tasks = [s.task for s in client.app[STREAMS].live() if s.task is not None]
    if tasks:
        await asyncio.wait(tasks)
    await client.app[STREAMS].retire_now()
    client.app[TELEMETRY].later.run()


async def test_finish_hooks_run_in_no_request_s_context(
    gateway: GatewayFactory, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ended streams are retired in batches (``registry.py``), started by a timer or by
    whichever request needs them settled: their finish hooks must not run as part of that
    request (telemetry would mark it with another stream's outcome)."""
    monkeypatch.setattr(registry_module, "RETIRE_BATCH_S", 3600.0)  # only when asked
    client = await gateway(settings)
    seen: list[object] = []

    async def hook(stream: Any, checkpoint: Any) -> None:
        seen.append(telemetry_core._REQUEST.get())

    client.app[STREAMS].finish_hooks.append(hook)
    response = await client.post("/v1/chat/completions", json=chat_body("hi"), headers=AUTH)
    await response.read()
    assert (await client.get("/v1/usage", headers=AUTH)).status == 200  # settles it
    assert seen == [None]


async def test_one_json_access_line_per_request_with_the_stream_outcome(
    gateway: GatewayFactory, captured: tuple[io.StringIO, Settings]
) -> None:
    """A streamed completion logs exactly one access line carrying the stream's outcome,
    tokens, cost and timings; a 404 logs its own line."""
    buffer, settings = captured
    client = await gateway(settings)
    response = await client.post(
        URL, json=chat_body("s [sim chunks=4]"), headers={**AUTH, "X-Request-Id": "req-1"}
    )
    await response.read()
    await finished(client)
    assert (await client.get("/missing", headers=AUTH)).status == 404
    await finished(client)
    access = [line for line in lines(buffer) if line["logger"] == "sluice.access"]
    assert len(access) == 2
    chat, missing = access
    assert chat["request_id"] == "req-1"
    assert chat["method"] == "POST"
    assert chat["status"] == 200
    assert chat["outcome"] == "completed"
    assert chat["stream_id"] == response.headers["X-Sluice-Stream-Id"]
    assert chat["model"] == "gpt-4o-mini"
    assert chat["completion_tokens"] == 4
    assert chat["prompt_tokens"] > 0
    assert chat["cost_usd"] > 0
    assert chat["ttft_ms"] >= 0
    assert chat["duration_ms"] >= chat["overhead_ms"] >= 0
    assert chat["user_hash"] == user_hash("dev")
    assert chat["tenant"] == "dev"
    assert chat["trace_id"] is None  # tracing is off
    assert (missing["status"], missing["outcome"], missing["route"]) == (
        404,
        "client_error",
        "unmatched",
    )


async def test_keys_never_reach_a_log_line(
    gateway: GatewayFactory, captured: tuple[io.StringIO, Settings]
) -> None:
    """Wrong client keys, a provider echoing our key, and careless log calls: all redacted."""
    buffer, settings = captured
    client = await gateway(settings)
    wrong = {"Authorization": "Bearer sk-client-secret-987654321"}
    assert (await client.post(URL, json=chat_body(), headers=wrong)).status == 401
    echoed = await client.post(URL, json=chat_body("e [sim fail=500 echo_key=1]"), headers=AUTH)
    await echoed.read()
    await finished(client)
    logging.getLogger("service.test").warning(
        "debug dump: Authorization: Bearer %s for alice@example.com, key %s",
        "sk-client-secret-987654321",
        PROVIDER_KEY,
    )
    output = buffer.getvalue()
    assert "debug dump" in output
    for secret in (
        PROVIDER_KEY,
        "sk-client-secret-987654321",
        "alice@example.com",
        "sluice-dev-key",
    ):
        assert secret not in output
    assert "[redacted]" in output


async def test_text_format_is_human_readable(gateway: GatewayFactory, settings: Settings) -> None:
    """SLUICE_LOG_FORMAT=text: one readable line, fields as key=value."""
    buffer = io.StringIO()
    telemetry = TelemetrySettings(log_format="text")
    handler = configure_logging(telemetry, Redactor.from_settings(settings), stream=buffer)
    try:
        client = await gateway()
        response = await client.post(URL, json=chat_body("t [sim chunks=2]"), headers=AUTH)
        await response.read()
        await finished(client)
    finally:
        logging.getLogger().removeHandler(handler)
    access = [line for line in buffer.getvalue().splitlines() if " sluice.access " in line]
    assert len(access) == 1
    assert " INFO sluice.access POST /v1/chat/completions 200 completed" in access[0]
    assert "completion_tokens=2" in access[0]
    assert not access[0].startswith("{")


async def test_a_text_line_cannot_be_forged_with_control_characters(
    gateway: GatewayFactory, settings: Settings
) -> None:
    """A client's path with an encoded newline and terminal escape (anyone may send one,
    no key needed): its access line stays one line, those characters written escaped."""
    buffer = io.StringIO()
    telemetry = TelemetrySettings(log_format="text")
    handler = configure_logging(telemetry, Redactor.from_settings(settings), stream=buffer)
    try:
        client = await gateway()
        forged = "/v1/x%0A2026-01-01T00:00:00.000Z%20INFO%20sluice.access%20forged%1b[2J%C2%85y"
        response = await client.get(forged)
        assert response.status == 404  # unknown: answered before any key is asked for
        await finished(client)
    finally:
        logging.getLogger().removeHandler(handler)
    lines = buffer.getvalue().splitlines()
    (access,) = [line for line in lines if " sluice.access GET /v1/x" in line]
    assert "/v1/x\\n2026-01-01T00:00:00.000Z INFO sluice.access forged\\x1b[2J\\x85y" in access
    assert not any(line.startswith("2026-01-01T00:00:00.000Z") for line in lines)


async def test_access_log_can_be_turned_off(
    gateway: GatewayFactory, captured: tuple[io.StringIO, Settings]
) -> None:
    """SLUICE_ACCESS_LOG=false: no access lines."""
    buffer, settings = captured
    client = await gateway(
        replace(settings, telemetry=replace(settings.telemetry, access_log=False))
    )
    assert (await client.get("/livez")).status == 200
    assert not [line for line in lines(buffer) if line["logger"] == "sluice.access"]


async def test_websocket_streams_and_refusals_get_access_lines_and_counts(
    gateway: GatewayFactory, captured: tuple[io.StringIO, Settings]
) -> None:
    """On a socket each message stream logs its own access line (joined to the upgrade by
    request id); a message refused by the rate limit logs one too and counts as a rejection."""
    buffer, settings = captured
    client = await gateway(replace(settings, limits=replace(settings.limits, user_rpm=1)))
    ws = await client.ws_connect("/v1/ws", headers={**AUTH, "X-Request-Id": "sock-1"})
    body = chat_body("w [sim chunks=3]")
    for request_id in ("a", "b"):
        await ws.send_json(
            {"type": "chat.completion.create", "request_id": request_id, "body": body}
        )
    finals = {}
    while len(finals) < 2:
        frame = await ws.receive_json()
        if frame["type"] in ("done", "error"):
            finals[frame["request_id"]] = frame
    assert finals["a"]["type"] == "done"
    assert finals["b"]["error"]["code"] == "rate_limit_exceeded"
    await ws.close()
    await finished(client)
    metrics = await client.get("/metrics", headers=AUTH)
    exposition = await metrics.text()

    access = [line for line in lines(buffer) if line["logger"] == "sluice.access"]
    streamed = [line for line in access if line.get("stream_id")]
    refused = [line for line in access if line["outcome"] == "rejected"]
    upgrade = [line for line in access if line["status"] == 101]
    assert len(streamed) == len(refused) == len(upgrade) == 1
    assert {line["request_id"] for line in streamed + refused + upgrade} == {"sock-1"}
    (stream,) = streamed
    assert (stream["method"], stream["route"], stream["outcome"]) == ("WS", "ws", "completed")
    assert stream["completion_tokens"] == 3
    assert stream["user_hash"] == user_hash("dev")
    (rejected,) = refused
    assert (rejected["status"], rejected["error_type"]) == (429, "rate_limit_exceeded")
    assert rejected["user_hash"] == user_hash("dev")
    parsed = samples(exposition)
    assert value(parsed, "sluice_rejections_total", reason="rate") == 1
    assert value(parsed, "sluice_requests_total", route="ws", status="429", outcome="rejected") == 1
    assert value(parsed, "sluice_requests_total", route="ws", outcome="completed") == 1


async def test_a_socket_stream_the_breaker_refuses_is_accounted_as_a_refusal(
    gateway: GatewayFactory, captured: tuple[io.StringIO, Settings]
) -> None:
    """Over HTTP an open breaker is a 503 counted as a rejection; on a socket the refusal
    comes from the stream's generation, and is accounted the same way (its access line and
    request count say rejected, not provider_error)."""
    buffer, settings = captured
    client = await gateway(settings)
    client.app[RESILIENCE].breakers.for_model("gpt-4o-mini").open()
    ws = await client.ws_connect("/v1/ws", headers=AUTH)
    await ws.send_json(
        {"type": "chat.completion.create", "request_id": "r", "body": chat_body("x")}
    )
    while (frame := await ws.receive_json())["type"] != "error":
        pass
    assert frame["error"]["code"] == "circuit_open"
    await ws.close()
    await finished(client)
    exposition = await (await client.get("/metrics", headers=AUTH)).text()
    (line,) = [
        line
        for line in lines(buffer)
        if line["logger"] == "sluice.access" and line.get("stream_id")
    ]
    assert line["outcome"] == "rejected"
    parsed = samples(exposition)
    assert value(parsed, "sluice_rejections_total", reason="breaker") == 1
    assert value(parsed, "sluice_requests_total", route="ws", outcome="rejected") == 1


async def test_access_line_carries_the_continued_trace_id(
    gateway: GatewayFactory, captured: tuple[io.StringIO, Settings], aiohttp_server: Any
) -> None:
    """With tracing on, the access line's trace_id is the client's trace (continued), so a
    log line leads to its spans."""
    buffer, settings = captured
    receiver = await aiohttp_server(receiver_app())
    client = await gateway(traced(settings, receiver))
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    headers = {**AUTH, "traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"}
    response = await client.post(URL, json=chat_body("t [sim chunks=2]"), headers=headers)
    await response.read()
    await finished(client)
    (access,) = [line for line in lines(buffer) if line["logger"] == "sluice.access"]
    assert access["trace_id"] == trace_id
    assert access["outcome"] == "completed"


async def test_access_lines_wait_for_their_batch_and_keep_their_own_time(
    gateway: GatewayFactory, captured: tuple[io.StringIO, Settings], loop_clock: LoopClock
) -> None:
    """Lines are written a batch at a time, when the batch period has passed (not one per
    request as it ends), each stamped with the time its request ended."""
    buffer, settings = captured
    client = await gateway(settings)
    for _ in range(3):
        assert (await client.get("/missing", headers=AUTH)).status == 404
    assert not [line for line in lines(buffer) if line["logger"] == "sluice.access"]
    later = client.app[TELEMETRY].later
    assert later.pending == 3
    queued = [job.args[0] for job in later._jobs]  # type: ignore[attr-defined]
    await loop_clock.advance(BATCH_S)
    access = [line for line in lines(buffer) if line["logger"] == "sluice.access"]
    assert [line["status"] for line in access] == [404, 404, 404]
    for line, rt in zip(access, queued, strict=True):
        assert rt is not None
        assert rt.ended is not None
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(rt.ended))
        assert line["ts"] == f"{stamp}.{int(rt.ended % 1 * 1000):03d}Z"


def test_a_batch_record_is_written_one_line_per_request() -> None:
    """A batch of access lines is one record; both formatters write each line with its
    own time and fields, and a formatter that does not know batches prints the count."""
    record = logging.getLogger("sluice.access").makeRecord(
        "sluice.access",
        logging.INFO,
        "(access)",
        0,
        "%d access lines",
        (2,),
        None,
        extra={"lines": [(0.5, "GET /a 200 ok", {"n": 1}), (1.25, "GET /b 404 x", {"n": None})]},
    )
    first, second = (orjson.loads(line) for line in JsonFormatter().format(record).split("\n"))
    assert (first["ts"], first["message"], first["n"]) == (
        "1970-01-01T00:00:00.500Z",
        "GET /a 200 ok",
        1,
    )
    assert (second["ts"], second["message"], second["n"]) == (
        "1970-01-01T00:00:01.250Z",
        "GET /b 404 x",
        None,
    )
    assert TextFormatter().format(record).split("\n") == [
        "1970-01-01T00:00:00.500Z INFO sluice.access GET /a 200 ok n=1",
        "1970-01-01T00:00:01.250Z INFO sluice.access GET /b 404 x",
    ]
    assert logging.Formatter("%(message)s").format(record) == "2 access lines"


async def test_malformed_http_is_one_warning_line_not_a_traceback(
    gateway: GatewayFactory, captured: tuple[io.StringIO, Settings]
) -> None:
    """Garbage on the port (a bad request line, a header with no colon carrying a key) is
    the client's mistake: one WARNING line saying what was wrong, no stack trace, and the
    bytes it sent (a key among them) never reach the log."""
    buffer, settings = captured
    client = await gateway(settings)
    assert client.server.port is not None
    for raw in (
        b"GARBAGE / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization Bearer sk-client-oops-12345\r\n\r\n",
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
        writer.write(raw)
        assert (await reader.read()).startswith(b"HTTP/1.0 400")  # then the server closes
        writer.close()
    output = buffer.getvalue()
    assert "Traceback" not in output
    assert "sk-client-oops" not in output
    server = [line for line in lines(buffer) if line["logger"] == "aiohttp.server"]
    assert server  # (aiohttp logs a first request's bad method at debug level only)
    assert {line["level"] for line in server} == {"WARNING"}
    assert "Invalid header token" in server[-1]["message"]


async def test_an_unbilled_stream_s_access_line_has_the_ledger_s_tokens(
    gateway: GatewayFactory, captured: tuple[io.StringIO, Settings]
) -> None:
    """A provider refusal is not billed (the ledger row has no tokens): its access line,
    like its span and metrics, says 0, not the prompt the gateway counted."""
    buffer, settings = captured
    one_try = replace(settings, resilience=replace(settings.resilience, retry_max_attempts=1))
    client = await gateway(one_try)
    response = await client.post(URL, json=chat_body("x [sim fail=500]"), headers=AUTH)
    assert response.status == 502
    await finished(client)
    (line,) = [line for line in lines(buffer) if line["logger"] == "sluice.access"]
    (row,) = await client.app[GATE].ledger.entries()
    assert (row.prompt_tokens, row.completion_tokens) == (0, 0)
    assert (line["prompt_tokens"], line["completion_tokens"]) == (0, 0)
