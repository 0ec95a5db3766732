"""Shared USD budgets: concurrent reservations over two replicas never overspend."""

from __future__ import annotations

import asyncio
import calendar
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from decimal import Decimal
from typing import Any

import aiohttp
import pytest
from redis.asyncio import Redis

from service.budgets import BudgetLimits
from service.errors import BudgetExceededError, ServiceUnavailableError
from service.ledger import SpendRow, utc_day
from service.redis_budgets import HOLD_TTL_S, REPLAY_CHUNK, RedisBudgets
from service.redisgate import RedisGate, RedisUnavailable
from service.settings import Settings
from tests.conftest import AUTH, GatewayFactory, chat_body, with_streams
from tests.servers import (
    RedisServer,
    cancelled_in_flight,
    fail_closed_fast,
    reserved_nanos,
    with_redis,
)
from tests.test_ledger import finished

LIMITS = BudgetLimits(user_daily=Decimal("1.00"))


@pytest.fixture
async def gates(redis_url: str) -> AsyncIterator[list[RedisGate]]:
    """Two replicas' connections to the same Redis."""
    made = [RedisGate.from_settings(with_redis(Settings(), redis_url).shared) for _ in range(2)]
    ready = [gate for gate in made if gate is not None]
    assert len(ready) == 2
    yield ready
    for gate in ready:
        await gate.aclose()


async def test_fifty_concurrent_reservations_over_two_replicas_commit_at_most_the_limit(
    gates: list[RedisGate],
) -> None:
    """50 reservations of $0.03 against a $1.00 budget, spread over A and B: exactly 33 fit."""
    replicas = [RedisBudgets(gate, LIMITS) for gate in gates]

    async def reserve(n: int) -> bool:
        try:
            await replicas[n % 2].reserve_async("alice", "acme", Decimal("0.03"))
        except BudgetExceededError:
            return False
        return True

    results = await asyncio.gather(*(reserve(n) for n in range(50)))
    assert results.count(True) == 33
    assert results.count(False) == 17


async def test_the_shared_spend_of_many_cheap_requests_is_the_ledger_s_sum(
    gates: list[RedisGate],
) -> None:
    """Costs of a few micro-dollars each (short gpt-4o-mini requests) add up in Redis to
    exactly the sum the ledger has: whole nano-dollars each (rounded up to micro-dollars,
    thirty of them counted 6% high, and the user was refused early)."""
    a, b = (RedisBudgets(gate, LIMITS) for gate in gates)
    costs = [Decimal("0.0000027"), Decimal("0.00000645"), Decimal("0.0000153")] * 10
    for cost in costs:
        await a.settle_async(await a.reserve_async("alice", "acme", Decimal("0.01")), cost)
    await b.reserve_async("alice", "acme", Decimal("0.01"))  # reads every replica's spend
    spent = b.status("alice", "acme")["user"]["daily"]["spent_usd"]
    assert Decimal(str(spent)) == sum(costs)


async def test_a_replica_reports_and_weighs_every_replica_s_spend_and_holds(
    gates: list[RedisGate],
) -> None:
    """B's /v1/usage report showed its own view (none of A's spend, nothing reserved), and
    its budget pressure counted its own holds only: with A holding 85 % of the budget, B
    served the dearer model that A would have moved to the cheaper one."""
    a, b = (RedisBudgets(gate, LIMITS) for gate in gates)
    await a.settle_async(await a.reserve_async("alice", "acme", Decimal("0.25")), Decimal("0.2"))
    await a.reserve_async("alice", "acme", Decimal("0.65"))  # held, on A
    report = (await b.shared_status("alice", "acme"))["user"]["daily"]
    assert (report["spent_usd"], report["reserved_usd"]) == (0.2, 0.65)
    assert b.status("alice", "acme")["user"]["daily"]["reserved_usd"] == 0  # (its own view)
    mine = await b.reserve_async("alice", "acme", Decimal("0.01"))
    assert b.pressure("alice", "acme", excluding=mine) == pytest.approx(0.85)


