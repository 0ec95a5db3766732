"""Disconnect-aware SSE streams: abort, grace window, resume, cancel, checkpoints, ownership.

Every test runs the gateway and the simulated provider on real sockets and asserts what
the provider itself saw (``SimStats``), waiting on conditions rather than sleeping.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from service import registry as registry_module
from service.app import create_app
from service.appkeys import GATE, STREAMS
from service.auth import add_key
from service.checkpoint import MemoryCheckpointStore
from service.handlers import streams as streams_handler
from service.registry import StreamRegistry
from service.relay import STREAM_ID_HEADER
from service.settings import Settings
from service.simulator import SimStats, completion_words, prompt_text
from tests.conftest import AUTH, GatewayFactory, chat_body, with_provider, with_streams
from tests.streamwire import (
    FIXED_CREATED,
    Finished,
    LoopClock,
    Observed,
    bearer,
    events,
    journaled,
    last_error,
    read_events,
    two_user_settings,
    with_drain,
)

IN_FLIGHT = 2  # chunks the provider may have sent while the disconnect propagated


def sim_words(text: str, chunks: int) -> list[str]:
    """The simulator's deterministic reply to a one-message prompt."""
    return completion_words(prompt_text(chat_body(text)), chunks)


async def get_checkpoint(client: TestClient[Any, Any], stream_id: str) -> dict[str, Any]:
    response = await client.get(f"/v1/streams/{stream_id}", headers=AUTH)
    assert response.status == 200, await response.text()
    payload: dict[str, Any] = await response.json()
    return payload


async def test_every_event_carries_its_sequence_number(gateway: GatewayFactory) -> None:
    """Events are numbered 1..n in order and the response names the stream."""
    client = await gateway()
    response = await client.post(
        "/v1/chat/completions", json=chat_body("hi [sim chunks=4]"), headers=AUTH
    )
    assert response.headers[STREAM_ID_HEADER].startswith("strm_")
    parsed = events(await response.read())
    assert [seq for seq, _ in parsed] == list(range(1, 8))  # role, 4 words, finish, [DONE]
    assert parsed[-1][1] == b"[DONE]"


async def test_a_non_streamed_answer_names_its_stream_too(gateway: GatewayFactory) -> None:
    """stream=false: the JSON response carries the stream id, and the id works in URLs."""
    client = await gateway()
    response = await client.post(
        "/v1/chat/completions", json=chat_body("whole [sim chunks=3]", stream=False), headers=AUTH
    )
    assert response.status == 200
    stream_id = response.headers[STREAM_ID_HEADER]
    assert stream_id.startswith("strm_")
    checkpoint = await get_checkpoint(client, stream_id)
    assert checkpoint["status"] == "completed"
    assert checkpoint["text"] == (await response.json())["choices"][0]["message"]["content"]


async def test_abort_mid_stream_without_grace_closes_the_provider_connection(
    gateway: GatewayFactory, settings: Settings, sim_stats: SimStats
) -> None:
    """Grace 0: the provider sees its connection aborted, having sent only what was in flight."""
    client = await gateway(with_streams(settings, disconnect_grace_s=0))
    response = await client.post(
        "/v1/chat/completions",
        json=chat_body("abort me [sim chunks=50 delay_ms=100]"),
        headers=AUTH,
    )
    read = 3  # the role chunk and two words
    await read_events(response, read)
    response.close()

    await sim_stats.wait_for(lambda s: s.aborted == 1)
    assert sim_stats.completed == 0
    assert sim_stats.chunks_sent[0] <= read + IN_FLIGHT
    checkpoint = await get_checkpoint(client, response.headers[STREAM_ID_HEADER])
    assert checkpoint["status"] == "client_gone"


