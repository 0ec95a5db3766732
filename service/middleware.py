"""The request pipeline's two middlewares: OpenAI-shaped errors, then client auth.

``error_middleware`` is the one place an exception becomes a response: a ``SluiceError``
renders itself; aiohttp's HTTP exceptions (404, 405, 413, ...) are re-shaped; anything else
is logged with its traceback and answered with a bare 500, never the traceback.
"""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.typedefs import Handler

from .appkeys import ADMITTED, KEYRING, PRINCIPAL
from .errors import (
    AuthenticationError,
    HTTPStatusError,
    InternalError,
    InvalidRequestError,
    MethodNotAllowedError,
    NotFoundError,
    PayloadTooLargeError,
    SluiceError,
)

log = logging.getLogger(__name__)

PUBLIC_PATHS = frozenset({"/livez", "/readyz"})


def error_response(error: SluiceError) -> web.Response:
    headers = error.headers
    if not error.retry_helps:
        headers = {**headers, "x-should-retry": "false"}
    return web.Response(
        body=error.body(),
        status=error.http_status,
        content_type="application/json",
        headers=headers,
    )


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except SluiceError as error:
        return error_response(error)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(_from_http_exception(request, exc))
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(
            InternalError("The server had an error while processing your request.")
        )


def _from_http_exception(request: web.Request, exc: web.HTTPException) -> SluiceError:
    if exc.status == 404:
        return NotFoundError(f"Unknown request URL: {request.method} {request.path}.")
    if exc.status == 405:
        allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return MethodNotAllowedError(
            f"Method {request.method} is not allowed on {request.path}.", headers=allow
        )
    if exc.status == 413:
        return PayloadTooLargeError("The request body is too large.")
    if exc.status == 400:
        return InvalidRequestError(exc.reason or "The request is invalid.")
    return HTTPStatusError(exc.reason or "The request could not be handled.", status=exc.status)


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Authenticate every matched route except the public health checks."""
    if request.path not in PUBLIC_PATHS and request.match_info.http_exception is None:
        given = request.headers.getall("Authorization", ())
        if len(given) > 1:  # not a list header: which one a proxy checked is unknowable
            raise AuthenticationError("Send one Authorization header, not several.")
        request[PRINCIPAL] = request.app[KEYRING].authenticate(given[0] if given else None)
    return await handler(request)


async def add_admission_headers(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: an admitted request's ``x-ratelimit-*`` and budget headers."""
    admission = request.get(ADMITTED)
    if admission is not None:
        for name, value in admission.headers.items():
            response.headers.setdefault(name, value)