async def test_settling_below_the_reservation_frees_room_on_every_replica(
    gates: list[RedisGate],
) -> None:
    """A reserves $0.90 and settles at $0.10; B can then reserve $0.85 but not $0.95."""
    a, b = (RedisBudgets(gate, LIMITS) for gate in gates)
    hold = await a.reserve_async("alice", "acme", Decimal("0.90"))
    with pytest.raises(BudgetExceededError) as refused:
        await b.reserve_async("alice", "acme", Decimal("0.20"))
    assert refused.value.headers["Retry-After"]
    assert refused.value.message.startswith(  # what is left, as Redis counts it
        "This request may cost up to $0.2 (its prompt and output ceiling, priced at the "
        "dearest model it may reach), more than the $0.1 left of the user daily budget"
    )
    await a.settle_async(hold, Decimal("0.10"))
    second = await b.reserve_async("alice", "acme", Decimal("0.85"))
    assert second.warning is None  # 10 % was committed before it
    third = await a.reserve_async("alice", "acme", Decimal("0.04"))
    assert third.warning == "user daily budget 95% used (limit $1.00)"  # B's hold weighs
    with pytest.raises(BudgetExceededError):
        await a.reserve_async("alice", "acme", Decimal("0.02"))
    await a.reserve_async("bob", "acme", Decimal("0.95"))  # another user's budget is apart


async def test_a_replica_s_view_holds_every_replica_s_spend_not_their_holds(
    gates: list[RedisGate], redis_url: str
) -> None:
    """B's view of the spend is Redis's (not A's open hold counted as spent), so after Redis
    restarts empty B seeds it with the real spend and A's request still fits."""
    budgets = BudgetLimits(user_daily=Decimal("10.00"))
    a, b = (RedisBudgets(gate, budgets) for gate in gates)
    held = await a.reserve_async("alice", "acme", Decimal("5.00"))
    mine = await b.reserve_async("alice", "acme", Decimal("1.00"))
    await b.settle_async(mine, Decimal("1.00"))
    await a.settle_async(held, Decimal("0.10"))
    # Spent as B last saw it from Redis (nothing), plus its own settlement; not A's $5 hold.
    assert b.status("alice", "acme")["user"]["daily"]["spent_usd"] == 1.00
    redis = Redis.from_url(redis_url)
    try:
        await redis.flushall()  # an empty restart
    finally:
        await redis.aclose()
    await b.reserve_async("alice", "acme", Decimal("0.01"))  # seeds the spend it knows
    await a.reserve_async("alice", "acme", Decimal("4.50"))  # about 1.1 + 4.5 of 10


async def test_a_budget_is_not_overspent_by_requests_spread_over_two_gateways(
    gateway: GatewayFactory, settings: Settings, redis_url: str
) -> None:
    """50 concurrent streams over A and B against a $0.006 daily budget: the worst-case
    reservations admitted add up to at most the budget, and one more would not fit."""
    shared = with_streams(with_redis(settings, redis_url), disconnect_grace_s=0.0)
    shared = replace(shared, money=replace(shared.money, user_daily_usd=0.006))
    a, b = await gateway(shared), await gateway(shared)
    body = chat_body("long [sim chunks=1000 delay_ms=20]", max_tokens=1000)

    async def start(n: int) -> aiohttp.ClientResponse:
        return await (a, b)[n % 2].post("/v1/chat/completions", json=body, headers=AUTH)

    responses = await asyncio.gather(*(start(n) for n in range(50)))
    admitted = [r for r in responses if r.status == 200]
    refused = [r for r in responses if r.status == 429]
    assert len(admitted) + len(refused) == 50
    assert admitted
    assert refused
    for response in refused:
        assert (await response.json())["error"]["code"] == "budget_exceeded"

    reserved = await reserved_nanos(redis_url)
    worst = reserved // len(admitted)  # every request reserved the same worst case
    assert reserved == worst * len(admitted)
    assert reserved <= 6_000_000 < reserved + worst  # nano-dollars: full, and never over
    for response in admitted:
        response.close()


