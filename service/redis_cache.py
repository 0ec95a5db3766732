"""The response cache shared by every replica: ``ResponseCache`` over Redis.

Each entry is one JSON string under ``sluice:cache:<key>`` with the cache TTL as its Redis
expiry (payloads are the provider's JSON chunks, so they are stored as text). The
in-process LRU stays in front: reads try it first and keep what Redis returned, writes go
to both. A cache that cannot reach Redis is only a miss, whatever the failure policy.
"""

from __future__ import annotations

import orjson
from redis.asyncio import Redis

from .cache import CachedResponse, ResponseCache
from .redisgate import KEY_PREFIX, RedisGate, RedisUnavailable

# Entries are re-read from Redis into the local LRU for at most this long.
LOCAL_TTL_S = 60.0


def cache_key_of(key: str) -> str:
    return f"{KEY_PREFIX}cache:{key}"


def dump_entry(entry: CachedResponse) -> bytes:
    return orjson.dumps(
        {
            "model": entry.model,
            "streaming": entry.streaming,
            "payloads": [p.decode() for p in entry.payloads],
            "usage": entry.usage,
        }
    )


def load_entry(raw: bytes | str) -> CachedResponse:
    data = orjson.loads(raw)
    return CachedResponse(
        model=data["model"],
        streaming=data["streaming"],
        payloads=tuple(p.encode() for p in data["payloads"]),
        usage=data.get("usage"),
    )


class RedisResponseCache:
    """Local LRU in front of Redis; see the module docstring."""

    def __init__(self, gate: RedisGate, local: ResponseCache) -> None:
        self._gate = gate
        self._local = local

    async def get(self, key: str) -> CachedResponse | None:
        found = await self._local.get(key)
        if found is not None:
            return found
        try:
            raw, left_ms = await self._gate.run(lambda r: _get_with_ttl(r, cache_key_of(key)))
        except RedisUnavailable:
            self._gate.fallback("response cache")
            return None
        if raw is None:
            return None
        entry = load_entry(raw)
        if left_ms > 0:  # the local copy lives no longer than the shared entry has left
            await self._local.put(key, entry, min(left_ms / 1000, LOCAL_TTL_S))
        return entry

    def fits(self, entry: CachedResponse) -> bool:
        return self._local.fits(entry)

    async def put(self, key: str, entry: CachedResponse, ttl_s: float) -> None:
        if not self.fits(entry):
            return  # one no replica could keep: not worth a round trip each hit
        await self._local.put(key, entry, min(ttl_s, LOCAL_TTL_S))
        raw = dump_entry(entry)
        try:
            await self._gate.run(lambda r: r.set(cache_key_of(key), raw, px=int(ttl_s * 1000)))
        except RedisUnavailable:
            self._gate.fallback("response cache")


async def _get_with_ttl(r: Redis, key: str) -> tuple[bytes | None, int]:
    """The entry and its milliseconds to live, in one round trip."""
    async with r.pipeline(transaction=False) as pipe:
        pipe.get(key)
        pipe.pttl(key)
        raw, left_ms = await pipe.execute()
    return raw, int(left_ms)
