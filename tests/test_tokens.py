"""Token counting: tiktoken's real encodings, loaded offline, and OpenAI's chat overheads."""

from __future__ import annotations

import socket
import threading
import warnings
from pathlib import Path
from typing import Any

import orjson
import pytest
import tiktoken
import tiktoken.registry

from service import tokens
from service.appkeys import STREAMS
from tests.conftest import AUTH, GatewayFactory, chat_body

# OpenAI cookbook, "How to count tokens with tiktoken", sections 6 and 7, whose printed
# outputs show the API's own usage.prompt_tokens: 129 (gpt-3.5/gpt-4), 124 (gpt-4o/-mini)
# for the messages; 105 and 101 for the weather tool example.
COOKBOOK_MESSAGES = [
    {
        "role": "system",
        "content": "You are a helpful, pattern-following assistant that translates corporate "
        "jargon into plain English.",
    },
    {
        "role": "system",
        "name": "example_user",
        "content": "New synergies will help drive top-line growth.",
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Things working well together will increase revenue.",
    },
    {
        "role": "system",
        "name": "example_user",
        "content": "Let's circle back when we have more bandwidth to touch base on opportunities "
        "for increased leverage.",
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Let's talk later when we're less busy about how to do better.",
    },
    {
        "role": "user",
        "content": "This late pivot means we don't have time to boil the ocean for the client "
        "deliverable.",
    },
]
COOKBOOK_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_current_weather",
            "description": "Get the current weather in a given location",
            "parameters": {
                "type": "object",
                "properties": {
                    "location": {
                        "type": "string",
                        "description": "The city and state, e.g. San Francisco, CA",
                    },
                    "unit": {
                        "type": "string",
                        "description": "The unit of temperature to return",
                        "enum": ["celsius", "fahrenheit"],
                    },
                },
                "required": ["location"],
            },
        },
    }
]
COOKBOOK_TOOL_MESSAGES = [
    {
        "role": "system",
        "content": "You are a helpful assistant that can answer to questions about the weather.",
    },
    {"role": "user", "content": "What's the weather like in San Francisco?"},
]


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[Any]:
    """No network, an empty tiktoken cache, and no encoding loaded yet in this process."""
    attempts: list[Any] = []

    def refuse(self: socket.socket, address: Any) -> None:
        attempts.append(address)
        raise OSError("network disabled in this test")

    def no_dns(*args: Any, **kwargs: Any) -> Any:
        attempts.append(args[:2])
        raise socket.gaierror("name resolution disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tokens, "_loaded", {})
    return attempts


def test_encodings_load_offline_and_count_known_values(offline: list[Any], tmp_path: Path) -> None:
    """Both encodings build from the packaged files with sockets disabled and count right."""
    o200k = tokens.get_encoding(tokens.O200K)
    cl100k = tokens.get_encoding(tokens.CL100K)
    assert o200k.encode("hello world") == [24912, 2375]
    assert cl100k.encode("hello world") == [15339, 1917]
    assert cl100k.encode("tiktoken is great!") == [83, 1609, 5963, 374, 2294, 0]
    assert o200k.encode("tiktoken is great!") == [83, 8251, 2488, 382, 2212, 0]
    assert tokens.count_text("gpt-4o", "hello world") == 2
    assert tokens.count_text("gpt-4", "hello world") == 2
    assert tokens.count_text("gpt-4", "tiktoken is great!") == 6
    assert tokens.count_text("gpt-4o-mini", "tiktoken is great!") == 6
    assert o200k.n_vocab == 200019
    assert cl100k.n_vocab == 100277
    # The API's own prompt_tokens for the cookbook's chat (with and without tools).
    assert tokens.count_chat("gpt-4", {"messages": COOKBOOK_MESSAGES}) == 129
    assert tokens.count_chat("gpt-4o", {"messages": COOKBOOK_MESSAGES}) == 124
    tool_body = {"messages": COOKBOOK_TOOL_MESSAGES, "tools": COOKBOOK_TOOLS}
    assert tokens.count_chat("gpt-4", tool_body) == 105
    assert tokens.count_chat("gpt-4o-mini", tool_body) == 101
    assert offline == []  # nothing tried to connect
    assert list(tmp_path.iterdir()) == []  # and tiktoken's download cache stayed empty


def test_the_offline_fixture_really_cuts_the_network(offline: list[Any]) -> None:
    """The contrast: tiktoken's own loader tries to download cl100k_base and fails here."""
    tiktoken.registry.ENCODINGS.pop(tokens.CL100K, None)  # never cached: loading fails
    with pytest.raises(Exception, match="openaipublic"):
        tiktoken.get_encoding(tokens.CL100K)
    assert offline  # the download was attempted, and refused


def test_counts_agree_with_bpe_openai_rust_tokenizer() -> None:
    """A second, independent implementation (bpe-openai's Rust crate) gives the same tokens."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # bpe_openai's own import
        from bpe_openai import _bindings

    texts = [
        "hello world",
        "tiktoken is great!",
        "antidisestablishmentarianism",
        "2 + 2 = 4",
        "お誕生日おめでとう",
        "def f(x):\n    return x ** 2  # 🚀\n",
    ]
    for name in (tokens.O200K, tokens.CL100K):
        rust = _bindings.tokenizer_for_encoding(name)
        ours = tokens.get_encoding(name)
        for text in texts:
            assert ours.encode_ordinary(text) == rust.encode(text), (name, text)


@pytest.mark.parametrize(
    ("model", "expected"), [("gpt-4", 129), ("gpt-3.5-turbo", 129), ("gpt-4o", 124)]
)
def test_chat_count_matches_openai_cookbook(model: str, expected: int) -> None:
    """3 tokens per message, +1 per name, +3 reply priming: the API's own prompt_tokens."""
    assert tokens.count_chat(model, {"messages": COOKBOOK_MESSAGES}) == expected


@pytest.mark.parametrize(("model", "expected"), [("gpt-4", 105), ("gpt-4o-mini", 101)])
def test_tool_definitions_count_like_openai_cookbook(model: str, expected: int) -> None:
    """Tool definitions count (cookbook's num_tokens_for_tools), matching the API's figures."""
    body = {"messages": COOKBOOK_TOOL_MESSAGES, "tools": COOKBOOK_TOOLS}
    assert tokens.count_chat(model, body) == expected
    legacy = {"messages": COOKBOOK_TOOL_MESSAGES, "functions": [COOKBOOK_TOOLS[0]["function"]]}
    assert tokens.count_chat(model, legacy) == expected


@pytest.mark.parametrize(
    ("model", "encoding"),
    [
        ("gpt-4o", "o200k_base"),
        ("gpt-4o-mini-2024-07-18", "o200k_base"),
        ("gpt-4.1-nano", "o200k_base"),
        ("o1", "o200k_base"),
        ("o3-mini", "o200k_base"),
        ("o4-mini", "o200k_base"),
        ("gpt-5-mini", "o200k_base"),
        ("ft:gpt-4o-mini:acme::abc", "o200k_base"),
        ("gpt-4", "cl100k_base"),
        ("gpt-4-turbo", "cl100k_base"),
        ("gpt-3.5-turbo-0125", "cl100k_base"),
        ("text-embedding-3-small", "cl100k_base"),
        ("some-local-llama", "o200k_base"),
    ],
)
def test_model_encoding_map(model: str, encoding: str) -> None:
    """Each model family maps to its real encoding; unknown models default to o200k_base."""
    assert tokens.encoding_name_for_model(model) == encoding


def test_special_tokens_and_multipart_content_count_as_text() -> None:
    """Special-token strings are plain text; content parts count their text, images a floor."""
    assert tokens.count_text("gpt-4o", "<|endoftext|>") > 1
    parts = [
        {"type": "text", "text": "hello world"},
        {"type": "image_url", "image_url": {"url": "data:,"}},
    ]
    as_parts = tokens.count_chat("gpt-4o", {"messages": [{"role": "user", "content": parts}]})
    plain = tokens.count_chat("gpt-4o", {"messages": [{"role": "user", "content": "hello world"}]})
    assert as_parts == plain + tokens.IMAGE_PART_TOKENS


def test_images_are_counted_and_priced_at_their_most() -> None:
    """Image parts of either API's shape are counted; the most an image can cost depends on
    how the model prices images (gpt-4o-mini's tokens are many and cheap)."""
    image = {"type": "image_url", "image_url": {"url": "data:,"}}
    body = {
        "messages": [
            {"role": "system", "content": "plain"},
            {"role": "user", "content": [{"type": "text", "text": "two"}, image, image]},
            {"role": "user", "content": [{"type": "input_image", "image_url": "data:,"}]},
            "not a message",
        ]
    }
    assert tokens.count_images(body) == 3
    assert tokens.count_images({"messages": [{"role": "user", "content": "none"}]}) == 0
    assert tokens.image_max_tokens("gpt-4o") == tokens.IMAGE_MAX_TOKENS
    assert tokens.image_max_tokens("gpt-4o-mini-2024-07-18") == 48_169
    assert tokens.image_max_tokens("ft:gpt-4o-mini:acme::abc") == 48_169
    assert tokens.IMAGE_MAX_TOKENS > tokens.IMAGE_PART_TOKENS


def test_loading_is_once_per_process_across_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Threads racing to load an encoding build it once and all get the same object."""
    monkeypatch.setattr(tokens, "_loaded", {})
    builds: list[str] = []
    real_build = tokens._build

    def counting_build(name: str) -> Any:
        builds.append(name)
        return real_build(name)

    monkeypatch.setattr(tokens, "_build", counting_build)
    results: list[Any] = []
    threads = [
        threading.Thread(target=lambda: results.append(tokens.get_encoding(tokens.CL100K)))
        for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert builds == [tokens.CL100K]
    assert all(r is results[0] for r in results)
    assert len(results) == 8


def test_a_tampered_data_file_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """The decompressed file must hash to tiktoken's expected SHA-256, or nothing loads."""
    spec = tokens._SPECS[tokens.CL100K]
    monkeypatch.setitem(
        tokens._SPECS, tokens.CL100K, tokens._Spec("0" * 64, spec.pat_str, {}, spec.func_init)
    )
    with pytest.raises(tokens.EncodingDataError, match="expected hash"):
        tokens._build(tokens.CL100K)


async def test_simulated_usage_matches_tiktoken(gateway: GatewayFactory) -> None:
    """The simulator's usage.prompt_tokens is tiktoken's count_chat of the same request."""
    client = await gateway()
    body = chat_body(
        "Count me, please: tiktoken is great! [sim chunks=3]",
        stream=False,
        messages=[
            *COOKBOOK_TOOL_MESSAGES,
            {"role": "user", "content": "and again, tiktoken is great! [sim chunks=3]"},
        ],
        tools=COOKBOOK_TOOLS,
    )
    response = await client.post("/v1/chat/completions", json=body, headers=AUTH)
    assert response.status == 200
    usage = orjson.loads(await response.read())["usage"]
    assert usage["prompt_tokens"] == tokens.count_chat("gpt-4o-mini", body)
    assert usage["completion_tokens"] == 3


async def test_checkpoint_counts_with_tiktoken_when_the_provider_sends_no_usage(
    gateway: GatewayFactory,
) -> None:
    """Without provider usage, the registry's checkpoint counts prompt and text with tiktoken."""
    client = await gateway()
    body = chat_body("tiktoken is great! [sim chunks=4 reset_after=2]")
    response = await client.post("/v1/chat/completions", json=body, headers=AUTH)
    await response.read()
    stream = client.app[STREAMS].get(response.headers["X-Sluice-Stream-Id"])
    assert stream is not None
    await client.app[STREAMS].settled(stream)
    checkpoint = client.app[STREAMS].snapshot(stream)
    assert not checkpoint.usage_reported
    assert checkpoint.prompt_tokens == tokens.count_chat("gpt-4o-mini", body)
    assert checkpoint.completion_tokens == tokens.count_text("gpt-4o-mini", checkpoint.text) == 2


def test_odd_function_schemas_are_counted_not_fatal() -> None:
    """A schema whose ``properties`` is not an object, or a function that is not one, is the
    provider's to refuse: counting passes over it instead of failing the request."""
    encoding = tokens.get_encoding(tokens.O200K)
    odd = [{"name": "f", "parameters": {"properties": [1]}}, 7, {"name": "g", "parameters": 1}]
    plain = [{"name": "f"}, {"name": "g"}]
    assert tokens.count_tools(encoding, odd) == tokens.count_tools(encoding, plain)


class _CountingEncoding:
    """An encoding that counts characters and how often it was asked."""

    name = "chars"

    def __init__(self) -> None:
        self.calls = 0

    def encode_ordinary(self, text: str) -> list[int]:
        self.calls += 1
        return [0] * len(text)


def test_a_conversation_resent_is_not_counted_again() -> None:
    """The turns a frontend sends again are answered from the cache; the least recently used
    text is the one forgotten when the cache is full."""
    counts = tokens._Counts(kept=2)
    encoding: Any = _CountingEncoding()
    assert [counts(encoding, t) for t in ("one", "three", "one")] == [3, 5, 3]
    assert encoding.calls == 2
    counts(encoding, "four")  # full: "three" was used least recently
    assert [counts(encoding, t) for t in ("one", "four")] == [3, 4]
    assert encoding.calls == 3
    assert counts(encoding, "three") == 5
    assert encoding.calls == 4


def test_cached_counts_are_kept_apart_by_encoding() -> None:
    """The same text under another encoding is counted again, never taken from the cache."""
    counts = tokens._Counts(kept=8)
    words = "hello hello hello 🤖"
    o200k, cl100k = tokens.get_encoding(tokens.O200K), tokens.get_encoding(tokens.CL100K)
    expected = [len(o200k.encode_ordinary(words)), len(cl100k.encode_ordinary(words))]
    assert expected[0] != expected[1]
    assert [counts(o200k, words), counts(cl100k, words)] == expected
    assert [counts(o200k, words), counts(cl100k, words)] == expected


@pytest.mark.parametrize(
    "hidden",
    [
        {"type": "custom", "custom": {"name": "notes", "description": "{text}"}},
        {"type": "function", "function": {"name": "f", "parameters": {"$defs": {"t": "{text}"}}}},
        {
            "type": "function",
            "function": {
                "name": "f",
                "parameters": {"type": "object", "properties": {"a": {"default": "{text}"}}},
            },
        },
    ],
    ids=["custom tool", "$defs", "a property's default"],
)
def test_text_hidden_in_a_tool_definition_counts(hidden: dict[str, Any]) -> None:
    """The model reads all of a tool's definition: text the cookbook's formula skips (a
    custom tool, a schema's ``$defs``, a default) was counted as nothing, so a budget's
    worst case for a huge prompt could be a few tokens, and many at once overspend it."""
    text = "lorem ipsum dolor sit amet " * 400  # ~2,000 tokens
    tool = orjson.loads(orjson.dumps(hidden).replace(b"{text}", text.encode()))
    body = {"messages": [{"role": "user", "content": "hi"}], "tools": [tool]}
    assert tokens.count_chat("gpt-4o", body) > tokens.count_text("gpt-4o", text)


def test_an_assistant_s_tool_calls_count_with_their_arguments() -> None:
    """``tool_calls`` in an assistant message are prompt tokens too (their arguments can be
    long): not mistaken for content parts (they have a ``type`` too) and counted as zero."""
    arguments = orjson.dumps({"rows": list(range(2000))}).decode()
    call = {"id": "call_1", "type": "function", "function": {"name": "run", "arguments": arguments}}
    body = {"messages": [{"role": "assistant", "content": None, "tool_calls": [call]}]}
    encoding = tokens.get_encoding("o200k_base")
    assert tokens.count_chat("gpt-4o", body) > len(encoding.encode(arguments))


def test_refusal_parts_and_a_structured_output_schema_count() -> None:
    """An assistant's refusal part is text it said; a ``json_schema`` response format is read
    by the model: both are prompt tokens (the schema counted as its JSON)."""
    said = "I can't help with that request, sorry."
    refusal = [{"type": "refusal", "refusal": said}]
    as_part = {"messages": [{"role": "assistant", "content": refusal}]}
    as_text = {"messages": [{"role": "assistant", "content": said}]}
    assert tokens.count_chat("gpt-4o", as_part) == tokens.count_chat("gpt-4o", as_text)
    schema = {"name": "row", "schema": {"type": "object", "properties": {"a": {"type": "string"}}}}
    plain = {"messages": [{"role": "user", "content": "hi"}]}
    shaped = {**plain, "response_format": {"type": "json_schema", "json_schema": schema}}
    encoding = tokens.get_encoding("o200k_base")
    extra = len(encoding.encode(orjson.dumps(schema).decode()))
    assert tokens.count_chat("gpt-4o", shaped) == tokens.count_chat("gpt-4o", plain) + extra
    loose = {**plain, "response_format": {"type": "json_object"}}
    assert tokens.count_chat("gpt-4o", loose) == tokens.count_chat("gpt-4o", plain)


def test_a_long_text_is_counted_exactly_to_a_point_and_estimated_past_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Up to ``EXACT_CHARS`` a count is tiktoken's; past it the rest is estimated at the
    rate of the part counted (bounded time and memory on the loop, whatever a provider
    sends), and a text of one rate throughout counts as it would exactly."""
    monkeypatch.setattr(tokens, "EXACT_CHARS", 1000)
    short = "hello world " * 80  # 960 characters
    assert tokens.count_text("gpt-4o-mini", short) == len(
        tokens.get_encoding(tokens.O200K).encode_ordinary(short)
    )
    encoding = tokens.get_encoding(tokens.O200K)
    long = "hello world " * 10_000
    exact = len(encoding.encode_ordinary(long))
    assert abs(tokens.count_text("gpt-4o-mini", long) - exact) <= exact // 100
    mixed = "x" * 1000 + "hello world " * 1000  # two rates: the estimate shows
    head = len(encoding.encode_ordinary(mixed[:1000]))
    estimate = head + -(-head * (len(mixed) - 1000) // 1000)
    assert tokens.count_text("gpt-4o-mini", mixed) == estimate
    assert estimate != len(encoding.encode_ordinary(mixed))
