"""The Redis gate: deadlines, its own breaker (on an injected clock), and the 503 it offers."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from service.appkeys import REDIS, REMOTE_STREAMS
from service.redisgate import RedisGate, RedisUnavailable
from service.settings import Settings
from tests.conftest import GatewayFactory
from tests.servers import RedisServer, with_redis


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[Redis]:
    redis = Redis.from_url(
        redis_url, socket_timeout=0.2, socket_connect_timeout=0.2, retry=Retry(NoBackoff(), 0)
    )
    yield redis
    await redis.aclose()


GateMaker = Callable[..., RedisGate]


@pytest.fixture
async def make_gate(client: Redis) -> AsyncIterator[GateMaker]:
    """Gates on ``client``, closed (their own connection too) after the test."""
    made: list[RedisGate] = []

    def make(**kwargs: Any) -> RedisGate:
        made.append(RedisGate(client, **kwargs))
        return made[-1]

    yield make
    for gate in made:
        await gate.aclose()


async def test_the_breaker_opens_after_fail_max_and_lets_one_probe_through_later(
    make_gate: GateMaker, client: Redis, redis_server: RedisServer
) -> None:
    """3 failures open it; while open no call reaches the network; after reset one probe does."""
    clock = Clock()
    gate = make_gate(failure="closed", timeout_s=0.2, fail_max=3, reset_s=5, clock=clock)
    assert await gate.run(lambda r: r.ping()) is True
    redis_server.stop()
    try:
        for _ in range(3):
            with pytest.raises(RedisUnavailable):
                await gate.run(lambda r: r.ping())
        assert gate.state == "open"
        assert gate.errors_total == 3
        with pytest.raises(RedisUnavailable, match="breaker open"):
            await gate.run(lambda r: r.ping())
        assert (gate.errors_total, gate.rejected_total) == (3, 1)  # not even attempted

        clock.now += 5
        assert gate.state == "half_open"
        with pytest.raises(RedisUnavailable):
            await gate.run(lambda r: r.ping())  # the probe fails: open again
        assert gate.state == "open"
    finally:
        redis_server.start()
    clock.now += 5
    assert await gate.run(lambda r: r.ping()) is True  # the probe succeeds: closed
    assert gate.state == "closed"
    assert gate.health()["state"] == "ok"


@pytest.mark.parametrize("late", [RedisError("late failure"), "late success"])
async def test_a_call_from_before_the_circuit_opened_neither_ends_the_probe_nor_closes_it(
    make_gate: GateMaker, late: object
) -> None:
    """A slow call let in while the circuit was closed ends while the probe is out: failing,
    it must not let a second probe through; succeeding, it must not close the circuit (the
    probe alone says whether Redis is back)."""
    clock = Clock()
    gate = make_gate(failure="closed", timeout_s=1000, fail_max=1, reset_s=5, clock=clock)
    old_in, old_done = asyncio.Event(), asyncio.Event()
    probe_in, probe_done = asyncio.Event(), asyncio.Event()

    async def old_call(_: Redis) -> object:
        old_in.set()
        await old_done.wait()
        if isinstance(late, Exception):
            raise late
        return late

    async def failing(_: Redis) -> None:
        raise RedisError("down")

    async def probe(_: Redis) -> str:
        probe_in.set()
        await probe_done.wait()
        return "probe"

    old = asyncio.ensure_future(gate.run(old_call))
    await old_in.wait()  # let in while the circuit is closed
    with pytest.raises(RedisUnavailable):
        await gate.run(failing)  # fail_max 1: open
    clock.now += 5
    probing = asyncio.ensure_future(gate.run(probe))
    await probe_in.wait()
    old_done.set()
    with contextlib.suppress(RedisUnavailable):
        await old
    assert gate.state == "half_open"  # the stale call changed nothing
    with pytest.raises(RedisUnavailable, match="breaker open"):
        await gate.run(failing)  # no second probe
    probe_done.set()
    assert await probing == "probe"
    assert gate.state == "closed"


async def test_a_frozen_redis_costs_at_most_the_deadline(
    make_gate: GateMaker, client: Redis, redis_server: RedisServer
) -> None:
    """A Redis that accepts but never answers: the call fails with RedisUnavailable."""
    gate = make_gate(failure="open", timeout_s=0.2)
    await gate.run(lambda r: r.ping())  # a pooled connection, so the freeze hits a read
    redis_server.pause()
    try:
        with pytest.raises(RedisUnavailable):
            await gate.run(lambda r: r.ping())
    finally:
        redis_server.resume()
    assert gate.errors_total == 1
    assert gate.state == "closed"  # one failure is below fail_max


def test_fail_closed_renders_an_openai_shaped_503() -> None:
    """The policy's answer: 503 ``shared_state_unavailable`` with a Retry-After."""
    gate = RedisGate(Redis(), failure="closed", timeout_s=0.2, reset_s=4.2)
    error = gate.unavailable_error()
    assert error.http_status == 503
    assert error.payload()["error"]["code"] == "shared_state_unavailable"
    assert error.headers["Retry-After"] == "4"


async def reads_since_reset(redis: Redis) -> int:
    """Requests Redis read since ``CONFIG RESETSTAT`` (a pipeline is one), INFO's own left out."""
    return int((await redis.info("stats"))["total_reads_processed"]) - 1


