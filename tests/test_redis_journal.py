"""Streams across replicas: two gateways sharing one real redis-server.

A stream generated on replica A can be resumed, followed live and cancelled through
replica B, which serves it from the Redis Streams mirror of A's journal.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson
import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from service import redis_journal, resources
from service.appkeys import JOURNAL_MIRROR, REDIS, REMOTE_STREAMS, STREAMS
from service.checkpoint import MemoryCheckpointStore
from service.redis_journal import (
    CONTROL_CHANNEL,
    JournalMirror,
    RemoteStreams,
    journal_key,
    meta_key,
    owner_key,
)
from service.redisgate import RedisGate, RedisUnavailable
from service.registry import StreamRegistry
from service.relay import CACHE_HEADER, MODEL_HEADER, STREAM_ID_HEADER
from service.settings import Settings
from service.simulator import SimStats
from service.stream import Stream, StreamStatus
from tests.conftest import AUTH, GatewayFactory, chat_body, with_streams
from tests.servers import FreezingProxy, RedisServer, with_redis
from tests.streamwire import (
    FIXED_CREATED,
    bearer,
    events,
    last_error,
    read_events,
    two_user_settings,
    with_drain,
)

LONG = f"tell me [sim chunks=60 delay_ms=15 created={FIXED_CREATED}]"


async def replicas(
    gateway: GatewayFactory, settings: Settings
) -> tuple[TestClient[Any, Any], TestClient[Any, Any]]:
    return await gateway(settings), await gateway(settings)


async def full_replay(client: TestClient[Any, Any], stream_id: str) -> bytes:
    response = await client.get(
        f"/v1/streams/{stream_id}/events", headers={**AUTH, "Last-Event-ID": "0"}
    )
    assert response.status == 200
    return await response.read()


async def test_resume_on_another_replica_gets_exactly_the_missing_bytes(
    gateway: GatewayFactory, settings: Settings, redis_url: str, sim_stats: SimStats
) -> None:
    """Read 3 events from A, drop the connection, resume via B: head + tail == the journal."""
    a, b = await replicas(gateway, with_redis(settings, redis_url))
    response = await a.post("/v1/chat/completions", json=chat_body(LONG), headers=AUTH)
    stream_id = response.headers[STREAM_ID_HEADER]
    head = await read_events(response, 3)
    response.close()  # the tab reloads; A keeps generating inside the grace window

    resumed = await b.get(f"/v1/streams/{stream_id}/events", headers={**AUTH, "Last-Event-ID": "3"})
    assert resumed.status == 200
    for header in (STREAM_ID_HEADER, MODEL_HEADER, CACHE_HEADER):  # as A's own resume has
        assert resumed.headers[header] == response.headers[header]
    tail = await resumed.read()

    assert tail.endswith(b"data: [DONE]\n\n")
    assert events(tail)[0][0] == 4
    assert head + tail == await full_replay(a, stream_id)
    assert sim_stats.requests == 1  # the provider was called once


async def test_a_replay_elsewhere_reads_about_read_bytes_at_a_time(
    gateway: GatewayFactory,
    settings: Settings,
    redis_url: str,
    sim_stats: SimStats,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each read of the journal asks for as many events as ``READ_BYTES`` holds at the
    last read's sizes (the first, for one): a journal of huge events is read in reads that
    fit the gate's deadline, not one that cannot. The replay is whole all the same."""
    monkeypatch.setattr(redis_journal, "READ_BYTES", 1000)  # ~3 of the simulator's chunks
    counts: list[int] = []
    read = RemoteStreams._range

    async def counting(self: RemoteStreams, stream_id: str, after: int, count: int) -> Any:
        counts.append(count)
        return await read(self, stream_id, after, count)

    monkeypatch.setattr(RemoteStreams, "_range", counting)
    a, b = await replicas(gateway, with_redis(settings, redis_url))
    response = await a.post("/v1/chat/completions", json=chat_body("[sim chunks=12]"), headers=AUTH)
    stream_id = response.headers[STREAM_ID_HEADER]
    await response.read()
    await a.app[STREAMS].retire_now()  # ended there: its END in the journal
    replay = await full_replay(b, stream_id)
    assert replay == await full_replay(a, stream_id)
    assert counts[0] == 1
    assert 1 < max(counts) <= 4


async def test_a_resume_elsewhere_past_the_end_of_a_running_stream_ends_with_it(
    gateway: GatewayFactory, settings: Settings, redis_url: str, sim_stats: SimStats
) -> None:
    """B cannot know a running stream's last event (its mirror lags), so a resume past it is
    followed; once A ends the stream, the reader's response ends too, empty: no events, and
    no 'resume it elsewhere' error after its owner's heartbeat lapses."""
    shared = with_streams(with_redis(settings, redis_url), keepalive_s=0.2)
    a, b = await replicas(gateway, shared)
    response = await a.post(
        "/v1/chat/completions", json=chat_body("[sim chunks=5 stall_after=1]"), headers=AUTH
    )
    stream_id = response.headers[STREAM_ID_HEADER]
    await read_events(response, 2)
    resumed = await b.get(
        f"/v1/streams/{stream_id}/events", headers={**AUTH, "Last-Event-ID": "999"}
    )
    assert resumed.status == 200
    cancelled = await a.post(f"/v1/streams/{stream_id}/cancel", headers=AUTH)
    assert cancelled.status == 200
    async with asyncio.timeout(10):  # a failure guard: it ends within a keepalive period
        body = await resumed.read()
    assert b"data:" not in body  # keepalive comments at most
    assert b"retry:" not in body


