"""Two real gateway processes (``python -m service``) sharing one redis-server.

Each replica is its own OS process with its own event loop, in-process tiers and Redis
connections, exactly as in a Deployment; the provider is the test's simulator on a real
port, so the tests can see what reached it. Covered here: a 100 rpm limit admits exactly
100 across both; a budget is not overspent by concurrent requests over both; a stream
started on A and resumed through B gets exactly the missing bytes; cancel via B stops
generation on A; Redis killed mid-test (each failure policy holds, nothing hangs, both
recover); and a rolling restart (SIGTERM on A with streams open) that leaves every
stream complete or resumable on B and every ledger row in PostgreSQL.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest

from service.redis_journal import STOPPED
from service.simulator import SimStats
from tests.conftest import AUTH, chat_body
from tests.processes import DEVNULL, python_module
from tests.servers import RedisServer, free_port, reserved_nanos
from tests.streamwire import FIXED_CREATED, events, last_error, raw_chunk, read_events

READY_LINE = "Running on"
CHAT = "/v1/chat/completions"
QUICK = "hi [sim chunks=1]"
LONG = f"tell me [sim chunks=60 delay_ms=15 created={FIXED_CREATED}]"
SLOW = f"go [sim chunks=1000 delay_ms=20 created={FIXED_CREATED}]"
SAFETY_S = 10.0  # a safety net for "never hangs": far above every configured deadline


class Replica:
    """One gateway process: its base URL and the process."""

    def __init__(self, url: str, process: asyncio.subprocess.Process) -> None:
        self.url = url
        self.process = process

    def at(self, path: str) -> str:
        return f"{self.url}{path}"


Start = Callable[..., Awaitable[Replica]]


async def _drain(stream: asyncio.StreamReader) -> None:
    while await stream.readline():
        pass


@pytest.fixture
async def replicas(tmp_path: Path, redis_url: str, sim_url: str) -> AsyncIterator[Start]:
    """``await start(**env)`` starts a replica on Redis (and the test's simulator).

    ``module="tests.replica"`` starts it with the shared rate-limit clock frozen.
    """
    started: list[asyncio.subprocess.Process] = []
    drains: list[asyncio.Task[None]] = []

    async def start(*, module: str = "service", **extra: str) -> Replica:
        port = free_port()
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(tmp_path),
            "SLUICE_PORT": str(port),
            "SLUICE_PROVIDER": "simulated",
            "OPENAI_BASE_URL": sim_url,
            "SLUICE_REDIS_URL": redis_url,
            "SLUICE_REDIS_TIMEOUT_S": "2",
            "SLUICE_DRAIN_S": "0.2",
            "SLUICE_LEDGER": "memory",
            **extra,
        }
        process = await python_module(
            module,
            env=env,
            stdout=DEVNULL,
        )
        started.append(process)
        assert process.stderr is not None
        async with asyncio.timeout(30):  # a safety net only
            while READY_LINE not in (line := (await process.stderr.readline()).decode()):
                if not line and process.stderr.at_eof():
                    raise AssertionError(f"the gateway exited during start-up ({module})")
        drains.append(asyncio.create_task(_drain(process.stderr)))
        return Replica(f"http://127.0.0.1:{port}", process)

    yield start
    for process in started:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            await process.wait()
    for task in drains:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


async def post_status(session: aiohttp.ClientSession, replica: Replica) -> tuple[int, Any]:
    """One non-streamed request; its status and JSON body, bounded by the safety net."""
    async with asyncio.timeout(SAFETY_S):
        async with session.post(
            replica.at(CHAT), json=chat_body(QUICK, stream=False), headers=AUTH
        ) as response:
            return response.status, orjson.loads(await response.read())


async def full_replay(session: aiohttp.ClientSession, replica: Replica, stream_id: str) -> bytes:
    async with session.get(
        replica.at(f"/v1/streams/{stream_id}/events"), headers={**AUTH, "Last-Event-ID": "0"}
    ) as replay:
        assert replay.status == 200
        return await replay.read()


async def test_a_100_rpm_limit_admits_exactly_100_across_two_processes(
    replicas: Start, session: aiohttp.ClientSession
) -> None:
    """150 concurrent requests alternating over A and B: exactly 100 pass, 50 get 429."""
    env = {"module": "tests.replica", "SLUICE_RPM_PER_USER": "100"}
    a, b = await replicas(**env), await replicas(**env)
    results = await asyncio.gather(*(post_status(session, (a, b)[n % 2]) for n in range(150)))
    statuses = [status for status, _ in results]
    assert statuses.count(200) == 100
    assert statuses.count(429) == 50
    codes = {body["error"]["code"] for status, body in results if status == 429}
    assert codes == {"rate_limit_exceeded"}


async def test_a_budget_is_not_overspent_by_concurrent_requests_over_two_processes(
    replicas: Start, session: aiohttp.ClientSession, redis_url: str
) -> None:
    """40 streams over A and B (38 at once) against a $0.006 daily budget: the worst-case
    reservations admitted add up to at most the budget, and one more would not fit."""
    env = {"SLUICE_BUDGET_USER_DAILY_USD": "0.006", "SLUICE_DISCONNECT_GRACE_S": "0"}
    a, b = await replicas(**env), await replicas(**env)
    body = chat_body(SLOW, max_tokens=1000)

    async def start(n: int) -> aiohttp.ClientResponse:
        return await session.post((a, b)[n % 2].at(CHAT), json=body, headers=AUTH)

    # One on each replica first, so both certainly take part; then 38 at once.
    responses = [await start(0), await start(1)]
    responses += await asyncio.gather(*(start(n) for n in range(2, 40)))
    try:
        admitted = [r for r in responses if r.status == 200]
        refused = [r for r in responses if r.status == 429]
        assert len(admitted) + len(refused) == 40
        assert admitted
        assert refused
        for response in refused:
            assert (await response.json())["error"]["code"] == "budget_exceeded"
        hosts = {str(r.url.port) for r in admitted}
        assert len(hosts) == 2  # both replicas admitted some: the budget really is shared

        reserved = await reserved_nanos(redis_url)
        worst = reserved // len(admitted)  # every request reserved the same worst case
        assert reserved == worst * len(admitted)
        assert reserved <= 6_000_000 < reserved + worst  # nano-dollars: full, and never over
    finally:
        for response in responses:
            response.close()


async def test_a_stream_started_on_a_resumes_through_b_with_exactly_the_missing_bytes(
    replicas: Start, session: aiohttp.ClientSession, sim_stats: SimStats
) -> None:
    """Read 3 events from A, drop the connection, resume via B: head + tail == A's journal."""
    a, b = await replicas(), await replicas()
    async with session.post(a.at(CHAT), json=chat_body(LONG), headers=AUTH) as response:
        assert response.status == 200
        stream_id = response.headers["X-Sluice-Stream-Id"]
        head = await read_events(response, 3)
    # The connection is gone; A keeps generating inside the disconnect grace window.

    async with session.get(
        b.at(f"/v1/streams/{stream_id}/events"), headers={**AUTH, "Last-Event-ID": "3"}
    ) as resumed:
        assert resumed.status == 200
        assert resumed.headers["X-Sluice-Stream-Id"] == stream_id
        tail = await resumed.read()

    assert [seq for seq, _ in events(head)] == [1, 2, 3]
    assert events(tail)[0][0] == 4
    assert tail.endswith(b"data: [DONE]\n\n")
    assert head + tail == await full_replay(session, a, stream_id)
    assert sim_stats.requests == 1  # generated once, on A


async def test_cancel_through_b_stops_generation_on_a(
    replicas: Start, session: aiohttp.ClientSession, sim_stats: SimStats
) -> None:
    """POST /cancel on B as soon as A's headers name the stream (a stop button, and the
    load balancer picked B): A aborts the provider call, its client gets ``stream_cancelled``."""
    a, b = await replicas(), await replicas()
    async with session.post(a.at(CHAT), json=chat_body(SLOW), headers=AUTH) as response:
        stream_id = response.headers["X-Sluice-Stream-Id"]

        async with session.post(b.at(f"/v1/streams/{stream_id}/cancel"), headers=AUTH) as cancelled:
            assert cancelled.status == 200
            checkpoint = await cancelled.json()
        assert (checkpoint["id"], checkpoint["status"]) == (stream_id, "cancelled")

        await sim_stats.wait_for(lambda s: s.aborted == 1)
        async with asyncio.timeout(SAFETY_S):
            rest = await response.read()
    assert last_error(rest)["code"] == "stream_cancelled"
    assert sim_stats.completed == 0


async def _ws_frame(ws: aiohttp.ClientWebSocketResponse) -> tuple[dict[str, Any], str]:
    async with asyncio.timeout(SAFETY_S):
        message = await ws.receive()
    assert message.type is aiohttp.WSMsgType.TEXT, message
    return orjson.loads(message.data), message.data


async def _ws_send(ws: aiohttp.ClientWebSocketResponse, **frame: Any) -> None:
    await ws.send_str(orjson.dumps(frame).decode())


async def test_a_websocket_stream_started_on_a_resumes_over_a_socket_on_b(
    replicas: Start, session: aiohttp.ClientSession, sim_stats: SimStats
) -> None:
    """Three chunk frames from A, socket closed, ``resume`` on a socket to B: B follows A's
    journal with the same numbering and bytes, and ends with A's ``done``."""
    a, b = await replicas(), await replicas()
    async with session.ws_connect(a.at("/v1/ws"), headers=AUTH) as first:
        await _ws_send(first, type="chat.completion.create", request_id="r", body=chat_body(LONG))
        started, _ = await _ws_frame(first)
        head = [await _ws_frame(first) for _ in range(3)]
    stream_id = started["stream_id"]

    async with session.ws_connect(b.at("/v1/ws"), headers=AUTH) as second:
        await _ws_send(second, type="resume", stream_id=stream_id, last_seq=3, request_id="r")
        rest = [await _ws_frame(second)]
        while rest[-1][0]["type"] == "chunk":
            rest.append(await _ws_frame(second))

    frames = head + rest
    assert [f["seq"] for f, _ in frames] == list(range(1, len(frames) + 1))
    done = rest[-1][0]
    assert (done["type"], done["stream_id"], done["finish_reason"]) == ("done", stream_id, "stop")
    assert done["usage"]["completion_tokens"] == 60
    replay = [data for _, data in events(await full_replay(session, a, stream_id))]
    assert [raw_chunk(raw) for _, raw in frames[:-1]] == replay[:-1]  # all but [DONE]
    assert sim_stats.requests == 1  # generated once, on A


async def test_cancel_over_a_socket_on_b_stops_generation_on_a(
    replicas: Start, session: aiohttp.ClientSession, sim_stats: SimStats
) -> None:
    """A stream generated on A, followed over a socket on B: ``cancel`` there stops A's
    provider call, and both readers get ``stream_cancelled``."""
    a, b = await replicas(), await replicas()
    async with session.post(a.at(CHAT), json=chat_body(SLOW), headers=AUTH) as response:
        stream_id = response.headers["X-Sluice-Stream-Id"]
        async with session.ws_connect(b.at("/v1/ws"), headers=AUTH) as ws:
            await _ws_send(ws, type="resume", stream_id=stream_id, last_seq=0, request_id=7)
            first, _ = await _ws_frame(ws)
            assert (first["type"], first["request_id"]) == ("chunk", 7)  # following A's journal
            await _ws_send(ws, type="cancel", request_id=7)
            final, _ = await _ws_frame(ws)
            while final["type"] == "chunk":
                final, _ = await _ws_frame(ws)
        assert (final["type"], final["error"]["code"]) == ("error", "stream_cancelled")
        await sim_stats.wait_for(lambda s: s.aborted == 1)
        async with asyncio.timeout(SAFETY_S):
            rest = await response.read()
    assert last_error(rest)["code"] == "stream_cancelled"
    assert sim_stats.completed == 0


async def _probe(session: aiohttp.ClientSession, replica: Replica, path: str) -> tuple[int, str]:
    async with asyncio.timeout(SAFETY_S), session.get(replica.at(path), headers=AUTH) as response:
        return response.status, await response.text()


async def test_redis_killed_mid_test_each_policy_holds_nothing_hangs_and_both_recover(
    replicas: Start,
    session: aiohttp.ClientSession,
    redis_server: RedisServer,
    sim_stats: SimStats,
) -> None:
    """A is fail-open, B fail-closed. Redis frozen, then killed with a stream open on A: the
    stream still completes, A keeps serving under its local limits, B answers 503; /readyz
    and /metrics say so; no request outlives the safety net; with Redis back both serve
    from it again."""
    env = {
        "SLUICE_RPM_PER_USER": "1000",
        "SLUICE_REDIS_TIMEOUT_S": "0.25",
        "SLUICE_REDIS_BREAKER_FAIL_MAX": "1",  # the first failure opens the breaker
        "SLUICE_REDIS_BREAKER_RESET_S": "0",  # and the next call probes: recovery is immediate
    }
    a = await replicas(SLUICE_REDIS_FAILURE="open", **env)
    b = await replicas(SLUICE_REDIS_FAILURE="closed", **env)
    for replica in (a, b):
        assert (await post_status(session, replica))[0] == 200

    redis_server.pause()  # frozen: connections stay open and nothing answers
    try:
        frozen = [await post_status(session, replica) for replica in (a, b)]
    finally:
        redis_server.resume()
    assert [status for status, _ in frozen] == [200, 503]  # each bounded by the deadline

    held = await session.post(a.at(CHAT), json=chat_body(LONG), headers=AUTH)
    head = await read_events(held, 2)
    redis_server.stop()  # killed: connections refused
    try:
        open_status, _ = await post_status(session, a)
        closed_status, closed_body = await post_status(session, b)
        async with asyncio.timeout(SAFETY_S):
            rest = await held.read()  # the open stream never waited on Redis
        ready = {r: await _probe(session, r, "/readyz") for r in (a, b)}
        metrics = await _probe(session, b, "/metrics")
    finally:
        redis_server.start()

    assert open_status == 200
    assert closed_status == 503
    assert closed_body["error"]["code"] == "shared_state_unavailable"
    assert (head + rest).endswith(b"data: [DONE]\n\n")
    for replica, policy in ((a, "open"), (b, "closed")):
        status, text = ready[replica]
        assert status == 200  # every replica shares Redis: leaving the endpoints helps no one
        report = orjson.loads(text)["redis"]
        assert report["state"] != "ok"
        assert report["failure_policy"] == policy
        assert report["errors"] >= 1
    assert "sluice_redis_up 0.0" in metrics[1]

    for replica in (a, b):  # Redis is back: both serve from it, the breaker closes
        assert (await post_status(session, replica))[0] == 200
        status, text = await _probe(session, replica, "/readyz")
        assert orjson.loads(text)["redis"]["state"] == "ok"
    assert "sluice_redis_up 1.0" in (await _probe(session, b, "/metrics"))[1]
    assert sim_stats.requests == 7  # 2 + 1 frozen + the held stream + 1 killed + 2: no 503s


async def test_sigterm_on_one_replica_leaves_every_stream_complete_or_resumable_on_the_other(
    replicas: Start, session: aiohttp.ClientSession, postgres_url: str
) -> None:
    """SIGTERM A with three streams open: each client gets either the whole stream or a
    retry hint, B serves each one's checkpoint and replays its journal byte for byte, and
    the PostgreSQL ledger both processes bill into has one row per request."""
    env = {"SLUICE_DATABASE_URL": postgres_url}
    a, b = await replicas(**env), await replicas(**env)
    for replica in (a, b):  # one finished request on each replica
        assert (await post_status(session, replica))[0] == 200

    prompts = [
        f"short [sim chunks=8 delay_ms=1 created={FIXED_CREATED}]",
        f"long [sim chunks=5000 delay_ms=5 created={FIXED_CREATED}]",
        f"longer [sim chunks=5000 delay_ms=10 created={FIXED_CREATED}]",
    ]
    responses = [await session.post(a.at(CHAT), json=chat_body(p), headers=AUTH) for p in prompts]
    ids = [r.headers["X-Sluice-Stream-Id"] for r in responses]
    heads = [await read_events(r, 3) for r in responses]
    a.process.send_signal(signal.SIGTERM)
    async with asyncio.timeout(SAFETY_S):
        seen = [head + await r.read() for head, r in zip(heads, responses, strict=True)]
        assert await a.process.wait() == 0
    for response in responses:
        response.close()

    statuses = []
    for stream_id, body in zip(ids, seen, strict=True):
        async with session.get(b.at(f"/v1/streams/{stream_id}"), headers=AUTH) as found:
            assert found.status == 200
            checkpoint = orjson.loads(await found.read())
        statuses.append(checkpoint["status"])
        if checkpoint["status"] == "completed":
            assert body.endswith(b"data: [DONE]\n\n")
        else:
            assert checkpoint["status"] == "shutdown"
            assert body.endswith(b"retry: 1000\n")  # come back later, through B
        journal = await full_replay(session, b, stream_id)
        if checkpoint["status"] == "completed":
            assert journal == body  # every byte A sent, in order, and nothing else
        else:  # every event A sent, in order; then, there, the end (nothing more will come)
            end = body.rindex(b"event: error")
            assert journal == body[:end] + STOPPED
        assert [s for s, _ in events(journal) if s is not None][-1] == checkpoint["last_seq"]
    assert "shutdown" in statuses  # the long ones cannot finish inside a 0.2 s drain

    b.process.send_signal(signal.SIGTERM)  # B flushes its ledger buffer on the way out
    assert await b.process.wait() == 0
    connection = await asyncpg.connect(postgres_url)
    try:
        rows = await connection.fetch("SELECT request_id, status FROM ledger")
    finally:
        await connection.close()
    by_id = {row["request_id"]: row["status"] for row in rows}
    assert len(rows) == 5  # two finished requests and the three streams, one row each
    for stream_id, status in zip(ids, statuses, strict=True):
        assert by_id[stream_id] == ("completed" if status == "completed" else "cancelled")
