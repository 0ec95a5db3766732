"""The stream registry on its own: grace timers, cancel, retire, retention and drain.

These drive the registry with stand-in generations (coroutines the test controls), so each
rule is checked without a provider; the wire-level behaviour is in test_streams.py.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from service import registry as registry_module
from service.checkpoint import Checkpoint, MemoryCheckpointStore
from service.registry import StreamRegistry
from service.settings import StreamSettings
from service.stream import EVENT_OVERHEAD, Kind, Owner, Stream, StreamStatus
from tests.streamwire import LoopClock

OWNER = Owner("alice", "acme", "key1")


def make_registry(
    *, grace: float = 60.0, ttl: float = 60.0, clock: Any = None
) -> tuple[StreamRegistry, MemoryCheckpointStore]:
    settings = StreamSettings(disconnect_grace_s=grace, checkpoint_ttl_s=ttl)
    if clock is None:
        store = MemoryCheckpointStore()
        return StreamRegistry(settings, store), store
    store = MemoryCheckpointStore(clock=clock)
    return StreamRegistry(settings, store, clock=clock), store


def make_stream(stream_id: str = "strm_1") -> Stream:
    stream = Stream(stream_id, OWNER, model="gpt-4o-mini", streaming=True, include_usage=False)
    stream.body = {"messages": [{"role": "user", "content": "hello there"}]}
    stream.announced = True  # its client has the id: it may come back within the grace
    return stream


async def produce(stream: Stream, words: list[str], release: asyncio.Event | None = None) -> None:
    """A stand-in generation: journal ``words`` as chunks, then wait for ``release``."""
    for word in words:
        chunk = b'{"choices":[{"index":0,"delta":{"content":"%b"}}]}' % word.encode()
        stream.progress.add_chunk({"choices": [{"index": 0, "delta": {"content": word}}]})
        stream.append(chunk)
    stream.notify()
    if release is not None:
        await release.wait()


async def test_the_last_detach_with_no_grace_cancels_at_once() -> None:
    """Grace 0: the stream ends as client_gone as soon as its only reader leaves."""
    registry, store = make_registry(grace=0)
    stream = make_stream()
    registry.launch(stream, produce(stream, ["a", "b"], asyncio.Event()))
    with registry.reading(stream):
        async for _, batch in stream.follow(0):  # the first batch: both words
            assert batch[-1].endswith(b'"b"}}]}')
            break
    await stream.ended.wait()
    await registry.settled(stream)
    checkpoint = await store.get(stream.id)
    assert checkpoint is not None
    assert checkpoint.status is StreamStatus.CLIENT_GONE
    assert checkpoint.text == "ab"
    assert checkpoint.completion_tokens == registry.count_text("gpt-4o-mini", "ab")


async def test_a_reader_coming_back_within_the_grace_window_keeps_the_stream() -> None:
    """Detach starts the timer; attaching again cancels it; a second reader does not start one."""
    registry, _ = make_registry(grace=60)
    stream = make_stream()
    release = asyncio.Event()
    registry.launch(stream, produce(stream, ["a"], release))
    registry.attach(stream)
    registry.attach(stream)
    registry.detach(stream)
    assert stream.id not in registry._grace  # one reader left: no timer
    registry.detach(stream)
    timer = registry._grace[stream.id]
    registry.attach(stream)
    assert timer.cancelled()
    assert stream.id not in registry._grace
    release.set()
    await stream.ended.wait()
    assert stream.status is StreamStatus.COMPLETED


async def test_a_stream_whose_id_no_client_has_gets_no_grace() -> None:
    """Its last reader leaves before the id went out: nobody can come back, so it stops."""
    registry, _ = make_registry(grace=60)
    stream = make_stream()
    stream.announced = False
    registry.launch(stream, produce(stream, ["a"], asyncio.Event()))
    with registry.reading(stream):
        pass
    assert stream.id not in registry._grace
    await stream.ended.wait()
    assert stream.status is StreamStatus.CLIENT_GONE


async def test_a_generation_past_the_limit_is_stopped_on_the_tick() -> None:
    """The tick after SLUICE_MAX_GENERATION_S ends the stream (cancelled, with
    ``generation_too_long``); a tick before it leaves the stream running."""
    now = [1000.0]
    registry, _ = make_registry(clock=lambda: now[0])
    stream = make_stream()
    registry.launch(stream, produce(stream, ["a"], asyncio.Event()))
    limit = StreamSettings().max_generation_s
    now[0] += limit - 1
    registry.tick()
    await asyncio.sleep(0)  # one loop turn: a cancel would be scheduled by now
    assert stream.running
    now[0] += 2
    registry.tick()
    await stream.ended.wait()
    assert stream.status is StreamStatus.CANCELLED  # the gateway stopped it
    assert stream.error is not None
    assert stream.error.code == "generation_too_long"
    assert stream.error.status == 504


async def test_the_grace_window_expiring_cancels_the_stream() -> None:
    """Nobody back before the window ends: the generation is cancelled as client_gone."""
    registry, _ = make_registry(grace=0.01)
    stream = make_stream()
    registry.launch(stream, produce(stream, ["x"], asyncio.Event()))
    registry.attach(stream)
    registry.detach(stream)
    await stream.ended.wait()
    assert stream.status is StreamStatus.CLIENT_GONE
    assert stream.error is not None
    assert stream.error.code == "client_gone"


async def test_cancel_reports_whether_it_stopped_anything() -> None:
    """cancel is True for a running stream, False once it ended (and never re-cancels)."""
    registry, _ = make_registry()
    stream = make_stream()
    registry.launch(stream, produce(stream, [], asyncio.Event()))
    assert registry.cancel(stream) is True
    assert registry.cancel(stream, StreamStatus.SHUTDOWN) is False
    await stream.ended.wait()
    assert stream.status is StreamStatus.CANCELLED
    assert registry.cancel(stream) is False


async def test_a_cancellation_the_generation_missed_is_sent_again(
    loop_clock: LoopClock,
) -> None:
    """A library swallowed the first cancellation (as Python 3.11's wait_for can): the
    stream is cancelled again until it stops, instead of running on at full cost."""
    registry, _ = make_registry()
    stream = make_stream()
    swallowed = asyncio.Event()

    async def deaf() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            swallowed.set()  # lost: the generation goes on waiting
        await asyncio.Event().wait()

    registry.launch(stream, deaf())
    assert registry.cancel(stream) is True
    await swallowed.wait()
    assert stream.running
    await loop_clock.advance(registry_module.RECANCEL_S)
    await stream.ended.wait()
    assert stream.status is StreamStatus.CANCELLED


async def test_a_failing_finish_hook_neither_loses_the_checkpoint_nor_the_other_hooks(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Hooks run in order after the checkpoint is stored; one raising is logged, not fatal."""
    registry, store = make_registry()
    seen: list[str] = []

    async def broken(stream: Stream, checkpoint: Checkpoint) -> None:
        raise RuntimeError("ledger down")

    async def recorder(stream: Stream, checkpoint: Checkpoint) -> None:
        seen.append(checkpoint.status)

    registry.finish_hooks += [broken, recorder]
    stream = make_stream()
    registry.launch(stream, produce(stream, ["ok"]))
    with caplog.at_level(logging.ERROR, logger="service.registry"):
        await registry.settled(stream)
    assert seen == ["completed"]
    assert await store.get(stream.id) is not None
    assert "finish hook" in caplog.text


async def test_a_cancelled_batch_still_retires_the_rest_of_its_streams(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Streams ended together are retired in one task; cancelled while one stream's hook
    is waiting, it still retires the others (their rows, their slots), then stops."""
    monkeypatch.setattr(registry_module, "RETIRE_BATCH_S", 3600.0)  # one batch, when asked
    registry, store = make_registry()
    stuck = asyncio.Event()

    async def hook(stream: Stream, checkpoint: Checkpoint) -> None:
        if stream.id == "strm_first":
            stuck.set()
            await asyncio.Event().wait()  # a hook that never returns

    registry.finish_hooks.append(hook)
    first, second = make_stream("strm_first"), make_stream("strm_second")
    for stream in (first, second):
        registry.launch(stream, produce(stream, ["ok"]))
    await asyncio.gather(*(s.ended.wait() for s in (first, second)))
    settling = asyncio.ensure_future(registry.retire_now())
    await stuck.wait()
    (batch,) = registry._retiring
    batch.cancel()
    await asyncio.wait({batch})
    assert batch.cancelled()
    assert await store.get(second.id) is not None
    assert second.id in registry._ended  # retained for replay: retired
    await settling


async def test_a_finish_hook_that_asks_for_the_ended_streams_to_be_settled_does_not_wait_for_itself(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A hook runs inside its batch: settling the ended streams from there (a cache lookup
    would) must not wait for that batch to end, which waits for the hook."""
    monkeypatch.setattr(registry_module, "RETIRE_BATCH_S", 3600.0)  # one batch, when asked
    registry, store = make_registry()
    asked: list[bool] = []

    async def hook(stream: Stream, checkpoint: Checkpoint) -> None:
        asked.append(await registry.retire_now())

    registry.finish_hooks.append(hook)
    stream = make_stream()
    registry.launch(stream, produce(stream, ["ok"]))
    await asyncio.wait_for(registry.settled(stream), 10)  # not forever
    assert asked == [False]
    assert await store.get(stream.id) is not None


async def test_a_batch_cancelled_before_it_began_leaves_its_streams_to_the_next(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A batch's task cancelled before its first step (the loop's cancel-all at exit)
    has taken no stream: the next settlement retires them all."""
    monkeypatch.setattr(registry_module, "RETIRE_BATCH_S", 3600.0)  # one batch, when asked
    registry, store = make_registry()
    streams = [make_stream(f"strm_{n}") for n in range(2)]
    for stream in streams:
        registry.launch(stream, produce(stream, ["ok"]))
    await asyncio.gather(*(s.ended.wait() for s in streams))
    registry._retire_batch()
    (batch,) = registry._retiring
    batch.cancel()
    await asyncio.wait({batch})
    await registry.retire_now()
    for stream in streams:
        assert await store.get(stream.id) is not None
        assert stream.id in registry._ended


async def test_an_unexpected_exception_ends_the_stream_as_a_provider_error() -> None:
    """A bug in the generation becomes a provider_error checkpoint, not a lost stream."""
    registry, store = make_registry()
    stream = make_stream()

    async def broken() -> None:
        raise KeyError("surprise")

    registry.launch(stream, broken())
    await registry.settled(stream)
    checkpoint = await store.get(stream.id)
    assert checkpoint is not None
    assert checkpoint.status is StreamStatus.PROVIDER_ERROR
    assert checkpoint.error is not None
    assert "surprise" not in checkpoint.error["message"]


async def test_ended_streams_are_replayable_until_their_ttl() -> None:
    """An ended stream stays gettable (with its stored checkpoint, not its task) until the
    TTL, then goes."""
    now = [0.0]
    registry, store = make_registry(ttl=10, clock=lambda: now[0])
    stream = make_stream()
    registry.launch(stream, produce(stream, ["a"]))
    await registry.settled(stream)
    assert registry.get(stream.id) is stream
    assert registry.snapshot(stream) == await store.get(stream.id)
    # Kept without its task, whose context holds the request's telemetry (its spans, and
    # with content capture the prompt: ~50 KB a stream, for an hour).
    assert stream.task is None
    now[0] = 9.9
    registry.tick()
    assert registry.get(stream.id) is stream
    now[0] = 10.0
    assert registry.get(stream.id) is None
    registry.tick()
    assert stream.id not in registry._ended
    assert registry._retained_bytes == 0


async def test_retention_is_bounded_by_journal_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past the byte budget the oldest ended journals are dropped first; an event counts
    its bytes and what keeping it costs besides, and a stream what keeping it costs."""
    registry, store = make_registry()
    streams = [make_stream(f"strm_{i}") for i in range(3)]
    chunk = b'{"choices":[{"index":0,"delta":{"content":"abcd"}}]}'
    size = len(chunk) + len(b"[DONE]") + 2 * EVENT_OVERHEAD
    size += registry_module.RETAINED_STREAM_BYTES
    monkeypatch.setattr(registry_module, "MAX_RETAINED_BYTES", 2 * size)
    for stream in streams:
        registry.launch(stream, produce(stream, ["abcd"]))
        await registry.settled(stream)
    assert [registry.get(s.id) for s in streams] == [None, streams[1], streams[2]]
    assert registry._retained_bytes == 2 * size
    assert await store.get(streams[0].id) is not None  # the checkpoint outlives the journal


async def test_drain_lets_streams_finish_then_ends_the_rest_as_shutdown() -> None:
    """Streams that finish within the window complete; the others end as shutdown, with
    their journal left open (no final event) and a checkpoint each."""
    registry, store = make_registry()
    quick, stuck = make_stream("strm_quick"), make_stream("strm_stuck")
    release = asyncio.Event()
    registry.launch(quick, produce(quick, ["q"], release))
    registry.launch(stuck, produce(stuck, ["s"], asyncio.Event()))
    release.set()
    await registry.drain(window_s=0.05)
    assert quick.status is StreamStatus.COMPLETED
    assert stuck.status is StreamStatus.SHUTDOWN
    assert [stuck.kind_of(seq) for seq in (1, 2)] == [Kind.CHUNK, Kind.CHUNK]
    assert stuck.last_seq == 1
    for stream in (quick, stuck):
        checkpoint = await store.get(stream.id)
        assert checkpoint is not None
        assert checkpoint.status is stream.status
    assert list(registry.live()) == []


async def test_settled_waits_for_the_checkpoint_and_the_finish_hooks() -> None:
    """``settled`` (what the cancel endpoint awaits) returns only after every hook ran, and
    cancelling the waiter does not cancel the stream's retirement."""
    registry, store = make_registry()
    release, hook_running = asyncio.Event(), asyncio.Event()
    done: list[str] = []

    async def slow_hook(stream: Stream, checkpoint: Checkpoint) -> None:
        hook_running.set()
        await release.wait()
        done.append(checkpoint.status)

    registry.finish_hooks.append(slow_hook)
    stream = make_stream()
    registry.launch(stream, produce(stream, ["a"]))
    impatient = asyncio.ensure_future(registry.settled(stream))
    patient = asyncio.ensure_future(registry.settled(stream))
    await hook_running.wait()
    assert stream.ended.is_set()
    assert not patient.done()
    impatient.cancel()
    release.set()
    await patient
    assert done == ["completed"]
    assert await store.get(stream.id) is not None


async def test_a_reader_back_as_the_grace_window_ends_keeps_the_stream(
    loop_clock: LoopClock,
) -> None:
    """The window expires and the client reconnects in the same loop pass, before the
    cancellation goes out: the reader is attached, so the generation goes on."""
    registry, _ = make_registry(grace=60)
    stream = make_stream()
    release = asyncio.Event()
    registry.launch(stream, produce(stream, ["a"], release))
    registry.attach(stream)
    registry.detach(stream)  # the grace window opens: 60 s
    asyncio.get_running_loop().call_later(60.5, registry.attach, stream)
    await loop_clock.advance(61)  # the window's timer, then the reader, in one pass
    release.set()
    await stream.ended.wait()
    assert (stream.status, stream.readers) == (StreamStatus.COMPLETED, 1)
    registry.detach(stream)


async def test_a_reader_back_and_gone_again_as_the_window_ends_gets_a_new_window(
    loop_clock: LoopClock,
) -> None:
    """The window expires, and in the same pass a reader comes back and leaves again (a
    resume whose connection was already closing): its leaving opens a new window, which
    the first window's cancellation, still on its way, must not pre-empt."""
    registry, _ = make_registry(grace=60)
    stream = make_stream()
    release = asyncio.Event()
    registry.launch(stream, produce(stream, ["a"], release))
    registry.attach(stream)
    registry.detach(stream)
    back_and_gone = lambda: (registry.attach(stream), registry.detach(stream))  # noqa: E731
    asyncio.get_running_loop().call_later(60.5, back_and_gone)
    await loop_clock.advance(61)
    assert stream.running  # the new window runs until 60.5 + 60
    await loop_clock.advance(59)
    assert stream.running
    await loop_clock.advance(1)
    await stream.ended.wait()
    assert stream.status is StreamStatus.CLIENT_GONE


async def test_a_reader_back_after_a_missed_cancel_keeps_the_stream(
    loop_clock: LoopClock,
) -> None:
    """The grace window's cancellation was swallowed by the generation (Python 3.11's
    wait_for); before it is sent again the client comes back: the stream is theirs again,
    not cancelled under a reader."""
    registry, _ = make_registry(grace=60)
    stream = make_stream()
    swallowed, release = asyncio.Event(), asyncio.Event()

    async def deaf_once() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            swallowed.set()  # lost: the generation goes on
        await release.wait()

    registry.launch(stream, deaf_once())
    registry.attach(stream)
    registry.detach(stream)
    await loop_clock.advance(61)
    await swallowed.wait()
    with registry.reading(stream):
        await loop_clock.advance(registry_module.RECANCEL_S)
        assert stream.running
        release.set()
        await stream.ended.wait()
    assert stream.status is StreamStatus.COMPLETED


async def test_settled_answers_the_stored_checkpoint_once_the_stream_is_not_held(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A stream let go of (retention is bounded) by the time its canceller looks: the
    checkpoint answered is the stored one, not a recount (its prompt is no longer kept)."""
    monkeypatch.setattr(registry_module, "MAX_RETAINED", 1)
    registry, store = make_registry()
    first, second = make_stream("strm_1"), make_stream("strm_2")
    first.body = {"messages": [{"role": "user", "content": "word " * 1000}]}
    registry.launch(first, produce(first, ["a"]))
    registry.launch(second, produce(second, ["b"]))
    for stream in (first, second):
        await registry.settled(stream)
    assert registry.get(first.id) is None  # pushed out by the second
    checkpoint = await registry.settled(first)
    assert checkpoint == await store.get(first.id)
    assert checkpoint.prompt_tokens > 1000


async def test_a_cancel_asked_for_outranks_a_grace_window_ending_in_the_same_pass() -> None:
    """The grace window's end sends its client-gone cancel, the client's own cancel comes
    in, and a reader attaches, all in one loop pass: the reader takes the client-gone one
    back, but the cancel asked for goes out, and the stream ends as cancelled."""
    registry, _ = make_registry(grace=60)
    stream = make_stream()
    registry.launch(stream, produce(stream, ["a"], asyncio.Event()))
    assert registry.cancel(stream, StreamStatus.CLIENT_GONE)  # the window ended
    assert registry.cancel(stream)  # POST /cancel, in the same pass
    with registry.reading(stream):  # and a reader came back
        await stream.ended.wait()
    assert stream.status is StreamStatus.CANCELLED


async def test_a_count_that_fails_still_runs_every_finish_hook(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Counting a stream's tokens raised (a bug, or a provider's oddity no check foresaw):
    the finish hooks (settlement, the slot, the ledger row) run all the same, and the
    failure is logged; the stream is retired, not kept for good."""
    registry, store = make_registry()

    def broken(model: str, text: str) -> int:
        raise TypeError("unforeseen")

    registry.count_text = broken
    finished: list[Checkpoint] = []

    async def hook(stream: Stream, checkpoint: Checkpoint) -> None:
        finished.append(checkpoint)

    registry.finish_hooks.append(hook)
    stream = make_stream()
    registry.launch(stream, produce(stream, ["a", "b"]))
    await registry.settled(stream)
    (checkpoint,) = finished
    assert (checkpoint.status, checkpoint.completion_tokens) == (StreamStatus.COMPLETED, 0)
    assert await store.get(stream.id) == checkpoint
    assert registry.get(stream.id) is stream  # retired: held for replay
    assert "its tokens could not be counted" in caplog.text


async def test_a_retired_stream_keeps_its_events_not_its_prompt() -> None:
    """Ended streams are held for replay (up to 10,000, bounded by their events' bytes):
    the request's prompt, up to the body limit each and not in that bound, is let go."""
    registry, _ = make_registry()
    stream = make_stream()
    stream.body = {"messages": [{"role": "user", "content": "x" * 600_000}]}
    registry.launch(stream, produce(stream, ["a"]))
    await registry.settled(stream)
    retained = registry.get(stream.id)
    assert retained is stream
    assert retained.body == {}
    assert [retained.kind_of(seq) for seq in (1, 2)] == [Kind.CHUNK, Kind.DONE]
    assert retained.chunk_payloads() == retained.events[:1]
