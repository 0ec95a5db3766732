"""The official ``openai`` Python SDK works unchanged against the gateway (issue 2, point 2).

Every test drives ``openai.AsyncOpenAI`` over a real socket to the gateway test server, which
relays to the simulated provider on another real socket.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from service.settings import Settings
from service.simulator import SimStats, completion_words
from tests.conftest import DEV_KEY, GatewayFactory, with_streams

Client = TestClient[web.Request, web.Application]


def _sdk(client: Client) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key=DEV_KEY, max_retries=0)


def _quick_teardown(settings: Settings) -> Settings:
    """No grace and no drain window, so a stalled stream is cancelled as soon as it is left;
    one provider attempt, so a 429 reaches the SDK without the gateway's own retries."""
    settings = with_streams(settings, disconnect_grace_s=0.0)
    settings = replace(settings, resilience=replace(settings.resilience, retry_max_attempts=1))
    return replace(settings, server=replace(settings.server, drain_s=0.0))


@pytest.fixture
async def sdk(gateway: GatewayFactory, settings: Settings) -> AsyncIterator[openai.AsyncOpenAI]:
    client = await gateway(_quick_teardown(settings))
    async with _sdk(client) as sdk_client:
        yield sdk_client


def _messages(text: str) -> list[Any]:
    return [{"role": "user", "content": text}]


def _expected_text(prompt: str, chunks: int) -> str:
    return "".join(completion_words(prompt, chunks))


async def test_non_stream_create(sdk: openai.AsyncOpenAI) -> None:
    """A plain create returns the simulator's completion, text and usage intact."""
    prompt = "Tell me a story [sim chunks=7]"
    completion = await sdk.chat.completions.create(model="gpt-4o-mini", messages=_messages(prompt))
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.content == _expected_text(prompt, 7)
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 7


async def test_stream_collects_content(sdk: openai.AsyncOpenAI) -> None:
    """stream=True yields the role chunk, one chunk per word, then the finish chunk."""
    prompt = "Stream please [sim chunks=9]"
    stream = await sdk.chat.completions.create(
        model="gpt-4o-mini", messages=_messages(prompt), stream=True
    )
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == _expected_text(prompt, 9)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert len(chunks) == 1 + 9 + 1
    # Sluice always asks the provider for usage; a client that did not ask must not see it.
    assert all(c.usage is None for c in chunks)


