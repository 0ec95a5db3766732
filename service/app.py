"""The composition root: ``create_app(settings)`` builds the whole application, without I/O."""

from __future__ import annotations

import weakref

from aiohttp import web

from . import tokens
from .admission import Gate
from .appkeys import (
    GATE,
    LIFECYCLE,
    RESILIENCE,
    RESPONSE_CACHE,
    SERVED_MODELS,
    SETTINGS,
    STREAMS,
    TELEMETRY,
    WEBSOCKETS,
)
from .cache import MemoryResponseCache
from .checkpoint import MemoryCheckpointStore
from .credentials import ProviderSecrets
from .handlers import chat, health, models, streams, usage, ws
from .lifecycle import Lifecycle
from .middleware import add_admission_headers, auth_middleware, error_middleware
from .registry import StreamRegistry
from .resilience import Resilience
from .resources import (
    keyring_ctx,
    ledger_ctx,
    on_shutdown,
    responder_ctx,
    simulator_ctx,
    streams_ctx,
    tokens_ctx,
    upstream_ctx,
)
from .settings import Settings
from .shared import install_shared_state
from .telemetry import Telemetry
from .telemetry import http as telemetry_http
from .telemetry.cost import ledger_cost


def create_app(settings: Settings) -> web.Application:
    """Build the gateway for ``settings``; sockets and tasks open in the cleanup contexts."""
    telemetry = Telemetry(settings)
    app = web.Application(
        middlewares=[
            error_middleware,
            telemetry_http.telemetry_middleware(telemetry),  # inside: sees the error raised
            auth_middleware,
        ],
        client_max_size=settings.server.max_body_bytes,
    )
    app[SETTINGS] = settings
    app[TELEMETRY] = telemetry
    app.on_response_prepare.append(telemetry_http.on_response_prepare)
    app[LIFECYCLE] = Lifecycle()
    app[SERVED_MODELS] = frozenset(settings.provider.models) or None
    app[STREAMS] = StreamRegistry(
        settings.streams,
        MemoryCheckpointStore(),
        count_text=tokens.count_text,
        count_prompt=tokens.count_chat,
    )
    secrets = ProviderSecrets.of(settings.provider)
    if secrets.in_answers:
        app[STREAMS].scrub_text = secrets.text
    app[GATE] = Gate(settings.limits, settings.money, fallbacks=settings.resilience.fallbacks)
    app[STREAMS].finish_hooks.append(app[GATE].on_finish)  # settle + one ledger row
    app[GATE].grace_left = app[STREAMS].grace_left  # a stream cap's Retry-After
    app[GATE].settle_ended = app[STREAMS].retire_now  # before a refusal they might lift
    app[STREAMS].finish_hooks.append(telemetry.stream_finished)  # after the ledger: its cost
    app[STREAMS].observers.append(telemetry.stream_event)
    telemetry.cost_of = ledger_cost(app[GATE])
    app.on_response_prepare.append(add_admission_headers)
    app[WEBSOCKETS] = weakref.WeakSet()
    app[RESILIENCE] = Resilience.from_settings(settings)
    app[RESPONSE_CACHE] = (
        MemoryResponseCache(max_bytes=settings.cache.max_bytes) if settings.cache.enabled else None
    )

    app.cleanup_ctx.extend(
        [
            telemetry_http.telemetry_ctx,  # first, so it flushes last
            telemetry_http.metrics_port_ctx,
            tokens_ctx,
            ledger_ctx,
            keyring_ctx,
            simulator_ctx,
            upstream_ctx,
            responder_ctx,
            streams_ctx,
        ]
    )
    app.on_shutdown.append(on_shutdown)
    install_shared_state(app)  # after every in-process store exists: it wraps them
    _add_routes(app.router)
    if settings.telemetry.metrics_port is None:
        app.router.add_get(telemetry_http.METRICS_PATH, telemetry_http.metrics)
    return app


def _add_routes(router: web.UrlDispatcher) -> None:
    router.add_get("/livez", health.livez)
    router.add_get("/readyz", health.readyz)
    router.add_post("/v1/chat/completions", chat.create_chat_completion)
    router.add_get("/v1/models", models.list_models)
    router.add_get("/v1/models/{model:.+}", models.get_model)  # vLLM names have slashes
    router.add_get("/v1/usage", usage.get_usage)
    router.add_get("/v1/streams/{stream_id}", streams.get_stream)
    # No HEAD for these: it would attach a reader (holding off the grace window) that gets
    # no body, and aiohttp would send one anyway.
    router.add_get("/v1/streams/{stream_id}/events", streams.stream_events, allow_head=False)
    router.add_post("/v1/streams/{stream_id}/cancel", streams.cancel_stream)
    router.add_get("/v1/ws", ws.websocket, allow_head=False)
