"""Traces end to end: the gateway exports over real OTLP/HTTP to a receiver started here.

Each test drives real traffic through the gateway and the simulated provider, waits until
the spans it expects have *ended* (a processor on the injected provider says so), flushes
the BatchSpanProcessor through ``Telemetry.flush`` (``force_flush`` on that provider), and
asserts the decoded protobuf: span tree, names, kinds, GenAI attributes, events, status.
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import replace
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from service import registry as registry_module
from service.appkeys import GATE, STREAMS, TELEMETRY
from service.settings import Secret, Settings
from service.simulator import SimStats
from tests.conftest import AUTH, DEV_KEY, GatewayFactory, chat_body, with_provider, with_streams
from tests.otlp import (
    CLIENT,
    RECEIVED,
    SERVER,
    STATUS_ERROR,
    STATUS_UNSET,
    Ended,
    Received,
    receiver_app,
)
from tests.resilient import Sleeps, start, with_resilience
from tests.servers import with_redis
from tests.wire import read_until

URL = "/v1/chat/completions"
CHAT = "POST /v1/chat/completions"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
PROVIDER_KEY = "sk-provider-0123456789abcdef"


@pytest.fixture
async def receiver(aiohttp_server: Any) -> TestServer:
    server: TestServer = await aiohttp_server(receiver_app())
    return server


def traced(settings: Settings, receiver: TestServer, **changes: Any) -> Settings:
    """Tracing on, exporting to ``receiver`` (the standard endpoint form, with the path)."""
    endpoint = str(receiver.make_url("/v1/traces"))
    telemetry = replace(settings.telemetry, traces_endpoint=endpoint, otlp_timeout_s=2.0)
    return replace(settings, telemetry=replace(telemetry, **changes))


def watch(client: TestClient[Any, Any]) -> Ended:
    """Hook an ``Ended`` processor onto the provider the app built (the injected one)."""
    provider = client.app[TELEMETRY].tracer_provider
    assert provider is not None
    ended = Ended()
    provider.add_span_processor(ended)
    return ended


async def exported(
    client: TestClient[Any, Any], receiver: TestServer, ended: Ended, *names: str
) -> list[Received]:
    """Wait until spans named ``names`` (with repeats) ended, flush, return what arrived."""

    def done(seen: list[str]) -> bool:
        return all(seen.count(n) >= names.count(n) for n in names)

    await ended.wait_for(done)
    assert await client.app[TELEMETRY].flush()
    return list(receiver.app[RECEIVED])


def one(spans: list[Received], name: str) -> Received:
    found = [s for s in spans if s.name == name]
    assert len(found) == 1, [s.name for s in spans]
    return found[0]


async def test_streamed_call_continues_traceparent_with_genai_client_span(
    gateway: GatewayFactory, settings: Settings, receiver: TestServer, sim_stats: SimStats
) -> None:
    """A streamed call: SERVER span continuing the client's trace, CLIENT span under it with
    the GenAI attributes, and the provider request carrying the CLIENT span's context."""
    client = await gateway(traced(settings, receiver))
    ended = watch(client)
    headers = {**AUTH, "traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"}
    body = chat_body("Tell me the secret plan [sim chunks=5]", max_tokens=50, temperature=0.3)
    response = await client.post(URL, json=body, headers=headers)
    assert response.status == 200
    assert (await response.text()).endswith("data: [DONE]\n\n")
    spans = await exported(client, receiver, ended, CHAT, "chat gpt-4o-mini")

    server, call = one(spans, CHAT), one(spans, "chat gpt-4o-mini")
    assert (server.kind, server.trace_id, server.parent_id) == (SERVER, TRACE_ID, PARENT_ID)
    assert (call.kind, call.trace_id, call.parent_id) == (CLIENT, TRACE_ID, server.span_id)
    assert server.resource["service.name"] == "sluice"
    assert server.attributes["http.response.status_code"] == 200
    assert server.attributes["http.route"] == "/v1/chat/completions"
    stream_id = response.headers["X-Sluice-Stream-Id"]
    assert server.attributes["sluice.stream.id"] == stream_id
    attributes = call.attributes
    assert attributes["gen_ai.operation.name"] == "chat"
    assert attributes["gen_ai.provider.name"] == "simulated"
    assert attributes["gen_ai.request.model"] == "gpt-4o-mini"
    assert attributes["gen_ai.request.max_tokens"] == 50
    assert attributes["gen_ai.request.temperature"] == pytest.approx(0.3)
    assert attributes["gen_ai.request.stream"] is True
    assert attributes["gen_ai.response.id"].startswith("chatcmpl")
    assert attributes["gen_ai.response.model"].startswith("gpt-4o-mini")
    assert attributes["gen_ai.response.finish_reasons"] == ["stop"]
    assert attributes["gen_ai.usage.output_tokens"] == 5
    assert attributes["gen_ai.usage.input_tokens"] > 0
    assert attributes["gen_ai.response.time_to_first_chunk"] >= 0
    assert attributes["sluice.stream.id"] == stream_id
    assert attributes["sluice.user.hash"] == hashlib.sha256(b"dev").hexdigest()[:16]
    assert attributes["sluice.tenant"] == "dev"
    assert attributes["sluice.retry.attempt"] == 1
    assert attributes["sluice.cache.result"] == "bypass"  # temperature 0.3: not cached
    assert attributes["sluice.cost_usd"] > 0
    assert "error.type" not in attributes
    assert call.status_code == STATUS_UNSET
    call.event("sluice.first_token")
    # The provider saw the CLIENT span as its parent.
    assert sim_stats.traceparents == [f"00-{TRACE_ID}-{call.span_id}-01"]
    # Content is opt-in: by default no prompt or completion text anywhere.
    for span in spans:
        assert "secret plan" not in span.text()
        assert "gen_ai.input.messages" not in span.attributes