async def test_stream_include_usage_last_chunk(sdk: openai.AsyncOpenAI) -> None:
    """include_usage: the last chunk has no choices and the provider's exact usage."""
    prompt = "Count me [sim chunks=13]"
    stream = await sdk.chat.completions.create(
        model="gpt-4o-mini",
        messages=_messages(prompt),
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    content_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.completion_tokens == len(content_chunks) == 13
    assert last.usage.total_tokens == last.usage.prompt_tokens + 13
    assert all(c.usage is None for c in chunks[:-1])


async def test_chunks_arrive_while_provider_stalls(
    sdk: openai.AsyncOpenAI, sim_stats: SimStats
) -> None:
    """No buffering: with the provider stalled after 3 words, the SDK already has all 3."""
    prompt = "Hold on [sim chunks=10 stall_after=3]"
    stream = await sdk.chat.completions.create(
        model="gpt-4o-mini", messages=_messages(prompt), stream=True
    )
    received: list[str] = []
    async for chunk in stream:
        received.append(chunk.choices[0].delta.content or "")
        if len(received) == 4:  # the role chunk and three words
            break
    # The provider is still holding the stream open: nothing upstream has finished.
    assert sim_stats.open == 1
    assert sim_stats.completed == 0
    assert "".join(received) == _expected_text(prompt, 10)[: len("".join(received))]
    assert sum(1 for r in received if r) == 3
    await stream.close()
    # Leaving the stream (no grace window here) cancels the provider call.
    await sim_stats.wait_for(lambda s: s.aborted == 1)
    assert sim_stats.chunks_sent == [3]


async def test_keepalives_between_chunks_do_not_disturb_the_sdk(
    gateway: GatewayFactory, settings: Settings
) -> None:
    """The provider holds its headers 100 ms, so the 200 and a keepalive go out first;
    then keepalive comments every 20 ms while chunks trickle in every 30 ms: the Python SDK
    (which keeps the last event id, so a blank line alone would be an empty event to it)
    reads every chunk and ends cleanly."""
    client = await gateway(with_streams(_quick_teardown(settings), keepalive_s=0.02))
    prompt = "slowly [sim chunks=12 delay_ms=30 header_delay_ms=100 first_delay_ms=100]"
    async with _sdk(client) as sdk:
        stream = await sdk.chat.completions.create(
            model="gpt-4o-mini", messages=_messages(prompt), stream=True
        )
        parts = [c.choices[0].delta.content or "" async for c in stream if c.choices]
    assert "".join(parts) == _expected_text(prompt, 12)


@pytest.mark.parametrize("directive", ["reset_after=2", "malformed_after=2"])
async def test_midstream_failure_raises_api_error(sdk: openai.AsyncOpenAI, directive: str) -> None:
    """A provider failure after the first byte reaches the SDK as APIError after the chunks."""
    stream = await sdk.chat.completions.create(
        model="gpt-4o-mini",
        messages=_messages(f"Break [sim chunks=8 {directive}]"),
        stream=True,
    )
    received: list[Any] = []

    async def consume() -> None:
        async for chunk in stream:
            received.append(chunk)

    with pytest.raises(openai.APIError) as caught:
        await consume()
    assert not isinstance(caught.value, openai.APIStatusError)  # it came as an SSE event
    assert len(received) == 3  # role + the two words sent before the failure
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["type"] == "upstream_error"
    assert caught.value.body["code"] in ("provider_connection_error", "provider_protocol_error")


async def test_provider_429_is_rate_limit_error(sdk: openai.AsyncOpenAI) -> None:
    """A provider 429 before the first byte: RateLimitError, its message and Retry-After."""
    with pytest.raises(openai.RateLimitError) as caught:
        await sdk.chat.completions.create(
            model="gpt-4o-mini",
            messages=_messages("Slow down [sim fail=429 retry_after=7]"),
            stream=True,
        )
    error = caught.value
    assert error.status_code == 429
    assert error.response.headers["retry-after"] == "7"
    assert isinstance(error.body, dict)
    assert error.body["message"] == "simulated failure 429"
    assert error.body["type"] == "rate_limit_error"
    assert "simulated failure 429" in str(error)


async def test_wrong_key_is_authentication_error(
    gateway: GatewayFactory, sim_stats: SimStats
) -> None:
    """A wrong client key is an AuthenticationError and never reaches the provider."""
    client = await gateway()
    async with openai.AsyncOpenAI(
        base_url=str(client.make_url("/v1")), api_key="not-the-key", max_retries=0
    ) as bad:
        with pytest.raises(openai.AuthenticationError):
            await bad.chat.completions.create(model="gpt-4o-mini", messages=_messages("hi"))
    assert sim_stats.requests == 0


async def test_models_list(sdk: openai.AsyncOpenAI) -> None:
    """models.list() through the SDK returns the served models."""
    page = await sdk.models.list()
    assert {m.id for m in page.data} == {"gpt-4o-mini", "gpt-4o", "gpt-4.1-mini"}


@pytest.mark.parametrize("stream", [True, False])
async def test_n_choices_pass_through(sdk: openai.AsyncOpenAI, stream: bool) -> None:
    """n=3 is relayed as asked: three choices, each complete, usage counting all of them."""
    prompt = "choose [sim chunks=4]"
    texts: dict[int, str] = {}
    if stream:
        chunks = await sdk.chat.completions.create(
            model="gpt-4o-mini",
            messages=_messages(prompt),
            n=3,
            stream=True,
            stream_options={"include_usage": True},
        )
        usage = None
        finishes = {}
        async for chunk in chunks:
            usage = chunk.usage or usage
            for choice in chunk.choices:
                texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
                if choice.finish_reason:
                    finishes[choice.index] = choice.finish_reason
        assert finishes == {0: "stop", 1: "stop", 2: "stop"}
    else:
        completion = await sdk.chat.completions.create(
            model="gpt-4o-mini", messages=_messages(prompt), n=3
        )
        texts = {c.index: c.message.content or "" for c in completion.choices}
        usage = completion.usage
    assert sorted(texts) == [0, 1, 2]
    assert texts[0] == _expected_text(prompt, 4)
    assert len(set(texts.values())) > 1  # three replies, not one copied
    assert usage is not None
    assert usage.completion_tokens == 3 * 4


async def test_unknown_parameters_reach_the_provider(
    sdk: openai.AsyncOpenAI, sim_stats: SimStats
) -> None:
    """Parameters Sluice does not know (a newer API's, or a provider's own) pass through."""
    completion = await sdk.chat.completions.create(
        model="gpt-4o-mini",
        messages=_messages("hi [sim chunks=2]"),
        seed=7,
        logit_bias={"1234": -100},
        extra_body={"provider_specific": {"top_k": 40}, "reasoning_effort": "low"},
    )
    assert completion.choices[0].message.content == _expected_text("hi [sim chunks=2]", 2)
    assert sim_stats.last_body is not None
    sent = sim_stats.last_body
    assert sent["provider_specific"] == {"top_k": 40}
    assert sent["reasoning_effort"] == "low"
    assert (sent["seed"], sent["logit_bias"]) == (7, {"1234": -100})


# --- what the SDK's own retries may buy --------------------------------------------------


def _retrying(settings: Settings, attempts: int, **provider: float) -> Settings:
    """The gateway retrying ``attempts`` times at once, its breaker out of the way."""
    settings = replace(
        _quick_teardown(settings),
        resilience=replace(
            settings.resilience,
            retry_max_attempts=attempts,
            retry_base_delay_s=0.001,
            retry_max_delay_s=0.001,
            breaker_fail_max=1000,
        ),
    )
    return replace(settings, provider=replace(settings.provider, **provider))


@pytest.mark.parametrize(
    ("text", "stream", "attempts", "status", "calls"),
    [
        ("cut off [sim chunks=5 reset_after=2]", False, 3, 502, 1),  # answered, then broken
        ("held [sim header_delay_ms=60000]", True, 3, 504, 1),  # went out, then the deadline
        ("failing [sim fail=500]", False, 2, 502, 2),  # the gateway retried it already
    ],
)
async def test_the_sdk_does_not_buy_again_what_the_gateway_would_not(
    gateway: GatewayFactory,
    settings: Settings,
    sim_stats: SimStats,
    text: str,
    stream: bool,
    attempts: int,
    status: int,
    calls: int,
) -> None:
    """A failure the provider may have generated (and billed), or one the gateway already
    retried, says ``x-should-retry: false``: the SDK (two retries of its own) sends nothing
    more, so the provider is called only as often as the gateway chose."""
    deadlines = {"first_token_timeout_s": 0.2, "completion_timeout_s": 0.2}
    client = await gateway(_retrying(settings, attempts, **deadlines))
    sdk_client = openai.AsyncOpenAI(
        base_url=str(client.make_url("/v1")), api_key=DEV_KEY, max_retries=2
    )
    async with sdk_client:
        with pytest.raises(openai.APIStatusError) as caught:  # (a stream's: before its 200)
            await sdk_client.chat.completions.create(
                model="gpt-4o-mini", messages=_messages(text), stream=stream
            )
    assert caught.value.status_code == status
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert sim_stats.requests == calls


async def test_a_provider_failure_the_gateway_did_not_retry_is_left_to_the_client(
    gateway: GatewayFactory, settings: Settings
) -> None:
    """With the gateway's retries off (one attempt), a provider 5xx is the client's to retry:
    no ``x-should-retry`` says otherwise."""
    client = await gateway(_retrying(settings, 1))
    response = await client.post(
        "/v1/chat/completions",
        json={"model": "gpt-4o-mini", "messages": _messages("[sim fail=500]")},
        headers={"Authorization": f"Bearer {DEV_KEY}"},
    )
    assert response.status == 502
    assert "x-should-retry" not in response.headers
