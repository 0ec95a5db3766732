"""The one connection to shared state (Redis), with its own timeouts, breaker and policy.

Every Redis call in the service goes through ``RedisGate.run``, which bounds it by
``SLUICE_REDIS_TIMEOUT_S`` (socket connect/read timeouts as well as an overall deadline,
and no client-side retries), so a dead or slow Redis can never hang a request. Failures
count towards a small loop-clocked breaker: after ``fail_max`` consecutive failures it
opens for ``reset_s`` and calls fail at once without touching the network; then a single
probe is let through. A failed call raises ``RedisUnavailable``; what happens next is the
caller's ``SLUICE_REDIS_FAILURE`` policy: ``open`` falls back to in-process state,
``closed`` answers 503 (``unavailable_error``).

The client is made without I/O in ``create_app`` (``shared.py`` wires it in).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Literal, TypeVar

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from .errors import ServiceUnavailableError
from .settings import SharedStateSettings

log = logging.getLogger(__name__)

T = TypeVar("T")
BreakerState = Literal["closed", "open", "half_open"]
KEY_PREFIX = "sluice:"
POOL_SIZE = 64


class RedisUnavailable(Exception):
    """Redis did not answer in time, failed, or the gate's breaker is open."""


class RedisGate:
    """Runs Redis operations under a deadline and a breaker; see the module docstring."""

    def __init__(
        self,
        client: Redis,
        *,
        failure: Literal["open", "closed"],
        timeout_s: float,
        fail_max: int = 3,
        reset_s: float = 5.0,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.client = client
        self.failure = failure
        self.timeout_s = timeout_s
        self.fail_max = fail_max
        self.reset_s = reset_s
        self._clock = clock
        self._failures = 0
        self._opened_at: float | None = None
        self._probing = False
        # Counters for /metrics and /readyz.
        self.errors_total = 0
        self.rejected_total = 0
        self.fallbacks_total = 0

    @classmethod
    def from_settings(cls, settings: SharedStateSettings) -> RedisGate | None:
        """The gate for ``SLUICE_REDIS_URL``, or None when shared state is off."""
        if settings.redis_url is None:
            return None
        # A blocking pool: under a burst, calls wait (within the deadline) for one of
        # ``POOL_SIZE`` connections instead of failing with MaxConnectionsError.
        pool = BlockingConnectionPool.from_url(
            settings.redis_url.reveal(),
            max_connections=POOL_SIZE,
            timeout=settings.redis_timeout_s,
            socket_timeout=settings.redis_timeout_s,
            socket_connect_timeout=settings.redis_timeout_s,
            retry=Retry(NoBackoff(), 0),
        )
        client = Redis.from_pool(pool)  # owns the pool: aclose() closes its connections
        return cls(
            client,
            failure=settings.redis_failure,
            timeout_s=settings.redis_timeout_s,
            fail_max=settings.redis_breaker_fail_max,
            reset_s=settings.redis_breaker_reset_s,
        )

    def _now(self) -> float:
        return self._clock() if self._clock is not None else asyncio.get_running_loop().time()

    @property
    def state(self) -> BreakerState:
        if self._opened_at is None:
            return "closed"
        if self._probing or self._now() - self._opened_at >= self.reset_s:
            return "half_open"
        return "open"

    @property
    def fail_open(self) -> bool:
        return self.failure == "open"

    async def run(self, operation: Callable[[Redis], Awaitable[T]]) -> T:
        """Run ``operation(client)`` under the deadline; raise ``RedisUnavailable`` if it fails."""
        probe = self._admit()
        try:
            async with asyncio.timeout(self.timeout_s):
                result = await operation(self.client)
        except (RedisError, OSError, TimeoutError) as exc:
            self._failed(probe, exc)
            raise RedisUnavailable(type(exc).__name__) from exc
        except BaseException:
            if probe:
                self._probing = False  # cancelled probe: let the next call probe instead
            raise
        self._succeeded()
        return result

    def _admit(self) -> bool:
        """True when this call is the half-open probe; raise while the breaker is open."""
        if self._opened_at is None:
            return False
        if self._probing or self._now() - self._opened_at < self.reset_s:
            self.rejected_total += 1
            raise RedisUnavailable("breaker open")
        self._probing = True
        return True

    def _failed(self, probe: bool, exc: BaseException) -> None:
        self.errors_total += 1
        self._failures += 1
        if probe or (self._opened_at is None and self._failures >= self.fail_max):
            if self._opened_at is None or probe:
                log.warning(
                    "redis unavailable (%s); breaker open for %.1f s",
                    type(exc).__name__,
                    self.reset_s,
                )
            self._opened_at = self._now()
        self._probing = False

    def _succeeded(self) -> None:
        if self._opened_at is not None:
            log.info("redis is back; breaker closed")
        self._failures = 0
        self._opened_at = None
        self._probing = False

    def unavailable_error(self) -> ServiceUnavailableError:
        """The 503 a fail-closed caller answers while Redis is unavailable."""
        retry_after = max(1, round(self.reset_s))
        return ServiceUnavailableError(
            "Shared state (Redis) is unavailable; try again shortly.",
            code="shared_state_unavailable",
            headers={"Retry-After": str(retry_after)},
        )

    def fallback(self, what: str) -> None:
        """Record that ``what`` used in-process state because Redis was unavailable."""
        self.fallbacks_total += 1
        log.debug("redis unavailable: %s uses in-process state", what)

    def health(self) -> dict[str, object]:
        """For ``/readyz`` and metrics: the breaker state and the counters."""
        return {
            "state": "ok" if self.state == "closed" else self.state,
            "failure_policy": self.failure,
            "errors": self.errors_total,
            "rejected": self.rejected_total,
            "fallbacks": self.fallbacks_total,
        }