async def test_a_reader_on_another_replica_holds_the_stream_open(
    gateway: GatewayFactory, settings: Settings, redis_url: str, sim_stats: SimStats
) -> None:
    """With grace 0, A's client leaving does not cancel a stream that B's client reads."""
    shared = with_streams(with_redis(settings, redis_url), disconnect_grace_s=0.0)
    a, b = await replicas(gateway, shared)
    response = await a.post("/v1/chat/completions", json=chat_body(LONG), headers=AUTH)
    stream_id = response.headers[STREAM_ID_HEADER]
    await read_events(response, 1)

    registry = a.app[STREAMS]
    remote_reader = asyncio.Event()
    attach = registry.attach

    def counting_attach(stream: Stream) -> None:
        attach(stream)  # A's own client attached before this was installed
        remote_reader.set()

    registry.attach = counting_attach  # type: ignore[method-assign]
    follower = await b.get(f"/v1/streams/{stream_id}/events", headers=AUTH)
    await read_events(follower, 1)
    await remote_reader.wait()  # A counts B's reader (the pub/sub attach arrived)
    response.close()

    body = await follower.read()
    assert body.endswith(b"data: [DONE]\n\n")
    await sim_stats.wait_for(lambda s: s.completed == 1)
    assert sim_stats.aborted == 0


async def _slow_on_a(
    gateway: GatewayFactory, settings: Settings, redis_url: str, *, events: int
) -> tuple[TestClient[Any, Any], TestClient[Any, Any], Any, str]:
    """Replicas A and B, and a long stream running on A, ``events`` of it read."""
    a, b = await replicas(gateway, with_redis(settings, redis_url))
    slow = f"go [sim chunks=1000 delay_ms=20 created={FIXED_CREATED}]"
    response = await a.post("/v1/chat/completions", json=chat_body(slow), headers=AUTH)
    stream_id = response.headers[STREAM_ID_HEADER]
    await read_events(response, events)
    return a, b, response, stream_id


async def test_cancel_through_another_replica_stops_generation(
    gateway: GatewayFactory, settings: Settings, redis_url: str, sim_stats: SimStats
) -> None:
    """POST /cancel on B stops A's generation; B answers with the cancelled checkpoint."""
    _a, b, response, stream_id = await _slow_on_a(gateway, settings, redis_url, events=2)

    cancelled = await b.post(f"/v1/streams/{stream_id}/cancel", headers=AUTH)
    assert cancelled.status == 200
    checkpoint = await cancelled.json()
    assert checkpoint["id"] == stream_id
    assert checkpoint["status"] == "cancelled"
    assert checkpoint["chunks"] >= 1

    await sim_stats.wait_for(lambda s: s.aborted == 1)
    rest = await response.read()
    assert last_error(rest)["code"] == "stream_cancelled"


async def test_a_running_stream_s_checkpoint_reads_through_another_replica(
    gateway: GatewayFactory, settings: Settings, redis_url: str
) -> None:
    """No checkpoint is stored until a stream ends: B answered 404 for a stream A was still
    generating (while its events, resume and cancel worked through B). B now takes it from
    the journal so far, as A would: running, the text so far, the prompt A counted."""
    a, b, _response, stream_id = await _slow_on_a(gateway, settings, redis_url, events=3)

    there = await b.get(f"/v1/streams/{stream_id}", headers=AUTH)
    assert there.status == 200
    seen = await there.json()
    here = await (await a.get(f"/v1/streams/{stream_id}", headers=AUTH)).json()
    assert seen["status"] == "running"
    assert seen["last_seq"] >= 3
    assert seen["text"]
    assert here["text"].startswith(seen["text"])
    assert seen["prompt_tokens"] == here["prompt_tokens"] > 0
    assert seen["created_at"] == here["created_at"]
    await a.post(f"/v1/streams/{stream_id}/cancel", headers=AUTH)


async def test_a_cancel_sent_while_the_owner_resubscribes_still_reaches_it(
    gateway: GatewayFactory, settings: Settings, redis_url: str, sim_stats: SimStats
) -> None:
    """A publish reaches only the replicas subscribed at that moment: sent once, a cancel
    through B while A's control subscription was reconnecting was lost (a 404 after ten
    seconds, and the stream ran on, billed). B asks again each second."""
    _a, b, _response, stream_id = await _slow_on_a(gateway, settings, redis_url, events=2)
    redis = Redis.from_url(redis_url)
    try:
        await redis.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
    finally:
        await redis.aclose()

    cancelled = await b.post(f"/v1/streams/{stream_id}/cancel", headers=AUTH)
    assert cancelled.status == 200
    assert (await cancelled.json())["status"] == "cancelled"
    await sim_stats.wait_for(lambda s: s.aborted == 1)


