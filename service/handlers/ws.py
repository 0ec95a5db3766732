"""``GET /v1/ws``: chat completions over one WebSocket, several at a time.

The frames are described in ``wsproto.py``. Each stream on the socket gets one reader task,
owned by the socket's handler: it follows the stream's journal and sends its frames. When
the stream ends the reader sends ``done`` or ``error``; when the socket closes (or a dead
peer misses its heartbeat) every reader is cancelled and detaches, which is a disconnect:
the grace window applies. A frame the server cannot act on is answered with an ``error``
frame and the socket stays open. A stream ended by shutdown gets no final frame: the socket
closes with 1001 and the client resumes elsewhere. A socket relays at most ``MAX_READERS``
streams at once, and its readers take turns to write (see ``_Socket``).

With shared state (Redis), ``resume`` and ``cancel`` work for a stream another replica
generates: its reader follows the Redis journal (``RemoteStreams.follow``) and sends the
same frames; ``done`` then takes the finish reason and usage from the stored checkpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Iterable
from typing import Any

import orjson
from aiohttp import WSMsgType, web

from ..appkeys import (
    GATE,
    JOURNAL_MIRROR,
    PRINCIPAL,
    REMOTE_STREAMS,
    SERVED_MODELS,
    SETTINGS,
    STREAMS,
    TELEMETRY,
    WEBSOCKETS,
)
from ..auth import Principal
from ..checkpoint import Checkpoint
from ..errors import (
    InternalError,
    InvalidRequestError,
    NotFoundError,
    RateLimitError,
    ServiceUnavailableError,
    SluiceError,
)
from ..redis_journal import UNREADABLE, Event, RemoteStreams
from ..relay import CACHE_HEADER
from ..request import parse_chat_request, too_deep
from ..stream import Kind, Owner, Stream, StreamStatus, check_resume_point
from ..wsproto import (
    MAX_REQUEST_ID_CHARS,
    RequestId,
    StreamFrames,
    error_frame,
    is_request_id,
    parse_frame,
)
from .chat import start_stream
from .streams import resumable_stream

log = logging.getLogger(__name__)

TEXT = WSMsgType.TEXT
MAX_READERS = 256  # streams one socket relays at once (created or resumed)


async def websocket(request: web.Request) -> web.WebSocketResponse:
    """Serve one client's socket until it closes; its streams are then disconnected."""
    settings = request.app[SETTINGS]
    ws = _WebSocket(
        heartbeat=settings.streams.keepalive_s,  # a peer that stops answering pings is gone
        compress=False,  # chunks are small; deflating each costs more than it saves
        max_msg_size=settings.server.max_body_bytes,
    )
    await ws.prepare(request)
    request.app[WEBSOCKETS].add(ws)
    # The handshake's ``X-Sluice-Cache`` (use, bypass) holds for every stream of the socket.
    socket = _Socket(request.app, request[PRINCIPAL], ws, request.headers.get(CACHE_HEADER))
    try:
        async for message in ws:
            if message.type is TEXT:
                await socket.receive(message.data)
            elif message.type is WSMsgType.BINARY:
                await socket.send(error_frame(None, InvalidRequestError("Frames must be text.")))
            else:
                break  # ERROR: the connection failed (CLOSE ends the loop by itself)
    finally:
        await socket.close()
        # A connection lost (not closed) cancels this handler and leaves the heartbeat
        # armed, holding the socket, its request and protocol until it fires (a keepalive
        # later); closing cancels it, and returns at once on a dead transport.
        with contextlib.suppress(Exception):
            await ws.close()
    return ws


class _WebSocket(web.WebSocketResponse):
    """A peer that missed its heartbeat is cut off at once. aiohttp closes its transport,
    which waits for the unsent frames to flush first: a peer that stopped reading never
    lets them, the close never completes, the handler waits on (a reader's turn to write,
    under back-pressure) and the socket's streams stay attached, past any grace window.
    (aiohttp's own hook: were it renamed, such a peer would hold on as before.)"""

    def _pong_not_received(self) -> None:
        super()._pong_not_received()
        if self._req is not None and self._req.transport is not None:
            self._req.transport.abort()


