"""``service.relay`` through the whole gateway: SSE headers, byte-exact relay, no buffering,
keepalives while the provider is silent, on a test-controlled loop clock (issue 2, points
2 and 7).

(``test_relay.py`` covers the writer alone when a client vanishes mid-write.)
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from service.appkeys import STREAMS
from service.handlers import chat as chat_module
from service.handlers.chat import _wait_for_answer
from service.relay import STREAM_ID_HEADER
from service.settings import Settings
from service.simulator import SimStats
from service.stream import Owner, Stream, StreamStatus
from tests.conftest import AUTH, GatewayFactory, chat_body, with_provider, with_streams
from tests.resilient import with_resilience
from tests.wire import read_until, sse_blocks, sse_data

KEEPALIVE = b": keepalive\n"

URL = "/v1/chat/completions"


def _quick(settings: Settings, **streams: float) -> Settings:
    """No grace or drain window: a stalled provider is let go as soon as the client leaves."""
    settings = with_streams(settings, disconnect_grace_s=0.0, **streams)
    return replace(settings, server=replace(settings.server, drain_s=0.0))


async def test_sse_headers_and_numbered_events(gateway: GatewayFactory) -> None:
    """text/event-stream, no-cache, no proxy buffering; ids 1..n; [DONE] is the last event."""
    client = await gateway()
    response = await client.post(URL, json=chat_body("[sim chunks=4]"), headers=AUTH)
    assert response.headers["Content-Type"] == "text/event-stream; charset=utf-8"
    assert response.headers["Cache-Control"] == "no-cache"
    assert response.headers["X-Accel-Buffering"] == "no"
    blocks = sse_blocks(await response.text())
    ids = [int(b.split("\n")[0].removeprefix("id: ")) for b in blocks]
    assert ids == list(range(1, 1 + 1 + 4 + 1 + 1))
    assert blocks[-1].endswith("data: [DONE]")


async def test_relay_is_byte_exact(gateway: GatewayFactory, sim_url: str) -> None:
    """Each data payload is the provider's bytes as sent: nothing re-serialised."""
    text = "exact [sim chunks=6 created=1700000000]"
    body = chat_body(text, stream_options={"include_usage": True})
    client = await gateway()
    relayed = sse_data(await (await client.post(URL, json=body, headers=AUTH)).text())
    async with aiohttp.ClientSession() as session:
        direct_response = await session.post(f"{sim_url}/chat/completions", json=body)
        direct = sse_data(await direct_response.text())
    assert relayed == direct
    assert orjson.loads(relayed[-2])["usage"]["completion_tokens"] == 6


async def test_usage_chunk_withheld_unless_asked(
    gateway: GatewayFactory, sim_stats: SimStats
) -> None:
    """The gateway always asks the provider for usage; a client that did not ask gets none."""
    client = await gateway()
    data = sse_data(
        await (await client.post(URL, json=chat_body("[sim chunks=3]"), headers=AUTH)).text()
    )
    payloads = [orjson.loads(d) for d in data[:-1]]
    assert all(p.get("choices") for p in payloads)  # no choices-less usage chunk
    assert len(payloads) == 1 + 3 + 1


async def test_events_flow_while_the_provider_stalls(
    gateway: GatewayFactory, settings: Settings, sim_stats: SimStats
) -> None:
    """No buffering: with the provider stalled after 3 words, all 3 have reached the client."""
    client = await gateway(_quick(settings))
    response = await client.post(URL, json=chat_body("[sim chunks=10 stall_after=3]"), headers=AUTH)
    seen = b""
    while seen.count(b"\n\n") < 4:  # the role chunk and three words
        seen += await read_until(response, b"\n\n")
    assert seen.count(b"id: ") == 4
    assert sim_stats.open == 1  # the provider has not finished: nothing was waiting on it
    response.close()
    await sim_stats.wait_for(lambda s: s.aborted == 1)


