"""``GET /v1/models`` (issue 2, point 5): the configured list, or the provider's passed through.

With a list configured (``SLUICE_MODELS``, or the simulated defaults) only those models are
served and another model is a 404 ``model_not_found``; without one, the provider's list is
passed through and any model is forwarded.
"""

from __future__ import annotations

from dataclasses import replace

import openai

from service.settings import Secret, Settings
from service.simulator import SimStats
from tests.conftest import AUTH, DEV_KEY, GatewayFactory, chat_body, with_provider
from tests.wire import assert_openai_error, closed_port


def _openai_mode(settings: Settings, **provider: object) -> Settings:
    """The openai provider kind against the simulator, no model list unless given."""
    changes = {"kind": "openai", "name": "openai", "api_key": Secret("sk-models"), "models": ()}
    settings = with_provider(settings, **{**changes, **provider})
    return replace(settings, resilience=replace(settings.resilience, retry_max_attempts=1))


async def test_configured_list(gateway: GatewayFactory, settings: Settings) -> None:
    """A configured list is served as OpenAI's list object, sorted, owned by sluice."""
    client = await gateway(with_provider(settings, models=("zeta-1", "alpha-2")))
    response = await client.get("/v1/models", headers=AUTH)
    assert response.status == 200
    payload = await response.json()
    assert payload["object"] == "list"
    assert [m["id"] for m in payload["data"]] == ["alpha-2", "zeta-1"]
    assert all(m["object"] == "model" and m["owned_by"] == "sluice" for m in payload["data"])


async def test_simulated_defaults(gateway: GatewayFactory) -> None:
    """The simulated provider's default list is served without any configuration."""
    client = await gateway()
    payload = await (await client.get("/v1/models", headers=AUTH)).json()
    assert {m["id"] for m in payload["data"]} == {"gpt-4o-mini", "gpt-4o", "gpt-4.1-mini"}


async def test_passthrough_from_provider(
    gateway: GatewayFactory, settings: Settings, sim_stats: SimStats
) -> None:
    """openai mode without SLUICE_MODELS: the provider's own /v1/models, as it sent it."""
    client = await gateway(_openai_mode(settings))
    response = await client.get("/v1/models", headers=AUTH)
    assert response.status == 200
    payload = await response.json()
    assert {m["id"] for m in payload["data"]} == {"gpt-4o-mini", "gpt-4o", "gpt-4.1-mini"}
    assert {m["owned_by"] for m in payload["data"]} == {"sluice-sim"}  # the provider's field


async def test_unknown_model_is_404_with_a_list(
    gateway: GatewayFactory, settings: Settings, sim_stats: SimStats
) -> None:
    """With a list configured, any other model is 404 model_not_found, never sent upstream."""
    client = await gateway(with_provider(settings, models=("gpt-4o-mini",)))
    for stream in (True, False):
        body = chat_body(stream=stream)
        body["model"] = "gpt-9-ultra"
        response = await client.post("/v1/chat/completions", json=body, headers=AUTH)
        assert response.status == 404
        error = assert_openai_error(await response.json(), type_="invalid_request_error")
        assert (error["code"], error["param"]) == ("model_not_found", "model")
        assert "gpt-9-ultra" in error["message"]
    assert sim_stats.requests == 0
    ok = await client.post("/v1/chat/completions", json=chat_body(stream=False), headers=AUTH)
    assert ok.status == 200


async def test_any_model_is_forwarded_without_a_list(
    gateway: GatewayFactory, settings: Settings, sim_stats: SimStats
) -> None:
    """Passthrough mode does not second-guess the provider: an unlisted model is forwarded."""
    client = await gateway(_openai_mode(settings))
    body = chat_body("[sim chunks=2]", stream=False)
    body["model"] = "some-new-model"
    response = await client.post("/v1/chat/completions", json=body, headers=AUTH)
    assert response.status == 200
    assert (await response.json())["model"] == "some-new-model"
    assert sim_stats.requests == 1


async def test_passthrough_provider_down_is_502(
    gateway: GatewayFactory, settings: Settings
) -> None:
    """Passthrough with the provider unreachable: an OpenAI-shaped 502, not a 500."""
    dead = f"http://127.0.0.1:{closed_port()}/v1"
    client = await gateway(_openai_mode(settings, base_url=dead))
    response = await client.get("/v1/models", headers=AUTH)
    assert response.status == 502
    assert_openai_error(await response.json())


async def test_one_model_as_the_sdk_retrieves_it(
    gateway: GatewayFactory, settings: Settings, sim_stats: SimStats
) -> None:
    """``GET /v1/models/{model}`` (the SDKs' ``models.retrieve``): the model's object from
    the list, configured or passed through, a name with a slash included; else 404."""
    configured = await gateway(with_provider(settings, models=("meta-llama/Llama-3-8B", "a")))
    passthrough = await gateway(_openai_mode(settings))
    for client, name, owner in (
        (configured, "meta-llama/Llama-3-8B", "sluice"),
        (passthrough, "gpt-4o", "sluice-sim"),
    ):
        sdk = openai.AsyncOpenAI(
            base_url=str(client.make_url("/v1")), api_key=DEV_KEY, max_retries=0
        )
        model = await sdk.models.retrieve(name)
        assert (model.id, model.object, model.owned_by) == (name, "model", owner)
        missing = await client.get("/v1/models/gpt-nope", headers=AUTH)
        assert missing.status == 404
        assert (await missing.json())["error"]["code"] == "model_not_found"
        await sdk.close()
