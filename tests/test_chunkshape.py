"""The relay's fast path for chunks shaped like the last: it takes exactly what a full
parse would read the same way, and nothing else."""

from __future__ import annotations

import random
from typing import Any

import orjson
import pytest

from service import chunkshape
from service.chunkshape import START_CREDIT, ChunkShape

BASE = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
TEXTS = ["plain", "", 'say "hi"', "back\\slash\\", "line\nbreak\t", "é中🤖", "\u2028", '\\"']
TEXTS += ['","x":"y', '"},"logprobs":null,"finish_reason":null}],"usage":null,"x":"']


def chunk(text: Any, *, padding: str | None = None, **extra: Any) -> dict[str, Any]:
    choice = {"index": 0, "delta": {"content": text}, "logprobs": None, "finish_reason": None}
    value = {**BASE, "choices": [choice], "usage": None, **extra}
    if padding is not None:
        value["obfuscation"] = padding
    return value


def learnt(value: dict[str, Any]) -> ChunkShape:
    shape = ChunkShape()
    raw = orjson.dumps(value)
    shape.learn(raw, orjson.loads(raw))
    return shape


@pytest.mark.parametrize("padding", [None, "aZ09"], ids=["plain", "obfuscated"])
def test_chunks_of_the_shape_give_their_text(padding: str | None) -> None:
    """Quotes, backslashes, control characters and text that looks like the JSON around
    it all come back exactly as a full parse reads them."""
    shape = learnt(chunk("first", padding=padding))
    for text in TEXTS:
        raw = orjson.dumps(chunk(text, padding=padding and padding + text.isascii() * "x"))
        assert shape.text_of(raw) == orjson.loads(raw)["choices"][0]["delta"]["content"]


@pytest.mark.parametrize("padding", [None, "aZ09"], ids=["plain", "obfuscated"])
def test_a_read_of_chunks_gives_each_text_in_order(padding: str | None) -> None:
    """A run over many chunks at once reads each text as its own full parse would."""
    shape = learnt(chunk("first", padding=padding))
    payloads = [orjson.dumps(chunk(text, padding=padding)) for text in TEXTS]
    assert shape.run(payloads) == TEXTS
    assert shape.run(payloads, 3) == TEXTS[3:]


@pytest.mark.parametrize(
    "slots",
    [
        (b'"a', b'b","c"'),  # a string left open, closed in the next chunk
        (b'"a","b"', b'["c"', b'"d"]'),  # two strings in one, an array across two
        (b'"a"]', b'["b"'),
        (b'"a",', b'"b"'),
        (b'"a"', b""),
    ],
)
def test_a_run_takes_no_slot_that_is_not_one_string(slots: tuple[bytes, ...]) -> None:
    """A run's texts are read together, in one parse; slots that are no string apiece are
    never taken, however they might add up: the run ends at the first chunk a full parse
    would not read as one text."""
    shape = learnt(chunk("first"))
    template = orjson.dumps(chunk("SLOT"))
    ok = template.replace(b'"SLOT"', b'"ok"')
    payloads = [ok, *(template.replace(b'"SLOT"', slot) for slot in slots), ok]
    texts = shape.run(payloads)
    assert texts == ["ok"] + (["a"] if slots[0] == b'"a"' else [])
    for raw, text in zip(payloads, texts, strict=False):
        assert orjson.loads(raw)["choices"][0]["delta"]["content"] == text


def test_chunks_of_the_shape_with_no_text_cost_work_linear_in_the_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Chunks that fit the shape but carry no string (``"content": null`` beside a tool
    call): the relay parses each in full and asks for a run again from the next one; what
    is gathered for the one parse must not start over each time (the square of a read)."""
    gathered: list[int] = []
    together = chunkshape._strings

    def counting(slots: list[bytes]) -> list[str]:
        gathered.append(len(slots))
        return together(slots)

    monkeypatch.setattr(chunkshape, "_strings", counting)
    shape = learnt(chunk("first"))
    payloads = [orjson.dumps(chunk("a")), *[orjson.dumps(chunk(None))] * 300]
    payloads += [orjson.dumps(chunk("b")), orjson.dumps(chunk("c"))]
    texts, at = [], 0
    while at < len(payloads):
        run = shape.run(payloads, at)
        texts += run
        at += len(run) + 1  # the chunk it stopped at is parsed in full (``generation.py``)
    assert texts == ["a", "b", "c"]
    assert sum(gathered) <= 2 * len(payloads)


def test_a_provider_that_escapes_differently_still_matches() -> None:
    """Escapes orjson would not write (``\\u00e9``, ``\\/``) are the text's own business."""
    shape = learnt(chunk("first"))
    raw = orjson.dumps(chunk("X")).replace(b'"X"', b'"caf\\u00e9 a\\/b"')
    assert shape.text_of(raw) == "café a/b"


def test_whitespace_around_the_text_is_learnt_too() -> None:
    raw = b'{"choices": [{"index": 0, "delta": {"content": "a"}, "finish_reason": null}]}'
    shape = ChunkShape()
    shape.learn(raw, orjson.loads(raw))
    assert shape.text_of(raw.replace(b'"a"', b'"b c"')) == "b c"


@pytest.mark.parametrize(
    "raw",
    [
        b'"a","x":"b"',  # valid JSON around it, but another member: not the same shape
        b'"a"  ,"x":1',
        b'"unterminated',
        b'"bad \\q escape"',
        b'"raw\ncontrol"',
        b'"\\ud800"',  # a lone surrogate: orjson refuses it, as the full parse would
        b"123",
        b"null",
        b'["a"]',
        b"",
    ],
)
def test_anything_but_one_json_string_in_the_slot_misses(raw: bytes) -> None:
    """What a full parse would reject, or read as another structure, is never taken."""
    shape = learnt(chunk("first"))
    candidate = orjson.dumps(chunk("SLOT")).replace(b'"SLOT"', raw)
    assert shape.text_of(candidate) is None


@pytest.mark.parametrize("padding", ["a-b", "", 'a"}', "é"], ids=["dash", "empty", "quote", "utf8"])
def test_padding_that_is_not_plain_letters_misses(padding: str) -> None:
    """The padding is checked as ASCII letters and digits; anything else takes the full
    parse (which will accept it if it is valid)."""
    shape = learnt(chunk("first", padding="abc"))
    raw = orjson.dumps(chunk("next", padding="PAD")).replace(b"PAD", padding.encode())
    assert shape.text_of(raw) is None


