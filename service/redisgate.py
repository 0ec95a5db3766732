"""The one connection to shared state (Redis), with its own timeouts, breaker and policy.

Every Redis call in the service goes through ``RedisGate.run``, which bounds it by
``SLUICE_REDIS_TIMEOUT_S`` (the connect timeout and an overall deadline; no client-side
retries), so a dead or slow Redis can never hang a request. Failures
count towards a small loop-clocked breaker: after ``fail_max`` consecutive failures it
opens for ``reset_s`` and calls fail at once without touching the network; then a single
probe is let through. A failed call raises ``RedisUnavailable``; what happens next is the
caller's ``SLUICE_REDIS_FAILURE`` policy: ``open`` falls back to in-process state,
``closed`` answers 503 (``unavailable_error``).

Each round trip costs this process far more CPU than the work Redis does for it, so writes
whose reply nobody waits on (a finished stream's checkpoint) are ``post``-ed: they travel
in front of the next script call (``evalsha``) in one pipeline, and ``flush`` (a finish
hook) sends any still queued and waits until they are stored. Script calls, posted
writes and ``pipeline`` calls (journal appends), the round trips every request makes, go
over ``RedisPipe`` (``redis_pipe.py``), a multiplexed connection that costs a fraction of
redis-py's; ``run`` hands other operations a redis-py client.

The client is made without I/O in ``create_app`` (``shared.py`` wires it in).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, RedisError
from redis.typing import EncodableT

from .errors import ServiceUnavailableError
from .redis_pipe import Command, RedisPipe
from .settings import SharedStateSettings

log = logging.getLogger(__name__)

T = TypeVar("T")
BreakerState = Literal["closed", "open", "half_open"]
KEY_PREFIX = "sluice:"
POOL_SIZE = 64


class RedisUnavailable(Exception):
    """Redis did not answer in time, failed, or the gate's breaker is open."""


