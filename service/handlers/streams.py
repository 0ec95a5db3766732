"""``/v1/streams/{id}``: read a checkpoint, resume the events, press stop.

A stream is visible to its owner only; anyone else gets the same 404 as for a stream that
never existed, so ids cannot be probed.
"""

from __future__ import annotations

import orjson
from aiohttp import web

from ..appkeys import PRINCIPAL, STREAMS
from ..errors import InvalidRequestError, NotFoundError
from ..relay import stream_sse
from ..stream import Stream


async def get_stream(request: web.Request) -> web.Response:
    registry = request.app[STREAMS]
    stream_id = request.match_info["stream_id"]
    stream = registry.get(stream_id)
    if stream is not None:
        _check_owner(request, stream.owner.user_id)
        checkpoint = registry.snapshot(stream)
    else:
        stored = await registry.store.get(stream_id)
        if stored is None:
            raise _not_found(stream_id)
        _check_owner(request, stored.user_id)
        checkpoint = stored
    return web.Response(body=orjson.dumps(checkpoint.to_json()), content_type="application/json")


async def stream_events(request: web.Request) -> web.StreamResponse:
    stream = _owned_stream(request)
    return await stream_sse(request, request.app[STREAMS], stream, after=_last_event_id(request))


async def cancel_stream(request: web.Request) -> web.Response:
    registry = request.app[STREAMS]
    stream = _owned_stream(request)
    registry.cancel(stream)
    await stream.ended.wait()
    return web.Response(
        body=orjson.dumps(registry.snapshot(stream).to_json()), content_type="application/json"
    )


def _owned_stream(request: web.Request) -> Stream:
    stream_id = request.match_info["stream_id"]
    stream = request.app[STREAMS].get(stream_id)
    if stream is None:
        raise _not_found(stream_id)
    _check_owner(request, stream.owner.user_id)
    return stream


def _check_owner(request: web.Request, user_id: str) -> None:
    if request[PRINCIPAL].user_id != user_id:
        raise _not_found(request.match_info["stream_id"])


def _not_found(stream_id: str) -> NotFoundError:
    return NotFoundError(
        f"No stream with id '{stream_id}'.", param="stream_id", code="stream_not_found"
    )


def _last_event_id(request: web.Request) -> int:
    raw = request.headers.get("Last-Event-ID") or request.query.get("last_event_id") or "0"
    try:
        value = int(raw)
    except ValueError:
        raise InvalidRequestError(
            "Last-Event-ID must be a sequence number.", param="last_event_id"
        ) from None
    if value < 0:
        raise InvalidRequestError("Last-Event-ID must not be negative.", param="last_event_id")
    return value
