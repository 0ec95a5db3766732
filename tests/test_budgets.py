"""Budgets: reserve the worst case, settle the real cost, never overspend; survive restarts."""

from __future__ import annotations

import asyncio
import calendar
from dataclasses import replace
from decimal import Decimal
from pathlib import Path

import orjson
import pytest

from service import registry as registry_module
from service import tokens
from service.admission import Gate
from service.appkeys import GATE, STREAMS
from service.budgets import BudgetLimits, Budgets
from service.errors import BudgetExceededError
from service.ledger import SpendRow
from service.pricing import PriceTable, builtin_prices
from service.redis_budgets import RedisBudgets, reserve_budget, settle_budget
from service.redisgate import RedisGate
from service.request import ChatRequest
from service.settings import LimitSettings, MoneySettings, Settings
from service.simulator import SimStats
from tests.conftest import AUTH, GatewayFactory, chat_body
from tests.resilient import with_resilience
from tests.servers import with_redis
from tests.test_ledger import Client, finished

NOON = float(calendar.timegm((2026, 11, 22, 12, 0, 0)))


def budgets(now: list[float], **limits: str) -> Budgets:
    values = {name: Decimal(value) for name, value in limits.items()}
    return Budgets(BudgetLimits(**values), soft_fraction=0.8, clock=lambda: now[0])


def test_reserve_settle_and_refuse() -> None:
    """Reservations count against the limit until settled with the real (smaller) cost; the
    warning weighs what was committed before the request (its own worst case is not spent);
    a refusal says whether the budget is used up or the request could cost more than is left."""
    now = [NOON]
    book = budgets(now, user_daily="1.00")
    first = book.reserve("alice", "acme", Decimal("0.60"))
    assert first.warning is None  # nothing was committed before it
    with pytest.raises(BudgetExceededError) as caught:
        book.reserve("alice", "acme", Decimal("0.50"))
    assert caught.value.code == "budget_exceeded"
    assert caught.value.status == 429
    assert caught.value.headers["Retry-After"] == str(12 * 3600 + 1)  # until UTC midnight
    assert caught.value.message == (
        "This request may cost up to $0.5 (its prompt and output ceiling, priced at the "
        "dearest model it may reach), more than the $0.4 left of the user daily budget of $1.00."
    )
    book.settle(first, Decimal("0.10"))
    second = book.reserve("alice", "acme", Decimal("0.50"))
    third = book.reserve("alice", "acme", Decimal("0.25"))
    assert (second.warning, third.warning) == (None, None)  # 10 %, 60 % before them
    fourth = book.reserve("alice", "acme", Decimal("0.10"))
    assert fourth.warning == "user daily budget 85% used (limit $1.00)"
    status = book.status("alice", "acme")["user"]["daily"]
    assert status == {
        "limit_usd": 1.0,
        "spent_usd": 0.1,
        "reserved_usd": 0.85,
        "remaining_usd": 0.05,
    }
    for hold, cost in ((second, "0.50"), (third, "0.25"), (fourth, "0.15")):
        book.settle(hold, Decimal(cost))
    with pytest.raises(BudgetExceededError) as spent:
        book.reserve("alice", "acme", Decimal("0.000001"))
    assert spent.value.message == (
        "The user daily budget of $1.00 is used up (spent, or held by requests in flight)."
    )
    book.reserve("bob", "acme", Decimal("1.00"))  # another user has their own budget


def test_days_roll_over_but_months_accumulate() -> None:
    """A new UTC day frees the daily budget; the monthly total still counts yesterday."""
    now = [NOON]
    book = budgets(now, user_daily="1", user_monthly="1.5", tenant_monthly="100")
    book.settle(book.reserve("alice", "acme", Decimal("0.9")), Decimal("0.9"))
    with pytest.raises(BudgetExceededError, match="daily"):
        book.reserve("alice", "acme", Decimal("0.2"))
    now[0] += 86_400
    book.settle(book.reserve("alice", "acme", Decimal("0.5")), Decimal("0.5"))
    with pytest.raises(BudgetExceededError, match="monthly"):
        book.reserve("alice", "acme", Decimal("0.2"))
    assert book.pressure("alice", "acme") == pytest.approx(1.4 / 1.5)


