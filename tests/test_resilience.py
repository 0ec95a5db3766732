"""Retries and fallbacks over the wire: the simulated provider fails on demand, the sim's
counters prove how many attempts reached it, and recorded sleeps prove the waits asked for.
"""

from __future__ import annotations

import socket
from dataclasses import replace
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest

from service import registry as registry_module
from service import tokens
from service.admission import BUDGET_WARNING_HEADER
from service.appkeys import GATE
from service.auth import digest
from service.breaker import OPEN
from service.budgets import BudgetLimits
from service.relay import CACHE_HEADER as CACHE
from service.relay import FALLBACK_HEADER, MODEL_HEADER
from service.settings import (
    AuthSettings,
    CacheSettings,
    ConfigError,
    ResilienceSettings,
    Settings,
)
from service.simulator import SimStats
from tests.conftest import AUTH, chat_body, with_provider
from tests.resilient import Rig, start, with_resilience

FALLBACKS = {"gpt-4o": ("gpt-4o-mini",)}


async def post(
    rig: Rig, text: str, *, stream: bool = False, **extra: Any
) -> tuple[int, dict[str, str], bytes]:
    response = await rig.client.post(
        "/v1/chat/completions", json=chat_body(text, stream=stream, **extra), headers=AUTH
    )
    return response.status, dict(response.headers), await response.read()


def data_events(raw: bytes) -> list[bytes]:
    return [line[6:] for line in raw.split(b"\n") if line.startswith(b"data: ")]


async def test_5xx_burst_is_retried_until_it_succeeds(
    aiohttp_client: Any, settings: Settings, sim_stats: SimStats
) -> None:
    """Two 503s then success: three attempts, with full-jitter exponential waits between."""
    rig = await start(aiohttp_client, settings, jitter=0.5)
    status, _, raw = await post(rig, "hi [sim fail=503 fail_times=2 key=burst]", stream=True)
    assert status == 200
    assert raw.endswith(b"data: [DONE]\n\n")
    assert sim_stats.requests == 3
    assert rig.sleeps.delays == [0.25, 0.5]  # 0.5 * 2**n, times the injected jitter 0.5


async def test_429_retry_after_is_honoured(
    aiohttp_client: Any, settings: Settings, sim_stats: SimStats
) -> None:
    """A 429 with Retry-After: 2 is retried after exactly the 2 s the provider asked for."""
    rig = await start(aiohttp_client, settings)
    status, _, _ = await post(rig, "hi [sim fail=429 retry_after=2 fail_times=1 key=rl]")
    assert status == 200
    assert sim_stats.requests == 2
    assert rig.sleeps.delays == [2.0]


async def test_429_storm_retry_after_ms_wins_over_retry_after(
    aiohttp_client: Any, settings: Settings, sim_stats: SimStats
) -> None:
    """A 429 storm carrying both headers: each wait is retry-after-ms (250 ms), not the 7 s
    of Retry-After nor the jittered backoff; when the storm outlasts the attempts, the client
    gets the last 429 with the provider's Retry-After."""
    rig = await start(aiohttp_client, settings)
    storm = "[sim fail=429 retry_after=7 retry_after_ms=250 fail_times=2 key=storm]"
    status, _, _ = await post(rig, f"hi {storm}")
    assert status == 200
    assert sim_stats.requests == 3
    assert rig.sleeps.delays == [0.25, 0.25]

    status, headers, raw = await post(rig, "hi [sim fail=429 retry_after=7 retry_after_ms=250]")
    assert status == 429
    assert orjson.loads(raw)["error"]["type"] == "rate_limit_error"
    assert headers["Retry-After"] == "7"
    assert sim_stats.requests == 6
    assert rig.sleeps.delays == [0.25, 0.25, 0.25, 0.25]


async def test_retry_after_beyond_the_budget_goes_back_to_the_client(
    aiohttp_client: Any, settings: Settings, sim_stats: SimStats
) -> None:
    """A wait longer than the request's retry budget is not shortened: one attempt, and the
    client gets the 429 with the provider's Retry-After."""
    rig = await start(aiohttp_client, with_resilience(settings, retry_budget_s=5.0))
    status, headers, raw = await post(rig, "hi [sim fail=429 retry_after=60]")
    assert status == 429
    assert headers["Retry-After"] == "60"
    assert orjson.loads(raw)["error"]["type"] == "rate_limit_error"
    assert sim_stats.requests == 1
    assert rig.sleeps.delays == []


