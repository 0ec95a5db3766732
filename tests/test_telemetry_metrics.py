"""Metrics and response headers: ``/metrics`` parsed with prometheus_client's own text parser
after known traffic; who may read it; the separate metrics port; X-Sluice-Overhead-Ms.
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

from service.appkeys import STREAMS
from service.auth import add_key
from service.settings import AuthSettings, Settings
from service.telemetry.http import METRICS_URL
from tests.conftest import AUTH, GatewayFactory, chat_body, with_streams
from tests.wire import read_until

URL = "/v1/chat/completions"
ROUTE = "/v1/chat/completions"


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of the exposition, keyed by name and label set."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(parsed: dict[Any, float], name: str, **labels: str) -> float:
    """The sum of the samples named ``name`` whose labels include ``labels``."""
    wanted = set(labels.items())
    found = [v for (n, ls), v in parsed.items() if n == name and wanted <= ls]
    assert found, f"no sample {name} {labels}"
    return sum(found)


async def settled(client: TestClient[Any, Any]) -> None:
    """Every generation has ended and been retired (its finish hooks have run)."""
    tasks = [s.task for s in client.app[STREAMS].live() if s.task is not None]
    await asyncio.gather(*tasks)
    await client.app[STREAMS].retire_now()


async def scrape(client: TestClient[Any, Any]) -> str:
    response = await client.get("/metrics", headers=AUTH)
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return await response.text()


async def test_metrics_count_known_traffic(gateway: GatewayFactory, settings: Settings) -> None:
    """Three completions and a rate-limited request show up in the GenAI and gateway metrics."""
    limited = replace(settings, limits=replace(settings.limits, user_rpm=3))
    client = await gateway(limited)
    for body in (
        chat_body("a [sim chunks=3]"),
        chat_body("b [sim chunks=3]"),
        chat_body("c [sim chunks=4]", stream=False),
    ):
        response = await client.post(URL, json=body, headers=AUTH)
        assert response.status == 200
        await response.read()
    refused = await client.post(URL, json=chat_body("d"), headers=AUTH)
    assert refused.status == 429
    await settled(client)
    parsed = samples(await scrape(client))

    usage = "gen_ai_client_token_usage"
    assert value(parsed, f"{usage}_count", gen_ai_token_type="output") == 3
    assert value(parsed, f"{usage}_sum", gen_ai_token_type="output") == 10
    assert value(parsed, f"{usage}_sum", gen_ai_token_type="input") > 0
    assert value(parsed, f"{usage}_count", gen_ai_request_model="gpt-4o-mini") == 6
    assert value(parsed, "gen_ai_client_operation_duration_seconds_count", error_type="") == 3
    assert value(parsed, "gen_ai_client_operation_time_to_first_chunk_seconds_count") == 3
    assert value(parsed, "sluice_requests_total", route=ROUTE, outcome="completed") == 3
    assert value(parsed, "sluice_requests_total", route=ROUTE, status="429") == 1
    assert value(parsed, "sluice_requests_total", route=ROUTE, outcome="rejected") == 1
    assert value(parsed, "sluice_rejections_total", reason="rate") == 1
    assert value(parsed, "sluice_cost_usd_total", tenant="dev", model="gpt-4o-mini") > 0
    assert value(parsed, "sluice_cache_lookups_total") == 3
    assert value(parsed, "sluice_open_streams", transport="sse") == 0
    assert value(parsed, "sluice_generations_running") == 0
    assert value(parsed, "sluice_ledger_unwritten_total") == 0  # every row stored
    headers_phase = value(
        parsed, "sluice_gateway_overhead_seconds_count", route=ROUTE, phase="headers"
    )
    assert headers_phase == 4
    assert value(parsed, "sluice_gateway_overhead_seconds_count", route=ROUTE, phase="total") == 4


async def test_a_providers_refusal_is_not_counted_as_ours(
    gateway: GatewayFactory, settings: Settings
) -> None:
    """The provider's own 429 (after the gateway's one attempt) is a provider error: no
    rate rejection by Sluice is counted, and the request is not an outcome "rejected"."""
    one_try = replace(settings, resilience=replace(settings.resilience, retry_max_attempts=1))
    client = await gateway(one_try)
    response = await client.post(URL, json=chat_body("[sim fail=429]"), headers=AUTH)
    assert response.status == 429
    assert (await response.json())["error"]["type"] == "rate_limit_error"
    await settled(client)
    parsed = samples(await scrape(client))
    assert not [k for k in parsed if k[0] == "sluice_rejections_total"]
    assert value(parsed, "sluice_requests_total", route=ROUTE, status="429") == 1
    assert not [k for k in parsed if ("outcome", "rejected") in k[1]]


async def test_a_stray_upgrade_header_on_a_post_is_one_request(
    gateway: GatewayFactory,
) -> None:
    """``Upgrade: websocket`` on a completion POST (not the socket route) is counted once, as
    an HTTP request, with no WebSocket stream behind it."""
    client = await gateway()
    headers = {**AUTH, "Upgrade": "websocket"}
    response = await client.post(URL, json=chat_body("[sim chunks=2]"), headers=headers)
    assert response.status == 200
    await response.read()
    await settled(client)
    parsed = samples(await scrape(client))
    assert value(parsed, "sluice_requests_total") == 1
    assert value(parsed, "sluice_requests_total", route=ROUTE, outcome="completed") == 1
    assert parsed.get(("sluice_open_streams", frozenset({("transport", "ws")})), 0) == 0


async def test_open_streams_gauge_follows_a_live_stream(
    gateway: GatewayFactory, settings: Settings
) -> None:
    """While an SSE response is open the gauge is 1; after it ends, 0."""
    client = await gateway()
    response = await client.post(
        URL, json=chat_body("l [sim chunks=200 delay_ms=20]"), headers=AUTH
    )
    await read_until(response, b"id: 2\n")
    assert value(samples(await scrape(client)), "sluice_open_streams", transport="sse") == 1
    assert value(samples(await scrape(client)), "sluice_generations_running") == 1
    client.app[STREAMS].cancel(next(iter(client.app[STREAMS].live())))
    await response.read()
    await settled(client)
    assert value(samples(await scrape(client)), "sluice_open_streams", transport="sse") == 0


async def test_a_socket_counts_as_an_open_stream_while_it_relays_one(
    gateway: GatewayFactory, settings: Settings
) -> None:
    """Over a WebSocket the gauge counts connections receiving a stream, as for SSE: once
    the socket closes it drops, while the generation goes on through its grace window."""
    client = await gateway(with_streams(settings, disconnect_grace_s=60))
    left = asyncio.Event()
    client.app[STREAMS].observers.append(
        lambda stream, event: left.set() if event == "client_disconnected" else None
    )
    ws = await client.ws_connect("/v1/ws", headers=AUTH)
    body = chat_body("l [sim chunks=200 delay_ms=20]")
    await ws.send_str(
        orjson.dumps({"type": "chat.completion.create", "request_id": "r", "body": body}).decode()
    )
    while orjson.loads((await ws.receive()).data)["type"] != "chunk":
        pass
    assert value(samples(await scrape(client)), "sluice_open_streams", transport="ws") == 1
    await ws.close()
    await left.wait()
    parsed = samples(await scrape(client))
    assert value(parsed, "sluice_open_streams", transport="ws") == 0
    assert value(parsed, "sluice_generations_running") == 1  # in its grace window
    client.app[STREAMS].cancel(next(iter(client.app[STREAMS].live())))


async def test_breaker_state_and_transitions_are_exported(
    gateway: GatewayFactory, settings: Settings
) -> None:
    """Opening the breaker sets its gauge to 2 (open) and counts the transition."""
    custom = replace(
        settings,
        resilience=replace(settings.resilience, breaker_fail_max=1, retry_max_attempts=1),
    )
    client = await gateway(custom)
    failing = await client.post(URL, json=chat_body("x [sim fail=500]"), headers=AUTH)
    assert failing.status == 502
    refused = await client.post(URL, json=chat_body("y"), headers=AUTH)
    assert refused.status == 503
    await settled(client)
    parsed = samples(await scrape(client))
    assert value(parsed, "sluice_breaker_state", provider="simulated") == 2
    assert value(parsed, "sluice_breaker_transitions_total", state="open") == 1
    assert value(parsed, "sluice_rejections_total", reason="breaker") == 1


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, str]:
    """A keys file with an admin, a plain user, and a tenant that is an e-mail address."""
    path = tmp_path / "keys.json"
    return {
        "path": str(path),
        "admin": add_key(path, user="root", tenant="ops", admin=True),
        "user": add_key(path, user="bob", tenant="acme"),
        "email": add_key(path, user="carol", tenant="carol@example.com"),
        "alone": add_key(path, user="dave.smith-7731"),  # no tenant: "user:dave.smith-7731"
    }


def with_keys(settings: Settings, keys: dict[str, str]) -> Settings:
    return replace(settings, auth=AuthSettings(client_keys_file=Path(keys["path"]), dev_key=None))


async def chat_as(client: TestClient[Any, Any], key: str) -> None:
    """One completion with ``key``, its generation settled (its metrics recorded)."""
    headers = {"Authorization": f"Bearer {key}"}
    response = await client.post(URL, json=chat_body("m [sim chunks=2]"), headers=headers)
    assert response.status == 200
    await response.read()
    await settled(client)


async def test_metrics_need_an_admin_key_and_labels_are_redacted(
    gateway: GatewayFactory, settings: Settings, keys: dict[str, str]
) -> None:
    """No key: 401; a plain key: 403; an admin key: 200. Label values never carry an e-mail
    or a key."""
    client = await gateway(with_keys(settings, keys))
    await chat_as(client, keys["email"])
    assert (await client.get("/metrics")).status == 401
    denied = await client.get("/metrics", headers={"Authorization": f"Bearer {keys['user']}"})
    assert denied.status == 403
    assert (await denied.json())["error"]["code"] == "permission_denied"
    allowed = await client.get("/metrics", headers={"Authorization": f"Bearer {keys['admin']}"})
    assert allowed.status == 200
    text = await allowed.text()
    assert "carol@example.com" not in text
    for key in keys.values():
        assert key not in text
    assert value(samples(text), "sluice_cost_usd_total", tenant="[redacted]") > 0


async def test_a_tenant_of_one_is_labelled_by_its_users_pseudonym(
    gateway: GatewayFactory, settings: Settings, keys: dict[str, str]
) -> None:
    """A key without a tenant is its user's own tenant, ``user:<id>``: telemetry shows the
    id's pseudonym (as ``user_hash`` everywhere else), never the id."""
    client = await gateway(with_keys(settings, keys))
    await chat_as(client, keys["alone"])
    admin = {"Authorization": f"Bearer {keys['admin']}"}
    text = await (await client.get("/metrics", headers=admin)).text()
    assert "dave.smith" not in text
    pseudonym = "user:" + hashlib.sha256(b"dave.smith-7731").hexdigest()[:16]
    assert value(samples(text), "sluice_cost_usd_total", tenant=pseudonym) > 0