async def test_abort_without_grace_with_the_clock_held_sends_nothing_more(
    gateway: GatewayFactory, settings: Settings, sim_stats: SimStats, loop_clock: LoopClock
) -> None:
    """Grace 0 with the loop clock stopped at the moment of the disconnect: the provider's
    connection is closed before its next word is due, so it sent exactly the words read."""
    client = await gateway(with_streams(settings, disconnect_grace_s=0))
    response = await client.post(
        "/v1/chat/completions",
        json=chat_body("abort me [sim chunks=50 delay_ms=1000]"),
        headers=AUTH,
    )
    await read_events(response, 2)  # the role chunk and the first word
    await loop_clock.advance(1)
    await read_events(response, 1)  # the second word
    response.close()

    await sim_stats.wait_for(lambda s: s.aborted == 1)  # no time passes from here on
    assert sim_stats.chunks_sent == [2]
    checkpoint = await get_checkpoint(client, response.headers[STREAM_ID_HEADER])
    assert checkpoint["status"] == "client_gone"
    assert checkpoint["chunks"] == 3


async def test_abort_before_the_first_token(
    gateway: GatewayFactory, settings: Settings, sim_stats: SimStats
) -> None:
    """A client gone while the provider thinks (headers sent, no token yet) cancels it."""
    client = await gateway(with_streams(settings, disconnect_grace_s=0))
    response = await client.post(
        "/v1/chat/completions",
        json=chat_body("think [sim first_delay_ms=60000]"),
        headers=AUTH,
    )
    assert response.status == 200
    response.close()

    await sim_stats.wait_for(lambda s: s.aborted == 1)
    assert sim_stats.chunks_sent == [0]
    checkpoint = await get_checkpoint(client, response.headers[STREAM_ID_HEADER])
    assert checkpoint["status"] == "client_gone"
    assert checkpoint["first_token_at"] is None
    assert checkpoint["text"] == ""


async def test_abort_before_the_provider_answers(
    gateway: GatewayFactory, settings: Settings, sim_stats: SimStats
) -> None:
    """A client gone before the provider even sent headers cancels the provider call."""
    client = await gateway(with_streams(settings, disconnect_grace_s=0))
    finished = Finished(client.app[STREAMS])
    request = asyncio.ensure_future(
        client.post(
            "/v1/chat/completions",
            json=chat_body("slow [sim header_delay_ms=60000]"),
            headers=AUTH,
        )
    )
    await sim_stats.wait_for(lambda s: s.requests == 1)
    request.cancel()

    await sim_stats.wait_for(lambda s: s.aborted == 1)
    [checkpoint] = await finished.wait()
    assert checkpoint.status == "client_gone"


@pytest.mark.parametrize("grace", [0, 60])
async def test_abort_during_a_non_streaming_call(
    gateway: GatewayFactory, settings: Settings, sim_stats: SimStats, grace: float
) -> None:
    """A non-streaming request whose client hangs up stops the provider call at once, even
    with a grace window: its client never learnt the stream id, so nobody can come back."""
    client = await gateway(with_streams(settings, disconnect_grace_s=grace))
    finished = Finished(client.app[STREAMS])
    request = asyncio.ensure_future(
        client.post(
            "/v1/chat/completions",
            json=chat_body("whole [sim first_delay_ms=60000]", stream=False),
            headers=AUTH,
        )
    )
    await sim_stats.wait_for(lambda s: s.requests == 1)
    request.cancel()

    await sim_stats.wait_for(lambda s: s.aborted == 1)
    [checkpoint] = await finished.wait()
    assert checkpoint.status == "client_gone"
    assert checkpoint.completion_tokens == 0


@pytest.mark.parametrize("via", ["header", "query"])
async def test_reload_and_resume_within_the_window_gets_exactly_the_missing_bytes(
    gateway: GatewayFactory, settings: Settings, sim_stats: SimStats, via: str
) -> None:
    """Read k events, drop the connection, resume after k: the bytes equal an uninterrupted run,
    and the provider was called once for the interrupted stream."""
    client = await gateway(with_streams(settings, disconnect_grace_s=60))
    body = chat_body(f"resume me [sim chunks=20 delay_ms=10 created={FIXED_CREATED}]")
    uninterrupted = await (
        await client.post("/v1/chat/completions", json=body, headers=AUTH)
    ).read()

    response = await client.post("/v1/chat/completions", json=body, headers=AUTH)
    read = 5
    head = await read_events(response, read)
    response.close()
    stream_id = response.headers[STREAM_ID_HEADER]
    if via == "header":
        resumed = await client.get(
            f"/v1/streams/{stream_id}/events", headers={**AUTH, "Last-Event-ID": str(read)}
        )
    else:
        resumed = await client.get(
            f"/v1/streams/{stream_id}/events?last_event_id={read}", headers=AUTH
        )
    assert resumed.headers[STREAM_ID_HEADER] == stream_id
    rest = await resumed.read()

    assert head + rest == uninterrupted
    assert [seq for seq, _ in events(head + rest)] == list(range(1, 24))
    await sim_stats.wait_for(lambda s: s.completed == 2)
    assert sim_stats.requests == 2
    assert sim_stats.aborted == 0


