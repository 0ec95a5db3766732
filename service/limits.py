"""Rate limits: requests and tokens per minute per user, tenant and globally; stream caps.

``Limiter`` is the storage seam (a Redis implementation follows for many replicas);
``MemoryLimiter`` keeps one aiolimiter ``AsyncLimiter`` leaky bucket per (tier, key, rate)
and per unit (requests, tokens). Nothing ever waits in a hidden queue: ``try_acquire``
checks every bucket with ``has_capacity`` first and only then pours into all of them, with
no await in between, so the whole check-and-take is atomic on the event loop. (The pour sets
the level ``has_capacity`` has just brought up to date, as ``acquire`` would after the same
check; ``acquire`` itself would check a second time, and admission runs per request.)

Admission calls ``admit`` once per request: the user's concurrent-stream slot and every
bucket together, all or nothing (one round trip for a shared implementation); ``finish``
settles and frees the slot after the response.

Tokens are reserved up front (estimated prompt + the output ceiling) and settled with the
real usage afterwards. A leaky bucket's level falls at a constant rate whatever was poured,
so taking ``reserved - used`` back out of the level (clamped at zero) leaves the bucket
exactly where it would be had only ``used`` been poured at admission time. Usage above the
reservation is poured in unconditionally: the debt delays the next requests instead.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from aiolimiter import AsyncLimiter

PERIOD_S = 60.0
MAX_BUCKETS = 100_000  # above this, idle (empty) buckets are forgotten


@dataclass(frozen=True, slots=True)
class Tier:
    """One limited scope: e.g. ("user", "alice") with its per-minute rates (0 = unlimited)."""

    name: str
    key: str
    rpm: int
    tpm: int


@dataclass(frozen=True, slots=True)
class Quota:
    """The tightest bucket's state, as OpenAI's ``x-ratelimit-*`` headers report it."""

    limit: int
    remaining: int
    reset_s: float  # until the bucket is full (empty of use) again


@dataclass(slots=True)
class Grant:
    tiers: Sequence[Tier]
    tokens: int
    requests: Quota | None = None
    token_quota: Quota | None = None
    user: str | None = None  # ``admit``: the user whose stream slot this grant holds
    cap: int = 0  # ``admit``: that user's stream cap then (0: uncapped, counted locally only)
    shared: bool = False  # taken in the shared (Redis) state too, not only in this process
    slot: str | None = None  # the stream slot taken in Redis (``redis_limits.py``), if any
    token_buckets: tuple[Bucket, ...] = ()  # in this process: where settling puts the tokens


@dataclass(frozen=True, slots=True)
class Denial:
    tier: Tier
    unit: str  # "requests" or "tokens"
    retry_after_s: float
    requests: Quota | None = None
    token_quota: Quota | None = None
    too_large: bool = False  # the request alone exceeds the tier's per-minute tokens


STREAM_CAP = "streams"  # ``Denial.unit`` of a refused stream slot


class Limiter(Protocol):
    """Where rate state lives; every method answers without waiting for capacity."""

    async def admit(
        self, user: str, cap: int, tiers: Sequence[Tier], tokens: int
    ) -> Grant | Denial:
        """Take one of ``user``'s ``cap`` stream slots (0: no cap) and ``tokens`` plus one
        request from every bucket of ``tiers``: all of them, or nothing. A full stream cap
        is a ``Denial`` with ``unit == STREAM_CAP``, checked before the buckets."""
        ...

    async def finish(self, grant: Grant, used_tokens: int) -> None:
        """Settle an ``admit`` grant with the tokens really used and free its stream slot."""
        ...


class Bucket:
    """A non-blocking face on ``AsyncLimiter``: check, take, give back, and report.

    Reads ``_level`` and ``_rate_per_sec``, internals of aiolimiter 1.x (``leakybucket.py``),
    after ``has_capacity`` has brought the level up to date.
    """

    __slots__ = ("limiter",)

    def __init__(self, rate: int) -> None:
        self.limiter = AsyncLimiter(rate, PERIOD_S)

    def fits(self, amount: float) -> bool:
        return self.limiter.has_capacity(amount)

    def take(self, amount: float) -> None:
        """Pour ``amount`` in, right after ``fits(amount)`` was true (the level is current)."""
        self.limiter._level += amount

    def force(self, amount: float) -> None:
        """Pour ``amount`` in (or, negative, take it out) without any check."""
        self.limiter.has_capacity(0)  # leak first, so the level is current
        self.limiter._level = max(self.limiter._level + amount, 0.0)

    def wait_for(self, amount: float) -> float:
        """Seconds until ``amount`` fits; ``inf`` when it never can."""
        limiter = self.limiter
        if amount > limiter.max_rate:
            return math.inf
        excess = limiter._level + amount - limiter.max_rate
        return max(excess, 0.0) / limiter._rate_per_sec

    def remaining(self, *, current: bool = False) -> int:
        """What ``quota().remaining`` would be, without making the ``Quota``."""
        limiter = self.limiter
        if not current:
            limiter.has_capacity(0)
        return max(int(limiter.max_rate - limiter._level), 0)

    def quota(self, *, current: bool = False) -> Quota:
        """The bucket's state; ``current``: its level was just brought up to date."""
        remaining = self.remaining(current=current)  # (the level is current from here)
        limiter = self.limiter
        return Quota(
            limit=int(limiter.max_rate),
            remaining=remaining,
            reset_s=limiter._level / limiter._rate_per_sec,
        )

    @property
    def idle(self) -> bool:
        self.limiter.has_capacity(0)
        return self.limiter._level == 0