async def test_client_errors_are_not_retried(
    aiohttp_client: Any, settings: Settings, sim_stats: SimStats
) -> None:
    """400, 401, 403 and 404 from the provider: a single attempt each (a 401 or 403 is
    about the gateway's own key, and reaches the client as a provider failure)."""
    rig = await start(aiohttp_client, settings)
    statuses = []
    for code in (400, 401, 403, 404):
        status, _, _ = await post(rig, f"bad [sim fail={code}]")
        statuses.append(status)
    assert statuses == [400, 502, 502, 404]
    assert sim_stats.requests == 4
    assert rig.sleeps.delays == []


async def test_exhausted_retries_return_the_last_error(
    aiohttp_client: Any, settings: Settings, sim_stats: SimStats
) -> None:
    """A provider that keeps failing gets max_attempts calls, then the client gets a 502."""
    rig = await start(aiohttp_client, with_resilience(settings, retry_max_attempts=4))
    status, _, raw = await post(rig, "down [sim fail=502]")
    assert status == 502
    assert orjson.loads(raw)["error"]["message"] == "simulated failure 502"
    assert sim_stats.requests == 4
    assert rig.sleeps.delays == [0.25, 0.5, 1.0]


async def test_no_retry_after_the_first_byte(
    aiohttp_client: Any, settings: Settings, sim_stats: SimStats
) -> None:
    """A stream reset mid-way ends with an error event; the provider saw one attempt."""
    rig = await start(aiohttp_client, settings)
    status, _, raw = await post(rig, "hi [sim chunks=6 reset_after=3]", stream=True)
    assert status == 200
    events = data_events(raw)
    assert "error" in orjson.loads(events[-1])
    assert len(events) == 5  # role chunk, 3 words, the error
    assert sim_stats.requests == 1
    assert rig.sleeps.delays == []


async def test_a_completion_cut_off_mid_body_is_not_retried(
    aiohttp_client: Any, settings: Settings, sim_stats: SimStats
) -> None:
    """Not streamed, the body only comes once the provider has generated (and billed) the
    answer: a reset mid-body is a 502, never a second paid attempt, never half a body."""
    rig = await start(aiohttp_client, settings)
    status, _, raw = await post(rig, "hi [sim chunks=5 reset_after=1 fail_times=1 key=cut]")
    assert status == 502
    assert orjson.loads(raw)["error"]["code"] == "provider_connection_error"
    assert (sim_stats.requests, sim_stats.resets) == (1, 1)
    assert rig.sleeps.delays == []


async def test_connection_failures_are_retried(aiohttp_client: Any, settings: Settings) -> None:
    """A provider that refuses connections is tried max_attempts times, then 502."""
    with socket.socket() as sock:  # a port that was free a moment ago refuses connections
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    refused = with_provider(settings, base_url=f"http://127.0.0.1:{port}/v1")
    rig = await start(aiohttp_client, refused)
    status, _, raw = await post(rig, "anyone?")
    assert status == 502
    assert orjson.loads(raw)["error"]["code"] == "provider_connection_error"
    assert len(rig.sleeps.delays) == 2


@pytest.mark.parametrize("attempts", [1, 3])
async def test_fallback_after_exhausted_retries_serves_the_cheaper_model(
    aiohttp_client: Any, settings: Settings, sim_stats: SimStats, attempts: int
) -> None:
    """gpt-4o fails every attempt (its only one, or three); gpt-4o-mini serves, the body
    upstream names it, and the headers say which model served and why."""
    configured = with_resilience(settings, fallbacks=FALLBACKS, retry_max_attempts=attempts)
    rig = await start(aiohttp_client, configured)
    status, headers, raw = await post(
        rig, f"hi [sim fail=503 fail_times={attempts} key=fb]", stream=True, model="gpt-4o"
    )
    assert status == 200
    assert headers[MODEL_HEADER] == "gpt-4o-mini"
    assert headers[FALLBACK_HEADER] == "retries_exhausted"
    assert orjson.loads(data_events(raw)[0])["model"] == "gpt-4o-mini"
    assert sim_stats.requests == attempts + 1


