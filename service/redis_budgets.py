"""USD budgets shared by every replica: reserve-before, settle-after, atomically in Redis.

``RedisBudgets`` extends ``budgets.Budgets`` (same limits, periods, warnings and errors)
with awaitable ``reserve_async``/``settle_async``: one Lua script checks every applicable
budget (user/tenant x day/month) against ``spent + reserved + amount`` and reserves on all
of them only if all fit, so concurrent requests spread over any number of replicas can
commit at most the limit. Amounts are integer nano-dollars in Redis (``HINCRBY``: no
float drift; a token's price at the table's rates is a whole number of them, so the sum of
costs is exact), under ``budget-nano:`` keys (never read as another unit's); a period's
hash expires after the period ends. A hash Redis lacks (it
restarted empty, was flushed, or evicted the key) starts from this replica's view of the
period's spend, loaded from the ledger at start: Redis does not forget what was spent
(with PostgreSQL that view is every replica's; with SQLite, this replica's). A reservation
whose caller is cancelled in flight is given back (``RedisGate.evalsha_or_undo``).

Each reservation is a hold with an id and an expiry (``HOLD_TTL_S``): settling releases
exactly that hold (a second release, or one after expiry, releases nothing), and a hold
nobody settles (its replica died mid-request, or the reply was lost to a timeout) is
released by the first reservation after it expires: a budget is never blocked for longer
than that by a reservation that will not be settled.

The in-process ``Budgets`` state is kept as this replica's view (``status``/``pressure``
stay synchronous) and is the fail-open fallback: with Redis unavailable, fail-open
reserves locally (per-replica budgets), fail-closed answers 503. A request none of whose
budgets has a limit (after the key's overrides) has nothing to enforce: it reserves and
settles in this view only, without a round trip (its spend is in the ledger).

Admission goes through ``reserve_budget``/``settle_budget`` below, which await the shared
path when the budgets are a ``RedisBudgets`` and call the in-process one otherwise.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import secrets
from collections.abc import Callable, Iterable
from dataclasses import replace
from decimal import Decimal
from typing import Any

from redis.asyncio import Redis

from .budgets import BudgetLimits, Budgets, Hold
from .redisgate import KEY_PREFIX, RedisGate, RedisUnavailable

NANOS = Decimal(1_000_000_000)
DAY_TTL_S = 3 * 86_400
MONTH_TTL_S = 40 * 86_400
log = logging.getLogger(__name__)
MAX_UNSENT = 10_000  # settlements kept for Redis while it is unavailable
REPLAY_CHUNK = 200  # of them sent before a reservation: a few ms of Redis, not a deadline's
# How long a reservation holds its budget without being settled: longer than any request
# runs (``SLUICE_MAX_GENERATION_S``, at most 50 minutes), short enough that a reservation
# orphaned by a replica that died mid-request, or by a reply lost to a timeout, is back
# within the hour.
HOLD_TTL_S = 3_600

# KEYS: the budget hashes, then each one's holds (a sorted set: hold id by expiry, ms).
# ARGV: amount, hold id, now (ms; '' = Redis's own TIME, one clock for every replica), the
# hold's life (ms); then ttl, limit (-1: none) and seed per
# key (ARGV[3i+2], ARGV[3i+3], ARGV[3i+4]). A hash Redis does not have (restarted, flushed,
# evicted) starts from the seed: the replica's own view of the period's spend, from the
# ledger. Holds past their expiry (their replica died, or lost the reply) are released
# first. Returns {0, index, committed} when budget ``index`` would be exceeded, else {1, then spent
# and held (every replica's holds, this one's included) per key}.
_RESERVE = """
local n = #KEYS / 2
local amount = tonumber(ARGV[1])
local now = tonumber(ARGV[3])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local committed = {}
for i = 1, n do
  local seed = tonumber(ARGV[3 * i + 4])
  if seed > 0 and redis.call('EXISTS', KEYS[i]) == 0 then
    redis.call('HSET', KEYS[i], 'spent', seed)
    redis.call('EXPIRE', KEYS[i], tonumber(ARGV[3 * i + 2]))
  end
  for _, stale in ipairs(redis.call('ZRANGEBYSCORE', KEYS[n + i], '-inf', now)) do
    local held = redis.call('HGET', KEYS[i], 'h:' .. stale)
    if held then
      redis.call('HINCRBY', KEYS[i], 'reserved', -tonumber(held))
      redis.call('HDEL', KEYS[i], 'h:' .. stale)
    end
  end
  redis.call('ZREMRANGEBYSCORE', KEYS[n + i], '-inf', now)
  local state = redis.call('HMGET', KEYS[i], 'spent', 'reserved')
  committed[i] = (tonumber(state[1]) or 0) + (tonumber(state[2]) or 0)
  local limit = tonumber(ARGV[3 * i + 3])
  if limit >= 0 and committed[i] + amount > limit then return {0, i, committed[i]} end
