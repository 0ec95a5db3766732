"""The SSE writer when the client vanishes mid-write (no handler cancellation to save it)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from service.checkpoint import MemoryCheckpointStore
from service.registry import StreamRegistry
from service.relay import stream_sse
from service.settings import StreamSettings
from service.stream import Owner, Stream, StreamStatus

STREAM: web.AppKey[Stream] = web.AppKey("stream")
REGISTRY: web.AppKey[StreamRegistry] = web.AppKey("registry")


async def _events(request: web.Request) -> web.StreamResponse:
    return await stream_sse(request, request.app[REGISTRY], request.app[STREAM])


async def test_a_write_to_a_closed_connection_just_detaches(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Without handler cancellation the next write hits the closed socket: the reader
    detaches quietly (grace 0 ends the stream), nothing is logged as an error."""
    registry = StreamRegistry(StreamSettings(disconnect_grace_s=0), MemoryCheckpointStore())
    stream = Stream("strm_w", Owner("u", "t", "k"), model="m", streaming=True, include_usage=False)
    registry.launch(stream, asyncio.Event().wait())
    stream.append(b'{"n":1}')
    app = web.Application()
    app[STREAM], app[REGISTRY] = stream, registry
    app.router.add_get("/events", _events)
    runner = web.AppRunner(app, handler_cancellation=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        with caplog.at_level(logging.DEBUG):
            async with aiohttp.ClientSession() as session:
                response = await session.get(f"http://{host}:{port}/events")
                assert await response.content.readuntil(b"\n\n") == b'id: 1\ndata: {"n":1}\n\n'
                response.close()
            while stream.running:  # keep writing until the writer notices the closed socket
                stream.append(b'{"n":2}')
                stream.notify()
                await asyncio.sleep(0)
            await stream.ended.wait()
    finally:
        await runner.cleanup()
    assert stream.status is StreamStatus.CLIENT_GONE
    assert stream.readers == 0
    errors: list[Any] = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []
