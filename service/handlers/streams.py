"""``/v1/streams/{id}``: read a checkpoint, resume the events, press stop.

A stream is visible to its owner only; anyone else gets the same 404 as for a stream that
never existed, so ids cannot be probed.
"""

from __future__ import annotations

import asyncio
import re

import orjson
from aiohttp import web

from ..appkeys import PRINCIPAL, STREAMS, TELEMETRY
from ..auth import Principal
from ..checkpoint import Checkpoint
from ..errors import InvalidRequestError, NotFoundError
from ..registry import StreamRegistry
from ..relay import stream_sse
from ..shared import remote_cancel, remote_events, remote_running
from ..stream import Stream, check_resume_point

OFFLOAD_CHARS = 32_768  # a running stream's text past this is counted in a thread
_SEQ = re.compile(r"(?P<sign>-?)(?P<digits>[0-9]{1,18})")  # more digits than any stream has


async def get_stream(request: web.Request) -> web.Response:
    registry = request.app[STREAMS]
    stream_id = request.match_info["stream_id"]
    stream = registry.get(stream_id)
    if stream is None:
        stored = await registry.store.get(stream_id)
        if stored is not None:
            _check_owner(request, stored.user_id, stored.tenant)
            return _checkpoint_response(stored)
        stream = await remote_running(request, stream_id)  # (a copy, from its journal)
        if stream is None:
            raise _not_found(stream_id)
    _check_owner(request, stream.owner.user_id, stream.owner.tenant)
    return _checkpoint_response(await _snapshot(registry, stream))


def _checkpoint_response(checkpoint: Checkpoint) -> web.Response:
    return web.Response(body=orjson.dumps(checkpoint.to_json()), content_type="application/json")


async def _snapshot(registry: StreamRegistry, stream: Stream) -> Checkpoint:
    """A running stream's checkpoint counts its text anew each time: once the text is long,
    in a thread (on the loop it would stall every stream for each read)."""
    if sum(map(len, stream.progress.parts)) < OFFLOAD_CHARS:
        return registry.snapshot(stream)
    return await asyncio.to_thread(registry.snapshot, stream)


async def stream_events(request: web.Request) -> web.StreamResponse:
    stream_id = request.match_info["stream_id"]
    if request.app[STREAMS].get(stream_id) is None:  # generated on another replica?
        remote = await remote_events(request, stream_id, lambda: _last_event_id(request))
        if remote is not None:
            return remote
    # First: an unknown stream is a 404, whatever else is off.
    stream = resumable_stream(request.app[STREAMS], stream_id, request[PRINCIPAL])
    after = check_resume_point(stream.last_seq, _last_event_id(request))
    request.app[TELEMETRY].stream_resumed(stream.id, after)
    return await stream_sse(request, request.app[STREAMS], stream, after=after)


async def cancel_stream(request: web.Request) -> web.Response:
    registry = request.app[STREAMS]
    stream_id = request.match_info["stream_id"]
    if registry.get(stream_id) is None:  # generated on another replica?
        stopped = await remote_cancel(request, stream_id)
        if stopped is None:  # ended, its journal no longer kept: its checkpoint still is
            stopped = await registry.store.get(stream_id)
            if stopped is not None:
                _check_owner(request, stopped.user_id, stopped.tenant)
        if stopped is not None:
            return web.Response(
                body=orjson.dumps(stopped.to_json()), content_type="application/json"
            )
    stream = _owned_stream(request)
    registry.cancel(stream)
    checkpoint = await registry.settled(stream)  # as stored, its finish hooks done
    return web.Response(body=orjson.dumps(checkpoint.to_json()), content_type="application/json")


def _owned_stream(request: web.Request) -> Stream:
    return owned_stream(request.app[STREAMS], request.match_info["stream_id"], request[PRINCIPAL])


def owned_stream(registry: StreamRegistry, stream_id: str, principal: Principal) -> Stream:
    """The live or retained stream ``stream_id`` if ``principal`` owns it, else 404."""
    stream = registry.get(stream_id)
    if stream is None or not _owns(principal, stream.owner.user_id, stream.owner.tenant):
        raise _not_found(stream_id)
    return stream


def resumable_stream(registry: StreamRegistry, stream_id: str, principal: Principal) -> Stream:
    """``owned_stream``, if it streams: a non-streamed answer is one JSON object, which
    its checkpoint (``GET /v1/streams/{id}``) holds, not a series of events to resume."""
    stream = owned_stream(registry, stream_id, principal)
    if not stream.streaming:
        raise InvalidRequestError(
            f"Stream '{stream_id}' answered a request that was not streamed: read its result "
            f"with GET /v1/streams/{stream_id}.",
            param="stream_id",
            code="stream_not_resumable",
        )
    return stream


def _check_owner(request: web.Request, user_id: str, tenant: str) -> None:
    if not _owns(request[PRINCIPAL], user_id, tenant):
        raise _not_found(request.match_info["stream_id"])


def _owns(principal: Principal, user_id: str, tenant: str) -> bool:
    return principal.user_id == user_id and principal.tenant == tenant


def _not_found(stream_id: str) -> NotFoundError:
    return NotFoundError(
        f"No stream with id '{stream_id}'.", param="stream_id", code="stream_not_found"
    )


def _last_event_id(request: web.Request) -> int:
    given = request.headers.getall("Last-Event-ID", ()) or request.query.getall("last_event_id", ())
    if len(given) > 1:  # which one a proxy or a client meant is unknowable
        raise InvalidRequestError(
            "Send one Last-Event-ID (a single sequence number), not several.",
            param="last_event_id",
        )
    raw = given[0] if given and given[0] else "0"
    found = _SEQ.fullmatch(raw)  # not int(): it takes "1_0", "+3" and other scripts' digits
    if found is None:
        raise InvalidRequestError("Last-Event-ID must be a sequence number.", param="last_event_id")
    if found["sign"]:
        raise InvalidRequestError("Last-Event-ID must not be negative.", param="last_event_id")
    return int(found["digits"])
