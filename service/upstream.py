"""The provider connection: requests to an OpenAI-compatible upstream over one shared
``ProviderClient`` (keep-alive connections, ``provider_client.py``).

It owns the provider key: ``provider_client`` makes the client that adds it to each
request, and it is never returned (a provider that echoes it anywhere, in an error or a 2xx
answer, has it scrubbed out). It turns non-2xx answers into
``ProviderStatusError`` with the provider's message, and pumps a streamed body into a sink
as raw SSE ``data`` payloads under two deadlines: time to first event, then the longest
idle gap between reads.
"""

from __future__ import annotations

import asyncio
import datetime
import email.utils
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from .context import reasons_unseen
from .credentials import ProviderSecrets
from .errors import (
    ProviderAnswerError,
    ProviderBrokenAnswerError,
    ProviderCutOffError,
    ProviderEndedEarly,
    ProviderProtocolError,
    ProviderStatusError,
    ProviderTimeoutError,
    translate,
)
from .provider_client import ClientError, ProviderClient, Response, TooLarge, header_lines
from .settings import ProviderSettings
from .sse import EventTooLarge, SSEDecoder

Sink = Callable[[list[bytes]], bool]  # gets a batch of payloads; returns True at [DONE]

MAX_FIELD_CHARS = 256  # a provider's error type, code or param: more is not a code
MAX_MESSAGE_CHARS = 2000  # a provider's error message, as a client is shown it
# What a provider's bodies may weigh, read whole (a stream's events are bounded apiece, in
# ``sse.py``, and together, in ``generation.py``): more is a broken or hostile provider.
MAX_ANSWER_BYTES = 32 * 1024 * 1024  # a non-streamed completion
MAX_MODELS_BYTES = 4 * 1024 * 1024  # the model list (OpenAI's is ~10 KB)
ERROR_BODY_BYTES = 1024 * 1024  # an error's body (one may echo the prompt): no more is read
MODELS_TTL_S = 60.0  # how long the provider's model list is served from memory
_TIMER_SLACK_S = 0.001  # loop timers may fire this early (ms resolution); do not re-arm then
_NUMBER = re.compile(r"[0-9]{1,20}(\.[0-9]{1,6})?")  # seconds (or ms); a longer one is no hint
_ACCEPT_SSE = b"Accept: text/event-stream\r\n"
_ACCEPT_JSON = b"Accept: application/json\r\n"
_PROPAGATOR = TraceContextTextMapPropagator()  # W3C traceparent; stateless, not the global one


def provider_client(settings: ProviderSettings, base_url: str) -> ProviderClient:
    """The client for the provider at ``base_url``, our credentials on each request."""
    # identity: the relay forwards and parses the provider's bytes as they come.
    headers = {"Content-Type": "application/json", "Accept-Encoding": "identity"}
    if settings.api_key is not None:
        headers["Authorization"] = f"Bearer {settings.api_key.reveal()}"
    if settings.organization:
        headers["OpenAI-Organization"] = settings.organization
    if settings.project:
        headers["OpenAI-Project"] = settings.project
    return ProviderClient(base_url, headers=headers, connect_timeout_s=settings.connect_timeout_s)


