"""The live and recently ended streams of this process, and the tasks that generate them.

The registry owns every generation task, so a generation outlives the request that started
it: when the last reader of a stream whose id a client has been sent detaches, a grace
timer starts; if nobody re-attaches before it fires (or at once, when no client has the
id), the task is cancelled and the provider connection closed. When a task ends, for any
reason, its checkpoint is written and the finish hooks run (the settlement, the ledger row),
never in a request handler that a disconnect could cancel.

Ended streams are retired in batches: those that end within ``RETIRE_BATCH_S`` of each other
are checkpointed and settled back to back, in one task, after their readers have written
their last bytes. The same bookkeeping run for each stream between two others' chunks
costs ~10% more CPU a stream (``make bench``): it is a long path, and it runs cold. Whatever
would see the wait settles at once instead (``retire_now``): ``settled``, a refusal (or a
budget warning, or a cheaper model for budget pressure) that a settlement might lift
(``admission.py``), a cache miss (an ended stream may hold the answer: ``serving.py``),
``/v1/usage``, and the drain on shutdown. With state shared through Redis, streams are
retired as they end (``batch_s`` 0): other replicas, to which a stream's slot, holds,
checkpoint and journal end matter as much, cannot ask this one to hurry.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from .checkpoint import (
    Checkpoint,
    CheckpointStore,
    PromptCounter,
    TokenCounter,
    approx_prompt_tokens,
    approx_text_tokens,
    checkpoint_of,
)
from .errors import (
    InternalError,
    ProviderTimeoutError,
    SluiceError,
    StreamEndedError,
    translate,
)
from .settings import StreamSettings
from .stream import Stream, StreamStatus

log = logging.getLogger(__name__)
RECANCEL_S = 0.5  # how soon a cancel that did not stop the stream is repeated

FinishHook = Callable[[Stream, Checkpoint], Awaitable[None]]

RETIRE_BATCH_S = 0.02  # how long an ended stream may wait for others to be retired with
MAX_RETAINED = 10_000  # ended streams kept in memory for replay, oldest dropped first
MAX_RETAINED_BYTES = 256 * 1024 * 1024  # and at most this much of their journals
RETAINED_STREAM_BYTES = 8 * 1024  # what one costs besides its journal: checkpoint, progress...

_ENDED_ERRORS = {
    StreamStatus.CANCELLED: ("The stream was cancelled.", "stream_cancelled"),
    StreamStatus.CLIENT_GONE: ("The client went away and did not come back.", "client_gone"),
    StreamStatus.SHUTDOWN: ("The gateway is shutting down; resume this stream.", "shutdown"),
}


class StreamRegistry:
    """Starts, tracks, cancels and retires streams; see the module docstring."""

    def __init__(
        self,
        settings: StreamSettings,
        store: CheckpointStore,
        *,
        count_text: TokenCounter = approx_text_tokens,
        count_prompt: PromptCounter = approx_prompt_tokens,
        clock: Callable[[], float] = time.monotonic,
        batch_s: float | None = None,
    ) -> None:
        self._settings = settings
        # How long an ended stream may wait to be retired with others; 0: at once.
        self.batch_s = RETIRE_BATCH_S if batch_s is None else batch_s
        self.store = store
        self.count_text = count_text
        self.count_prompt = count_prompt
        # The provider's credentials out of a checkpoint's joined text (``credentials.py``).
        self.scrub_text: Callable[[str], str] | None = None
        self.finish_hooks: list[FinishHook] = []
        self.launch_hooks: list[Callable[[Stream], None]] = []  # e.g. the Redis journal mirror
        # Told (stream, event) of "client_disconnected" and "grace_expired" (telemetry).
        self.observers: list[Callable[[Stream, str], None]] = []
        self._live: dict[str, Stream] = {}
        # Ended streams, oldest first, for replay until their checkpoint's TTL (or the bounds
        # above) runs out; the checkpoint rides along so a replay and GET agree.
        self._ended: OrderedDict[str, _Retained] = OrderedDict()
        self._retained_bytes = 0
        self._grace: dict[str, asyncio.TimerHandle] = {}
        self._cancel_due: set[str] = set()  # cancels decided, going out at the next pass
        self._clock = clock
        self._ending: list[Stream] = []  # ended, to be retired with the next batch
        self._batch_timer: asyncio.TimerHandle | None = None
        self._retiring: set[asyncio.Task[None]] = set()  # batches being retired
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The loop the streams run on, looked up once (``asyncio.get_running_loop`` is a
        system call, the process id, each time on Python 3.11; a request needs it twice)."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        return loop

    def live(self) -> list[Stream]:
        """The streams still generating (not those ended and waiting to be retired)."""
        return [stream for stream in self._live.values() if stream.running]

    def get(self, stream_id: str) -> Stream | None:
        """A live stream, or an ended one still held for replay."""
        stream = self._live.get(stream_id)
        if stream is not None:
            return stream
        entry = self._ended.get(stream_id)
        return entry.stream if entry is not None and entry.expires_at > self._clock() else None

    def launch(self, stream: Stream, work: Awaitable[None]) -> None:
        """Run ``work`` as the stream's generation task, owned by the registry."""
        self._live[stream.id] = stream
        stream.launched_at = self._clock()
        stream.task = self.loop.create_task(self._run(stream, work), name=f"stream-{stream.id}")
        for hook in self.launch_hooks:
            hook(stream)

    def attach(self, stream: Stream) -> None:
        stream.readers += 1
        timer = self._grace.pop(stream.id, None)
        if timer is not None:
            timer.cancel()
        if stream.id in self._cancel_due and stream.cancel_reason is StreamStatus.CLIENT_GONE:
            stream.cancel_reason = None  # back before the window's cancel went out: theirs

    def detach(self, stream: Stream) -> None:
        stream.readers -= 1
        if stream.readers > 0 or not stream.running:
            return
        for observe in self.observers:
            observe(stream, "client_disconnected")
        # A client that was never sent the stream's id (a non-streamed answer names it only
        # in the finished response; a stream's headers may not have gone out yet) cannot
        # come back for it: no grace, stop paying at once.
        grace = self._settings.disconnect_grace_s if stream.announced else 0.0
        if grace <= 0:
            self.cancel(stream, StreamStatus.CLIENT_GONE)
            return
        loop = asyncio.get_running_loop()
        self._grace[stream.id] = loop.call_later(grace, self._grace_expired, stream)

    def grace_left(self, user: str) -> float | None:
        """Seconds until the first of ``user``'s streams in a grace window (no reader) ends,
        freeing its stream slot; None when the user has none."""
        loop = asyncio.get_running_loop()
        ends = [
            timer.when()
            for stream_id, timer in self._grace.items()
            if (stream := self._live.get(stream_id)) is not None and stream.owner.user_id == user
        ]
        return max(min(ends) - loop.time(), 0.0) if ends else None

    def reading(self, stream: Stream) -> Reading:
        """Count the caller as a reader of ``stream`` for the duration of the block."""
        return Reading(self, stream)

    def _grace_expired(self, stream: Stream) -> None:
        self._grace.pop(stream.id, None)
        if stream.readers == 0:
            for observe in self.observers:
                observe(stream, "grace_expired")
            self.cancel(stream, StreamStatus.CLIENT_GONE)

    def cancel(self, stream: Stream, reason: StreamStatus = StreamStatus.CANCELLED) -> bool:
        """Stop a running stream now; False when it had already ended."""
        if not stream.running or stream.task is None:
            return False
        pending = stream.cancel_reason
        if pending is not None:
            if pending is StreamStatus.CLIENT_GONE and reason is not StreamStatus.CLIENT_GONE:
                # The grace window's end is on its way, and may yet be taken back by a
                # returning reader; a cancel the client asked for must go out regardless.
                stream.cancel_reason = reason
                return True
            return False
        stream.cancel_reason = reason
        # Not task.cancel() now: a task cancelled before its first step never enters _run,
        # so the stream would never end or be checkpointed. That step is already queued, so
        # by this callback the task is inside _run (or has ended, and is left alone).
        self._cancel_due.add(stream.id)
        asyncio.get_running_loop().call_soon(self._cancel_unless_back, stream)
        return True

    def _cancel_unless_back(self, stream: Stream) -> None:
        """Send the cancellation, unless the client came back after the grace window ended
        but before its cancellation went out (in the same loop pass, ``attach`` took it
        back): then the stream is theirs again, and their next detach opens a new window."""
        self._cancel_due.discard(stream.id)
        if stream.cancel_reason is not None:
            _cancel_running(stream)

    async def settled(self, stream: Stream) -> Checkpoint:
        """Wait until ``stream`` has ended, been checkpointed and run its finish hooks;
        return its checkpoint as stored (kept with the stream, or in the store once the
        stream is no longer held: its prompt is gone by then, and is not counted again)."""
        if stream.task is not None:
            await asyncio.wait({stream.task})  # not ``await task``: our cancellation isn't its
        if self._live.get(stream.id) is stream:  # ended, and not yet retired
            await self.retire_now()
        retained = self._ended.get(stream.id)
        if retained is not None:
            return retained.checkpoint
        return await self.store.get(stream.id) or self.snapshot(stream)

    async def _run(self, stream: Stream, work: Awaitable[None]) -> None:
        try:
            await work
        except asyncio.CancelledError:
            reason = stream.cancel_reason or StreamStatus.CANCELLED
            if reason is StreamStatus.TIMEOUT:  # ``tick``: it ran past the generation limit
                # The gateway stopped it, so it ends (and is billed) as cancelled.
                stream.end(StreamStatus.CANCELLED, _too_long(self._settings.max_generation_s))
            else:
                stream.end(*_ended(reason))
        except SluiceError as exc:
            if isinstance(exc, InternalError):  # say what it was: ``end`` drops the traceback
                log.error("stream %s failed unexpectedly", stream.id, exc_info=exc)
            timed_out = isinstance(exc, ProviderTimeoutError)
            stream.end(StreamStatus.TIMEOUT if timed_out else StreamStatus.PROVIDER_ERROR, exc)
        except Exception as exc:
            log.exception("stream %s failed unexpectedly", stream.id)
            stream.end(StreamStatus.PROVIDER_ERROR, translate(exc))
        else:
            stream.end(StreamStatus.COMPLETED)
        timer = self._grace.pop(stream.id, None)  # ended: nothing left to cancel
        if timer is not None:
            timer.cancel()
        if self.batch_s <= 0:
            await asyncio.sleep(0)  # its readers write their last bytes first
            await self._retire(stream)
            return
        self._ending.append(stream)
        if self._batch_timer is None:
            self._batch_timer = self.loop.call_later(self.batch_s, self._retire_batch)

    async def retire_now(self) -> bool:
        """Retire every ended stream now, and wait for batches already being retired;
        False when there were none (nothing was waiting to be settled)."""
        if self._ending:
            self._retire_batch()
        # (Not a batch's own: a finish hook that asked would wait for itself.)
        batches = self._retiring - {asyncio.current_task()}
        if not batches:
            return False
        # Not awaited directly: a caller's cancellation must not stop a settlement midway.
        await asyncio.wait(batches)
        return True

    def _retire_batch(self) -> None:
        if self._batch_timer is not None:
            self._batch_timer.cancel()
            self._batch_timer = None
        # In a context of its own: not that of whichever request's timer or wait started
        # it (finish hooks may read a request's context variables: telemetry's).
        context = contextvars.Context()
        task = self.loop.create_task(self._retire_all(), name="retire-streams", context=context)
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _retire_all(self) -> None:
        """Retire every ended stream, whatever happens to one (or to this task: a
        cancellation is raised once all are settled, never leaving some unbilled). They
        are taken at its first step: a task cancelled before it leaves them to the next."""
        batch, self._ending = self._ending, []
        cancelled: asyncio.CancelledError | None = None
        for stream in batch:
            try:
                await self._retire(stream)
            except asyncio.CancelledError as exc:
                cancelled = exc
            except Exception:
                log.exception("stream %s could not be retired", stream.id)
        if cancelled is not None:
            raise cancelled

    async def _retire(self, stream: Stream) -> None:
        try:
            checkpoint = self._checkpoint_of(stream)
        except Exception:  # a bug must not skip the settlement, the slot and the ledger row
            log.exception("stream %s: its tokens could not be counted", stream.id)
            checkpoint = self._checkpoint_of(stream, counted=False)
        try:
            await self.store.put(checkpoint, self._settings.checkpoint_ttl_s)
        except Exception:
            log.exception("checkpoint of stream %s was not stored", stream.id)
        for hook in self.finish_hooks:
            try:
                await hook(stream, checkpoint)
            except Exception:
                log.exception("finish hook %r failed for stream %s", hook, stream.id)
        self._live.pop(stream.id, None)
        stream.body = {}  # the prompt (up to the body limit) is not the replay's to keep
        # Nor is its finished task, whose context holds the request's telemetry: its spans
        # and, with content capture, the prompt again.
        stream.task = None
        expires_at = self._clock() + self._settings.checkpoint_ttl_s
        size = stream.journal_bytes + RETAINED_STREAM_BYTES
        self._ended[stream.id] = _Retained(expires_at, stream, checkpoint, size)
        self._retained_bytes += size
        while len(self._ended) > MAX_RETAINED or self._retained_bytes > MAX_RETAINED_BYTES:
            self._forget_oldest()

    def _forget_oldest(self) -> None:
        self._retained_bytes -= self._ended.popitem(last=False)[1].size

    def snapshot(self, stream: Stream) -> Checkpoint:
        """The checkpoint a stream would have if it ended now (its own once it has ended)."""
        retained = self._ended.get(stream.id)
        if retained is not None:
            return retained.checkpoint
        return self._checkpoint_of(stream)

    def _checkpoint_of(self, stream: Stream, *, counted: bool = True) -> Checkpoint:
        return checkpoint_of(
            stream, self.count_text, self.count_prompt, counted=counted, scrub=self.scrub_text
        )

    def tick(self) -> None:
        """Wake idle readers for keepalives, stop generations that have run past the limit
        (``SLUICE_MAX_GENERATION_S``, checked on this tick rather than a timer a stream: a
        held stream costs less), and forget expired ended streams."""
        now = self._clock()
        started_by = now - self._settings.max_generation_s
        for stream in self._live.values():
            stream.tick()
            if stream.launched_at < started_by:
                self.cancel(stream, StreamStatus.TIMEOUT)
        while self._ended and next(iter(self._ended.values())).expires_at <= now:
            self._forget_oldest()

    async def drain(self, window_s: float) -> None:
        """Let running streams finish for ``window_s``, end the rest as SHUTDOWN, and retire
        them all."""
        tasks = [s.task for s in self._live.values() if s.task is not None]
        if tasks and window_s > 0:
            await asyncio.wait(tasks, timeout=window_s)
        for stream in list(self._live.values()):
            self.cancel(stream, StreamStatus.SHUTDOWN)
        remaining = [s.task for s in self._live.values() if s.task is not None]
        if remaining:
            await asyncio.gather(*remaining, return_exceptions=True)
        await self.retire_now()


