"""The relay's fast path: recognising a chunk that is the last one with other words in it.

Nearly every chunk of a streamed completion is the one before with another text: the same
id, model, timestamp and key order, one ``delta.content`` string that differs, and with
OpenAI an ``obfuscation`` string of random letters at the end that differs too. Parsing
each such chunk into dicts to read one string costs most of what Sluice spends per chunk.
``ChunkShape`` learns the shape from a chunk that was parsed in full, then takes a chunk that
has the same bytes around those strings by decoding just the text.

It is exact, not a heuristic: a chunk it takes is the learnt chunk (valid JSON, checked by
the full parse) with another JSON string (validated by ``orjson``) in place of the text and
other ASCII letters and digits in place of the padding's; so it is valid JSON whose parse
differs from the learnt one only in those two strings. Learning proves that the slots are
the members the parser reads as the text and the padding (``_probed``), not merely bytes
that look so. Anything
else (the role chunk, tool calls, the finish and usage chunks, an error, a malformed chunk)
misses and takes the full parse. A provider whose text chunks do not keep a shape for long
stops being tried (a credit, see ``START_CREDIT``), so the attempt never costs more than a
few learnings.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import islice
from typing import Any

import orjson

_CONTENT = b'"content":'
_OBFUSCATION = b',"obfuscation":'  # OpenAI's padding, last in its chunks
_WHITESPACE = b" \t\r\n"
# Learning pays when a shape, once learnt, takes the next few chunks: a text chunk parsed
# in full (and learnt from) costs a credit, a chunk taken earns a third of one back. Out
# of credit, the stream stops trying: the fast path must never cost more than it saves.
START_CREDIT = 4.0
HIT_CREDIT = 1 / 3
MAX_CREDIT = 8.0
_PROBE = "sluiceprobe7"  # letters and digits: fit for either slot
_PROBE_TEXT = orjson.dumps(_PROBE)
_PROBE_PADDING = _PROBE.encode()
_SLOT_SEPARATOR = b",\n"  # see ``_strings``


class ChunkShape:
    """One stream's learnt chunk shape; see the module docstring for why it is exact."""

    __slots__ = ("_checked", "_credit", "_end", "_middle", "_padded", "_prefix")

    def __init__(self) -> None:
        self._prefix = b""  # up to the content string; empty: nothing learnt
        self._padded = False  # an ``obfuscation`` string ends the chunk
        self._middle = b""  # padded: from the content string to the padding's letters
        self._end = b""  # after the content string, or after the padding's letters
        self._credit = START_CREDIT
        self._checked = False  # the last run ended on a slot that is no string: one by one

    def run(self, payloads: list[bytes], start: int = 0) -> list[str]:
        """The ``delta.content`` of each chunk from ``payloads[start]`` on, up to the first
        one without the learnt shape (the usual read: all of them, in one parse)."""
        if not self._prefix:
            return []
        # (islice, not a slice: a read of many misses calls again after each, from there)
        chunks = islice(payloads, start, None) if start else payloads
        texts = self._one_by_one(chunks) if self._checked else self._together(chunks)
        if texts and self._credit < MAX_CREDIT:  # (a compare a run: at the cap, nothing more)
            self._credit = min(self._credit + HIT_CREDIT * len(texts), MAX_CREDIT)
        return texts

    def _together(self, chunks: Iterable[bytes]) -> list[str]:
        """The run's texts from one parse of all its slots (``_strings``). A slot that is no
        string (a tool call's ``null`` content, say) ends the run, and the runs after it are
        read ``_one_by_one``: gathering past it again at every call would cost time growing
        with the square of a read of such chunks."""
        slots: list[bytes] = []  # each chunk's bytes in the text's place
        if self._padded:
            for raw in chunks:
                if (slot := self._slot(raw)) is None:
                    break
                slots.append(slot)
        else:
            prefix, end, cut = self._prefix, self._end, len(self._prefix)
            tail = -len(end) or None  # (the end is never empty: the chunk's braces close)
            for raw in chunks:
                if not raw.startswith(prefix) or not raw.endswith(end):
                    break
                slots.append(raw[cut:tail])
        texts = _strings(slots)
        self._checked = len(texts) < len(slots)
        return texts

    def _one_by_one(self, chunks: Iterable[bytes]) -> list[str]:
        """The run's texts parsed chunk by chunk, up to a slot that is no string (the next
        run is read so too) or a chunk without the shape (the next is read ``_together``)."""
        texts: list[str] = []
        for raw in chunks:
            if (slot := self._slot(raw)) is None:
                break
            if (text := _string(slot)) is None:
                return texts
            texts.append(text)
        self._checked = False
        return texts

    def _slot(self, raw: bytes) -> bytes | None:
        """The chunk's bytes in the text's place, if it has the learnt shape."""
        if not raw.startswith(self._prefix) or not raw.endswith(self._end):
            return None
        cut, stop = len(self._prefix), len(raw) - len(self._end)
        if self._padded and (stop := self._text_end(raw, cut, stop)) < 0:
            return None
        return raw[cut:stop]

    def text_of(self, raw: bytes) -> str | None:
        """The chunk's ``delta.content`` if ``raw`` has the learnt shape, else None."""
        texts = self.run([raw])
        return texts[0] if texts else None

    def _text_end(self, raw: bytes, start: int, stop: int) -> int:
        """Padded: where the text ends, before the middle and the padding's letters (no
        quote in them) that end the chunk up to ``stop``; -1 if they are not there."""
        quote = raw.rfind(b'"', start, stop) + 1  # the middle ends with it
        if not raw.endswith(self._middle, 0, quote) or not raw[quote:stop].isalnum():
            return -1
        return quote - len(self._middle)

    def learn(self, raw: bytes, chunk: dict[str, Any]) -> None:
        """Take ``raw``, which parsed as ``chunk``, as the shape if it is a plain text chunk.

        Only text chunks cost credit: a stream may open with any number of others (a role
        chunk, reasoning, tool calls) before its text."""
        if self._credit < 0:
            return  # given up
        content = _plain_text(chunk)
        if content is None:
            return  # keep the shape: it may fit the chunks after this one
        self._credit -= 1
        if self._credit < 0:
            self._prefix = b""  # give up: ``text_of`` returns at its first test from now on
            return
        if raw.count(_CONTENT) != 1:
            return
        start = raw.index(_CONTENT) + len(_CONTENT)
        while raw[start : start + 1] and raw[start] in _WHITESPACE:
            start += 1
        stop = _string_end(raw, start)
        if stop is None:
            return
        padding = _padding(raw, chunk)
        if not _probed(raw, chunk, (start, stop), padding):
            return
        if padding is None:
            self._prefix, self._middle, self._end = raw[:start], b"", raw[stop:]
            self._padded = False
        else:
            self._prefix, self._middle = raw[:start], raw[stop : padding[0]]
            self._end, self._padded = raw[padding[1] :], True