class Upstream:
    """Requests to the provider; the client is owned by a cleanup context."""

    def __init__(self, client: ProviderClient, settings: ProviderSettings):
        self._client = client
        self._settings = settings
        self._chat_path = f"{client.base_path}/chat/completions"
        self._models_path = f"{client.base_path}/models"
        # A provider may echo its credentials anywhere, 2xx bodies included: all scrubbed.
        self._secrets = ProviderSecrets.of(settings)
        self._models: tuple[float, list[dict[str, Any]]] | None = None  # (until, list)
        self._fetching: asyncio.Future[list[dict[str, Any]]] | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._client.loop

    @property
    def name(self) -> str:
        return self._settings.name

    def redact(self, text: str) -> str:
        """``text`` without our provider key, for any provider words shown to a client."""
        return self._secrets.message(text)

    def field(self, value: object) -> str | None:
        """A provider's short error field (type, code, param) fit to pass on: a string, our
        key scrubbed out (a careless provider echoes credentials anywhere), bounded."""
        return self._secrets.message(value)[:MAX_FIELD_CHARS] if isinstance(value, str) else None

    async def post_chat(self, body: bytes, model: str = "") -> ProviderStream:
        """POST a streamed chat completion (of ``model``); return the 2xx response (its body
        unread), or raise the provider's error."""
        # The first-token deadline counts from the request: it bounds the wait for the
        # status line (a provider may hold its headers until the first token) and for the
        # first event after it together. TimeoutError is translated to a 504.
        loop = self._client.loop
        settings = self._settings
        due = loop.time() + (
            settings.reasoning_first_token_timeout_s
            if reasons_unseen(model)
            else settings.first_token_timeout_s
        )
        with _Deadline(loop, due, math.inf):
            response = await self._post(body, _ACCEPT_SSE)
            if _is_json(response):  # an answer, not a stream
                async with response:  # an answer where a stream was asked: often an error
                    detail = _error_detail(await response.read_upto(ERROR_BODY_BYTES))
                    raise relayed_error(detail, self, "The provider sent no stream.")
            return ProviderStream(response, due)

    async def complete(self, body: bytes, model: str = "") -> bytes:
        """POST a non-streamed chat completion and read it whole, or raise the provider's
        error. One deadline covers both (``SLUICE_COMPLETION_TIMEOUT_S``): a non-streamed
        answer comes only once it is whole, so the first-token deadline would be too short."""
        loop = self._client.loop
        with _Deadline(loop, loop.time() + self._settings.completion_timeout_s, math.inf):
            response = await self._post(body, _ACCEPT_JSON)
            try:
                raw = await response.read(MAX_ANSWER_BYTES)
            except TooLarge as exc:
                raise translate(exc) from None
            except (ClientError, OSError) as exc:
                response.close()
                raise ProviderCutOffError(
                    "The provider closed the connection in the middle of its answer."
                ) from exc
            except BaseException:
                response.close()  # drop the connection: the provider sees it and stops
                raise
        response.release()
        raw = self.scrub_data(raw)
        if b'error"' in raw or b"\\u" in raw:  # (an "error" key, plain or \u-escaped)
            _raise_answered_error(raw, self)
        return raw

    def _scrubbed_all(self, payloads: list[bytes]) -> list[bytes]:
        """``payloads`` (events' data) without our credentials."""
        if not self._secrets.in_answers or not payloads:
            return payloads
        return [self._secrets.data(p) for p in payloads]

    def scrub_data(self, data: bytes) -> bytes:
        """``data`` (a whole body, or one event's payload) without our credentials."""
        return self._secrets.data(data) if self._secrets.in_answers else data

    async def _post(self, body: bytes, headers: bytes) -> Response:
        trace_context: dict[str, str] = {}
        _PROPAGATOR.inject(trace_context)  # the current attempt's CLIENT span, when tracing
        if trace_context:
            headers += header_lines(trace_context)
        response = await self._client.request("POST", self._chat_path, body, headers)
        if response.status >= 300:
            async with response:
                raise await self._status_error(response)
        encoding = response.headers.get("Content-Encoding", "identity")
        if encoding.strip().lower() != "identity":  # asked for identity, and given this
            response.close()
            raise ProviderBrokenAnswerError(
                f"The provider sent its answer encoded ({self.field(encoding)}), "
                "which the gateway did not ask for."
            )
        return response

    async def list_models(self) -> list[dict[str, Any]]:
        """The provider's model list, asked at most once a ``MODELS_TTL_S`` and by one call
        at a time, whoever waits for it (each client's ``/v1/models`` was a provider call
        with the gateway's key). A failure is not kept: the next caller asks again."""
        loop = asyncio.get_running_loop()
        if self._models is not None and self._models[0] > loop.time():
            return self._models[1]
        if self._fetching is None:
            self._fetching = fetching = asyncio.ensure_future(self._fetch_models())
            fetching.add_done_callback(self._fetched)
        return await asyncio.shield(self._fetching)

    def _fetched(self, fetching: asyncio.Future[list[dict[str, Any]]]) -> None:
        self._fetching = None
        if not fetching.cancelled() and fetching.exception() is None:
            self._models = (fetching.get_loop().time() + MODELS_TTL_S, fetching.result())

    async def _fetch_models(self) -> list[dict[str, Any]]:
        async with asyncio.timeout(self._settings.first_token_timeout_s):
            response = await self._client.request("GET", self._models_path, headers=_ACCEPT_JSON)
            async with response:
                if response.status >= 300:
                    raise await self._status_error(response)
                try:
                    raw = self.scrub_data(await response.read(MAX_MODELS_BYTES))
                except TooLarge:
                    raise ProviderProtocolError(
                        "The provider sent a model list too large."
                    ) from None
        try:
            payload = orjson.loads(raw)
        except orjson.JSONDecodeError:
            payload = None
        models = payload.get("data") if isinstance(payload, dict) else None
        if not isinstance(models, list):
            raise ProviderProtocolError("The provider sent a malformed model list.")
        return [m for m in models if isinstance(m, dict)]

    async def _status_error(self, response: Response) -> ProviderStatusError:
        detail = _error_detail(await response.read_upto(ERROR_BODY_BYTES))
        message = self.redact(
            str(detail.get("message") or f"The provider answered {response.status}.")
        )[:MAX_MESSAGE_CHARS]
        if response.status in (401, 403):  # about our credentials: none of a client's business
            return ProviderStatusError(
                "The provider refused the gateway's credentials.",
                provider_status=response.status,
                code="provider_auth_failed",
            )
        headers = {
            name: hint
            for name in ("Retry-After", "retry-after-ms")
            if (value := response.headers.get(name)) and (hint := _retry_hint(name, value))
        }
        error = ProviderStatusError(
            message,
            provider_status=response.status,
            type_=self.field(detail.get("type")),
            param=self.field(detail.get("param")),
            code=self.field(detail.get("code")),
            headers=headers,
        )
        if response.headers.get("x-should-retry", "").strip().lower() == "false":
            # The provider says so (out of quota, say): not here, and not by the SDK.
            error.provider_no_retry = True
            error.futile()
        return error

    async def pump(
        self, answer: ProviderStream, sink: Sink, *, generating: Callable[[], bool]
    ) -> None:
        """Feed the streamed body to ``sink`` until [DONE] or EOF, enforcing the deadlines.

        The first-token deadline holds until ``generating()`` says the events so far carry
        output (an opening role chunk does not: a provider may send it at once and then
        prefill for long); from then on the idle deadline runs from each read."""
        decoder = SSEDecoder()
        try:
            idle_s = self._settings.idle_timeout_s
            with _Deadline(answer.response.loop, answer.first_due, idle_s) as deadline:
                output_began = False  # since then any read (a comment) shows life
                async for data in answer.response.iter_any():
                    payloads = self._scrubbed_all(decoder.feed(data))  # whole events: a
                    # key split by reads too
                    if payloads and sink(payloads):
                        return
                    if output_began or (payloads and generating()):
                        output_began = True
                        deadline.touch()
                    del data, payloads  # not kept while the next read is awaited
                rest = self._scrubbed_all(decoder.flush())  # no blank line after it
                if rest and sink(rest):
                    return
        except TimeoutError:
            raise ProviderTimeoutError("The provider stopped sending in time.") from None
        except (ClientError, OSError, EventTooLarge) as exc:  # reset mid-stream, say
            raise translate(exc) from exc
        raise ProviderEndedEarly("The provider ended the stream without finishing it.")