async def test_a_reasoning_fallback_gets_its_ceiling_as_max_completion_tokens(
    aiohttp_client: Any, settings: Settings, sim_stats: SimStats
) -> None:
    """o-series and gpt-5 models refuse ``max_tokens``: falling back to one, the ceiling
    planned for the requested model goes as ``max_completion_tokens``."""
    configured = with_resilience(settings, fallbacks={"gpt-4o": ("o3-mini",)}, retry_max_attempts=1)
    rig = await start(aiohttp_client, configured)
    status, headers, _ = await post(
        rig, "hi [sim fail=503 fail_times=1 key=rf]", stream=False, model="gpt-4o"
    )
    assert (status, headers[MODEL_HEADER]) == (200, "o3-mini")
    sent = sim_stats.last_body
    assert sent is not None
    assert "max_tokens" not in sent
    assert isinstance(sent["max_completion_tokens"], int)


@pytest.mark.parametrize("window", [300, 2000], ids=["prompt-too-long", "ceiling-lowered"])
async def test_a_fallback_gets_only_what_fits_it(
    aiohttp_client: Any, settings: Settings, sim_stats: SimStats, window: int
) -> None:
    """gpt-4o-mini (here a window of ``window`` tokens, an output ceiling of 16,384) after
    gpt-4.1-mini fails: a 600-token prompt does not fit 300, so it is not tried and the
    client gets gpt-4.1-mini's error; in 2,000 it fits, with the 30,000 tokens asked for
    lowered to what the window leaves (both went to it as they were)."""
    configured = with_resilience(
        settings, fallbacks={"gpt-4.1-mini": ("gpt-4o-mini",)}, retry_max_attempts=1
    )
    limits = replace(configured.limits, context_windows={"gpt-4o-mini": window})
    rig = await start(aiohttp_client, replace(configured, limits=limits))
    words = " ".join(["word"] * 600)
    status, headers, _ = await post(
        rig,
        f"{words} [sim fail=503 fail_times=1 key=fit{window}]",
        stream=False,
        model="gpt-4.1-mini",
        max_tokens=30_000,
    )
    if window == 300:
        assert status == 502
        assert sim_stats.requests == 1  # gpt-4.1-mini alone
        return
    assert (status, headers[MODEL_HEADER]) == (200, "gpt-4o-mini")
    sent = sim_stats.last_body
    assert sent is not None
    assert sent["model"] == "gpt-4o-mini"
    assert 0 < sent["max_tokens"] <= 2000 - 600


async def test_fallback_when_the_breaker_is_open(
    aiohttp_client: Any, settings: Settings, sim_stats: SimStats
) -> None:
    """With per-model breakers, an open gpt-4o circuit sends requests straight to the
    fallback without calling gpt-4o."""
    configured = with_resilience(
        settings, fallbacks=FALLBACKS, breaker_per_model=frozenset({"*"}), breaker_fail_max=1
    )
    rig = await start(aiohttp_client, configured)
    rig.resilience.breakers.for_model("gpt-4o").open()
    status, headers, raw = await post(rig, "hi", model="gpt-4o")
    assert status == 200
    assert headers[MODEL_HEADER] == "gpt-4o-mini"
    assert headers[FALLBACK_HEADER] == "breaker_open"
    assert orjson.loads(raw)["model"] == "gpt-4o-mini"
    assert sim_stats.requests == 1
    assert rig.resilience.breakers.for_model("gpt-4o").state == OPEN


@pytest.mark.parametrize("why", ["breaker_open", "budget_pressure"])
async def test_an_answer_a_fallback_served_is_a_cache_hit_when_it_would_serve_again(
    aiohttp_client: Any, settings: Settings, sim_stats: SimStats, why: str
) -> None:
    """The cache was asked only for the requested model's answer, while a fallback's is
    stored under the fallback: the same request, served by the same fallback for the same
    reason, went to the provider every time."""
    configured = with_resilience(settings, fallbacks=FALLBACKS, breaker_per_model=frozenset({"*"}))
    money = replace(configured.money, user_daily_usd=10.0, soft_fraction=0.8)
    rig = await start(aiohttp_client, replace(configured, money=money))
    if why == "breaker_open":
        rig.resilience.breakers.for_model("gpt-4o").open()
    else:
        rig.client.app[GATE].budgets.reserve("dev", "dev", Decimal("8.5"))  # 85% committed
    seen = []
    for _ in range(2):
        status, headers, _ = await post(rig, "same again", model="gpt-4o", temperature=0)
        seen.append((status, headers[MODEL_HEADER], headers[FALLBACK_HEADER], headers[CACHE]))
    assert seen == [(200, "gpt-4o-mini", why, "miss"), (200, "gpt-4o-mini", why, "hit")]
    assert sim_stats.requests == 1