async def test_resume_after_the_window_finds_the_partial_text_checkpointed(
    gateway: GatewayFactory, settings: Settings, sim_stats: SimStats
) -> None:
    """Past the grace window the provider is cut off and the checkpoint holds what was made."""
    client = await gateway(with_streams(settings, disconnect_grace_s=0.05))
    text = "partial [sim chunks=12 stall_after=6]"
    response = await client.post("/v1/chat/completions", json=chat_body(text), headers=AUTH)
    await read_events(response, 4)
    response.close()
    await sim_stats.wait_for(lambda s: s.aborted == 1)

    stream_id = response.headers[STREAM_ID_HEADER]
    checkpoint = await get_checkpoint(client, stream_id)
    assert checkpoint["status"] == "client_gone"
    assert checkpoint["text"] == "".join(sim_words(text, 12)[:6])
    assert checkpoint["usage_reported"] is False
    assert checkpoint["completion_tokens"] > 0
    assert checkpoint["last_seq"] == 8  # role, 6 words, the client_gone error

    resumed = await client.get(
        f"/v1/streams/{stream_id}/events", headers={**AUTH, "Last-Event-ID": "4"}
    )
    rest = await resumed.read()
    assert [seq for seq, _ in events(rest)] == [5, 6, 7, 8]
    assert last_error(rest)["code"] == "client_gone"


async def test_head_of_a_stream_s_events_is_refused_and_attaches_no_reader(
    gateway: GatewayFactory, settings: Settings
) -> None:
    """HEAD gets a 405 in OpenAI's shape: a reader that can get no body must not hold the
    stream (and its grace window) open. The WebSocket route refuses HEAD alike."""
    client = await gateway(with_streams(settings, disconnect_grace_s=0.0))
    text = "hold [sim chunks=50 stall_after=3]"
    response = await client.post("/v1/chat/completions", json=chat_body(text), headers=AUTH)
    await read_events(response, 2)
    stream_id = response.headers[STREAM_ID_HEADER]
    stream = client.app[STREAMS].get(stream_id)
    assert stream is not None
    readers = stream.readers
    for path in (f"/v1/streams/{stream_id}/events", "/v1/ws"):
        head = await client.head(path, headers=AUTH)
        assert head.status == 405
        assert "GET" in head.headers["Allow"]
    assert stream.readers == readers
    response.close()


WINDOW_S = 28.0  # the grace window of the clocked tests below
WORD_EVERY_S = 5  # their simulated words: one every 5 s, so none lands on the window's end


async def test_the_grace_window_keeps_generating_then_cuts_the_provider_at_its_end(
    gateway: GatewayFactory, settings: Settings, sim_stats: SimStats, loop_clock: LoopClock
) -> None:
    """With the loop clock in the test's hands: after the client leaves, the provider's words
    keep going into the journal for the whole window; a moment before its end nothing has been
    cancelled; a moment after it, with the clock held there, the provider sees its connection
    closed, having sent only what the window allowed."""
    client = await gateway(with_streams(settings, disconnect_grace_s=WINDOW_S))
    registry = client.app[STREAMS]
    observed = Observed(registry)
    text = f"window [sim chunks=40 delay_ms={WORD_EVERY_S * 1000}]"
    response = await client.post("/v1/chat/completions", json=chat_body(text), headers=AUTH)
    await read_events(response, 2)  # the role chunk and the first word
    stream_id = response.headers[STREAM_ID_HEADER]
    stream = registry.get(stream_id)
    assert stream is not None
    response.close()
    await observed.wait(stream_id, "client_disconnected")

    for words in range(2, 7):  # nobody reading, the words still arrive and are journaled
        await loop_clock.advance(WORD_EVERY_S)
        await journaled(stream, 1 + words)
    await loop_clock.advance(WINDOW_S - 5 * WORD_EVERY_S - 0.1)
    assert stream.running
    assert stream.cancel_reason is None
    assert sim_stats.aborted == 0

    await loop_clock.advance(0.2)  # 0.1 s past the window's end, and no further
    await sim_stats.wait_for(lambda s: s.aborted == 1)
    assert sim_stats.chunks_sent == [6]
    assert (stream_id, "grace_expired") in observed.seen
    checkpoint = await get_checkpoint(client, stream_id)
    assert checkpoint["status"] == "client_gone"
    assert checkpoint["text"] == "".join(sim_words(text, 40)[:6])


