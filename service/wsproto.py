"""WebSocket frames on the wire (``GET /v1/ws``): reading the client's, writing ours. Pure.

Client frames (JSON text)::

    {"type": "chat.completion.create", "request_id": "r1", "body": {...}}
    {"type": "cancel", "request_id": "r1"}
    {"type": "resume", "stream_id": "strm_...", "last_seq": 7, "request_id": "r2"}

Server frames::

    {"type": "started", "request_id": "r1", "stream_id": "strm_..."}
    {"type": "chunk", "request_id": "r1", "stream_id": "strm_...", "seq": 2, "chunk": {...}}
    {"type": "done", "request_id": "r1", "stream_id": "strm_...", "seq": 9,
     "finish_reason": "stop", "usage": {...}}
    {"type": "error", "request_id": "r1", "stream_id": "strm_...", "seq": 9, "error": {...}}

A ``chunk`` frame is built by concatenation around the provider's chunk bytes (the same
bytes, and ``seq``, an SSE client gets), so the hot path never re-serialises a chunk. An
``error`` about a frame rather than a stream has no ``stream_id`` or ``seq``.
"""

from __future__ import annotations

from typing import Any, TypeGuard

import orjson

from .errors import InvalidRequestError, SluiceError

RequestId = str | int
MAX_REQUEST_ID_CHARS = 200


def parse_frame(text: str) -> dict[str, Any]:
    """A client frame as a JSON object, or ``InvalidRequestError``."""
    try:
        frame = orjson.loads(text)
    except orjson.JSONDecodeError:
        raise InvalidRequestError("The frame is not valid JSON.") from None
    if not isinstance(frame, dict):
        raise InvalidRequestError("A frame must be a JSON object.")
    return frame


def is_request_id(value: Any) -> TypeGuard[RequestId]:
    """A client's id for one of its requests: a short string or an integer."""
    if isinstance(value, str):
        return 0 < len(value) <= MAX_REQUEST_ID_CHARS
    return isinstance(value, int) and not isinstance(value, bool)


def error_frame(request_id: Any, error: SluiceError) -> bytes:
    """An ``error`` about a client frame (echoing its request id when it had a valid one)."""
    echo = request_id if is_request_id(request_id) else None
    return orjson.dumps({"type": "error", "request_id": echo, **_retry(error), **error.payload()})


def _retry(error: SluiceError) -> dict[str, Any]:
    """What an HTTP client reads from ``Retry-After`` and ``x-should-retry: false``:
    ``retry_after_s`` and ``should_retry``, when the error says."""
    fields: dict[str, Any] = {}
    after = error.headers.get("Retry-After")
    if after is not None and after.isdigit():
        fields["retry_after_s"] = int(after)
    if not error.retry_helps:
        fields["should_retry"] = False
    return fields


class StreamFrames:
    """The frames of one stream on one socket; the id prefix is encoded once."""

    __slots__ = ("_chunk_head", "_ids", "request_id", "stream_id")

    def __init__(self, request_id: RequestId, stream_id: str) -> None:
        self.request_id = request_id
        self.stream_id = stream_id
        self._ids = {"request_id": request_id, "stream_id": stream_id}
        ids = orjson.dumps(self._ids)[1:-1]  # '"request_id":..,"stream_id":..'
        self._chunk_head = b'{"type":"chunk",' + ids + b',"seq":'

    def started(self) -> bytes:
        return orjson.dumps({"type": "started", **self._ids})

    def chunk(self, seq: int, data: bytes) -> bytes:
        """``data`` is one provider chunk, a JSON object, embedded as is."""
        return b'%b%d,"chunk":%b}' % (self._chunk_head, seq, data)

    def done(self, seq: int, finish_reason: str | None, usage: dict[str, Any] | None) -> bytes:
        frame = {"type": "done", **self._ids, "seq": seq}
        return orjson.dumps({**frame, "finish_reason": finish_reason, "usage": usage})

    def error(self, seq: int, error: SluiceError) -> bytes:
        return orjson.dumps(
            {"type": "error", **self._ids, "seq": seq, **_retry(error), **error.payload()}
        )

    def error_event(self, seq: int, payload: bytes) -> bytes:
        """``error`` from a journal's error event (``{"error": {...}}``, as SSE sends it)."""
        return orjson.dumps({"type": "error", **self._ids, "seq": seq, **orjson.loads(payload)})
