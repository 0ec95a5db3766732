"""Stream journals mirrored to Redis Streams, so any replica can resume or cancel a stream.

Producer side (the replica that owns the generation): ``JournalMirror`` registers every
launched SSE stream's owner at once (in parallel with the provider call; the handler waits
for it, bounded by the gate's deadline, before the client learns the stream id, so a
cancel or resume sent straight to another replica finds it), then follows the stream like
a reader and appends what arrived (at most one round trip per ``MIRROR_INTERVAL_S``) to
the Redis Stream
``sluice:journal:<id>``, entry id ``0-<seq>`` (so ids are the SSE sequence numbers),
fields ``k`` (kind) and ``d`` (data). A failed append is retried with everything since
the last mirrored event on the next wakeup (events Redis already has are no failure: the
ids are the events' own); the in-process path never waits on Redis. An append that finds
the stream's record gone (Redis restarted empty or was flushed) writes the journal anew,
from its first event, with the owner.
After the stream is retired (its checkpoint stored), a final marker entry (kind ``END``,
field ``s`` = status) closes the journal; both keys expire with the checkpoint TTL.
``sluice:stream:<id>`` holds the owner (user, tenant) and status; ``sluice:owner:<id>``
is the owner's heartbeat (refreshed on appends and keepalive ticks, expiring after three
missed ticks), so a reader elsewhere notices an owner that crashed without an END.

Reader side (any other replica): ``RemoteStreams.follow`` replays the journal after the
client's Last-Event-ID with XRANGE, then follows it live with XREAD BLOCK (on its own
connection without a socket timeout) until the END marker; ``serve`` writes what it reads
as the same SSE bytes the owner would, and a WebSocket ``resume`` (``handlers/ws.py``)
as the same frames. While it reads, the owner counts it as a reader, so the grace window
does not cancel a stream someone reads elsewhere: ``attach``, ``beat`` (once a keepalive)
and ``detach`` of a reader id go over the pub/sub channel ``sluice:ctl``, and a reader
that stops beating (its detach lost in an outage, its replica killed) is let go after
``HEARTBEAT_TICKS`` keepalives. ``cancel`` travels the same way; the canceller then waits
for the END marker and answers with the checkpoint. The listener pings the channel when it
has been quiet for ``LISTEN_PING_S``, and subscribes again on a new connection when not
even the pong comes (a connection gone half-open carries nothing, and says nothing). A user
holds at most ``READERS_PER_USER`` remote readers on one replica: each holds a connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import orjson
from aiohttp import web
from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError, ResponseError

from .checkpoint import Checkpoint, CheckpointStore
from .errors import RateLimitError, ServiceUnavailableError, SluiceError
from .jsonbytes import dumps_kept
from .redis_checkpoints import checkpoint_key, dump_checkpoint
from .redis_pipe import Command
from .redisgate import KEY_PREFIX, RedisGate, RedisUnavailable
from .registry import StreamRegistry
from .relay import RESUME_ELSEWHERE, SEND_AGAIN, SSE_HEADERS, STREAM_ID_HEADER, stream_headers
from .sse import KEEPALIVE, encode_event
from .stream import Kind, Owner, Stream, StreamStatus

log = logging.getLogger(__name__)

END = 9  # the journal's closing marker; never sent to clients
CONTROL_CHANNEL = f"{KEY_PREFIX}ctl"
READ_COUNT = 512  # journal entries one read asks for, at most
# ... and about this many bytes: each read's count follows the sizes of the last one's
# events (the first asks for one), so a journal of huge events is read in reads that fit
# the gate's deadline rather than one that cannot.
READ_BYTES = 1024 * 1024
LISTEN_RETRY_S = 1.0
LISTEN_POLL_S = 1.0  # the longest the control listener takes to notice it should stop
LISTEN_PING_S = 5.0  # a control channel quiet this long is pinged; twice this: reconnected
CANCEL_WAIT_S = 10.0
CANCEL_ASK_MS = 1000  # a cancel not answered in this long is asked again
CLOSE_RETRY_S = 1.0  # a journal close Redis missed is sent again this often,
CLOSE_RETRY_FOR_S = 300.0  # for this long,
MAX_UNCLOSED = 10_000  # for at most this many streams (the oldest given up first),
CLOSES_A_TRIP = 100  # so many a round trip
MAX_RUNNING_EVENTS = 100_000  # of a journal read for a running stream's checkpoint
# The end of a replay whose replica stopped before the stream finished (no id: the SDKs
# raise APIError; no reconnection hint: nothing more will come of it, here or elsewhere).
STOPPED = b"data: %b\n\n" % dumps_kept(
    ServiceUnavailableError(
        "The replica generating this stream stopped before it finished: what it made is "
        "above (and in GET /v1/streams/{id}); send the request again for the rest.",
        code="stream_interrupted",
    ).payload()
)
# Each remote reader holds a connection of the follower's pool in a blocking read: one
# user's readers are bounded, so one key cannot take the pool from everyone.
READERS_PER_USER = 16
FOLLOWER_CONNECTIONS = 1024
MIRROR_INTERVAL_S = 0.02
HEARTBEAT_TICKS = 3  # the most a remote reader lags behind the owner's journal

UNREADABLE = "unreadable"  # ``follow``: Redis failed mid-read; the stream may go on
Event = tuple[int, int, bytes]  # (seq, kind, data): one journal event with its number


def _already_journaled(error: Exception) -> bool:
    """An XADD of an event id the journal already has: an earlier append got there."""
    return isinstance(error, ResponseError) and "equal or smaller than" in str(error)


def journal_key(stream_id: str) -> str:
    return f"{KEY_PREFIX}journal:{stream_id}"


def meta_key(stream_id: str) -> str:
    return f"{KEY_PREFIX}stream:{stream_id}"


def owner_key(stream_id: str) -> str:
    """Exists while the owning replica is alive and generating (its heartbeat)."""
    return f"{KEY_PREFIX}owner:{stream_id}"


def _entry_seq(entry_id: bytes | str) -> int:
    raw = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return int(raw.partition("-")[2])


class JournalMirror:
    """Copies every local stream's journal to Redis; owned by the shared-state context."""

    def __init__(
        self, gate: RedisGate, registry: StreamRegistry, ttl_s: float, keepalive_s: float
    ) -> None:
        self._gate = gate
        self._registry = registry
        self._ttl_ms = int(ttl_s * 1000)
        # Refreshed on every append and keepalive tick; gone 3 ticks after a crash.
        self._heartbeat_ms = max(1, int(HEARTBEAT_TICKS * keepalive_s * 1000))
        self._tasks: dict[str, asyncio.Task[int]] = {}
        # Closes Redis missed (an outage as the stream ended): stream id -> (give up at,
        # the commands, its checkpoint's SET among them), sent again by one loop.
        self._unclosed: dict[str, tuple[float, list[Command]]] = {}
        self._closing: asyncio.Task[None] | None = None
        self._registered: dict[str, asyncio.Event] = {}  # set once the first attempt ended
        self._stop = asyncio.Event()
        # Readers on other replicas: stream id -> reader id -> when last heard of (loop
        # time). A reader is a lease: one that stops beating (its detach lost in an outage,
        # its replica gone) is let go after ``HEARTBEAT_TICKS`` keepalives.
        self.remote_readers: dict[str, dict[str, float]] = {}
        self._lease_s = HEARTBEAT_TICKS * keepalive_s

    def launched(self, stream: Stream) -> None:
        """Registry launch hook: start mirroring ``stream`` (SSE streams only: a JSON
        answer cannot be resumed, its checkpoint is what another replica serves)."""
        if not stream.streaming:
            return
        registered = self._registered[stream.id] = asyncio.Event()
        self._tasks[stream.id] = asyncio.create_task(
            self._mirror(stream, registered), name=f"mirror-{stream.id}"
        )

    async def registered(self, stream: Stream) -> None:
        """Wait until ``stream``'s owner is in Redis, or registering it failed (bounded by
        the gate's deadline): only then may the client learn the stream id."""
        event = self._registered.get(stream.id)
        if event is not None and not event.is_set():
            await event.wait()

    async def finished(self, stream: Stream, checkpoint: Checkpoint) -> None:
        """Registry finish hook (after the checkpoint is stored): flush, then close the journal."""
        task = self._tasks.pop(stream.id, None)
        if task is None:
            return
        mirrored = await task
        self._registered.pop(stream.id, None)
        self.remote_readers.pop(stream.id, None)
        key, meta, status = journal_key(stream.id), meta_key(stream.id), str(stream.status)
        # The events the mirror could not write go with the end, or the end does not go: a
        # journal closed with a gap before it would read, elsewhere, as a whole stream.
        close: list[Command] = [
            ("XADD", key, f"0-{seq}", "k", stream.kind_of(seq), "d", data)
            for seq, data in enumerate(stream.events[mirrored:], mirrored + 1)
        ]
        close += [
            ("XADD", key, f"0-{stream.last_seq + 1}", "k", END, "s", status),
            ("PEXPIRE", key, self._ttl_ms),
            ("HSET", meta, "status", status),
            ("PEXPIRE", meta, self._ttl_ms),
            ("DEL", owner_key(stream.id)),
        ]
        try:
            await self._gate.pipeline(close, expected=_already_journaled)
        except RedisUnavailable as exc:
            log.warning("journal of %s not closed in redis: %s; retrying", stream.id, exc)
            self._close_later(stream.id, [_checkpoint_set(checkpoint, self._ttl_ms), *close])

    def _close_later(self, stream_id: str, close: list[Command]) -> None:
        """Keep a close Redis missed (with the checkpoint, lost with it) to send again:
        left undone, the stream stays open and running for every other replica until its
        TTL (its readers cut off, its checkpoint missing)."""
        if len(self._unclosed) >= MAX_UNCLOSED:
            dropped = next(iter(self._unclosed))
            del self._unclosed[dropped]
            log.warning("journal of %s never closed in redis: too many wait", dropped)
        self._unclosed[stream_id] = (time.monotonic() + CLOSE_RETRY_FOR_S, close)
        if self._closing is None or self._closing.done():
            self._closing = asyncio.create_task(self._close_again(), name="journal-closes")

    async def _close_again(self) -> None:
        """Each ``CLOSE_RETRY_S``, while the breaker lets calls through, send the waiting
        closes (a batch a round trip) until none waits."""
        while self._unclosed:
            await asyncio.sleep(CLOSE_RETRY_S)
            if self._gate.state == "open":
                continue  # (no call would reach Redis)
            try:
                await self._send_closes()
            except Exception:  # a bug must not stop the others' closes for good
                log.exception("journal closes could not be sent again")

    async def _send_closes(self) -> None:
        now = time.monotonic()
        for stream_id in [i for i, (until, _) in self._unclosed.items() if until <= now]:
            del self._unclosed[stream_id]
            log.warning("journal of %s never closed in redis", stream_id)
        batch = list(itertools.islice(self._unclosed.items(), CLOSES_A_TRIP))
        commands = [command for _, (_, close) in batch for command in close]
        if not commands:
            return
        try:
            await self._gate.pipeline(commands, expected=_already_journaled)
        except RedisUnavailable:
            return
        for stream_id, _ in batch:
            self._unclosed.pop(stream_id, None)
            log.info("journal of %s closed in redis", stream_id)

    async def _mirror(self, stream: Stream, announced: asyncio.Event) -> int:
        """Append the stream's events as they come; return how many are surely in Redis."""
        owner = {
            "user": stream.owner.user_id,
            "tenant": stream.owner.tenant,
            "status": "running",
            # For a checkpoint read elsewhere while it runs (``RemoteStreams.running``):
            "key": stream.owner.key_id,
            "created": repr(stream.created_at),
            "model": stream.model,
            "prompt": str(stream.prompt_counts.get(stream.model, -1)),
        }
        mirrored = 0
        try:
            await self._append(stream, 0, 0, owner)
            registered = True
        except RedisUnavailable:
            registered = False  # the first append that succeeds registers it instead
        finally:
            announced.set()
        async for _ in stream.follow(0):
            self._expire_readers(stream)
            upto = len(stream.events)
            if registered and upto == mirrored:  # a keepalive tick: still alive
                with contextlib.suppress(RedisUnavailable):
                    await self._gate.pipeline([self._heartbeat(stream.id)])
                continue
            meta = None if registered else owner
            try:
                known = await self._append(stream, mirrored, upto, meta)
            except RedisUnavailable:
                continue  # retried with everything since ``mirrored`` on the next wakeup
            # Redis lost the stream's keys (restarted empty, flushed): all again, owner first.
            registered, mirrored = (True, upto) if known else (False, 0)
            if stream.running:
                await asyncio.sleep(MIRROR_INTERVAL_S)  # coalesce: one round trip per interval
        if mirrored < len(stream.events):
            with contextlib.suppress(RedisUnavailable):
                upto = len(stream.events)
                if await self._append(stream, mirrored, upto, owner):
                    mirrored = upto
        return mirrored

    async def _append(
        self, stream: Stream, start: int, stop: int, owner: dict[str, str] | None
    ) -> bool:
        """Events ``start`` to ``stop`` (and the owner, when given) in one round trip; False
        when Redis no longer knew the stream (its owner record was gone).

        Ids are the events' own, so an append is idempotent: one that timed out after Redis
        ran it is sent again, and the events already there are answers, not failures. The
        owner with the journal from its first event writes the journal anew: whatever Redis
        kept of it after losing the rest (an empty restart, a flush) is dropped first."""
        key, meta = journal_key(stream.id), meta_key(stream.id)
        commands: list[Command] = []
        if owner is not None:
            if start == 0:
                commands.append(("DEL", key))
            commands.append(("HSET", meta, *itertools.chain.from_iterable(owner.items())))
        commands += [
            ("XADD", key, f"0-{seq}", "k", stream.kind_of(seq), "d", data)
            for seq, data in enumerate(stream.events[start:stop], start + 1)
        ]
        commands.append(("PEXPIRE", key, self._ttl_ms))
        commands.append(self._heartbeat(stream.id))
        known = len(commands)  # this one's reply: 0 when the owner record is gone
        commands.append(("PEXPIRE", meta, self._ttl_ms))
        # Then what its response headers say, as now known (a fallback is chosen after the
        # start): a resume through another replica sends them too.
        headers = stream_headers(stream)  # the owner's response's, as the owner would send
        commands.append(("HSET", meta, *itertools.chain.from_iterable(headers.items())))
        commands.append(("PEXPIRE", meta, self._ttl_ms))
        replies = await self._gate.pipeline(commands, expected=_already_journaled)
        return bool(replies[known])

    def _heartbeat(self, stream_id: str) -> Command:
        return ("SET", owner_key(stream_id), b"1", "PX", self._heartbeat_ms)

    def control(self, op: str, stream_id: str, reader: str = "") -> None:
        """Apply an ``attach``/``beat``/``detach`` of a reader on another replica, or a
        ``cancel``. A detach only ends a reader this replica counts, once."""
        stream = self._registry.get(stream_id)
        if stream is None or not stream.running:
            return
        if op == "cancel":
            self._registry.cancel(stream)
            return
        readers = self.remote_readers.setdefault(stream_id, {})
        if op in ("attach", "beat"):
            if reader not in readers:
                self._registry.attach(stream)
            readers[reader] = asyncio.get_running_loop().time()
        elif op == "detach" and readers.pop(reader, None) is not None:
            self._registry.detach(stream)

    def _expire_readers(self, stream: Stream) -> None:
        readers = self.remote_readers.get(stream.id)
        if not readers:
            return
        oldest = asyncio.get_running_loop().time() - self._lease_s
        for reader, seen in list(readers.items()):
            if seen < oldest:
                log.info("remote reader of stream %s stopped beating; let go", stream.id)
                del readers[reader]
                self._registry.detach(stream)

    async def listen(self, client: Redis) -> None:
        """Apply control messages until ``stop_listening``; reconnects after a Redis outage.

        It polls instead of blocking in ``PubSub.listen``: redis-py sends through
        ``asyncio.wait_for``, which on Python 3.11 drops a cancellation that lands as the
        send completes (CPython gh-86296, fixed in 3.12), and a listener that missed its
        cancellation would block forever and hang the shutdown. The flag ends it anyway.
        """
        while not self._stop.is_set():
            try:
                async with client.pubsub(ignore_subscribe_messages=True) as pubsub:
                    await pubsub.subscribe(CONTROL_CHANNEL)
                    await self._listen_on(pubsub)
            except (RedisError, OSError) as exc:
                log.debug("control channel lost (%s); reconnecting", type(exc).__name__)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), LISTEN_RETRY_S)

    async def _listen_on(self, pubsub: PubSub) -> None:
        """Apply what comes until told to stop, or until the channel goes silent: not even
        a pong to a ping (the connection is half-open: a failover, a NAT's idle timeout,
        and what is published never comes), when the caller subscribes again."""
        loop = asyncio.get_running_loop()
        heard = loop.time()
        while not self._stop.is_set():
            message = await pubsub.get_message(
                ignore_subscribe_messages=True, timeout=LISTEN_POLL_S
            )
            now = loop.time()
            if message is not None:
                heard = now
                if message["type"] == "message":
                    self._apply(message["data"])
            elif now - heard > 2 * LISTEN_PING_S:
                log.debug("control channel silent; subscribing again")
                return
            elif now - heard > LISTEN_PING_S:
                await pubsub.ping()

    def _apply(self, data: bytes) -> None:
        op, stream_id, reader = [*data.decode().split(" "), "", ""][:3]
        self.control(op, stream_id, reader)

    def stop_listening(self) -> None:
        self._stop.set()

    async def close(self) -> None:
        """Wait for the mirrors of streams that ended during shutdown; stop sending the
        closes Redis missed again."""
        tasks = list(self._tasks.values())
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._closing is not None:
            self._closing.cancel()
            await asyncio.gather(self._closing, return_exceptions=True)
        if self._unclosed and self._gate.state != "open":  # one last try, then they are lost
            with contextlib.suppress(Exception):
                await self._send_closes()


