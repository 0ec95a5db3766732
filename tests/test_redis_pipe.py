"""``service.redis_pipe``: one multiplexed connection, against a real redis-server.

Concurrent calls share the socket and each gets its own replies, in order; error replies
stand in their place; a killed Redis fails the calls on the connection and the next call
connects again; a connection whose oldest call went unanswered past the deadline is
replaced; AUTH and SELECT come from the URL; TLS stays with redis-py.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.credentials import UsernamePasswordCredentialProvider
from redis.exceptions import (
    AuthenticationError,
    ConnectionError,
    DataError,
    NoScriptError,
    ResponseError,
)

from service.redis_pipe import RedisPipe
from tests.servers import RedisServer


def pipe_to(url: str, timeout_s: float = 2.0) -> RedisPipe:
    pipe = RedisPipe.of(Redis.from_url(url), timeout_s)
    assert pipe is not None
    return pipe


@pytest.fixture
async def pipe(redis_url: str) -> AsyncIterator[RedisPipe]:
    made = pipe_to(redis_url)
    yield made
    await made.close()


async def test_concurrent_calls_share_the_connection_and_get_their_own_replies(
    pipe: RedisPipe, redis_url: str
) -> None:
    """200 calls at once, each of two commands: every call gets its own pair, in order."""
    calls = [pipe.execute([("SET", f"k{n}", n), ("GET", f"k{n}")]) for n in range(200)]
    replies = await asyncio.gather(*calls)
    assert replies == [[b"OK", str(n).encode()] for n in range(200)]
    observer = Redis.from_url(redis_url)
    try:
        clients = await observer.client_list()
        assert len(clients) == 2  # the pipe's one connection, and this one
    finally:
        await observer.aclose()


async def test_error_replies_stand_in_place_and_the_connection_goes_on(pipe: RedisPipe) -> None:
    replies = await pipe.execute(
        [("SET", "k", "v"), ("INCR", "k"), ("EVALSHA", "0" * 40, 0), ("GET", "k")]
    )
    assert replies[0] == b"OK"
    assert type(replies[1]) is ResponseError
    assert type(replies[2]) is NoScriptError  # what the gate loads the script on
    assert replies[3] == b"v"
    assert await pipe.execute([("PING",)]) == [b"PONG"]


async def test_a_killed_redis_fails_the_call_and_the_next_call_reconnects(
    pipe: RedisPipe, redis_server: RedisServer
) -> None:
    assert await pipe.execute([("PING",)]) == [b"PONG"]
    redis_server.stop()
    try:
        with pytest.raises(ConnectionError):
            await pipe.execute([("PING",)])
    finally:
        redis_server.start()
    assert await pipe.execute([("PING",)]) == [b"PONG"]


async def test_calls_after_redis_closed_the_connection_reconnect_without_warnings(
    pipe: RedisPipe, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis drops the connection (``CLIENT KILL``, as its idle ``timeout`` or a restart
    would) as calls come in. Those written before the loop read its end fail; none is
    written to the closing socket (asyncio logs a warning a write there); the rest, and
    the calls after, go over a new connection."""
    assert await pipe.execute([("PING",)]) == [b"PONG"]
    with socket.create_connection(("127.0.0.1", redis_server.port), 2) as admin:
        admin.sendall(b"CLIENT KILL TYPE normal SKIPME yes\r\n")
        assert admin.recv(64) == b":1\r\n"  # Redis closed our pipe before answering
    caplog.set_level(logging.WARNING, logger="asyncio")
    calls = [pipe.execute([("PING",)]) for _ in range(20)]
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert {type(r) for r in results} <= {list, ConnectionError}
    assert [r.getMessage() for r in caplog.records if r.name == "asyncio"] == []
    assert await pipe.execute([("PING",)]) == [b"PONG"]


