"""One generation and its journal: the events clients read, and what was generated so far.

A ``Stream`` is written by exactly one generation task and read by any number of readers
(an SSE response, a WebSocket, a resumed connection). Readers never block the writer: the
writer appends to ``events`` and wakes readers; each reader keeps its own position.

Invariants: ``events[i]`` has sequence number ``i + 1``; once ``status`` leaves RUNNING
nothing is appended again; the last event of an ended stream is ``[DONE]`` or an error,
except for SHUTDOWN, which leaves the journal open-ended so the client resumes elsewhere.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import Any

from .errors import InvalidRequestError, ProviderProtocolError, SluiceError
from .jsonbytes import dumps_kept
from .latch import Latch, Pulse
from .sse import DONE


class StreamStatus(StrEnum):
    RUNNING = "running"
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    CLIENT_GONE = "client_gone"
    PROVIDER_ERROR = "provider_error"
    TIMEOUT = "timeout"
    SHUTDOWN = "shutdown"


EVENT_OVERHEAD = 48  # bytes a kept event costs besides its data (its bytes' header, a list slot)
NO_LIMITS: Mapping[str, int | None] = MappingProxyType({})
NO_COUNTS: Mapping[str, int] = MappingProxyType({})


class Kind:
    """What a journal event is: a provider's chunk, or the final ``[DONE]`` or error."""

    CHUNK = 0
    DONE = 1
    ERROR = 2


@dataclass(frozen=True, slots=True)
class Owner:
    """Who a stream belongs to: only this user may read or cancel it."""

    user_id: str
    tenant: str
    key_id: str


@dataclass(slots=True)
class Progress:
    """What the provider has produced so far, assembled from the chunks as they pass.

    A provider's text is checked to be text here (a number or an object as ``content``
    raises ``ProviderProtocolError``): it is joined, counted and billed later, when an
    error could no longer reach the client and would leave the request unsettled."""

    parts: list[str] = field(default_factory=list)
    # Made at first use (most streams have none of these to note; a held stream's bytes count):
    tool_calls: list[Any] | None = None
    others: list[Any] | None = None  # deltas of choices past 0 (``n`` > 1)
    # Generated but not the text: reasoning, a legacy ``function_call``'s name and arguments
    # (billed when usage never comes).
    unseen: list[str] | None = None
    finished: set[int] | None = None  # the choices that have a finish reason
    finish_reason: str | None = None  # choice 0's
    usage: dict[str, Any] | None = None
    response_id: str | None = None
    response_model: str | None = None
    chunks: int = 0
    started: bool = False  # a delta said something besides its role (the output began)

    def add_chunk(self, chunk: dict[str, Any]) -> bool:
        """Fold one chunk in; return True when it carries only usage (no choices)."""
        self.chunks += 1
        if self.response_id is None:
            self.response_id = _text(chunk.get("id"))
            self.response_model = _text(chunk.get("model"))
        usage = chunk.get("usage")
        if usage and type(usage) is dict:  # a provider's odd usage is not ours to trust
            self.usage = usage
        choices = chunk.get("choices")
        if not choices:
            return usage is not None
        for choice in choices:
            delta = choice.get("delta")
            if not self.started and delta and type(delta) is dict:
                self.started = any(v for k, v in delta.items() if k != "role")
            index = choice.get("index", 0)
            if index != 0:
                if delta:
                    self._other(_object(delta))  # billed too, if usage never comes
                if choice.get("finish_reason"):
                    self._finished(index)
                continue
            if delta:
                self._output(delta)
            reason = choice.get("finish_reason")
            if reason:
                self.finish_reason = _text(reason)
                self._finished(0)
        return False

    def add_texts(self, texts: list[str]) -> None:
        """Fold in chunks that carry only text for choice 0 (``chunkshape.py`` found them)."""
        self.chunks += len(texts)
        self.parts += texts
        self.started = True

    def add_completion(self, body: dict[str, Any]) -> None:
        """Fold a whole non-streamed completion in."""
        self.response_id = _text(body.get("id"))
        self.response_model = _text(body.get("model"))
        usage = body.get("usage")
        self.usage = usage if usage and type(usage) is dict else None
        for choice in body.get("choices") or ():
            message = _object(choice.get("message") or {})
            if choice.get("index", 0) != 0:
                self._other(message)
                continue
            self._output(message)
            self.finish_reason = _text(choice.get("finish_reason"))
        self.chunks = 1
        self.started = True

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def generating(self) -> bool:
        """Anything past opening role chunks has come: output of any kind (text, tool or
        function calls, reasoning, audio, of any choice), a finish or usage."""
        return self.started or bool(self.finished or self.usage)

    @property
    def finished_choices(self) -> int:
        return len(self.finished) if self.finished else 0

    def _finished(self, index: int) -> None:
        if self.finished is None:
            self.finished = set()
        self.finished.add(index)

    def _output(self, part: dict[str, Any]) -> None:
        """Choice 0's output in a delta or a whole message: its text (or refusal, generated
        too), its reasoning, its tool calls."""
        content = _generated(part.get("content") or part.get("refusal"))
        if content:
            self.parts.append(content)
        thought = _generated(part.get("reasoning_content") or part.get("reasoning"))
        if thought:
            self._unseen(thought)
        calls = part.get("tool_calls")
        if calls:
            self._calls(calls)
        legacy = part.get("function_call")
        if legacy:
            self._unseen(function_text(legacy))

    def _calls(self, calls: Iterable[Any]) -> None:
        if self.tool_calls is None:
            self.tool_calls = []
        self.tool_calls.extend(calls)

    def _other(self, delta: Any) -> None:
        if self.others is None:
            self.others = []
        self.others.append(delta)

    def _unseen(self, text: str) -> None:
        if self.unseen is None:
            self.unseen = []
        self.unseen.append(text)