async def test_budget_pressure_tries_the_model_asked_for_when_its_fallback_fails(
    aiohttp_client: Any, settings: Settings, sim_stats: SimStats
) -> None:
    """Under budget pressure the cheaper fallback goes first, then the model asked for: it
    was dropped from the chain, so an open breaker on the fallback was a 503 though the model
    asked for was healthy."""
    configured = with_resilience(settings, fallbacks=FALLBACKS, breaker_per_model=frozenset({"*"}))
    money = replace(configured.money, user_daily_usd=10.0, soft_fraction=0.8)
    rig = await start(aiohttp_client, replace(configured, money=money))
    rig.resilience.breakers.for_model("gpt-4o-mini").open()
    rig.client.app[GATE].budgets.reserve("dev", "dev", Decimal("8.5"))  # 85% committed
    status, headers, raw = await post(rig, "under pressure", model="gpt-4o")
    assert (status, headers[MODEL_HEADER]) == (200, "gpt-4o")
    assert FALLBACK_HEADER not in headers  # the model asked for served it
    assert orjson.loads(raw)["model"] == "gpt-4o"
    assert sim_stats.requests == 1


async def test_under_budget_pressure_the_fallback_s_own_fallbacks_still_follow(
    aiohttp_client: Any, settings: Settings, sim_stats: SimStats
) -> None:
    """Started on the cheaper fallback: then the model asked for, then that fallback's own
    fallbacks (a chain that put the model asked for back had lost them)."""
    chained = {"gpt-4o": ("gpt-4o-mini",), "gpt-4o-mini": ("gpt-4.1-mini",)}
    configured = with_resilience(settings, fallbacks=chained, breaker_per_model=frozenset({"*"}))
    money = replace(configured.money, user_daily_usd=10.0, soft_fraction=0.8)
    rig = await start(aiohttp_client, replace(configured, money=money))
    for model in ("gpt-4o-mini", "gpt-4o"):
        rig.resilience.breakers.for_model(model).open()
    rig.client.app[GATE].budgets.reserve("dev", "dev", Decimal("8.5"))  # 85% committed
    status, headers, _ = await post(rig, "under pressure", model="gpt-4o")
    assert (status, headers[MODEL_HEADER]) == (200, "gpt-4.1-mini")
    assert sim_stats.requests == 1


async def test_no_fallback_for_client_errors(
    aiohttp_client: Any, settings: Settings, sim_stats: SimStats
) -> None:
    """A 400 is the request's fault: the fallback model is not tried."""
    rig = await start(aiohttp_client, with_resilience(settings, fallbacks=FALLBACKS))
    status, headers, _ = await post(rig, "bad [sim fail=400]", model="gpt-4o")
    assert status == 400
    assert headers[MODEL_HEADER] == "gpt-4o"
    assert FALLBACK_HEADER not in headers
    assert sim_stats.requests == 1


async def test_headers_on_a_plain_success(aiohttp_client: Any, settings: Settings) -> None:
    """Without any fallback the requested model is named and no reason is given."""
    rig = await start(aiohttp_client, settings)
    status, headers, _ = await post(rig, "hi", stream=True)
    assert status == 200
    assert headers[MODEL_HEADER] == "gpt-4o-mini"
    assert FALLBACK_HEADER not in headers


