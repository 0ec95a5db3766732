"""``POST /v1/chat/completions``: validate, start a generation, relay it (SSE or JSON)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from aiohttp import web

from ..appkeys import (
    ADMITTED,
    GATE,
    JOURNAL_MIRROR,
    LIFECYCLE,
    PRINCIPAL,
    RESPONDER,
    SERVED_MODELS,
    SETTINGS,
    STREAMS,
    TELEMETRY,
)
from ..errors import (
    InvalidRequestError,
    PayloadTooLargeError,
    ServiceUnavailableError,
    SluiceError,
)
from ..ids import new_id
from ..relay import CACHE_HEADER, stream_headers, stream_sse
from ..request import ChatRequest, parse_chat_request
from ..stream import NO_COUNTS, NO_LIMITS, Owner, Stream, StreamStatus

ATTEMPT_SHARE = 1 / 3  # of a keepalive interval: how long an attempt runs before the 200


def new_stream_id() -> str:
    return new_id("strm_")


def start_stream(
    app: web.Application,
    owner: Owner,
    chat: ChatRequest,
    *,
    cache_header: str | None = None,
    output_limits: Mapping[str, int | None] = NO_LIMITS,
    only_cached: SluiceError | None = None,
    prompt_counts: Mapping[str, int] = NO_COUNTS,
) -> Stream:
    """Create a stream for ``chat`` and launch its generation; shared by SSE and WebSocket.

    ``cache_header`` is the client's ``X-Sluice-Cache`` choice (``use`` or ``bypass``);
    the rest is admission's (see ``Admission.launch``).
    """
    if app[LIFECYCLE].draining:  # a stream started now would outlive the drain unrecorded
        raise ServiceUnavailableError(
            "The gateway is shutting down; retry on another replica.",
            headers={"Retry-After": "1"},
        )

    stream = Stream(
        new_stream_id(),
        owner,
        model=chat.model,
        streaming=chat.streaming,
        include_usage=chat.include_usage,
    )
    stream.body = chat.body
    stream.prompt_counts = prompt_counts
    stream.output_limits = output_limits  # per fallback model (admission.py)
    work = app[RESPONDER].answer(stream, chat, cache_header, only_cached=only_cached)
    app[STREAMS].launch(stream, app[TELEMETRY].traced(stream, work))  # spans under this request
    return stream


async def create_chat_completion(request: web.Request) -> web.StreamResponse:
    principal = request[PRINCIPAL]
    chat = await _parse(request)
    owner = Owner(principal.user_id, principal.tenant, principal.key_id)
    cache_header = request.headers.get(CACHE_HEADER)
    admission = request[ADMITTED] = await request.app[GATE].admit(
        principal, chat, cache_header=cache_header
    )
    stream = await admission.launch(start_stream, request.app, owner)
    registry = request.app[STREAMS]
    with registry.reading(stream):
        if chat.streaming:
            await _ready_to_stream(request, stream)
            waiting = not stream.accepted.is_set()
            return await stream_sse(request, registry, stream, waiting=waiting)
        await stream.ended.wait()
        if stream.error:
            raise _refusal(stream)
        return web.Response(
            body=stream.events[0],
            content_type="application/json",
            headers=stream_headers(stream),
        )


async def _ready_to_stream(request: web.Request, stream: Stream) -> None:
    """Hold the response until the provider answers, so that a refusal keeps its status
    (raised here); but not for long: a provider that holds its headers must not leave a
    proxy's idle timer running (see ``_wait_for_answer``). Returns before the streaming
    starts, so that no frame of its own stays for the stream's whole life."""
    loop = request.app[STREAMS].loop
    await _wait_for_answer(stream, request.app[SETTINGS].streams.keepalive_s, loop)
    if not stream.failed_before_output:
        mirror = request.app[JOURNAL_MIRROR]
        if mirror is not None:  # the id goes out next: every replica must know it
            await mirror.registered(stream)
    if stream.failed_before_output:  # nothing has gone out: the status is still ours to give
        raise _refusal(stream)


async def _wait_for_answer(
    stream: Stream, interval: float, loop: asyncio.AbstractEventLoop
) -> None:
    """Until the provider answers (or the stream ends), or the response must start: once
    the wait has lasted a keepalive interval and the attempt in flight a third of one.

    Never during a retry's delay, and not just as an attempt begins: a refusal that comes
    quickly, first or after a retry, still gets its HTTP status (and Retry-After, which the
    SDKs act on). The retry budget bounds the delays, so the silence stays bounded."""
    due = loop.time() + interval
    while not stream.accepted.is_set():
        attempt = stream.attempt_started_at
        if attempt is not None:
            due = max(due, attempt + interval * ATTEMPT_SHARE)
        if stream.backing_off:
            due = max(due, loop.time() + interval * ATTEMPT_SHARE)  # look again then
        if await stream.accepted.wait_until(due, loop):
            return
        if not stream.backing_off and stream.attempt_started_at == attempt:
            return


async def _parse(request: web.Request) -> ChatRequest:
    """The validated request; one refused as invalid or too large still gets its ledger row."""
    gate, principal = request.app[GATE], request[PRINCIPAL]
    raw = b""
    try:
        raw = await _read_body(request)
        return parse_chat_request(raw, request.app[SERVED_MODELS])
    except web.HTTPRequestEntityTooLarge:
        gate.refuse(principal, raw, code=PayloadTooLargeError.default_code)
        raise
    except SluiceError as exc:
        gate.refuse(principal, raw, code=exc.code or exc.type)
        raise
    except asyncio.CancelledError:  # the client left while its body was arriving
        gate.refuse(principal, raw, code=None, status="cancelled")
        raise


async def _read_body(request: web.Request) -> bytes:
    try:
        return await request.read()
    except web.RequestPayloadError:  # e.g. a Content-Encoding that does not decode
        # The rest of the connection's bytes cannot be trusted: answer, then close it. EOF
        # on the body stops aiohttp draining it afterwards (and logging the error again).
        request.content.feed_eof()
        request.protocol.close()
        raise InvalidRequestError(
            "The request body could not be decoded.", headers={"Connection": "close"}
        ) from None


def _refusal(stream: Stream) -> SluiceError:
    """The error a stream that ended before any output answers its request with. Ended by
    shutdown before anything went out, there is nothing to resume: try another replica."""
    if stream.status is StreamStatus.SHUTDOWN:
        return ServiceUnavailableError(
            "The gateway is shutting down; retry on another replica.",
            headers={"Retry-After": "1"},
        )
    assert stream.error is not None
    return _with_stream_header(stream.error.fresh(), stream)


def _with_stream_header(error: SluiceError, stream: Stream) -> SluiceError:
    for name, value in stream_headers(stream).items():
        error.headers.setdefault(name, value)
    return error