class MemoryLimiter:
    """Process-local buckets; the default and the test double for ``Limiter``."""

    def __init__(self) -> None:
        self._buckets: dict[tuple[str, str, str, int], Bucket] = {}
        self._streams: dict[str, int] = {}  # user -> open streams

    def _bucket(self, tier: Tier, unit: str, rate: int) -> Bucket:
        key = (tier.name, tier.key, unit, rate)
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= MAX_BUCKETS:
                self._forget_idle()
            bucket = self._buckets[key] = Bucket(rate)
        return bucket

    def _forget_idle(self) -> None:
        for key in [k for k, b in self._buckets.items() if b.idle]:
            del self._buckets[key]

    def _pairs(self, tiers: Sequence[Tier], tokens: int) -> list[tuple[Tier, str, Bucket, int]]:
        pairs = []
        for tier in tiers:
            if tier.rpm > 0:
                pairs.append((tier, "requests", self._bucket(tier, "requests", tier.rpm), 1))
            if tier.tpm > 0:
                pairs.append((tier, "tokens", self._bucket(tier, "tokens", tier.tpm), tokens))
        return pairs

    async def try_acquire(self, tiers: Sequence[Tier], tokens: int) -> Grant | Denial:
        pairs = self._pairs(tiers, tokens)
        blocked = [(tier, unit, b, n) for tier, unit, b, n in pairs if not b.fits(n)]
        if blocked:
            tier, unit, bucket, amount = max(blocked, key=lambda p: p[2].wait_for(p[3]))
            wait = bucket.wait_for(amount)
            requests, token_quota = _tightest(pairs)
            return Denial(
                tier,
                unit,
                retry_after_s=PERIOD_S if math.isinf(wait) else wait,
                requests=requests,
                token_quota=token_quota,
                too_large=math.isinf(wait),
            )
        for _, _, bucket, amount in pairs:
            bucket.take(amount)
        requests, token_quota = _tightest(pairs, current=True)
        held = tuple(bucket for _, unit, bucket, _ in pairs if unit == "tokens")
        return Grant(tuple(tiers), tokens, requests, token_quota, token_buckets=held)

    async def admit(
        self, user: str, cap: int, tiers: Sequence[Tier], tokens: int
    ) -> Grant | Denial:
        if not await self.open_stream(user, cap):
            return stream_denial(user)
        outcome = await self.try_acquire(tiers, tokens)
        if isinstance(outcome, Denial):
            await self.close_stream(user)
            return outcome
        outcome.user, outcome.cap = user, cap
        return outcome

    async def finish(self, grant: Grant, used_tokens: int) -> None:
        await self.settle(grant, used_tokens)
        if grant.user is not None:
            await self.close_stream(grant.user)

    def give_back(self, grant: Grant) -> None:
        """Undo an ``admit`` grant entirely, its request included (the shared tier refused)."""
        self._settle(grant, 0)
        for tier in grant.tiers:
            if tier.rpm > 0:
                self._bucket(tier, "requests", tier.rpm).force(-1)
        if grant.user is not None:
            self._close(grant.user)

    async def settle(self, grant: Grant, used_tokens: int) -> None:
        self._settle(grant, used_tokens)

    def _settle(self, grant: Grant, used_tokens: int) -> None:
        delta = used_tokens - grant.tokens
        if delta == 0:
            return
        for bucket in grant.token_buckets:  # the buckets it took from (one may be forgotten
            bucket.force(delta)  # meanwhile: only when empty, so the tokens had leaked out)

    async def open_stream(self, user: str, cap: int) -> bool:
        streams = self._streams
        held = streams.get(user, 0)
        if cap > 0 and held >= cap:
            return False
        streams[user] = held + 1
        return True

    async def close_stream(self, user: str) -> None:
        self._close(user)

    def _close(self, user: str) -> None:
        streams = self._streams
        held = streams.get(user, 0) - 1
        if held > 0:
            streams[user] = held
        else:
            streams.pop(user, None)

    def streams_of(self, user: str) -> int:
        return self._streams.get(user, 0)


