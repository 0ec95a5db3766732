"""Prices: USD per 1M tokens by model, with snapshots, overrides and a catch-all."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest

from service.pricing import Price, PriceTable, builtin_prices
from service.settings import ConfigError, Settings


def test_cost_uses_input_cached_and_output_rates() -> None:
    """gpt-4o-mini: $0.15 in, $0.075 cached in, $0.60 out per 1M tokens."""
    table = PriceTable(builtin_prices())
    cost = table.cost("gpt-4o-mini", prompt_tokens=1_000_000, completion_tokens=500_000)
    assert cost == Decimal("0.45")
    cached = table.cost("gpt-4o-mini", 1_000_000, 0, cached_tokens=400_000)
    assert cached == Decimal("0.15") * Decimal("0.6") + Decimal("0.075") * Decimal("0.4")
    assert table.cost("gpt-4o", 1, 1) == Decimal("0.0000125")


@pytest.mark.parametrize(
    ("model", "priced_as"),
    [
        ("gpt-4o-2024-08-06", "gpt-4o"),
        ("gpt-4o-mini-2024-07-18", "gpt-4o-mini"),
        ("gpt-4.1-nano-2025-04-14", "gpt-4.1-nano"),
        ("o3-mini-2025-01-31", "o3-mini"),
        ("gpt-4o-2024-05-13", "gpt-4o-2024-05-13"),  # the first gpt-4o: dearer
        ("ft:gpt-4o-mini-2024-07-18:acme::x1", "ft:gpt-4o-mini"),  # fine-tunes' own rates
        ("ft:gpt-4.1-nano-2025-04-14:acme::x2", "ft:gpt-4.1-nano"),
        ("ft:o4-mini:acme::x3", "o4-mini"),  # no rate of its own: its base model's
        ("gpt-4-0613", "gpt-4"),
        ("gpt-4-1106-preview", "gpt-4-1106-preview"),  # a turbo: a third of gpt-4's rates
        ("gpt-3.5-turbo-16k-0613", "gpt-3.5-turbo-16k"),
        ("mystery-model", "*"),
        ("o1-pro", "o1-pro"),  # ten times o1's rates: never priced as o1
        ("o3-pro-2025-06-10", "o3-pro"),
        ("gpt-5-pro", "gpt-5-pro"),
        ("o1-something-new", "*"),  # not a snapshot of o1: not o1's rates
        ("gpt-4o-mini-search-preview", "*"),
    ],
)
def test_snapshots_price_as_their_family(model: str, priced_as: str) -> None:
    """Dated snapshots price as their model, fine-tunes at their own rate or their base
    model's; any other name the table does not have, at the '*' entry (a name that only
    starts like a known one is another model: ``o1-pro`` costs ten times ``o1``)."""
    prices = builtin_prices()
    assert PriceTable(prices).price(model) == prices[priced_as]


def test_overrides_from_the_environment(tmp_path: Path) -> None:
    """SLUICE_PRICES_FILE then SLUICE_PRICES add or replace entries; bad ones name the variable."""
    path = tmp_path / "prices.json"
    path.write_text(
        '{"house-model": {"input": 1, "output": 2}, "gpt-4o": {"input": 9, "output": 9}}'
    )
    settings = Settings.from_env(
        {"SLUICE_PRICES_FILE": str(path), "SLUICE_PRICES": '{"gpt-4o": {"input": 3, "output": 4}}'}
    )
    table = PriceTable.with_overrides(settings.money.prices)
    assert table.price("house-model") == Price.of(1, 2)
    assert table.price("gpt-4o-2024-11-20") == Price.of(3, 4)
    with pytest.raises(ConfigError, match="SLUICE_PRICES"):
        Settings.from_env({"SLUICE_PRICES": '{"x": {"input": -1, "output": 1}}'})
    with pytest.raises(ConfigError, match="SLUICE_PRICES"):
        Settings.from_env({"SLUICE_PRICES": "not json"})


def test_limit_and_money_settings_from_env(tmp_path: Path) -> None:
    """Every SLUICE_* limit, budget and ledger variable is read into its group."""
    settings = Settings.from_env(
        {
            "SLUICE_RPM_PER_USER": "60",
            "SLUICE_TPM_PER_TENANT": "90000",
            "SLUICE_RPM_GLOBAL": "1000",
            "SLUICE_MAX_STREAMS_PER_USER": "4",
            "SLUICE_DEFAULT_MAX_TOKENS": "512",
            "SLUICE_MAX_TOKENS_CAP": "2048",
            "SLUICE_MAX_TOKENS_POLICY": "reject",
            "SLUICE_CONTEXT_WINDOWS": '{"house-model": 32768}',
            "SLUICE_DATA_DIR": str(tmp_path),
            "SLUICE_BUDGET_USER_DAILY_USD": "1.5",
            "SLUICE_BUDGET_TENANT_MONTHLY_USD": "100",
        }
    )
    limits, money = settings.limits, settings.money
    assert (limits.user_rpm, limits.tenant_tpm, limits.global_rpm) == (60, 90000, 1000)
    assert (limits.user_tpm, limits.tenant_rpm, limits.global_tpm) == (0, 0, 0)
    assert (limits.max_streams_per_user, limits.default_max_tokens) == (4, 512)
    assert (limits.max_tokens_cap, limits.reject_over_cap) == (2048, True)
    assert limits.context_windows == {"house-model": 32768}
    assert str(money.data_dir) == str(tmp_path)
    assert (money.user_daily_usd, money.tenant_monthly_usd, money.user_monthly_usd) == (
        1.5,
        100.0,
        None,
    )
    assert Settings.from_env({"SLUICE_LEDGER": "memory"}).money.data_dir is None
    assert str(Settings.from_env({}).money.data_dir) == "data"
    with pytest.raises(ConfigError, match="SLUICE_MAX_TOKENS_POLICY"):
        Settings.from_env({"SLUICE_MAX_TOKENS_POLICY": "maybe"})
    with pytest.raises(ConfigError, match="SLUICE_CONTEXT_WINDOWS"):
        Settings.from_env({"SLUICE_CONTEXT_WINDOWS": '{"m": "big"}'})