async def test_requests_without_a_budget_limit_never_touch_redis(
    gates: list[RedisGate], redis_url: str
) -> None:
    """No limit applies (none configured, none for the key): reserve and settle stay in
    this replica's view, with no budget state in Redis; a key's own limit goes shared."""
    a, b = (RedisBudgets(gate, BudgetLimits()) for gate in gates)
    hold = await a.reserve_async("alice", "acme", Decimal("0.50"))
    await a.settle_async(hold, Decimal("0.20"))
    status = a.status("alice", "acme")
    assert status["user"]["daily"]["spent_usd"] == 0.2  # this replica still records it
    assert status["user"]["daily"]["reserved_usd"] == 0.0
    redis = Redis.from_url(redis_url)
    try:
        assert await redis.keys("sluice:budget-nano:*") == []
        own = BudgetLimits(user_daily=Decimal("1.00"))  # a per-key override: exact again
        first = await a.reserve_async("bob", "acme", Decimal("0.60"), own)
        with pytest.raises(BudgetExceededError):
            await b.reserve_async("bob", "acme", Decimal("0.60"), own)
        await a.settle_async(first, Decimal("0.60"))
        assert await redis.keys("sluice:budget-nano:user:bob:*")
        assert not await redis.keys("sluice:budget-nano:user:alice:*")
    finally:
        await redis.aclose()


async def test_an_unlimited_request_is_admitted_while_redis_is_down_even_fail_closed(
    redis_url: str, redis_server: RedisServer
) -> None:
    """Without a limit there is nothing to enforce, so a fail-closed replica does not 503."""
    gate = RedisGate.from_settings(
        with_redis(Settings(), redis_url, redis_failure="closed", redis_timeout_s=0.25).shared
    )
    assert gate is not None
    budgets = RedisBudgets(gate, BudgetLimits())
    redis_server.stop()
    try:
        hold = await budgets.reserve_async("alice", "acme", Decimal("0.10"))
        await budgets.settle_async(hold, Decimal("0.05"))
        with pytest.raises(ServiceUnavailableError):  # a limit applies: fail-closed holds
            await budgets.reserve_async(
                "alice", "acme", Decimal("0.10"), BudgetLimits(user_daily=Decimal("1"))
            )
    finally:
        redis_server.start()
        await gate.aclose()
    assert gate.errors_total == 1


async def test_spend_in_the_ledger_counts_when_redis_starts_empty(
    gates: list[RedisGate], redis_server: RedisServer
) -> None:
    """$0.90 already spent today (the ledger, loaded at start) against $1.00: Redis knew
    nothing of it, at first and again after a flush, and still $0.15 more is refused."""
    budgets = RedisBudgets(gates[0], LIMITS)
    budgets.load([SpendRow("alice", "acme", utc_day(time.time()), 0.90)])
    with pytest.raises(BudgetExceededError):
        await budgets.reserve_async("alice", "acme", Decimal("0.15"))
    hold = await budgets.reserve_async("alice", "acme", Decimal("0.05"))
    await budgets.settle_async(hold, Decimal("0.05"))
    redis_server.flush()  # restarted empty, or the key evicted
    with pytest.raises(BudgetExceededError):
        await budgets.reserve_async("alice", "acme", Decimal("0.10"))


async def test_a_reservation_whose_caller_is_cancelled_in_flight_is_given_back(
    gates: list[RedisGate], redis_server: RedisServer, redis_url: str
) -> None:
    """The client leaves while the reservation script is on its way: Redis still runs it,
    and the reservation is then given back instead of holding the budget all day."""
    budgets = RedisBudgets(gates[0], LIMITS)
    await cancelled_in_flight(redis_server, budgets.reserve_async("alice", "acme", Decimal("0.5")))
    await gates[0].undone()
    assert await reserved_nanos(redis_url, "alice") == 0


NOON = calendar.timegm((2026, 11, 27, 12, 0, 0))  # an hour from the day's end either way


class Clock:
    def __init__(self) -> None:
        self.now = float(NOON)

    def __call__(self) -> float:
        return self.now


