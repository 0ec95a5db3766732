"""``service.sse``: the incremental decoder of the provider's stream, and our encoders.

The decoder must give the same payloads however the bytes are split across reads,
including a CRLF split between two reads.
"""

from __future__ import annotations

import random

import pytest

from service import sse
from service.sse import (
    DONE,
    ID_TABLE_SIZE,
    KEEPALIVE,
    EventTooLarge,
    SSEDecoder,
    encode_event,
    encode_events,
    encode_retry,
)

STREAM = (
    b'data: {"id":"a","n":1}\n\n'
    b": a comment line\n\n"
    b'data: {"id":"b","n":2}\n'
    b"id: 7\n"
    b"event: message\n\n"
    b"data: first line\n"
    b"data:second line\n"
    b"data:  two spaces\n\n"
    b"retry: 1000\n\n"
    b"data: [DONE]\n\n"
)
EXPECTED = [
    b'{"id":"a","n":1}',
    b'{"id":"b","n":2}',
    b"first line\nsecond line\n two spaces",
    DONE,
]


def _feed_in_pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    decoder = SSEDecoder()
    out: list[bytes] = []
    start = 0
    for cut in [*cuts, len(data)]:
        out.extend(decoder.feed(data[start:cut]))
        start = cut
    return out + decoder.flush()


def test_whole_stream_at_once() -> None:
    """One read: every data payload in order; comments, id, event and retry ignored."""
    assert _feed_in_pieces(STREAM, []) == EXPECTED


def test_every_single_split_point() -> None:
    """Split in two at every byte boundary: always the same payloads."""
    for cut in range(len(STREAM) + 1):
        assert _feed_in_pieces(STREAM, [cut]) == EXPECTED, cut


def test_byte_by_byte() -> None:
    """One byte per read."""
    assert _feed_in_pieces(STREAM, list(range(1, len(STREAM)))) == EXPECTED


@pytest.mark.parametrize("seed", range(20))
def test_random_splits(seed: int) -> None:
    """Random read sizes (seeded), LF and CRLF line endings alike."""
    rng = random.Random(seed)
    for data in (STREAM, STREAM.replace(b"\n", b"\r\n")):
        cuts = sorted(rng.sample(range(1, len(data)), rng.randint(1, 30)))
        assert _feed_in_pieces(data, cuts) == EXPECTED


def test_crlf_split_between_reads() -> None:
    """A CR at the end of one read and its LF at the start of the next make one line end;
    the CR ends the line at once (an event it completes is not held for the next read)."""
    decoder = SSEDecoder()
    assert decoder.feed(b"data: one\r") == []
    assert decoder.feed(b"\n\r") == [b"one"]
    assert decoder.feed(b"\ndata: two\r\n\r\n") == [b"two"]


def test_crlf_at_every_split() -> None:
    """A CRLF stream split at every point, including between CR and LF."""
    data = STREAM.replace(b"\n", b"\r\n")
    for cut in range(len(data) + 1):
        assert _feed_in_pieces(data, [cut]) == EXPECTED, cut


def test_lone_cr_line_endings() -> None:
    """CR alone also ends a line (the spec allows CRLF, LF and CR), at once: events that end
    with CRs are not held back until the next read (a LF after it would be skipped)."""
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\r\rdata: b\r\r") == [b"a", b"b"]
    assert decoder.feed(b"data: c\r\r") == [b"c"]
    assert decoder.flush() == []


def test_comment_only_and_empty_events_yield_nothing() -> None:
    """Keepalive comments and stray blank lines produce no payloads."""
    decoder = SSEDecoder()
    assert decoder.feed(KEEPALIVE * 3 + b"\n\n\n\n") == []
    assert decoder.flush() == []


def test_an_event_with_empty_data_is_none() -> None:
    """``data:`` with nothing after it dispatches no event (the spec's "if the data buffer
    is an empty string ... return"), on every path through the decoder."""
    assert SSEDecoder().feed(b"data:\n\n") == []
    assert SSEDecoder().feed(b"data: \n\ndata: a\n\ndata: \n\n") == [b"a"]
    assert SSEDecoder().feed(b"data: a\n\ndata: \n\ndata: b") == [b"a"]
    assert SSEDecoder().feed(b"event: x\ndata:\n\n: c\n\ndata: b\n\n") == [b"b"]
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\n\ndata: ") == [b"a"]
    assert decoder.flush() == []


def test_a_leading_byte_order_mark_is_dropped() -> None:
    """The stream's first bytes may be a UTF-8 BOM; it is not part of the first field."""
    decoder = SSEDecoder()
    assert decoder.feed(b"\xef\xbb\xbfdata: a\n\ndata: b\n\n") == [b"a", b"b"]
    assert decoder.feed(b"\xef\xbb\xbfdata: c\n\n") == []  # later, it is just bytes
    assert SSEDecoder().feed(b"\xef\xbb\xbf: hi\ndata: d\n\n") == [b"d"]
    split = SSEDecoder()  # the mark split across reads
    assert split.feed(b"") == []
    assert split.feed(b"\xef") == []
    assert split.feed(b"\xbb\xbfdata: e\n\n") == [b"e"]


def test_flush_returns_an_unterminated_last_event() -> None:
    """At EOF, an event without its blank line is still delivered, once."""
    decoder = SSEDecoder()
    assert decoder.feed(b"data: x\n\ndata: tail") == [b"x"]
    assert decoder.flush() == [b"tail"]
    assert decoder.flush() == []
    other = SSEDecoder()
    other.feed(b"data: tail\r\n")
    assert other.flush() == [b"tail"]