async def test_headers_go_out_at_once_when_no_event_is_ready(
    gateway: GatewayFactory, settings: Settings, sim_stats: SimStats
) -> None:
    """The headers wait for the first events to share a write, but not for an event that is
    not coming yet: a provider that answered and stays silent, and a resume past the last
    event of a stalled stream, both get their headers (and stream id) at once. (Were they
    held, these requests would hang until the hour-long keepalive.)"""
    client = await gateway(_quick(with_streams(settings, keepalive_s=3600.0)))
    async with asyncio.timeout(30):  # a failure guard, not a wait
        silent = await client.post(URL, json=chat_body("[sim first_delay_ms=600000]"), headers=AUTH)
        assert silent.status == 200
        assert silent.headers[STREAM_ID_HEADER].startswith("strm_")
        silent.close()

        stalled = await client.post(
            URL, json=chat_body("[sim chunks=5 stall_after=1]"), headers=AUTH
        )
        seen = b""
        while seen.count(b"\n\n") < 2:  # the role chunk and one word; then nothing
            seen += await read_until(stalled, b"\n\n")
        stream_id = stalled.headers[STREAM_ID_HEADER]
        resumed = await client.get(
            f"/v1/streams/{stream_id}/events", headers={**AUTH, "Last-Event-ID": "2"}
        )
        assert resumed.status == 200
        assert resumed.headers[STREAM_ID_HEADER] == stream_id
        resumed.close()
        stalled.close()
    await sim_stats.wait_for(lambda s: s.aborted == 2)


