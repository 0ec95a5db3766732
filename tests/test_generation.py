"""Journaling a read's worth of provider payloads, checked one by one, in order."""

from __future__ import annotations

import orjson
import pytest

from service.chunkshape import ChunkShape
from service.errors import ProviderProtocolError, ProviderStatusError
from service.generation import _relay
from service.sse import DONE
from service.stream import Owner, Stream


class _Plain:
    """Provider words passed on as they are (the scrubbing is upstream.py's, tested there)."""

    def redact(self, text: str) -> str:
        return text

    def field(self, value: object) -> str | None:
        return value if isinstance(value, str) else None


PLAIN = _Plain()


def _stream(*, include_usage: bool = True) -> Stream:
    return Stream(
        "strm_t", Owner("u", "t", "k"), model="m", streaming=True, include_usage=include_usage
    )


def _chunk(text: str) -> bytes:
    return orjson.dumps({"id": "c", "choices": [{"index": 0, "delta": {"content": text}}]})


def test_a_batch_is_journaled_in_order_up_to_done() -> None:
    """Every chunk of the batch is journaled as the provider's own bytes; [DONE] ends it."""
    stream = _stream()
    payloads = [_chunk("a"), _chunk("b"), DONE, _chunk("after done")]
    assert _relay(stream, PLAIN, ChunkShape(), payloads) is True
    assert stream.events == [payloads[0], payloads[1]]
    assert stream.progress.text == "ab"
    assert stream.first_token_at is not None


@pytest.mark.parametrize(
    "bad",
    [b"{not json", b'{"id": "x"},{"id": "y"}', b"", b"[1, 2]"],
    ids=["malformed", "two-values", "empty", "not-an-object"],
)
def test_chunks_before_a_bad_one_are_journaled_then_it_fails(bad: bytes) -> None:
    """What came before the bad chunk reaches the journal, nothing after it does, and the
    error is a protocol error (a 502 for the client)."""
    stream = _stream()
    payloads = [_chunk("a"), _chunk("b"), bad, _chunk("c")]
    with pytest.raises(ProviderProtocolError):
        _relay(stream, PLAIN, ChunkShape(), payloads)
    assert stream.events == payloads[:2]
    assert stream.progress.text == "ab"


def test_a_midstream_error_event_keeps_what_came_before() -> None:
    """An error object from the provider ends the relay with the provider's message."""
    stream = _stream()
    error = orjson.dumps({"error": {"message": "overloaded", "type": "server_error"}})
    with pytest.raises(ProviderStatusError, match="overloaded"):
        _relay(stream, PLAIN, ChunkShape(), [_chunk("a"), error, _chunk("b")])
    assert stream.events == [_chunk("a")]


def test_usage_only_chunk_is_withheld_unless_asked_for() -> None:
    """Sluice always asks for usage; a client that did not gets no usage-only chunk."""
    usage = orjson.dumps({"id": "c", "choices": [], "usage": {"prompt_tokens": 1}})
    quiet, asked = _stream(include_usage=False), _stream(include_usage=True)
    for stream in (quiet, asked):
        _relay(stream, PLAIN, ChunkShape(), [_chunk("a"), usage])
        assert stream.progress.usage == {"prompt_tokens": 1}
    assert quiet.events == [_chunk("a")]
    assert asked.events == [_chunk("a"), usage]
