"""The response cache over the wire: hit, miss and bypass for streamed and JSON answers,
tenant isolation, only completed answers stored, and the cached-only degradation tier.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import pytest

from service import registry as registry_module
from service.appkeys import GATE, RESPONDER, STREAMS
from service.auth import add_key
from service.cache import CACHE_HEADER, MemoryResponseCache
from service.relay import FALLBACK_HEADER, MODEL_HEADER, STREAM_ID_HEADER
from service.settings import AuthSettings, CacheSettings, Settings
from service.simulator import SimStats
from tests.conftest import AUTH, chat_body
from tests.resilient import Rig, start

Reply = tuple[int, dict[str, str], bytes]


async def post(
    rig: Rig,
    text: str,
    *,
    stream: bool = False,
    auth: dict[str, str] = AUTH,
    cache: str | None = None,
    **extra: Any,
) -> Reply:
    """POST a chat completion and wait until its stream has fully retired (cache filled)."""
    headers = {**auth, **({CACHE_HEADER: cache} if cache else {})}
    response = await rig.client.post(
        "/v1/chat/completions", json=chat_body(text, stream=stream, **extra), headers=headers
    )
    raw = await response.read()
    held = rig.client.app[STREAMS].get(response.headers.get(STREAM_ID_HEADER, ""))
    if held is not None:
        await rig.client.app[STREAMS].settled(held)
    return response.status, dict(response.headers), raw


def events(raw: bytes) -> list[tuple[bytes, bytes]]:
    """(id, data) of each SSE event."""
    found = []
    for block in raw.split(b"\n\n"):
        fields = dict(line.split(b": ", 1) for line in block.split(b"\n") if b": " in line)
        if b"data" in fields:
            found.append((fields.get(b"id", b""), fields[b"data"]))
    return found


async def test_an_answer_just_given_answers_the_same_request_at_once(
    aiohttp_client: Any, settings: Settings, sim_stats: SimStats, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ended streams fill the cache as they are retired, in batches (``registry.py``); a
    request that one of them would answer has them retired first: asked again the moment
    the first answer arrived, it is a hit, not a second provider call."""
    monkeypatch.setattr(registry_module, "RETIRE_BATCH_S", 3600.0)  # only when asked
    rig = await start(aiohttp_client, settings)
    replies = []
    for _ in range(2):
        response = await rig.client.post(
            "/v1/chat/completions",
            json=chat_body("again [sim chunks=4]", stream=True, temperature=0),
            headers=AUTH,
        )
        replies.append((response.headers[CACHE_HEADER], await response.read()))
    assert [status for status, _ in replies] == ["miss", "hit"]
    assert events(replies[0][1]) == events(replies[1][1])
    assert sim_stats.requests == 1


async def test_a_whole_number_past_64_bits_is_a_cache_key_too(
    aiohttp_client: Any, settings: Settings, sim_stats: SimStats
) -> None:
    """``top_p: 1e20`` in a deterministic request: its key keeps the float (no 64-bit
    integer holds it); the request is answered, then answered from the cache."""
    rig = await start(aiohttp_client, settings)
    for expected in ("miss", "hit"):
        status, headers, _ = await post(rig, "big [sim chunks=2]", temperature=0, top_p=1e20)
        assert (status, headers[CACHE_HEADER]) == (200, expected)
    assert sim_stats.requests == 1


