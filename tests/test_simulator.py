"""The simulated provider: each ``[sim ...]`` directive does what it says, over a real socket.

Tests talk to the simulator directly (no gateway) and check both the bytes it sends and
what it counted in ``SimStats``, waiting on those counts instead of sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestServer

from service.simulator import Directive, SimStats, completion_words, prompt_text
from service.tokens import CL100K, O200K, count_body, get_encoding
from tests.conftest import chat_body
from tests.wire import read_until, sse_data


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


async def _post(
    session: aiohttp.ClientSession, sim: TestServer, text: str, **extra: Any
) -> aiohttp.ClientResponse:
    return await session.post(sim.make_url("/v1/chat/completions"), json=chat_body(text, **extra))


def _chunks(text: str) -> list[dict[str, Any]]:
    return [orjson.loads(d) for d in sse_data(text) if d != "[DONE]"]


def _content(chunks: list[dict[str, Any]]) -> str:
    return "".join(
        c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices")
    )


async def test_stream_shape_and_counts(
    session: aiohttp.ClientSession, sim: TestServer, sim_stats: SimStats
) -> None:
    """chunks=N: a role chunk, N one-word chunks, a finish chunk, [DONE]; counted complete."""
    response = await _post(session, sim, "hello [sim chunks=5]")
    assert response.headers["Content-Type"] == "text/event-stream"
    text = await response.text()
    assert sse_data(text)[-1] == "[DONE]"
    chunks = _chunks(text)
    assert len(chunks) == 1 + 5 + 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert all("usage" not in c for c in chunks)  # only with include_usage
    assert (sim_stats.requests, sim_stats.started, sim_stats.completed) == (1, 1, 1)
    assert sim_stats.open == 0


async def test_usage_equals_text_tokens(session: aiohttp.ClientSession, sim: TestServer) -> None:
    """include_usage: completion_tokens equals the words sent, and their real token count."""
    body = chat_body("count these [sim chunks=17]", stream_options={"include_usage": True})
    response = await session.post(sim.make_url("/v1/chat/completions"), json=body)
    chunks = _chunks(await response.text())
    usage = chunks[-1]["usage"]
    assert chunks[-1]["choices"] == []
    assert all(c["usage"] is None for c in chunks[:-1])
    text = _content(chunks)
    assert usage["completion_tokens"] == 17
    for name in (O200K, CL100K):
        assert len(get_encoding(name).encode(text)) == 17
    assert usage["prompt_tokens"] == count_body(body)  # the conftest's tiktoken counter
    assert usage["total_tokens"] == usage["prompt_tokens"] + 17


async def test_usage_0_ignores_include_usage(
    session: aiohttp.ClientSession, sim: TestServer
) -> None:
    """usage=0: like servers that ignore stream_options, no usage chunk and no usage field."""
    body = chat_body("quiet [sim chunks=3 usage=0]", stream_options={"include_usage": True})
    response = await session.post(sim.make_url("/v1/chat/completions"), json=body)
    chunks = _chunks(await response.text())
    assert len(chunks) == 1 + 3 + 1
    assert all("usage" not in c for c in chunks)


async def test_non_stream_completion(session: aiohttp.ClientSession, sim: TestServer) -> None:
    """stream=false: one chat.completion whose text and usage match the streamed version."""
    prompt = "same prompt [sim chunks=9]"
    whole = await (await _post(session, sim, prompt, stream=False)).json()
    streamed = _chunks(await (await _post(session, sim, prompt)).text())
    assert whole["object"] == "chat.completion"
    assert whole["choices"][0]["message"]["content"] == _content(streamed)
    assert whole["usage"]["completion_tokens"] == 9
    assert whole["choices"][0]["finish_reason"] == "stop"


async def test_deterministic_text(session: aiohttp.ClientSession, sim: TestServer) -> None:
    """The same prompt gives the same text; another prompt gives another text."""
    first = _content(_chunks(await (await _post(session, sim, "a [sim chunks=30]")).text()))
    again = _content(_chunks(await (await _post(session, sim, "a [sim chunks=30]")).text()))
    other = _content(_chunks(await (await _post(session, sim, "b [sim chunks=30]")).text()))
    assert first == again
    assert first != other
    body = chat_body("a [sim chunks=30]")
    assert first == "".join(completion_words(prompt_text(body), 30))


@pytest.mark.parametrize("stream", [True, False])
async def test_fail_with_retry_after(
    session: aiohttp.ClientSession, sim: TestServer, sim_stats: SimStats, stream: bool
) -> None:
    """fail=429 retry_after=2: an OpenAI-shaped 429 (OpenAI's code too) with Retry-After;
    nothing streamed."""
    response = await _post(session, sim, "[sim fail=429 retry_after=2]", stream=stream)
    assert response.status == 429
    assert response.headers["Retry-After"] == "2"
    error = (await response.json())["error"]
    assert error == {
        "message": "simulated failure 429",
        "type": "rate_limit_error",
        "param": None,
        "code": "rate_limit_exceeded",
    }
    assert sim_stats.started == 0


@pytest.mark.parametrize(
    ("status", "kind"), [(400, "invalid_request_error"), (503, "server_error")]
)
async def test_fail_statuses(
    session: aiohttp.ClientSession, sim: TestServer, status: int, kind: str
) -> None:
    """fail=4xx/5xx: that status, typed as a client or a server error."""
    response = await _post(session, sim, f"[sim fail={status}]")
    assert response.status == status
    assert (await response.json())["error"]["type"] == kind
    assert "Retry-After" not in response.headers


async def test_fail_times_then_succeed(
    session: aiohttp.ClientSession, sim: TestServer, sim_stats: SimStats
) -> None:
    """fail_times=2 key=k: the first two attempts with that key fail, the third succeeds."""
    text = "[sim fail=503 fail_times=2 key=k1 chunks=2]"
    statuses = [(await _post(session, sim, text)).status for _ in range(3)]
    assert statuses == [503, 503, 200]
    assert (await _post(session, sim, "[sim fail=503 fail_times=2 key=k2]")).status == 503
    assert sim_stats.attempts == {"k1": 3, "k2": 1}


async def test_reset_after(
    session: aiohttp.ClientSession, sim: TestServer, sim_stats: SimStats
) -> None:
    """reset_after=3: three words, then the connection is dropped without [DONE]."""
    response = await _post(session, sim, "[sim chunks=10 reset_after=3]")
    received = bytearray()

    async def read_all() -> None:
        async for data in response.content.iter_any():
            received.extend(data)

    with pytest.raises(aiohttp.ClientPayloadError):
        await read_all()
    response.close()
    chunks = _chunks(bytes(received).decode())
    assert len(chunks) == 1 + 3
    assert b"[DONE]" not in received
    assert sim_stats.resets == 1
    assert sim_stats.open == 0


async def test_reset_cuts_a_completion_short_until_fail_times(
    session: aiohttp.ClientSession, sim: TestServer, sim_stats: SimStats
) -> None:
    """Not streamed, reset_after cuts the body in half; with fail_times only the first N
    attempts of the key are cut, then the completion comes whole."""
    text = "[sim chunks=4 reset_after=1 fail_times=1 key=cut]"
    cut = await _post(session, sim, text, stream=False)
    assert cut.status == 200
    with pytest.raises(aiohttp.ClientPayloadError):
        await cut.read()
    cut.close()
    whole = await _post(session, sim, text, stream=False)
    body = await whole.json()
    assert body["usage"]["completion_tokens"] == 4
    assert (sim_stats.resets, sim_stats.attempts) == (1, {"cut": 2})


async def test_stall_after(
    session: aiohttp.ClientSession, sim: TestServer, sim_stats: SimStats
) -> None:
    """stall_after=2: two words, then the socket stays open and silent until we hang up."""
    response = await _post(session, sim, "[sim chunks=10 stall_after=2]")
    seen = b""
    while len(_chunks(seen.decode())) < 3:  # role + two words
        seen += await read_until(response, b"\n\n")
    assert len(_chunks(seen.decode())) == 3
    assert sim_stats.open == 1
    assert sim_stats.completed == 0
    response.close()
    await sim_stats.wait_for(lambda s: s.aborted == 1)
    assert sim_stats.chunks_sent == [2]
    assert sim_stats.open == 0


async def test_malformed_after(session: aiohttp.ClientSession, sim: TestServer) -> None:
    """malformed_after=2: after two words, a data line that is not JSON."""
    response = await _post(session, sim, "[sim chunks=4 malformed_after=2]")
    data = sse_data(await response.text())
    assert len(data) == 1 + 2 + 1 + 2 + 1 + 1  # the broken line is extra; the rest follows
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(data[3])
    for good in data[:3]:
        orjson.loads(good)


async def test_error_after_and_echo_key(session: aiohttp.ClientSession, sim: TestServer) -> None:
    """error_after=1 sends an OpenAI error event and stops; echo_key=1 quotes the credential."""
    response = await session.post(
        sim.make_url("/v1/chat/completions"),
        json=chat_body("[sim chunks=5 error_after=1 echo_key=1]"),
        headers={"Authorization": "Bearer sk-echo-me"},
    )
    chunks = _chunks(await response.text())
    assert len(chunks) == 1 + 1 + 1
    error = chunks[-1]["error"]
    assert error["type"] == "server_error"
    assert "sk-echo-me" in error["message"]
    plain = _chunks(await (await _post(session, sim, "[sim chunks=5 error_after=1]")).text())
    assert "Authorization" not in plain[-1]["error"]["message"]


async def test_first_and_header_delays_hold_the_answer(
    session: aiohttp.ClientSession, sim: TestServer, sim_stats: SimStats
) -> None:
    """first_delay_ms holds the first chunk (headers sent); header_delay_ms holds the headers.

    Shown without clocks: with a very long delay, the headers (or not) are what we can read,
    and hanging up is counted as an abort with nothing sent.
    """
    response = await _post(session, sim, "[sim first_delay_ms=600000]")
    assert response.status == 200  # headers are out, the body waits
    assert sim_stats.open == 1
    response.close()
    await sim_stats.wait_for(lambda s: s.aborted == 1)
    assert sim_stats.chunks_sent == [0]

    async def held() -> None:
        url = sim.make_url("/v1/chat/completions")
        async with session.post(url, json=chat_body("[sim header_delay_ms=600000]")):
            raise AssertionError("the status line arrived")

    task = asyncio.create_task(held())
    await sim_stats.wait_for(lambda s: s.requests == 2)
    assert not task.done()  # no status line yet
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await sim_stats.wait_for(lambda s: s.aborted == 2)
    assert sim_stats.started == 1  # the second stream never started


async def test_finish_created_and_tool_call(
    session: aiohttp.ClientSession, sim: TestServer
) -> None:
    """finish=length, created=N and tool_call=name shape the chunks accordingly."""
    chunks = _chunks(
        await (await _post(session, sim, "[sim chunks=2 finish=length created=42]")).text()
    )
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert {c["created"] for c in chunks} == {42}
    tools = _chunks(await (await _post(session, sim, "[sim chunks=1 tool_call=lookup]")).text())
    calls = [c["choices"][0]["delta"].get("tool_calls") for c in tools]
    named = [c for c in calls if c and c[0].get("function", {}).get("name")]
    assert named[0][0]["function"]["name"] == "lookup"
    assert tools[-1]["choices"][0]["finish_reason"] == "tool_calls"
    # Not streamed, the same call in the message (it was lost, and the finish said "stop").
    whole = await (
        await _post(session, sim, "[sim chunks=1 tool_call=lookup]", stream=False)
    ).json()
    choice = whole["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    (call,) = choice["message"]["tool_calls"]
    assert call["function"] == {"name": "lookup", "arguments": '{"query": "sim"}'}


async def test_misbehaviour_after_the_last_chunk_comes_before_the_finish(
    session: aiohttp.ClientSession, sim: TestServer, sim_stats: SimStats
) -> None:
    """``error_after=N`` with N the chunk count: all N chunks, then the error, no finish
    (it had done nothing: a clean stream). Past the count it is a 400."""
    *chunks, last = sse_data(
        await (await _post(session, sim, "[sim chunks=3 error_after=3]")).text()
    )
    assert "error" in orjson.loads(last)
    parsed = [orjson.loads(chunk) for chunk in chunks]
    assert len([c for c in parsed if c["choices"][0]["delta"].get("content")]) == 3
    assert all(c["choices"][0]["finish_reason"] is None for c in parsed)
    assert (await _post(session, sim, "[sim chunks=3 stall_after=4]")).status == 400


@pytest.mark.parametrize(
    ("directive", "named"),
    [
        ("[sim chunkz=3]", "chunkz"),
        ("[sim chunks=5 delay-ms=3]", "delay-ms"),  # not a name=value pair it knows
        ("[sim chunks=5, delay_ms=3]", "chunks=5,"),
        ("[sim chunks = 5]", "chunks"),
    ],
)
async def test_misspelt_directive_is_400(
    session: aiohttp.ClientSession, sim: TestServer, directive: str, named: str
) -> None:
    """A misspelt directive is refused, not silently ignored (served as the default)."""
    response = await _post(session, sim, directive)
    assert response.status == 400
    assert named in (await response.json())["error"]["message"]


@pytest.mark.parametrize(
    ("directive", "named"),
    [
        ("chunks=99999999999999999999", "chunks"),  # would hog the loop `make run` shares
        ("chunks=-1", "chunks"),
        ("chunks=abc", "chunks"),
        ("delay_ms=-5", "delay_ms"),
        ("first_delay_ms=inf", "first_delay_ms"),
        ("header_delay_ms=nan", "header_delay_ms"),
        ("fail=200", "fail"),
        ("fail=99", "fail"),
        ("fail=1000", "fail"),
        ("fail=429 retry_after=nan", "retry_after"),
        ("fail=429 retry_after=-1", "retry_after"),
        ("fail=429 retry_after_ms=-5", "retry_after_ms"),
        ("fail=429 retry_after_ms=inf", "retry_after_ms"),
        ("reset_after=-2", "reset_after"),
        ("chunks=3 malformed_after=4", "malformed_after"),
        ("echo_key=2", "echo_key"),
        ("fail=0", "fail"),  # given, so meant: not "no failure"
        ("retry_after=3", "retry_after"),  # with no fail it would do nothing
        ("retry_after_ms=300", "retry_after"),
        ("usage=7", "usage"),
        ("chunks=1 chunks=2", "chunks"),  # twice: which one was meant?
    ],
)
async def test_out_of_range_directive_is_400(
    session: aiohttp.ClientSession, sim: TestServer, sim_stats: SimStats, directive: str, named: str
) -> None:
    """A directive value that makes no sense is a 400 naming it, never a hang or a crash."""
    for stream in (True, False):
        response = await _post(session, sim, f"[sim {directive}]", stream=stream)
        assert response.status == 400
        error = (await response.json())["error"]
        assert error["type"] == "invalid_request_error"
        assert named in error["message"]
    assert sim_stats.started == 0


@pytest.mark.parametrize(
    "raw",
    [
        b"{not json",
        b"[1, 2]",
        b'{"messages": [{"role": "user", "content": [{"type": "text", "text": 5}, 7]}]}',
        b'{"messages": [{"role": "user", "content": "x"}], "n": "two"}',
        b'{"messages": [{"role": "user", "content": "x"}], "n": 0}',
        b'{"messages": 5}',  # a 500, before
        b'{"messages": [], "stream": true, "stream_options": "yes"}',  # a broken stream
        b'{"messages": [{"role": "user", "content": "[sim chunks=100000]"}], "n": 128}',
    ],
)
async def test_odd_bodies_do_not_crash_it(
    session: aiohttp.ClientSession, sim: TestServer, raw: bytes
) -> None:
    """Whatever it is sent, the simulator answers in OpenAI's shape: no 500, no traceback."""
    response = await session.post(sim.make_url("/v1/chat/completions"), data=raw)
    assert response.status in (200, 400)
    payload = await response.json()
    if response.status == 400:
        assert set(payload) == {"error"}
    assert "Traceback" not in str(payload)


@pytest.mark.parametrize("stream", [True, False])
async def test_n_choices(session: aiohttp.ClientSession, sim: TestServer, stream: bool) -> None:
    """n=3: three choices, each its own deterministic text; usage counts every choice."""
    extra: dict[str, Any] = {"stream_options": {"include_usage": True}} if stream else {}
    response = await _post(session, sim, "many [sim chunks=4]", stream=stream, n=3, **extra)
    assert response.status == 200
    if stream:
        chunks = _chunks(await response.text())
        texts = dict.fromkeys(range(3), "")
        finishes = {}
        for chunk in chunks[:-1]:
            (choice,) = chunk["choices"]
            texts[choice["index"]] += choice["delta"].get("content") or ""
            if choice["finish_reason"]:
                finishes[choice["index"]] = choice["finish_reason"]
        usage = chunks[-1]["usage"]
        assert finishes == {0: "stop", 1: "stop", 2: "stop"}
    else:
        payload = await response.json()
        texts = {c["index"]: c["message"]["content"] for c in payload["choices"]}
        usage = payload["usage"]
    prompt = prompt_text(chat_body("many [sim chunks=4]"))
    assert texts[0] == "".join(completion_words(prompt, 4))  # choice 0 is the n=1 reply
    assert len(set(texts.values())) > 1
    encoding = get_encoding(O200K)
    assert usage["completion_tokens"] == sum(len(encoding.encode(t)) for t in texts.values())


async def test_models(session: aiohttp.ClientSession, sim: TestServer) -> None:
    """GET /v1/models lists the simulated models in OpenAI's list shape."""
    payload = await (await session.get(sim.make_url("/v1/models"))).json()
    assert payload["object"] == "list"
    assert {m["id"] for m in payload["data"]} == {"gpt-4o-mini", "gpt-4o", "gpt-4.1-mini"}


def test_directive_parsing() -> None:
    """Only the bracketed directive is read, typed per field; absent means defaults."""
    directive = Directive.parse("say [sim chunks=3 delay_ms=2.5 finish=length] please")
    assert (directive.chunks, directive.delay_ms, directive.finish) == (3, 2.5, "length")
    assert Directive.parse("no directive here") == Directive()
    with pytest.raises(ValueError, match="nope"):
        Directive.parse("[sim nope=1]")
