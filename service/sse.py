"""Server-Sent Events on the wire: an incremental decoder for the provider's stream and the
encoders for ours. Pure: no server objects.

The decoder yields the raw ``data`` payload of each event as bytes, so the relay can
forward the provider's bytes without re-serialising them (an ``event: error``'s, which
OpenAI never sends but some servers and proxies do, becomes OpenAI's error object).
See https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation
"""

from __future__ import annotations

from itertools import repeat

import orjson

DONE = b"[DONE]"
# A comment line with no blank line after it: a blank line ends an event, and a client that
# keeps the last event id (the openai Python SDK does, as the spec says) would then dispatch
# an event with empty data and fail to parse it as JSON.
KEEPALIVE = b": keepalive\n"
_NEXT = b"\n\ndata: "  # the end of one single-line event and the start of the next
BOM = b"\xef\xbb\xbf"  # UTF-8's byte order mark
MAX_EVENT_BYTES = 16 * 1024 * 1024  # one event, unfinished: past this it is no event
# Cached ``id`` lines of our events: a stream's n-th costs ~50 B once, for the process's life.
ID_TABLE_SIZE = 16_384
_ID_LINE = b"id: %d\ndata: "
_ID_LINES: list[bytes] = [_ID_LINE % 0]


class EventTooLarge(ValueError):
    """An event (its blank line not come yet) past ``MAX_EVENT_BYTES``."""


class SSEDecoder:
    """Split a byte stream into event ``data`` payloads; other fields are ignored, and an
    event with empty data is not one (the spec dispatches none for it)."""

    __slots__ = ("_buffer", "_head", "_held", "_pending", "_skip_lf")

    def __init__(self) -> None:
        self._buffer = b""  # an event begun, newlines already normalised
        # Reads of a long event, kept apart until its end comes: joining each to the rest
        # and searching it all again would cost time growing with the square of its size.
        self._pending: list[bytes] = []
        self._held = 0  # bytes in ``_buffer`` and ``_pending``
        self._skip_lf = False  # the last read ended with CR: a LF first in the next joins it
        self._head: bytes | None = b""  # the first bytes, until they can be told from a BOM

    def feed(self, chunk: bytes) -> list[bytes]:
        """Return the data of every event completed by ``chunk`` (possibly none)."""
        if self._head is not None:  # the spec's one allowed BOM, not part of a field
            chunk = self._head + chunk
            if len(chunk) < len(BOM) and BOM.startswith(chunk):
                self._head = chunk  # a read of part of it: wait for the rest
                return []
            self._head = None
            chunk = chunk.removeprefix(BOM)
        if self._skip_lf:
            self._skip_lf = False
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
        if b"\r" in chunk:  # CRLF and CR end lines too; a CR ends one at once
            self._skip_lf = chunk.endswith(b"\r")
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        if not chunk:  # (kept, an empty piece would hide the byte before the next one)
            return []
        if self._buffer:
            if not _may_end(self._pending[-1] if self._pending else self._buffer, chunk):
                self._hold(chunk)
                return []
            buffer = b"".join([self._buffer, *self._pending, chunk])
            self._pending, self._held = [], 0
        else:
            buffer = chunk
        # What providers send: events of one ``data: `` line each. Then every newline is in a
        # separator, and splitting on the separator yields the payloads with no per-event work.
        if buffer.endswith(b"\n\n") and buffer[:6] == b"data: ":  # a read of whole events
            payloads = buffer[6:-2].split(_NEXT)
            if b"\n" not in b"".join(payloads):  # (a join and a search: quicker than a count)
                self._buffer = b""
                return _nonempty(payloads)
        end = buffer.rfind(b"\n\n")
        if end < 0:
            self._start(buffer)
            return []
        complete = buffer[:end]
        self._start(buffer[end + 2 :])
        if complete[:6] == b"data: ":
            payloads = complete[6:].split(_NEXT)
            if b"\n" not in b"".join(payloads):
                return _nonempty(payloads)
        return [d for event in complete.split(b"\n\n") if (d := _event_data(event))]

    def _start(self, data: bytes) -> None:
        """Keep ``data``, the start of an event not yet ended (maybe none)."""
        self._buffer, self._held = data, len(data)
        if self._held > MAX_EVENT_BYTES:
            raise EventTooLarge

    def _hold(self, data: bytes) -> None:
        """Keep ``data``, more of the event ``_start`` began."""
        self._pending.append(data)
        self._held += len(data)
        if self._held > MAX_EVENT_BYTES:
            raise EventTooLarge

    def flush(self) -> list[bytes]:
        """Return a final event left without its blank line when the stream ended."""
        rest, self._buffer = b"".join([self._buffer, *self._pending]), b""
        self._pending, self._held = [], 0
        data = _event_data(rest.rstrip(b"\r\n"))
        return [data] if data else []