async def test_coming_back_within_the_window_keeps_the_stream_past_its_end(
    gateway: GatewayFactory, settings: Settings, sim_stats: SimStats, loop_clock: LoopClock
) -> None:
    """A reload 10 s into the window stops its timer: the window's end passes without a
    cancel, the resumed reader gets every event after its last one through [DONE], and the
    provider was called once and never cut off."""
    client = await gateway(with_streams(settings, disconnect_grace_s=WINDOW_S))
    registry = client.app[STREAMS]
    observed = Observed(registry)
    text = f"reload [sim chunks=8 delay_ms={WORD_EVERY_S * 1000}]"
    response = await client.post("/v1/chat/completions", json=chat_body(text), headers=AUTH)
    head = await read_events(response, 2)
    stream_id = response.headers[STREAM_ID_HEADER]
    stream = registry.get(stream_id)
    assert stream is not None
    response.close()
    await observed.wait(stream_id, "client_disconnected")

    resumed = None
    for words in range(2, 9):  # the last word arrives 35 s in, past the window's end
        await loop_clock.advance(WORD_EVERY_S)
        await journaled(stream, 1 + words)
        if words == 3:
            resumed = await client.get(
                f"/v1/streams/{stream_id}/events", headers={**AUTH, "Last-Event-ID": "2"}
            )
    assert resumed is not None
    rest = await resumed.read()

    numbered = [(seq, data) for seq, data in events(head + rest) if seq is not None]
    assert [seq for seq, _ in numbered] == list(range(1, 12))  # keepalives aside
    assert numbered[-1][1] == b"[DONE]"
    assert (stream_id, "grace_expired") not in observed.seen
    assert (await get_checkpoint(client, stream_id))["status"] == "completed"
    assert (sim_stats.requests, sim_stats.completed, sim_stats.aborted) == (1, 1, 0)


async def test_cancel_from_a_second_connection_stops_the_stream(
    gateway: GatewayFactory, settings: Settings, sim_stats: SimStats
) -> None:
    """The stop button: cancel from another connection ends the reader's stream at once."""
    client = await gateway(with_drain(settings, 0))
    response = await client.post(
        "/v1/chat/completions", json=chat_body("stop me [sim stall_after=2]"), headers=AUTH
    )
    await read_events(response, 3)
    stream_id = response.headers[STREAM_ID_HEADER]

    cancelled = await client.post(f"/v1/streams/{stream_id}/cancel", headers=AUTH)
    assert cancelled.status == 200
    assert (await cancelled.json())["status"] == "cancelled"
    rest = await response.read()
    assert last_error(rest)["code"] == "stream_cancelled"
    await sim_stats.wait_for(lambda s: s.aborted == 1)