def stream_denial(user: str) -> Denial:
    """The refusal of a stream slot: the user's cap is full (try again in a second)."""
    return Denial(Tier("user", user, 0, 0), STREAM_CAP, retry_after_s=1.0)


def _tightest(
    pairs: Sequence[tuple[Tier, str, Bucket, int]], *, current: bool = False
) -> tuple[Quota | None, Quota | None]:
    """The quota with the fewest remaining, per unit (what OpenAI-style headers report);
    a ``Quota`` is made for the two that are reported only."""
    best: dict[str, tuple[float, Bucket]] = {}
    for _, unit, bucket, _ in pairs:
        if not current:
            bucket.limiter.has_capacity(0)  # leak first, so the level is current
        left = bucket.limiter.max_rate - bucket.limiter._level  # (what ``remaining`` rounds)
        tightest = best.get(unit)
        if tightest is None or left < tightest[0]:
            best[unit] = (left, bucket)
    requests, tokens = best.get("requests"), best.get("tokens")
    return (
        requests[1].quota(current=True) if requests else None,
        tokens[1].quota(current=True) if tokens else None,
    )


def ratelimit_headers(requests: Quota | None, tokens: Quota | None) -> dict[str, str]:
    """OpenAI's ``x-ratelimit-*`` headers for whichever units are limited."""
    headers: dict[str, str] = {}
    for unit, quota in (("requests", requests), ("tokens", tokens)):
        if quota is not None:
            headers[f"x-ratelimit-limit-{unit}"] = str(quota.limit)
            headers[f"x-ratelimit-remaining-{unit}"] = str(quota.remaining)
            headers[f"x-ratelimit-reset-{unit}"] = format_duration(quota.reset_s)
    return headers


def format_duration(seconds: float) -> str:
    """OpenAI's reset format: ``20ms``, ``1.5s``, ``6m0s``."""
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    if seconds < 60:
        return f"{round(seconds, 3):g}s"
    minutes, rest = divmod(round(seconds), 60)  # whole seconds first: never "1m60s"
    return f"{minutes}m{rest}s"