async def test_metrics_port_serves_without_auth_and_main_port_has_no_route(
    gateway: GatewayFactory, settings: Settings
) -> None:
    """With SLUICE_METRICS_PORT the exposition moves to its own listener."""
    custom = replace(settings, telemetry=replace(settings.telemetry, metrics_port=0))
    client = await gateway(custom)
    assert (await client.get("/metrics", headers=AUTH)).status == 404
    async with (
        aiohttp.ClientSession() as session,
        session.get(client.app[METRICS_URL]) as response,
    ):
        assert response.status == 200
        assert float(response.headers["X-Sluice-Overhead-Ms"]) >= 0
        text = await response.text()
    assert value(samples(text), "sluice_requests_total", status="404") == 1


@pytest.mark.parametrize(
    ("method", "path", "body", "headers", "status"),
    [
        ("POST", URL, chat_body("s [sim chunks=2]"), AUTH, 200),
        ("POST", URL, chat_body("j [sim chunks=2]", stream=False), AUTH, 200),
        ("POST", URL, chat_body(), {}, 401),
        ("GET", "/nope", None, AUTH, 404),
        ("GET", "/livez", None, {}, 200),
        ("POST", URL, chat_body("f [sim fail=503]"), AUTH, 502),
    ],
)
async def test_every_response_carries_overhead_and_request_id(
    gateway: GatewayFactory,
    method: str,
    path: str,
    body: dict[str, Any] | None,
    headers: dict[str, str],
    status: int,
) -> None:
    """JSON, SSE, errors and health checks all carry X-Sluice-Overhead-Ms (a non-negative
    number of milliseconds) and echo the client's X-Request-Id."""
    client = await gateway()
    response = await client.request(
        method, path, json=body, headers={**headers, "X-Request-Id": "req-abc.1"}
    )
    assert response.status == status
    await response.read()
    overhead = float(response.headers["X-Sluice-Overhead-Ms"])
    assert overhead >= 0
    assert response.headers["X-Request-Id"] == "req-abc.1"


