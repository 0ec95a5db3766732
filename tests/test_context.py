"""Context windows and the max_tokens policy, before any provider call."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from service import context, tokens
from service.appkeys import GATE
from service.context import ContextPolicy
from service.errors import InvalidRequestError
from service.settings import ProviderSettings, Settings
from service.simulator import SimStats
from tests.conftest import AUTH, GatewayFactory, chat_body


def test_default_is_applied_and_capped_by_the_room_left() -> None:
    """No max_tokens: the default, but never more than the window leaves after the prompt."""
    policy = ContextPolicy(default_max_tokens=4096, max_tokens_cap=None)
    plan = policy.plan_output("gpt-4o-mini", {}, 1000)
    assert (plan.max_tokens, plan.field, plan.rewrite) == (4096, "max_tokens", True)
    assert policy.plan_output("gpt-4", {}, 8000).max_tokens == 192  # 8192 window
    assert policy.plan_output("o3-mini", {}, 10).field == "max_completion_tokens"
    # null is not set: the model's own field, not the one the client sent empty
    assert policy.plan_output("o3-mini", {"max_tokens": None}, 10).field == "max_completion_tokens"
    both = {"max_completion_tokens": None, "max_tokens": 50}
    assert policy.plan_output("gpt-4o", both, 10).field == "max_tokens"


def test_explicit_values_are_clamped_or_rejected_per_policy() -> None:
    """Above the cap: clamped (default policy) or refused; the model's own ceiling applies too."""
    clamp = ContextPolicy(default_max_tokens=100, max_tokens_cap=500)
    plan = clamp.plan_output("gpt-4o", {"max_completion_tokens": 9000}, 10)
    assert (plan.max_tokens, plan.field, plan.rewrite) == (500, "max_completion_tokens", True)
    assert not clamp.plan_output("gpt-4o", {"max_tokens": 400}, 10).rewrite
    assert clamp.plan_output("gpt-4o", {"max_tokens": 400}, 10, cap_override=50).max_tokens == 50
    model_ceiling = ContextPolicy(default_max_tokens=100, max_tokens_cap=None)
    assert model_ceiling.plan_output("gpt-4o", {"max_tokens": 10**6}, 10).max_tokens == 16_384
    reject = ContextPolicy(default_max_tokens=100, max_tokens_cap=500, reject_over_cap=True)
    with pytest.raises(InvalidRequestError) as caught:
        reject.plan_output("gpt-4o", {"max_tokens": 501}, 10)
    assert caught.value.param == "max_tokens"


def test_prompt_plus_max_tokens_over_the_window_is_refused() -> None:
    """prompt + explicit max_tokens > window: 400 context_length_exceeded, as OpenAI answers."""
    policy = ContextPolicy(default_max_tokens=100, max_tokens_cap=None, windows={"tiny": 50})
    with pytest.raises(InvalidRequestError) as caught:
        policy.plan_output("tiny", {"max_tokens": 11}, 40)
    assert caught.value.code == "context_length_exceeded"
    assert caught.value.status == 400
    assert "maximum context length is 50 tokens" in caught.value.message
    assert policy.plan_output("tiny", {"max_tokens": 10}, 40).max_tokens == 10
    with pytest.raises(InvalidRequestError):
        policy.plan_output("tiny", {}, 50)  # no room at all, even for the default
    assert policy.window("unknown-model") is None


@pytest.fixture
async def recording_provider(aiohttp_server: Any) -> tuple[TestServer, list[dict[str, Any]]]:
    """A provider that keeps every body it receives and answers a fixed completion."""
    bodies: list[dict[str, Any]] = []

    async def chat(request: web.Request) -> web.Response:
        body = await request.json()
        bodies.append(body)
        completion = {
            "id": "chatcmpl-rec",
            "object": "chat.completion",
            "model": body["model"],
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "ok"},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 9, "completion_tokens": 1, "total_tokens": 10},
        }
        return web.json_response(completion)

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    return await aiohttp_server(app), bodies