def test_a_request_that_arrived_before_midnight_counts_against_that_day_after_it() -> None:
    """The first reservation of a new day dropped the old day's and month's totals, so a
    request that arrived before midnight (its spend dated then) found them empty and
    overspent them. They are kept a day more; older ones still go."""
    last = float(calendar.timegm((2026, 11, 30, 23, 59, 59)))
    now = [last]
    book = budgets(now, user_daily="1", user_monthly="1")
    book.settle(book.reserve("alice", "acme", Decimal("0.9"), at=last), Decimal("0.9"))
    now[0] = last + 2  # December now; the request arrived in November's last second
    with pytest.raises(BudgetExceededError, match="monthly"):
        book.reserve("alice", "acme", Decimal("0.2"), at=last)
    book.reserve("alice", "acme", Decimal("0.2"))  # December's own budget is untouched
    now[0] = last + 2 * 86_400  # two days on: November's day is forgotten
    book.reserve("alice", "acme", Decimal("0.2"))
    assert ("user", "alice", "day", "2026-11-30") not in book._spent
    assert ("user", "alice", "month", "2026-11") not in book._spent


def test_key_overrides_and_tenant_limits() -> None:
    """A key's own user limits replace the defaults; the tenant limit binds all its users."""
    now = [NOON]
    book = budgets(now, user_daily="1", tenant_daily="1.5")
    rich = BudgetLimits(user_daily=Decimal("10"))
    book.reserve("alice", "acme", Decimal("1.2"), rich)
    with pytest.raises(BudgetExceededError, match="tenant daily"):
        book.reserve("bob", "acme", Decimal("0.5"))


def test_loaded_spend_counts_only_this_day_and_month() -> None:
    """Ledger totals from earlier this month count monthly; only today's count daily."""
    now = [NOON]
    book = budgets(now, user_daily="1", user_monthly="2")
    book.load(
        [
            SpendRow("alice", "acme", "2026-11-22", 0.75),
            SpendRow("alice", "acme", "2026-11-03", 1.0),
            SpendRow("alice", "acme", "2026-10-31", 5.0),
        ]
    )
    report = book.status("alice", "acme")["user"]
    assert report["daily"]["spent_usd"] == 0.75
    assert report["monthly"]["spent_usd"] == 1.75
    with pytest.raises(BudgetExceededError, match="monthly"):  # (and daily: see below)
        book.reserve("alice", "acme", Decimal("0.3"))


@pytest.mark.parametrize("shared", [False, True], ids=["in-process", "redis"])
async def test_a_request_over_a_day_and_a_month_budget_is_told_of_the_month(
    shared: bool, redis_url: str
) -> None:
    """Refused by both, it is the month's end that Retry-After names: at midnight the
    daily budget frees up, and the monthly one still refuses."""
    now = [NOON]
    limits = BudgetLimits(user_daily=Decimal("1"), user_monthly=Decimal("1"))
    book = Budgets(limits, soft_fraction=0.8, clock=lambda: now[0])
    gate = RedisGate.from_settings(with_redis(Settings(), redis_url).shared) if shared else None
    if gate is not None:
        book = RedisBudgets(gate, limits, clock=lambda: now[0])
    try:
        hold = await reserve_budget(book, "carol", "acme", Decimal("1"))
        await settle_budget(book, hold, Decimal("1"))
        with pytest.raises(BudgetExceededError, match="monthly") as refused:
            await reserve_budget(book, "carol", "acme", Decimal("0.1"))
    finally:
        if gate is not None:
            await gate.aclose()
    month_end = calendar.timegm((2026, 12, 1, 0, 0, 0))
    assert refused.value.headers["Retry-After"] == str(int(month_end - NOON) + 1)


def with_money(settings: Settings, **changes: object) -> Settings:
    return replace(settings, money=replace(settings.money, **changes))


