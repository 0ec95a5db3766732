"""The WebSocket transport (``GET /v1/ws``): frames, multiplexing, cancel, resume, malformed
input and disconnects, over real sockets against the simulated provider."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestClient

from service.appkeys import GATE, LIFECYCLE, STREAMS, WEBSOCKETS
from service.handlers import ws as ws_handler
from service.settings import Settings
from service.simulator import SimStats
from service.stream import Stream, StreamStatus
from tests.conftest import AUTH, GatewayFactory, chat_body, with_streams
from tests.streamwire import (
    FIXED_CREATED,
    Finished,
    bearer,
    events,
    raw_chunk,
    read_events,
    two_user_settings,
    with_drain,
)

Client = TestClient[Any, Any]


async def connect(
    client: Client, headers: dict[str, str] = AUTH
) -> aiohttp.ClientWebSocketResponse:
    return await client.ws_connect("/v1/ws", headers=headers)


async def create(ws: aiohttp.ClientWebSocketResponse, request_id: Any, text: str) -> None:
    body = chat_body(text)
    await ws.send_str(
        orjson.dumps(
            {"type": "chat.completion.create", "request_id": request_id, "body": body}
        ).decode()
    )


async def frame(ws: aiohttp.ClientWebSocketResponse) -> tuple[dict[str, Any], str]:
    """The next frame, parsed and raw."""
    message = await ws.receive()
    assert message.type is aiohttp.WSMsgType.TEXT, message
    return orjson.loads(message.data), message.data


async def until_final(
    ws: aiohttp.ClientWebSocketResponse, request_ids: set[Any]
) -> dict[Any, list[tuple[dict[str, Any], str]]]:
    """Collect frames by request id until each of ``request_ids`` got ``done`` or ``error``."""
    by_request: dict[Any, list[tuple[dict[str, Any], str]]] = {r: [] for r in request_ids}
    open_ids = set(request_ids)
    while open_ids:
        parsed, raw = await frame(ws)
        by_request[parsed["request_id"]].append((parsed, raw))
        if parsed["type"] in ("done", "error"):
            open_ids.discard(parsed["request_id"])
    return by_request


async def sse_chunks(client: Client, text: str) -> list[bytes]:
    """The data payloads of the same completion over SSE (minus [DONE])."""
    response = await client.post("/v1/chat/completions", json=chat_body(text), headers=AUTH)
    return [data for _, data in events(await response.read())][:-1]


async def test_a_completion_arrives_as_chunk_frames_then_done(gateway: GatewayFactory) -> None:
    """started, numbered chunk frames carrying the SSE chunks byte for byte, then done + usage."""
    client = await gateway()
    text = f"ws hello [sim chunks=4 created={FIXED_CREATED}]"
    ws = await connect(client)
    await create(ws, "r1", text)
    frames = (await until_final(ws, {"r1"}))["r1"]

    started, chunks, done = frames[0][0], frames[1:-1], frames[-1][0]
    assert started["type"] == "started"
    stream_id = started["stream_id"]
    assert [p["seq"] for p, _ in chunks] == [1, 2, 3, 4, 5, 6]
    assert all(p["stream_id"] == stream_id and p["type"] == "chunk" for p, _ in chunks)
    assert [raw_chunk(raw) for _, raw in chunks] == await sse_chunks(client, text)
    assert done["type"] == "done"
    assert done["seq"] == 7
    assert done["finish_reason"] == "stop"
    assert done["usage"]["completion_tokens"] == 4
    await ws.close()


async def test_two_streams_share_one_socket(gateway: GatewayFactory, sim_stats: SimStats) -> None:
    """Two requests on one socket interleave, each complete and in order."""
    client = await gateway()
    ws = await connect(client)
    await create(ws, "a", "first [sim chunks=10 delay_ms=5]")
    await create(ws, 2, "second [sim chunks=7 delay_ms=5]")
    frames = await until_final(ws, {"a", 2})

    for request_id, words in (("a", 10), (2, 7)):
        chunks = [p for p, _ in frames[request_id] if p["type"] == "chunk"]
        assert [p["seq"] for p in chunks] == list(range(1, words + 3))
        assert frames[request_id][-1][0]["type"] == "done"
    assert sim_stats.completed == 2
    await ws.close()


async def test_cancel_stops_one_stream_and_not_the_other(
    gateway: GatewayFactory, settings: Settings, sim_stats: SimStats
) -> None:
    """cancel ends its stream with a stream_cancelled error; the neighbour finishes."""
    client = await gateway(with_drain(settings, 0))
    ws = await connect(client)
    await create(ws, "stuck", "stuck [sim stall_after=1]")
    await create(ws, "fine", "fine [sim chunks=30 delay_ms=5]")
    seen: set[str] = set()
    while "stuck" not in seen:  # the stalled stream has produced its first word
        parsed, _ = await frame(ws)
        if parsed["type"] == "chunk" and parsed["seq"] == 2:
            seen.add(parsed["request_id"])
    await ws.send_str('{"type": "cancel", "request_id": "stuck"}')
    frames = await until_final(ws, {"stuck", "fine"})

    assert frames["stuck"][-1][0]["error"]["code"] == "stream_cancelled"
    assert frames["fine"][-1][0]["type"] == "done"
    await sim_stats.wait_for(lambda s: s.aborted == 1 and s.completed == 1)
    await ws.close()


async def test_resume_on_a_new_socket_continues_without_gap_or_duplicate(
    gateway: GatewayFactory, settings: Settings, sim_stats: SimStats
) -> None:
    """Close the socket after k chunks, resume from k on another: the chunks join up exactly."""
    client = await gateway(with_streams(settings, disconnect_grace_s=60))
    text = f"resume ws [sim chunks=20 delay_ms=5 created={FIXED_CREATED}]"
    first = await connect(client)
    await create(first, "r", text)
    started, _ = await frame(first)
    head = [await frame(first) for _ in range(4)]
    await first.close()

    second = await connect(client)
    await second.send_str(
        orjson.dumps(
            {"type": "resume", "stream_id": started["stream_id"], "last_seq": 4, "request_id": "r"}
        ).decode()
    )
    rest = (await until_final(second, {"r"}))["r"]

    joined = head + rest[:-1]
    assert [p["seq"] for p, _ in joined] == list(range(1, 23))
    assert [raw_chunk(raw) for _, raw in joined] == await sse_chunks(client, text)
    assert rest[-1][0]["type"] == "done"
    assert sim_stats.requests == 2  # the WS stream and the SSE comparison run
    assert sim_stats.aborted == 0
    await second.close()


async def test_a_stream_started_over_sse_resumes_over_the_socket(
    gateway: GatewayFactory, settings: Settings, sim_stats: SimStats
) -> None:
    """One journal, two transports: the socket picks up after the SSE client's last event id,
    with the same chunk bytes and numbering, and the provider is called once."""
    client = await gateway(with_streams(settings, disconnect_grace_s=60))
    text = f"cross [sim chunks=10 created={FIXED_CREATED}]"
    response = await client.post("/v1/chat/completions", json=chat_body(text), headers=AUTH)
    head = await read_events(response, 3)
    stream_id = response.headers["X-Sluice-Stream-Id"]
    response.close()

    ws = await connect(client)
    resume = {"type": "resume", "stream_id": stream_id, "last_seq": 3, "request_id": "back"}
    await ws.send_str(orjson.dumps(resume).decode())
    rest = (await until_final(ws, {"back"}))["back"]

    assert [p["seq"] for p, _ in rest] == list(range(4, 14))  # 9 chunks, then done as 13
    assert rest[-1][0]["type"] == "done"
    sse = [data for _, data in events(head)] + [raw_chunk(raw) for _, raw in rest[:-1]]
    assert sse == await sse_chunks(client, text)
    assert sim_stats.aborted == 0
    await ws.close()


async def test_a_non_streamed_answer_is_read_not_resumed(gateway: GatewayFactory) -> None:
    """A non-streamed request's stream is one JSON object: resuming it over the socket or
    as SSE is refused (400, ``stream_not_resumable``), and its checkpoint has the result."""
    client = await gateway()
    body = chat_body("whole [sim chunks=3]", stream=False)
    answer = await client.post("/v1/chat/completions", json=body, headers=AUTH)
    assert answer.status == 200
    stream_id = answer.headers["X-Sluice-Stream-Id"]
    events_of = await client.get(f"/v1/streams/{stream_id}/events", headers=AUTH)
    assert events_of.status == 400
    assert (await events_of.json())["error"]["code"] == "stream_not_resumable"
    ws = await connect(client)
    resume = {"type": "resume", "stream_id": stream_id, "last_seq": 0, "request_id": "r"}
    await ws.send_str(orjson.dumps(resume).decode())
    refused, _ = await frame(ws)
    assert (refused["type"], refused["request_id"]) == ("error", "r")
    assert refused["error"]["code"] == "stream_not_resumable"
    await ws.close()
    checkpoint = await client.get(f"/v1/streams/{stream_id}", headers=AUTH)
    assert (await checkpoint.json())["status"] == "completed"


async def test_a_refused_resume_names_the_stream_and_the_field_the_socket_sent(
    gateway: GatewayFactory,
) -> None:
    """A resume past the stream's end, sent without a request_id, is refused naming the
    socket's own field (``last_seq``) and echoing the stream's id, as its frames would have
    carried: a client resuming several streams knows which one failed."""
    client = await gateway()
    answer = await client.post(
        "/v1/chat/completions", json=chat_body("x [sim chunks=2]"), headers=AUTH
    )
    await answer.read()
    stream_id = answer.headers["X-Sluice-Stream-Id"]
    ws = await connect(client)
    await ws.send_str(
        orjson.dumps({"type": "resume", "stream_id": stream_id, "last_seq": 99}).decode()
    )
    refused, _ = await frame(ws)
    assert (refused["type"], refused["request_id"]) == ("error", stream_id)
    assert (refused["error"]["code"], refused["error"]["param"]) == (None, "last_seq")
    await ws.close()


@pytest.mark.parametrize(
    ("sent", "param"),
    [
        ("not json", None),
        ("[1, 2]", None),
        ('{"type": "dance"}', "type"),
        ('{"request_id": "x"}', "type"),
        ('{"type": "chat.completion.create", "body": {}}', "request_id"),
        ('{"type": "chat.completion.create", "request_id": true, "body": {}}', "request_id"),
        ('{"type": "chat.completion.create", "request_id": "x"}', "body"),
        (
            '{"type": "chat.completion.create", "request_id": "x", "body": {"model": "gpt-4o"}}',
            "messages",
        ),
        ('{"type": "chat.completion.create", "request_id": "x", "body": {"model": 5}}', "model"),
        ('{"type": "cancel", "request_id": "nope"}', "request_id"),
        ('{"type": "resume", "stream_id": "strm_nope", "last_seq": 0}', "stream_id"),
        ('{"type": "resume", "stream_id": 7}', "stream_id"),
        ('{"type": "resume", "stream_id": "strm_x", "last_seq": -1}', "last_seq"),
        # No such stream, whatever the id (not a complaint about the request id it lends).
        ('{"type": "resume", "stream_id": ""}', "stream_id"),
        ('{"type": "resume", "stream_id": "%s"}' % ("s" * 300), "stream_id"),
        ('{"type": "resume", "stream_id": "strm_nope", "request_id": []}', "stream_id"),
    ],
)
async def test_a_malformed_frame_gets_an_error_frame_and_the_socket_lives_on(
    gateway: GatewayFactory, sent: str, param: str | None
) -> None:
    """Bad frames are answered with an OpenAI-shaped error frame; the socket keeps working."""
    client = await gateway()
    ws = await connect(client)
    await ws.send_str(sent)
    parsed, _ = await frame(ws)
    assert parsed["type"] == "error"
    assert set(parsed["error"]) == {"message", "type", "param", "code"}
    assert parsed["error"]["param"] == param
    assert "Traceback" not in parsed["error"]["message"]

    await create(ws, "after", "still here [sim chunks=2]")
    assert (await until_final(ws, {"after"}))["after"][-1][0]["type"] == "done"
    await ws.close()


async def test_binary_frames_and_duplicate_request_ids_are_refused(
    gateway: GatewayFactory, settings: Settings
) -> None:
    """A binary frame and a request id already streaming each get an error frame."""
    client = await gateway(with_drain(settings, 0))
    ws = await connect(client)
    await ws.send_bytes(b"\x00\x01")
    parsed, _ = await frame(ws)
    assert parsed["type"] == "error"
    assert parsed["request_id"] is None

    await create(ws, "dup", "long [sim stall_after=1]")
    assert (await frame(ws))[0]["type"] == "started"
    await create(ws, "dup", "again")
    while (parsed := (await frame(ws))[0])["type"] == "chunk":
        pass
    assert parsed["type"] == "error"
    assert parsed["request_id"] == "dup"
    assert parsed["error"]["code"] == "duplicate_request_id"
    await ws.close()


async def test_a_duplicate_sent_at_once_is_answered_after_the_original_s_started(
    gateway: GatewayFactory, settings: Settings
) -> None:
    """Two creates with one request id, sent together: ``started`` for the first comes
    before the second's refusal (a client taking an error for its id as final would
    otherwise drop a live stream)."""
    client = await gateway(with_drain(settings, 0))
    ws = await connect(client)
    await create(ws, "dup", "long [sim stall_after=1]")
    await create(ws, "dup", "again")
    first, _ = await frame(ws)
    assert first["type"] == "started"
    while (parsed := (await frame(ws))[0])["type"] == "chunk":
        pass
    assert parsed["error"]["code"] == "duplicate_request_id"
    await ws.close()


async def test_create_frames_refused_for_their_request_id_are_in_the_ledger(
    gateway: GatewayFactory, settings: Settings
) -> None:
    """A create frame without a request id, or with one already streaming, is a refused
    request: it gets its error frame and its ledger row, like any other refusal."""
    client = await gateway(with_drain(settings, 0))
    ws = await connect(client)
    missing = {"type": "chat.completion.create", "body": chat_body("no id")}
    await ws.send_str(orjson.dumps(missing).decode())
    refused, _ = await frame(ws)
    assert (refused["type"], refused["error"]["param"]) == ("error", "request_id")
    await create(ws, "dup", "long [sim stall_after=1]")
    assert (await frame(ws))[0]["type"] == "started"
    await create(ws, "dup", "again")
    while (refused := (await frame(ws))[0])["type"] == "chunk":
        pass
    assert refused["error"]["code"] == "duplicate_request_id"
    rows = await client.app[GATE].ledger.entries()
    assert [(r.status, r.error_code) for r in rows] == [
        ("rejected", "invalid_request_error"),
        ("rejected", "duplicate_request_id"),
    ]
    await ws.close()


async def _raw_socket(port: int) -> socket.socket:
    """A WebSocket opened by hand on a socket with a small receive buffer, read no further
    than its handshake: a client that stopped reading (and answering pings), so what the
    server writes piles up in its own buffers."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16))
    await loop.sock_sendall(
        sock,
        b"GET /v1/ws HTTP/1.1\r\nHost: gateway\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        b"Sec-WebSocket-Key: %b\r\nAuthorization: %b\r\n\r\n"
        % (key, AUTH["Authorization"].encode()),
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += await loop.sock_recv(sock, 1)  # (byte by byte: nothing past the head)
    assert head.startswith(b"HTTP/1.1 101")
    return sock


def _text_frame(payload: bytes) -> bytes:
    """A client's text frame (masked, as clients must)."""
    mask = os.urandom(4)
    size = len(payload)
    head = bytes([0x81, 0x80 | size]) if size < 126 else bytes([0x81, 0xFE, *size.to_bytes(2)])
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def test_a_peer_that_stops_reading_is_cut_off_at_its_missed_heartbeat(
    gateway: GatewayFactory, settings: Settings
) -> None:
    """A client stops reading while a stream floods its socket, after a frame the server
    must answer: the server's writes are stuck. Its missed heartbeat still ends the socket,
    and every stream on it is a disconnect (grace 0: cancelled), not held forever."""
    client = await gateway(with_streams(settings, keepalive_s=0.5, disconnect_grace_s=0))
    launched: list[Stream] = []
    both = asyncio.Event()

    def note(stream: Stream) -> None:
        launched.append(stream)
        if len(launched) == 2:
            both.set()

    client.app[STREAMS].launch_hooks.append(note)
    sock = await _raw_socket(client.server.port or 0)
    loop = asyncio.get_running_loop()
    for request_id, text in (
        ("flood", "flood [sim chunks=100000]"),
        ("slow", "slow [sim stall_after=1]"),
    ):
        create = {
            "type": "chat.completion.create",
            "request_id": request_id,
            "body": chat_body(text),
        }
        await loop.sock_sendall(sock, _text_frame(orjson.dumps(create)))
    (server_ws,) = client.app[WEBSOCKETS]
    transport = server_ws._req.transport if server_ws._req is not None else None
    assert transport is not None
    async with asyncio.timeout(20):
        await both.wait()
        flood, slow = launched
        high_water = transport.get_write_buffer_limits()[1]
        async for _ in flood.follow(0):  # until the server's writes wait on the client
            if transport.get_write_buffer_size() > high_water:
                break
        await loop.sock_sendall(
            sock, _text_frame(b"not json")
        )  # an error frame to send: the handler waits
        await slow.ended.wait()
    assert slow.status is StreamStatus.CLIENT_GONE
    sock.close()


async def test_a_socket_whose_connection_was_lost_holds_nothing_afterwards(
    gateway: GatewayFactory, settings: Settings
) -> None:
    """A connection lost (not closed) cancelled the handler and left the socket's heartbeat
    armed: the socket, its request and its protocol (~8 KB) were held until it fired, a
    keepalive later (up to 300 s)."""
    client = await gateway(with_streams(settings, keepalive_s=300))
    ws = await connect(client)
    (server_ws,) = client.app[WEBSOCKETS]
    assert server_ws._heartbeat_cb is not None  # (armed while the socket is open)
    assert server_ws._req is not None
    handler = server_ws._req.task
    connection = ws._response.connection if ws._response is not None else None
    assert connection is not None
    assert connection.transport is not None
    connection.transport.abort()
    async with asyncio.timeout(10):  # a safety net: the server notices at once
        await asyncio.wait({handler})  # cancelled, it has finished
    assert server_ws._heartbeat_cb is None


async def test_closing_the_socket_is_a_disconnect(
    gateway: GatewayFactory, settings: Settings, sim_stats: SimStats
) -> None:
    """With grace 0, closing the socket aborts every one of its streams at the provider."""
    client = await gateway(with_streams(settings, disconnect_grace_s=0))
    finished = Finished(client.app[STREAMS])
    ws = await connect(client)
    await create(ws, 1, "one [sim stall_after=2]")
    await create(ws, 2, "two [sim first_delay_ms=60000]")
    await sim_stats.wait_for(lambda s: s.started == 2)
    await ws.close()

    await sim_stats.wait_for(lambda s: s.aborted == 2)
    checkpoints = await finished.wait(2)
    assert {c.status for c in checkpoints} == {"client_gone"}


async def test_the_grace_window_applies_to_a_closed_socket(
    gateway: GatewayFactory, settings: Settings, sim_stats: SimStats
) -> None:
    """A short grace: the stream outlives the socket briefly, then ends as client_gone."""
    client = await gateway(with_streams(settings, disconnect_grace_s=0.05))
    finished = Finished(client.app[STREAMS])
    ws = await connect(client)
    await create(ws, "g", "graceful [sim stall_after=3]")
    while (await frame(ws))[0].get("seq") != 4:
        pass
    await ws.close()

    [checkpoint] = await finished.wait()
    assert checkpoint.status == "client_gone"
    assert checkpoint.chunks == 4
    await sim_stats.wait_for(lambda s: s.aborted == 1)


async def test_a_silent_peer_is_dropped_by_the_heartbeat(
    gateway: GatewayFactory, settings: Settings, sim_stats: SimStats
) -> None:
    """A client that stops answering pings is disconnected, and its stream with it."""
    custom = with_streams(settings, disconnect_grace_s=0, keepalive_s=0.05)
    client = await gateway(custom)
    ws = await client.ws_connect("/v1/ws", headers=AUTH, autoping=False)
    await create(ws, "h", "heartbeat [sim stall_after=1]")
    await sim_stats.wait_for(lambda s: s.aborted == 1)
    await ws.close()


async def test_another_user_cannot_resume_over_the_socket(
    gateway: GatewayFactory, settings: Settings, tmp_path: Path
) -> None:
    """Resuming someone else's stream answers the same 404 as an unknown stream."""
    custom, alice, bob = two_user_settings(with_drain(settings, 0), tmp_path)
    client = await gateway(custom)
    alice_ws = await connect(client, bearer(alice))
    await create(alice_ws, "mine", "private [sim stall_after=1]")
    started, _ = await frame(alice_ws)

    bob_ws = await connect(client, bearer(bob))
    await bob_ws.send_str(
        orjson.dumps({"type": "resume", "stream_id": started["stream_id"]}).decode()
    )
    parsed, _ = await frame(bob_ws)
    assert parsed["error"]["code"] == "stream_not_found"
    await alice_ws.close()
    await bob_ws.close()


async def test_the_socket_needs_the_same_auth(gateway: GatewayFactory) -> None:
    """Without a key the upgrade is refused with the OpenAI 401."""
    client = await gateway()
    response = await client.get("/v1/ws")
    assert response.status == 401
    error = (await response.json())["error"]
    assert error["type"] == "invalid_request_error"
    assert "API key" in error["message"]


async def test_a_plain_get_is_told_to_upgrade(gateway: GatewayFactory) -> None:
    """Without the WebSocket handshake the route answers an OpenAI-shaped 400."""
    client = await gateway()
    response = await client.get("/v1/ws", headers=AUTH)
    assert response.status == 400
    assert set((await response.json())["error"]) == {"message", "type", "param", "code"}


async def test_new_streams_are_refused_while_draining(gateway: GatewayFactory) -> None:
    """During shutdown a create is answered with a 503-type error frame."""
    client = await gateway()
    ws = await connect(client)
    client.app[LIFECYCLE].draining = True
    await create(ws, "late", "too late")
    parsed, _ = await frame(ws)
    assert parsed["error"]["code"] == "service_unavailable"
    client.app[LIFECYCLE].draining = False
    await ws.close()


async def test_the_socket_goes_through_the_same_admission_as_sse(
    gateway: GatewayFactory, settings: Settings
) -> None:
    """Limits apply per stream on a socket too: past the user's stream cap, a 429 frame."""
    custom = replace(
        with_drain(settings, 0), limits=replace(settings.limits, max_streams_per_user=1)
    )
    client = await gateway(custom)
    ws = await connect(client)
    await create(ws, "one", "first [sim stall_after=1]")
    assert (await frame(ws))[0]["type"] == "started"
    await create(ws, "two", "second")
    while (parsed := (await frame(ws))[0])["type"] == "chunk":
        pass
    assert parsed["request_id"] == "two"
    assert parsed["error"]["code"] == "concurrent_streams_exceeded"
    assert parsed["retry_after_s"] == 1  # what ``Retry-After`` says over HTTP
    assert "should_retry" not in parsed
    await ws.close()


async def test_an_error_frame_says_when_to_retry_and_when_not_to(
    gateway: GatewayFactory, settings: Settings
) -> None:
    """A budget's refusal over HTTP says ``Retry-After`` (the day's end) and ``x-should-retry:
    false``; its frame says the same, as ``retry_after_s`` and ``should_retry``."""
    money = replace(settings.money, user_daily_usd=1e-9)
    client = await gateway(replace(settings, money=money))
    ws = await connect(client)
    await create(ws, "spent", "x")
    parsed, _ = await frame(ws)
    assert parsed["error"]["code"] == "budget_exceeded"
    assert parsed["should_retry"] is False
    assert 0 < parsed["retry_after_s"] <= 86_400 + 1
    await ws.close()


async def test_a_socket_relays_a_bounded_number_of_streams(
    gateway: GatewayFactory, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Created or resumed, a socket relays at most ``MAX_READERS`` streams at once (resumes
    are not admitted like creates: without the bound one socket could pile up readers)."""
    monkeypatch.setattr(ws_handler, "MAX_READERS", 2)
    client = await gateway(with_drain(settings, 0))
    ws = await connect(client)
    await create(ws, "one", "first [sim stall_after=1]")
    started, _ = await frame(ws)
    assert started["type"] == "started"
    resume = {"type": "resume", "stream_id": started["stream_id"], "request_id": "again"}
    await ws.send_str(orjson.dumps(resume).decode())
    await create(ws, "three", "third")
    while (parsed := (await frame(ws))[0])["type"] == "chunk":
        pass
    assert (parsed["request_id"], parsed["error"]["code"]) == (
        "three",
        "too_many_streams_on_socket",
    )
    await ws.close()


async def test_a_server_bug_on_one_frame_does_not_drop_the_socket(
    gateway: GatewayFactory, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An unexpected exception is logged and answered with a server_error frame; the socket
    keeps serving."""
    client = await gateway()
    ws = await connect(client)
    real = ws_handler.parse_chat_request
    monkeypatch.setattr(ws_handler, "parse_chat_request", lambda *a: 1 / 0)
    await create(ws, "boom", "boom")
    parsed, _ = await frame(ws)
    assert parsed["request_id"] == "boom"
    assert parsed["error"]["type"] == "server_error"
    assert "division" not in parsed["error"]["message"]
    assert "WebSocket frame failed" in caplog.text
    monkeypatch.setattr(ws_handler, "parse_chat_request", real)
    await create(ws, "fine", "fine [sim chunks=2]")
    assert (await until_final(ws, {"fine"}))["fine"][-1][0]["type"] == "done"
    await ws.close()


async def test_the_handshakes_cache_choice_holds_for_the_sockets_streams(
    gateway: GatewayFactory, sim_stats: SimStats
) -> None:
    """``X-Sluice-Cache: bypass`` on the upgrade request: the same deterministic request
    sent twice over the socket reaches the provider twice (it would be a hit otherwise)."""
    client = await gateway()
    ws = await connect(client, {**AUTH, "X-Sluice-Cache": "bypass"})
    for request_id in ("a", "b"):
        body = chat_body("det [sim chunks=3]", temperature=0)
        frame_ = {"type": "chat.completion.create", "request_id": request_id, "body": body}
        await ws.send_str(orjson.dumps(frame_).decode())
        await until_final(ws, {request_id})
    await ws.close()
    assert sim_stats.requests == 2
