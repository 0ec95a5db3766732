"""The one place provider calls are retried, guarded by breakers and moved down the fallbacks.

An *attempt* is one HTTP call to the provider (``ResilientProvider._attempt``, the boundary
a tracing span wraps): for a stream, from the request until its status line; for a
non-streamed completion, until its whole body. A stream that answered 2xx goes to the
client and is never repeated (``generation.py`` owns that part); a completion cut off
mid-body is not repeated either (``retry.is_retryable``: it was already paid for).

For a request the provider tries its model's tier, then each configured fallback
(``SLUICE_FALLBACKS``), each tier with fresh attempts but a shared waiting budget:

    tier 0: the requested model   (or its cheaper fallback under budget pressure)
    tier 1..n: the fallbacks      (on breaker_open or retries_exhausted)
    last: a cached answer         (``serving.py``, when every model tier failed)

The route (the ``Stream``) records which model served and why, for the response headers
``X-Sluice-Model`` and ``X-Sluice-Fallback-Reason`` (as known when they go out: a stream's
may leave before the provider answered) and for the ledger.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import orjson

from .breaker import Breakers
from .context import completion_tokens_only
from .errors import (
    CircuitOpenError,
    ProviderError,
    SluiceError,
    translate,
)
from .jsonbytes import dumps_kept
from .provider_client import ON_CONNECTED
from .retry import RetryBudget, RetryPolicy, is_retryable
from .settings import ResilienceSettings, Settings
from .telemetry import Telemetry
from .upstream import ProviderStream, Sink, Upstream

log = logging.getLogger(__name__)

T = TypeVar("T")
# One provider call (a request's body, its model): Upstream.post_chat or .complete.
_Call = Callable[[bytes, str], Awaitable[T]]

BREAKER_OPEN = "breaker_open"
RETRIES_EXHAUSTED = "retries_exhausted"
BUDGET_PRESSURE = "budget_pressure"
BUDGET_EXCEEDED = "budget_exceeded"  # the cache served: the budget had no room for a call

Sleep = Callable[[float], Awaitable[None]]


class Route(Protocol):
    """What the provider reads and writes about one request (a ``Stream`` is one)."""

    model: str
    served_model: str
    fallback_reason: str | None
    backing_off: bool  # waiting out a retry's delay (the response may still get a status)
    attempt_started_at: float | None  # loop time the attempt in flight began
    provider_engaged: bool  # the request went out to the provider: it may bill it
    output_limits: Mapping[str, int | None]  # per fallback: its output ceiling, None: no fit


@dataclass(frozen=True, slots=True)
class Resilience:
    """The pure parts, made in ``create_app``; tests replace ``sleep``/``random``/``now``."""

    breakers: Breakers
    policy: RetryPolicy = field(default_factory=RetryPolicy)
    fallbacks: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    sleep: Sleep = asyncio.sleep
    random: Callable[[], float] = random.random
    now: Callable[[], float] = time.time  # Unix time, for Retry-After dates

    @classmethod
    def from_settings(
        cls, settings: Settings, *, clock: Callable[[], float] = time.monotonic
    ) -> Resilience:
        """Build from settings; ``clock`` drives the breakers' reset timeout."""
        config: ResilienceSettings = settings.resilience
        breakers = Breakers(
            settings.provider.name,
            fail_max=config.breaker_fail_max,
            reset_timeout_s=config.breaker_reset_s,
            per_model=config.breaker_per_model,
            clock=clock,
        )
        policy = RetryPolicy(
            max_attempts=config.retry_max_attempts,
            base_delay_s=config.retry_base_delay_s,
            max_delay_s=config.retry_max_delay_s,
            max_total_delay_s=config.retry_budget_s,
        )
        return cls(breakers, policy, dict(config.fallbacks))

    def chain(self, model: str) -> tuple[str, ...]:
        """The models to try for ``model``, best first."""
        return (model, *self.fallbacks.get(model, ()))


def degrade_reason(error: BaseException) -> str | None:
    """Why a failed tier may move to the next one, or None when it must not."""
    if isinstance(error, CircuitOpenError):
        return BREAKER_OPEN
    if isinstance(error, ProviderError) and is_retryable(error):
        return RETRIES_EXHAUSTED
    return None


