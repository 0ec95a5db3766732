"""Limits shared by replicas through one real redis-server, and the Redis failure policy."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from service.appkeys import GATE, REDIS
from service.errors import ServiceUnavailableError
from service.limits import STREAM_CAP, Denial, Grant, MemoryLimiter, Tier
from service.redis_checkpoints import checkpoint_key
from service.redis_limits import STREAM_LEASE_S, RedisLimiter, streams_key
from service.redisgate import RedisGate, RedisUnavailable
from service.settings import Settings
from tests.conftest import AUTH, GatewayFactory, chat_body
from tests.servers import RedisServer, cancelled_in_flight, fail_closed_fast, with_redis
from tests.test_ledger import finished

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


async def test_a_stream_ended_on_one_replica_frees_its_slot_for_another_at_once(
    gateway: GatewayFactory, settings: Settings, redis_url: str
) -> None:
    """With Redis, a stream is settled as it ends, not in a batch (``registry.py``): B
    cannot ask A to hurry. At a cap of one, requests alternating between them all pass."""
    shared = with_limits(with_redis(settings, redis_url), max_streams_per_user=1)
    a, b = await gateway(shared), await gateway(shared)
    for client in (a, b, a, b):
        response = await client.post("/v1/chat/completions", json=chat_body("hi"), headers=AUTH)
        assert response.status == 200
        assert (await response.text()).endswith("data: [DONE]\n\n")


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


@pytest.fixture
async def replicas(redis_url: str) -> AsyncIterator[list[RedisLimiter]]:
    """Two replicas' limiters on the same Redis, on one frozen clock (no leak meanwhile)."""
    gates = [RedisGate.from_settings(with_redis(Settings(), redis_url).shared) for _ in range(2)]
    ready = [gate for gate in gates if gate is not None]
    assert len(ready) == 2
    limiters = [RedisLimiter(gate, MemoryLimiter(), clock=lambda: 1_000_000.0) for gate in ready]
    yield limiters
    for gate in ready:
        await gate.aclose()


async def test_token_reservations_are_settled_in_the_shared_bucket(
    replicas: list[RedisLimiter],
) -> None:
    """Reserve 600 of 1000 tokens on one replica, settle at 100: the other can take 800."""
    one, two = replicas
    tier = (Tier("user", "alice", rpm=0, tpm=1000),)
    grant = await one.admit("alice", 0, tier, 600)
    assert isinstance(grant, Grant)
    assert grant.shared
    denied = await two.admit("alice", 0, tier, 800)
    assert isinstance(denied, Denial)
    assert denied.unit == "tokens"
    assert denied.retry_after_s > 0
    assert two.streams_of("alice") == 0  # the denied request's local slot was given back
    await one.finish(grant, 100)
    allowed = await two.admit("alice", 0, tier, 800)
    assert isinstance(allowed, Grant)
    assert allowed.token_quota is not None
    assert allowed.token_quota.remaining <= 100


async def test_an_admission_whose_caller_is_cancelled_in_flight_is_given_back(
    replicas: list[RedisLimiter], redis_server: RedisServer, redis_url: str
) -> None:
    """The client leaves while the admission script is on its way: Redis still takes the
    stream slot and the tokens, and both are then given back, not held for an hour."""
    one, two = replicas
    tier = (Tier("user", "alice", rpm=0, tpm=1000),)
    await cancelled_in_flight(redis_server, one.admit("alice", 1, tier, 900))
    await one._gate.undone()
    redis = Redis.from_url(redis_url)
    try:
        assert await redis.zcard(streams_key("alice")) == 0
    finally:
        await redis.aclose()
    assert isinstance(await two.admit("alice", 1, tier, 900), Grant)  # slot and tokens free