class _Socket:
    """One client's socket: the reader task of each of its streams, by request id.

    The readers take turns to write (``_turn``): aiohttp waits for a paused transport to
    drain only every so many bytes a writer sends, so readers writing side by side would
    each add that much to the buffer of a client that does not read (MBs a socket)."""

    __slots__ = (
        "_app",
        "_asking",
        "_cache_header",
        "_principal",
        "_readers",
        "_registry",
        "_turn",
        "_ws",
    )

    def __init__(
        self,
        app: web.Application,
        principal: Principal,
        ws: web.WebSocketResponse,
        cache_header: str | None,
    ):
        self._app = app
        self._principal = principal
        self._cache_header = cache_header
        self._registry = app[STREAMS]
        self._ws = ws
        self._readers: dict[RequestId, tuple[str, asyncio.Task[None]]] = {}  # stream id, task
        # Cancels of other replicas' streams being asked, by request id (one each).
        self._asking: dict[RequestId, asyncio.Task[None]] = {}
        self._turn = asyncio.Lock()

    async def receive(self, text: str) -> None:
        """Act on one client frame; anything wrong with it is answered with an error frame."""
        frame: dict[str, Any] = {}
        kind = None
        try:
            frame = parse_frame(text)
            kind = frame.get("type")
            if kind == "chat.completion.create":
                await self._create(frame)
            elif kind == "cancel":
                await self._cancel(frame)
            elif kind == "resume":
                await self._resume(frame)
            else:
                raise InvalidRequestError(
                    "Unknown frame type; expected chat.completion.create, cancel or resume.",
                    param="type",
                )
        except SluiceError as error:
            refused = kind == "chat.completion.create" or isinstance(error, RateLimitError)
            if refused:  # no stream will account for this one (a create, a resume's 429)
                principal = self._principal
                self._app[TELEMETRY].message_refused(
                    error, user_id=principal.user_id, tenant=principal.tenant
                )
            await self.send(error_frame(_request_id_of(frame, kind), error))
        except Exception:  # a bug: logged like the middleware does, and the socket lives on
            log.exception("WebSocket frame failed")
            failure = InternalError("The server had an error while processing this frame.")
            await self.send(error_frame(_request_id_of(frame, kind), failure))

    async def send(self, frame: bytes) -> None:
        with contextlib.suppress(ConnectionError):  # closing: the loop ends next
            await self._send((frame,))

    async def _send(self, frames: Iterable[bytes]) -> None:
        """Write ``frames`` in one turn: a paused transport holds every reader back. (Made
        as they are written: a resumed journal is not copied whole while a turn is awaited.)"""
        async with self._turn:
            for frame in frames:
                await self._ws.send_frame(frame, TEXT)

    async def close(self) -> None:
        """Stop every reader; each detaches from its stream as it ends."""
        tasks = [task for _, task in self._readers.values()] + list(self._asking.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _create(self, frame: dict[str, Any]) -> None:
        body = frame.get("body")
        principal = self._principal
        try:
            request_id = self._new_request_id(frame.get("request_id"))
            self._check_room()
            if not isinstance(body, dict):
                raise InvalidRequestError("'body' must be a chat completion request.", param="body")
            # The transport streams by nature: ``stream`` is implied whatever the body says.
            try:
                raw = orjson.dumps({**body, "stream": True})
            except TypeError:  # nested deeper than orjson writes: than we take, too
                raise too_deep() from None
            chat = parse_chat_request(raw, self._app[SERVED_MODELS])
        except SluiceError as exc:  # refused before admission: still one ledger row
            self._app[GATE].refuse(principal, body, code=exc.code or exc.type)
            raise
        owner = Owner(principal.user_id, principal.tenant, principal.key_id)
        # Limits and budgets, as over SSE.
        admission = await self._app[GATE].admit(principal, chat, cache_header=self._cache_header)
        stream = await admission.launch(start_stream, self._app, owner)
        announced = asyncio.Event()
        self._follow(request_id, stream, after=0, announce=announced)
        # ``started`` goes out before this socket's next frame is read: no answer to a
        # later frame (a duplicate request id, say) can come before it.
        await announced.wait()

    async def _cancel(self, frame: dict[str, Any]) -> None:
        request_id = frame.get("request_id")
        if not is_request_id(request_id) or request_id not in self._readers:
            raise NotFoundError(
                "No stream with this request_id on this socket.",
                param="request_id",
                code="request_not_found",
            )
        stream_id, relay = self._readers[request_id]
        stream = self._registry.get(stream_id)  # its reader sends the final error frame
        if stream is not None:
            self._registry.cancel(stream)
        elif (remote := self._app[REMOTE_STREAMS]) is not None:
            asking = self._asking.get(request_id)
            if asking is None or asking.done():  # (a cancel sent twice is asked once)
                asking = asyncio.create_task(remote.ask_cancel_until(stream_id, relay))
                self._asking[request_id] = asking
                asking.add_done_callback(lambda _: self._asking.pop(request_id, None))

    async def _resume(self, frame: dict[str, Any]) -> None:
        stream_id = frame.get("stream_id")
        if not isinstance(stream_id, str):
            raise InvalidRequestError("'stream_id' must be a string.", param="stream_id")
        last_seq = frame.get("last_seq", 0)
        if not isinstance(last_seq, int) or isinstance(last_seq, bool) or last_seq < 0:
            raise InvalidRequestError("'last_seq' must be an integer >= 0.", param="last_seq")
        remote = self._app[REMOTE_STREAMS]
        if self._registry.get(stream_id) is None and remote is not None:  # another replica's?
            principal = self._principal
            if await remote.owner_of(stream_id) == (principal.user_id, principal.tenant):
                after = check_resume_point(
                    await remote.last_seq(stream_id), last_seq, param="last_seq"
                )
                request_id = self._resume_request_id(frame, stream_id)
                self._follow_remote(remote, request_id, stream_id, after)  # (or refused)
                self._app[TELEMETRY].stream_resumed(stream_id, after)
                return
        stream = resumable_stream(self._registry, stream_id, self._principal)
        after = check_resume_point(stream.last_seq, last_seq, param="last_seq")
        request_id = self._resume_request_id(frame, stream_id)
        self._app[TELEMETRY].stream_resumed(stream.id, after)
        self._follow(request_id, stream, after=after, announce=None)

    def _resume_request_id(self, frame: dict[str, Any], stream_id: str) -> RequestId:
        """The frame's ``request_id``, by default the stream's id (known good once the stream
        is found: a missing stream is named as such, not as a bad request id); and room for
        the stream on this socket."""
        request_id = self._new_request_id(frame.get("request_id", stream_id))
        self._check_room()
        return request_id

    def _new_request_id(self, value: Any) -> RequestId:
        if not is_request_id(value):
            raise InvalidRequestError(
                f"'request_id' must be a string of at most {MAX_REQUEST_ID_CHARS} characters "
                "or an integer.",
                param="request_id",
            )
        if value in self._readers:
            raise InvalidRequestError(
                "This request_id is already streaming on this socket.",
                param="request_id",
                code="duplicate_request_id",
            )
        return value

    def _check_room(self) -> None:
        """Refuse a stream past ``MAX_READERS`` on this socket (created or resumed)."""
        if len(self._readers) >= MAX_READERS:
            raise RateLimitError(
                f"This socket relays {MAX_READERS} streams already; open another one.",
                code="too_many_streams_on_socket",
                headers={"Retry-After": "1"},
            )

    def _follow(
        self,
        request_id: RequestId,
        stream: Stream,
        *,
        after: int,
        announce: asyncio.Event | None,
    ) -> None:
        """Relay ``stream`` from ``after`` under ``request_id``; with ``announce``, its
        ``started`` frame first, and ``announce`` set once that is out (or the reader ended)."""
        # Attach now, not in the task: a socket closing before the task first runs must
        # still detach, and a done callback runs even for a task cancelled unstarted.
        self._registry.attach(stream)
        self._app[TELEMETRY].ws_relaying(+1)
        frames = StreamFrames(request_id, stream.id)
        task = asyncio.create_task(self._relay(frames, stream, after, announce))
        self._readers[request_id] = (stream.id, task)
        task.add_done_callback(functools.partial(self._reader_done, request_id, stream))
        if announce is not None:
            task.add_done_callback(lambda _: announce.set())  # ended before it was out

    def _follow_remote(
        self, remote: RemoteStreams, request_id: RequestId, stream_id: str, after: int
    ) -> None:
        owner = (self._principal.user_id, self._principal.tenant)
        remote.take_reader(owner)  # (or a 429 frame: the user's remote readers are bounded)
        self._app[TELEMETRY].ws_relaying(+1)
        frames = StreamFrames(request_id, stream_id)
        task = asyncio.create_task(self._relay_remote(remote, frames, after))
        self._readers[request_id] = (stream_id, task)
        task.add_done_callback(functools.partial(self._reader_done, request_id, None))
        task.add_done_callback(lambda _: remote.release_reader(owner))

    def _reader_done(
        self, request_id: RequestId, stream: Stream | None, task: asyncio.Task[None]
    ) -> None:
        stream_id, _ = self._readers.pop(request_id, ("?", task))
        self._app[TELEMETRY].ws_relaying(-1)
        if stream is not None:
            self._registry.detach(stream)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("WebSocket reader of stream %s failed", stream_id, exc_info=exc)

    async def _relay(
        self, frames: StreamFrames, stream: Stream, after: int, announce: asyncio.Event | None
    ) -> None:
        send = self._send
        with contextlib.suppress(ConnectionError):  # the socket went away mid-send
            if announce is not None:
                mirror = self._app[JOURNAL_MIRROR]
                if mirror is not None:  # the id goes out next: every replica must know it
                    await mirror.registered(stream)
                stream.announced = True  # before the send: it may be read before it returns
                await send((frames.started(),))
                announce.set()
            async for first, batch in stream.follow(after):
                await send(
                    frames.chunk(seq, data)
                    for seq, data in enumerate(batch, first)
                    if stream.kind_of(seq) == Kind.CHUNK
                )
            # The journal's own final event ([DONE] or the error) is replaced by the
            # done/error frame, numbered like it.
            if stream.error is not None and stream.status is not StreamStatus.SHUTDOWN:
                await send((frames.error(stream.last_seq, stream.error),))
            elif stream.status is StreamStatus.COMPLETED:
                progress = stream.progress
                await send((frames.done(stream.last_seq, progress.finish_reason, progress.usage),))

    async def _relay_remote(self, remote: RemoteStreams, frames: StreamFrames, after: int) -> None:
        """``_relay`` for a stream another replica generates, read from the Redis journal."""
        send = self._send
        final: list[Event] = []  # the journal's own last event: [DONE] or the error
        last_seq = after

        async def deliver(batch: list[Event]) -> None:
            nonlocal last_seq
            for event in batch:
                if event[1] != Kind.CHUNK:
                    final[:] = [event]
                last_seq = max(last_seq, event[0])
            fresh = (event for event in batch if event[1] == Kind.CHUNK and event[0] > after)
            await send(frames.chunk(seq, data) for seq, _, data in fresh)

        # From the event before ``after``: if the client had the final event, its frame goes
        # out again, as it does for a local stream.
        with contextlib.suppress(ConnectionError):
            async with remote.reading(frames.stream_id):
                status = await remote.follow(frames.stream_id, max(after - 1, 0), deliver, _nothing)
            if final and final[0][1] == Kind.ERROR:
                await send((frames.error_event(final[0][0], final[0][2]),))
            elif final and status == StreamStatus.COMPLETED:
                checkpoint = await remote.checkpoint(frames.stream_id)
                finish = checkpoint.finish_reason if checkpoint is not None else None
                await send((frames.done(final[0][0], finish, _usage(checkpoint)),))
            elif status in _ENDED and (checkpoint := await remote.checkpoint(frames.stream_id)):
                # Resumed past the end of a stream then running, which has ended since: its
                # final frame, from the checkpoint, as its owner's socket sends it.
                await send((_final_frame(frames, status, checkpoint),))
            elif remote.leaving:  # this replica drains: resume elsewhere now, not at its end
                leaving = ServiceUnavailableError(
                    "This replica is shutting down: resume the stream on another with the "
                    f"last seq you received ({last_seq}).",
                    code="stream_interrupted",
                    headers={"Retry-After": "1"},
                )
                await send((frames.error(last_seq, leaving),))
            elif status == UNREADABLE:  # the stream may go on: resume it a little later
                unreadable = ServiceUnavailableError(
                    "Shared state (Redis) failed while following this stream, which may go "
                    f"on: resume it shortly with the last seq you received ({last_seq}).",
                    code="shared_state_unavailable",
                )
                await send((frames.error(last_seq, unreadable),))
            else:  # its replica stopped before the end: what it made is in the checkpoint
                interrupted = ServiceUnavailableError(
                    "The replica generating this stream stopped before it finished.",
                    code="stream_interrupted",
                )
                await send((frames.error(last_seq + 1, interrupted),))


# A remote journal's end statuses that carry a final frame (SHUTDOWN leaves it open-ended).
_ENDED = frozenset(StreamStatus) - {StreamStatus.RUNNING, StreamStatus.SHUTDOWN}


def _final_frame(frames: StreamFrames, status: str, checkpoint: Checkpoint) -> bytes:
    """A remote stream's ``done`` or ``error`` frame, from its checkpoint."""
    if status == StreamStatus.COMPLETED or checkpoint.error is None:
        return frames.done(checkpoint.last_seq, checkpoint.finish_reason, _usage(checkpoint))
    return frames.error_event(checkpoint.last_seq, orjson.dumps({"error": checkpoint.error}))


async def _nothing() -> None:
    """A quiet period on a remote journal: the socket's own heartbeat keeps it alive."""


def _usage(checkpoint: Checkpoint | None) -> dict[str, int] | None:
    if checkpoint is None or not checkpoint.usage_reported:
        return None
    prompt, completion = checkpoint.prompt_tokens, checkpoint.completion_tokens
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _request_id_of(frame: dict[str, Any], kind: object) -> Any:
    """What an error answers: the frame's ``request_id``; for a resume without one, the
    stream's id, as its frames would have carried (so a client resuming several streams
    knows which failed)."""
    if kind == "resume":  # named as ``_resume_request_id`` would have named it
        return frame.get("request_id", frame.get("stream_id"))
    return frame.get("request_id")