async def test_insane_request_id_is_replaced(gateway: GatewayFactory) -> None:
    """A request id with spaces or control characters is not echoed; ours is used."""
    client = await gateway()
    response = await client.get("/livez", headers={"X-Request-Id": "a b\tc"})
    assert response.headers["X-Request-Id"].startswith("req_")


async def test_token_metrics_count_what_the_ledger_bills(
    gateway: GatewayFactory, settings: Settings
) -> None:
    """A provider failure that produced nothing is billed no tokens; the token metric
    records the same zero, not the prompt Sluice counted before the call."""
    one_try = replace(settings, resilience=replace(settings.resilience, retry_max_attempts=1))
    client = await gateway(one_try)
    response = await client.post(URL, json=chat_body("[sim fail=500]"), headers=AUTH)
    assert response.status == 502
    await settled(client)
    parsed = samples(await scrape(client))
    usage = "gen_ai_client_token_usage"
    assert value(parsed, f"{usage}_count", gen_ai_token_type="input") == 1
    assert value(parsed, f"{usage}_sum", gen_ai_token_type="input") == 0


async def test_rejections_by_reason_tell_tokens_from_requests(
    gateway: GatewayFactory, settings: Settings
) -> None:
    """A tokens-per-minute refusal is the same 429 for the client (OpenAI's
    ``rate_limit_exceeded``), and a ``tokens`` rejection in the metrics."""
    limited = replace(settings, limits=replace(settings.limits, user_tpm=100))
    client = await gateway(limited)
    body = {**chat_body("big", stream=False), "max_tokens": 500}
    refused = await client.post(URL, json=body, headers=AUTH)
    assert refused.status == 429
    assert (await refused.json())["error"]["code"] == "rate_limit_exceeded"
    parsed = samples(await scrape(client))
    assert value(parsed, "sluice_rejections_total", reason="tokens") == 1
    assert not [
        k for k in parsed if k[0] == "sluice_rejections_total" and ("reason", "rate") in k[1]
    ]


async def test_a_resumed_stream_has_no_overhead_of_its_own(gateway: GatewayFactory) -> None:
    """A resume relays a stream generated for another request: its time is that stream's,
    not the gateway's overhead (none is observed for the route)."""
    client = await gateway()
    first = await client.post(URL, json=chat_body("r [sim chunks=3]"), headers=AUTH)
    await first.read()
    stream_id = first.headers["X-Sluice-Stream-Id"]
    await settled(client)
    resumed = await client.get(f"/v1/streams/{stream_id}/events", headers=AUTH)
    await resumed.read()
    parsed = samples(await scrape(client))
    route = "/v1/streams/{stream_id}/events"
    overhead = "sluice_gateway_overhead_seconds_count"
    assert not [
        k
        for k in parsed
        if k[0] == overhead and ("route", route) in k[1] and ("phase", "total") in k[1]
    ]
    assert value(parsed, overhead, route=ROUTE, phase="total") == 1
