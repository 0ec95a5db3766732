"""Rate limits and stream caps shared by every replica, checked and taken atomically in Redis.

``RedisLimiter`` implements ``limits.Limiter`` with the same leaky buckets as
``MemoryLimiter`` (level falls at ``rate / 60`` per second; a request fits when
``level + amount <= rate``), but each bucket is a Redis hash and one Lua script checks
every bucket of a request and pours into all of them only if all fit, so N replicas admit
exactly the configured numbers. Time is Redis's own (``TIME``), never a replica's clock.

The in-process ``MemoryLimiter`` stays in front: it is asked first (no network), and since
a replica's own traffic is a subset of the shared traffic, its denial is always right and
saves a round trip. Its grant is given back when Redis then denies. When Redis is
unavailable the policy decides: fail-open keeps the local answer (per-replica limits),
fail-closed answers 503 (``RedisGate.unavailable_error``).

Stream caps are a counter per user with a safety expiry (a crashed replica's streams
stop counting after ``STREAM_LEASE_S``), refreshed on every open.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from redis.asyncio import Redis

from .limits import PERIOD_S, Denial, Grant, MemoryLimiter, Quota, Tier
from .redisgate import KEY_PREFIX, RedisGate, RedisUnavailable

STREAM_LEASE_S = 3600

# KEYS: bucket keys. ARGV: now ('' = Redis TIME), rate1, amount1, rate2, amount2, ...
# Returns {granted, level...} with the levels after pouring (granted) or as they stand
# (denied), as strings: Redis truncates Lua numbers to integers.
_TRY_ACQUIRE = """
local now = tonumber(ARGV[1])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local levels = {}
local fits = true
for i = 1, #KEYS do
  local rate = tonumber(ARGV[2 * i])
  local amount = tonumber(ARGV[2 * i + 1])
  local state = redis.call('HMGET', KEYS[i], 'l', 't')
  local level = tonumber(state[1]) or 0
  local last = tonumber(state[2]) or now
  level = math.max(level - math.max(now - last, 0) * rate / 60, 0)
  levels[i] = level
  if level + amount > rate then fits = false end
end
local out = {fits and 1 or 0}
for i = 1, #KEYS do
  local rate = tonumber(ARGV[2 * i])
  local level = levels[i]
  if fits then
    level = level + tonumber(ARGV[2 * i + 1])
    redis.call('HSET', KEYS[i], 'l', tostring(level), 't', tostring(now))
    redis.call('EXPIRE', KEYS[i], math.ceil(level * 60 / rate) + 1)
  end
  out[i + 1] = tostring(level)
end
return out
"""

# KEYS: token bucket keys. ARGV: now, rate1, delta1, ... Pours ``delta`` (negative: gives
# back).
_SETTLE = """
local now = tonumber(ARGV[1])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
for i = 1, #KEYS do
  local rate = tonumber(ARGV[2 * i])
  local state = redis.call('HMGET', KEYS[i], 'l', 't')
  local level = tonumber(state[1]) or 0
  local last = tonumber(state[2]) or now
  level = math.max(level - math.max(now - last, 0) * rate / 60 + tonumber(ARGV[2 * i + 1]), 0)
  redis.call('HSET', KEYS[i], 'l', tostring(level), 't', tostring(now))
  redis.call('EXPIRE', KEYS[i], math.ceil(level * 60 / rate) + 1)