async def test_a_socket_s_cancel_sent_while_the_owner_resubscribes_still_reaches_it(
    gateway: GatewayFactory, settings: Settings, redis_url: str, sim_stats: SimStats
) -> None:
    """The same over a WebSocket on B: its ``cancel`` frame was published once, and lost."""
    _a, b, _response, stream_id = await _slow_on_a(gateway, settings, redis_url, events=2)
    ws = await _ws_resume(b, stream_id)
    assert orjson.loads((await ws.receive()).data)["type"] == "chunk"
    redis = Redis.from_url(redis_url)
    try:
        await redis.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
    finally:
        await redis.aclose()

    await ws.send_str(orjson.dumps({"type": "cancel", "request_id": "r"}).decode())
    while (frame := orjson.loads((await ws.receive()).data))["type"] == "chunk":
        pass
    assert (frame["type"], frame["error"]["code"]) == ("error", "stream_cancelled")
    await sim_stats.wait_for(lambda s: s.aborted == 1)
    await ws.close()


async def test_a_stream_is_known_to_every_replica_before_its_first_token(
    gateway: GatewayFactory, settings: Settings, redis_url: str, sim_stats: SimStats
) -> None:
    """The owner is registered in Redis at launch, and the handler waits for that before
    the client learns the stream id: a cancel sent straight to B (the load balancer's
    choice) finds the stream even while the provider has not answered yet."""
    a, b = await replicas(gateway, with_redis(settings, redis_url))
    launched: list[Stream] = []
    a.app[STREAMS].launch_hooks.append(launched.append)
    held = f"wait [sim header_delay_ms=60000 created={FIXED_CREATED}]"
    request = asyncio.create_task(
        a.post("/v1/chat/completions", json=chat_body(held), headers=AUTH)
    )
    await sim_stats.wait_for(lambda s: s.requests == 1)
    (stream,) = launched
    mirror = a.app[JOURNAL_MIRROR]
    assert mirror is not None
    await mirror.registered(stream)
    assert stream.events == []  # no token yet, and already known to Redis
    redis = Redis.from_url(redis_url)
    try:
        assert await redis.hget(meta_key(stream.id), "user") == b"dev"
        assert await redis.exists(owner_key(stream.id))
    finally:
        await redis.aclose()

    cancelled = await b.post(f"/v1/streams/{stream.id}/cancel", headers=AUTH)
    assert cancelled.status == 200
    assert (await cancelled.json())["status"] == "cancelled"
    await sim_stats.wait_for(lambda s: s.aborted == 1)
    response = await request
    assert response.headers[STREAM_ID_HEADER] == stream.id
    assert (await response.json())["error"]["code"] == "stream_cancelled"


async def test_the_grace_window_expires_when_the_reader_on_another_replica_leaves(
    gateway: GatewayFactory, settings: Settings, redis_url: str, sim_stats: SimStats
) -> None:
    """With grace 0, A's client left while B's reader held the stream; when B's reader
    leaves too (its detach travels to A), A cancels the generation."""
    shared = with_streams(with_redis(settings, redis_url), disconnect_grace_s=0.0)
    a, b = await replicas(gateway, shared)
    slow = f"go [sim chunks=1000 delay_ms=20 created={FIXED_CREATED}]"
    response = await a.post("/v1/chat/completions", json=chat_body(slow), headers=AUTH)
    stream_id = response.headers[STREAM_ID_HEADER]
    await read_events(response, 1)

    registry = a.app[STREAMS]
    stream = registry.get(stream_id)
    assert stream is not None
    remote_reader = asyncio.Event()
    attach = registry.attach

    def counting_attach(attached: Stream) -> None:
        attach(attached)
        remote_reader.set()

    registry.attach = counting_attach  # type: ignore[method-assign]
    follower = await b.get(f"/v1/streams/{stream_id}/events", headers=AUTH)
    await read_events(follower, 1)
    await remote_reader.wait()  # A counts B's reader
    response.close()
    follower.close()  # the last reader anywhere: B's detach reaches A, which cancels at once

    await registry.settled(stream)
    assert stream.status is StreamStatus.CLIENT_GONE
    await sim_stats.wait_for(lambda s: s.aborted == 1)
    assert sim_stats.completed == 0


async def test_another_user_cannot_resume_or_cancel_through_another_replica(
    gateway: GatewayFactory, settings: Settings, redis_url: str, tmp_path: Path
) -> None:
    """Ownership holds across replicas: bob gets 404 for alice's stream on B (its events,
    its checkpoint, its cancel), and over a socket the same refusal as for a stream that
    never was."""
    two, alice, bob = two_user_settings(with_redis(settings, redis_url), tmp_path)
    a, b = await replicas(gateway, two)
    response = await a.post("/v1/chat/completions", json=chat_body(LONG), headers=bearer(alice))
    stream_id = response.headers[STREAM_ID_HEADER]
    await read_events(response, 1)

    resumed = await b.get(f"/v1/streams/{stream_id}/events", headers=bearer(bob))
    assert resumed.status == 404
    read = await b.get(f"/v1/streams/{stream_id}", headers=bearer(bob))
    assert read.status == 404
    cancelled = await b.post(f"/v1/streams/{stream_id}/cancel", headers=bearer(bob))
    assert cancelled.status == 404
    ws = await _ws_resume(b, stream_id, bob)  # over a socket: like a stream that never was
    refused = orjson.loads((await ws.receive()).data)
    assert (refused["type"], refused["error"]["code"]) == ("error", "stream_not_found")
    await ws.close()
    stream = a.app[STREAMS].get(stream_id)
    assert stream is not None
    assert stream.running or stream.status is StreamStatus.COMPLETED
    response.close()