def test_payload_bytes_are_the_providers() -> None:
    """The payload is the provider's bytes as sent (no JSON round trip, spacing kept)."""
    raw = b'{ "id" : "x",  "choices" : [ ] }'
    assert SSEDecoder().feed(b"data: " + raw + b"\n\n") == [raw]


def test_encoders() -> None:
    """Our events carry the sequence number as id; retry hints and keepalives are exact."""
    assert encode_event(3, b'{"a":1}') == b'id: 3\ndata: {"a":1}\n\n'
    assert encode_retry(1000) == b"retry: 1000\n"
    assert KEEPALIVE == b": keepalive\n"
    decoded = SSEDecoder().feed(encode_event(1, b"{}") + KEEPALIVE + encode_event(2, DONE))
    assert decoded == [b"{}", DONE]


def test_a_payload_of_several_lines_keeps_a_data_field_a_line() -> None:
    """A provider's multi-line event, decoded and encoded again, decodes to the same bytes."""
    provider = b'data: {\ndata:   "a": 1\ndata: }\n\n'
    (payload,) = SSEDecoder().feed(provider)
    assert payload == b'{\n  "a": 1\n}'
    wire = encode_event(7, payload)
    assert wire == b'id: 7\ndata: {\ndata:   "a": 1\ndata: }\n\n'
    assert SSEDecoder().feed(wire) == [payload]


def test_ids_past_the_cached_table_are_formatted() -> None:
    """A run that starts inside the table of id lines and ends past it."""
    first = ID_TABLE_SIZE - 2
    events = [b'{"n":%d}' % n for n in range(5)]
    expected = b"".join(encode_event(seq, data) for seq, data in enumerate(events, first))
    assert encode_events(first, events) == expected
    assert encode_events(first + 10, events) == b"".join(
        encode_event(seq, data) for seq, data in enumerate(events, first + 10)
    )


def test_a_run_of_events_encodes_as_each_would() -> None:
    """Numbered from the first; a multi-line payload among single-line ones still gets a
    ``data:`` field a line."""
    events = [b"{}", b'{\n"a": 1\n}', DONE]
    expected = b"".join(encode_event(seq, data) for seq, data in enumerate(events, 4))
    assert encode_events(4, events) == expected
    assert encode_events(4, events[::2]) == encode_event(4, b"{}") + encode_event(5, DONE)
    assert SSEDecoder().feed(expected) == events


@pytest.mark.parametrize(
    ("wire", "payloads"),
    [
        (b"data: a\n\nid: 3\ndata: b\n\n", [b"a", b"b"]),  # a second field in one event
        (b"data: a\n\ndata:b\n\n", [b"a", b"b"]),  # no space after the colon
        (b"data: a\n\n: ping\n\ndata: b\n\n", [b"a", b"b"]),  # a comment between
        (b"data: a\ndata: b\n\ndata: c\n\n", [b"a\nb", b"c"]),  # a multi-line payload
    ],
)
def test_single_line_fast_path_gives_way_to_the_general_one(
    wire: bytes, payloads: list[bytes]
) -> None:
    """A batch that is not all one-line ``data: `` events is decoded field by field."""
    assert SSEDecoder().feed(wire) == payloads


def test_an_event_past_the_bound_is_refused_however_it_is_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An unfinished event past ``MAX_EVENT_BYTES`` is refused, in one read or in many (a
    provider that never ends its event would otherwise grow the buffer without end); one
    just under it, in many reads, decodes whole."""
    monkeypatch.setattr(sse, "MAX_EVENT_BYTES", 1000)
    under = b"data: " + b"x" * 900 + b"\n\n"
    decoder = SSEDecoder()
    got = [p for i in range(0, len(under), 7) for p in decoder.feed(under[i : i + 7])]
    assert got == [b"x" * 900]
    for step in (1001, 10):
        decoder = SSEDecoder()
        decoder.feed(b"data: {}\n\n")
        reads = [b"data: " + b"y" * (step - 6)] + [b"y" * step] * (1200 // step)
        with pytest.raises(EventTooLarge):
            _feed_all(decoder, reads)


def _feed_all(decoder: SSEDecoder, reads: list[bytes]) -> None:
    for data in reads:
        decoder.feed(data)


@pytest.mark.parametrize(
    ("reads", "expected", "rest"),
    [
        ([b"data: a\r", b"\n", b"\r\n"], [[], [], [b"a"]], []),
        ([b"data: a\n", b"", b"\ndata: b\n\n"], [[], [], [b"a", b"b"]], []),
        ([b"data: a\r", b"\n", b"\r\ndata: b"], [[], [], [b"a"]], [b"b"]),
    ],
    ids=["crlf-split", "empty-read", "crlf-split-then-unended"],
)
def test_a_blank_line_across_reads_that_shrink_to_nothing_still_ends_the_event(
    reads: list[bytes], expected: list[list[bytes]], rest: list[bytes]
) -> None:
    """A read that is only the LF of a CRLF begun before (or is empty) adds nothing; the
    blank line it sits in still ends the event then, not later, and never merges two."""
    decoder = SSEDecoder()
    assert [decoder.feed(data) for data in reads] == expected
    assert decoder.flush() == rest
