"""Metrics over OTLP/HTTP: pushed to a receiver started here, decoded with opentelemetry-proto.

The final push happens when the app closes (after the streams drained), so most tests close
the client and read what arrived; the interval push is awaited on the receiver's event.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer

from service.appkeys import STREAMS, TELEMETRY
from service.auth import add_key
from service.settings import AuthSettings, Settings
from service.telemetry.metrics import TOKEN_BUCKETS
from tests.conftest import AUTH, GatewayFactory, chat_body
from tests.otlp import PUSHED, Pushed, receiver_app

URL = "/v1/chat/completions"
CUMULATIVE = 2  # AGGREGATION_TEMPORALITY_CUMULATIVE in the proto
GENAI = {
    "gen_ai.operation.name": "chat",
    "gen_ai.provider.name": "simulated",
    "gen_ai.request.model": "gpt-4o-mini",
}


@pytest.fixture
async def receiver(aiohttp_server: Any) -> TestServer:
    server: TestServer = await aiohttp_server(receiver_app())
    return server


def pushing(settings: Settings, receiver: TestServer, *, interval_s: float = 3600.0) -> Settings:
    """Metrics export on, to ``receiver``; the interval long unless a test wants it."""
    telemetry = replace(
        settings.telemetry,
        metrics_endpoint=str(receiver.make_url("/v1/metrics")),
        metric_export_interval_s=interval_s,
        metrics_timeout_s=2.0,
    )
    return replace(settings, telemetry=telemetry)


async def settled(client: Any) -> None:
    tasks = [s.task for s in client.app[STREAMS].live() if s.task is not None]
    await asyncio.gather(*tasks)
    await client.app[STREAMS].retire_now()


async def test_final_push_carries_genai_and_gateway_metrics_under_otel_names(
    gateway: GatewayFactory, settings: Settings, receiver: TestServer
) -> None:
    """Two completions and a rate-limited request, then shutdown: the last push has the GenAI
    histograms (OpenTelemetry names, units, attributes, buckets) and the gateway counters."""
    custom = pushing(settings, receiver)
    client = await gateway(replace(custom, limits=replace(custom.limits, user_rpm=2)))
    for text in ("a [sim chunks=3]", "b [sim chunks=4]", "c"):
        response = await client.post(URL, json=chat_body(text), headers=AUTH)
        await response.read()
    assert response.status == 429
    await settled(client)
    assert receiver.app[PUSHED].exports == []  # nothing before the interval or shutdown
    await client.close()

    last = receiver.app[PUSHED].exports[-1]
    usage = last["gen_ai.client.token.usage"]
    assert (usage.kind, usage.unit, usage.temporality) == ("histogram", "{token}", CUMULATIVE)
    output = usage.point(**GENAI, **{"gen_ai.token.type": "output"})
    assert (output["count"], output["sum"]) == (2, 7)
    assert output["explicit_bounds"] == list(TOKEN_BUCKETS)
    assert sum(output["bucket_counts"]) == 2
    assert output["bucket_counts"][1] == 2  # 3 and 4 tokens: both in (1, 4]
    assert usage.point(**{"gen_ai.token.type": "input"})["sum"] > 0
    duration = last["gen_ai.client.operation.duration"]
    assert (duration.kind, duration.unit) == ("histogram", "s")
    assert duration.point(**GENAI)["count"] == 2
    assert last["gen_ai.client.operation.time_to_first_chunk"].point(**GENAI)["count"] == 2
    requests = last["sluice_requests"]
    assert (requests.kind, requests.monotonic, requests.temporality) == ("sum", True, CUMULATIVE)
    assert requests.point(route=URL, outcome="completed")["value"] == 2
    assert requests.point(route=URL, outcome="rejected", status="429")["value"] == 1
    assert last["sluice_rejections"].point(reason="rate")["value"] == 1
    assert last["sluice_cost_usd"].point(tenant="dev")["value"] > 0
    streams = last["sluice_open_streams"]
    assert (streams.kind, streams.point(transport="sse")["value"]) == ("gauge", 0)
    assert usage.resource["service.name"] == "sluice"


async def test_metrics_are_pushed_on_the_interval_while_serving(
    gateway: GatewayFactory, settings: Settings, receiver: TestServer
) -> None:
    """OTEL_METRIC_EXPORT_INTERVAL: pushes arrive while the app runs, cumulative values."""
    client = await gateway(pushing(settings, receiver, interval_s=0.02))
    response = await client.post(URL, json=chat_body("i [sim chunks=2]"), headers=AUTH)
    await response.read()
    await settled(client)

    def completed(exports: list[dict[str, Pushed]]) -> bool:
        requests = exports[-1].get("sluice_requests") if exports else None
        return requests is not None and any(
            p["attributes"].get("outcome") == "completed" for p in requests.points
        )

    await receiver.app[PUSHED].wait_for(completed)
    assert client.app[TELEMETRY].metrics_pusher is not None
    requests = receiver.app[PUSHED].exports[-1]["sluice_requests"]
    assert requests.point(outcome="completed")["value"] == 1


async def test_pushed_labels_are_redacted(
    gateway: GatewayFactory, settings: Settings, receiver: TestServer, tmp_path: Path
) -> None:
    """A tenant that is an e-mail address, and the client key, never reach a pushed label."""
    path = tmp_path / "keys.json"
    key = add_key(path, user="carol", tenant="carol@example.com")
    custom = replace(
        pushing(settings, receiver), auth=AuthSettings(client_keys_file=path, dev_key=None)
    )
    client = await gateway(custom)
    response = await client.post(
        URL, json=chat_body("m [sim chunks=2]"), headers={"Authorization": f"Bearer {key}"}
    )
    await response.read()
    await settled(client)
    await client.close()
    last = receiver.app[PUSHED].exports[-1]
    assert last["sluice_cost_usd"].point(tenant="[redacted]")["value"] > 0
    text = repr(last)
    assert "carol@example.com" not in text
    assert key not in text


async def test_nothing_configured_means_no_metrics_push(gateway: GatewayFactory) -> None:
    """Without an OTLP endpoint no pusher exists (``/metrics`` still serves)."""
    client = await gateway()
    assert client.app[TELEMETRY].metrics_pusher is None
    assert (await client.get("/metrics", headers=AUTH)).status == 200