end
local out = {1}
for i = 1, n do
  local ttl = tonumber(ARGV[3 * i + 2])
  redis.call('HINCRBY', KEYS[i], 'reserved', amount)
  redis.call('HSET', KEYS[i], 'h:' .. ARGV[2], amount)
  redis.call('ZADD', KEYS[n + i], now + tonumber(ARGV[4]), ARGV[2])
  redis.call('EXPIRE', KEYS[i], ttl)
  redis.call('EXPIRE', KEYS[n + i], ttl)
  local state = redis.call('HMGET', KEYS[i], 'spent', 'reserved')
  out[2 * i] = tonumber(state[1]) or 0
  out[2 * i + 1] = tonumber(state[2]) or 0
end
return out
"""

# KEYS: as for _RESERVE. ARGV: hold id, actual cost, then ttl per key. Releases the hold
# if it is still there (settling twice, or after the hold expired, releases nothing twice).
# A budget Redis no longer has is left alone: the next reservation seeds it from the ledger
# (creating it here, with this spend alone, would stop that).
_SETTLE = """
local n = #KEYS / 2
for i = 1, n do
  if redis.call('EXISTS', KEYS[i]) == 1 then
    local held = redis.call('HGET', KEYS[i], 'h:' .. ARGV[1])
    if held then
      redis.call('HINCRBY', KEYS[i], 'reserved', -tonumber(held))
      redis.call('HDEL', KEYS[i], 'h:' .. ARGV[1])
      redis.call('ZREM', KEYS[n + i], ARGV[1])
    end
    redis.call('HINCRBY', KEYS[i], 'spent', tonumber(ARGV[2]))
    redis.call('EXPIRE', KEYS[i], tonumber(ARGV[2 + i]))
  end
end
return 1
"""


def budget_key(key: tuple[str, str, str, str]) -> str:
    scope, who, period, value = key
    return f"{KEY_PREFIX}budget-nano:{scope}:{who}:{period}:{value}"


def _script_keys(keys: Iterable[tuple[str, str, str, str]]) -> list[str]:
    """The budget hashes, then their holds' sorted sets."""
    hashes = [budget_key(key) for key in keys]
    return hashes + [f"{h}:holds" for h in hashes]


def _ttl(key: tuple[str, str, str, str]) -> int:
    return DAY_TTL_S if key[2] == "day" else MONTH_TTL_S


def nanos(amount: Decimal, *, up: bool = False) -> int:
    scaled = amount * NANOS
    return math.ceil(scaled) if up else round(scaled)