async def test_wire_upstream_body_carries_the_ceiling(
    gateway: GatewayFactory,
    settings: Settings,
    recording_provider: tuple[TestServer, list[dict[str, Any]]],
) -> None:
    """The body sent upstream gets the default, or the clamped value, written in once."""
    server, bodies = recording_provider
    provider = ProviderSettings(base_url=str(server.make_url("/v1")))
    limits = replace(settings.limits, default_max_tokens=321, max_tokens_cap=1000)
    client = await gateway(replace(settings, provider=provider, limits=limits))
    for extra in ({}, {"max_tokens": 5000}, {"max_tokens": 7}):
        body = chat_body("hi", stream=False, **extra)
        response = await client.post("/v1/chat/completions", json=body, headers=AUTH)
        assert response.status == 200, await response.text()
    assert [b["max_tokens"] for b in bodies] == [321, 1000, 7]


async def test_wire_context_length_exceeded_before_the_provider(
    gateway: GatewayFactory, settings: Settings, sim_stats: SimStats
) -> None:
    """A prompt that cannot fit is refused with 400 and a rejected ledger row; no upstream call."""
    limits = replace(settings.limits, context_windows={"gpt-4o-mini": 64})
    client = await gateway(replace(settings, limits=limits))
    body = chat_body("word " * 40, max_tokens=30)
    assert tokens.count_chat("gpt-4o-mini", body) + 30 > 64
    response = await client.post("/v1/chat/completions", json=body, headers=AUTH)
    assert response.status == 400
    error = orjson.loads(await response.read())["error"]
    assert error["code"] == "context_length_exceeded"
    assert error["param"] == "messages"
    assert error["type"] == "invalid_request_error"
    assert sim_stats.requests == 0
    (entry,) = await client.app[GATE].ledger.entries()
    assert (entry.status, entry.error_code, entry.cost_usd) == (
        "rejected",
        "context_length_exceeded",
        0.0,
    )


def test_128k_snapshots_of_the_gpt_4_family_get_their_own_window() -> None:
    """gpt-4-0125-preview and gpt-4-1106-preview are 128k models, not gpt-4's 8k; a prompt
    too long is told with the completion the client asked for."""
    policy = ContextPolicy(default_max_tokens=100, max_tokens_cap=None)
    for model in ("gpt-4-0125-preview", "gpt-4-1106-preview", "gpt-4.5-preview"):
        assert policy.plan_output(model, {"max_tokens": 1000}, 20_000).max_tokens == 1000
    with pytest.raises(InvalidRequestError, match="1000 in the completion"):
        policy.plan_output("gpt-4", {"max_tokens": 1000}, 9_000)


def test_configured_windows_match_whatever_their_case() -> None:
    policy = ContextPolicy(default_max_tokens=100, max_tokens_cap=None, windows={"My-Model": 500})
    assert policy.window("my-model-v2") == 500


@pytest.mark.parametrize(
    ("model", "unseen"),
    [
        ("o1", True),
        ("o3-mini-2025-01-31", True),
        ("o4-mini-high", True),
        ("gpt-5", True),
        ("gpt-5-mini", True),
        ("ft:o3-mini:acme::x1", True),
        ("gpt-5.1", True),
        ("gpt-5.1-codex", True),
        ("GPT-5.2-mini", True),
        ("o3-pro", True),
        ("gpt-5-chat-latest", False),  # no reasoning: the ordinary first-token deadline
        ("gpt-5.1-chat-latest", False),
        ("gpt-50", False),
        ("o1x", False),
        ("gpt-4o", False),
    ],
)
def test_which_models_think_before_their_first_token(model: str, unseen: bool) -> None:
    """Those get the longer first-token deadline (``SLUICE_REASONING_FIRST_TOKEN_TIMEOUT_S``)."""
    assert context.reasons_unseen(model) is unseen
