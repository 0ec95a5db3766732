"""``service.relay`` through the whole gateway: SSE headers, byte-exact relay, no buffering,
keepalives while the provider is silent (issue 2, points 2 and 7).

(``test_relay.py`` covers the writer alone when a client vanishes mid-write.)
"""

from __future__ import annotations

from dataclasses import replace

import aiohttp
import orjson

from service.settings import Settings
from service.simulator import SimStats
from tests.conftest import AUTH, GatewayFactory, chat_body, with_streams
from tests.wire import read_until, sse_blocks, sse_data

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


async def test_keepalive_while_waiting_for_first_token(
    gateway: GatewayFactory, settings: Settings, sim_stats: SimStats
) -> None:
    """While the provider is silent before its first chunk, ``: keepalive`` comments flow."""
    client = await gateway(_quick(settings, keepalive_s=0.05))
    response = await client.post(URL, json=chat_body("[sim first_delay_ms=600000]"), headers=AUTH)
    assert response.status == 200
    seen = await read_until(response, b": keepalive\n\n")
    while seen.count(b": keepalive\n\n") < 3:
        seen += await read_until(response, b": keepalive\n\n")
    assert b"data:" not in seen  # nothing but keepalives so far
    response.close()
    await sim_stats.wait_for(lambda s: s.aborted == 1)


async def test_keepalive_during_a_mid_stream_stall(
    gateway: GatewayFactory, settings: Settings, sim_stats: SimStats
) -> None:
    """A silent gap after some chunks also gets keepalives, after the chunks already sent."""
    client = await gateway(_quick(settings, keepalive_s=0.05))
    response = await client.post(URL, json=chat_body("[sim chunks=5 stall_after=2]"), headers=AUTH)
    seen = await read_until(response, b": keepalive\n\n")
    while seen.count(b": keepalive\n\n") < 2:
        seen += await read_until(response, b": keepalive\n\n")
    before_keepalive = seen[: seen.index(b": keepalive")]
    assert before_keepalive.count(b"id: ") == 3  # role + two words came first
    response.close()
    await sim_stats.wait_for(lambda s: s.aborted == 1)


def test_default_keepalive_interval() -> None:
    """The default keepalive is 15 s, under common 30-60 s proxy idle timeouts."""
    assert Settings.from_env({}).streams.keepalive_s == 15.0