async def test_fifty_concurrent_requests_cannot_overspend(
    gateway: GatewayFactory, settings: Settings
) -> None:
    """A budget that fits exactly 7 requests: of 50 fired at once, exactly 7 succeed."""
    body = chat_body("spend [sim chunks=5]", stream=False, max_tokens=5)
    probe = await gateway()
    cost = probe.app[GATE].prices.cost("gpt-4o-mini", tokens.count_chat("gpt-4o-mini", body), 5)
    limit = cost * 7
    client = await gateway(with_money(settings, user_daily_usd=float(limit)))
    assert client.app[GATE].budgets.limits.user_daily == limit

    async def spend() -> int:
        response = await client.post("/v1/chat/completions", json=body, headers=AUTH)
        payload = orjson.loads(await response.read())
        if response.status == 429:
            assert payload["error"]["code"] == "budget_exceeded"
            # Not before the day ends: the SDKs must not wait for it (Node would, for hours).
            assert response.headers["x-should-retry"] == "false"
        else:
            await finished(client, response)
        return response.status

    statuses = await asyncio.gather(*(spend() for _ in range(50)))
    assert statuses.count(200) == 7
    assert statuses.count(429) == 43
    gate = client.app[GATE]
    rows = await gate.ledger.entries()
    billed = [r for r in rows if r.status == "completed"]
    assert len(rows) == 50
    assert len(billed) == 7
    assert sum(Decimal(str(r.cost_usd)) for r in rows) <= limit