class LoopClock:
    """The running loop's clock, moved forward by the test: timers (the keepalive ticker's
    ``asyncio.sleep``) fire as if that much time had passed, without waiting for it."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        loop = asyncio.get_running_loop()
        real = loop.time
        self._offset = 0.0
        monkeypatch.setattr(loop, "time", lambda: real() + self._offset)

    def advance(self, seconds: float) -> None:
        self._offset += seconds


@pytest.fixture
async def clock(monkeypatch: pytest.MonkeyPatch) -> LoopClock:
    return LoopClock(monkeypatch)  # before the gateway starts, so its ticker runs on it


async def _settle(client: TestClient[web.Request, web.Application]) -> None:
    """Let the loop run due timers and deliver what they wrote: one round trip to /livez."""
    assert (await client.get("/livez")).status == 200


@pytest.mark.parametrize(
    ("directive", "events_first"),
    [
        ("[sim first_delay_ms=600000]", 0),  # waiting for the first token
        ("[sim chunks=5 stall_after=2]", 3),  # a stall mid-stream: role + two words first
    ],
)
async def test_keepalive_every_15_s_on_a_controlled_clock(
    gateway: GatewayFactory,
    settings: Settings,
    sim_stats: SimStats,
    clock: LoopClock,
    directive: str,
    events_first: int,
) -> None:
    """While the provider is silent, the default settings send one ``: keepalive`` comment
    per 15 s of loop time, none in between, and nothing else (no data, no error)."""
    assert settings.streams.keepalive_s == 15.0
    # Provider deadlines beyond the 45 s moved here (the idle one is 30 s by default).
    client = await gateway(
        with_provider(_quick(settings), first_token_timeout_s=600.0, idle_timeout_s=600.0)
    )
    response = await client.post(URL, json=chat_body(directive), headers=AUTH)
    assert response.status == 200
    seen = b""
    while seen.count(b"\n\n") < events_first:
        seen += await read_until(response, b"\n\n")
    assert seen.count(b"id: ") == events_first
    await _settle(client)
    assert response.content.read_nowait() == b""  # silent provider, no tick yet: nothing

    clock.advance(15.0)  # the first tick (the ticker started with the app, just before)
    assert await read_until(response, KEEPALIVE) == KEEPALIVE
    for _ in range(2):
        clock.advance(14.0)  # (< 1 s of real time passes in this test)
        await _settle(client)
        assert response.content.read_nowait() == b""  # not before the next 15 s tick
        clock.advance(1.0)
        assert await read_until(response, KEEPALIVE) == KEEPALIVE
    assert sim_stats.open == 1  # the provider is still silent; the stream is still open
    response.close()
    await sim_stats.wait_for(lambda s: s.aborted == 1)


async def _sent(
    client: TestClient[web.Request, web.Application], body: dict[str, object], sim: SimStats
) -> asyncio.Task[aiohttp.ClientResponse]:
    """POST ``body`` without waiting for the answer; return once the provider has it."""
    pending = asyncio.create_task(client.post(URL, json=body, headers=AUTH))
    await sim.wait_for(lambda s: s.requests == 1)
    return pending


async def test_a_provider_holding_its_headers_gets_the_200_out_after_one_interval(
    gateway: GatewayFactory, settings: Settings, sim_stats: SimStats, clock: LoopClock
) -> None:
    """Nothing goes out while the provider may still refuse (a refusal keeps its status);
    after one keepalive interval the 200 goes out with a keepalive, and keepalives follow."""
    client = await gateway(
        with_provider(_quick(settings), first_token_timeout_s=600.0, idle_timeout_s=600.0)
    )
    body = chat_body("[sim header_delay_ms=600000]")
    pending = await _sent(client, body, sim_stats)
    clock.advance(14.0)
    await _settle(client)
    assert not pending.done()
    clock.advance(1.0)
    response = await pending
    assert response.status == 200
    assert response.headers["Content-Type"] == "text/event-stream; charset=utf-8"
    assert await read_until(response, KEEPALIVE) == KEEPALIVE
    clock.advance(15.0)
    assert await read_until(response, KEEPALIVE) == KEEPALIVE
    assert sim_stats.open == 0  # the provider has still not answered
    response.close()
    await sim_stats.wait_for(lambda s: s.aborted == 1)


async def test_a_retry_waiting_out_its_delay_keeps_the_refusals_status(
    gateway: GatewayFactory, settings: Settings, sim_stats: SimStats, clock: LoopClock
) -> None:
    """The gateway retries after a 20 s Retry-After: nothing goes out meanwhile (the
    keepalive interval passes during the delay), so the retry's refusal is a plain 429
    with its Retry-After, which the SDKs act on; not a 200 with an error event."""
    custom = with_resilience(_quick(settings), retry_max_attempts=2, retry_budget_s=100.0)
    client = await gateway(custom)
    body = chat_body("[sim fail=429 retry_after=20]")
    pending = await _sent(client, body, sim_stats)
    await _settle(client)
    clock.advance(15.0)
    await _settle(client)
    assert not pending.done()
    clock.advance(5.5)
    response = await pending
    assert response.status == 429
    assert response.headers["Retry-After"] == "20"
    assert (await response.json())["error"]["type"] == "rate_limit_error"
    assert sim_stats.requests == 2


async def test_after_a_retry_a_provider_holding_its_headers_gets_the_200_out(
    gateway: GatewayFactory, settings: Settings, sim_stats: SimStats, clock: LoopClock
) -> None:
    """A refusal retried at once, then an attempt the provider holds: once the interval
    has passed with that attempt in flight, the 200 and a keepalive go out; the answer,
    when it comes, streams as usual."""
    client = await gateway(
        with_provider(_quick(settings), first_token_timeout_s=600.0, idle_timeout_s=600.0)
    )
    body = chat_body("[sim fail=503 retry_after=1 fail_times=1 key=held header_delay_ms=30000]")
    pending = await _sent(client, body, sim_stats)
    await _settle(client)
    clock.advance(1.0)
    await sim_stats.wait_for(lambda s: s.requests == 2)  # the retry, now held by the provider
    clock.advance(14.0)
    response = await pending
    assert response.status == 200
    assert await read_until(response, KEEPALIVE) == KEEPALIVE
    clock.advance(16.0)  # the provider answers
    data = sse_data((await response.content.read()).decode())
    assert data[-1] == "[DONE]"


async def test_a_client_gone_before_the_headers_is_not_waited_for(
    gateway: GatewayFactory, settings: Settings, sim_stats: SimStats, clock: LoopClock
) -> None:
    """A client that leaves before the headers went out never learnt the stream's id, so
    it cannot resume: the provider call stops at once, without the (default, 10 s) grace
    window a client that has the id gets."""
    assert settings.streams.disconnect_grace_s == 10.0
    client = await gateway(with_provider(settings, first_token_timeout_s=600.0))
    body = chat_body("[sim header_delay_ms=600000]")
    pending = await _sent(client, body, sim_stats)
    pending.cancel()
    await sim_stats.wait_for(lambda s: s.aborted == 1)  # the loop clock never moved


async def test_a_client_gone_while_its_response_was_prepared_gets_no_grace(
    gateway: GatewayFactory,
    settings: Settings,
    sim_stats: SimStats,
    clock: LoopClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The headers wait for the first events; a client whose connection closed before the
    response was prepared never got them (nor the stream's id): no grace window for it,
    the provider call stops at once (the loop clock never moves past the 10 s window)."""
    ready = chat_module._ready_to_stream
    held = asyncio.Event()

    async def client_gone_first(request: web.Request, stream: Stream) -> None:
        await ready(request, stream)
        held.set()
        # Until the server has seen the close: aiohttp has no event for it (loop turns).
        while request.transport is not None and not request.transport.is_closing():  # noqa: ASYNC110
            await asyncio.sleep(0)

    monkeypatch.setattr(chat_module, "_ready_to_stream", client_gone_first)
    client = await gateway(with_provider(settings, first_token_timeout_s=600.0))
    pending = await _sent(client, chat_body("[sim chunks=3 first_delay_ms=600000]"), sim_stats)
    await held.wait()
    (stream,) = client.app[STREAMS].live()
    pending.cancel()
    async with asyncio.timeout(30):  # a failure guard: with a grace window it would hang
        await sim_stats.wait_for(lambda s: s.aborted == 1)
    assert not stream.announced
    assert stream.status is StreamStatus.CLIENT_GONE