class RemoteStreams:
    """Serves and cancels streams whose generation runs on another replica."""

    def __init__(
        self, gate: RedisGate, follower: Redis, store: CheckpointStore, keepalive_s: float
    ) -> None:
        self._gate = gate
        self._follower = follower  # no socket timeout: it blocks in XREAD
        self._store = store
        self._keepalive_s = keepalive_s
        self._block_ms = max(1, int(keepalive_s * 1000))
        self.leaving = False  # this replica drains: its readers send their clients elsewhere
        self._readers_of: dict[tuple[str, str], int] = {}  # (user, tenant) -> readers here

    def take_reader(self, owner: tuple[str, str]) -> None:
        """Count a remote reader of ``owner``'s, or refuse it (429) past ``READERS_PER_USER``;
        ``release_reader`` when it ends."""
        held = self._readers_of.get(owner, 0)
        if held >= READERS_PER_USER:
            raise RateLimitError(
                f"This user follows {READERS_PER_USER} streams through this replica already; "
                "close one, or resume on the replica that generates the stream.",
                code="too_many_remote_readers",
                headers={"Retry-After": "1"},
            )
        self._readers_of[owner] = held + 1

    def release_reader(self, owner: tuple[str, str]) -> None:
        held = self._readers_of.get(owner, 0) - 1
        if held > 0:
            self._readers_of[owner] = held
        else:
            self._readers_of.pop(owner, None)

    async def owner_of(self, stream_id: str) -> tuple[str, str] | None:
        """(user, tenant) of a stream known to Redis; None when unknown or Redis is down."""
        try:
            meta: dict[Any, Any] = await self._gate.run(lambda r: r.hgetall(meta_key(stream_id)))
        except RedisUnavailable:
            return None
        if b"user" not in meta:
            return None
        return meta[b"user"].decode(), meta.get(b"tenant", b"").decode()

    async def running(self, stream_id: str, owner: tuple[str, str]) -> Stream | None:
        """A stream another replica is generating for ``owner`` (user, tenant), as far as
        its journal goes (a copy to take a checkpoint of: its text and tool calls so far,
        ``last_seq``; the prompt as its owner counted it); None when Redis does not have it
        running for them (nothing of its journal is read then)."""
        try:
            meta: dict[Any, Any] = await self._gate.run(lambda r: r.hgetall(meta_key(stream_id)))
            user, tenant, key = (
                meta.get(name, b"").decode() for name in (b"user", b"tenant", b"key")
            )
            if meta.get(b"status") != b"running" or (user, tenant) != owner:
                return None
            entries = await self._range(stream_id, 0, MAX_RUNNING_EVENTS)
        except RedisUnavailable:
            return None
        model = meta.get(b"model", b"").decode()
        copy = Stream(
            stream_id, Owner(user, tenant, key), model=model, streaming=True, include_usage=False
        )
        copy.created_at = float(meta.get(b"created", copy.created_at))
        prompt = int(meta.get(b"prompt", -1))
        if prompt >= 0:
            copy.prompt_counts = {model: prompt}
        for _, fields in entries:
            if int(fields[b"k"]) != Kind.CHUNK:
                break  # its end, written since the status was read
            copy.events.append(fields[b"d"])
            with contextlib.suppress(ValueError, SluiceError, AttributeError, TypeError):
                copy.progress.add_chunk(orjson.loads(fields[b"d"]))
        if not await self._may_run(stream_id):  # its replica went (or lost its end): as
            copy.end(StreamStatus.SHUTDOWN)  # a reader of its events is told
        return copy

    async def _headers(self, stream_id: str) -> dict[str, str]:
        """The ``X-Sluice-*`` headers its owner's response had (as the mirror last wrote)."""
        try:
            meta: dict[Any, Any] = await self._gate.run(lambda r: r.hgetall(meta_key(stream_id)))
        except RedisUnavailable:
            return {}
        return {
            field.decode(): value.decode()
            for field, value in meta.items()
            if field.startswith(_HEADER_PREFIX)
        }

    async def _publish(self, op: str, stream_id: str, reader: str = "") -> None:
        message = f"{op} {stream_id} {reader}" if reader else f"{op} {stream_id}"
        with contextlib.suppress(RedisUnavailable):
            await self._gate.run(lambda r: r.publish(CONTROL_CHANNEL, message))

    async def _range(self, stream_id: str, after: int, count: int) -> list[tuple[int, Any]]:
        """Up to ``count`` of the journal's entries after ``after``, as they stand."""
        key = journal_key(stream_id)
        entries: Any = await self._gate.run(
            lambda r: r.xrange(key, min=f"(0-{after}", max="+", count=count)
        )
        return [(_entry_seq(entry_id), fields) for entry_id, fields in entries]

    async def _owner_alive(self, stream_id: str) -> bool:
        return bool(await self._gate.run(lambda r: r.exists(owner_key(stream_id))))

    async def _read(
        self, stream_id: str, after: int, block_ms: int, count: int
    ) -> list[tuple[int, Any]]:
        """Up to ``count`` entries after ``after``: what is there now, else wait up to
        ``block_ms`` for more."""
        entries = await self._range(stream_id, after, count)
        if entries:
            return entries
        deadline = block_ms / 1000 + self._gate.timeout_s
        async with asyncio.timeout(deadline):
            reply: Any = await self._follower.xread(
                {journal_key(stream_id): f"0-{after}"}, count=count, block=block_ms
            )
        return [(_entry_seq(entry_id), fields) for entry_id, fields in reply[0][1]] if reply else []

    async def serve(self, request: web.Request, stream_id: str, after: int) -> web.StreamResponse:
        """Replay then follow the journal of ``stream_id`` to the client, as SSE."""
        headers = {**SSE_HEADERS, STREAM_ID_HEADER: stream_id, **await self._headers(stream_id)}
        response = web.StreamResponse(headers=headers)
        last = after

        async def deliver(batch: list[Event]) -> None:
            nonlocal last
            last = max(last, batch[-1][0])
            await response.write(b"".join(encode_event(seq, data) for seq, _, data in batch))

        async with self.reading(stream_id):
            try:
                await response.prepare(request)
                status = await self.follow(
                    stream_id, after, deliver, lambda: response.write(KEEPALIVE)
                )
                if self.leaving or status == UNREADABLE:  # come back later, or elsewhere
                    await response.write(RESUME_ELSEWHERE)
                elif status == StreamStatus.SHUTDOWN:  # its replica stopped: it ends here
                    await response.write(STOPPED if last else SEND_AGAIN)
                await response.write_eof()
            except ConnectionError:
                pass  # the client left; detaching is all there is to do
        return response

    @contextlib.asynccontextmanager
    async def reading(self, stream_id: str) -> AsyncIterator[None]:
        """Count the caller as a reader on the owning replica, whose grace window then waits.

        Every ``attach`` that may have gone out is matched by a ``detach``, even for a reader
        cancelled while publishing it (the owner ignores a detach it counts no reader for):
        an unmatched attach would keep a stream nobody reads running to its end.
        """
        reader = secrets.token_hex(8)
        beating: asyncio.Task[None] | None = None
        try:
            await self._publish("attach", stream_id, reader)
            beating = asyncio.create_task(self._beat(stream_id, reader))
            yield
        finally:
            if beating is not None:
                beating.cancel()
            await asyncio.shield(self._publish("detach", stream_id, reader))

    async def _beat(self, stream_id: str, reader: str) -> None:
        """Renew this reader's lease on the owning replica once a keepalive period."""
        while True:
            await asyncio.sleep(self._keepalive_s)
            await self._publish("beat", stream_id, reader)

    async def last_seq(self, stream_id: str) -> int | None:
        """The last event's number once the journal is closed; None while it runs (or if
        Redis is unavailable): the mirror may lag the owner, so no bound is known."""
        try:
            entries: Any = await self._gate.run(
                lambda r: r.xrevrange(journal_key(stream_id), count=1)
            )
        except RedisUnavailable:
            return None
        if not entries or int(entries[0][1][b"k"]) != END:
            return None
        return _entry_seq(entries[0][0]) - 1

    async def follow(
        self,
        stream_id: str,
        after: int,
        deliver: Callable[[list[Event]], Awaitable[None]],
        idle: Callable[[], Awaitable[None]],
    ) -> str:
        """Replay the journal after ``after``, then follow it live: each batch of ``(seq,
        kind, data)`` goes to ``deliver``, each quiet keepalive period to ``idle``. Return
        the stream's final status; ``shutdown`` when its replica went away (what was
        generated stays in the journal and the checkpoint); ``UNREADABLE`` when Redis failed
        mid-read (the stream may well go on: come back later)."""
        count = 1  # (the first read learns how large the events are)
        try:
            while True:
                if self.leaving:  # within one keepalive of the drain: resume elsewhere
                    return StreamStatus.SHUTDOWN
                entries = await self._read(stream_id, after, self._block_ms, count)
                if not entries:  # past the end of a stream still running when it was asked?
                    ended = await self._ended_by(stream_id, after)
                    if ended is not None:
                        return ended
                if not entries and not await self._owner_alive(stream_id):
                    # No END and no heartbeat: the owner died. Read once more (it may have
                    # closed the journal just now), else it is gone.
                    entries = await self._range(stream_id, after, count)
                    if not entries:
                        log.warning("remote stream %s: its replica is gone", stream_id)
                        return StreamStatus.SHUTDOWN
                if not entries:
                    await idle()
                    continue
                count = next_count(entries)
                batch: list[Event] = []
                for seq, fields in entries:
                    kind = int(fields[b"k"])
                    if kind == END:
                        if batch:
                            await deliver(batch)
                        return str(fields[b"s"].decode())
                    batch.append((seq, kind, fields[b"d"]))
                    after = seq
                await deliver(batch)
        except (RedisUnavailable, RedisError, TimeoutError) as exc:
            log.warning("remote stream %s: redis failed mid-read (%s)", stream_id, exc)
            return UNREADABLE

    async def _ended_by(self, stream_id: str, after: int) -> str | None:
        """The final status of a journal closed at or before event ``after`` (a reader who
        resumed past the end of a stream then still running), else None."""
        entries: Any = await self._gate.run(lambda r: r.xrevrange(journal_key(stream_id), count=1))
        if entries and int(entries[0][1][b"k"]) == END and _entry_seq(entries[0][0]) <= after + 1:
            return str(entries[0][1][b"s"].decode())
        return None

    async def request_cancel(self, stream_id: str) -> None:
        """Ask the owning replica to cancel ``stream_id``; its readers see the journal end."""
        await self._publish("cancel", stream_id)

    async def ask_cancel_until(self, stream_id: str, ended: asyncio.Future[Any]) -> None:
        """Ask the owner to cancel ``stream_id``, again each second until ``ended`` (a
        relay here that sees the stream end), for ``CANCEL_WAIT_S`` at most: a publish
        reaches only the replicas subscribed at that moment, and the owner's subscription
        may be reconnecting."""
        try:
            async with asyncio.timeout(CANCEL_WAIT_S):
                while not ended.done():
                    await self.request_cancel(stream_id)
                    await asyncio.wait({ended}, timeout=CANCEL_ASK_MS / 1000)
        except TimeoutError:
            log.warning("remote stream %s: its replica did not answer the cancel", stream_id)
        except Exception:  # (run as a task: nothing else would see it)
            log.exception("remote stream %s: its cancel could not be asked", stream_id)

    async def checkpoint(self, stream_id: str) -> Checkpoint | None:
        return await self._store.get(stream_id)

    async def _may_run(self, stream_id: str) -> bool:
        """Whether ``stream_id``'s owner may still be generating it (not known to be gone)."""
        try:
            return await self._owner_alive(stream_id)
        except (RedisUnavailable, RedisError, OSError, TimeoutError):
            return True

    async def cancel(self, stream_id: str) -> Checkpoint | None:
        """Ask the owner to cancel, wait for the journal's END, and return the checkpoint;
        ``ServiceUnavailableError`` when the owner never answered (the stream may still be
        running). The ask goes out again each second: a publish reaches only the replicas
        subscribed at that moment, and the owner's subscription may be reconnecting."""
        after, count = 0, 1
        deadline = time.monotonic() + CANCEL_WAIT_S
        asked = -math.inf
        with contextlib.suppress(RedisUnavailable, RedisError, OSError, TimeoutError):
            while time.monotonic() < deadline:
                if time.monotonic() - asked >= CANCEL_ASK_MS / 1000:
                    asked = time.monotonic()
                    await self.request_cancel(stream_id)
                entries = await self._read(stream_id, after, CANCEL_ASK_MS, count)
                if _ended(entries):
                    return await self._store.get(stream_id)
                if entries:
                    after, count = entries[-1][0], next_count(entries)
        checkpoint = await self._store.get(stream_id)  # (it ended before: no END read)
        if checkpoint is None and await self._may_run(stream_id):
            raise ServiceUnavailableError(
                "The replica generating this stream did not answer the cancel in time; "
                "it may still be running: try again.",
                headers={"Retry-After": "1"},
            )
        return checkpoint


_HEADER_PREFIX = b"X-Sluice-"  # owner-record fields that are its response's headers


def _checkpoint_set(checkpoint: Checkpoint, ttl_ms: int) -> Command:
    """The command that stores ``checkpoint`` in Redis (as ``SharedCheckpointStore`` does)."""
    key = checkpoint_key(checkpoint.stream_id)
    return ("SET", key, dump_checkpoint(checkpoint), "PX", ttl_ms)


def next_count(entries: list[tuple[int, Any]]) -> int:
    """How many entries the next read asks for: ``READ_BYTES`` worth at the size of these
    (``READ_COUNT`` at most, one at least)."""
    size = sum(len(fields.get(b"d", b"")) for _, fields in entries)
    return max(1, min(READ_COUNT, READ_BYTES * len(entries) // max(size, 1)))


def _ended(entries: Iterable[tuple[int, Any]]) -> bool:
    return any(int(fields[b"k"]) == END for _, fields in entries)