@dataclass(frozen=True, slots=True)
class _Write:
    what: str  # for the log line if it is lost, e.g. "checkpoint of strm_..."
    command: Command


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
        self._pipe = RedisPipe.of(client, timeout_s)  # the hot path's connection (no I/O yet)
        self.failure = failure
        self.timeout_s = timeout_s
        self.fail_max = fail_max
        self.reset_s = reset_s
        self._clock = clock
        self._failures = 0
        self._opened_at: float | None = None
        self._probing = False
        # Counts the opens: a call let in before the last one ended is stale, and neither
        # closes the circuit nor ends the probe (as ``breaker.py``'s cycle).
        self._cycle = 0
        self._outbox: list[_Write] = []  # posted, not yet taken by a round trip
        self._sending: set[asyncio.Future[None]] = set()  # round trips carrying posts
        self._undoing: set[asyncio.Task[None]] = set()  # give-backs of cancelled calls
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
        # No socket_timeout: ``run``'s deadline bounds every call, and with one redis-py
        # sends through ``asyncio.wait_for``, which on Python 3.11 can drop a cancellation
        # (CPython gh-86296): a stream cancelled during a cache lookup would run on unpaid.
        pool = BlockingConnectionPool.from_url(
            settings.redis_url.reveal(),
            max_connections=POOL_SIZE,
            timeout=settings.redis_timeout_s,
            socket_timeout=None,
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
        cycle = self._cycle
        try:
            async with asyncio.timeout(self.timeout_s):
                result = await operation(self.client)
        except (RedisError, OSError, TimeoutError) as exc:
            self.errors_total += 1
            if probe or cycle == self._cycle:  # (a call from before the last open: stale)
                self._failed(probe, exc)
            raise RedisUnavailable(type(exc).__name__) from exc
        except BaseException:
            if probe:
                self._probing = False  # cancelled probe: let the next call probe instead
            raise
        if probe or cycle == self._cycle:
            self._succeeded()
        return result

    def post(self, what: str, *command: EncodableT) -> None:
        """Queue a write whose reply nobody waits on; see the module docstring."""
        self._outbox.append(_Write(what, command))

    async def evalsha(
        self, script: AsyncScript, keys: Sequence[str], args: Sequence[EncodableT]
    ) -> Any:
        """``script(keys, args)`` under the deadline, the posted writes in the same trip."""
        if not self._outbox and self._pipe is None:
            return await self.run(lambda r: script(keys=keys, args=args, client=r))
        return await self.run(lambda r: self._evalsha_after_posts(r, script, keys, args))

    async def evalsha_or_undo(
        self,
        script: AsyncScript,
        keys: Sequence[str],
        args: Sequence[EncodableT],
        undo: Callable[[Any], Awaitable[object]],
    ) -> Any:
        """``evalsha`` for a script that takes something (a stream slot, a reservation).

        If the caller is cancelled (its client left) while the script is in flight, the
        round trip still completes, and ``undo(reply)`` gives back what the script took:
        otherwise it would stay taken in Redis, for every replica, until it expired.
        (A timeout leaves it unknown whether the script ran: the caller releases what it
        may have taken at its next round trip, a slot or a hold, which is a no-op if not.)
        """
        call = asyncio.ensure_future(self.evalsha(script, keys, args))
        try:
            return await asyncio.shield(call)
        except asyncio.CancelledError:
            task = asyncio.create_task(_undo_when_done(call, undo))
            self._undoing.add(task)
            task.add_done_callback(self._undoing.discard)
            raise

    async def aclose(self) -> None:
        """Close the connections (a cleanup context's last step)."""
        if self._pipe is not None:
            await self._pipe.close()
        await self.client.aclose()

    async def undone(self) -> None:
        """Wait for the give-backs of cancelled calls still under way (before closing)."""
        if self._undoing:
            await asyncio.wait(self._undoing, timeout=2 * self.timeout_s)

    async def flush(self) -> None:
        """Send the posted writes no round trip has taken, and wait for those under way."""
        queued = self._outbox
        if queued:
            try:
                await self.run(lambda r: self._send(r, ()))
            except RedisUnavailable:
                if self._outbox is queued:  # the breaker refused the trip: nothing was sent
                    self._drop_outbox("breaker open")
        if self._sending:
            await asyncio.wait(self._sending)

    async def pipeline(
        self, commands: Sequence[Command], *, expected: Callable[[Exception], bool] | None = None
    ) -> list[Any]:
        """``commands`` in one round trip under the deadline, the posted writes in front;
        their replies. An error reply fails the call (and counts towards the breaker), as it
        fails a redis-py pipeline, unless ``expected`` says it is an answer, not a failure."""
        return await self.run(lambda r: self._pipeline(r, commands, expected))

    async def _pipeline(
        self,
        client: Redis,
        commands: Sequence[Command],
        expected: Callable[[Exception], bool] | None,
    ) -> list[Any]:
        replies = await self._send(client, commands)
        for reply in replies:
            if isinstance(reply, Exception) and not (expected is not None and expected(reply)):
                raise reply
        return replies

    async def _evalsha_after_posts(
        self, client: Redis, script: AsyncScript, keys: Sequence[str], args: Sequence[EncodableT]
    ) -> Any:
        [reply] = await self._send(client, [("EVALSHA", script.sha, len(keys), *keys, *args)])
        if isinstance(reply, NoScriptError):  # Redis restarted or was flushed: send it whole
            # (which loads it), over the same connection: redis-py's pool may still hold
            # one the restart closed, and the first request after it would fail.
            [reply] = await self._send(client, [("EVAL", script.script, len(keys), *keys, *args)])
        if isinstance(reply, Exception):
            raise reply
        return reply

    async def _send(self, client: Redis, calls: Sequence[Command]) -> list[Any]:
        """The posted writes, then ``calls``, in one pipeline; the replies to ``calls`` (an
        error reply as an exception in its place)."""
        writes, self._outbox = self._outbox, []
        sent = asyncio.get_running_loop().create_future()
        self._sending.add(sent)
        commands = [write.command for write in writes]
        commands += calls
        try:
            if self._pipe is not None:
                replies = await self._pipe.execute(commands)
            else:
                pipe = client.pipeline(transaction=False)
                for command in commands:
                    pipe.execute_command(*command)
                replies = await pipe.execute(raise_on_error=False)
        except BaseException as exc:
            _lost(writes, type(exc).__name__)
            raise
        finally:
            self._sending.discard(sent)
            sent.set_result(None)
        for write, reply in zip(writes, replies, strict=False):
            if isinstance(reply, Exception):
                _lost([write], type(reply).__name__)
        return replies[len(writes) :]

    def _drop_outbox(self, reason: str) -> None:
        writes, self._outbox = self._outbox, []
        _lost(writes, reason)

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
        self._failures += 1
        if probe or (self._opened_at is None and self._failures >= self.fail_max):
            if self._opened_at is None or probe:
                log.warning(
                    "redis unavailable (%s); breaker open for %.1f s",
                    type(exc).__name__,
                    self.reset_s,
                )
            self._opened_at = self._now()
            self._cycle += 1
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


async def _undo_when_done(
    call: asyncio.Future[Any], undo: Callable[[Any], Awaitable[object]]
) -> None:
    try:
        reply = await call
    except (RedisUnavailable, asyncio.CancelledError):
        return  # whether the script ran is unknown: its key's expiry bounds what it took
    try:
        await undo(reply)
    except RedisUnavailable as exc:
        log.warning("what a cancelled request took in redis was not given back: %s", exc)


def _lost(writes: Sequence[_Write], reason: str) -> None:
    for write in writes:
        log.warning("%s kept locally only: redis %s", write.what, reason)