async def test_one_admission_script_counts_exactly_across_two_replicas(
    replicas: list[RedisLimiter], redis_url: str
) -> None:
    """60 concurrent admissions over A and B against rpm=40 and a stream cap of 30: the
    cap binds first (30 admitted, the rest refused for it, no request poured for them),
    and every slot freed lets exactly one more in until the rate bucket is full."""
    tiers = (Tier("user", "alice", rpm=40, tpm=0),)

    async def admit(n: int) -> Grant | Denial:
        return await replicas[n % 2].admit("alice", 30, tiers, 10)

    first = await asyncio.gather(*(admit(n) for n in range(60)))
    grants = [(n, g) for n, g in enumerate(first) if isinstance(g, Grant)]
    denials = [d for d in first if isinstance(d, Denial)]
    assert len(grants) == 30
    assert {d.unit for d in denials} == {STREAM_CAP}
    redis = Redis.from_url(redis_url)
    try:
        assert await redis.zcard(streams_key("alice")) == 30
        for n, grant in grants[:20]:
            await replicas[n % 2].finish(grant, 10)
        assert await redis.zcard(streams_key("alice")) == 10
        second = await asyncio.gather(*(admit(n) for n in range(20)))
        assert sum(isinstance(g, Grant) for g in second) == 10  # 40 requests in the bucket
        rate = [d for d in second if isinstance(d, Denial)]
        assert {d.unit for d in rate} == {"requests"}
        assert await redis.zcard(streams_key("alice")) == 20  # refused: no slot taken
    finally:
        await redis.aclose()


async def test_a_full_stream_cap_on_another_replica_refuses_and_gives_back(
    replicas: list[RedisLimiter],
) -> None:
    """A holds the only slot: B is refused for the cap (not a rate limit), its local grant
    is given back, and once A finishes, B is admitted."""
    one, two = replicas
    tiers = (Tier("user", "alice", rpm=2, tpm=0),)
    held = await one.admit("alice", 1, tiers, 1)
    assert isinstance(held, Grant)
    refused = await two.admit("alice", 1, tiers, 1)
    assert isinstance(refused, Denial)
    assert refused.unit == STREAM_CAP
    assert two.streams_of("alice") == 0
    await one.finish(held, 1)
    assert one.streams_of("alice") == 0
    second = await two.admit("alice", 1, tiers, 1)
    assert isinstance(second, Grant)
    assert second.requests is not None
    assert second.requests.remaining == 0  # the refused admission poured no request


async def test_a_slot_nobody_frees_stops_counting_when_its_lease_ends(
    replicas: list[RedisLimiter],
) -> None:
    """A dies holding the user's only slot (or its closing reply is lost): B is refused
    until that slot's lease ends, however often the user asks meanwhile, then admitted."""
    one, two = replicas
    tiers = (Tier("user", "alice", rpm=0, tpm=0),)
    assert isinstance(await one.admit("alice", 1, tiers, 1), Grant)  # never finished
    for elapsed in (0.0, STREAM_LEASE_S / 2, STREAM_LEASE_S - 1):
        two.clock = lambda elapsed=elapsed: 1_000_000.0 + elapsed
        refused = await two.admit("alice", 1, tiers, 1)
        assert isinstance(refused, Denial)
        assert refused.unit == STREAM_CAP
    two.clock = lambda: 1_000_000.0 + STREAM_LEASE_S + 1
    assert isinstance(await two.admit("alice", 1, tiers, 1), Grant)


async def test_admission_while_redis_is_down_follows_the_failure_policy(
    redis_url: str, redis_server: RedisServer
) -> None:
    """Fail-open: the local grant, settled locally only, so the shared count stays right
    when Redis returns. Fail-closed: 503, and the local grant is given back."""
    made = [
        RedisGate.from_settings(
            with_redis(Settings(), redis_url, redis_failure=policy, redis_timeout_s=0.25).shared
        )
        for policy in ("open", "closed")
    ]
    gates = [gate for gate in made if gate is not None]
    assert len(gates) == 2
    opened, closed = (RedisLimiter(gate, MemoryLimiter()) for gate in gates)
    tiers = (Tier("user", "alice", rpm=100, tpm=0),)
    shared = await opened.admit("alice", 5, tiers, 1)  # counted in Redis
    assert isinstance(shared, Grant)
    redis_server.stop()
    try:
        local = await opened.admit("alice", 5, tiers, 1)
        assert isinstance(local, Grant)
        assert not local.shared
        assert opened.streams_of("alice") == 2
        with pytest.raises(ServiceUnavailableError):
            await closed.admit("alice", 5, tiers, 1)
        assert closed.streams_of("alice") == 0
        unshared = await closed.admit("alice", 0, (Tier("user", "alice", 0, 0),), 1)
        assert isinstance(unshared, Grant)  # no cap, no rate: nothing to ask Redis
    finally:
        redis_server.start()
    redis = Redis.from_url(redis_url)
    try:
        assert shared.slot is not None
        # The restarted Redis, as before the outage: the shared grant's slot is there.
        await redis.zadd(streams_key("alice"), {shared.slot: time.time() + 3600})
        await opened.finish(local, 1)  # held nothing in Redis: frees nothing there
        assert await redis.zcard(streams_key("alice")) == 1
        await opened.finish(shared, 1)
        assert not await redis.exists(streams_key("alice"))
        assert opened.streams_of("alice") == 0
    finally:
        await redis.aclose()
        for gate in gates:
            await gate.aclose()