async def test_another_user_can_neither_read_resume_nor_cancel(
    gateway: GatewayFactory, settings: Settings, sim_stats: SimStats, tmp_path: Path
) -> None:
    """Streams are visible to their owner only: anyone else gets the unknown-stream 404."""
    custom, alice, bob = two_user_settings(with_drain(settings, 0), tmp_path)
    client = await gateway(custom)
    response = await client.post(
        "/v1/chat/completions", json=chat_body("mine [sim stall_after=2]"), headers=bearer(alice)
    )
    await read_events(response, 2)
    stream_id = response.headers[STREAM_ID_HEADER]

    for method, path in [
        ("GET", f"/v1/streams/{stream_id}"),
        ("GET", f"/v1/streams/{stream_id}/events"),
        ("POST", f"/v1/streams/{stream_id}/cancel"),
    ]:
        denied = await client.request(method, path, headers=bearer(bob))
        assert denied.status == 404, path
        assert (await denied.json())["error"]["code"] == "stream_not_found"
    # An id that does not exist and a bad Last-Event-ID: the same 404, so nothing is learnt.
    for target in (stream_id, "strm_made_up"):
        probe = await client.get(
            f"/v1/streams/{target}/events", headers={**bearer(bob), "Last-Event-ID": "x"}
        )
        assert probe.status == 404, target
    owner_view = await client.get(f"/v1/streams/{stream_id}", headers=bearer(alice))
    assert (await owner_view.json())["status"] == "running"
    assert sim_stats.aborted == 0


async def test_the_same_user_may_stop_it_with_another_key(
    gateway: GatewayFactory, settings: Settings, sim_stats: SimStats, tmp_path: Path
) -> None:
    """Ownership is the user's, not the key's: alice's phone (a second key) sees and stops the
    stream her laptop started; bob still gets 404 once it has ended."""
    custom, laptop, bob = two_user_settings(with_drain(settings, 0), tmp_path)
    assert custom.auth.client_keys_file is not None
    phone = add_key(custom.auth.client_keys_file, user="alice", tenant="acme")
    client = await gateway(custom)
    response = await client.post(
        "/v1/chat/completions", json=chat_body("mine [sim stall_after=2]"), headers=bearer(laptop)
    )
    await read_events(response, 2)
    stream_id = response.headers[STREAM_ID_HEADER]

    cancelled = await client.post(f"/v1/streams/{stream_id}/cancel", headers=bearer(phone))
    assert cancelled.status == 200
    assert (await cancelled.json())["status"] == "cancelled"
    assert last_error(await response.read())["code"] == "stream_cancelled"
    await sim_stats.wait_for(lambda s: s.aborted == 1)
    seen = await client.get(f"/v1/streams/{stream_id}", headers=bearer(phone))
    assert (await seen.json())["status"] == "cancelled"
    assert (await client.get(f"/v1/streams/{stream_id}", headers=bearer(bob))).status == 404


async def test_several_readers_follow_one_stream(
    gateway: GatewayFactory, settings: Settings, sim_stats: SimStats
) -> None:
    """A second reader attached mid-stream gets the whole journal and the live rest."""
    client = await gateway()
    response = await client.post(
        "/v1/chat/completions", json=chat_body("share [sim chunks=20 delay_ms=10]"), headers=AUTH
    )
    head = await read_events(response, 2)
    stream_id = response.headers[STREAM_ID_HEADER]
    second = await client.get(f"/v1/streams/{stream_id}/events", headers=AUTH)
    first_rest, second_all = await asyncio.gather(response.read(), second.read())
    assert head + first_rest == second_all
    assert events(second_all)[-1][1] == b"[DONE]"
    assert sim_stats.requests == 1


async def test_a_finished_stream_can_be_replayed(gateway: GatewayFactory) -> None:
    """After [DONE] the journal is still there: replay it whole or from any event."""
    client = await gateway()
    response = await client.post(
        "/v1/chat/completions", json=chat_body("again [sim chunks=5]"), headers=AUTH
    )
    original = await response.read()
    path = f"/v1/streams/{response.headers[STREAM_ID_HEADER]}/events"
    assert await (await client.get(path, headers=AUTH)).read() == original
    tail = await (await client.get(f"{path}?last_event_id=3", headers=AUTH)).read()
    assert original.endswith(tail)
    assert [seq for seq, _ in events(tail)] == [4, 5, 6, 7, 8]


