"""Rate limits and stream caps shared by every replica, checked and taken atomically in Redis.

``RedisLimiter`` implements ``limits.Limiter`` with the same leaky buckets as
``MemoryLimiter`` (level falls at ``rate / 60`` per second; a request fits when
``level + amount <= rate``), but each bucket is a Redis hash, and one Lua script per
request (``admit``) checks the user's stream cap and every bucket and takes the slot and
pours into all of them only if all fit, so N replicas admit exactly the configured numbers.
After the response, one more script (``finish``) settles the tokens and frees the slot:
two round trips per request. Time is Redis's own (``TIME``), never a replica's clock.

The in-process ``MemoryLimiter`` stays in front: it is asked first (no network), and since
a replica's own traffic is a subset of the shared traffic, its denial is always right and
saves a round trip. Its grant is given back when Redis then denies. When Redis is
unavailable the policy decides: fail-open keeps the local answer (per-replica limits;
such a grant is settled locally only), fail-closed answers 503
(``RedisGate.unavailable_error``).

Stream caps count each user's open streams as slots in a sorted set, one member per
stream with its own expiry (``STREAM_LEASE_S``): closing a stream removes exactly its
slot, and a slot nobody closes (its replica died, or the closing reply was lost) stops
counting when it expires, whatever the user does meanwhile. Uncapped users are not counted
in Redis.
"""

from __future__ import annotations

import functools
import math
import secrets
from collections.abc import Callable, Sequence
from typing import Any

from redis.asyncio import Redis

from .limits import PERIOD_S, Denial, Grant, MemoryLimiter, Quota, Tier, stream_denial
from .redisgate import KEY_PREFIX, RedisGate, RedisUnavailable

STREAM_LEASE_S = 3600  # longer than any stream runs; how long an orphaned slot counts
MAX_UNFREED = 10_000  # slot releases kept for Redis while it is unavailable

# Redis's own clock unless the caller gives one (ARGV[1], '' = TIME): one for every replica.
_NOW = """
local now = tonumber(ARGV[1])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
"""

# KEYS[1]: the user's stream slots; KEYS[2..]: bucket keys. ARGV: now, cap (0: no cap),
# lease seconds, slot id, then rate, amount per bucket (ARGV[2i+1], ARGV[2i+2], KEYS[i]).
# Returns {-1} when the stream cap is full; else {granted, level...} with the levels after
# pouring (granted) or as they stand (denied), as strings: Redis truncates Lua numbers.
_ADMIT = (
    _NOW
    + """
local cap = tonumber(ARGV[2])
if cap > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
  if redis.call('ZCARD', KEYS[1]) >= cap then return {-1} end
end
local levels = {}
local fits = true
for i = 2, #KEYS do
  local rate = tonumber(ARGV[2 * i + 1])
  local amount = tonumber(ARGV[2 * i + 2])
  local state = redis.call('HMGET', KEYS[i], 'l', 't')
  local level = tonumber(state[1]) or 0
  local last = tonumber(state[2]) or now
  level = math.max(level - math.max(now - last, 0) * rate / 60, 0)
  levels[i] = level
  if level + amount > rate then fits = false end
end
local out = {fits and 1 or 0}
for i = 2, #KEYS do
  local rate = tonumber(ARGV[2 * i + 1])
  local level = levels[i]
  if fits then
    level = level + tonumber(ARGV[2 * i + 2])
    redis.call('HSET', KEYS[i], 'l', tostring(level), 't', tostring(now))
    redis.call('EXPIRE', KEYS[i], math.ceil(level * 60 / rate) + 1)
  end
  out[i] = tostring(level)
end
if fits and cap > 0 then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[4])
  redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
end
return out
"""
)

# KEYS[1]: the user's stream slots; KEYS[2..]: token bucket keys. ARGV: now, the slot to
# free ('': none), then rate, delta per bucket: pours ``delta`` (negative: gives back).
_FINISH = (
    _NOW
    + """
if ARGV[2] ~= '' then redis.call('ZREM', KEYS[1], ARGV[2]) end
for i = 2, #KEYS do
  local rate = tonumber(ARGV[2 * i - 1])
  local state = redis.call('HMGET', KEYS[i], 'l', 't')
  local level = tonumber(state[1]) or 0
  local last = tonumber(state[2]) or now
  level = math.max(level - math.max(now - last, 0) * rate / 60 + tonumber(ARGV[2 * i]), 0)
  redis.call('HSET', KEYS[i], 'l', tostring(level), 't', tostring(now))
  redis.call('EXPIRE', KEYS[i], math.ceil(level * 60 / rate) + 1)
end
return 1
"""
)

_Bucket = tuple[Tier, str, int, int]  # tier, unit, rate, amount


def bucket_key(tier: Tier, unit: str, rate: int) -> str:
    return f"{KEY_PREFIX}rl:{tier.name}:{tier.key}:{unit}:{rate}"


def streams_key(user: str) -> str:
    return f"{KEY_PREFIX}stream-slots:{user}"