def _nobody(error: BaseException | None) -> None:
    """A stream's end, told to nobody (an answer no breaker attempt made)."""


@dataclass(slots=True)
class ProviderStream:
    """A provider's 2xx streamed answer, its body unread, and when its first output is due."""

    response: Response
    first_due: float  # loop time: the first-token deadline, counted from the request
    # Told how the stream ended (None: whole; an error: how it failed), to count a
    # provider that fails mid-stream: the breaker's verdict (``resilience.py``).
    ended: Callable[[BaseException | None], None] = _nobody


class _Deadline:
    """A block that raises ``TimeoutError`` at ``first_due`` (loop time), or ``idle_s``
    after the last ``touch()``, as ``asyncio.timeout`` would (the task is cancelled, and
    the cancellation turned into the error as the block ends).

    ``touch`` mostly just records the time: the timer re-arms itself when it fires before
    the due time, so a stream costs about one timer per idle period instead of one per read
    (rescheduling an asyncio timer costs microseconds). Invariant: the timer is armed at or
    before ``_due``; ``touch`` re-arms only when the due time moves earlier than the timer.
    (Not ``asyncio.timeout`` around it: on Python 3.11 each of its steps asks for the
    running loop, a system call each time.)
    """

    __slots__ = (
        "_armed_at",
        "_cancelling",
        "_due",
        "_expired",
        "_handle",
        "_idle_s",
        "_loop",
        "_task",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop, first_due: float, idle_s: float) -> None:
        self._loop = loop
        task = asyncio.current_task(loop)
        assert task is not None  # (inside a task: the one the deadline cancels)
        self._task = task
        self._cancelling = 0
        self._expired = False
        self._idle_s = idle_s
        self._due = first_due
        self._armed_at = self._due
        self._handle: asyncio.TimerHandle | None = None

    def __enter__(self) -> _Deadline:
        self._cancelling = self._task.cancelling()
        self._arm(self._due)
        return self

    def __exit__(self, kind: object, exc: BaseException | None, tb: object) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        # As ``asyncio.Timeout`` does: the cancellation was ours only if no other is pending.
        expired = self._expired and self._task.uncancel() <= self._cancelling
        if expired and kind is asyncio.CancelledError:
            raise TimeoutError from exc

    def touch(self) -> None:
        self._due = self._loop.time() + self._idle_s
        if self._due < self._armed_at:
            self._arm(self._due)

    def _arm(self, when: float) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._armed_at = when
        self._handle = self._loop.call_at(when, self._check)

    def _check(self) -> None:
        now = self._loop.time()
        if now >= self._due - _TIMER_SLACK_S:
            self._handle = None
            self._expired = True
            self._task.cancel()  # turned into TimeoutError as the block ends
        else:
            self._arm(self._due)