@pytest.mark.parametrize("last", ["99", "-1", "x", "1_0", "+1", "0x1", "\u0663", "1" * 40])
async def test_an_impossible_resume_point_is_rejected(gateway: GatewayFactory, last: str) -> None:
    """Last-Event-ID past the end, negative or not a number of plain ASCII digits (``int``
    would take "1_0", "+1" and other scripts' digits) is a 400, not a silent hang."""
    client = await gateway()
    response = await client.post(
        "/v1/chat/completions", json=chat_body("x [sim chunks=2]"), headers=AUTH
    )
    await response.read()
    resumed = await client.get(
        f"/v1/streams/{response.headers[STREAM_ID_HEADER]}/events",
        headers={**AUTH, "Last-Event-ID": last},
    )
    assert resumed.status == 400
    assert (await resumed.json())["error"]["param"] == "last_event_id"


@pytest.mark.parametrize("where", ["headers", "query"])
async def test_several_resume_points_are_rejected_not_cut_to_the_first(
    gateway: GatewayFactory, where: str
) -> None:
    """Two Last-Event-IDs (two headers, or the query parameter twice): which one was meant is
    unknowable, so a 400, as one header holding both already was."""
    client = await gateway()
    response = await client.post(
        "/v1/chat/completions", json=chat_body("x [sim chunks=5]"), headers=AUTH
    )
    await response.read()
    path = f"/v1/streams/{response.headers[STREAM_ID_HEADER]}/events"
    if where == "headers":
        both = [*AUTH.items(), ("Last-Event-ID", "2"), ("Last-Event-ID", "5")]
        resumed = await client.get(path, headers=both)
    else:
        resumed = await client.get(f"{path}?last_event_id=2&last_event_id=5", headers=AUTH)
    assert resumed.status == 400
    assert (await resumed.json())["error"]["param"] == "last_event_id"


async def test_checkpoints_and_replays_expire_after_the_ttl(
    aiohttp_client: Any, settings: Settings
) -> None:
    """With an injected clock: until the TTL both checkpoint and replay answer, then 404."""
    now = [1000.0]
    custom = with_streams(settings, checkpoint_ttl_s=60)
    app = create_app(custom)
    store = MemoryCheckpointStore(clock=lambda: now[0])
    app[STREAMS] = StreamRegistry(custom.streams, store, clock=lambda: now[0])
    client = await aiohttp_client(app)
    response = await client.post(
        "/v1/chat/completions", json=chat_body("ttl [sim chunks=2]"), headers=AUTH
    )
    await response.read()
    stream_id = response.headers[STREAM_ID_HEADER]
    await app[STREAMS].retire_now()  # the TTL runs from then (and the clock is ours)
    paths = [f"/v1/streams/{stream_id}", f"/v1/streams/{stream_id}/events"]

    now[0] += 59
    for path in paths:
        assert (await client.get(path, headers=AUTH)).status == 200
    assert await store.get(stream_id) is not None
    now[0] += 2
    for path in paths:
        assert (await client.get(path, headers=AUTH)).status == 404
    assert await store.get(stream_id) is None


async def _read_all(client: Client, sim_stats: SimStats, text: str) -> None:
    await (await _post(client, text)).read()


async def _cancelled(client: Client, sim_stats: SimStats, text: str) -> None:
    response = await _post(client, text)
    await read_events(response, 3)
    stream_id = response.headers[STREAM_ID_HEADER]
    assert (await client.post(f"/v1/streams/{stream_id}/cancel", headers=AUTH)).status == 200
    await response.read()


async def _client_gone(client: Client, sim_stats: SimStats, text: str) -> None:
    response = await _post(client, text)
    await read_events(response, 3)
    response.close()
    await sim_stats.wait_for(lambda s: s.aborted == 1)


async def _shutdown(client: Client, sim_stats: SimStats, text: str) -> None:
    response = await _post(client, text)
    await read_events(response, 3)
    rest = asyncio.ensure_future(response.read())
    await client.server.close()
    assert (await rest).endswith(b"retry: 1000\n")


async def _post(client: Client, text: str) -> Any:
    return await client.post("/v1/chat/completions", json=chat_body(text), headers=AUTH)


Client = TestClient[Any, Any]
Driver = Callable[[Client, SimStats, str], Awaitable[None]]


