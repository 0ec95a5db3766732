"""Limits shared by replicas through one real redis-server, and the Redis failure policy."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

from aiohttp.test_utils import TestClient

from service.appkeys import GATE, REDIS
from service.limits import Denial, Grant, MemoryLimiter, Tier
from service.redis_limits import RedisLimiter
from service.redisgate import RedisGate
from service.settings import Settings
from tests.conftest import AUTH, GatewayFactory, chat_body
from tests.servers import RedisServer, with_redis

QUICK = "hi [sim chunks=1]"


def with_limits(settings: Settings, **changes: Any) -> Settings:
    return replace(settings, limits=replace(settings.limits, **changes))


async def statuses(clients: list[TestClient[Any, Any]], count: int) -> list[int]:
    """Send ``count`` concurrent non-streamed requests, spread over ``clients`` in turn."""

    async def one(n: int) -> int:
        client = clients[n % len(clients)]
        response = await client.post(
            "/v1/chat/completions", json=chat_body(QUICK, stream=False), headers=AUTH
        )
        await response.read()
        return response.status

    return list(await asyncio.gather(*(one(n) for n in range(count))))


async def test_a_100_rpm_limit_admits_exactly_100_across_two_replicas(
    gateway: GatewayFactory, settings: Settings, redis_url: str
) -> None:
    """150 concurrent requests spread over A and B: exactly 100 pass, 50 get 429."""
    shared = with_limits(with_redis(settings, redis_url), user_rpm=100)
    a, b = await gateway(shared), await gateway(shared)
    for client in (a, b):  # one frozen clock: the bucket must not leak during the test
        limiter = client.app[GATE].limiter
        assert isinstance(limiter, RedisLimiter)
        limiter.clock = lambda: 1_000_000.0
    results = await statuses([a, b], 150)
    assert results.count(200) == 100
    assert results.count(429) == 50


async def test_without_redis_each_replica_enforces_its_own_limit(
    gateway: GatewayFactory, settings: Settings
) -> None:
    """The contrast: in-process limits let about 2 x 100 through two replicas."""
    local = with_limits(settings, user_rpm=100)
    a, b = await gateway(local), await gateway(local)
    results = await statuses([a, b], 250)
    assert results.count(200) >= 200  # (the buckets leak 100/60 a second meanwhile)


async def test_the_stream_cap_holds_across_replicas(
    gateway: GatewayFactory, settings: Settings, redis_url: str
) -> None:
    """With a cap of 2, two streams on A leave no room for a third on B until one ends."""
    shared = with_limits(with_redis(settings, redis_url), max_streams_per_user=2)
    a, b = await gateway(shared), await gateway(shared)
    slow = chat_body("long [sim chunks=1000 delay_ms=20]")
    first = await a.post("/v1/chat/completions", json=slow, headers=AUTH)
    second = await a.post("/v1/chat/completions", json=slow, headers=AUTH)
    assert (first.status, second.status) == (200, 200)

    third = await b.post("/v1/chat/completions", json=slow, headers=AUTH)
    assert third.status == 429
    assert (await third.json())["error"]["code"] == "concurrent_streams_exceeded"

    stream_id = first.headers["X-Sluice-Stream-Id"]
    cancelled = await a.post(f"/v1/streams/{stream_id}/cancel", headers=AUTH)
    assert cancelled.status == 200
    fourth = await b.post("/v1/chat/completions", json=chat_body(QUICK), headers=AUTH)
    assert fourth.status == 200
    await fourth.read()
    other = second.headers["X-Sluice-Stream-Id"]
    assert (await b.post(f"/v1/streams/{other}/cancel", headers=AUTH)).status == 200


async def test_token_reservations_are_settled_in_the_shared_bucket(redis_url: str) -> None:
    """Reserve 600 of 1000 tokens on one replica, settle at 100: the other can take 800."""
    tier = (Tier("user", "alice", rpm=0, tpm=1000),)
    gates = [RedisGate.from_settings(with_redis(Settings(), redis_url).shared) for _ in range(2)]
    assert gates[0] is not None
    assert gates[1] is not None
    one, two = (RedisLimiter(gate, MemoryLimiter()) for gate in gates)
    try:
        one.clock = two.clock = lambda: 1_000_000.0  # no leak between the steps
        grant = await one.try_acquire(tier, 600)
        assert isinstance(grant, Grant)
        denied = await two.try_acquire(tier, 800)
        assert isinstance(denied, Denial)
        assert denied.unit == "tokens"
        assert denied.retry_after_s > 0
        await one.settle(grant, 100)
        allowed = await two.try_acquire(tier, 800)
        assert isinstance(allowed, Grant)
        assert allowed.token_quota is not None
        assert allowed.token_quota.remaining <= 100
    finally:
        for gate in gates:
            await gate.client.aclose()


async def test_fail_closed_answers_503_while_redis_is_frozen_then_recovers(
    gateway: GatewayFactory, settings: Settings, redis_url: str, redis_server: RedisServer
) -> None:
    """A frozen Redis never hangs a request: fail-closed answers 503, then serves again."""
    shared = with_redis(
        settings,
        redis_url,
        redis_failure="closed",
        redis_breaker_reset_s=0.0,
        redis_timeout_s=0.25,
    )
    client = await gateway(with_limits(shared, user_rpm=100))
    redis_server.pause()
    try:
        async with asyncio.timeout(10):  # a safety net: each call is bounded by 0.25 s
            response = await client.post(
                "/v1/chat/completions", json=chat_body(QUICK), headers=AUTH
            )
        assert response.status == 503
        error = (await response.json())["error"]
        assert error["code"] == "shared_state_unavailable"
        assert response.headers["Retry-After"]
    finally:
        redis_server.resume()
    recovered = await client.post("/v1/chat/completions", json=chat_body(QUICK), headers=AUTH)
    assert recovered.status == 200
    await recovered.read()


async def test_fail_open_falls_back_to_local_limits_while_redis_is_down(
    gateway: GatewayFactory, settings: Settings, redis_url: str, redis_server: RedisServer
) -> None:
    """Fail-open with Redis killed: requests pass under the local limit, over it get 429."""
    shared = with_redis(settings, redis_url, redis_failure="open")
    client = await gateway(with_limits(shared, user_rpm=3))
    redis_server.stop()
    try:
        results = await statuses([client], 5)
    finally:
        redis_server.start()
    assert results.count(200) == 3
    assert results.count(429) == 2
    gate = client.app[REDIS]
    assert gate is not None
    assert gate.fallbacks_total >= 3


async def test_readyz_reports_the_redis_breaker(
    gateway: GatewayFactory, settings: Settings, redis_url: str, redis_server: RedisServer
) -> None:
    """/readyz stays 200 (every replica shares Redis) and shows the breaker opening."""
    client = await gateway(with_redis(settings, redis_url, redis_failure="open"))
    ready = await (await client.get("/readyz")).json()
    assert ready["redis"]["state"] == "ok"
    redis_server.stop()
    try:
        await statuses([client], 3)  # three failures open the breaker
        response = await client.get("/readyz")
        assert response.status == 200
        report = (await response.json())["redis"]
    finally:
        redis_server.start()
    assert report["state"] == "open"
    assert report["failure_policy"] == "open"
    assert report["errors"] >= 3
    assert client.app[GATE].limiter is not None