async def test_streamed_answer_is_cached_and_replayed_as_a_stream(
    aiohttp_client: Any, settings: Settings, sim_stats: SimStats
) -> None:
    """temperature 0: a miss fills the cache; the same request replays the same chunks as
    numbered SSE events ending in [DONE], without calling the provider."""
    rig = await start(aiohttp_client, settings)
    status, first_headers, first = await post(rig, "det [sim chunks=4]", stream=True, temperature=0)
    assert (status, first_headers[CACHE_HEADER]) == (200, "miss")
    status, headers, second = await post(rig, "det [sim chunks=4]", stream=True, temperature=0)
    assert (status, headers[CACHE_HEADER]) == (200, "hit")
    assert headers["Content-Type"].startswith("text/event-stream")
    assert headers[MODEL_HEADER] == "gpt-4o-mini"
    assert sim_stats.requests == 1
    replayed = events(second)
    assert [data for _, data in replayed] == [data for _, data in events(first)]
    assert [seq for seq, _ in replayed] == [str(n).encode() for n in range(1, 8)]
    assert replayed[-1][1] == b"[DONE]"
    hit = rig.client.app[STREAMS].get(headers[STREAM_ID_HEADER])
    assert hit is not None
    assert hit.cache_hit
    assert hit.progress.text == "".join(
        orjson.loads(data)["choices"][0]["delta"].get("content", "")
        for _, data in replayed[:-1]
        if orjson.loads(data)["choices"]
    )


async def test_json_answer_is_cached_and_returned_as_json(
    aiohttp_client: Any, settings: Settings, sim_stats: SimStats
) -> None:
    """A non-streamed hit returns the stored JSON body byte for byte."""
    rig = await start(aiohttp_client, settings)
    _, miss_headers, first = await post(rig, "det", temperature=0)
    _, headers, second = await post(rig, "det", temperature=0)
    assert (miss_headers[CACHE_HEADER], headers[CACHE_HEADER]) == ("miss", "hit")
    assert headers["Content-Type"].startswith("application/json")
    assert second == first
    assert sim_stats.requests == 1


async def test_a_cached_stream_answers_a_json_request(
    aiohttp_client: Any, settings: Settings, sim_stats: SimStats, sim_url: str
) -> None:
    """A streamed miss serves a later JSON request, assembled into exactly the completion
    the provider returns for that JSON request itself."""
    rig = await start(aiohttp_client, settings)
    text = "form [sim chunks=5 created=7]"
    await post(rig, text, stream=True, temperature=0)
    status, headers, raw = await post(rig, text, temperature=0)
    assert (status, headers[CACHE_HEADER]) == (200, "hit")
    assert sim_stats.requests == 1
    direct = await rig.client.session.post(
        f"{sim_url}/chat/completions", json=chat_body(text, stream=False, temperature=0)
    )
    assert orjson.loads(raw) == await direct.json()


async def test_a_cached_tool_call_stream_answers_as_json(
    aiohttp_client: Any, settings: Settings, sim_stats: SimStats
) -> None:
    """Streamed tool-call fragments are merged into one call in the JSON hit."""
    rig = await start(aiohttp_client, settings)
    text = "tools [sim chunks=0 tool_call=lookup]"
    await post(rig, text, stream=True, temperature=0)
    _, headers, raw = await post(rig, text, temperature=0)
    assert headers[CACHE_HEADER] == "hit"
    choice = orjson.loads(raw)["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["tool_calls"] == [
        {
            "id": "call_sim_lookup",
            "type": "function",
            "function": {"name": "lookup", "arguments": '{"query": "sim"}'},
        }
    ]
    assert sim_stats.requests == 1


async def test_logprobs_requests_only_hit_the_same_form(
    aiohttp_client: Any, settings: Settings, sim_stats: SimStats
) -> None:
    """Conversion would drop logprobs, so such a request is only served by its own form."""
    rig = await start(aiohttp_client, settings)
    await post(rig, "lp", stream=True, temperature=0, logprobs=True)
    _, headers, _ = await post(rig, "lp", temperature=0, logprobs=True)
    assert headers[CACHE_HEADER] == "miss"
    _, headers, _ = await post(rig, "lp", temperature=0, logprobs=True)
    assert headers[CACHE_HEADER] == "hit"
    assert sim_stats.requests == 2