def _may_end(before: bytes, chunk: bytes) -> bool:
    """Whether ``chunk``, read after ``before``, may end an event (a blank line in it, or
    across the two)."""
    return b"\n\n" in chunk or (before.endswith(b"\n") and chunk.startswith(b"\n"))


def _event_data(event: bytes) -> bytes:
    """An event's data (empty when it has none: then it is no event); an ``error`` event's
    as an ``{"error": ...}`` object, as OpenAI sends one, whatever its own shape."""
    if event.startswith(b"data: ") and b"\n" not in event:
        return event[6:]  # the common case: one data line
    lines = event.split(b"\n")
    data = b"\n".join(_field_value(line[5:]) for line in lines if line.startswith(b"data:"))
    if data and any(_field_value(line[6:]) == b"error" for line in lines if line[:6] == b"event:"):
        return _as_error(data)
    return data


def _as_error(data: bytes) -> bytes:
    """An ``error`` event's data as OpenAI's error object: kept if it is one already, put
    under ``error`` if it is another object, made the message if it is no object."""
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError:
        value = data.decode("utf-8", "replace")
    if isinstance(value, dict) and value.get("error"):
        return data
    return orjson.dumps({"error": value if isinstance(value, dict) else {"message": str(value)}})


def _nonempty(payloads: list[bytes]) -> list[bytes]:
    return payloads if b"" not in payloads else [p for p in payloads if p]


def _field_value(value: bytes) -> bytes:
    return value[1:] if value.startswith(b" ") else value


def encode_event(seq: int, data: bytes) -> bytes:
    """One SSE event with its sequence number as ``id``; a payload of several lines (a
    provider that sent pretty-printed JSON) keeps one ``data:`` field a line."""
    if b"\n" in data:
        data = data.replace(b"\n", b"\ndata: ")
    return b"id: %d\ndata: %b\n\n" % (seq, data)


def encode_events(first: int, events: list[bytes]) -> bytes:
    """``encode_event`` for journal events' data numbered from ``first``, joined.

    A run of single-line payloads (what providers send) is joined in one call from the
    cached ``id`` lines, with no formatting or loop in Python an event: it is most of what
    relaying a chunk costs otherwise."""
    count = len(events)
    if b"\n" in b"".join(events):
        return b"".join([encode_event(seq, data) for seq, data in enumerate(events, first)])
    parts: list[bytes] = [b""] * (3 * count)
    parts[0::3] = _id_lines(first, count)
    parts[1::3] = events
    parts[2::3] = repeat(b"\n\n", count)
    return b"".join(parts)


def _id_lines(first: int, count: int) -> list[bytes]:
    """``id: <seq>\ndata: `` for ``count`` events from ``first``: cut from a table grown to
    the longest stream so far (up to ``ID_TABLE_SIZE``), formatted past it."""
    stop = first + count
    if stop > len(_ID_LINES) and len(_ID_LINES) < ID_TABLE_SIZE:
        grown = min(max(stop, 2 * len(_ID_LINES)), ID_TABLE_SIZE)
        _ID_LINES.extend(_ID_LINE % seq for seq in range(len(_ID_LINES), grown))
    lines = _ID_LINES[first:stop]
    if len(lines) < count:
        lines += [_ID_LINE % seq for seq in range(first + len(lines), stop)]
    return lines


def encode_retry(milliseconds: int) -> bytes:
    """A reconnection hint: the client should come back later. No blank line after it, so
    no (empty) event is dispatched; the field takes effect as it is read."""
    return b"retry: %d\n" % milliseconds