@dataclass(frozen=True)
class Ending:
    drive: Driver
    text: str
    error: str | None
    settings: Callable[[Settings], Settings] = lambda s: s
    words: int = 2  # stall/malformed after two words
    tool_call: bool = False  # the text, then a call (streamed in three fragments)
    finish_reason: str | None = None
    chunks: int = 3  # role + two words
    last_seq: int = 4  # + the final error event
    usage_reported: bool = False


ENDINGS = {
    "completed": Ending(
        _read_all,
        "done [sim chunks=3 tool_call=lookup]",
        None,
        words=3,
        tool_call=True,
        finish_reason="tool_calls",
        chunks=9,  # role, 3 words, 3 tool-call deltas, finish, usage
        last_seq=9,  # the usage chunk is withheld; [DONE] is journaled
        usage_reported=True,
    ),
    "completed_without_usage": Ending(  # a provider that ignores stream_options
        _read_all,
        "done [sim chunks=3 tool_call=lookup usage=0]",
        None,
        words=3,
        tool_call=True,
        finish_reason="tool_calls",
        chunks=8,  # role, 3 words, 3 tool-call deltas, finish
        last_seq=9,  # + [DONE]
    ),
    "cancelled": Ending(_cancelled, "halt [sim stall_after=2]", "stream_cancelled"),
    "client_gone": Ending(
        _client_gone,
        "leave [sim stall_after=2]",
        "client_gone",
        lambda s: with_streams(s, disconnect_grace_s=0),
    ),
    "provider_error": Ending(
        _read_all, "garble [sim malformed_after=2]", "provider_protocol_error"
    ),
    "timeout": Ending(
        _read_all,
        "hang [sim stall_after=2]",
        "provider_timeout",
        lambda s: with_provider(s, idle_timeout_s=0.1),
    ),
    "shutdown": Ending(_shutdown, "bye [sim stall_after=2]", "shutdown", last_seq=3),
}


@pytest.mark.parametrize("reason", list(ENDINGS))
async def test_the_checkpoint_records_each_way_a_stream_ends(
    gateway: GatewayFactory, settings: Settings, sim_stats: SimStats, reason: str
) -> None:
    """Status, text, tool calls, finish reason, chunk count, token counts (the provider's, or
    counted from the text when its usage never came) and timestamps, for each end reason."""
    ending = ENDINGS[reason]
    client = await gateway(ending.settings(with_drain(settings, 0)))
    registry = client.app[STREAMS]
    finished = Finished(registry)
    await ending.drive(client, sim_stats, ending.text)
    [checkpoint] = await finished.wait()
    stream_id = checkpoint.stream_id
    assert await registry.store.get(stream_id) == checkpoint

    assert checkpoint.status == reason.removesuffix("_without_usage")
    chunks = 3 if "chunks=3" in ending.text else 12
    assert checkpoint.text == "".join(sim_words(ending.text, chunks)[: ending.words])
    assert checkpoint.finish_reason == ending.finish_reason
    assert checkpoint.chunks == ending.chunks
    assert checkpoint.last_seq == ending.last_seq
    assert checkpoint.usage_reported is ending.usage_reported
    assert (checkpoint.error or {}).get("code") == ending.error
    if ending.usage_reported:
        assert checkpoint.completion_tokens == ending.words
    else:  # counted: the text, and the tool call's name and arguments
        calls = "lookup" + '{"query": "sim"}' if ending.tool_call else ""
        assert checkpoint.completion_tokens == registry.count_text(
            "gpt-4o-mini", checkpoint.text
        ) + registry.count_text("gpt-4o-mini", calls)
        body = chat_body(ending.text)
        assert checkpoint.prompt_tokens == registry.count_prompt("gpt-4o-mini", body)
    if ending.tool_call:  # its streamed fragments merged into the call, as a message has it
        (call,) = checkpoint.tool_calls
        assert call["function"] == {"name": "lookup", "arguments": '{"query": "sim"}'}
        assert call["id"]
        assert call["type"] == "function"
    assert checkpoint.completion_tokens > 0
    assert checkpoint.prompt_tokens > 0
    [row] = [e for e in await client.app[GATE].ledger.entries() if e.stream_id == stream_id]
    assert row.completion_tokens == checkpoint.completion_tokens  # billed as checkpointed
    assert checkpoint.first_token_at is not None
    assert checkpoint.ended_at is not None
    assert checkpoint.created_at <= checkpoint.first_token_at <= checkpoint.ended_at