end
return 1
"""

_OPEN_STREAM = """
local held = tonumber(redis.call('GET', KEYS[1]) or '0')
if held >= tonumber(ARGV[1]) then return 0 end
redis.call('INCR', KEYS[1])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[2]))
return 1
"""

_CLOSE_STREAM = """
if redis.call('DECR', KEYS[1]) <= 0 then redis.call('DEL', KEYS[1]) end
return 1
"""

_Bucket = tuple[Tier, str, int, int]  # tier, unit, rate, amount


def bucket_key(tier: Tier, unit: str, rate: int) -> str:
    return f"{KEY_PREFIX}rl:{tier.name}:{tier.key}:{unit}:{rate}"


def streams_key(user: str) -> str:
    return f"{KEY_PREFIX}streams:{user}"


class RedisLimiter:
    """Shared buckets and stream caps; see the module docstring."""

    def __init__(
        self, gate: RedisGate, local: MemoryLimiter, *, clock: Callable[[], float] | None = None
    ) -> None:
        self._gate = gate
        self.local = local
        self.clock = clock  # None: Redis's own TIME (one clock for every replica); for tests
        client: Redis = gate.client
        self._try = client.register_script(_TRY_ACQUIRE)
        self._settle = client.register_script(_SETTLE)
        self._open = client.register_script(_OPEN_STREAM)
        self._close = client.register_script(_CLOSE_STREAM)
        self._shared_streams: dict[str, int] = {}  # streams of a user counted in Redis

    def _now(self) -> str:
        return "" if self.clock is None else repr(self.clock())

    async def try_acquire(self, tiers: Sequence[Tier], tokens: int) -> Grant | Denial:
        local = await self.local.try_acquire(tiers, tokens)
        if isinstance(local, Denial):
            return local
        buckets = _buckets(tiers, tokens)
        if not buckets:
            return local
        keys = [bucket_key(tier, unit, rate) for tier, unit, rate, _ in buckets]
        args: list[str | int] = [self._now()]
        args += [v for _, _, rate, amount in buckets for v in (rate, amount)]
        try:
            reply = await self._gate.run(lambda r: self._try(keys=keys, args=args, client=r))
        except RedisUnavailable:
            if self._gate.fail_open:
                self._gate.fallback("rate limits")
                return local
            await self._give_back(local)
            raise self._gate.unavailable_error() from None
        levels = [float(level) for level in reply[1:]]
        if int(reply[0]) == 1:
            requests, token_quota = _quotas(buckets, levels)
            return Grant(tuple(tiers), tokens, requests, token_quota)
        await self._give_back(local)
        return _denial(buckets, levels)

    async def _give_back(self, grant: Grant) -> None:
        """Undo a local grant that the shared buckets then refused."""
        await self.local.settle(grant, 0)
        for tier in grant.tiers:
            if tier.rpm > 0:
                self.local._bucket(tier, "requests", tier.rpm).force(-1)

    async def settle(self, grant: Grant, used_tokens: int) -> None:
        await self.local.settle(grant, used_tokens)
        delta = used_tokens - grant.tokens
        limited = [tier for tier in grant.tiers if tier.tpm > 0]
        if delta == 0 or not limited:
            return
        keys = [bucket_key(tier, "tokens", tier.tpm) for tier in limited]
        args: list[str | int] = [self._now()]
        args += [value for tier in limited for value in (tier.tpm, delta)]
        try:
            await self._gate.run(lambda r: self._settle(keys=keys, args=args, client=r))
        except RedisUnavailable:
            self._gate.fallback("token settlement")

    async def open_stream(self, user: str, cap: int) -> bool:
        if cap <= 0:
            return await self.local.open_stream(user, cap)
        try:
            opened = await self._gate.run(
                lambda r: self._open(keys=[streams_key(user)], args=[cap, STREAM_LEASE_S], client=r)
            )
        except RedisUnavailable:
            if not self._gate.fail_open:
                raise self._gate.unavailable_error() from None
            self._gate.fallback("stream caps")
            return await self.local.open_stream(user, cap)
        if int(opened) != 1:
            return False
        self._shared_streams[user] = self._shared_streams.get(user, 0) + 1
        return True

    async def close_stream(self, user: str) -> None:
        held = self._shared_streams.get(user, 0)
        if held == 0:
            await self.local.close_stream(user)
            return
        if held == 1:
            del self._shared_streams[user]
        else:
            self._shared_streams[user] = held - 1
        try:
            await self._gate.run(lambda r: self._close(keys=[streams_key(user)], client=r))
        except RedisUnavailable:
            self._gate.fallback("stream close")  # the lease expiry frees it eventually

    def streams_of(self, user: str) -> int:
        return self._shared_streams.get(user, 0) + self.local.streams_of(user)


def _buckets(tiers: Sequence[Tier], tokens: int) -> list[_Bucket]:
    buckets: list[_Bucket] = []
    for tier in tiers:
        if tier.rpm > 0:
            buckets.append((tier, "requests", tier.rpm, 1))
        if tier.tpm > 0:
            buckets.append((tier, "tokens", tier.tpm, tokens))
    return buckets


def _wait(rate: int, amount: int, level: float) -> float:
    if amount > rate:
        return math.inf
    return max(level + amount - rate, 0.0) * PERIOD_S / rate


def _quota(rate: int, level: float) -> Quota:
    return Quota(limit=rate, remaining=max(int(rate - level), 0), reset_s=level * PERIOD_S / rate)


def _quotas(
    buckets: Sequence[_Bucket], levels: Sequence[float]
) -> tuple[Quota | None, Quota | None]:
    best: dict[str, Quota] = {}
    for (_, unit, rate, _), level in zip(buckets, levels, strict=True):
        quota = _quota(rate, level)
        if unit not in best or quota.remaining < best[unit].remaining:
            best[unit] = quota
    return best.get("requests"), best.get("tokens")


def _denial(buckets: Sequence[_Bucket], levels: Sequence[float]) -> Denial:
    waits = [
        (_wait(rate, amount, level), tier, unit)
        for (tier, unit, rate, amount), level in zip(buckets, levels, strict=True)
        if level + amount > rate
    ]
    wait, tier, unit = max(waits, key=lambda w: w[0])
    requests, token_quota = _quotas(buckets, levels)
    return Denial(
        tier,
        unit,
        retry_after_s=PERIOD_S if math.isinf(wait) else wait,
        requests=requests,
        token_quota=token_quota,
        too_large=math.isinf(wait),
    )