async def test_a_cached_json_answer_replays_as_a_stream(
    aiohttp_client: Any, settings: Settings, sim_stats: SimStats
) -> None:
    """A JSON miss serves a later streaming request as numbered chunks ending in [DONE],
    with the usage chunk only for a client that asked for it."""
    rig = await start(aiohttp_client, settings)
    _, _, first = await post(rig, "form", temperature=0)
    completion = orjson.loads(first)
    _, headers, raw = await post(rig, "form", stream=True, temperature=0)
    assert headers[CACHE_HEADER] == "hit"
    replayed = [orjson.loads(d) for _, d in events(raw)[:-1]]
    assert events(raw)[-1][1] == b"[DONE]"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in replayed)
    assert text == completion["choices"][0]["message"]["content"]
    assert replayed[-1]["choices"][0]["finish_reason"] == "stop"
    assert all(c["choices"] for c in replayed)

    _, _, raw = await post(
        rig, "form", stream=True, temperature=0, stream_options={"include_usage": True}
    )
    last = orjson.loads(events(raw)[-2][1])
    assert (last["choices"], last["usage"]) == ([], completion["usage"])
    assert sim_stats.requests == 1


async def test_a_cached_answer_with_no_choices_replays_as_a_stream_with_its_usage(
    aiohttp_client: Any, settings: Settings
) -> None:
    """A JSON answer with ``choices: []`` (a provider's refusal by filter, say), cached,
    answers a stream that asks for usage with the usage chunk and [DONE], not a 500."""
    rig = await start(aiohttp_client, settings)
    await post(rig, "empty", temperature=0)
    store = rig.client.app[RESPONDER]._cache
    assert isinstance(store, MemoryResponseCache)
    ((key, (expires, entry)),) = store._entries.items()
    answer = {**orjson.loads(entry.payloads[0]), "choices": []}
    store._entries[key] = (expires, replace(entry, payloads=(orjson.dumps(answer),)))
    status, headers, raw = await post(
        rig, "empty", stream=True, temperature=0, stream_options={"include_usage": True}
    )
    assert (status, headers[CACHE_HEADER]) == (200, "hit")
    (usage, done) = events(raw)
    assert orjson.loads(usage[1])["usage"] == entry.usage
    assert done[1] == b"[DONE]"


async def test_usage_chunk_is_stored_once_and_sent_only_when_asked(
    aiohttp_client: Any, settings: Settings, sim_stats: SimStats
) -> None:
    """A stream cached from an include_usage client replays without the usage chunk to a
    client that did not ask, and with it to one that did."""
    rig = await start(aiohttp_client, settings)
    usage = {"include_usage": True}
    _, _, first = await post(rig, "u", stream=True, temperature=0, stream_options=usage)
    _, _, plain = await post(rig, "u", stream=True, temperature=0)
    _, _, again = await post(rig, "u", stream=True, temperature=0, stream_options=usage)
    assert b'"choices":[]' not in plain
    assert [d for _, d in events(again)] == [d for _, d in events(first)]
    assert sim_stats.requests == 1


async def test_nondeterministic_requests_bypass_unless_opted_in(
    aiohttp_client: Any, settings: Settings, sim_stats: SimStats
) -> None:
    """Without temperature 0 the cache is bypassed; ``X-Sluice-Cache: use`` opts in;
    ``X-Sluice-Cache: bypass`` opts a deterministic request out."""
    rig = await start(aiohttp_client, settings)
    seen = [(await post(rig, "warm", temperature=0.7))[1][CACHE_HEADER] for _ in range(2)]
    assert seen == ["bypass", "bypass"]
    seen = [
        (await post(rig, "warm", temperature=0.7, cache="use"))[1][CACHE_HEADER] for _ in range(2)
    ]
    assert seen == ["miss", "hit"]
    await post(rig, "cold", temperature=0)
    _, headers, _ = await post(rig, "cold", temperature=0, cache="bypass")
    assert headers[CACHE_HEADER] == "bypass"
    assert sim_stats.requests == 5