async def test_budget_pressure_starts_on_the_cheaper_model(
    aiohttp_client: Any, settings: Settings, sim_stats: SimStats
) -> None:
    """Past the budget's warning fraction a request for gpt-4o is sent as gpt-4o-mini, and
    the headers say so; below it the requested model serves."""
    money = replace(settings.money, user_daily_usd=10.0, soft_fraction=0.8)
    configured = replace(with_resilience(settings, fallbacks=FALLBACKS), money=money)
    rig = await start(aiohttp_client, configured)
    status, headers, _ = await post(rig, "cheap enough", model="gpt-4o")
    assert (status, headers[MODEL_HEADER]) == (200, "gpt-4o")
    assert FALLBACK_HEADER not in headers

    rig.client.app[GATE].budgets.reserve("dev", "dev", Decimal("8.5"))  # 85% committed
    status, headers, raw = await post(rig, "under pressure", model="gpt-4o")
    assert status == 200
    assert headers[MODEL_HEADER] == "gpt-4o-mini"
    assert headers[FALLBACK_HEADER] == "budget_pressure"
    assert orjson.loads(raw)["model"] == "gpt-4o-mini"
    assert sim_stats.requests == 2


async def test_a_requests_own_worst_case_is_not_budget_pressure(
    aiohttp_client: Any, settings: Settings, sim_stats: SimStats
) -> None:
    """Nothing spent, and a request whose worst case alone would pass the warning fraction:
    it is served as asked, with no warning; its reservation is not spending."""
    money = replace(settings.money, user_daily_usd=0.05, soft_fraction=0.8)
    configured = replace(with_resilience(settings, fallbacks=FALLBACKS), money=money)
    rig = await start(aiohttp_client, configured)
    gate = rig.client.app[GATE]
    body = chat_body("first of the day", model="gpt-4o")
    ceiling = configured.limits.default_max_tokens
    worst = gate.worst_cost("gpt-4o", tokens.count_chat("gpt-4o", body), ceiling)
    assert worst > Decimal("0.04")  # over 80 % of the budget, priced as the dearest model
    status, headers, _ = await post(rig, "first of the day", model="gpt-4o")
    assert (status, headers[MODEL_HEADER]) == (200, "gpt-4o")
    assert FALLBACK_HEADER not in headers
    assert BUDGET_WARNING_HEADER not in headers
    assert sim_stats.requests == 1


