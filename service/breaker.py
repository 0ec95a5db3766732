"""Circuit breakers around provider calls: pybreaker's state machine, our clock, one probe.

pybreaker keeps the state (closed, open, half-open), the consecutive-failure count and the
listeners (where metrics can attach). Three things are added here, because pybreaker's
synchronous design gets them wrong for awaited calls:

- **Time.** pybreaker compares ``datetime.now()`` with its ``opened_at``. We record when it
  opened on an injected monotonic clock (through a listener) and make the open-to-half-open
  move ourselves, so tests advance a clock instead of sleeping.
- **One probe.** In half-open pybreaker lets *every* call through; here exactly one attempt
  probes and concurrent ones fail fast as if the circuit were still open. An attempt let in
  before the circuit last opened (a slow call from before the outage) says nothing about
  the provider now: its outcome is not fed, so only the probe decides the half-open state.
- **What counts.** An attempt's outcome is fed to pybreaker through ``calling()`` once it
  is known, never while the call is pending (no lock is held across an ``await``). A
  cancelled attempt (the client went away) is not fed at all: pybreaker treats an excluded
  exception as a *success*, which would let a cancelled probe close the circuit. A
  client-caused 4xx is fed as a success: the provider answered. A success on a closed
  circuit with no failures counted is not fed at all, since it would change nothing
  (so listeners' ``success`` fires only when it resets a count or closes the circuit).

- **Streams end later.** A stream's 2xx says little: a provider that answers and then
  resets, stalls or sends garbage mid-stream is failing too. An attempt that answered a
  stream defers its verdict (``Verdict.defer``) until the stream has ended (the
  ``Verdict`` is called then); a half-open probe is still judged a success at its 2xx, so
  that the circuit closes and other requests go through while the probe's stream runs. A
  stream that ends well after failures were counted since it began resets nothing: the
  failures are newer news of the provider than its start.

The breaker lets through or refuses an attempt before the provider's 2xx (see
``resilience.py``); what comes after it only adds to the count.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

import pybreaker

from .errors import CircuitOpenError, ProviderError, ProviderStatusError

DEFAULT_FAIL_MAX = 5
DEFAULT_RESET_TIMEOUT_S = 30.0
PROBE_BUSY_RETRY_AFTER_S = 1.0
MAX_BREAKERS = 256  # per provider: with "*", model names come from clients

CLOSED = pybreaker.STATE_CLOSED
OPEN = pybreaker.STATE_OPEN
HALF_OPEN = pybreaker.STATE_HALF_OPEN


def is_provider_failure(error: BaseException) -> bool:
    """True when ``error`` says the provider is unhealthy (not that the request was bad)."""
    if isinstance(error, ProviderStatusError):
        status = error.provider_status
        return status in (408, 429) or status >= 500
    return isinstance(error, ProviderError)


class _Failed(Exception):
    """Replays a failed attempt into pybreaker's ``calling()`` block."""


class _OpenedAt(pybreaker.CircuitBreakerListener):
    def __init__(self, breaker: Breaker) -> None:
        self._breaker = breaker

    def state_change(
        self,
        cb: pybreaker.CircuitBreaker,
        old_state: pybreaker.CircuitBreakerState | None,
        new_state: pybreaker.CircuitBreakerState,
    ) -> None:
        if new_state.name == OPEN:
            self._breaker.opened_at = self._breaker.clock()
            self._breaker.cycle += 1


class Verdict:
    """One attempt, as a ``with`` block (``Breaker.attempt``): let in or refused as it
    begins, its outcome given as it ends, or, deferred, once the stream it answered has."""

    __slots__ = ("_breaker", "_pending", "_probe", "cycle", "deferred", "failure_serial")

    def __init__(self, breaker: Breaker) -> None:
        self._breaker = breaker
        self._probe = False  # the half-open circuit's one probe
        self.cycle = 0  # the breaker's, when the attempt was let in
        self.failure_serial = 0  # its failures counted by then
        self.deferred = False
        self._pending = False  # deferred and not given yet

    def __enter__(self) -> Verdict:
        """Let the attempt in, or raise ``CircuitOpenError`` without calling."""
        breaker = self._breaker
        self._probe = breaker._admit()
        self.cycle, self.failure_serial = breaker.cycle, breaker.failure_serial
        return self

    def __exit__(self, kind: object, exc: BaseException | None, tb: object) -> None:
        breaker = self._breaker
        try:
            if exc is None:
                if self._probe or not self.deferred:  # a probe's 2xx closes the circuit now
                    breaker.record(failed=False, cycle=self.cycle)
            elif not isinstance(exc, asyncio.CancelledError):  # (the client left: no news)
                breaker.record(failed=is_provider_failure(exc), cycle=self.cycle)
        finally:
            if self._probe:
                breaker._probing = False

    def defer(self) -> None:
        """The attempt answered a stream: judge it by how the stream ends."""
        self.deferred = self._pending = True

    def __call__(self, error: BaseException | None) -> None:
        """The stream ended (``error``: how it failed; cancelled: nothing is counted).
        Given once; a success after failures counted since the attempt began is old news."""
        if not self._pending or isinstance(error, asyncio.CancelledError):
            return
        self._pending = False
        failed = error is not None and is_provider_failure(error)
        if failed or self._breaker.failure_serial == self.failure_serial:
            self._breaker.record(failed=failed, cycle=self.cycle)