class Stream:
    """A generation's shared state; see the module docstring for its invariants."""

    __slots__ = (
        "_wake",
        "accepted",
        "announced",
        "attempt_started_at",
        "backing_off",
        "body",
        "cache_status",
        "cancel_reason",
        "cost_usd",
        "created_at",
        "ended",
        "ended_at",
        "error",
        "events",
        "fallback_reason",
        "first_chunk_at",
        "first_token_at",
        "id",
        "include_usage",
        "journal_bytes",
        "last_kind",
        "launched_at",
        "model",
        "output_limits",
        "owner",
        "progress",
        "prompt_counts",
        "provider_engaged",
        "readers",
        "served_model",
        "status",
        "streaming",
        "task",
        "ticks",
    )

    def __init__(
        self, stream_id: str, owner: Owner, *, model: str, streaming: bool, include_usage: bool
    ) -> None:
        self.id = stream_id
        self.owner = owner
        self.model = model
        self.served_model = model  # differs when a fallback served (see resilience.py)
        self.fallback_reason: str | None = None  # breaker_open, retries_exhausted, ...
        # Per fallback model: the output ceiling to send it, None when the prompt does not
        # fit its window (admission.py decides, resilience.py applies).
        self.output_limits: Mapping[str, int | None] = NO_LIMITS
        self.backing_off = False  # a retry is waiting out its delay (see resilience.py)
        self.attempt_started_at: float | None = None  # loop time of the provider attempt
        self.provider_engaged = False  # the provider has or had it: billable (resilience.py)
        self.announced = False  # a client has been sent the id: it can come back for it
        self.cache_status = "bypass"  # hit, miss or bypass (see cache.py)
        self.cost_usd: float | None = None  # set once the ledger row is made (admission.py)
        self.streaming = streaming
        self.include_usage = include_usage
        self.body: dict[str, Any] = {}
        # By model (the requested one, its fallbacks): the prompt as admission counted it in
        # each one's tokenizer, so no count of it runs on the loop again.
        self.prompt_counts: Mapping[str, int] = NO_COUNTS
        # The journal: each event's data (``events[i]`` is event ``i + 1``). Every event is a
        # chunk but an ended stream's last one, of kind ``last_kind`` (no tuple an event: a
        # held or retained journal is smaller, and the collector has less to visit).
        self.events: list[bytes] = []
        self.last_kind = Kind.CHUNK
        self.journal_bytes = 0  # the chunks' bytes, and what keeping each costs besides
        self.status = StreamStatus.RUNNING
        self.error: SluiceError | None = None
        self.cancel_reason: StreamStatus | None = None
        self.progress = Progress()
        self.readers = 0
        self.task: asyncio.Task[None] | None = None
        self.accepted = Latch()  # the provider answered 2xx, or the stream ended
        self.ended = Latch()
        self._wake = Pulse()
        self.ticks = 0
        self.created_at = time.time()
        self.launched_at = 0.0  # the registry's clock, when its generation started
        self.first_chunk_at: float | None = None  # any chunk (telemetry's first chunk)
        self.first_token_at: float | None = None  # the first with output (the ledger's TTFT)
        self.ended_at: float | None = None

    @property
    def running(self) -> bool:
        return self.status is StreamStatus.RUNNING

    @property
    def cache_hit(self) -> bool:
        """Served from the response cache: no provider call, no provider cost."""
        return self.cache_status == "hit"

    @property
    def failed_before_output(self) -> bool:
        """Ended with an error and journaled nothing else: the client may get a plain error."""
        chunks = len(self.events) - (self.last_kind != Kind.CHUNK)
        return self.error is not None and chunks == 0

    @property
    def last_seq(self) -> int:
        return len(self.events)

    def kind_of(self, seq: int) -> int:
        """The kind of event ``seq``."""
        return self.last_kind if seq == len(self.events) else Kind.CHUNK

    def chunk_payloads(self) -> list[bytes]:
        """The chunks journaled: every event but a final ``[DONE]`` or error."""
        return self.events[:-1] if self.last_kind != Kind.CHUNK else self.events[:]

    def append(self, chunk: bytes) -> None:
        """Add one chunk event (folded into ``progress`` first); readers see it after the
        next ``notify``."""
        if self.first_token_at is None:
            self._first()
        self.events.append(chunk)
        self.journal_bytes += len(chunk) + EVENT_OVERHEAD

    def extend(self, chunks: list[bytes]) -> None:
        """Add chunk events (a read's worth at once); readers see them after ``notify``."""
        if chunks:
            if self.first_token_at is None:
                self._first()
            self.events += chunks
            self.journal_bytes += sum(map(len, chunks)) + EVENT_OVERHEAD * len(chunks)

    def _first(self) -> None:
        """Note when the first chunk came, and the first with output (an opening role
        chunk has no token in it; ``progress`` has the chunks being added folded in)."""
        now = time.time()
        if self.first_chunk_at is None:
            self.first_chunk_at = now
        if self.progress.generating():
            self.first_token_at = now

    def _close(self, kind: int, data: bytes) -> None:
        """Add the final event, ``[DONE]`` or an error."""
        self.events.append(data)
        self.last_kind = kind
        self.journal_bytes += len(data) + EVENT_OVERHEAD

    def notify(self) -> None:
        """Wake every reader (after a batch of appends, or for a keepalive tick)."""
        self._wake.fire()

    def tick(self) -> None:
        """Wake idle readers so they can send a keepalive."""
        self.ticks += 1
        self.notify()

    def end(self, status: StreamStatus, error: SluiceError | None = None) -> None:
        """Close the journal with its final event; idempotent."""
        if not self.running:
            return
        self.status = status
        if error is not None:
            # Kept as long as the stream is (for replay): not the frames it was raised
            # through, which hold the request (its key), the provider's response, the reads.
            error.__traceback__ = error.__context__ = error.__cause__ = None
        self.error = error
        if error is not None and status is not StreamStatus.SHUTDOWN:
            self._close(Kind.ERROR, dumps_kept(error.payload()))
        elif status is StreamStatus.COMPLETED and self.streaming:
            self._close(Kind.DONE, DONE)
        self.ended_at = time.time()
        self.accepted.set()
        self.ended.set()
        self.notify()

    def has_events_after(self, after: int) -> bool:
        """``follow(after)`` has a batch ready (events are there, not yet awaited)."""
        return max(0, after) < len(self.events)

    async def follow(self, after: int) -> AsyncIterator[tuple[int, list[bytes]]]:
        """Yield the events' data after ``after`` in batches, each with the sequence number
        of its first event (``kind_of`` tells a final one); an empty batch is a tick."""
        position = max(0, after)
        while True:
            if position < len(self.events):
                batch = self.events[position:]
                yield position + 1, batch
                position += len(batch)
                continue
            if not self.running:
                return
            ticks = self.ticks
            await self._wake.wait()
            if self.ticks != ticks and position == len(self.events) and self.running:
                yield position + 1, []


def check_resume_point(last_seq: int | None, after: int, *, param: str = "last_event_id") -> int:
    """``after`` (a Last-Event-ID, or a socket's ``last_seq``: ``param`` names which), unless
    it names an event past ``last_seq``, the stream's last event (None: not known yet, as for
    a stream still running elsewhere)."""
    if last_seq is not None and after > last_seq:
        raise InvalidRequestError(
            f"Event {after} is past the stream's last event ({last_seq}).", param=param
        )
    return after


def function_text(function: Any) -> str:
    """A function call's (or a fragment's) name and arguments, the tokens it generated."""
    if not isinstance(function, dict):
        return ""
    return str(function.get("name") or "") + str(function.get("arguments") or "")


def _text(value: Any) -> str | None:
    """A provider's name or id, if it is one (anything else is not kept)."""
    return value if type(value) is str else None


def _generated(value: Any) -> str | None:
    """Generated text, which must be a string if it is there at all."""
    if value and type(value) is not str:
        raise ProviderProtocolError("The provider sent text that is not a string.")
    return value or None


def _object(value: Any) -> dict[str, Any]:
    if type(value) is not dict:
        raise ProviderProtocolError("The provider sent a choice of the wrong shape.")
    return value