class Reading:
    """``StreamRegistry.reading``'s block (a class, not a generator: a held stream's frame
    keeps it for as long as it is read, and a generator's frame is ten times the size)."""

    __slots__ = ("_registry", "_stream")

    def __init__(self, registry: StreamRegistry, stream: Stream) -> None:
        self._registry = registry
        self._stream = stream

    def __enter__(self) -> Stream:
        self._registry.attach(self._stream)
        return self._stream

    def __exit__(self, *exc_info: object) -> None:
        self._registry.detach(self._stream)


def _cancel_running(stream: Stream) -> None:
    if stream.running and stream.task is not None:
        stream.task.cancel()
        # Again later if it is still running: Python 3.11's ``asyncio.wait_for`` (inside
        # libraries) can drop a cancellation that lands as what it awaits completes.
        asyncio.get_running_loop().call_later(RECANCEL_S, _cancel_again, stream)


def _cancel_again(stream: Stream) -> None:
    """The cancellation the generation missed, unless it was the grace window's and a
    reader has come back since: the stream is theirs again (their detach opens a window)."""
    if stream.cancel_reason is StreamStatus.CLIENT_GONE and stream.readers > 0:
        stream.cancel_reason = None
        return
    _cancel_running(stream)


@dataclass(frozen=True, slots=True)
class _Retained:
    expires_at: float
    stream: Stream
    checkpoint: Checkpoint
    size: int  # journal bytes


def _too_long(limit_s: float) -> ProviderTimeoutError:
    return ProviderTimeoutError(
        f"The generation ran longer than this gateway allows ({limit_s:g} s).",
        code="generation_too_long",
    )


def _ended(status: StreamStatus) -> tuple[StreamStatus, SluiceError]:
    message, code = _ENDED_ERRORS[status]
    return status, StreamEndedError(message, code=code)