async def test_tenants_never_share_entries(
    aiohttp_client: Any, settings: Settings, sim_stats: SimStats, tmp_path: Path
) -> None:
    """The same request from another tenant misses; from the same tenant it hits."""
    keys = tmp_path / "keys.json"
    alice = add_key(keys, user="alice", tenant="acme")
    carol = add_key(keys, user="carol", tenant="acme")
    bob = add_key(keys, user="bob", tenant="globex")
    rig = await start(
        aiohttp_client, replace(settings, auth=AuthSettings(client_keys_file=keys, dev_key=None))
    )

    async def ask(key: str) -> str:
        _, headers, _ = await post(
            rig, "shared", temperature=0, auth={"Authorization": f"Bearer {key}"}
        )
        return headers[CACHE_HEADER]

    assert [await ask(alice), await ask(bob), await ask(carol), await ask(bob)] == [
        "miss",
        "miss",
        "hit",
        "hit",
    ]
    assert sim_stats.requests == 2


async def test_incomplete_streams_are_not_cached(
    aiohttp_client: Any, settings: Settings, sim_stats: SimStats
) -> None:
    """A stream the provider cut off is not stored: the next identical request misses."""
    rig = await start(aiohttp_client, settings)
    _, _, raw = await post(rig, "cut [sim reset_after=2]", stream=True, temperature=0)
    assert b'"error"' in events(raw)[-1][1]
    _, headers, _ = await post(rig, "cut [sim reset_after=2]", stream=True, temperature=0)
    assert headers[CACHE_HEADER] == "miss"
    assert sim_stats.requests == 2


async def test_cached_only_tier_answers_when_the_provider_cannot(
    aiohttp_client: Any, settings: Settings, sim_stats: SimStats
) -> None:
    """With the breaker open and no fallback left, a stored answer to the same request is
    served (hit, with the reason); a client that opted out gets the 503 instead."""
    rig = await start(aiohttp_client, settings)
    _, _, first = await post(rig, "again", stream=True, temperature=0.7, cache="use")
    rig.resilience.breakers.for_model("gpt-4o-mini").open()

    status, headers, raw = await post(rig, "again", stream=True, temperature=0.7)
    assert status == 200
    assert headers[CACHE_HEADER] == "hit"
    assert headers[FALLBACK_HEADER] == "breaker_open"
    assert [d for _, d in events(raw)] == [d for _, d in events(first)]

    status, headers, raw = await post(rig, "again", stream=True, temperature=0.7, cache="bypass")
    assert status == 503
    assert orjson.loads(raw)["error"]["code"] == "circuit_open"
    assert headers[CACHE_HEADER] == "bypass"
    assert "Retry-After" in headers
    assert sim_stats.requests == 1


async def test_disabled_cache_always_bypasses(
    aiohttp_client: Any, settings: Settings, sim_stats: SimStats
) -> None:
    """SLUICE_CACHE=off: every request goes to the provider, marked bypass."""
    rig = await start(aiohttp_client, replace(settings, cache=CacheSettings(enabled=False)))
    for _ in range(2):
        _, headers, _ = await post(rig, "det", temperature=0)
        assert headers[CACHE_HEADER] == "bypass"
    assert sim_stats.requests == 2


async def test_a_hit_spends_no_tokens_of_the_minutes(
    aiohttp_client: Any, settings: Settings, sim_stats: SimStats
) -> None:
    """The provider did nothing for a hit: its settlement gives back every token it reserved
    of the tokens-per-minute limits (the miss settles its real usage)."""
    rig = await start(aiohttp_client, settings)
    limiter = rig.client.app[GATE].limiter
    settled: list[int] = []
    finish = limiter.finish

    async def recording(grant: Any, used_tokens: int) -> None:
        settled.append(used_tokens)
        await finish(grant, used_tokens)

    limiter.finish = recording  # type: ignore[method-assign]
    for expected in ("miss", "hit"):
        status, headers, _ = await post(rig, "det [sim chunks=4]", temperature=0)
        assert (status, headers[CACHE_HEADER]) == (200, expected)
    assert settled[0] > 0
    assert settled[1] == 0
    assert sim_stats.requests == 1