async def _budget_state(redis_url: str) -> tuple[int, int]:
    """alice's budget for the clock's day in Redis: (reserved, spent) nano-dollars."""
    redis = Redis.from_url(redis_url)
    try:
        state = await redis.hmget(
            "sluice:budget-nano:user:alice:day:2026-11-27", "reserved", "spent"
        )
    finally:
        await redis.aclose()
    return int(state[0] or 0), int(state[1] or 0)


async def test_a_hold_redis_took_after_the_deadline_is_released(
    gateway: GatewayFactory, settings: Settings, redis_url: str, redis_server: RedisServer
) -> None:
    """Redis stalls past the deadline, then runs the reservation anyway: the 503'd
    request's hold is released by the next reservation, not kept for the hour."""
    shared = fail_closed_fast(settings, redis_url)
    limits = replace(shared.limits, max_streams_per_user=0)  # the budget's is the first call
    money = replace(shared.money, user_daily_usd=5.0)
    client = await gateway(replace(shared, limits=limits, money=money))
    body = chat_body("hold [sim chunks=1]", stream=False)
    warm = await client.post("/v1/chat/completions", json=body, headers=AUTH)
    assert warm.status == 200  # the scripts are loaded: the stalled one runs when it wakes
    redis_server.pause()
    try:
        stalled = await client.post("/v1/chat/completions", json=body, headers=AUTH)
        assert stalled.status == 503
    finally:
        redis_server.resume()
    again = await client.post("/v1/chat/completions", json=body, headers=AUTH)
    assert again.status == 200
    await again.read()
    await finished(client, again)
    assert await reserved_nanos(redis_url) == 0


async def test_a_hold_nobody_settles_is_released_once_it_expires(
    gates: list[RedisGate], redis_url: str
) -> None:
    """Replica A reserves and dies (or loses the reply): the budget stays held for B until
    the hold expires, then B's next reservation releases it."""
    clock = Clock()
    a, b = (RedisBudgets(gate, LIMITS, clock=clock, hold_clock=clock) for gate in gates)
    await a.reserve_async("alice", "acme", Decimal("0.90"))  # never settled
    with pytest.raises(BudgetExceededError):
        await b.reserve_async("alice", "acme", Decimal("0.20"))
    clock.now += HOLD_TTL_S - 1
    with pytest.raises(BudgetExceededError):
        await b.reserve_async("alice", "acme", Decimal("0.20"))
    clock.now += 2
    await b.reserve_async("alice", "acme", Decimal("0.20"))
    assert await _budget_state(redis_url) == (200_000_000, 0)


async def test_a_late_settle_releases_nothing_twice(gates: list[RedisGate], redis_url: str) -> None:
    """A hold released on expiry and then settled after all: the spend counts, the
    reservation is not taken off a second time (B's own hold stays whole)."""
    clock = Clock()
    a, b = (RedisBudgets(gate, LIMITS, clock=clock, hold_clock=clock) for gate in gates)
    late = await a.reserve_async("alice", "acme", Decimal("0.50"))
    clock.now += HOLD_TTL_S + 1
    current = await b.reserve_async("alice", "acme", Decimal("0.10"))  # releases A's hold
    await a.settle_async(late, Decimal("0.30"))
    assert await _budget_state(redis_url) == (100_000_000, 300_000_000)
    await b.settle_async(current, Decimal("0.05"))
    assert await _budget_state(redis_url) == (0, 350_000_000)


async def test_each_request_settles_its_own_hold(gates: list[RedisGate], redis_url: str) -> None:
    """Two equal reservations 50 minutes apart: the first to finish releases its own hold
    (not the later one's), so the request still running keeps the budget held until its
    own hold expires."""
    clock = Clock()
    budgets = RedisBudgets(gates[0], LIMITS, clock=clock, hold_clock=clock)
    first = await budgets.reserve_async("alice", "acme", Decimal("0.40"))
    clock.now += 50 * 60
    second = await budgets.reserve_async("alice", "acme", Decimal("0.40"))
    assert first.shared_id != second.shared_id
    await budgets.settle_async(first, Decimal("0.10"))
    clock.now += 15 * 60  # past the first hold's expiry, well within the second's
    with pytest.raises(BudgetExceededError):
        await budgets.reserve_async("alice", "acme", Decimal("0.55"))
    await budgets.settle_async(second, Decimal("0.10"))
    assert await _budget_state(redis_url) == (0, 200_000_000)


