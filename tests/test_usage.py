"""GET /v1/usage: own spend by day and model with remaining budget; admins see anyone."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import pytest

from service import registry as registry_module
from service.appkeys import GATE
from service.ledger import utc_day
from service.settings import AuthSettings, Settings
from tests.conftest import GatewayFactory, chat_body
from tests.test_ledger import Client, finished

KEYS = {
    "key-alice": {"user": "alice", "tenant": "acme", "settings": {"daily_usd": 5}},
    "key-bob": {"user": "bob", "tenant": "acme"},
    "key-root": {"user": "root", "tenant": "ops", "admin": True},
    "key-alice-globex": {"user": "alice", "tenant": "globex"},  # another alice, elsewhere
}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
async def client(gateway: GatewayFactory, settings: Settings, tmp_path: Path) -> Client:
    document = {"keys": {hashlib.sha256(k.encode()).hexdigest(): v for k, v in KEYS.items()}}
    path = tmp_path / "keys.json"
    path.write_bytes(orjson.dumps(document))
    auth = AuthSettings(client_keys_file=path, dev_key=None)
    money = replace(settings.money, user_daily_usd=1.0, tenant_monthly_usd=50.0)
    return await gateway(replace(settings, auth=auth, money=money))


async def chat(client: Client, key: str, model: str = "gpt-4o-mini") -> None:
    body = chat_body("usage [sim chunks=4]", stream=False, model=model)
    response = await client.post("/v1/chat/completions", json=body, headers=bearer(key))
    assert response.status == 200
    await finished(client, response)


async def usage(client: Client, key: str, **query: str) -> tuple[int, Any]:
    response = await client.get("/v1/usage", params=query, headers=bearer(key))
    return response.status, orjson.loads(await response.read())


async def test_own_usage_by_day_and_model_with_budget(client: Client) -> None:
    """A user sees their rows grouped by day and model, totals, and what budget remains."""
    await chat(client, "key-alice")
    await chat(client, "key-alice")
    await chat(client, "key-alice", model="gpt-4o")
    await chat(client, "key-bob")
    status, report = await usage(client, "key-alice")
    assert status == 200
    today = utc_day(client.app[GATE].clock())
    assert [(d["day"], d["model"], d["requests"]) for d in report["data"]] == [
        (today, "gpt-4o", 1),
        (today, "gpt-4o-mini", 2),
    ]
    assert report["user"] == "alice"
    assert report["tenant"] == "acme"
    assert report["totals"]["requests"] == 3
    assert report["totals"]["completion_tokens"] == 12
    spent = report["totals"]["cost_usd"]
    daily = report["budget"]["user"]["daily"]
    assert daily["limit_usd"] == 5.0  # the key's own override, not the default 1.0
    assert daily["spent_usd"] == pytest.approx(spent)
    assert daily["remaining_usd"] == pytest.approx(5.0 - spent)
    assert report["budget"]["tenant"]["monthly"]["limit_usd"] == 50.0


async def test_usage_counts_a_request_the_moment_it_has_been_answered(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ended streams are settled in batches (``registry.py``); ``/v1/usage`` settles the
    waiting ones first, so an answer just received is in it, as is its spend."""
    monkeypatch.setattr(registry_module, "RETIRE_BATCH_S", 3600.0)  # only when asked
    body = chat_body("usage [sim chunks=4]", stream=False)
    response = await client.post("/v1/chat/completions", json=body, headers=bearer("key-bob"))
    assert response.status == 200
    await response.read()
    status, report = await usage(client, "key-bob")
    assert status == 200
    assert (report["totals"]["requests"], report["totals"]["completion_tokens"]) == (1, 4)
    assert report["budget"]["user"]["daily"]["spent_usd"] == report["totals"]["cost_usd"] > 0


async def test_only_admins_see_others(client: Client) -> None:
    """A user asking for someone else gets 403; an admin may ask for a user or a tenant."""
    await chat(client, "key-alice")
    await chat(client, "key-bob")
    status, error = await usage(client, "key-bob", user="alice")
    assert status == 403
    assert error["error"]["code"] == "permission_denied"
    status, _ = await usage(client, "key-bob", tenant="acme")
    assert status == 403
    status, alice = await usage(client, "key-root", user="alice")
    assert status == 200
    assert alice["totals"]["requests"] == 1
    assert alice["budget"]["user"]["daily"]["limit_usd"] == 1.0  # the default for others
    status, tenant = await usage(client, "key-root", tenant="acme")
    assert status == 200
    assert tenant["totals"]["requests"] == 2
    assert tenant["budget"]["tenant"]["monthly"]["limit_usd"] == 50.0
    status, _ = await usage(client, "key-root", user="alice", tenant="acme")
    assert status == 400
    for bad in ("yesterday", "2024-13-45", "2024-02-30", "0000-00-00", "١٢٣٤-٠١-٠١"):
        status, error = await usage(client, "key-alice", start=bad)
        assert status == 400
        assert error["error"]["param"] == "start"
    status, error = await usage(client, "key-alice", start="2030-01-02", end="2030-01-01")
    assert (status, error["error"]["param"]) == (400, "start")  # a range that ends first


async def test_date_range_filters_days(client: Client) -> None:
    """?start/?end bound the days reported."""
    await chat(client, "key-alice")
    status, report = await usage(client, "key-alice", start="2001-01-01", end="2001-01-31")
    assert status == 200
    assert report["data"] == []
    assert report["totals"]["requests"] == 0


async def test_own_usage_is_the_users_in_their_own_tenant(client: Client) -> None:
    """The same user id in another tenant is someone else (as for streams): alice of globex
    does not see the requests of alice of acme as hers."""
    await chat(client, "key-alice")
    status, report = await usage(client, "key-alice-globex")
    assert status == 200
    assert (report["user"], report["tenant"]) == ("alice", "globex")
    assert report["data"] == []
    assert report["totals"]["requests"] == 0
    _, theirs = await usage(client, "key-alice")
    assert theirs["totals"]["requests"] == 1