async def _turns() -> None:
    """Let the loop run what is due now (timers the clock moved past): a few loop turns."""
    for _ in range(10):
        await asyncio.sleep(0)


async def test_the_200_waits_for_the_attempt_in_flight_not_another_interval(
    clock: LoopClock,
) -> None:
    """Attempt 1 runs 14 s and fails, the retry waits 2 s, attempt 2 is held: the 200 goes
    out 5 s (a third of an interval) into attempt 2, at 21 s; not at 15 s (a retry was
    waiting), nor at 30 s (a whole interval later)."""
    loop = asyncio.get_running_loop()
    stream = Stream("strm_w", Owner("u", "t", "k"), model="m", streaming=True, include_usage=False)
    stream.attempt_started_at = loop.time()
    waiter = asyncio.create_task(_wait_for_answer(stream, 15.0, asyncio.get_running_loop()))
    await _turns()
    clock.advance(14.0)
    stream.backing_off = True  # attempt 1 failed; the retry waits 2 s
    await _turns()
    clock.advance(2.0)
    stream.backing_off, stream.attempt_started_at = False, loop.time()  # attempt 2
    await _turns()
    clock.advance(4.9)
    await _turns()
    assert not waiter.done()
    clock.advance(0.2)
    await _turns()
    assert waiter.done()
    stream.end(StreamStatus.CANCELLED)


def test_default_keepalive_interval() -> None:
    """The default keepalive is 15 s, under common 30-60 s proxy idle timeouts."""
    assert Settings.from_env({}).streams.keepalive_s == 15.0


@pytest.mark.parametrize(
    ("directive", "deadline_s"),
    [
        ("[sim first_delay_ms=600000]", 60.0),  # SLUICE_FIRST_TOKEN_TIMEOUT_S
        ("[sim chunks=5 stall_after=2]", 30.0),  # SLUICE_IDLE_TIMEOUT_S
    ],
)
async def test_default_provider_deadlines_on_a_controlled_clock(
    gateway: GatewayFactory,
    settings: Settings,
    sim_stats: SimStats,
    clock: LoopClock,
    directive: str,
    deadline_s: float,
) -> None:
    """With the default deadlines, a silent provider is given exactly its time (keepalives
    meanwhile), then the stream ends with a ``provider_timeout`` error event, no [DONE]."""
    client = await gateway(_quick(settings))
    response = await client.post(URL, json=chat_body(directive), headers=AUTH)
    assert response.status == 200
    clock.advance(deadline_s - 1.0)
    await _settle(client)
    early = await read_until(response, KEEPALIVE)  # the ticks in between were keepalives
    await _settle(client)
    early += response.content.read_nowait()
    assert b"error" not in early
    clock.advance(1.5)
    rest = await response.content.read()  # the error event, then the end of the body
    assert b'"code":"provider_timeout"' in rest
    assert rest.endswith(b"\n\n")
    assert b"[DONE]" not in early + rest
    await sim_stats.wait_for(lambda s: s.aborted == 1)  # the provider was hung up on