async def test_content_is_captured_only_when_enabled_and_redacted(
    gateway: GatewayFactory, settings: Settings, receiver: TestServer
) -> None:
    """SLUICE_OTEL_CAPTURE_CONTENT=true adds the messages; e-mails are still redacted."""
    client = await gateway(traced(settings, receiver, capture_content=True))
    ended = watch(client)
    body = chat_body("Mail bob@example.com the plan [sim chunks=3]", stream=False)
    response = await client.post(URL, json=body, headers=AUTH)
    assert response.status == 200
    completion = (await response.json())["choices"][0]["message"]["content"]
    spans = await exported(client, receiver, ended, CHAT, "chat gpt-4o-mini")
    call = one(spans, "chat gpt-4o-mini")
    assert "the plan" in call.attributes["gen_ai.input.messages"]
    assert "bob@example.com" not in call.text()
    assert "[redacted]" in call.attributes["gen_ai.input.messages"]
    assert completion in call.attributes["gen_ai.output.messages"]
    assert call.attributes["gen_ai.request.stream"] is False


async def test_retried_call_has_one_client_span_per_attempt(
    aiohttp_client: Any, settings: Settings, receiver: TestServer, sim_stats: SimStats
) -> None:
    """A 500 then a success: two CLIENT spans under one SERVER span; the first failed with
    a ``sluice.retry.scheduled`` event carrying the delay; each attempt sent its own span."""
    rig = await start(aiohttp_client, traced(settings, receiver))
    ended = watch(rig.client)
    body = chat_body("hi [sim fail=500 fail_times=1 key=retry-trace chunks=2]")
    response = await rig.client.post(URL, json=body, headers=AUTH)
    assert response.status == 200
    await response.read()
    spans = await exported(
        rig.client, receiver, ended, CHAT, "chat gpt-4o-mini", "chat gpt-4o-mini"
    )

    server = one(spans, CHAT)
    first, second = sorted(
        (s for s in spans if s.name == "chat gpt-4o-mini"),
        key=lambda s: s.attributes["sluice.retry.attempt"],
    )
    assert first.parent_id == second.parent_id == server.span_id
    assert first.status_code == STATUS_ERROR
    assert first.attributes["http.response.status_code"] == 500
    assert first.attributes["error.type"]
    retry = first.event("sluice.retry.scheduled")
    assert retry["sluice.retry.delay_s"] == pytest.approx(rig.sleeps.delays[0])
    assert retry["sluice.retry.attempt"] == 2
    assert second.attributes["sluice.retry.attempt"] == 2
    assert second.status_code == STATUS_UNSET
    assert second.attributes["gen_ai.usage.output_tokens"] == 2
    assert [tp.split("-")[2] for tp in sim_stats.traceparents] == [first.span_id, second.span_id]