@pytest.mark.parametrize(
    "other",
    [
        {**BASE, "choices": [], "usage": {"prompt_tokens": 1}},
        {**BASE, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
        {**BASE, "choices": [{"index": 1, "delta": {"content": "x"}, "finish_reason": None}]},
        {"error": {"message": "overloaded"}},
        chunk("x", model="other-model"),
        chunk("x", padding="abc"),
    ],
    ids=["usage", "finish", "second-choice", "error", "other-model", "padded"],
)
def test_chunks_of_another_shape_miss(other: dict[str, Any]) -> None:
    shape = learnt(chunk("first"))
    assert shape.text_of(orjson.dumps(other)) is None


@pytest.mark.parametrize(
    "value",
    [
        {**BASE, "choices": [{"index": 0, "delta": {"role": "x", "tool_calls": [{}]}}]},
        {**BASE, "choices": [{"index": 0, "delta": {"content": "a"}, "finish_reason": "stop"}]},
        {**BASE, "choices": [{"index": 0, "delta": {"content": "a"}, "logprobs": {"content": []}}]},
        {**BASE, "choices": [{"index": 0, "delta": {"content": 7}}]},
        chunk("a", usage={"prompt_tokens": 1}),
        {**BASE, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
    ],
    ids=["tool-calls", "finish", "key-twice", "not-text", "usage", "role-no-text"],
)
def test_only_plain_text_chunks_are_learnt(value: dict[str, Any]) -> None:
    """A chunk that does more than carry text would lose that something on the fast path."""
    shape = learnt(value)
    assert shape.text_of(orjson.dumps(value)) is None


@pytest.mark.parametrize(
    "learnt",
    [
        b'{"choices":[{"index":0,"delta":{"content":"a","content" :"a"}}]}',
        b'{"choices":[{"index":0,"delta":{"content":"a","\\u0063ontent":"a"}}]}',
        b'{"meta":{"content":"a"},"choices":[{"index":0,"delta":{"content" :"a"}}]}',
        b'{"x\\"content":"a","choices":[{"index":0,"delta":{"content" : "a"}}]}',
        b'{"choices":[{"index":0,"delta":{"content":"a"}}],'
        b'"choices":[{"index":0,"delta":{"content" :"a"}}]}',
        b'{"choices":[{"index":0,"delta":{"content":"a","content" :"a"}}],"obfuscation":"xy"}',
    ],
    ids=["duplicate-key", "escaped-key", "other-member", "quote-in-key", "twice", "padded"],
)
def test_a_string_that_is_not_the_one_the_parser_reads_is_never_learnt(learnt: bytes) -> None:
    """``"content":`` once in the bytes, its string equal to the text, and yet not the
    member the parser keeps: learning probes the slot, so later chunks are parsed in full."""
    value = orjson.loads(learnt)
    assert value["choices"][0]["delta"]["content"] == "a"
    shape = ChunkShape()
    shape.learn(learnt, value)
    later = learnt.replace(b'"content":"a"', b'"content":"HIJACK"', 1)
    assert later != learnt
    assert shape.text_of(later) is None


def test_chunks_without_text_do_not_count_towards_giving_up() -> None:
    """Reasoning or tool-call chunks before the text, however many, leave the fast path
    to the text that follows."""
    shape = ChunkShape()
    for _ in range(3 * int(START_CREDIT) + 3):
        value = {**BASE, "choices": [{"index": 0, "delta": {"reasoning_content": "hmm"}}]}
        shape.learn(orjson.dumps(value), value)
    shape.learn(orjson.dumps(chunk("first")), chunk("first"))
    assert shape.text_of(orjson.dumps(chunk("next"))) == "next"


def _relayed(shape: ChunkShape, values: list[dict[str, Any]]) -> list[bool]:
    """Feed chunks as the relay does; True for each the fast path took."""
    taken = []
    for value in values:
        raw = orjson.dumps(value)
        text = shape.text_of(raw)
        if text is None:
            shape.learn(raw, orjson.loads(raw))
        taken.append(text is not None)
    return taken


def test_the_fast_path_gives_up_on_a_provider_whose_chunks_never_repeat() -> None:
    """Every text chunk with a shape of its own: each is learnt in vain, and after a few
    the stream stops trying (a chunk that would have fitted is not even looked at)."""
    shape = ChunkShape()
    taken = _relayed(shape, [chunk("a", created=i) for i in range(int(START_CREDIT) + 1)])
    assert not any(taken)
    assert shape.text_of(orjson.dumps(chunk("b", created=int(START_CREDIT)))) is None


def test_a_shape_that_keeps_changing_is_given_up_but_one_that_holds_is_not() -> None:
    """A shape that changes every third chunk costs more learning than it saves: given up
    within a few dozen chunks. A shape that holds keeps the fast path for good, however
    long the stream, with the odd different chunk (a content filter's note) in between."""
    changing = [chunk("w", created=i // 3) for i in range(60)]
    taken = _relayed(ChunkShape(), changing)
    assert not any(taken[-20:])
    holding = [chunk("w", refusal=None) if i % 25 == 24 else chunk("w") for i in range(500)]
    taken = _relayed(ChunkShape(), holding)
    assert sum(taken[-100:]) == 92  # all but the four odd ones and the one after each


def test_random_texts_agree_with_the_full_parse() -> None:
    """Random texts over an alphabet rich in JSON's special characters: the fast path,
    when it answers, answers what orjson reads from the whole chunk."""
    rng = random.Random(7)
    alphabet = ['"', "\\", "/", "{", "}", ",", ":", "\n", "\x00", "é", "🤖", "a", " ", "u"]
    shape = learnt(chunk("seed", padding="p1"))
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(12)))
        raw = orjson.dumps(chunk(text, padding=f"p{rng.randrange(1000)}"))
        assert shape.text_of(raw) == text