async def test_a_stream_whose_journal_is_gone_is_cancelled_like_its_checkpoint_is_read(
    gateway: GatewayFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once an ended stream's journal is no longer kept (here: one is kept), its checkpoint
    still is: reading it and cancelling it (nothing left to stop) both answer with it."""
    monkeypatch.setattr(registry_module, "MAX_RETAINED", 1)
    client = await gateway()
    ids = []
    for n in range(2):
        body = chat_body(f"n{n} [sim chunks=2]")
        response = await client.post("/v1/chat/completions", json=body, headers=AUTH)
        await response.read()
        ids.append(response.headers[STREAM_ID_HEADER])
        stream = client.app[STREAMS].get(ids[-1])
        assert stream is not None
        await client.app[STREAMS].settled(stream)
    assert client.app[STREAMS].get(ids[0]) is None  # its journal is gone
    read = await client.get(f"/v1/streams/{ids[0]}", headers=AUTH)
    cancelled = await client.post(f"/v1/streams/{ids[0]}/cancel", headers=AUTH)
    assert (read.status, cancelled.status) == (200, 200)
    assert await cancelled.json() == await read.json()
    assert (await cancelled.json())["status"] == "completed"


@pytest.mark.parametrize(
    ("directive", "status"), [("[sim fail=400]", 400), ("[sim chunks=6 malformed_after=3]", 200)]
)
async def test_a_failed_stream_keeps_its_error_not_the_frames_it_came_through(
    gateway: GatewayFactory, directive: str, status: int
) -> None:
    """An ended stream is kept for replay (up to an hour) with its error: not with the
    traceback it was raised through, whose frames hold the request (the client's key), the
    provider's response and the last reads; a refusal answers with a copy of it, so the
    kept one gains neither the handler's frames nor the response's headers."""
    client = await gateway()
    response = await client.post("/v1/chat/completions", json=chat_body(directive), headers=AUTH)
    assert response.status == status
    await response.read()
    stream = client.app[STREAMS].get(response.headers[STREAM_ID_HEADER])
    assert stream is not None
    await stream.ended.wait()
    error = stream.error
    assert error is not None
    assert (error.__traceback__, error.__context__, error.__cause__) == (None, None, None)
    assert STREAM_ID_HEADER not in error.headers  # the response's, not the kept error's


async def test_a_checkpoint_never_counts_the_prompt_on_the_loop_again(
    gateway: GatewayFactory, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stream's prompt is counted once, at admission (off the loop when large): not again
    for its checkpoint, however often it is read while running or when it ends without the
    provider's usage (a large prompt recounted on the loop stalled every stream, on each
    ``GET /v1/streams/{id}``); and a running stream's long text is counted off the loop."""
    client = await gateway(with_drain(settings, 0))
    registry = client.app[STREAMS]
    prompts: list[str] = []
    texts: list[str] = []
    count_prompt, count_text = registry.count_prompt, registry.count_text

    def spy_prompt(model: str, body: dict[str, Any]) -> int:
        prompts.append(threading.current_thread().name)
        return count_prompt(model, body)

    def spy_text(model: str, text: str) -> int:
        texts.append(threading.current_thread().name)
        return count_text(model, text)

    registry.count_prompt, registry.count_text = spy_prompt, spy_text
    monkeypatch.setattr(streams_handler, "OFFLOAD_CHARS", 1)  # its two words are "long"
    response = await _post(client, "halt [sim stall_after=2]")
    await read_events(response, 3)
    stream_id = response.headers[STREAM_ID_HEADER]
    running = await client.get(f"/v1/streams/{stream_id}", headers=AUTH)
    assert (await running.json())["prompt_tokens"] > 0
    assert texts
    assert threading.current_thread().name not in texts
    cancelled = await client.post(f"/v1/streams/{stream_id}/cancel", headers=AUTH)
    body = await cancelled.json()
    assert (body["status"], body["usage_reported"]) == ("cancelled", False)
    assert body["prompt_tokens"] == (await running.json())["prompt_tokens"]
    assert prompts == []