async def test_fail_closed_answers_503_while_redis_is_frozen_then_recovers(
    gateway: GatewayFactory, settings: Settings, redis_url: str, redis_server: RedisServer
) -> None:
    """A frozen Redis never hangs a request: fail-closed answers 503, then serves again."""
    shared = fail_closed_fast(settings, redis_url)
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


async def test_a_slot_redis_took_after_the_deadline_is_freed_not_kept_for_the_lease(
    gateway: GatewayFactory, settings: Settings, redis_url: str, redis_server: RedisServer
) -> None:
    """Redis stalls past the deadline, then runs the admission anyway: the 503'd request's
    stream slot must not count against its user for the hour's lease (cap 1: locked out)."""
    shared = fail_closed_fast(settings, redis_url)
    client = await gateway(with_limits(shared, max_streams_per_user=1))
    warm = await client.post("/v1/chat/completions", json=chat_body(QUICK), headers=AUTH)
    assert warm.status == 200  # the scripts are loaded: the stalled one runs when it wakes
    await finished(client, warm)
    redis_server.pause()
    try:
        stalled = await client.post("/v1/chat/completions", json=chat_body(QUICK), headers=AUTH)
        assert stalled.status == 503
    finally:
        redis_server.resume()
    again = await client.post("/v1/chat/completions", json=chat_body(QUICK), headers=AUTH)
    assert again.status == 200
    await finished(client, again)
    redis = Redis.from_url(redis_url)
    try:
        assert await redis.zcard(streams_key("dev")) == 0
    finally:
        await redis.aclose()


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


# Commands only a client sends (INFO commandstats also counts those a script runs).
TOP_LEVEL = ("eval", "evalsha", "set", "xadd", "publish", "ping", "script|load")


async def commands_since_reset(redis: Redis) -> dict[str, int]:
    """Client commands since ``CONFIG RESETSTAT``, by name."""
    stats = await redis.info("commandstats")
    calls = {name.removeprefix("cmdstat_"): int(row["calls"]) for name, row in stats.items()}
    return {name: calls[name] for name in TOP_LEVEL if name in calls}


async def round_trips_since_reset(redis: Redis) -> int:
    """Requests Redis read since ``CONFIG RESETSTAT`` (a pipeline is one), INFO's own left out."""
    return int((await redis.info("stats"))["total_reads_processed"]) - 1


LIMITED = {"user_rpm": 1000, "user_tpm": 10**6, "max_streams_per_user": 5}


@pytest.mark.parametrize(
    ("limits", "daily_usd", "trips", "commands"),
    [
        # admit; finish with the checkpoint in front (one pipeline)
        (LIMITED, None, 2, {"evalsha": 2, "set": 1}),
        # a budget applies: its reserve, and its settle (carrying the checkpoint), too
        (LIMITED, 5.0, 4, {"evalsha": 4, "set": 1}),
        # nothing shared to enforce: only the checkpoint, sent by the flush hook
        ({"max_streams_per_user": 0}, None, 1, {"set": 1}),
    ],
)
async def test_round_trips_of_one_non_streamed_request(
    gateway: GatewayFactory,
    settings: Settings,
    redis_url: str,
    limits: dict[str, int],
    daily_usd: float | None,
    trips: int,
    commands: dict[str, int],
) -> None:
    """With rate limits and a stream cap on: one script admits, one settles and frees the
    slot with the checkpoint's write in the same pipeline, and budgets cost round trips
    only when one of them has a limit."""
    shared = with_limits(with_redis(settings, redis_url), **limits)
    shared = replace(shared, money=replace(shared.money, user_daily_usd=daily_usd))
    client = await gateway(shared)
    redis = Redis.from_url(redis_url)
    try:
        for measured in (False, True):  # the first one also loads the scripts
            if measured:
                await redis.config_resetstat()
            response = await client.post(
                "/v1/chat/completions", json=chat_body(QUICK, stream=False), headers=AUTH
            )
            assert response.status == 200
            await response.read()
            await finished(client, response)
        assert await commands_since_reset(redis) == commands
        assert await round_trips_since_reset(redis) == trips + 1  # + the INFO above
        stored = await redis.get(checkpoint_key(response.headers["X-Sluice-Stream-Id"]))
        assert stored is not None  # by the time the finish hooks are done
    finally:
        await redis.aclose()