def _strings(slots: list[bytes]) -> list[str]:
    """The texts of the leading ``slots`` that are each exactly one JSON string.

    One parse of them all as an array, their separator a comma and a raw newline: no JSON
    string may hold a raw newline, so every separator falls outside the strings, and (every
    element being a string) outside any array or object; each is then a top-level comma,
    and as many elements as slots leaves no slot another one: each slot is one element, a
    string. When that does not hold, slot by slot, up to the first that is no string."""
    if not slots:
        return []
    try:
        texts = orjson.loads(b"[%b]" % _SLOT_SEPARATOR.join(slots))
    except orjson.JSONDecodeError:
        texts = None
    if type(texts) is list and len(texts) == len(slots) and {*map(type, texts)} == {str}:
        return texts
    found: list[str] = []
    for slot in slots:
        if (text := _string(slot)) is None:
            break
        found.append(text)
    return found


def _string(slot: bytes) -> str | None:
    """The string ``slot`` is, if it is exactly one JSON string."""
    try:
        text = orjson.loads(slot)
    except orjson.JSONDecodeError:
        return None
    return text if type(text) is str else None


def _probed(
    raw: bytes, chunk: dict[str, Any], text: tuple[int, int], padding: tuple[int, int] | None
) -> bool:
    """Whether the slots are what the parser reads as the text (and the padding), and
    nothing else: with probe values in them, the chunk must parse as ``chunk`` with just
    those two values changed. (Finding the bytes ``"content":`` is not proof: a duplicate
    key, an escaped key or another object's ``content`` member can hold the same string.)"""
    probe = raw[: text[0]] + _PROBE_TEXT
    if padding is None:
        probe += raw[text[1] :]
    else:
        probe += raw[text[1] : padding[0]] + _PROBE_PADDING + raw[padding[1] :]
    try:
        parsed = orjson.loads(probe)
        delta = parsed["choices"][0]["delta"]
        if delta["content"] != _PROBE or (padding and parsed["obfuscation"] != _PROBE):
            return False
        delta["content"] = chunk["choices"][0]["delta"]["content"]
        if padding:
            parsed["obfuscation"] = chunk["obfuscation"]
    except (orjson.JSONDecodeError, LookupError, TypeError):
        return False
    return bool(parsed == chunk)


def _plain_text(chunk: dict[str, Any]) -> str | None:
    """The text of a chunk that carries only text for choice 0: some text, and no usage,
    tool calls, finish, other choices or error. Anything else is not learnt."""
    if chunk.get("usage") or chunk.get("error"):
        return None
    choices = chunk.get("choices")
    if type(choices) is not list or len(choices) != 1 or type(choices[0]) is not dict:
        return None
    choice = choices[0]
    delta = choice.get("delta")
    if choice.get("index", 0) != 0 or choice.get("finish_reason") or type(delta) is not dict:
        return None
    content = delta.get("content")
    if type(content) is not str or not content:
        return None  # no text: the role chunk that opens a stream, not one of its words
    if delta.get("tool_calls") or delta.get("reasoning_content") or delta.get("reasoning"):
        return None  # more than text: every such chunk is folded in full
    return content


def _padding(raw: bytes, chunk: dict[str, Any]) -> tuple[int, int] | None:
    """Where the letters of an ``obfuscation`` string that ends the chunk start and stop."""
    padding = chunk.get("obfuscation")
    if type(padding) is not str or not padding.isalnum() or not padding.isascii():
        return None
    if not raw.endswith(b'%s"%s"}' % (_OBFUSCATION, padding.encode())):
        return None
    stop = len(raw) - 2  # before '"}'
    return stop - len(padding), stop


def _string_end(raw: bytes, start: int) -> int | None:
    """The index just past the JSON string starting at ``start`` (None: no string there)."""
    if raw[start : start + 1] != b'"':
        return None
    at = start + 1
    while True:
        at = raw.find(b'"', at)
        if at < 0:
            return None
        backslashes = 0
        while raw[at - 1 - backslashes] == 0x5C:  # an escaped quote is inside the string
            backslashes += 1
        if backslashes % 2 == 0:
            return at + 1
        at += 1