async def test_a_hold_just_ended_is_settled_before_the_budget_refuses(
    gateway: GatewayFactory, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ended streams are settled in batches (``registry.py``); a request their unsettled
    holds would refuse has them settled first and is asked again. The budget fits one
    worst case and what a request really costs: back-to-back requests all pass."""
    monkeypatch.setattr(registry_module, "RETIRE_BATCH_S", 3600.0)  # only when asked
    body = chat_body("hi [sim chunks=5]", stream=False, max_tokens=1000)
    prices = PriceTable(builtin_prices())
    prompt = tokens.count_chat("gpt-4o-mini", body)
    worst = prices.cost("gpt-4o-mini", prompt, 1000)
    assert prices.cost("gpt-4o-mini", prompt, 10) < worst / 4  # what one really costs
    client = await gateway(with_money(settings, user_daily_usd=float(worst * 3 / 2)))
    for _ in range(3):
        response = await client.post("/v1/chat/completions", json=body, headers=AUTH)
        assert response.status == 200, await response.text()
    await client.app[STREAMS].retire_now()
    rows = await client.app[GATE].ledger.entries()
    assert [row.status for row in rows] == ["completed"] * 3


async def test_a_hold_just_ended_is_settled_before_it_is_warned_of(
    gateway: GatewayFactory, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unsettled worst case (``registry.py`` settles in batches) is no spending to warn
    of: back to back, requests that each cost a sliver of the budget get no warning."""
    monkeypatch.setattr(registry_module, "RETIRE_BATCH_S", 3600.0)  # only when asked
    body = chat_body("hi [sim chunks=5]", stream=False, max_tokens=1000)
    worst = PriceTable(builtin_prices()).cost(
        "gpt-4o-mini", tokens.count_chat("gpt-4o-mini", body), 1000
    )
    custom = with_money(settings, user_daily_usd=float(worst * 5 / 2), soft_fraction=0.3)
    client = await gateway(custom)
    for _ in range(3):
        response = await client.post("/v1/chat/completions", json=body, headers=AUTH)
        assert response.status == 200
        assert "X-Sluice-Budget-Warning" not in response.headers


async def test_soft_limit_warns_in_a_header(gateway: GatewayFactory, settings: Settings) -> None:
    """Past the soft fraction of a budget the response says so; below it, it does not."""
    body = chat_body("warn [sim chunks=5]", stream=False, max_tokens=5)
    cost = float(
        (await gateway())
        .app[GATE]
        .prices.cost("gpt-4o-mini", tokens.count_chat("gpt-4o-mini", body), 5)
    )
    client = await gateway(with_money(settings, user_daily_usd=cost * 2.2, soft_fraction=0.4))
    first = await client.post("/v1/chat/completions", json=body, headers=AUTH)
    assert first.status == 200
    assert "X-Sluice-Budget-Warning" not in first.headers  # its own worst case is not spent
    second = await client.post("/v1/chat/completions", json=body, headers=AUTH)
    assert second.status == 200
    assert second.headers["X-Sluice-Budget-Warning"].startswith("user daily budget 45% used")


async def test_spend_survives_a_restart(
    gateway: GatewayFactory, settings: Settings, tmp_path: Path
) -> None:
    """Budgets are rebuilt from the SQLite ledger at start: a restart does not reset spend."""
    body = chat_body("persist [sim chunks=5]", stream=False, max_tokens=5)
    custom = with_money(settings, data_dir=tmp_path, user_daily_usd=1.0)
    first = await gateway(custom)
    response = await first.post("/v1/chat/completions", json=body, headers=AUTH)
    assert response.status == 200
    await finished(first, response)
    spent = first.app[GATE].budgets.status("dev", "dev")["user"]["daily"]["spent_usd"]
    assert spent > 0
    await first.close()
    second = await gateway(custom)
    report = second.app[GATE].budgets.status("dev", "dev")["user"]["daily"]
    assert report["spent_usd"] == pytest.approx(spent)
    assert report["remaining_usd"] == pytest.approx(1.0 - spent)


async def test_a_stream_ended_as_the_gateway_stops_is_settled_before_it_stops(
    gateway: GatewayFactory, settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ended streams wait for their batch to be settled (``registry.py``); shutdown settles
    them all: the row is written, and the spend is there after a restart."""
    monkeypatch.setattr(registry_module, "RETIRE_BATCH_S", 3600.0)
    body = chat_body("persist [sim chunks=5]", stream=False, max_tokens=5)
    custom = with_money(settings, data_dir=tmp_path, user_daily_usd=1.0)
    first = await gateway(custom)
    response = await first.post("/v1/chat/completions", json=body, headers=AUTH)
    assert response.status == 200
    await response.read()
    assert await first.app[GATE].ledger.entries() == []  # not settled yet
    await first.close()
    second = await gateway(custom)
    (row,) = await second.app[GATE].ledger.entries()
    assert (row.status, row.completion_tokens) == ("completed", 5)
    assert second.app[GATE].budgets.status("dev", "dev")["user"]["daily"]["spent_usd"] > 0


async def test_a_request_s_spend_is_dated_when_it_arrived_as_its_ledger_row_is(
    gateway: GatewayFactory, settings: Settings, tmp_path: Path
) -> None:
    """Arrived before a month's last midnight, reserved after it: its spend is the old day's
    and month's, as its ledger row is, so a restart (which rebuilds the totals from the rows)
    counts it where the running gateway did."""
    arrived = float(calendar.timegm((2026, 1, 31, 23, 59, 59))) + 0.9
    client = await gateway(with_money(settings, data_dir=tmp_path, user_daily_usd=1.0))
    gate = client.app[GATE]
    gate.clock = lambda: arrived
    gate.budgets._clock = lambda: arrived + 0.2  # admission ended after midnight
    body = chat_body("late [sim chunks=3]", stream=False, max_tokens=5)
    response = await client.post("/v1/chat/completions", json=body, headers=AUTH)
    assert response.status == 200
    await finished(client, response)
    (row,) = await gate.ledger.entries()
    assert row.day == "2026-01-31"
    status = gate.budgets.status("dev", "dev")["user"]
    assert status["daily"]["spent_usd"] == 0  # February's day and month: nothing spent
    assert status["monthly"]["spent_usd"] == 0
    spent = gate.budgets._spent
    assert spent[("user", "dev", "day", "2026-01-31")] == Decimal(str(row.cost_usd)) > 0
    assert spent[("user", "dev", "month", "2026-01")] == Decimal(str(row.cost_usd))


async def test_the_reservation_covers_a_dearer_fallback(
    gateway: GatewayFactory, settings: Settings, sim_stats: SimStats
) -> None:
    """A fallback chain may serve a dearer model: the hold is priced as the dearest, so a
    budget that covers only the requested model refuses up front instead of overspending."""
    body = chat_body("dear [sim chunks=5 fail=503 fail_times=1 key=dear]", stream=False)
    body["max_tokens"] = 5
    prompt = tokens.count_chat("gpt-4o-mini", body)
    prices = (await gateway()).app[GATE].prices
    cheap, dear = prices.cost("gpt-4o-mini", prompt, 5), prices.cost("gpt-4o", prompt, 5)
    assert dear > 2 * cheap
    chained = with_resilience(
        settings, fallbacks={"gpt-4o-mini": ("gpt-4o",)}, retry_max_attempts=1
    )

    tight = await gateway(with_money(chained, user_daily_usd=float(2 * cheap)))
    refused = await tight.post("/v1/chat/completions", json=body, headers=AUTH)
    assert refused.status == 429
    assert orjson.loads(await refused.read())["error"]["code"] == "budget_exceeded"
    assert sim_stats.requests == 0

    roomy = await gateway(with_money(chained, user_daily_usd=float(2 * dear)))
    served = await roomy.post("/v1/chat/completions", json=body, headers=AUTH)
    assert served.status == 200
    assert served.headers["X-Sluice-Model"] == "gpt-4o"
    await finished(roomy, served)
    (row,) = await roomy.app[GATE].ledger.entries()
    assert (row.model_requested, row.model_served) == ("gpt-4o-mini", "gpt-4o")
    assert Decimal(str(row.cost_usd)) == dear
    spent = roomy.app[GATE].budgets.status("dev", "dev")["user"]["daily"]
    assert (spent["reserved_usd"], spent["spent_usd"]) == (0.0, float(dear))


def test_the_worst_case_covers_the_fallbacks_of_fallbacks() -> None:
    """Under budget pressure a request starts on its fallback and follows that model's own
    chain: the reservation prices the dearest model reachable, however deep."""
    fallbacks = {"gpt-4o-mini": ("gpt-4.1-nano",), "gpt-4.1-nano": ("gpt-4",)}
    gate = Gate(LimitSettings(), MoneySettings(), fallbacks=fallbacks)
    assert gate.worst_cost("gpt-4o-mini", 1000, 1000) == gate.prices.cost("gpt-4", 1000, 1000)
    assert gate.worst_cost("gpt-4", 1000, 1000) == gate.prices.cost("gpt-4", 1000, 1000)


async def test_the_worst_case_counts_the_prompt_in_each_fallback_s_own_encoding() -> None:
    """A fallback with another tokenizer (cl100k for gpt-4-turbo, o200k for gpt-4o) may see
    three times the tokens in the same words: the reservation counts them its way."""
    gate = Gate(LimitSettings(), MoneySettings(), fallbacks={"gpt-4o": ("gpt-4-turbo",)})
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "नमस्ते दुनिया " * 200}]}
    mine, theirs = tokens.count_chat("gpt-4o", body), tokens.count_chat("gpt-4-turbo", body)
    assert theirs > 2 * mine
    chat = ChatRequest(body=body, model="gpt-4o", streaming=False, include_usage=False)
    prompts = await gate._prompts(chat, mine)
    assert prompts == {tokens.O200K: mine, tokens.CL100K: theirs}
    worst = gate.worst_cost("gpt-4o", mine, 10, prompts=prompts)
    assert worst == gate.prices.cost("gpt-4-turbo", theirs, 10)


def test_the_worst_case_prices_each_image_at_its_most() -> None:
    """The prompt count takes an image at its low-detail floor; the reservation at the most
    it can cost on the dearest reachable model."""
    gate = Gate(LimitSettings(), MoneySettings(), fallbacks={"gpt-4o": ("gpt-4o-mini",)})
    floor = tokens.IMAGE_PART_TOKENS
    expected = max(
        gate.prices.cost("gpt-4o", 1000 + 2 * (tokens.IMAGE_MAX_TOKENS - floor), 100),
        gate.prices.cost("gpt-4o-mini", 1000 + 2 * (48_169 - floor), 100),
    )
    assert gate.worst_cost("gpt-4o", 1000, 100, images=2) == expected
    assert gate.worst_cost("gpt-4o", 1000, 100, images=2) > gate.worst_cost("gpt-4o", 1000, 100)


async def test_a_worst_case_of_thirty_digits_is_refused_as_any_other(
    gateway: GatewayFactory, settings: Settings
) -> None:
    """A model with no known output ceiling, ``n`` and ``max_tokens`` at 2**63: a worst case
    of ~1e33 USD, past Decimal's 28 digits, is still a 429 ``budget_exceeded`` and a row."""
    passthrough = replace(settings, provider=replace(settings.provider, models=()))
    client = await gateway(with_money(passthrough, user_daily_usd=5.0))
    body = chat_body("huge", stream=False, model="my-model", n=2**63, max_tokens=2**63)
    response = await client.post("/v1/chat/completions", json=body, headers=AUTH)
    error = orjson.loads(await response.read())["error"]
    assert (response.status, error["code"]) == (429, "budget_exceeded"), error
    (row,) = await client.app[GATE].ledger.entries()
    assert (row.status, row.error_code) == ("rejected", "budget_exceeded")


async def test_a_bug_in_admission_is_a_500_with_its_row(
    gateway: GatewayFactory, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever admission raises, the request still gets its one ledger row."""
    client = await gateway(settings)

    async def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(Gate, "_take", broken)
    response = await client.post("/v1/chat/completions", json=chat_body("hi"), headers=AUTH)
    assert response.status == 500
    assert "a bug" not in await response.text()
    (row,) = await client.app[GATE].ledger.entries()
    assert (row.status, row.error_code) == ("rejected", "server_error")


async def test_image_requests_cannot_overspend_a_budget(
    gateway: GatewayFactory, settings: Settings
) -> None:
    """A budget that fits three image requests at their most: of ten fired at once,
    three are admitted, whatever the images turn out to cost."""
    parts = [{"type": "text", "text": "look [sim chunks=5]"}]
    parts.append({"type": "image_url", "image_url": {"url": "data:,"}})
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": parts}], "max_tokens": 5}
    probe = await gateway()
    gate = probe.app[GATE]
    worst = gate.worst_cost("gpt-4o", tokens.count_chat("gpt-4o", body), 5, images=1)
    client = await gateway(with_money(settings, user_daily_usd=float(worst * 3)))

    async def spend() -> int:
        response = await client.post("/v1/chat/completions", json=body, headers=AUTH)
        await response.read()
        if response.status == 200:
            await finished(client, response)
        return response.status

    statuses = await asyncio.gather(*(spend() for _ in range(10)))
    assert statuses.count(200) == 3
    assert statuses.count(429) == 7


def test_a_zero_budget_has_nothing_left_not_no_limit() -> None:
    status = Budgets(BudgetLimits(user_daily=Decimal(0))).status("u", "t")
    assert status["user"]["daily"]["limit_usd"] == 0.0
    assert status["user"]["daily"]["remaining_usd"] == 0.0


CACHED = chat_body("again [sim chunks=5]", stream=False, max_tokens=5, temperature=0)


async def _one_request_budget(
    gateway: GatewayFactory, settings: Settings, **changes: object
) -> Client:
    """A gateway whose user daily budget fits one ``CACHED`` request (and not a second)."""
    prompt = tokens.count_chat("gpt-4o-mini", CACHED)
    cost = PriceTable(builtin_prices()).cost("gpt-4o-mini", prompt, 5)
    changed = replace(settings, resilience=replace(settings.resilience, **changes))
    return await gateway(with_money(changed, user_daily_usd=float(cost * 3 / 2)))


@pytest.mark.parametrize("streaming", [False, True])
async def test_a_spent_budget_is_served_from_the_cache(
    gateway: GatewayFactory, settings: Settings, sim_stats: SimStats, streaming: bool
) -> None:
    """The cached-only tier: with no budget left for a provider call, a request whose answer
    is cached gets it, free (as a stream when streamed), and says why; one that is not
    cached, or that opts out of the cache, is refused."""
    client = await _one_request_budget(gateway, settings)
    first = await client.post("/v1/chat/completions", json=CACHED, headers=AUTH)
    assert (first.status, first.headers["X-Sluice-Cache"]) == (200, "miss")
    answer = orjson.loads(await first.read())
    await finished(client, first)
    assert sim_stats.requests == 1

    again = await client.post(
        "/v1/chat/completions", json={**CACHED, "stream": streaming}, headers=AUTH
    )
    assert again.status == 200
    assert again.headers["X-Sluice-Cache"] == "hit"
    assert again.headers["X-Sluice-Fallback-Reason"] == "budget_exceeded"
    raw = await again.read()
    if streaming:
        assert answer["choices"][0]["message"]["content"].encode("unicode_escape") in raw
        assert raw.endswith(b"data: [DONE]\n\n")
    else:
        assert orjson.loads(raw)["choices"] == answer["choices"]
    await finished(client, again)
    assert sim_stats.requests == 1  # the provider was not called

    other = chat_body("new [sim chunks=5]", stream=False, max_tokens=5, temperature=0)
    refused = await client.post("/v1/chat/completions", json=other, headers=AUTH)
    opted_out = await client.post(
        "/v1/chat/completions", json=CACHED, headers={**AUTH, "X-Sluice-Cache": "bypass"}
    )
    for response in (refused, opted_out):
        assert response.status == 429
        assert orjson.loads(await response.read())["error"]["code"] == "budget_exceeded"
    rows = await client.app[GATE].ledger.entries()
    assert [(r.status, r.cost_usd > 0) for r in rows] == [
        ("completed", True),
        ("completed", False),  # the cached answer: no provider cost
        ("rejected", False),
        ("rejected", False),
    ]
    assert sim_stats.requests == 1


async def test_no_cached_answer_for_a_spent_budget_when_degrading_is_off(
    gateway: GatewayFactory, settings: Settings, sim_stats: SimStats
) -> None:
    """``SLUICE_DEGRADE_TO_CACHE=false``: a budget with no room refuses, cached or not."""
    client = await _one_request_budget(gateway, settings, degrade_to_cache=False)
    first = await client.post("/v1/chat/completions", json=CACHED, headers=AUTH)
    assert first.status == 200
    await finished(client, first)
    again = await client.post("/v1/chat/completions", json=CACHED, headers=AUTH)
    assert again.status == 429
    assert orjson.loads(await again.read())["error"]["code"] == "budget_exceeded"
    assert sim_stats.requests == 1


async def test_a_cached_answer_gone_before_it_is_served_is_the_budget_refusal(
    gateway: GatewayFactory, settings: Settings, sim_stats: SimStats
) -> None:
    """Admission saw a cached answer, which was gone (evicted, expired) when the stream
    looked again: the budget's refusal, never a provider call; its row says rejected."""
    client = await _one_request_budget(gateway, settings)
    first = await client.post("/v1/chat/completions", json=CACHED, headers=AUTH)
    await finished(client, first)
    gate = client.app[GATE]

    async def seen_then_evicted(tenant: str, chat: ChatRequest, header: str | None) -> bool:
        return True  # as admission found it; the stream finds nothing for this prompt

    gate.has_cached = seen_then_evicted
    other = {**CACHED, "messages": [{"role": "user", "content": "gone [sim chunks=5]"}]}
    again = await client.post("/v1/chat/completions", json=other, headers=AUTH)
    assert again.status == 429
    assert orjson.loads(await again.read())["error"]["code"] == "budget_exceeded"
    assert again.headers["x-should-retry"] == "false"
    assert again.headers["X-Sluice-Cache"] == "miss"  # it looked: no opt-out, no bypass
    assert sim_stats.requests == 1
    await finished(client, again)
    rows = await gate.ledger.entries()
    assert (rows[-1].status, rows[-1].error_code) == ("rejected", "budget_exceeded")
    assert rows[-1].model_served is None  # as every refusal's: nothing served it
    assert len(rows) == 2