@pytest.mark.parametrize("n", [1, 2])
async def test_an_opening_role_chunk_does_not_end_the_first_token_wait(
    gateway: GatewayFactory, settings: Settings, sim_stats: SimStats, clock: LoopClock, n: int
) -> None:
    """The role chunk (one a choice) at once, the first word 45 s later (a long prefill, a
    model thinking): the 60 s first-token deadline runs until the word, not the 30 s idle
    one from the role chunk, and the stream completes."""
    client = await gateway(_quick(settings))
    body = chat_body("[sim chunks=3 after_role_ms=45000]", n=n)
    response = await client.post(URL, json=body, headers=AUTH)
    assert response.status == 200
    head = await read_until(response, b"\n\n")  # the role chunk
    assert b'"role":"assistant"' in head
    clock.advance(44.0)
    await _settle(client)
    stream = client.app[STREAMS].get(response.headers["X-Sluice-Stream-Id"])
    assert stream is not None
    assert stream.running  # t = 44 s: past the idle deadline, still waiting for a word
    clock.advance(1.5)
    async with asyncio.timeout(10):  # a safety net, not a sync: the words are due
        rest = await response.content.read()
    assert b"provider_timeout" not in rest
    assert rest.endswith(b"data: [DONE]\n\n")
    await sim_stats.wait_for(lambda s: s.completed == 1)


async def test_the_first_token_deadline_counts_from_the_request_not_the_headers(
    gateway: GatewayFactory, settings: Settings, sim_stats: SimStats, clock: LoopClock
) -> None:
    """Headers after 40 s and the first event 30 s later: the default 60 s first-token
    deadline runs out at 60 s from the request (not at 100 s, 60 s after the headers)."""
    client = await gateway(_quick(settings))
    body = chat_body("[sim header_delay_ms=40000 first_delay_ms=30000]")
    pending = await _sent(client, body, sim_stats)
    await _settle(client)
    clock.advance(15.0)  # the 200 goes out (see above)
    response = await pending
    clock.advance(25.0)
    await sim_stats.wait_for(lambda s: s.started == 1)  # t = 40 s: the provider's headers
    clock.advance(19.0)
    await _settle(client)
    stream = client.app[STREAMS].get(response.headers["X-Sluice-Stream-Id"])
    assert stream is not None
    assert stream.running  # t = 59 s: still waiting for the first token
    clock.advance(1.5)
    async with asyncio.timeout(10):  # a safety net, not a sync: the error is already due
        rest = await response.content.read()
    assert b'"code":"provider_timeout"' in rest
    await sim_stats.wait_for(lambda s: s.aborted == 1)


async def test_a_generation_past_the_gateways_limit_ends_with_an_error(
    gateway: GatewayFactory, settings: Settings, sim_stats: SimStats
) -> None:
    """A provider that trickles forever (each gap under the idle deadline) is stopped at
    SLUICE_MAX_GENERATION_S: the stream ends with ``generation_too_long``, no [DONE]."""
    custom = with_streams(
        with_provider(_quick(settings), idle_timeout_s=600.0),
        max_generation_s=0.2,
        keepalive_s=0.05,
    )
    client = await gateway(custom)
    response = await client.post(URL, json=chat_body("[sim chunks=5 stall_after=2]"), headers=AUTH)
    assert response.status == 200
    rest = await response.content.read()  # ends when the limit stops the generation
    assert b'"code":"generation_too_long"' in rest
    assert b"[DONE]" not in rest
    await sim_stats.wait_for(lambda s: s.aborted == 1)
