"""The one error hierarchy, and the one place lower-level exceptions are translated into it.

    SluiceError                        status, OpenAI ``type`` and ``code``
    ├── InvalidRequestError            400 invalid_request_error
    ├── AuthenticationError            401 invalid_api_key
    ├── PermissionDeniedError          403 (e.g. another user's usage without an admin key)
    ├── NotFoundError                  404
    ├── MethodNotAllowedError          405
    ├── PayloadTooLargeError           413
    ├── RateLimitError                 429 (carries Retry-After and x-ratelimit-* headers)
    │   ├── TokenRateLimitError        429 the same, from a tokens-per-minute limit
    │   └── BudgetExceededError        429 budget_exceeded: a USD budget has no room for it
    ├── ServiceUnavailableError        503 draining, starting, shared state away
    │   └── CircuitOpenError           503 the provider's breaker is open (Retry-After)
    ├── StreamEndedError               409 a stream was cancelled or abandoned before its end
    ├── HTTPStatusError                any other status the HTTP layer raised (408, 415, ...)
    ├── InternalError                  500 an unforeseen failure (a bug), logged where caught
    └── ProviderError                  502 the upstream failed us
        ├── ProviderStatusError        the upstream answered non-2xx (4xx passed through)
        │   └── ProviderAnswerError    502 a 2xx that is an error, or no stream (no retry)
        ├── ProviderTimeoutError       504 first-token, idle, completion or generation limit
        │   └── ProviderConnectTimeoutError  504 no connection in time (safe to retry)
        ├── ProviderConnectionError    502 refused, reset, closed mid-stream
        │   ├── ProviderCutOffError    502 closed mid-answer, after it was paid for (no retry)
        │   └── ProviderEndedEarly     502 a stream's body ended without [DONE]
        └── ProviderProtocolError      502 the upstream sent something that is not a chunk
            ├── ProviderBrokenAnswerError    502 an answer begun, then unreadable (no retry)
            └── ProviderAnswerTooLargeError  502 past a bound on what is kept (no retry)

Every leaf renders as OpenAI's ``{"error": {"message", "type", "param", "code"}}``: as a
JSON response before the first byte (``middleware.py``), as a final SSE ``data:`` event or
a WebSocket ``error`` frame after it. ``translate`` maps the provider client's, asyncio's
and OS exceptions.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping
from typing import Any, ClassVar, Self

import orjson

from .provider_client import (
    AnswerError,
    BodyError,
    ClientError,
    ConnectError,
    ConnectTimeout,
    TooLarge,
)
from .sse import EventTooLarge


class SluiceError(Exception):
    """Base of every error a client can see."""

    status: ClassVar[int] = 500
    type: ClassVar[str] = "server_error"
    default_code: ClassVar[str | None] = None
    # The provider may have generated (and billed) the answer: it is never asked for again,
    # by the gateway's retries (``retry.py``) or a client's.
    may_have_generated: ClassVar[bool] = False
    # The request went out and the provider may have worked on it, not refused it: its
    # prompt is billed (``resilience.py``; an error in a 2xx body is a refusal, not billed).
    prompt_billed: ClassVar[bool] = False
    # Whether the same request sent again may fare better: the SDKs retry 408/409/429/5xx
    # unless ``x-should-retry: false`` (written by ``middleware.error_response``) says not to.
    retry_helps: bool = True

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code
        self.headers: dict[str, str] = dict(headers or {})
        if self.may_have_generated:
            self.retry_helps = False

    @property
    def http_status(self) -> int:
        return self.status

    def futile(self) -> Self:
        """Mark it not worth sending again: it would fail the same way, or the gateway has
        retried it already (a client's retries would multiply the provider's calls)."""
        self.retry_helps = False
        return self

    def fresh(self) -> Self:
        """A copy to raise again (a stream's kept error, answering its request): raising it
        ties no frames to the kept one, and its headers are its own."""
        clone = type(self).__new__(type(self), *self.args)
        clone.__dict__.update(self.__dict__)
        clone.headers = dict(self.headers)
        return clone

    def payload(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def body(self) -> bytes:
        return orjson.dumps(self.payload())


class InvalidRequestError(SluiceError):
    status = 400
    type = "invalid_request_error"


class AuthenticationError(SluiceError):
    status = 401
    type = "invalid_request_error"
    default_code: ClassVar[str | None] = "invalid_api_key"


class MissingKeyError(AuthenticationError):
    """No key at all: OpenAI's own 401 for it has no code."""

    default_code = None


class PermissionDeniedError(SluiceError):
    status = 403
    type = "invalid_request_error"
    default_code = "permission_denied"


class NotFoundError(SluiceError):
    status = 404
    type = "invalid_request_error"
    default_code = "not_found"


class MethodNotAllowedError(SluiceError):
    status = 405
    type = "invalid_request_error"
    default_code = "method_not_allowed"


class PayloadTooLargeError(SluiceError):
    status = 413
    type = "invalid_request_error"
    default_code = "request_too_large"


class RateLimitError(SluiceError):
    status = 429
    type = "rate_limit_error"
    default_code = "rate_limit_exceeded"


class TokenRateLimitError(RateLimitError):
    """A tokens-per-minute limit refused: the same error for the client (as OpenAI's), a
    rejection of its own (``tokens``) in the gateway's metrics."""


class BudgetExceededError(RateLimitError):
    type = "insufficient_quota"
    default_code = "budget_exceeded"
    retry_helps = False  # not before the day or month ends (the SDKs would wait for hours)


class ServiceUnavailableError(SluiceError):
    status = 503
    type = "server_error"
    default_code = "service_unavailable"


class CircuitOpenError(ServiceUnavailableError):
    """The breaker guarding the provider (or model) is open: fail fast, come back later."""

    default_code = "circuit_open"

    def __init__(self, message: str, *, retry_after_s: float) -> None:
        seconds = max(1, math.ceil(retry_after_s))
        super().__init__(message, headers={"Retry-After": str(seconds)})
        self.retry_after_s = retry_after_s


class InternalError(SluiceError):
    """Something nobody foresaw failed (a bug): 500 with words of ours; its cause is logged
    where it is caught, since the client is told nothing of it."""


class HTTPStatusError(SluiceError):
    """A status aiohttp itself raised that has no leaf of its own: kept, OpenAI-shaped."""

    def __init__(
        self, message: str, *, status: int, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message, code=str(status), headers=headers)
        self._status = status

    @property
    def http_status(self) -> int:
        return self._status

    def payload(self) -> dict[str, Any]:
        body = super().payload()
        if self._status < 500:
            body["error"]["type"] = "invalid_request_error"
        return body


class StreamEndedError(SluiceError):
    """Rendered as the last event of a stream that stopped early (stop button, client gone)."""

    status = 409
    type = "invalid_request_error"
    default_code = "stream_cancelled"


class ProviderError(SluiceError):
    status = 502
    type = "upstream_error"
    default_code = "provider_error"


class ProviderStatusError(ProviderError):
    """The provider answered with a non-2xx status.

    A 4xx (other than 401/403, which would reveal our credentials' state) is the
    client's fault and passes through with the provider's status and message; 5xx
    and anything unexpected become 502.
    """

    def __init__(
        self,
        message: str,
        *,
        provider_status: int,
        type_: str | None = None,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message, param=param, code=code, headers=headers)
        self.provider_status = provider_status
        if provider_status in (401, 403):  # about our credentials: they stay as they are
            self.retry_helps = False
        self._type = type_
        self._provider_code = code  # relayed as it came with a passed-through 4xx, even null
        self.provider_no_retry = False  # the provider's ``x-should-retry: false``

    @property
    def http_status(self) -> int:
        return self.provider_status if self._passed_through else 502

    @property
    def _passed_through(self) -> bool:
        status = self.provider_status
        return 400 <= status < 500 and status not in (401, 403)

    def payload(self) -> dict[str, Any]:
        body = super().payload()
        if self._type:
            body["error"]["type"] = self._type
        if self._passed_through:  # the provider's answer to the client: its code, not ours
            body["error"]["code"] = self._provider_code
        return body


class ProviderAnswerError(ProviderStatusError):
    """The provider answered 2xx, with an error in the body or not in the form asked for
    (a whole completion where a stream was asked): as a 502, never retried, since a 2xx
    may have been generated, and billed, already."""

    may_have_generated = True


class ProviderTimeoutError(ProviderError):
    status = 504
    default_code = "provider_timeout"
    may_have_generated = prompt_billed = True  # it went out: it may be generating still


class ProviderConnectTimeoutError(ProviderTimeoutError):
    default_code = "provider_connect_timeout"
    may_have_generated = prompt_billed = False  # nothing went out


class ProviderConnectionError(ProviderError):
    default_code = "provider_connection_error"


class ProviderCutOffError(ProviderConnectionError):
    """A non-streamed answer broke off mid-body: the provider had generated (and billed) it."""

    may_have_generated = prompt_billed = True


class ProviderEndedEarly(ProviderConnectionError):
    """A stream's body ended cleanly but without ``[DONE]``."""


class ProviderProtocolError(ProviderError):
    default_code = "provider_protocol_error"


class ProviderBrokenAnswerError(ProviderProtocolError):
    """An answer that broke before its head was whole, or one the gateway cannot read (a
    compressed body it did not ask for): begun, so perhaps generated (and paid for), and
    never asked for again."""

    may_have_generated = prompt_billed = True


class ProviderAnswerTooLargeError(ProviderProtocolError):
    """An answer, an event or a stream's journal past the gateway's bound: generated (and
    paid for) as far as it went, so never asked for again."""

    default_code = "provider_answer_too_large"
    may_have_generated = prompt_billed = True

    def __init__(self, message: str = "The provider's answer is larger than the gateway takes."):
        super().__init__(message)


def translate(exc: BaseException) -> SluiceError:
    """Map any exception raised while talking to the provider into the tree.

    The only place provider-client, asyncio and OS errors become client-visible errors; messages
    are ours, never the library's, so no URL, header or key can leak through them.
    """
    if isinstance(exc, SluiceError):
        return exc
    if isinstance(exc, ConnectTimeout):
        return ProviderConnectTimeoutError("The provider could not be reached in time.")
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return ProviderTimeoutError("The provider did not answer in time.")
    if isinstance(exc, TooLarge | EventTooLarge):
        return ProviderAnswerTooLargeError()
    if isinstance(exc, AnswerError):
        return ProviderBrokenAnswerError(str(exc))  # (our own words: see provider_client.py)
    if isinstance(exc, BodyError):
        return ProviderConnectionError("The provider closed the stream before it was complete.")
    if isinstance(exc, ConnectError):
        return ProviderConnectionError("The provider could not be reached.")
    if isinstance(exc, ClientError | OSError):
        return ProviderConnectionError("The connection to the provider failed.")
    if isinstance(exc, ValueError):
        return ProviderProtocolError("The provider sent a malformed response.")
    return InternalError("The gateway failed to handle this request.")