async def test_rolling_restart_leaves_every_stream_resumable_on_the_other_replica(
    gateway: GatewayFactory, settings: Settings, redis_url: str
) -> None:
    """SIGTERM A with streams open: each completes or is checkpointed and replayable on B
    (a stream A cut short ends there, told so: nothing more will come of it)."""
    shared = with_drain(with_redis(settings, redis_url), 0.05)
    a, b = await replicas(gateway, shared)
    ids = []
    heads = []
    for n in range(3):
        prompt = f"stream {n} [sim chunks=500 delay_ms=10 created={FIXED_CREATED}]"
        response = await a.post("/v1/chat/completions", json=chat_body(prompt), headers=AUTH)
        ids.append(response.headers[STREAM_ID_HEADER])
        heads.append(await read_events(response, 2))
    ledger = a.app[STREAMS]

    await a.close()  # on_shutdown: not ready, drain 0.05 s, end the rest as SHUTDOWN

    for stream_id, head in zip(ids, heads, strict=True):
        checkpoint = await (await b.get(f"/v1/streams/{stream_id}", headers=AUTH)).json()
        assert checkpoint["status"] in ("completed", "shutdown"), checkpoint
        replay = await full_replay(b, stream_id)
        assert replay.startswith(head)
        numbered = [seq for seq, _ in events(replay) if seq is not None]
        assert numbered == list(range(1, checkpoint["last_seq"] + 1))
        if checkpoint["status"] == "shutdown":  # all there is: its end, no "come back"
            assert orjson.loads(events(replay)[-1][1])["error"]["code"] == "stream_interrupted"
            assert b"retry:" not in replay
    assert ledger.get(ids[0]) is not None


async def _orphaned(
    gateway: GatewayFactory, settings: Settings, redis_url: str
) -> TestClient[Any, Any]:
    """What a replica killed with SIGKILL leaves behind (``strm_orphan``: two events, no
    END, no owner heartbeat), and a replica B to read it through."""
    redis = Redis.from_url(redis_url)
    try:
        meta = {"user": "dev", "tenant": "dev", "status": "running"}
        await redis.hset(meta_key("strm_orphan"), mapping=meta)
        for seq in (1, 2):
            await redis.xadd(journal_key("strm_orphan"), {"k": 0, "d": b"{}"}, id=f"0-{seq}")
    finally:
        await redis.aclose()
    return await gateway(with_streams(with_redis(settings, redis_url), keepalive_s=0.05))


async def test_a_reader_elsewhere_notices_an_owner_that_died_mid_stream(
    gateway: GatewayFactory, settings: Settings, redis_url: str
) -> None:
    """A journal with no END and no owner heartbeat (its replica crashed) replays, then ends
    with an error event (no id: the SDKs raise it) instead of keeping the client waiting
    forever; with no reconnection hint, since nothing more will come of it (a hint to
    resume it elsewhere had a client reconnect, and be told the same, for ever)."""
    b = await _orphaned(gateway, settings, redis_url)

    response = await b.get("/v1/streams/strm_orphan/events", headers=AUTH)
    assert response.status == 200
    body = await response.read()
    assert [seq for seq, _ in events(body)] == [1, 2, None]
    assert orjson.loads(events(body)[2][1])["error"]["code"] == "stream_interrupted"
    assert b"retry:" not in body
    checkpoint = await (await b.get("/v1/streams/strm_orphan", headers=AUTH)).json()
    assert (checkpoint["status"], checkpoint["last_seq"]) == ("shutdown", 2)  # not running


async def test_a_stream_whose_replica_stopped_before_any_output_is_to_be_sent_again(
    gateway: GatewayFactory, settings: Settings, redis_url: str
) -> None:
    """Nothing generated and nothing to resume: "send the request again", as its own
    replica says at shutdown (a reader elsewhere was told to resume it)."""
    redis = Redis.from_url(redis_url)
    try:
        await redis.hset(meta_key("strm_unstarted"), mapping={"user": "dev", "tenant": "dev"})
    finally:
        await redis.aclose()
    b = await gateway(with_streams(with_redis(settings, redis_url), keepalive_s=0.05))

    response = await b.get("/v1/streams/strm_unstarted/events", headers=AUTH)
    body = await response.read()
    ((seq, data),) = events(body)
    assert seq is None
    assert orjson.loads(data)["error"]["code"] == "service_unavailable"
    assert b"retry:" not in body


async def _ws_resume(client: TestClient[Any, Any], stream_id: str, key: str = "") -> Any:
    ws = await client.ws_connect("/v1/ws", headers=bearer(key) if key else AUTH)
    frame = {"type": "resume", "stream_id": stream_id, "last_seq": 0, "request_id": "r"}
    await ws.send_str(orjson.dumps(frame).decode())
    return ws