ALICE = (Tier("user", "alice", rpm=0, tpm=0),)


async def _missed_release(
    redis_url: str,
) -> tuple[Redis, RedisGate, RedisLimiter, MemoryLimiter]:
    """alice's stream (cap 1) ended while the breaker was open: Redis missed the release.
    The breaker's reset has passed since (the next call is its probe)."""
    now = [0.0]
    client = Redis.from_url(redis_url)
    gate = RedisGate(
        client, failure="open", timeout_s=1.0, fail_max=1, reset_s=5, clock=lambda: now[0]
    )
    local = MemoryLimiter()
    limiter = RedisLimiter(gate, local, clock=lambda: 1_000_000.0)
    held = await limiter.admit("alice", 1, ALICE, 1)
    assert isinstance(held, Grant)
    with pytest.raises(RedisUnavailable):
        await gate.run(lambda r: r.execute_command("NO-SUCH-COMMAND"))  # the breaker opens
    await limiter.finish(held, 1)
    now[0] += 6  # the breaker lets a probe through
    return client, gate, limiter, local


async def test_a_slot_whose_release_redis_missed_is_freed_before_the_next_admission(
    redis_url: str,
) -> None:
    """The stream ends while the Redis breaker is open: its slot's release is kept, and
    sent before the next admission that reaches Redis, so the user is not held to a full
    cap for the slot's hour."""
    client, gate, limiter, _ = await _missed_release(redis_url)
    assert await client.zcard(streams_key("alice")) == 1  # Redis never heard of the end
    assert isinstance(await limiter.admit("alice", 1, ALICE, 1), Grant)
    assert await client.zcard(streams_key("alice")) == 1  # the new stream's slot alone
    await gate.aclose()  # and its client


async def test_an_admission_cancelled_while_freeing_missed_slots_gives_all_back(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client leaves while its admission frees the slots Redis missed: its local slot
    is given back (it leaked, and after ``cap`` such leaks the user was refused on this
    replica until a restart), and the missed releases stay to be sent."""
    client, gate, limiter, local = await _missed_release(redis_url)

    async def cancelled(*args: object, **kwargs: object) -> None:
        raise asyncio.CancelledError

    monkeypatch.setattr(gate, "run", cancelled)
    with pytest.raises(asyncio.CancelledError):
        await limiter.admit("alice", 1, ALICE, 1)
    monkeypatch.undo()
    assert local.streams_of("alice") == 0
    assert isinstance(await limiter.admit("alice", 1, ALICE, 1), Grant)
    assert await client.zcard(streams_key("alice")) == 1  # the missed release went out
    await gate.aclose()


async def test_a_settlement_frees_the_local_tokens_too(redis_url: str) -> None:
    """A grant taken through Redis settles this replica's own token buckets as well: they
    kept the whole estimate for the minute, and refused what Redis would have admitted."""
    client = Redis.from_url(redis_url)
    gate = RedisGate(client, failure="closed", timeout_s=1.0)
    limiter = RedisLimiter(gate, MemoryLimiter())
    tiers = (Tier("user", "alice", rpm=0, tpm=1000),)
    first = await limiter.admit("alice", 0, tiers, 900)
    assert isinstance(first, Grant)
    await limiter.finish(first, 10)  # it used 10 of the 900 it reserved
    assert isinstance(await limiter.admit("alice", 0, tiers, 900), Grant)
    await gate.aclose()