async def test_a_hold_just_ended_is_settled_before_it_counts_as_pressure(
    aiohttp_client: Any, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ended streams are settled in batches (``registry.py``): a request that an unsettled
    worst case would start on the cheaper model has them settled first. Back to back, each
    request costs a sliver of the budget: each is served as asked."""
    monkeypatch.setattr(registry_module, "RETIRE_BATCH_S", 3600.0)  # only when asked
    body = chat_body("back to back", model="gpt-4o")
    ceiling = settings.limits.default_max_tokens
    rig = await start(aiohttp_client, settings)
    worst = rig.client.app[GATE].worst_cost("gpt-4o", tokens.count_chat("gpt-4o", body), ceiling)
    # One unsettled worst case is 45% of the budget (past the 40% warning); two fit in it.
    money = replace(settings.money, user_daily_usd=float(worst) * 2.2, soft_fraction=0.4)
    rig = await start(
        aiohttp_client, replace(with_resilience(settings, fallbacks=FALLBACKS), money=money)
    )
    for _ in range(3):
        status, headers, _ = await post(rig, "back to back", model="gpt-4o")
        assert (status, headers[MODEL_HEADER]) == (200, "gpt-4o")
        assert FALLBACK_HEADER not in headers


def test_settings_are_read_from_the_environment() -> None:
    """Every resilience and cache variable lands in its settings group."""
    env = {
        "SLUICE_RETRY_MAX_ATTEMPTS": "5",
        "SLUICE_RETRY_BASE_DELAY_S": "0.1",
        "SLUICE_RETRY_MAX_DELAY_S": "2",
        "SLUICE_RETRY_BUDGET_S": "9",
        "SLUICE_BREAKER_FAIL_MAX": "7",
        "SLUICE_BREAKER_RESET_S": "12",
        "SLUICE_BREAKER_PER_MODEL": "gpt-4o, gpt-4.1-mini",
        "SLUICE_FALLBACKS": '{"gpt-4o": ["gpt-4o-mini", "gpt-4.1-mini"]}',
        "SLUICE_DEGRADE_TO_CACHE": "off",
        "SLUICE_CACHE": "false",
        "SLUICE_CACHE_TTL_S": "60",
        "SLUICE_CACHE_MAX_BYTES": "1048576",
    }
    settings = Settings.from_env(env)
    assert settings.resilience == ResilienceSettings(
        retry_max_attempts=5,
        retry_base_delay_s=0.1,
        retry_max_delay_s=2.0,
        retry_budget_s=9.0,
        breaker_fail_max=7,
        breaker_reset_s=12.0,
        breaker_per_model=frozenset({"gpt-4o", "gpt-4.1-mini"}),
        fallbacks={"gpt-4o": ("gpt-4o-mini", "gpt-4.1-mini")},
        degrade_to_cache=False,
    )
    assert settings.cache == CacheSettings(enabled=False, ttl_s=60.0, max_bytes=1048576)
    assert Settings.from_env({}).resilience == ResilienceSettings()


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("SLUICE_FALLBACKS", "not json"),
        ("SLUICE_FALLBACKS", '{"gpt-4o": "gpt-4o-mini"}'),
        ("SLUICE_CACHE", "maybe"),
        ("SLUICE_RETRY_MAX_ATTEMPTS", "0"),
        ("SLUICE_BREAKER_FAIL_MAX", "five"),
    ],
)
def test_bad_settings_name_the_variable(name: str, value: str) -> None:
    """A malformed value is refused at start with the variable's name in the message."""
    with pytest.raises(ConfigError, match=name):
        Settings.from_env({name: value})


async def test_budget_pressure_never_moves_to_a_dearer_fallback(
    aiohttp_client: Any, settings: Settings, sim_stats: SimStats
) -> None:
    """A fallback configured for outages may cost more: budget pressure leaves the request
    on the model it asked for."""
    money = replace(settings.money, user_daily_usd=10.0, soft_fraction=0.8)
    dearer = {"gpt-4o-mini": ("gpt-4o",)}
    rig = await start(
        aiohttp_client, replace(with_resilience(settings, fallbacks=dearer), money=money)
    )
    rig.client.app[GATE].budgets.reserve("dev", "dev", Decimal("8.5"))  # 85% committed
    status, headers, raw = await post(rig, "under pressure")
    assert (status, headers[MODEL_HEADER]) == (200, "gpt-4o-mini")
    assert FALLBACK_HEADER not in headers
    assert orjson.loads(raw)["model"] == "gpt-4o-mini"


async def test_no_budget_is_no_pressure_at_any_warning_fraction(
    aiohttp_client: Any, settings: Settings
) -> None:
    """With a warning fraction of 0 and no budget at all, every request went to the cheaper
    model (0 % used "passed" 0 %), with no warning to say why."""
    money = replace(settings.money, soft_fraction=0.0)
    rig = await start(
        aiohttp_client, replace(with_resilience(settings, fallbacks=FALLBACKS), money=money)
    )
    status, headers, _ = await post(rig, "no budget", model="gpt-4o")
    assert (status, headers[MODEL_HEADER]) == (200, "gpt-4o")
    assert FALLBACK_HEADER not in headers


async def test_budget_pressure_counts_the_keys_own_budget(
    aiohttp_client: Any, settings: Settings, tmp_path: Path
) -> None:
    """Pressure is measured against a key's own daily_usd when it sets one (no default)."""
    keys = tmp_path / "keys.json"
    document = {"keys": {digest("key-alice"): {"user": "alice", "settings": {"daily_usd": 1}}}}
    keys.write_bytes(orjson.dumps(document))
    auth = AuthSettings(client_keys_file=keys, dev_key=None)
    rig = await start(
        aiohttp_client, replace(with_resilience(settings, fallbacks=FALLBACKS), auth=auth)
    )
    gate = rig.client.app[GATE]
    own = BudgetLimits(user_daily=Decimal(1))
    gate.budgets.reserve("alice", "user:alice", Decimal("0.85"), own)  # 85% of her own $1
    response = await rig.client.post(
        "/v1/chat/completions",
        json=chat_body("under pressure", stream=False, model="gpt-4o"),
        headers={"Authorization": "Bearer key-alice"},
    )
    assert response.status == 200
    assert response.headers[MODEL_HEADER] == "gpt-4o-mini"
    assert response.headers[FALLBACK_HEADER] == "budget_pressure"
