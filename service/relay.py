"""Writing a stream's journal to an HTTP client as Server-Sent Events.

Used for a fresh completion and for a resumed one alike: the reader attaches, replays every
event after ``after``, follows live events until the stream ends, and detaches in
``finally``, which is what starts the grace window when the client goes away. Each wakeup's
events go out in one write, the headers with the first of them and the journal's last ones
with the end of the body (a stream that arrives in one read leaves in one write). Idle
periods get a ``: keepalive`` comment on the registry's tick (and one right after the
headers when the response goes out before the provider has answered, see
``handlers/chat.py``); a stream ended by shutdown closes with an ``error`` event instead of
``[DONE]``: ``stream_interrupted`` and a ``retry:`` hint when it had sent something (resume
it), ``service_unavailable`` when not (send the request again).
"""

from __future__ import annotations

import contextlib

from aiohttp import web

from .errors import ServiceUnavailableError
from .jsonbytes import dumps_kept
from .registry import StreamRegistry
from .sse import KEEPALIVE, encode_events, encode_retry
from .stream import Stream, StreamStatus

STREAM_ID_HEADER = "X-Sluice-Stream-Id"
MODEL_HEADER = "X-Sluice-Model"  # the model that served (or was last tried)
FALLBACK_HEADER = "X-Sluice-Fallback-Reason"  # breaker_open, retries_exhausted, budget_*
CACHE_HEADER = "X-Sluice-Cache"  # hit, miss or bypass
RESUME_RETRY_MS = 1000
SEND_AGAIN = b"data: %b\n\n" % dumps_kept(
    ServiceUnavailableError("The gateway is shutting down; send the request again.").payload()
)
# Cut off with output sent: resume for the rest. An ``error`` event without an id (the SDKs
# raise APIError on it instead of ending as if complete; Last-Event-ID still names the last
# chunk; EventSource's ``onmessage`` ignores a named event), then the reconnection hint.
RESUME_ELSEWHERE = b"event: error\ndata: %b\n\n%b" % (
    dumps_kept(
        ServiceUnavailableError(
            "This stream was cut off before it finished: resume it "
            "(GET /v1/streams/{id}/events with Last-Event-ID) for the rest.",
            code="stream_interrupted",
        ).payload()
    ),
    encode_retry(RESUME_RETRY_MS),
)
SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # nginx: do not buffer the stream
}


class EventStreamResponse(web.StreamResponse):
    """A stream response whose headers wait for the first body bytes, to go out in the same
    write (one syscall less a stream: ``web.Response`` does the same); ``stream_sse`` sends
    them alone when nothing is ready to go with them."""

    # aiohttp's own switch (3.14: ``web.Response`` sets it; a ``StreamResponse`` sends its
    # headers on ``prepare``). Were it renamed, the headers would go alone again: slower,
    # not wrong.
    _send_headers_immediately = False


async def stream_sse(
    request: web.Request,
    registry: StreamRegistry,
    stream: Stream,
    *,
    after: int = 0,
    waiting: bool = False,
) -> web.StreamResponse:
    """Send ``stream`` from ``after`` to the client until it ends or the client leaves.
    ``waiting``: the provider has not answered yet; a keepalive follows the headers."""
    response = EventStreamResponse(headers={**SSE_HEADERS, **stream_headers(stream)})
    with registry.reading(stream), contextlib.suppress(ConnectionError):
        # The client left mid-write (a reset, or "Connection lost" while a write waited for
        # the transport to drain), before handler cancellation reached us; leaving the
        # block detaches, which is all a disconnect needs.
        writer = await response.prepare(request)
        # Serialized by ``prepare``: a held stream need not keep the headers' table (~1.5 KB).
        response.headers.clear()
        transport = request.transport
        if transport is not None and not transport.is_closing():
            # The headers go out with the first write, at once: the client has the id, and
            # may come back for the stream (a closed one never got it: no grace for it).
            stream.announced = True
        if waiting:
            await response.write(KEEPALIVE)
        elif writer is not None and stream.running and not stream.has_events_after(after):
            writer.send_headers()  # nothing to go with them yet: the client sees it is open
        tail = b""  # the journal's last events: they go out with the end of the body
        async for first, batch in stream.follow(after):
            if not batch:
                await response.write(KEEPALIVE)
                continue
            # Written straight from the call, not kept in a local while the next batch is
            # awaited: a held stream would carry its last write's bytes.
            if stream.running or first + len(batch) <= stream.last_seq:
                await response.write(encode_events(first, batch))
            else:
                tail = encode_events(first, batch)
            del batch
        if stream.status is StreamStatus.SHUTDOWN:
            # With nothing generated there is nothing to resume: the request must be sent
            # again (an error event with no id: no Last-Event-ID comes of it).
            tail += RESUME_ELSEWHERE if stream.last_seq else SEND_AGAIN
        await response.write_eof(tail)
    return response


def stream_headers(stream: Stream) -> dict[str, str]:
    """Which stream this is, which model served it, and why: fallback and cache status."""
    headers = {
        STREAM_ID_HEADER: stream.id,
        MODEL_HEADER: stream.served_model,
        CACHE_HEADER: stream.cache_status,
    }
    if stream.fallback_reason is not None:
        headers[FALLBACK_HEADER] = stream.fallback_reason
    return headers