async def test_a_settle_does_not_recreate_a_budget_redis_lost(
    gates: list[RedisGate], redis_server: RedisServer, redis_url: str
) -> None:
    """Redis is flushed while a request runs: its settle leaves the budget missing, so the
    next reservation seeds it from the ledger's spend instead of starting from this one."""
    clock = Clock()
    budgets = RedisBudgets(gates[0], LIMITS, clock=clock, hold_clock=clock)
    budgets.load([SpendRow("alice", "acme", "2026-11-27", 0.90)])
    hold = await budgets.reserve_async("alice", "acme", Decimal("0.05"))
    redis_server.flush()
    await budgets.settle_async(hold, Decimal("0.01"))
    assert await _budget_state(redis_url) == (0, 0)
    with pytest.raises(BudgetExceededError):
        await budgets.reserve_async("alice", "acme", Decimal("0.50"))


async def _broken_gate(redis_url: str, now: list[float]) -> RedisGate:
    """A fail-open gate on a clock the test moves, whose breaker opens at the first failure."""
    client = Redis.from_url(redis_url)
    return RedisGate(
        client, failure="open", timeout_s=1.0, fail_max=1, reset_s=5, clock=lambda: now[0]
    )


async def _trip(gate: RedisGate) -> None:
    with pytest.raises(RedisUnavailable):
        await gate.run(lambda r: r.execute_command("NO-SUCH-COMMAND"))


async def _missed_settlement(redis_url: str) -> tuple[RedisGate, RedisBudgets, list[float]]:
    """A $0.40 hold settled at $0.10 while the breaker was open: Redis has not had that."""
    now, clock = [0.0], Clock()
    gate = await _broken_gate(redis_url, now)
    budgets = RedisBudgets(gate, LIMITS, clock=clock, hold_clock=clock)
    hold = await budgets.reserve_async("alice", "acme", Decimal("0.40"))
    await _trip(gate)
    await budgets.settle_async(hold, Decimal("0.10"))
    return gate, budgets, now


async def test_a_settlement_redis_missed_is_replayed_once_it_answers(redis_url: str) -> None:
    """The settle finds the breaker open: nothing reaches Redis then, and the hold stays.
    The next reservation that reaches Redis sends it first: hold released, spend counted."""
    gate, budgets, now = await _missed_settlement(redis_url)
    assert await _budget_state(redis_url) == (400_000_000, 0)
    now[0] += 6  # the breaker lets a probe through
    await budgets.reserve_async("alice", "acme", Decimal("0.05"))
    assert await _budget_state(redis_url) == (50_000_000, 100_000_000)
    await gate.aclose()


async def test_spend_admitted_on_local_state_reaches_redis_later(redis_url: str) -> None:
    """Fail-open: a request admitted while Redis was away is settled locally, and its
    spend is sent to Redis once it answers, so other replicas count it too."""
    now, clock = [0.0], Clock()
    gate = await _broken_gate(redis_url, now)
    budgets = RedisBudgets(gate, LIMITS, clock=clock, hold_clock=clock)
    first = await budgets.reserve_async("alice", "acme", Decimal("0.10"))
    await budgets.settle_async(first, Decimal("0.10"))  # the budget exists in Redis
    await _trip(gate)
    local = await budgets.reserve_async("alice", "acme", Decimal("0.50"))  # fail-open
    await budgets.settle_async(local, Decimal("0.30"))
    assert await _budget_state(redis_url) == (0, 100_000_000)
    now[0] += 6
    await budgets.reserve_async("alice", "acme", Decimal("0.05"))
    assert await _budget_state(redis_url) == (50_000_000, 400_000_000)
    await gate.aclose()