async def test_a_socket_elsewhere_notices_an_owner_that_died_mid_stream(
    gateway: GatewayFactory, settings: Settings, redis_url: str
) -> None:
    """Over a WebSocket, the orphaned journal's chunks come as frames, then an error frame
    ``stream_interrupted``, instead of a socket left waiting forever."""
    b = await _orphaned(gateway, settings, redis_url)

    ws = await _ws_resume(b, "strm_orphan")
    frames = [orjson.loads((await ws.receive()).data) for _ in range(3)]
    assert [(f["type"], f["seq"]) for f in frames] == [("chunk", 1), ("chunk", 2), ("error", 3)]
    assert frames[-1]["error"]["code"] == "stream_interrupted"
    await ws.close()


async def _finished_on_a(a: TestClient[Any, Any], text: str) -> tuple[str, int]:
    """Run ``text`` to its end on A and wait until its journal is closed in Redis."""
    response = await a.post("/v1/chat/completions", json=chat_body(text), headers=AUTH)
    stream_id = response.headers[STREAM_ID_HEADER]
    body = await response.read()
    stream = a.app[STREAMS].get(stream_id)
    assert stream is not None
    await a.app[STREAMS].settled(stream)  # finish hooks done: checkpoint stored, END written
    return stream_id, len(events(body))


async def _resume_frames(
    client: TestClient[Any, Any], stream_id: str, last_seq: int
) -> list[dict[str, Any]]:
    """The frames a socket gets for ``resume`` until its final (or refusal) frame."""
    ws = await client.ws_connect("/v1/ws", headers=AUTH)
    frame = {"type": "resume", "stream_id": stream_id, "last_seq": last_seq, "request_id": "r"}
    await ws.send_str(orjson.dumps(frame).decode())
    frames = [orjson.loads((await ws.receive()).data)]
    while frames[-1]["type"] == "chunk":
        frames.append(orjson.loads((await ws.receive()).data))
    await ws.close()
    return frames


async def test_a_socket_on_another_replica_ends_a_finished_stream_like_its_owner(
    gateway: GatewayFactory, settings: Settings, redis_url: str
) -> None:
    """Resumed after its last chunk, at its final event, or past it: B's socket answers
    exactly as A's does (the ``done`` frame again; a 400 naming ``last_event_id``)."""
    a, b = await replicas(gateway, with_redis(settings, redis_url))
    stream_id, count = await _finished_on_a(a, f"end [sim chunks=3 created={FIXED_CREATED}]")
    for last_seq in (count - 1, count, count + 1):
        here, there = (
            await _resume_frames(a, stream_id, last_seq),
            await _resume_frames(b, stream_id, last_seq),
        )
        assert there == here, last_seq
    assert there[-1]["error"]["param"] == "last_seq"  # the field the socket sent
    assert here[0]["type"] == "done" or here[0]["type"] == "error"


async def test_sse_resume_past_the_end_on_another_replica_is_400(
    gateway: GatewayFactory, settings: Settings, redis_url: str
) -> None:
    """A Last-Event-ID past a finished stream's last event: 400 on B as on A."""
    a, b = await replicas(gateway, with_redis(settings, redis_url))
    stream_id, count = await _finished_on_a(a, f"end [sim chunks=2 created={FIXED_CREATED}]")
    for client in (a, b):
        response = await client.get(
            f"/v1/streams/{stream_id}/events", headers={**AUTH, "Last-Event-ID": str(count + 1)}
        )
        assert response.status == 400
        assert (await response.json())["error"]["param"] == "last_event_id"


async def test_a_remote_reader_cancelled_while_attaching_still_detaches(
    gateway: GatewayFactory, settings: Settings, redis_url: str, monkeypatch: Any
) -> None:
    """The attach may have reached the owner before the cancellation: a detach follows it,
    or the owner would count a reader forever and never start the grace window."""
    b = await gateway(with_redis(settings, redis_url))
    remote = b.app[REMOTE_STREAMS]
    assert remote is not None
    published: list[str] = []
    attaching = asyncio.Event()

    async def publish(op: str, stream_id: str, reader: str = "") -> None:
        published.append(op)
        if op == "attach":
            attaching.set()
            await asyncio.Event().wait()  # in flight until cancelled

    monkeypatch.setattr(remote, "_publish", publish)

    async def read() -> None:
        async with remote.reading("strm_x"):
            raise AssertionError("not reached: cancelled while attaching")

    reader = asyncio.create_task(read())
    await attaching.wait()
    reader.cancel()
    await asyncio.gather(reader, return_exceptions=True)
    assert published == ["attach", "detach"]


async def test_a_remote_reader_that_stops_beating_is_let_go(
    gateway: GatewayFactory,
    settings: Settings,
    redis_url: str,
    sim_stats: SimStats,
    monkeypatch: Any,
) -> None:
    """A reader elsewhere attached, then went silent (its detach lost in a Redis outage):
    after three missed beats A lets it go, and with nobody left the grace window ends the
    stream, instead of A generating to the end for nobody."""
    shared = with_streams(with_redis(settings, redis_url), keepalive_s=0.05, disconnect_grace_s=0.0)
    a = await gateway(shared)
    mirror = a.app[JOURNAL_MIRROR]
    assert mirror is not None
    attached = asyncio.Event()
    control = mirror.control

    def spy(op: str, stream_id: str, reader: str = "") -> None:
        control(op, stream_id, reader)
        if op == "attach":
            attached.set()

    monkeypatch.setattr(mirror, "control", spy)
    slow = f"long [sim chunks=1000 delay_ms=20 created={FIXED_CREATED}]"
    response = await a.post("/v1/chat/completions", json=chat_body(slow), headers=AUTH)
    stream_id = response.headers[STREAM_ID_HEADER]
    await read_events(response, 2)
    redis = Redis.from_url(redis_url)
    try:  # a reader on another replica: it attaches, and is never heard of again
        await redis.publish("sluice:ctl", f"attach {stream_id} ghost")
    finally:
        await redis.aclose()
    async with asyncio.timeout(10):  # safety nets: a leaked reader would run for 20 s
        await attached.wait()
        response.close()  # A's own client leaves: only the ghost holds the stream
        stream = a.app[STREAMS].get(stream_id)
        assert stream is not None
        await stream.ended.wait()
    assert stream.status is StreamStatus.CLIENT_GONE
    assert mirror.remote_readers.get(stream_id, {}) == {}


