"""``POST /v1/chat/completions``: validate, start a generation, relay it (SSE or JSON)."""

from __future__ import annotations

import secrets

from aiohttp import web

from ..appkeys import PRINCIPAL, SERVED_MODELS, STREAMS, UPSTREAM
from ..errors import SluiceError
from ..generation import generate
from ..relay import STREAM_ID_HEADER, stream_sse
from ..request import ChatRequest, parse_chat_request
from ..stream import Owner, Stream


def new_stream_id() -> str:
    return "strm_" + secrets.token_urlsafe(16)


def start_stream(app: web.Application, owner: Owner, chat: ChatRequest) -> Stream:
    """Create a stream for ``chat`` and launch its generation; shared by SSE and WebSocket."""
    stream = Stream(
        new_stream_id(),
        owner,
        model=chat.model,
        streaming=chat.streaming,
        include_usage=chat.include_usage,
    )
    stream.body = chat.body
    app[STREAMS].launch(stream, generate(stream, app[UPSTREAM], chat.upstream_body()))
    return stream


async def create_chat_completion(request: web.Request) -> web.StreamResponse:
    principal = request[PRINCIPAL]
    chat = parse_chat_request(await request.read(), request.app[SERVED_MODELS])
    owner = Owner(principal.user_id, principal.tenant, principal.key_id)
    stream = start_stream(request.app, owner, chat)
    registry = request.app[STREAMS]
    with registry.reading(stream):
        # Hold the response until the provider answers, so its errors keep their status.
        await (stream.accepted if chat.streaming else stream.ended).wait()
        if stream.failed_before_output or (stream.error and not chat.streaming):
            raise _with_stream_header(stream.error, stream)
        if chat.streaming:
            return await stream_sse(request, registry, stream)
        return web.Response(
            body=stream.events[0][1],
            content_type="application/json",
            headers={STREAM_ID_HEADER: stream.id},
        )


def _with_stream_header(error: SluiceError | None, stream: Stream) -> SluiceError:
    assert error is not None
    error.headers.setdefault(STREAM_ID_HEADER, stream.id)
    return error
