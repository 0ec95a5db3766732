"""``service.provider_http``: the provider connection's aiohttp parts, against real sockets.

What they change in aiohttp is pinned here: a body is read through ``ProviderBody``, whole
buffers at a time and byte for byte what was sent, however the HTTP chunks fall across
reads; partial reads still work; flow control pauses and resumes; and a connection read
that way goes back to the pool for the next request.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.streams import StreamReader

from service.provider_http import ProviderBody, ProviderConnector, _ResponseHandler

EVENTS = [b'data: {"n": %d, "text": "%s"}\n\n' % (n, b"w" * (n % 7)) for n in range(200)]


def _chunked(pieces: list[bytes], written: asyncio.Event | None = None) -> Any:
    """A handler that sends ``pieces`` as one HTTP chunk each, as a provider sends events."""

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        for piece in pieces:
            await response.write(piece)
        await response.write_eof()
        if written is not None:
            written.set()
        return response

    return handler


async def _serve(aiohttp_server: Any, handler: Any) -> Any:
    app = web.Application()
    app.router.add_get("/body", handler)
    return await aiohttp_server(app)


async def _session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=ProviderConnector(), auto_decompress=False)


async def test_a_body_of_many_chunks_reads_whole_buffers_byte_for_byte(
    aiohttp_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chunks that piled up while nobody read come out as one read, joined in order; not
    one of them, not even those read with the head, went through ``StreamReader``'s
    chunk bookkeeping."""
    plain_chunk_ends: list[object] = []
    monkeypatch.setattr(StreamReader, "end_http_chunk_receiving", plain_chunk_ends.append)
    written = asyncio.Event()
    server = await _serve(aiohttp_server, _chunked(EVENTS, written))
    async with await _session() as session, session.get(server.make_url("/body")) as response:
        assert type(response.content) is ProviderBody
        async with asyncio.timeout(10):
            await written.wait()  # the whole body is on its way before the first read
            reads = [data async for data in response.content.iter_any()]
    assert b"".join(reads) == b"".join(EVENTS)
    assert max(map(len, reads)) > max(map(len, EVENTS))  # reads span many HTTP chunks
    assert plain_chunk_ends == []


async def test_partial_reads_then_whole_buffers(aiohttp_server: Any) -> None:
    """A read of so many bytes leaves the rest of a chunk for the next read, in order."""
    written = asyncio.Event()
    server = await _serve(aiohttp_server, _chunked(EVENTS, written))
    async with await _session() as session, session.get(server.make_url("/body")) as response:
        async with asyncio.timeout(10):
            await written.wait()
            head = await response.content.readexactly(10)  # inside the first chunk
            rest = await response.read()
    assert head + rest == b"".join(EVENTS)


async def test_a_connection_read_this_way_serves_the_next_request(aiohttp_server: Any) -> None:
    """After a whole body, the connection is clean: the next request reuses it."""
    peers: list[object] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        peers.append(request.transport)
        return await _chunked(EVENTS[:20])(request)

    server = await _serve(aiohttp_server, handler)
    async with await _session() as session:
        for _ in range(2):
            async with session.get(server.make_url("/body")) as response:
                assert await response.read() == b"".join(EVENTS[:20])
    assert len(peers) == 2
    assert peers[0] is peers[1]  # one keep-alive connection


async def test_reading_pauses_and_resumes_under_back_pressure(
    aiohttp_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A body that outruns its reader pauses the connection; reading it all resumes it."""
    paused = asyncio.Event()
    pause = _ResponseHandler.pause_reading

    def pause_and_tell(self: _ResponseHandler) -> None:
        pause(self)
        paused.set()

    monkeypatch.setattr(_ResponseHandler, "pause_reading", pause_and_tell)
    piece = b"x" * 1000
    server = await _serve(aiohttp_server, _chunked([piece] * 1000))
    async with await _session() as session, session.get(server.make_url("/body")) as response:
        assert type(response.content) is ProviderBody
        async with asyncio.timeout(10):  # a reader that never resumes fails instead of hanging
            await paused.wait()  # unread, the body passed the high-water mark
            body = b"".join([data async for data in response.content.iter_any()])
    assert body == piece * 1000