async def test_a_draining_replica_sends_its_readers_of_other_streams_elsewhere(
    gateway: GatewayFactory, settings: Settings, redis_url: str
) -> None:
    """B follows a stream A generates; B starts draining: B's reader ends with a retry
    hint within a keepalive (instead of holding B's shutdown), and A generates on."""
    shared = with_drain(with_streams(with_redis(settings, redis_url), keepalive_s=0.05), 0)
    a, b = await replicas(gateway, shared)
    held = f"hold [sim chunks=10 stall_after=3 created={FIXED_CREATED}]"  # runs until stopped
    response = await a.post("/v1/chat/completions", json=chat_body(held), headers=AUTH)
    stream_id = response.headers[STREAM_ID_HEADER]
    await read_events(response, 1)
    following = await b.get(
        f"/v1/streams/{stream_id}/events", headers={**AUTH, "Last-Event-ID": "1"}
    )
    assert following.status == 200
    await read_events(following, 1)
    async with asyncio.timeout(10):  # a safety net: it ends within one keepalive
        await resources.drain(b.app)
        rest = await following.read()
    assert rest.endswith(b"retry: 1000\n")
    stream = a.app[STREAMS].get(stream_id)
    assert stream is not None
    assert stream.running  # A's generation is not B's to stop
    response.close()


@pytest.mark.parametrize("ending", ["completed", "cancelled"])
async def test_a_socket_resumed_past_the_end_of_a_running_stream_elsewhere_gets_its_end(
    ending: str, gateway: GatewayFactory, settings: Settings, redis_url: str
) -> None:
    """B cannot know a running stream's last event, so a resume past it follows the stream;
    when A ends it, B's socket gets the stream's own final frame (from its checkpoint), as
    A's socket would, not a false 'its replica stopped'."""
    a, b = await replicas(gateway, with_streams(with_redis(settings, redis_url), keepalive_s=1.0))
    slow = f"slow [sim chunks=5 delay_ms=100 created={FIXED_CREATED}]"
    response = await a.post("/v1/chat/completions", json=chat_body(slow), headers=AUTH)
    stream_id = response.headers[STREAM_ID_HEADER]
    await read_events(response, 1)
    ws = await b.ws_connect("/v1/ws", headers=AUTH)
    frame = {"type": "resume", "stream_id": stream_id, "last_seq": 999, "request_id": "r"}
    await ws.send_str(orjson.dumps(frame).decode())
    if ending == "cancelled":
        cancelled = await a.post(f"/v1/streams/{stream_id}/cancel", headers=AUTH)
        assert cancelled.status == 200
    body = await response.read()
    async with asyncio.timeout(10):
        final = orjson.loads((await ws.receive()).data)
    if ending == "completed":
        assert final["type"] == "done"
        assert final["seq"] == events(body)[-1][0]  # the [DONE] event's number
        assert final["finish_reason"] == "stop"
    else:
        assert final["type"] == "error"
        assert final["error"]["code"] == "stream_cancelled"
    await ws.close()


async def test_a_draining_replica_tells_its_socket_readers_of_other_streams_to_resume(
    gateway: GatewayFactory, settings: Settings, redis_url: str
) -> None:
    """B's socket follows a stream A generates; B starts draining: the reader gets an error
    frame with a retry hint and the last seq it received within a keepalive, not silence
    until the socket closes at the drain's end."""
    shared = with_drain(with_streams(with_redis(settings, redis_url), keepalive_s=0.05), 0)
    a = await gateway(shared)
    b = await gateway(with_drain(shared, 30))  # its sockets close only when that is over
    held = f"hold [sim chunks=10 stall_after=3 created={FIXED_CREATED}]"  # runs until stopped
    response = await a.post("/v1/chat/completions", json=chat_body(held), headers=AUTH)
    stream_id = response.headers[STREAM_ID_HEADER]
    await read_events(response, 1)
    ws = await _ws_resume(b, stream_id)
    frame = orjson.loads((await ws.receive()).data)
    assert frame["type"] == "chunk"
    draining = asyncio.create_task(resources.drain(b.app))
    async with asyncio.timeout(10):  # a safety net: it comes within one keepalive
        while frame["type"] == "chunk":
            frame = orjson.loads((await ws.receive()).data)
    assert frame["type"] == "error"
    assert frame["error"]["code"] == "stream_interrupted"
    assert frame["retry_after_s"] == 1
    assert str(frame["seq"]) in frame["error"]["message"]
    draining.cancel()
    await ws.close()
    response.close()


