"""The retry policy: which provider failures are worth another attempt, and how long to wait.

Pure: no server objects, no I/O, no clock or randomness of its own (both are injected), so
every decision is unit-testable. The shape follows openai-python's ``_should_retry`` and
``_calculate_retry_timeout``: retry 408, 409, 429 and 5xx and failed connections; honour
``retry-after-ms``, then ``Retry-After`` (seconds or an HTTP date); otherwise back off
exponentially, capped. Unlike the SDK the jitter is *full* (uniform in ``[0, backoff]``),
and a request carries a budget: at most ``max_attempts`` calls per model and at most
``max_total_delay_s`` spent waiting across the whole request. A server asking for a longer
wait than the budget has left is not retried early: its answer goes back to the client.

A retry only ever happens before the provider answered 2xx. After that the generation is
streaming to the client, and repeating it would duplicate output and cost.
"""

from __future__ import annotations

import email.utils
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from .errors import (
    ProviderConnectionError,
    ProviderConnectTimeoutError,
    ProviderStatusError,
    SluiceError,
)

RETRYABLE_STATUSES = frozenset({408, 409, 429})

DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_BASE_DELAY_S = 0.5
DEFAULT_MAX_DELAY_S = 8.0
DEFAULT_MAX_TOTAL_DELAY_S = 15.0


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """The knobs; ``max_attempts`` counts the first call, so 1 disables retries."""

    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    base_delay_s: float = DEFAULT_BASE_DELAY_S
    max_delay_s: float = DEFAULT_MAX_DELAY_S
    max_total_delay_s: float = DEFAULT_MAX_TOTAL_DELAY_S


def is_retryable(error: BaseException) -> bool:
    """True for a failure another attempt may fix: 408/409/429/5xx, a failed connection.
    Never one whose answer the provider may have generated (and billed): a 2xx that was an
    error, an answer cut off mid-body, a first-token or idle timeout after it went out; nor
    one the provider said not to retry."""
    if isinstance(error, SluiceError) and error.may_have_generated:
        return False
    if isinstance(error, ProviderStatusError):
        if error.provider_no_retry:  # its ``x-should-retry: false``
            return False
        status = error.provider_status
        return status in RETRYABLE_STATUSES or status >= 500
    return isinstance(error, ProviderConnectionError | ProviderConnectTimeoutError)


def retry_after_s(headers: Mapping[str, str], *, now: float) -> float | None:
    """The server's requested wait in seconds, or None; ``now`` is the Unix time for dates."""
    lowered = {name.lower(): value for name, value in headers.items()}
    for name, divisor in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        raw = lowered.get(name)
        if raw is None:
            continue
        try:
            delay = float(raw)
        except ValueError:
            continue
        if math.isfinite(delay):
            return max(0.0, delay / divisor)
    raw = lowered.get("retry-after")
    if raw is None:
        return None
    try:
        when = email.utils.parsedate_to_datetime(raw).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):  # a year past 9999, ...
        return None
    return max(0.0, when - now)


def backoff_s(retry: int, policy: RetryPolicy, random: Callable[[], float]) -> float:
    """Full-jitter backoff before retry number ``retry`` (0 for the first retry)."""
    ceiling = min(policy.max_delay_s, policy.base_delay_s * 2.0 ** min(retry, 64))
    return ceiling * random()


class RetryBudget:
    """One request's retry state: attempts on the current model, total time spent waiting."""

    __slots__ = ("_now", "_policy", "_random", "attempts", "waited_s")

    def __init__(
        self, policy: RetryPolicy, *, random: Callable[[], float], now: Callable[[], float]
    ) -> None:
        self._policy = policy
        self._random = random
        self._now = now
        self.attempts = 0
        self.waited_s = 0.0

    def next_model(self) -> None:
        """A fallback model starts with fresh attempts; the waiting budget is shared."""
        self.attempts = 0

    def record_attempt(self) -> None:
        self.attempts += 1

    @property
    def retried_out(self) -> bool:
        """The current model had every attempt it may have, and more than one."""
        return self.attempts > 1 and self.attempts >= self._policy.max_attempts

    def delay_before_retry(self, error: BaseException) -> float | None:
        """How long to wait before retrying after ``error``; None means do not retry."""
        if not is_retryable(error) or self.attempts >= self._policy.max_attempts:
            return None
        left = self._policy.max_total_delay_s - self.waited_s
        asked = None
        if isinstance(error, ProviderStatusError):
            asked = retry_after_s(error.headers, now=self._now())
        delay = (
            asked if asked is not None else backoff_s(self.attempts - 1, self._policy, self._random)
        )
        if delay > left:
            return None  # waiting less than the server asked would only earn another 429
        self.waited_s += delay
        return delay