async def test_a_retry_after_the_client_left_still_gets_its_client_span(
    aiohttp_client: Any,
    settings: Settings,
    receiver: TestServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The client leaves during the backoff; the stream goes on in its grace window and the
    second attempt answers: it has its CLIENT span too, though the SERVER span has ended.
    (Over a WebSocket, which names the stream at once: an SSE client that leaves before its
    headers could never come back, so its stream stops without a grace window.)"""
    backing_off, resume = asyncio.Event(), asyncio.Event()

    async def held_sleep(self: Sleeps, delay: float) -> None:
        self.delays.append(delay)
        backing_off.set()
        await resume.wait()

    monkeypatch.setattr(Sleeps, "__call__", held_sleep)
    rig = await start(
        aiohttp_client, with_streams(traced(settings, receiver), disconnect_grace_s=60)
    )
    ended = watch(rig.client)
    body = chat_body("hi [sim fail=500 fail_times=1 key=left-trace chunks=2]")
    ws = await rig.client.ws_connect("/v1/ws", headers=AUTH)
    await ws.send_json({"type": "chat.completion.create", "request_id": "a", "body": body})
    assert (await ws.receive_json())["type"] == "started"
    await backing_off.wait()
    await ws.close()  # the client gives up while the gateway waits to retry
    await ended.wait_for(lambda seen: "GET /v1/ws" in seen)  # its SERVER span has ended
    resume.set()
    spans = await exported(rig.client, receiver, ended, "chat gpt-4o-mini", "chat gpt-4o-mini")
    attempts = sorted(
        (s for s in spans if s.name == "chat gpt-4o-mini"),
        key=lambda s: s.attributes["sluice.retry.attempt"],
    )
    assert [a.attributes["sluice.retry.attempt"] for a in attempts] == [1, 2]
    assert attempts[1].attributes["gen_ai.usage.output_tokens"] == 2


async def test_aborted_stream_ends_client_span_with_its_real_status(
    gateway: GatewayFactory, settings: Settings, receiver: TestServer, sim_stats: SimStats
) -> None:
    """The client leaves mid-stream: after the grace window the CLIENT span ends in error
    (``client_gone``) with first-token, disconnect and grace-expired events; never left open."""
    custom = with_streams(traced(settings, receiver), disconnect_grace_s=0.05)
    client = await gateway(custom)
    ended = watch(client)
    body = chat_body("long [sim chunks=500 delay_ms=20]")
    response = await client.post(URL, json=body, headers=AUTH)
    await read_until(response, b"id: 3\n")
    stream = client.app[STREAMS].get(response.headers["X-Sluice-Stream-Id"])
    assert stream is not None
    response.close()
    await asyncio.wait_for(client.app[STREAMS].settled(stream), 10)  # finish hooks included
    spans = await exported(client, receiver, ended, CHAT, "chat gpt-4o-mini")

    call = one(spans, "chat gpt-4o-mini")
    assert call.status_code == STATUS_ERROR
    assert call.attributes["error.type"] == "client_gone"
    assert call.attributes["sluice.stream.status"] == "client_gone"
    assert 0 < call.attributes["gen_ai.usage.output_tokens"] < 500
    for name in ("sluice.first_token", "sluice.client.disconnected", "sluice.grace.expired"):
        call.event(name)
    await sim_stats.wait_for(lambda s: s.aborted == 1)


async def test_breaker_open_rejection_is_a_server_span_with_a_rejected_event(
    aiohttp_client: Any, settings: Settings, receiver: TestServer
) -> None:
    """A failure opens the breaker (event on the failing request's span); the next request
    is refused before the provider: 503, ``sluice.rejected`` (breaker), no CLIENT span."""
    custom = with_resilience(traced(settings, receiver), breaker_fail_max=1, retry_max_attempts=1)
    rig = await start(aiohttp_client, custom)
    ended = watch(rig.client)
    failing = await rig.client.post(URL, json=chat_body("x [sim fail=500]"), headers=AUTH)
    assert failing.status == 502
    refused = await rig.client.post(URL, json=chat_body("y"), headers=AUTH)
    assert refused.status == 503
    assert (await refused.json())["error"]["code"] == "circuit_open"
    spans = await exported(rig.client, receiver, ended, CHAT, CHAT, "chat gpt-4o-mini")

    servers = [s for s in spans if s.name == CHAT]
    calls = [s for s in spans if s.name == "chat gpt-4o-mini"]
    assert len(calls) == 1
    first = next(s for s in servers if s.span_id == calls[0].parent_id)
    second = next(s for s in servers if s is not first)
    change = first.event("sluice.breaker.state_change")
    assert (change["sluice.breaker.from"], change["sluice.breaker.to"]) == ("closed", "open")
    assert second.event("sluice.rejected")["sluice.rejection.reason"] == "breaker"
    assert second.attributes["http.response.status_code"] == 503
    assert second.attributes["error.type"] == "circuit_open"
    assert second.trace_id != first.trace_id


async def test_resumed_stream_records_a_resume_event(
    gateway: GatewayFactory, settings: Settings, receiver: TestServer
) -> None:
    """Resuming a stream adds ``sluice.stream.resumed`` to the resume request's span."""
    client = await gateway(traced(settings, receiver))
    ended = watch(client)
    response = await client.post(URL, json=chat_body("r [sim chunks=3]"), headers=AUTH)
    await response.read()
    stream_id = response.headers["X-Sluice-Stream-Id"]
    resumed = await client.get(
        f"/v1/streams/{stream_id}/events", headers={**AUTH, "Last-Event-ID": "2"}
    )
    assert resumed.status == 200
    await resumed.read()
    name = "GET /v1/streams/{stream_id}/events"
    spans = await exported(client, receiver, ended, CHAT, name)
    event = one(spans, name).event("sluice.stream.resumed")
    assert event == {"sluice.stream.id": stream_id, "sluice.resume.after": 2}


async def test_a_resume_served_from_another_replicas_journal_records_the_event(
    gateway: GatewayFactory, settings: Settings, receiver: TestServer, redis_url: str
) -> None:
    """Replica B serves a stream A generated (from the Redis journal): B's request span
    gets ``sluice.stream.resumed`` all the same."""
    shared = traced(with_redis(settings, redis_url), receiver)
    a, b = await gateway(shared), await gateway(shared)
    response = await a.post(URL, json=chat_body("r [sim chunks=3]"), headers=AUTH)
    await response.read()
    stream_id = response.headers["X-Sluice-Stream-Id"]
    assert b.app[STREAMS].get(stream_id) is None  # B has only the journal
    ended = watch(b)
    resumed = await b.get(f"/v1/streams/{stream_id}/events", headers={**AUTH, "Last-Event-ID": "2"})
    assert resumed.status == 200
    await resumed.read()
    name = "GET /v1/streams/{stream_id}/events"
    spans = await exported(b, receiver, ended, name)
    event = one(spans, name).event("sluice.stream.resumed")
    assert event == {"sluice.stream.id": stream_id, "sluice.resume.after": 2}


async def test_no_key_reaches_a_span(
    gateway: GatewayFactory, settings: Settings, receiver: TestServer, sim_stats: SimStats
) -> None:
    """Neither the provider key (even echoed back by the provider) nor a client key is in
    any exported span: names, attributes, events, status messages."""
    custom = with_provider(traced(settings, receiver), api_key=Secret(PROVIDER_KEY))
    client = await gateway(custom)
    ended = watch(client)
    wrong = await client.post(
        URL, json=chat_body(), headers={"Authorization": "Bearer sk-client-wrong-key-123456"}
    )
    assert wrong.status == 401
    echoed = await client.post(URL, json=chat_body("e [sim fail=400 echo_key=1]"), headers=AUTH)
    assert echoed.status == 400
    spans = await exported(client, receiver, ended, CHAT, CHAT, "chat gpt-4o-mini")
    assert PROVIDER_KEY in sim_stats.authorizations[0]  # the provider did get it
    for span in spans:
        for secret in (PROVIDER_KEY, "sk-client-wrong-key-123456", DEV_KEY):
            assert secret not in span.text()
    call = one(spans, "chat gpt-4o-mini")
    assert call.status_code == STATUS_ERROR
    assert call.attributes["http.response.status_code"] == 400


async def test_client_words_in_models_and_stop_sequences_are_redacted_on_spans(
    gateway: GatewayFactory, settings: Settings, receiver: TestServer
) -> None:
    """With passthrough models the model name is the client's, like its stop sequences:
    an e-mail address in either never reaches a span."""
    client = await gateway(with_provider(traced(settings, receiver), models=()))
    ended = watch(client)
    model = "gpt-4o-mini-alice@example.com"
    body = chat_body("hi [sim chunks=2]", model=model, stop=["carol@example.com"])
    response = await client.post(URL, json=body, headers=AUTH)
    assert response.status == 200
    await response.read()
    await ended.wait_for(lambda seen: CHAT in seen and any(n.startswith("chat ") for n in seen))
    assert await client.app[TELEMETRY].flush()
    spans = list(receiver.app[RECEIVED])
    assert [s.kind for s in spans].count(CLIENT) == 1
    for span in spans:
        assert "example.com" not in span.text(), span.name


async def test_nothing_configured_means_no_provider_and_no_traceparent(
    gateway: GatewayFactory, sim_stats: SimStats
) -> None:
    """Without an OTLP endpoint no tracer provider exists and nothing is propagated."""
    client = await gateway()
    assert client.app[TELEMETRY].tracer_provider is None
    response = await client.post(
        URL,
        json=chat_body("q [sim chunks=2]"),
        headers={**AUTH, "traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"},
    )
    assert response.status == 200
    await response.read()
    assert sim_stats.traceparents == [""]


async def test_websocket_streams_get_their_own_server_spans(
    gateway: GatewayFactory, settings: Settings, receiver: TestServer
) -> None:
    """Each WebSocket message stream is a SERVER span under the socket's span, with its
    CLIENT span under it; the socket's span ends when the socket closes."""
    client = await gateway(traced(settings, receiver))
    ended = watch(client)
    ws = await client.ws_connect("/v1/ws", headers=AUTH)
    for request_id in ("r1", "r2"):
        frame = {
            "type": "chat.completion.create",
            "request_id": request_id,
            "body": chat_body("w [sim chunks=2]"),
        }
        await ws.send_json(frame)
    finals = 0
    while finals < 2:
        message = await ws.receive_json()
        finals += message["type"] in ("done", "error")
    await ws.close()
    message_span = "WS chat.completion.create"
    spans = await exported(
        client,
        receiver,
        ended,
        "GET /v1/ws",
        message_span,
        message_span,
        "chat gpt-4o-mini",
        "chat gpt-4o-mini",
    )
    socket = one(spans, "GET /v1/ws")
    messages = [s for s in spans if s.name == message_span]
    calls = [s for s in spans if s.name == "chat gpt-4o-mini"]
    assert {m.parent_id for m in messages} == {socket.span_id}
    assert all(m.kind == SERVER and m.attributes["sluice.outcome"] == "completed" for m in messages)
    assert sorted(c.parent_id for c in calls) == sorted(m.span_id for m in messages)
    assert {c.attributes["gen_ai.usage.output_tokens"] for c in calls} == {2}


async def test_shutdown_ends_open_streams_spans_and_flushes_them(
    gateway: GatewayFactory, settings: Settings, receiver: TestServer
) -> None:
    """Closing the app drains (here: at once) and only then flushes: the stream cut by the
    shutdown arrives with error.type ``shutdown``, without any explicit flush."""
    custom = traced(settings, receiver)
    custom = replace(custom, server=replace(custom.server, drain_s=0.0))
    client = await gateway(custom)
    response = await client.post(
        URL, json=chat_body("z [sim chunks=500 delay_ms=20]"), headers=AUTH
    )
    await read_until(response, b"id: 2\n")
    await client.close()
    call = one(list(receiver.app[RECEIVED]), "chat gpt-4o-mini")
    assert call.status_code == STATUS_ERROR
    assert call.attributes["error.type"] == "shutdown"


async def test_a_generation_span_ends_when_its_stream_did_not_when_it_was_settled(
    gateway: GatewayFactory,
    settings: Settings,
    receiver: TestServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Ended streams are settled in batches (``registry.py``): the CLIENT span still ends at
    the stream's own end, however long its settlement waited."""
    monkeypatch.setattr(registry_module, "RETIRE_BATCH_S", 3600.0)  # only when asked
    client = await gateway(traced(settings, receiver))
    ended = watch(client)
    response = await client.post(URL, json=chat_body("n [sim chunks=2]"), headers=AUTH)
    await response.read()
    stream = client.app[STREAMS].get(response.headers["X-Sluice-Stream-Id"])
    assert stream is not None
    assert stream.ended_at is not None
    assert "chat gpt-4o-mini" not in ended.names  # not yet: its stream is not settled
    await client.app[STREAMS].settled(stream)
    spans = await exported(client, receiver, ended, CHAT, "chat gpt-4o-mini")
    call = one(spans, "chat gpt-4o-mini")
    assert call.end_ns == int(stream.ended_at * 1e9)


async def test_sampled_out_requests_export_nothing_but_still_propagate(
    gateway: GatewayFactory, settings: Settings, receiver: TestServer, sim_stats: SimStats
) -> None:
    """OTEL_TRACES_SAMPLER=always_off: no span is exported; the provider still gets a
    traceparent, flagged not-sampled, so downstream systems agree."""
    client = await gateway(traced(settings, receiver, sampler="always_off"))
    response = await client.post(URL, json=chat_body("n [sim chunks=2]"), headers=AUTH)
    await response.read()
    stream = client.app[STREAMS].get(response.headers["X-Sluice-Stream-Id"])
    assert stream is not None
    await client.app[STREAMS].settled(stream)
    assert await client.app[TELEMETRY].flush()
    assert receiver.app[RECEIVED] == []
    flags = int(sim_stats.traceparents[0].rsplit("-", 1)[1], 16)
    assert flags & 1 == 0  # the W3C "sampled" bit


@pytest.mark.parametrize(
    ("limits", "reason", "code"),
    [
        ({"user_rpm": 1}, "rate", "rate_limit_exceeded"),
        ({"user_daily_usd": 1e-9}, "budget", "budget_exceeded"),
    ],
)
async def test_rate_and_budget_rejections_are_events_on_the_server_span(
    gateway: GatewayFactory,
    settings: Settings,
    receiver: TestServer,
    limits: dict[str, Any],
    reason: str,
    code: str,
) -> None:
    """A request refused by a rate limit or a budget: its SERVER span has a ``sluice.rejected``
    event naming the reason, ``error.type`` the code, and no CLIENT span exists for it."""
    custom = traced(settings, receiver)
    if "user_rpm" in limits:
        custom = replace(custom, limits=replace(custom.limits, **limits))
    else:
        custom = replace(custom, money=replace(custom.money, **limits))
    client = await gateway(custom)
    ended = watch(client)
    responses = [
        await client.post(URL, json=chat_body(f"q{i} [sim chunks=2]"), headers=AUTH)
        for i in range(2)
    ]
    for response in responses:
        await response.read()
    refused = responses[-1]
    assert refused.status == 429
    assert (await refused.json())["error"]["code"] == code
    calls = 1 if reason == "rate" else 0
    spans = await exported(client, receiver, ended, CHAT, CHAT, *["chat gpt-4o-mini"] * calls)
    assert len([s for s in spans if s.kind == CLIENT]) == calls
    rejected = [s for s in spans if s.name == CHAT and s.attributes["http.response.status_code"]]
    refused_span = next(s for s in rejected if s.attributes["http.response.status_code"] == 429)
    assert refused_span.event("sluice.rejected") == {"sluice.rejection.reason": reason}
    assert refused_span.attributes["error.type"] == code
    assert refused_span.attributes["sluice.outcome"] == "rejected"


async def test_cancelled_sse_stream_ends_its_client_span_cancelled(
    gateway: GatewayFactory, settings: Settings, receiver: TestServer, sim_stats: SimStats
) -> None:
    """``POST /v1/streams/{id}/cancel`` mid-stream: the CLIENT span ends (never left open)
    with ``error.type`` cancelled and an error status; the provider call is aborted."""
    client = await gateway(traced(settings, receiver))
    ended = watch(client)
    response = await client.post(
        URL, json=chat_body("c [sim chunks=500 delay_ms=20]"), headers=AUTH
    )
    await read_until(response, b"id: 2\n")
    stream_id = response.headers["X-Sluice-Stream-Id"]
    cancel = await client.post(f"/v1/streams/{stream_id}/cancel", headers=AUTH)
    assert cancel.status == 200
    assert b"stream_cancelled" in await response.read()
    cancel_route = "POST /v1/streams/{stream_id}/cancel"
    spans = await exported(client, receiver, ended, CHAT, cancel_route, "chat gpt-4o-mini")
    call = one(spans, "chat gpt-4o-mini")
    assert call.status_code == STATUS_ERROR
    assert call.attributes["error.type"] == "cancelled"
    assert call.attributes["sluice.stream.status"] == "cancelled"
    assert 0 < call.attributes["gen_ai.usage.output_tokens"] < 500
    assert one(spans, CHAT).attributes["sluice.outcome"] == "cancelled"
    await sim_stats.wait_for(lambda s: s.aborted == 1)


async def test_websocket_cancel_and_refusal_are_traced(
    gateway: GatewayFactory, settings: Settings, receiver: TestServer
) -> None:
    """On a socket: a cancelled message stream ends its SERVER and CLIENT spans with
    ``error.type`` cancelled; a message refused by the rate limit is a ``sluice.rejected``
    event on the socket's span (no message span, no CLIENT span)."""
    custom = traced(settings, receiver)
    client = await gateway(replace(custom, limits=replace(custom.limits, user_rpm=1)))
    ended = watch(client)
    ws = await client.ws_connect("/v1/ws", headers=AUTH)
    long = chat_body("w [sim chunks=500 delay_ms=20]")
    await ws.send_json({"type": "chat.completion.create", "request_id": "a", "body": long})
    assert (await ws.receive_json())["type"] == "started"
    assert (await ws.receive_json())["type"] == "chunk"
    await ws.send_json({"type": "cancel", "request_id": "a"})
    while (final := await ws.receive_json())["type"] == "chunk":
        pass
    assert final["error"]["code"] == "stream_cancelled"
    await ws.send_json({"type": "chat.completion.create", "request_id": "b", "body": long})
    refused = await ws.receive_json()
    assert (refused["type"], refused["error"]["code"]) == ("error", "rate_limit_exceeded")
    await ws.close()
    message_span = "WS chat.completion.create"
    spans = await exported(client, receiver, ended, "GET /v1/ws", message_span, "chat gpt-4o-mini")
    socket, message = one(spans, "GET /v1/ws"), one(spans, message_span)
    call = one(spans, "chat gpt-4o-mini")
    assert (message.parent_id, call.parent_id) == (socket.span_id, message.span_id)
    assert message.attributes["sluice.outcome"] == "cancelled"
    assert message.attributes["error.type"] == "cancelled"
    assert message.status_code == STATUS_UNSET  # the client's choice, not a failure
    assert (call.status_code, call.attributes["error.type"]) == (STATUS_ERROR, "cancelled")
    assert socket.event("sluice.rejected") == {"sluice.rejection.reason": "rate"}


async def test_a_stream_that_finishes_during_the_drain_is_flushed_after_it(
    gateway: GatewayFactory, settings: Settings, receiver: TestServer
) -> None:
    """Shutdown waits for a running stream (the drain) and only then flushes: its CLIENT
    span arrives complete (all tokens, no error) without any explicit flush."""
    client = await gateway(traced(settings, receiver))
    response = await client.post(URL, json=chat_body("d [sim chunks=40 delay_ms=5]"), headers=AUTH)
    await read_until(response, b"id: 2\n")
    assert receiver.app[RECEIVED] == []  # batched: nothing exported mid-stream
    await client.close()
    call = one(list(receiver.app[RECEIVED]), "chat gpt-4o-mini")
    assert call.status_code == STATUS_UNSET
    assert "error.type" not in call.attributes
    assert call.attributes["gen_ai.usage.output_tokens"] == 40
    assert call.attributes["gen_ai.response.finish_reasons"] == ["stop"]


async def test_websocket_resume_is_an_event_on_the_new_sockets_span(
    gateway: GatewayFactory, settings: Settings, receiver: TestServer
) -> None:
    """A stream left by one socket and resumed on another: the second socket's SERVER span
    has ``sluice.stream.resumed``; the CLIENT span (still running) records it too."""
    client = await gateway(traced(settings, receiver))
    ended = watch(client)
    body = chat_body("r [sim chunks=500 delay_ms=20]")  # still running when resumed
    first = await client.ws_connect("/v1/ws", headers=AUTH)
    await first.send_json({"type": "chat.completion.create", "request_id": "a", "body": body})
    stream_id = (await first.receive_json())["stream_id"]
    assert (await first.receive_json())["seq"] == 1
    await first.close()
    second = await client.ws_connect("/v1/ws", headers=AUTH)
    resume = {"type": "resume", "stream_id": stream_id, "last_seq": 1, "request_id": "b"}
    await second.send_json(resume)
    assert (await second.receive_json())["seq"] == 2
    await second.send_json({"type": "cancel", "request_id": "b"})
    while (frame := await second.receive_json())["type"] == "chunk":
        pass
    assert frame["error"]["code"] == "stream_cancelled"
    await second.close()
    spans = await exported(client, receiver, ended, "GET /v1/ws", "GET /v1/ws", "chat gpt-4o-mini")
    sockets = [s for s in spans if s.name == "GET /v1/ws"]
    resumed = [s for s in sockets if any(e == "sluice.stream.resumed" for e, _ in s.events)]
    assert len(resumed) == 1
    event = resumed[0].event("sluice.stream.resumed")
    assert event == {"sluice.stream.id": stream_id, "sluice.resume.after": 1}
    one(spans, "chat gpt-4o-mini").event("sluice.stream.resumed")


async def test_grace_expiry_during_an_attempt_in_flight_is_an_event_on_its_span(
    gateway: GatewayFactory, settings: Settings, receiver: TestServer
) -> None:
    """The response went out (keepalives) while the provider still held its headers; the
    client leaves and the window ends with the attempt in flight: its CLIENT span carries
    the disconnect and grace-expired events, and ends ``client_gone``."""
    custom = with_streams(traced(settings, receiver), disconnect_grace_s=0.05, keepalive_s=0.1)
    client = await gateway(custom)
    ended = watch(client)
    body = chat_body("held [sim header_delay_ms=600000]")
    response = await client.post(URL, json=body, headers=AUTH)
    assert response.status == 200
    await read_until(response, b": keepalive\n")
    stream = client.app[STREAMS].get(response.headers["X-Sluice-Stream-Id"])
    assert stream is not None
    response.close()
    await asyncio.wait_for(client.app[STREAMS].settled(stream), 10)
    spans = await exported(client, receiver, ended, CHAT, "chat gpt-4o-mini")
    call = one(spans, "chat gpt-4o-mini")
    assert call.attributes["error.type"] == "client_gone"
    for name in ("sluice.client.disconnected", "sluice.grace.expired"):
        call.event(name)


async def test_a_stream_that_fails_after_its_200_marks_the_server_span(
    gateway: GatewayFactory, settings: Settings, receiver: TestServer
) -> None:
    """The error went out as the stream's last event, under a 200: the SERVER span keeps
    an unset status (HTTP said 200) but names the failure in ``error.type``."""
    client = await gateway(with_resilience(traced(settings, receiver), retry_max_attempts=1))
    ended = watch(client)
    response = await client.post(
        URL, json=chat_body("x [sim chunks=5 error_after=2]"), headers=AUTH
    )
    assert response.status == 200
    await response.read()
    spans = await exported(client, receiver, ended, CHAT, "chat gpt-4o-mini")
    server = one(spans, CHAT)
    assert server.attributes["sluice.outcome"] == "provider_error"
    assert (
        server.attributes["error.type"] == one(spans, "chat gpt-4o-mini").attributes["error.type"]
    )


async def test_a_providers_error_code_is_redacted_on_spans(
    gateway: GatewayFactory, settings: Settings, receiver: TestServer, aiohttp_server: Any
) -> None:
    """A provider's error ``code`` becomes ``error.type``: it passes the redaction patterns
    like any other value a span carries (an e-mail in it reached two spans)."""

    async def refuse(request: web.Request) -> web.Response:
        error = {"message": "no", "type": "invalid_request_error", "code": "alice@example.com"}
        return web.json_response({"error": error}, status=400)

    app = web.Application()
    app.router.add_post("/v1/chat/completions", refuse)
    provider = await aiohttp_server(app)
    base_url = str(provider.make_url("/v1"))
    client = await gateway(with_provider(traced(settings, receiver), base_url=base_url))
    ended = watch(client)
    response = await client.post(URL, json=chat_body("hi"), headers=AUTH)
    assert response.status == 400
    await response.read()
    await ended.wait_for(lambda seen: CHAT in seen and "chat gpt-4o-mini" in seen)
    assert await client.app[TELEMETRY].flush()
    spans = list(receiver.app[RECEIVED])
    assert one(spans, "chat gpt-4o-mini").attributes["error.type"] == "[redacted]"
    for span in spans:
        assert "example.com" not in span.text(), span.name


@pytest.mark.parametrize(
    ("text", "stream", "status"),
    [
        ("slow [sim header_delay_ms=60000]", True, 504),  # went out, then the deadline
        ("cut [sim chunks=6 reset_after=2]", False, 502),  # answered, then broken off
    ],
)
async def test_a_billed_failed_attempt_carries_what_is_billed(
    gateway: GatewayFactory,
    settings: Settings,
    receiver: TestServer,
    text: str,
    stream: bool,
    status: int,
) -> None:
    """An attempt that failed after the provider may have worked on it is billed its prompt:
    its CLIENT span says so, as the ledger row does (tokens and cost)."""
    deadlines = {"first_token_timeout_s": 0.2, "completion_timeout_s": 0.2}
    client = await gateway(with_provider(traced(settings, receiver), **deadlines))
    ended = watch(client)
    response = await client.post(URL, json=chat_body(text, stream=stream), headers=AUTH)
    assert response.status == status
    stream_id = response.headers["X-Sluice-Stream-Id"]
    live = client.app[STREAMS].get(stream_id)
    assert live is not None
    await client.app[STREAMS].settled(live)
    spans = await exported(client, receiver, ended, CHAT, "chat gpt-4o-mini")
    (row,) = [e for e in await client.app[GATE].ledger.entries() if e.stream_id == stream_id]
    call = one(spans, "chat gpt-4o-mini")
    assert call.status_code == STATUS_ERROR
    assert row.prompt_tokens > 0
    assert call.attributes["gen_ai.usage.input_tokens"] == row.prompt_tokens
    assert call.attributes["gen_ai.usage.output_tokens"] == row.completion_tokens
    assert call.attributes["sluice.cost_usd"] == row.cost_usd