async def test_a_socket_elsewhere_told_to_resume_when_redis_fails_mid_read(
    gateway: GatewayFactory, settings: Settings, redis_url: str, redis_server: RedisServer
) -> None:
    """Redis stops answering while B follows A's stream over a WebSocket: the stream may
    well go on on A, so B's frame says so (``shared_state_unavailable``, resume with the
    last seq received), not that A stopped."""
    shared = with_streams(
        with_redis(settings, redis_url, redis_timeout_s=0.3), disconnect_grace_s=0
    )
    a, b = await replicas(gateway, shared)
    response = await a.post("/v1/chat/completions", json=chat_body(LONG), headers=AUTH)
    stream_id = response.headers[STREAM_ID_HEADER]
    await read_events(response, 3)
    ws = await _ws_resume(b, stream_id)
    first = orjson.loads((await ws.receive()).data)
    assert first["type"] == "chunk"
    redis_server.pause()
    try:
        frame = first
        while frame["type"] == "chunk":
            frame = orjson.loads((await ws.receive()).data)
    finally:
        redis_server.resume()
    assert frame["type"] == "error"
    assert frame["error"]["code"] == "shared_state_unavailable"
    assert str(frame["seq"]) in frame["error"]["message"]
    await ws.close()
    response.close()


async def test_a_journal_close_redis_missed_is_sent_again_once_it_answers(
    gateway: GatewayFactory,
    settings: Settings,
    redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A stream that ended on A while A's Redis breaker was open (fail-open) stayed open
    and running for B until its TTL: its readers were cut off, its checkpoint missing (the
    close and the checkpoint were dropped). A sends them again until Redis takes them."""
    monkeypatch.setattr(redis_journal, "CLOSE_RETRY_S", 0.01)
    a = await gateway(with_redis(settings, redis_url, redis_failure="open"))
    b = await gateway(with_redis(settings, redis_url))
    text = f"ends in an outage [sim chunks=12 delay_ms=20 created={FIXED_CREATED}]"
    response = await a.post("/v1/chat/completions", json=chat_body(text), headers=AUTH)
    stream_id = response.headers[STREAM_ID_HEADER]
    await read_events(response, 2)  # known to Redis, and mirrored so far
    gate, mirror = a.app[REDIS], a.app[JOURNAL_MIRROR]
    assert gate is not None
    assert mirror is not None
    gate.reset_s = 3600.0
    gate._opened_at = gate._now()  # an outage's breaker: no call reaches Redis (and calls
    gate._cycle += 1  # in flight from before cannot close it)
    body = await response.read()
    stream = a.app[STREAMS].get(stream_id)
    assert stream is not None
    await a.app[STREAMS].settled(stream)  # its close refused: to be sent again
    assert list(mirror._unclosed) == [stream_id]
    retrying = mirror._closing
    assert retrying is not None
    gate._opened_at = None  # Redis is back
    async with asyncio.timeout(10):  # a safety net: the next attempt goes through
        await retrying
    assert not mirror._unclosed
    checkpoint = await (await b.get(f"/v1/streams/{stream_id}", headers=AUTH)).json()
    assert checkpoint["status"] == "completed"
    assert (await full_replay(b, stream_id)).endswith(b"data: [DONE]\n\n")
    assert body.endswith(b"data: [DONE]\n\n")


async def test_a_journal_append_sent_again_is_no_failure(
    gateway: GatewayFactory, settings: Settings, redis_url: str
) -> None:
    """An append that timed out after Redis ran it is sent again with the same event ids:
    the events already there are answers, not failures (the breaker counts none)."""
    a = await gateway(with_redis(settings, redis_url))
    response = await a.post(
        "/v1/chat/completions", json=chat_body("short [sim chunks=4]"), headers=AUTH
    )
    await response.read()
    stream = a.app[STREAMS].get(response.headers[STREAM_ID_HEADER])
    assert stream is not None
    await a.app[STREAMS].settled(stream)  # its END written
    mirror, gate = a.app[JOURNAL_MIRROR], a.app[REDIS]
    assert mirror is not None
    assert gate is not None
    before = gate.errors_total
    assert await mirror._append(stream, 0, stream.last_seq, None) is True
    assert gate.errors_total == before
    redis = Redis.from_url(redis_url)
    try:
        assert await redis.xlen(journal_key(stream.id)) == stream.last_seq + 1  # and END
    finally:
        await redis.aclose()


async def test_a_stream_whose_journal_redis_lost_is_mirrored_again(
    gateway: GatewayFactory, settings: Settings, redis_server: RedisServer, redis_url: str
) -> None:
    """Redis restarts empty mid-stream: the owner registers the stream again and mirrors
    its whole journal, so another replica still resumes it from the start, byte for byte."""
    a, b = await replicas(gateway, with_redis(settings, redis_url))
    response = await a.post("/v1/chat/completions", json=chat_body(LONG), headers=AUTH)
    stream_id = response.headers[STREAM_ID_HEADER]
    await read_events(response, 3)
    redis_server.flush()  # everything Redis held, gone
    await response.read()
    stream = a.app[STREAMS].get(stream_id)
    assert stream is not None
    await a.app[STREAMS].settled(stream)
    assert await full_replay(b, stream_id) == await full_replay(a, stream_id)


async def test_events_the_mirror_missed_go_with_the_journals_end(
    gateway: GatewayFactory,
    settings: Settings,
    redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Redis failed the appends of a stream's last events (twice: under the breaker's
    count): they go out with the end, so another replica replays the whole stream; the end
    had been written after a gap, and read there as a complete stream without its tail."""
    a, b = await replicas(gateway, with_redis(settings, redis_url))
    mirror = a.app[JOURNAL_MIRROR]
    assert mirror is not None
    append = mirror._append

    async def failing_at_the_end(stream: Stream, start: int, stop: int, owner: Any) -> bool:
        if not stream.running:  # the appends after the stream ended
            raise RedisUnavailable("a hiccup")
        return await append(stream, start, stop, owner)

    monkeypatch.setattr(mirror, "_append", failing_at_the_end)
    response = await a.post("/v1/chat/completions", json=chat_body(LONG), headers=AUTH)
    stream_id = response.headers[STREAM_ID_HEADER]
    await response.read()
    stream = a.app[STREAMS].get(stream_id)
    assert stream is not None
    await a.app[STREAMS].settled(stream)
    replayed = await full_replay(b, stream_id)
    assert replayed.endswith(b"data: [DONE]\n\n")
    assert replayed == await full_replay(a, stream_id)


async def test_a_control_channel_gone_half_open_is_noticed_and_resubscribed(
    redis_url: str, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The listener's connection stops carrying anything without closing (a failover, a
    NAT's idle timeout): unanswered pings give it away, and the listener subscribes again
    on a new connection, so cancels from other replicas reach this one again."""
    monkeypatch.setattr(redis_journal, "LISTEN_PING_S", 0.1)
    monkeypatch.setattr(redis_journal, "LISTEN_POLL_S", 0.05)
    monkeypatch.setattr(redis_journal, "LISTEN_RETRY_S", 0.05)
    url = urlsplit(redis_url)
    proxy = FreezingProxy(url.hostname or "127.0.0.1", url.port or 6379)
    port = await proxy.start()
    gate = RedisGate.from_settings(with_redis(settings, redis_url).shared)
    assert gate is not None
    mirror = JournalMirror(gate, StreamRegistry(settings.streams, MemoryCheckpointStore()), 60, 15)
    heard: asyncio.Queue[str] = asyncio.Queue()
    monkeypatch.setattr(
        mirror, "control", lambda op, stream_id, reader="": heard.put_nowait(stream_id)
    )
    listener = Redis.from_url(f"redis://127.0.0.1:{port}", socket_timeout=None)
    publisher = Redis.from_url(redis_url)
    listening = asyncio.create_task(mirror.listen(listener))

    async def delivered(name: str) -> None:
        """Publish until the listener has it (a subscription is not there at once)."""
        async with asyncio.timeout(10):
            while True:
                await publisher.publish(CONTROL_CHANNEL, f"cancel {name}")
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.05):
                        while await heard.get() != name:
                            pass
                        return

    try:
        await delivered("before")
        proxy.freeze(existing_only=True)
        await delivered("after")  # only over a new connection and subscription
    finally:
        mirror.stop_listening()
        await listening
        await listener.aclose()
        await publisher.aclose()
        await gate.aclose()
        await proxy.close()


async def test_one_user_s_readers_through_another_replica_are_bounded(
    gateway: GatewayFactory, settings: Settings, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each reader of a stream another replica generates holds a Redis connection in a
    blocking read: one user's readers on a replica are bounded (429, over SSE and over a
    socket), so one key cannot take the connections every user's resumes need."""
    monkeypatch.setattr(redis_journal, "READERS_PER_USER", 2)
    a, b = await replicas(gateway, with_redis(settings, redis_url))
    response = await a.post(
        "/v1/chat/completions", json=chat_body("held [sim stall_after=1]"), headers=AUTH
    )
    stream_id = response.headers[STREAM_ID_HEADER]
    await read_events(response, 1)
    url = f"/v1/streams/{stream_id}/events"
    readers = [await b.get(url, headers=AUTH) for _ in range(2)]
    for reader in readers:
        await read_events(reader, 1)  # following, each on its own connection
    refused = await b.get(url, headers=AUTH)
    assert refused.status == 429
    assert (await refused.json())["error"]["code"] == "too_many_remote_readers"
    socket = await b.ws_connect("/v1/ws", headers=AUTH)
    await socket.send_json({"type": "resume", "stream_id": stream_id})
    frame = await socket.receive_json()
    assert (frame["type"], frame["error"]["code"]) == ("error", "too_many_remote_readers")
    remote = b.app[REMOTE_STREAMS]
    assert remote is not None
    released = asyncio.Event()
    release = remote.release_reader

    def counted_release(owner: tuple[str, str]) -> None:
        release(owner)
        released.set()

    remote.release_reader = counted_release  # type: ignore[method-assign]
    cancel = await a.post(f"/v1/streams/{stream_id}/cancel", headers=AUTH)
    assert cancel.status == 200
    for reader in readers:
        await reader.read()  # the stream's end, followed to the last event
    await released.wait()
    again = await b.get(url, headers=AUTH)  # a slot is free again
    assert again.status == 200
    await again.read()
    await socket.close()
