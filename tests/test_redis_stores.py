"""Checkpoints and the response cache in Redis: what one replica stores, another serves."""

from __future__ import annotations

from redis.asyncio import Redis

from service.appkeys import STREAMS
from service.cache import CachedResponse, MemoryResponseCache
from service.redis_cache import RedisResponseCache, cache_key_of
from service.redis_checkpoints import checkpoint_key
from service.redisgate import RedisGate
from service.settings import Settings
from service.simulator import SimStats
from tests.conftest import AUTH, GatewayFactory, chat_body, with_streams
from tests.servers import RedisServer, with_redis
from tests.streamwire import Finished


async def test_a_checkpoint_written_on_one_replica_is_read_on_another(
    gateway: GatewayFactory, settings: Settings, redis_url: str
) -> None:
    """GET /v1/streams/{id} on B returns A's checkpoint, which expires with the TTL."""
    shared = with_streams(with_redis(settings, redis_url), checkpoint_ttl_s=120.0)
    a, b = await gateway(shared), await gateway(shared)
    response = await a.post(
        "/v1/chat/completions", json=chat_body("hi [sim chunks=4]", stream=False), headers=AUTH
    )
    assert response.status == 200
    stream_id = response.headers["X-Sluice-Stream-Id"]
    await response.read()
    await a.app[STREAMS].retire_now()  # the checkpoint is stored as its stream is retired

    found = await b.get(f"/v1/streams/{stream_id}", headers=AUTH)
    assert found.status == 200
    checkpoint = await found.json()
    assert (checkpoint["id"], checkpoint["status"]) == (stream_id, "completed")
    assert checkpoint["completion_tokens"] == 4

    redis = Redis.from_url(redis_url)
    try:
        ttl_ms = await redis.pttl(checkpoint_key(stream_id))
    finally:
        await redis.aclose()
    assert 0 < ttl_ms <= 120_000


async def test_a_response_cached_by_one_replica_is_a_hit_on_another(
    gateway: GatewayFactory, settings: Settings, redis_url: str, sim_stats: SimStats
) -> None:
    """A deterministic request answered on A is served from the shared cache on B."""
    shared = with_redis(settings, redis_url)
    a, b = await gateway(shared), await gateway(shared)
    finished = Finished(a.app[STREAMS])  # runs after the cache fill (a startup hook)
    body = chat_body("cache me [sim chunks=3]", stream=False, temperature=0)
    first = await a.post("/v1/chat/completions", json=body, headers=AUTH)
    assert first.headers["X-Sluice-Cache"] == "miss"
    original = await first.json()
    await finished.wait()

    second = await b.post("/v1/chat/completions", json=body, headers=AUTH)
    assert second.status == 200
    assert second.headers["X-Sluice-Cache"] == "hit"
    cached = await second.json()
    assert cached["choices"][0]["message"] == original["choices"][0]["message"]
    assert sim_stats.requests == 1


async def test_with_redis_down_checkpoints_stay_local_and_the_cache_misses(
    gateway: GatewayFactory, settings: Settings, redis_url: str, redis_server: RedisServer
) -> None:
    """Fail-open: requests work, the replica still answers for its own checkpoints."""
    client = await gateway(with_redis(settings, redis_url, redis_failure="open"))
    redis_server.stop()
    try:
        body = chat_body("hi [sim chunks=2]", stream=False, temperature=0)
        response = await client.post("/v1/chat/completions", json=body, headers=AUTH)
        assert response.status == 200
        assert response.headers["X-Sluice-Cache"] == "miss"
        stream_id = response.headers["X-Sluice-Stream-Id"]
        await response.read()
        found = await client.get(f"/v1/streams/{stream_id}", headers=AUTH)
        assert found.status == 200
    finally:
        redis_server.start()


async def test_an_entry_no_replica_could_keep_is_not_sent_to_redis(redis_url: str) -> None:
    """Larger than a replica's whole cache: kept nowhere, Redis included (every hit would
    fetch it again, never to keep it)."""
    gate = RedisGate.from_settings(with_redis(Settings(), redis_url).shared)
    assert gate is not None
    cache = RedisResponseCache(gate, MemoryResponseCache(max_bytes=1000))
    try:
        huge = CachedResponse(model="gpt-4o-mini", streaming=False, payloads=(b"x" * 2000,))
        await cache.put("too-big", huge, ttl_s=60)
        assert await gate.run(lambda r: r.exists(cache_key_of("too-big"))) == 0
        assert await cache.get("too-big") is None
    finally:
        await gate.aclose()


async def test_a_local_copy_lives_no_longer_than_the_shared_entry(redis_url: str) -> None:
    """Replica B keeps what it read from Redis for at most what the entry had left (here
    about a second), not a flat minute: an expired answer is not served from B's memory."""
    gates = [RedisGate.from_settings(with_redis(Settings(), redis_url).shared) for _ in (1, 2)]
    a_gate, b_gate = (gate for gate in gates if gate is not None)
    now = [1000.0]
    b_local = MemoryResponseCache(max_bytes=1 << 20, clock=lambda: now[0])
    a = RedisResponseCache(a_gate, MemoryResponseCache(max_bytes=1 << 20))
    b = RedisResponseCache(b_gate, b_local)
    try:
        entry = CachedResponse(model="gpt-4o-mini", streaming=False, payloads=(b"{}",))
        await a.put("k", entry, ttl_s=1.0)
        assert await b.get("k") == entry
        assert await b_local.get("k") == entry  # kept locally...
        now[0] += 2.0
        assert await b_local.get("k") is None  # ...for no more than the entry had left
    finally:
        for gate in (a_gate, b_gate):
            await gate.aclose()