def _is_json(response: Response) -> bool:
    """Whether the media type is JSON (the parameters after it do not matter)."""
    media = response.headers.get("Content-Type").partition(";")[0]
    return media.strip().lower() == "application/json"


def _retry_hint(name: str, value: str) -> str | None:
    """A ``Retry-After`` (or ``retry-after-ms``) worth passing on, as the gateway writes it:
    a number of seconds (ms), or for ``Retry-After`` an HTTP date. Never the provider's
    own text: the date parser takes extra words (a credential echoed, say) and ignores them."""
    value = value.strip()
    if _NUMBER.fullmatch(value):
        return value
    if name != "Retry-After":
        return None
    try:
        when = email.utils.parsedate_to_datetime(value)
        if when.tzinfo is None:  # "-0000", or no zone: UTC, as HTTP dates are
            when = when.replace(tzinfo=datetime.UTC)
        return email.utils.format_datetime(when.astimezone(datetime.UTC), usegmt=True)
    except (TypeError, ValueError, IndexError, OverflowError):  # a year past 9999, ...
        return None


def _error_detail(raw: bytes) -> dict[str, Any]:
    """The error object of a provider's error body, in the shapes servers send: OpenAI's
    ``{"error": {...}}``, ``{"error": "text"}`` (TGI), ``{"message": ...}`` (older vLLM)."""
    try:
        payload = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return {}
    if not isinstance(payload, dict):
        return {}
    return _error_object(payload.get("error")) or (payload if "message" in payload else {})


def _error_object(detail: Any) -> dict[str, Any]:
    """A provider's ``error`` value as an object (a bare string is its message)."""
    if isinstance(detail, dict):
        return detail
    return {"message": detail} if isinstance(detail, str) and detail else {}


class Scrubber(Protocol):
    """What makes a provider's words fit to pass on (``Upstream``, ``ResilientProvider``)."""

    def redact(self, text: str) -> str: ...

    def field(self, value: object) -> str | None: ...


def _raise_answered_error(raw: bytes, scrubber: Scrubber) -> None:
    """Raise a 200's body if it is an error (no ``choices``), inside the attempt: so the
    breaker counts it, as it counts an error a stream sends. Not retried (a 2xx), and
    nothing to bill."""
    try:
        payload = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return  # the caller tells the provider it sent nothing readable
    if isinstance(payload, dict) and "error" in payload and "choices" not in payload:
        raise relayed_error(payload["error"], scrubber, "The provider answered an error.")


def relayed_error(detail: Any, scrubber: Scrubber, default: str) -> ProviderAnswerError:
    """A provider's error in a 2xx answer (an ``error`` object or bare message, in a chunk
    or a whole body) as our 502, its words scrubbed of our key."""
    detail = _error_object(detail)
    return ProviderAnswerError(
        scrubber.redact(str(detail.get("message") or default))[:MAX_MESSAGE_CHARS],
        provider_status=502,
        type_=scrubber.field(detail.get("type")),
        param=scrubber.field(detail.get("param")),
        code=scrubber.field(detail.get("code")),
    )