class RedisLimiter:
    """Shared buckets and stream caps; see the module docstring."""

    def __init__(
        self, gate: RedisGate, local: MemoryLimiter, *, clock: Callable[[], float] | None = None
    ) -> None:
        self._gate = gate
        self.local = local
        self.clock = clock  # None: Redis's own TIME (one clock for every replica); for tests
        client: Redis = gate.client
        self._admit = client.register_script(_ADMIT)
        self._finish = client.register_script(_FINISH)
        # Slots whose release Redis missed (it was unavailable): freed before the next
        # admission that reaches it, not left to count against their user for the hour.
        self._unfreed: list[tuple[str, str]] = []  # (user, slot)

    def _now(self) -> str:
        return "" if self.clock is None else repr(self.clock())

    async def admit(
        self, user: str, cap: int, tiers: Sequence[Tier], tokens: int
    ) -> Grant | Denial:
        local = await self.local.admit(user, cap, tiers, tokens)
        if isinstance(local, Denial):
            return local  # this replica's traffic alone is over: so is everyone's
        buckets = _buckets(tiers, tokens)
        if cap <= 0 and not buckets:
            return local  # nothing shared to take
        if self._unfreed:
            try:
                await self.free_missed()
            except BaseException:  # the client left: its local grant must not stay taken
                self.local.give_back(local)
                raise
        keys = [streams_key(user)]
        keys += [bucket_key(tier, unit, rate) for tier, unit, rate, _ in buckets]
        slot = secrets.token_hex(8)
        args: list[str | int] = [self._now(), max(cap, 0), STREAM_LEASE_S, slot]
        args += [v for _, _, rate, amount in buckets for v in (rate, amount)]
        undo = functools.partial(
            self._undo_admit, user=user, cap=cap, tiers=tiers, tokens=tokens, slot=slot
        )
        try:
            reply = await self._gate.evalsha_or_undo(self._admit, keys, args, undo)
        except RedisUnavailable:
            self._free_later(user, slot if cap > 0 else None)
            if self._gate.fail_open:
                self._gate.fallback("rate limits and stream caps")
                return local
            self.local.give_back(local)
            raise self._gate.unavailable_error() from None
        except BaseException:  # cancelled: the client left
            self._free_later(user, slot if cap > 0 else None)
            self.local.give_back(local)
            raise
        if int(reply[0]) == 1:
            levels = [float(level) for level in reply[1:]]
            requests, token_quota = _quotas(buckets, levels)
            return Grant(
                tuple(tiers),
                tokens,
                requests,
                token_quota,
                user=user,
                cap=cap,
                shared=True,
                slot=slot if cap > 0 else None,
                token_buckets=local.token_buckets,  # this replica's, settled with Redis's
            )
        self.local.give_back(local)
        if int(reply[0]) == -1:
            return stream_denial(user)
        return _denial(buckets, [float(level) for level in reply[1:]])

    def _free_later(self, user: str, slot: str | None) -> None:
        """Free ``slot`` with the missed ones, before the next admission that reaches Redis:
        its release was missed, or whether Redis took it is unknown (a script that may yet
        run past its deadline; freeing a slot Redis never took is a no-op). The tokens such
        a script may have taken leak out of their buckets within the minute."""
        if slot is not None:
            self._unfreed.append((user, slot))
            del self._unfreed[:-MAX_UNFREED]

    async def _undo_admit(
        self, reply: Any, *, user: str, cap: int, tiers: Sequence[Tier], tokens: int, slot: str
    ) -> None:
        """Give back an admission whose caller was cancelled before it saw the grant."""
        if int(reply[0]) == 1:
            taken = slot if cap > 0 else None
            await self._finish_shared(
                Grant(tuple(tiers), tokens, None, None, user=user, cap=cap, slot=taken), 0
            )

    async def finish(self, grant: Grant, used_tokens: int) -> None:
        await self.local.finish(grant, used_tokens)
        if not grant.shared:
            return  # admitted while Redis was unavailable (fail-open): nothing shared held
        await self._finish_shared(grant, used_tokens)

    async def _finish_shared(self, grant: Grant, used_tokens: int) -> None:
        delta = used_tokens - grant.tokens
        limited = [tier for tier in grant.tiers if tier.tpm > 0] if delta else []
        if grant.slot is None and not limited:
            return
        keys = [streams_key(grant.user or "")]
        keys += [bucket_key(tier, "tokens", tier.tpm) for tier in limited]
        args: list[str | int] = [self._now(), grant.slot or ""]
        args += [value for tier in limited for value in (tier.tpm, delta)]
        try:
            await self._gate.evalsha(self._finish, keys, args)
        except RedisUnavailable:  # the bucket's leak bounds the tokens' error
            self._gate.fallback("settlement and stream close")
            self._free_later(grant.user or "", grant.slot)

    async def free_missed(self) -> None:
        """Free the slots whose release Redis missed, in one pipeline (the list is taken
        whole first, so concurrent callers never send one twice); keep them if it fails."""
        batch, self._unfreed = self._unfreed, []
        if not batch:
            return

        async def send(client: Redis) -> None:
            pipe = client.pipeline(transaction=False)
            for user, slot in batch:
                pipe.zrem(streams_key(user), slot)
            await pipe.execute(raise_on_error=False)

        try:
            await self._gate.run(send)
        except BaseException as exc:  # unavailable, or the caller's client left: keep them
            self._unfreed[:0] = batch
            del self._unfreed[:-MAX_UNFREED]
            if not isinstance(exc, RedisUnavailable):
                raise

    def streams_of(self, user: str) -> int:
        return self.local.streams_of(user)


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