class Breaker:
    """One circuit (a provider, or one of its models); use ``with breaker.attempt():``."""

    __slots__ = ("_cb", "_probing", "clock", "cycle", "failure_serial", "name", "opened_at")

    def __init__(
        self,
        name: str,
        *,
        fail_max: int = DEFAULT_FAIL_MAX,
        reset_timeout_s: float = DEFAULT_RESET_TIMEOUT_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.clock = clock
        self.opened_at = clock()
        self.cycle = 0  # how many times it opened: an attempt's news counts in its own cycle
        self.failure_serial = 0  # failures fed to it, ever (pybreaker's count resets)
        self._probing = False
        self._cb = pybreaker.CircuitBreaker(
            fail_max=fail_max,
            reset_timeout=reset_timeout_s,
            name=name,
            listeners=[_OpenedAt(self)],
        )

    @property
    def state(self) -> str:
        return self._cb.current_state

    @property
    def fail_counter(self) -> int:
        return self._cb.fail_counter

    def add_listener(self, listener: pybreaker.CircuitBreakerListener) -> None:
        """Attach a pybreaker listener (metrics, logs) to state changes and outcomes."""
        self._cb.add_listener(listener)

    def open(self) -> None:
        """Open the circuit now (an operator's or a test's hand on the switch)."""
        self._cb.open()

    def remaining_s(self) -> float:
        """Seconds until an open circuit lets a probe through (0 when not open)."""
        if self._cb.current_state != OPEN:
            return 0.0
        return max(0.0, self.opened_at + self._cb.reset_timeout - self.clock())

    def attempt(self) -> Verdict:
        """Guard one provider attempt (``with``); entering raises ``CircuitOpenError``
        without calling when open. The verdict is given as it ends, unless deferred (a
        stream's). (A class, not a generator: one an attempt.)"""
        return Verdict(self)

    def _admit(self) -> bool:
        """Let an attempt through, or raise; True when the attempt is the half-open probe."""
        state = self._cb.current_state
        if state == OPEN:
            left = self.remaining_s()
            if left > 0:
                raise CircuitOpenError(
                    "The provider is failing; the gateway is not sending it requests for now.",
                    retry_after_s=left,
                )
            self._cb.half_open()
            state = HALF_OPEN
        if state == HALF_OPEN:
            if self._probing:
                raise CircuitOpenError(
                    "The provider is being probed after failures; try again shortly.",
                    retry_after_s=PROBE_BUSY_RETRY_AFTER_S,
                )
            self._probing = True
            return True
        return False

    def record(self, *, failed: bool, cycle: int) -> None:
        """Feed an outcome to pybreaker: counts, opens at ``fail_max``, closes after a probe."""
        if cycle != self.cycle:
            return  # let in before the circuit last opened: old news of the provider
        state = self._cb.current_state
        if state == OPEN:
            return  # a concurrent attempt already opened it; its clock is running
        if not failed and state == CLOSED and self._cb.fail_counter == 0:
            return  # nothing would change: keep the common case off pybreaker's slow path
        if failed:
            self.failure_serial += 1
        with contextlib.suppress(_Failed, pybreaker.CircuitBreakerError), self._cb.calling():
            if failed:
                raise _Failed


class Breakers:
    """The breakers of one provider: one for the provider, or one per configured model."""

    def __init__(
        self,
        provider: str,
        *,
        fail_max: int = DEFAULT_FAIL_MAX,
        reset_timeout_s: float = DEFAULT_RESET_TIMEOUT_S,
        per_model: frozenset[str] = frozenset(),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._provider = provider
        self._fail_max = fail_max
        self._reset_timeout_s = reset_timeout_s
        self._per_model = per_model
        self._clock = clock
        self._breakers: dict[str, Breaker] = {}
        self.listeners: list[pybreaker.CircuitBreakerListener] = []  # given to every breaker

    def for_model(self, model: str) -> Breaker:
        """The breaker guarding calls for ``model`` (``*`` in ``per_model`` means every one;
        past ``MAX_BREAKERS`` names, which clients choose then, others share the provider's)."""
        own = model in self._per_model or "*" in self._per_model
        name = f"{self._provider}/{model}" if own else self._provider
        if name not in self._breakers and len(self._breakers) >= MAX_BREAKERS:
            name = self._provider
        breaker = self._breakers.get(name)
        if breaker is None:
            breaker = self._breakers[name] = Breaker(
                name,
                fail_max=self._fail_max,
                reset_timeout_s=self._reset_timeout_s,
                clock=self._clock,
            )
            for listener in self.listeners:
                breaker.add_listener(listener)
        return breaker

    def all(self) -> list[Breaker]:
        return list(self._breakers.values())
