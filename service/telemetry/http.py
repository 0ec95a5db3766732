"""Telemetry at the HTTP edge: the SERVER-span middleware, response headers, ``/metrics``,
and the two cleanup contexts (the tracer provider; the optional metrics port).

The middleware sits inside ``error_middleware`` so it sees the error a request failed with
(its ``code`` names a rejection's reason); the headers are set in ``on_response_prepare``,
which every response passes through, error responses and event streams included:

    X-Sluice-Overhead-Ms   Sluice's own time until the headers (see ``response_started``)
    X-Request-Id           the client's, when it sent a sane one, else ours
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from ..appkeys import PRINCIPAL, REQUEST_TRACE, SETTINGS, TELEMETRY
from ..errors import PermissionDeniedError, SluiceError
from ..settings import ConfigError
from .core import Telemetry
from .metrics import CONTENT_TYPE
from .otlp_metrics import build_metrics_pusher
from .tracing import build_tracer_provider

OVERHEAD_HEADER = "X-Sluice-Overhead-Ms"
REQUEST_ID_HEADER = "X-Request-Id"
METRICS_PATH = "/metrics"
METRICS_URL: web.AppKey[str] = web.AppKey("metrics_url")  # set when served on its own port

_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def telemetry_middleware(telemetry: Telemetry) -> Middleware:
    """A SERVER span per request (continuing a W3C ``traceparent``), timing and counts."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        route = _route(request)
        rt = telemetry.begin_request(
            request.method, route, request.path, request.headers, _request_id(request)
        )
        # Only the socket route upgrades: a stray Upgrade header on a POST changes nothing.
        upgrade = request.headers.get("Upgrade", "").lower() == "websocket"
        rt.websocket = upgrade and route == WEBSOCKET_ROUTE
        request[REQUEST_TRACE] = rt
        try:
            with telemetry.serving(rt):
                response = await handler(request)
        except SluiceError as error:
            telemetry.request_failed(rt, error.http_status, error)
            raise
        except web.HTTPException as exc:
            rt.status = exc.status
            raise
        except asyncio.CancelledError:
            rt.status, rt.outcome = 499, "client_gone"  # nginx's code for "client closed"
            raise
        except Exception as exc:
            telemetry.request_failed(rt, 500, exc)
            raise
        else:
            rt.status = response.status
            return response
        finally:
            principal = request.get(PRINCIPAL)
            telemetry.end_request(
                rt,
                user_id=principal.user_id if principal else None,
                tenant=principal.tenant if principal else None,
            )

    return middleware


async def on_response_prepare(request: web.Request, response: web.StreamResponse) -> None:
    """Stamp every response with Sluice's overhead so far and the request id."""
    rt = request.get(REQUEST_TRACE)
    if rt is None:
        return
    event_stream = response.content_type == "text/event-stream"
    overhead = request.app[TELEMETRY].response_started(rt, event_stream=event_stream)
    response.headers[OVERHEAD_HEADER] = f"{overhead * 1000:.3f}"
    response.headers.setdefault(REQUEST_ID_HEADER, rt.id)


async def metrics(request: web.Request) -> web.Response:
    """``GET /metrics`` on the main port: Prometheus text, for admin keys only."""
    if not request[PRINCIPAL].admin:
        raise PermissionDeniedError("Metrics are only available to admin keys.")
    return _metrics_response(request.app[TELEMETRY])


async def telemetry_ctx(app: web.Application) -> AsyncIterator[None]:
    """Registered first, so it closes last: spans end and flush, and metrics are pushed a
    last time, after the streams drained."""
    telemetry = app[TELEMETRY]
    if telemetry.tracer_provider is None:
        provider = build_tracer_provider(telemetry.settings)
        if provider is not None:
            telemetry.install(provider)
    if telemetry.metrics_pusher is None:
        telemetry.metrics_pusher = build_metrics_pusher(
            telemetry.settings, telemetry.metrics.registry, before=telemetry.later.run
        )
        if telemetry.metrics_pusher is not None:
            telemetry.metrics_pusher.start()
    yield
    await telemetry.shutdown()


async def metrics_port_ctx(app: web.Application) -> AsyncIterator[None]:
    """With ``SLUICE_METRICS_PORT``, serve ``/metrics`` there, unauthenticated (0: any port)."""
    settings = app[SETTINGS]
    port = settings.telemetry.metrics_port
    if port is None:
        yield
        return
    telemetry = app[TELEMETRY]

    async def serve(request: web.Request) -> web.Response:
        started = time.perf_counter()
        response = _metrics_response(telemetry)
        # This listener has no telemetry middleware; its whole time is Sluice's own.
        response.headers[OVERHEAD_HEADER] = f"{(time.perf_counter() - started) * 1000:.3f}"
        return response

    metrics_app = web.Application()
    metrics_app.router.add_get(METRICS_PATH, serve)
    runner = web.AppRunner(metrics_app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, settings.server.host, port)
    try:
        await site.start()
    except OSError as exc:  # in use, most likely: one clear line, not a traceback
        await runner.cleanup()
        raise ConfigError(
            f"SLUICE_METRICS_PORT: cannot listen on {settings.server.host}:{port}: "
            f"{exc.strerror or exc}"
        ) from None
    host, bound = runner.addresses[0][:2]
    app[METRICS_URL] = f"http://{host}:{bound}{METRICS_PATH}"
    yield
    await runner.cleanup()


def _metrics_response(telemetry: Telemetry) -> web.Response:
    telemetry.later.run()  # the requests that ended in the last batch period count too
    response = web.Response(body=telemetry.metrics.render())
    response.headers["Content-Type"] = CONTENT_TYPE
    return response


WEBSOCKET_ROUTE = "/v1/ws"  # app.py serves ``handlers.ws.websocket`` there


def _route(request: web.Request) -> str:
    """The matched route's template (``/v1/streams/{stream_id}``): low-cardinality."""
    if request.match_info.http_exception is not None:
        return "unmatched"
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


def _request_id(request: web.Request) -> str | None:
    value = request.headers.get(REQUEST_ID_HEADER)
    return value if value is not None and _SANE_REQUEST_ID.fullmatch(value) else None
