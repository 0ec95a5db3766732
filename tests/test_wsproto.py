"""WebSocket frame encoding and parsing, on their own (no server)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from service.errors import InvalidRequestError, StreamEndedError
from service.wsproto import (
    MAX_REQUEST_ID_CHARS,
    StreamFrames,
    error_frame,
    is_request_id,
    parse_frame,
)

CHUNK = b'{"id":"c1","choices":[{"index":0,"delta":{"content":"h\\u00e9 \\"q\\""}}]}'


@pytest.mark.parametrize("request_id", ["r1", 'quo"te\\', "ünï ✓", 0, -7, 2**40])
def test_a_chunk_frame_is_json_that_embeds_the_chunk_bytes_untouched(request_id: Any) -> None:
    """Whatever the request id, the frame parses and carries the chunk bytes verbatim."""
    frame = StreamFrames(request_id, "strm_abc").chunk(12, CHUNK)
    assert orjson.loads(frame) == {
        "type": "chunk",
        "request_id": request_id,
        "stream_id": "strm_abc",
        "seq": 12,
        "chunk": orjson.loads(CHUNK),
    }
    assert frame.endswith(b',"chunk":' + CHUNK + b"}")


def test_started_done_and_error_frames() -> None:
    """The other stream frames carry the same ids and the outcome."""
    frames = StreamFrames("r", "strm_x")
    assert orjson.loads(frames.started()) == {
        "type": "started",
        "request_id": "r",
        "stream_id": "strm_x",
    }
    usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    assert orjson.loads(frames.done(9, "stop", usage)) == {
        "type": "done",
        "request_id": "r",
        "stream_id": "strm_x",
        "seq": 9,
        "finish_reason": "stop",
        "usage": usage,
    }
    error = orjson.loads(frames.error(4, StreamEndedError("stopped", code="stream_cancelled")))
    assert error["seq"] == 4
    assert error["error"]["code"] == "stream_cancelled"
    assert set(error["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize(
    ("request_id", "echoed"),
    [("ok", "ok"), (5, 5), (True, None), ({"a": 1}, None), ("", None), (None, None)],
)
def test_a_frame_error_echoes_only_a_valid_request_id(request_id: Any, echoed: Any) -> None:
    """Junk in request_id is not reflected back to the client."""
    frame = orjson.loads(error_frame(request_id, InvalidRequestError("bad", param="body")))
    assert frame["request_id"] == echoed
    assert frame["error"]["param"] == "body"
    assert "stream_id" not in frame


def test_request_ids_are_short_strings_or_integers() -> None:
    """Booleans, floats, empty and over-long strings are not request ids."""
    assert is_request_id("x" * MAX_REQUEST_ID_CHARS)
    assert not is_request_id("x" * (MAX_REQUEST_ID_CHARS + 1))
    assert not is_request_id(1.5)
    assert not is_request_id(False)


@pytest.mark.parametrize("text", ["", "{", "[]", '"s"', "null", "1"])
def test_a_frame_must_be_a_json_object(text: str) -> None:
    """Anything but a JSON object is an invalid_request_error."""
    with pytest.raises(InvalidRequestError):
        parse_frame(text)