async def test_posted_writes_ride_with_the_next_script_call(
    make_gate: GateMaker, client: Redis, redis_url: str
) -> None:
    """Two posts and a script call: one round trip, the writes stored before the script
    runs (it sees them), the script's own reply returned."""
    gate = make_gate(failure="closed", timeout_s=2)
    script = client.register_script("return (redis.call('GET', KEYS[1]) or '') .. ARGV[1]")
    await gate.evalsha(script, ["k"], ["!"])  # Redis loads the script once
    observer = Redis.from_url(redis_url)
    try:
        await observer.config_resetstat()
        gate.post("first", "SET", "k", "one")
        gate.post("second", "SET", "k", "two")
        assert await gate.evalsha(script, ["k"], ["!"]) == b"two!"
        assert await reads_since_reset(observer) == 1
        await gate.flush()  # nothing left to send
        assert await reads_since_reset(observer) == 2  # just the INFO above
    finally:
        await observer.aclose()


async def test_posted_writes_survive_a_flushed_script_cache(
    make_gate: GateMaker, client: Redis
) -> None:
    """After SCRIPT FLUSH (a restarted Redis) the script is loaded again; the writes stand."""
    gate = make_gate(failure="closed", timeout_s=2)
    script = client.register_script("return redis.call('GET', KEYS[1])")
    await gate.run(lambda r: r.script_flush())
    gate.post("the write", "SET", "k", "v")
    assert await gate.evalsha(script, ["k"], []) == b"v"


async def test_the_first_script_call_after_a_redis_restart_succeeds(
    make_gate: GateMaker, client: Redis, redis_server: RedisServer
) -> None:
    """A restarted Redis has no scripts: the gate loaded it over redis-py's pool, whose
    idle connection the restart had closed, and the first request after a restart failed
    (503 ``shared_state_unavailable``, and a breaker failure). The script now goes whole
    over the gate's own connection, as it reconnects."""
    gate = make_gate(failure="closed", timeout_s=2)
    script = client.register_script("return redis.call('GET', KEYS[1])")
    assert await client.ping()  # the pool now holds a connection
    assert await gate.evalsha(script, ["k"], []) is None
    redis_server.stop()
    redis_server.start()
    fresh = Redis.from_url(redis_server.url)
    try:
        await fresh.set("k", "v")
    finally:
        await fresh.aclose()
    assert await gate.evalsha(script, ["k"], []) == b"v"
    assert gate.errors_total == 0


async def test_flush_sends_what_no_round_trip_took(make_gate: GateMaker, client: Redis) -> None:
    """With no script call in between, ``flush`` stores the posted writes itself."""
    gate = make_gate(failure="closed", timeout_s=2)
    gate.post("the write", "SET", "k", "v", "PX", 60_000)
    assert await client.get("k") is None
    await gate.flush()
    assert await client.get("k") == b"v"


async def test_posted_writes_lost_to_an_outage_are_logged_never_raised(
    make_gate: GateMaker, client: Redis, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis down: ``flush`` logs each lost write and returns; with the breaker open the
    queued writes are dropped (logged) rather than kept for a later trip."""
    clock = Clock()
    gate = make_gate(failure="open", timeout_s=0.2, fail_max=1, reset_s=5, clock=clock)
    redis_server.stop()
    try:
        gate.post("checkpoint of strm_a", "SET", "a", "1")
        await gate.flush()
        assert gate.state == "open"
        gate.post("checkpoint of strm_b", "SET", "b", "1")
        with pytest.raises(RedisUnavailable, match="breaker open"):
            await gate.evalsha(client.register_script("return 1"), [], [])
        await gate.flush()
    finally:
        redis_server.start()
    lost = [r.getMessage() for r in caplog.records if "kept locally only" in r.getMessage()]
    assert lost == [
        "checkpoint of strm_a kept locally only: redis ConnectionError",
        "checkpoint of strm_b kept locally only: redis breaker open",
    ]
    clock.now += 5
    await gate.flush()  # nothing queued: no call, the breaker untouched
    assert await gate.run(lambda r: r.exists("a", "b")) == 0


async def test_connections_carry_no_socket_timeout_of_their_own(
    gateway: GatewayFactory, settings: Settings, redis_url: str
) -> None:
    """The gate's deadline bounds every call, so its connections have no socket timeout:
    with one, redis-py sends through ``asyncio.wait_for``, which on Python 3.11 can drop a
    cancellation. The follower's blocking XREAD must not be cut at redis-py's 5 s default."""
    client = await gateway(with_redis(settings, redis_url))
    gate, remote = client.app[REDIS], client.app[REMOTE_STREAMS]
    assert gate is not None
    assert remote is not None
    for pool in (gate.client.connection_pool, remote._follower.connection_pool):
        connection = await pool.get_connection()
        try:
            assert connection.socket_timeout is None
        finally:
            await pool.release(connection)


async def test_a_pipeline_carries_the_posts_and_fails_on_an_error_reply(
    make_gate: GateMaker, client: Redis
) -> None:
    """Replies come back in order, after the posted writes ran; an error reply fails the
    call (and counts towards the breaker), as it fails a redis-py pipeline."""
    gate = make_gate(failure="closed", timeout_s=2)
    gate.post("the write", "SET", "p", "1")
    assert await gate.pipeline([("INCR", "p"), ("GET", "p")]) == [2, b"2"]
    with pytest.raises(RedisUnavailable):
        await gate.pipeline([("SET", "s", "x"), ("INCR", "s"), ("SET", "t", "y")])
    assert gate.errors_total == 1
    assert await client.mget("s", "t") == [b"x", b"y"]  # not a transaction: the rest ran
