"""Checkpoints and the response cache in Redis: what one replica stores, another serves."""

from __future__ import annotations

from redis.asyncio import Redis

from service.appkeys import STREAMS
from service.redis_checkpoints import checkpoint_key
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