class RedisBudgets(Budgets):
    """Budgets whose reservations are atomic across replicas; see the module docstring."""

    def __init__(
        self,
        gate: RedisGate,
        limits: BudgetLimits,
        *,
        soft_fraction: float = 0.8,
        clock: Callable[[], float] | None = None,
        hold_clock: Callable[[], float] | None = None,
    ) -> None:
        if clock is None:
            super().__init__(limits, soft_fraction=soft_fraction)
        else:
            super().__init__(limits, soft_fraction=soft_fraction, clock=clock)
        self._gate = gate
        self._hold_clock = hold_clock  # None: holds expire by Redis's own clock (one for all)
        client: Redis = gate.client
        self._reserve = client.register_script(_RESERVE)
        self._settle = client.register_script(_SETTLE)
        # Settlements Redis has not had (it was unavailable), oldest first: replayed in one
        # pipeline before the next reservation that reaches it.
        self._unsent: list[tuple[list[str], list[Any]]] = []

    async def reserve_async(
        self,
        user: str,
        tenant: str,
        amount: Decimal,
        overrides: BudgetLimits | None = None,
        *,
        at: float | None = None,
    ) -> Hold:
        """Reserve ``amount`` on every applicable budget of every replica, or raise 429
        (``at``: as for ``reserve``)."""
        checks = self._checks(user, tenant, overrides, at)
        if all(limit is None for _, limit in checks):
            # Nothing to enforce: no round trip. This replica's view still records the
            # reservation; the spend totals live in the ledger.
            return self.reserve(user, tenant, amount, overrides, at=at)
        if self._unsent:
            # Shielded: a client leaving must not cut a replay short (sent, and then kept
            # for sending again, its settlements would count twice).
            await asyncio.shield(self._replay())
        keys = _script_keys(key for key, _ in checks)
        reserved = nanos(amount, up=True)
        hold_id = secrets.token_hex(8)
        now_ms = "" if self._hold_clock is None else round(self._hold_clock() * 1000)
        args: list[Any] = [reserved, hold_id, now_ms, HOLD_TTL_S * 1000]
        for key, limit in checks:
            args += [
                _ttl(key),
                -1 if limit is None else nanos(limit),
                nanos(self._spent.get(key, Decimal(0))),
            ]
        undo = functools.partial(self._undo_reserve, keys=keys, hold_id=hold_id, checks=checks)
        try:
            reply = await self._gate.evalsha_or_undo(self._reserve, keys, args, undo)
        except RedisUnavailable:
            self._release_later(keys, hold_id, checks)
            if not self._gate.fail_open:
                raise self._gate.unavailable_error() from None
            self._gate.fallback("budgets")
            local = self.reserve(user, tenant, amount, overrides, at=at)
            # Its spend still goes to Redis when it settles: under a hold id Redis never
            # had, so settling releases nothing there and adds the spend.
            return replace(local, shared_id=f"local-{hold_id}")
        except BaseException:  # cancelled: the client left
            self._release_later(keys, hold_id, checks)
            raise
        if int(reply[0]) == 0:
            key, limit = checks[int(reply[1]) - 1]
            assert limit is not None
            raise self._exceeded(key, limit, Decimal(int(reply[2])) / NANOS, amount)
        committed: dict[Any, Decimal] = {}
        for index, (key, _) in enumerate(checks):
            self._add(self._reserved, key, amount)
            # This replica's view takes the spend of every replica from Redis (what it
            # seeds an emptied Redis with: never others' holds, which may settle for less);
            # the warning weighs every replica's holds too.
            spent, held = (Decimal(int(v)) / NANOS for v in reply[1 + 2 * index : 3 + 2 * index])
            self._spent[key] = spent
            committed[key] = spent + held - amount  # before this request, as the warning has it
        warning = self._warning(checks, committed)
        return Hold(tuple(key for key, _ in checks), amount, warning, hold_id, committed)

    async def shared_status(
        self, user: str, tenant: str, overrides: BudgetLimits | None = None
    ) -> dict[str, Any]:
        """``status`` with every replica's spend and holds (this replica's view has its own
        holds only, and others' spend as of its last reservation); this view's when Redis
        is unavailable."""
        keys = [key for key, _ in self._checks(user, tenant, overrides)]
        commands = [("HMGET", budget_key(key), "spent", "reserved") for key in keys]
        try:
            replies = await self._gate.pipeline(commands)
        except RedisUnavailable:
            return self.status(user, tenant, overrides)
        shared = {
            key: (Decimal(int(spent or 0)) / NANOS, Decimal(int(reserved or 0)) / NANOS)
            for key, (spent, reserved) in zip(keys, replies, strict=True)
            if spent is not None or reserved is not None
        }
        return self.status(user, tenant, overrides, shared=shared)

    def _release_later(self, keys: list[str], hold_id: str, checks: list[Any]) -> None:
        """Whether Redis ran the reservation is unknown (it may yet, past the deadline): a
        settlement of 0 is kept for the next round trip, releasing the hold if Redis has it
        (a no-op if it has not)."""
        self._keep_unsent(keys, [hold_id, 0, *(_ttl(key) for key, _ in checks)])

    async def _undo_reserve(
        self, reply: Any, *, keys: list[str], hold_id: str, checks: list[Any]
    ) -> None:
        """Give back a reservation whose caller was cancelled before it saw it."""
        if int(reply[0]) == 1:
            ttls = [_ttl(key) for key, _ in checks]
            await self._gate.evalsha(self._settle, keys, [hold_id, 0, *ttls])

    async def settle_async(self, hold: Hold, actual: Decimal) -> None:
        """Replace the reservation with the real cost, on every replica's view."""
        self.settle(hold, actual)  # this replica's view (and the fail-open path)
        if hold.shared_id is None:  # reserved locally only: unlimited, or Redis was unavailable
            return
        args: list[Any] = [hold.shared_id, nanos(actual, up=True), *map(_ttl, hold.keys)]
        keys = _script_keys(hold.keys)
        try:  # never spend 0: a cost below a nano-dollar rounds up to one
            await self._gate.evalsha(self._settle, keys, args)
        except RedisUnavailable:
            # Replayed once Redis answers (if this one had in fact run, the spend counts
            # twice: erring towards refusing, never towards overspending).
            self._gate.fallback("budget settlement")
            self._keep_unsent(keys, args)

    def _keep_unsent(self, keys: list[str], args: list[Any]) -> None:
        self._unsent.append((keys, args))
        self._bound_unsent()

    def _bound_unsent(self) -> None:
        excess = len(self._unsent) - MAX_UNSENT
        if excess > 0:
            log.warning("budgets: %d settlements wait for redis; the oldest are dropped", excess)
            del self._unsent[:excess]

    async def flush(self) -> None:
        """At shutdown: try once more to send the settlements Redis missed."""
        while self._unsent:
            left = len(self._unsent)
            await self._replay()
            if len(self._unsent) >= left:  # Redis still away
                log.warning("budgets: %d settlements never reached redis", len(self._unsent))
                return

    async def _replay(self) -> None:
        """Send the oldest settlements Redis missed, a chunk in one pipeline (a backlog of
        thousands in one trip outran the deadline, ran anyway, and was sent again with every
        reservation); keep them if Redis is unavailable. The chunk is taken first, so
        concurrent callers never send one twice."""
        batch = self._unsent[:REPLAY_CHUNK]
        del self._unsent[:REPLAY_CHUNK]
        if not batch:
            return

        async def send(client: Redis) -> list[Any]:
            pipe = client.pipeline(transaction=False)
            for keys, args in batch:  # a Script in a pipeline is loaded first if need be
                await self._settle(keys=keys, args=args, client=pipe)
            replies: list[Any] = await pipe.execute(raise_on_error=False)
            return replies

        try:
            replies = await self._gate.run(send)
        except RedisUnavailable:
            self._unsent[:0] = batch  # before what came meanwhile: the oldest first
            self._bound_unsent()
            return
        failed = sum(isinstance(reply, Exception) for reply in replies)
        if failed:
            log.warning("budgets: %d replayed settlements failed in redis", failed)


async def reserve_budget(
    budgets: Budgets,
    user: str,
    tenant: str,
    amount: Decimal,
    overrides: BudgetLimits | None = None,
    *,
    at: float | None = None,
) -> Hold:
    """``budgets.reserve``, shared across replicas when the budgets live in Redis."""
    if isinstance(budgets, RedisBudgets):
        return await budgets.reserve_async(user, tenant, amount, overrides, at=at)
    return budgets.reserve(user, tenant, amount, overrides, at=at)


async def budget_status(
    budgets: Budgets, user: str, tenant: str, overrides: BudgetLimits | None = None
) -> dict[str, Any]:
    """``budgets.status``, every replica's when the budgets live in Redis."""
    if isinstance(budgets, RedisBudgets):
        return await budgets.shared_status(user, tenant, overrides)
    return budgets.status(user, tenant, overrides)


async def settle_budget(budgets: Budgets, hold: Hold, actual: Decimal) -> None:
    """``budgets.settle``, shared across replicas when the budgets live in Redis."""
    if isinstance(budgets, RedisBudgets):
        await budgets.settle_async(hold, actual)
    else:
        budgets.settle(hold, actual)
