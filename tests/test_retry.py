"""The pure retry policy: what is retried, how long it waits, and when the budget ends it."""

from __future__ import annotations

import email.utils

import pytest

from service.errors import (
    InvalidRequestError,
    ProviderAnswerError,
    ProviderConnectionError,
    ProviderConnectTimeoutError,
    ProviderCutOffError,
    ProviderProtocolError,
    ProviderStatusError,
    ProviderTimeoutError,
)
from service.retry import RetryBudget, RetryPolicy, backoff_s, is_retryable, retry_after_s

NOW = 1_700_000_000.0


def status(code: int, **headers: str) -> ProviderStatusError:
    return ProviderStatusError("failed", provider_status=code, headers=headers)


def budget(policy: RetryPolicy | None = None, *, draw: float = 0.5) -> RetryBudget:
    return RetryBudget(policy or RetryPolicy(), random=lambda: draw, now=lambda: NOW)


@pytest.mark.parametrize("code", [408, 409, 429, 500, 502, 503, 504, 529])
def test_retryable_statuses(code: int) -> None:
    """408, 409, 429 and every 5xx are worth another attempt."""
    assert is_retryable(status(code))


@pytest.mark.parametrize("code", [400, 401, 403, 404, 413, 422])
def test_client_statuses_are_never_retried(code: int) -> None:
    """A request the provider refused as bad is refused again: never retried."""
    assert not is_retryable(status(code))


def test_connection_failures_retry_but_generation_timeouts_do_not() -> None:
    """Refused/reset connections and connect timeouts retry; a first-token timeout does not."""
    assert is_retryable(ProviderConnectionError("refused"))
    assert is_retryable(ProviderConnectTimeoutError("slow connect"))
    assert not is_retryable(ProviderTimeoutError("no first token"))
    assert not is_retryable(ProviderCutOffError("half a body, already paid for"))
    assert not is_retryable(ProviderProtocolError("garbage"))
    assert not is_retryable(InvalidRequestError("bad"))
    # A 2xx that is an error, or no stream: a 502, but the answer may have been paid for.
    assert not is_retryable(ProviderAnswerError("no stream", provider_status=502))


def test_retry_after_ms_wins_over_retry_after() -> None:
    """``retry-after-ms`` is read first (in milliseconds), then ``Retry-After``."""
    assert retry_after_s({"retry-after-ms": "250", "Retry-After": "9"}, now=NOW) == 0.25
    assert retry_after_s({"Retry-After": "2"}, now=NOW) == 2.0
    assert retry_after_s({"retry-after": "1.5"}, now=NOW) == 1.5


def test_retry_after_http_date() -> None:
    """``Retry-After`` may be an HTTP date: the wait is the time until it."""
    date = email.utils.formatdate(NOW + 7, usegmt=True)
    assert retry_after_s({"Retry-After": date}, now=NOW) == pytest.approx(7.0)
    past = email.utils.formatdate(NOW - 60, usegmt=True)
    assert retry_after_s({"Retry-After": past}, now=NOW) == 0.0


def test_retry_after_garbage_is_ignored() -> None:
    """An unparseable header counts as absent, so backoff applies."""
    assert retry_after_s({"Retry-After": "soon"}, now=NOW) is None
    assert retry_after_s({"retry-after-ms": "nan"}, now=NOW) is None
    assert retry_after_s({}, now=NOW) is None
    # Dates no datetime can hold (they raised OverflowError: a 500, and no breaker count).
    assert retry_after_s({"Retry-After": "Mon, 01 Jan 99999999999 00:00:00 GMT"}, now=NOW) is None
    overflowing = "Mon, 01 Jan 2026 00:00:00 +99999999999999999999"
    assert retry_after_s({"Retry-After": overflowing}, now=NOW) is None


def test_backoff_is_exponential_capped_and_fully_jittered() -> None:
    """The ceiling doubles per retry up to the cap; the jitter scales it from 0 to 1."""
    policy = RetryPolicy(base_delay_s=0.5, max_delay_s=8.0)
    assert [backoff_s(n, policy, lambda: 1.0) for n in range(6)] == [0.5, 1, 2, 4, 8, 8]
    assert backoff_s(3, policy, lambda: 0.25) == 1.0
    assert backoff_s(3, policy, lambda: 0.0) == 0.0
    assert backoff_s(10_000, policy, lambda: 1.0) == 8.0  # no overflow on huge counts


def test_budget_allows_max_attempts_then_stops() -> None:
    """With max_attempts=3 a request gets two retries with growing backoff, then none."""
    state = budget(RetryPolicy(max_attempts=3))
    delays = []
    for _ in range(3):
        state.record_attempt()
        delays.append(state.delay_before_retry(status(503)))
    assert delays == [0.25, 0.5, None]


def test_budget_honours_retry_after_instead_of_backoff() -> None:
    """The server's requested wait replaces the jittered backoff."""
    state = budget()
    state.record_attempt()
    assert state.delay_before_retry(status(429, **{"Retry-After": "3"})) == 3.0


def test_budget_refuses_a_wait_longer_than_what_is_left() -> None:
    """A Retry-After beyond the remaining total-delay budget is not retried early."""
    state = budget(RetryPolicy(max_attempts=5, max_total_delay_s=5.0))
    state.record_attempt()
    assert state.delay_before_retry(status(429, **{"Retry-After": "4"})) == 4.0
    state.record_attempt()
    assert state.delay_before_retry(status(429, **{"Retry-After": "2"})) is None
    assert state.waited_s == 4.0


def test_budget_never_retries_a_client_error() -> None:
    """No attempt count makes a 400 retryable."""
    state = budget()
    state.record_attempt()
    assert state.delay_before_retry(status(400)) is None


def test_next_model_resets_attempts_but_not_waiting() -> None:
    """A fallback model gets fresh attempts; the time already spent waiting still counts."""
    roomy = budget(RetryPolicy(max_attempts=2, max_total_delay_s=10.0))
    tight = budget(RetryPolicy(max_attempts=2, max_total_delay_s=0.3))
    for state in (roomy, tight):
        state.record_attempt()
        assert state.delay_before_retry(status(503)) == 0.25
        state.record_attempt()
        assert state.delay_before_retry(status(503)) is None  # attempts used up
        state.next_model()
        state.record_attempt()
    assert roomy.delay_before_retry(status(503)) == 0.25  # fresh attempts on the new model
    assert tight.delay_before_retry(status(503)) is None  # 0.25 more would pass 0.3 total