class ResilientProvider:
    """``Upstream.post_chat`` with retries, breakers and fallbacks; same reading methods."""

    def __init__(
        self, upstream: Upstream, resilience: Resilience, telemetry: Telemetry | None = None
    ) -> None:
        self.upstream = upstream
        self._r = resilience
        self._telemetry = telemetry  # a CLIENT span per attempt, retry and breaker events
        if telemetry is not None:
            resilience.breakers.listeners.append(telemetry.breaker_listener())

    def chain(self, model: str) -> tuple[str, ...]:
        return self._r.chain(model)

    def route_chain(self, route: Route) -> tuple[str, ...]:
        """The models ``route`` tries, in order: its chain, or, started on a fallback (budget
        pressure), that fallback first, the model asked for right after it, then the
        fallback's own fallbacks and the rest of the chain."""
        chain = self._r.chain(route.model)
        if route.served_model == route.model:
            return chain
        first = self._r.chain(route.served_model)
        return tuple(dict.fromkeys((first[0], route.model, *first[1:], *chain[1:])))

    def first_models(self, route: Route) -> tuple[str, ...]:
        """The models that may serve ``route`` before any other is tried: the one asked for,
        a fallback it starts on, and past each whose breaker refuses calls, the next (whose
        cached answers may serve it)."""
        models = [route.model]
        limits = route.output_limits
        for model in self.route_chain(route):
            if model in limits and limits[model] is None:
                continue  # the prompt does not fit it: skipped by the chain too
            models.append(model)
            if not self._r.breakers.for_model(model).remaining_s():
                break
        return tuple(dict.fromkeys(models))

    def degrade(self, route: Route, reason: str = BUDGET_PRESSURE) -> bool:
        """Start ``route`` on its first fallback (e.g. under budget pressure); False if none."""
        chain = self._r.chain(route.model)
        if len(chain) < 2 or (
            chain[1] in route.output_limits and not route.output_limits[chain[1]]
        ):
            return False  # no fallback, or the prompt does not fit it
        route.served_model = chain[1]
        route.fallback_reason = reason
        return True

    async def post_chat(self, body: bytes, *, route: Route) -> ProviderStream:
        """A stream: the first 2xx response along the chain, or the last tier's error."""
        return await self._along_chain(body, route, self.upstream.post_chat)

    async def complete(self, body: bytes, *, route: Route) -> bytes:
        """A non-streamed completion: the first whole 2xx body along the chain, or the
        last tier's error."""
        return await self._along_chain(body, route, self.upstream.complete)

    async def _along_chain(self, body: bytes, route: Route, call: _Call[T]) -> T:
        budget = RetryBudget(self._r.policy, random=self._r.random, now=self._r.now)
        chain = self.route_chain(route)
        reason = route.fallback_reason
        failed: SluiceError | None = None
        for tier, model in enumerate(chain):
            sent = body
            if model != route.model:
                limits = route.output_limits  # (empty when admission made none)
                if model in limits and limits[model] is None:  # the prompt cannot fit it
                    log.warning("fallback %s skipped: the prompt does not fit it", model)
                    continue
                sent = _with_model(body, model, limits.get(model))
            if tier:
                route.served_model = model
                # (Back on the model asked for, after a fallback budget pressure chose: no
                # fallback serves it.)
                route.fallback_reason = reason if model != route.model else None
                budget.next_model()
            try:
                return await self._with_retries(call, sent, model, budget, route)
            except SluiceError as exc:
                reason = degrade_reason(exc)
                if reason is None or tier == len(chain) - 1:
                    raise
                failed = exc
                log.warning("model %s failed (%s); falling back", model, reason)
        if failed is None:
            raise AssertionError("unreachable: the requested model is never skipped")
        raise failed

    async def _with_retries(
        self, call: _Call[T], body: bytes, model: str, budget: RetryBudget, route: Route
    ) -> T:
        loop = self.upstream.loop
        while True:
            budget.record_attempt()
            route.attempt_started_at = loop.time()
            engaged = ON_CONNECTED.set(functools.partial(setattr, route, "provider_engaged", True))
            try:
                return await self._attempt(call, body, model)
            except CircuitOpenError:
                route.provider_engaged = False  # refused here: nothing was sent
                raise
            except ProviderError as exc:
                # Refused, or failed before answering: the provider has nothing to bill. An
                # answer cut off mid-way was answered, and a request that went out and then
                # outlasted its deadline may be generating still: both may be billed (and
                # neither is retried).
                route.provider_engaged = route.provider_engaged and exc.prompt_billed
                delay = budget.delay_before_retry(exc)
                if delay is None:
                    if budget.retried_out:  # (a longer wait asked for: its Retry-After stands)
                        exc.futile()
                    raise
                log.info(
                    "provider attempt %d for %s failed (%s); retrying in %.3fs",
                    budget.attempts,
                    model,
                    exc.code,
                    delay,
                )
                if self._telemetry is not None:
                    self._telemetry.retry_scheduled(delay, exc)
            finally:
                ON_CONNECTED.reset(engaged)
            route.backing_off = True
            try:
                await self._r.sleep(delay)
            finally:
                route.backing_off = False

    async def _attempt(self, call: _Call[T], body: bytes, model: str) -> T:
        """One call, guarded by the model's breaker; lower-level errors enter the tree here."""
        traced = self._telemetry.attempt(model) if self._telemetry else contextlib.nullcontext()
        with self._r.breakers.for_model(model).attempt() as verdict, traced:
            try:
                answer = await call(body, model)
            except SluiceError:
                raise
            except Exception as exc:
                raise translate(exc) from exc
            if isinstance(answer, ProviderStream):  # judged when it ends (``generation.py``)
                verdict.defer()
                answer.ended = verdict
                return answer
            return answer

    async def pump(
        self, answer: ProviderStream, sink: Sink, *, generating: Callable[[], bool]
    ) -> None:
        await self.upstream.pump(answer, sink, generating=generating)

    def redact(self, text: str) -> str:
        return self.upstream.redact(text)

    def scrub_data(self, data: bytes) -> bytes:
        return self.upstream.scrub_data(data)

    def field(self, value: object) -> str | None:
        return self.upstream.field(value)


def _with_model(body: bytes, model: str, limit: int | None) -> bytes:
    """The same request for another model (once per tier, never per chunk), its output
    ceiling lowered to ``limit`` (that model's own, and its window's room); a reasoning
    model gets the ceiling as ``max_completion_tokens``, the only name it takes."""
    request = {**orjson.loads(body), "model": model}
    if completion_tokens_only(model) and request.get("max_tokens") is not None:
        ceiling = request.pop("max_tokens")
        if request.get("max_completion_tokens") is None:
            request["max_completion_tokens"] = ceiling
    if limit is not None:
        for name in ("max_tokens", "max_completion_tokens"):
            value = request.get(name)
            if isinstance(value, int) and value > limit:
                request[name] = limit
    return dumps_kept(request)