async def test_holds_expire_by_redis_clock_not_a_replicas(
    gates: list[RedisGate], redis_url: str
) -> None:
    """A replica whose clock runs two hours ahead still gives its hold an hour from now by
    Redis's own clock, so it cannot release other replicas' live holds early."""
    ahead = RedisBudgets(gates[0], LIMITS, clock=lambda: time.time() + 7200)
    hold = await ahead.reserve_async("alice", "acme", Decimal("0.10"))
    assert hold.shared_id is not None
    redis = Redis.from_url(redis_url)
    try:
        day = next(key[3] for key in hold.keys if key[:3] == ("user", "alice", "day"))
        holds_key = f"sluice:budget-nano:user:alice:day:{day}:holds"
        expiry_ms = await redis.zscore(holds_key, hold.shared_id)
        seconds, micros_ = await redis.time()
    finally:
        await redis.aclose()
    assert expiry_ms is not None
    redis_now_ms = seconds * 1000 + micros_ // 1000
    assert abs(expiry_ms - (redis_now_ms + HOLD_TTL_S * 1000)) < 60_000


async def test_missed_settlements_are_sent_at_shutdown(redis_url: str) -> None:
    """No reservation came after Redis returned: shutdown sends what it missed."""
    gate, budgets, now = await _missed_settlement(redis_url)
    now[0] += 6
    await budgets.flush()
    assert await _budget_state(redis_url) == (0, 100_000_000)
    await gate.aclose()


async def test_concurrent_reservations_replay_a_missed_settlement_once(redis_url: str) -> None:
    """Two reservations at once after Redis returns: one sends the missed settlement, the
    other finds nothing left to send; its spend counts once."""
    gate, budgets, now = await _missed_settlement(redis_url)
    now[0] += 6
    await gate.run(lambda r: r.ping())  # the breaker's probe: closed again
    await asyncio.gather(
        *(budgets.reserve_async("alice", "acme", Decimal("0.05")) for _ in range(2))
    )
    assert await _budget_state(redis_url) == (100_000_000, 100_000_000)
    await gate.aclose()


async def test_a_backlog_of_missed_settlements_drains_a_chunk_a_reservation(
    redis_url: str,
) -> None:
    """Hundreds of settlements missed: each reservation sends the oldest chunk first (one
    trip of thousands outran the deadline, ran anyway, and was sent again and again,
    counting the spend over and over); each settlement counts once."""
    now, clock = [0.0], Clock()
    gate = await _broken_gate(redis_url, now)
    budgets = RedisBudgets(gate, LIMITS, clock=clock, hold_clock=clock)
    holds = [
        await budgets.reserve_async("alice", "acme", Decimal("0.001"))
        for _ in range(2 * REPLAY_CHUNK + 1)
    ]
    await _trip(gate)
    for hold in holds:
        await budgets.settle_async(hold, Decimal("0.001"))
    now[0] += 6
    for sent in (REPLAY_CHUNK, 2 * REPLAY_CHUNK, 2 * REPLAY_CHUNK + 1):
        await budgets.reserve_async("alice", "acme", Decimal("0"))
        reserved, spent = await _budget_state(redis_url)
        assert spent == sent * 1_000_000  # $0.001 each, in nano-dollars
    assert reserved == 0  # every hold released
    await gate.aclose()


async def test_a_replay_its_caller_left_runs_to_its_end_and_counts_once(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client whose reservation was sending the missed settlements leaves while Redis
    runs them: the replay goes on to its end (shielded), so they count once; neither
    dropped, nor kept and sent again (as a cut-off replay would be, counting twice)."""
    gate, budgets, now = await _missed_settlement(redis_url)
    now[0] += 6
    run, sending, sent, release = gate.run, asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def held(operation: Any) -> Any:
        sending.set()
        await release.wait()
        try:
            return await run(operation)
        finally:
            sent.set()

    monkeypatch.setattr(gate, "run", held)
    reserving = asyncio.ensure_future(budgets.reserve_async("alice", "acme", Decimal("0.05")))
    await sending.wait()
    reserving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reserving
    release.set()
    await sent.wait()
    monkeypatch.undo()
    await budgets.flush()
    assert await _budget_state(redis_url) == (0, 100_000_000)
    await gate.aclose()