async def test_a_connection_unanswered_past_the_deadline_is_replaced(
    redis_url: str, redis_server: RedisServer
) -> None:
    """Redis frozen: a call waits. With a deadline already past, the next call finds it
    overdue, resets the connection (the waiting call fails at once) and uses a new one,
    which Redis answers once it runs again."""
    pipe = pipe_to(redis_url, timeout_s=-1.0)
    assert await pipe.execute([("PING",)]) == [b"PONG"]
    redis_server.pause()
    try:
        stuck = asyncio.ensure_future(pipe.execute([("PING",)]))
        fresh = asyncio.ensure_future(pipe.execute([("ECHO", "fresh")]))  # runs after it
        async with asyncio.timeout(10):  # a safety net: without the reset, this would hang
            with pytest.raises(ConnectionError, match="reset"):
                await stuck
    finally:
        redis_server.resume()
    assert await fresh == [b"fresh"]
    await pipe.close()


async def test_select_and_auth_come_from_the_url(redis_url: str) -> None:
    admin = Redis.from_url(redis_url)
    await admin.config_set("requirepass", "s3cret")
    try:
        base = redis_url.rsplit("/", 1)[0].replace("redis://", "redis://:s3cret@")
        pipe = pipe_to(f"{base}/3")
        assert await pipe.execute([("SET", "where", "db3")]) == [b"OK"]
        await pipe.close()
        wrong = pipe_to(base.replace("s3cret", "wrong") + "/0")
        with pytest.raises(AuthenticationError):
            await wrong.execute([("PING",)])
        await wrong.close()
        db3 = Redis.from_url(f"{base}/3")
        assert await db3.get("where") == b"db3"
        await db3.aclose()
    finally:
        authed = Redis.from_url(redis_url, password="s3cret")
        await authed.config_set("requirepass", "")
        await authed.aclose()
        await admin.aclose()


def test_tls_and_credential_providers_stay_with_redis_py() -> None:
    assert RedisPipe.of(Redis.from_url("rediss://cache.example:6380/0"), 1.0) is None
    provider = UsernamePasswordCredentialProvider("u", "p")
    assert RedisPipe.of(Redis(credential_provider=provider), 1.0) is None
    assert RedisPipe.of(Redis.from_url("unix:///run/redis.sock?db=2"), 1.0) is not None


async def test_an_argument_redis_cannot_take_fails_alone(pipe: RedisPipe) -> None:
    """Refused before anything is queued: the calls after it get their own replies."""
    with pytest.raises(DataError):
        await pipe.execute([("SET", "k", bytearray(b"v"))])
    with pytest.raises(DataError):
        await pipe.execute([("ECHO", "\ud800")])  # a lone surrogate: no UTF-8 for it
    replies = await asyncio.gather(pipe.execute([("ECHO", "a")]), pipe.execute([("ECHO", "b")]))
    assert replies == [[b"a"], [b"b"]]
    assert await pipe.execute([]) == []  # nothing to send: nothing waits for a reply
    assert await pipe.execute([("ECHO", "c")]) == [b"c"]


async def test_a_closed_pipe_leaves_nothing_open(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Closed while a call is connecting: the call fails and its new connection is
    closed; calls after it fail too instead of connecting again."""
    loop = asyncio.get_running_loop()
    connected, go_on = asyncio.Event(), asyncio.Event()
    create_connection = loop.create_connection

    async def held(*args: Any, **kwargs: Any) -> Any:
        made = await create_connection(*args, **kwargs)
        connected.set()
        await go_on.wait()
        return made

    monkeypatch.setattr(loop, "create_connection", held)
    pipe = pipe_to(redis_url)
    connecting = asyncio.ensure_future(pipe.execute([("PING",)]))
    await connected.wait()  # the socket is open; the pipe has not taken it yet
    await pipe.close()
    go_on.set()
    with pytest.raises(ConnectionError):
        await connecting
    with pytest.raises(ConnectionError):
        await pipe.execute([("PING",)])
    observer = Redis.from_url(redis_url)
    try:
        clients = await observer.client_list()
        assert [c["cmd"] for c in clients] == ["client|list"]  # this one alone
    finally:
        await observer.aclose()
