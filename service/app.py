"""The composition root: ``create_app(settings)`` builds the whole application, without I/O."""

from __future__ import annotations

import weakref

from aiohttp import web

from .appkeys import LIFECYCLE, SERVED_MODELS, SETTINGS, STREAMS, WEBSOCKETS
from .checkpoint import MemoryCheckpointStore
from .handlers import chat, health, models, streams
from .lifecycle import Lifecycle
from .middleware import auth_middleware, error_middleware
from .registry import StreamRegistry
from .resources import keyring_ctx, on_shutdown, simulator_ctx, streams_ctx, upstream_ctx
from .settings import Settings


def create_app(settings: Settings) -> web.Application:
    """Build the gateway for ``settings``; sockets and tasks open in the cleanup contexts."""
    app = web.Application(
        middlewares=[error_middleware, auth_middleware],
        client_max_size=settings.server.max_body_bytes,
    )
    app[SETTINGS] = settings
    app[LIFECYCLE] = Lifecycle()
    app[SERVED_MODELS] = frozenset(settings.provider.models) or None
    app[STREAMS] = StreamRegistry(settings.streams, MemoryCheckpointStore())
    app[WEBSOCKETS] = weakref.WeakSet()

    app.cleanup_ctx.extend([keyring_ctx, simulator_ctx, upstream_ctx, streams_ctx])
    app.on_shutdown.append(on_shutdown)
    _add_routes(app.router)
    return app


def _add_routes(router: web.UrlDispatcher) -> None:
    router.add_get("/livez", health.livez)
    router.add_get("/readyz", health.readyz)
    router.add_post("/v1/chat/completions", chat.create_chat_completion)
    router.add_get("/v1/models", models.list_models)
    router.add_get("/v1/streams/{stream_id}", streams.get_stream)
    router.add_get("/v1/streams/{stream_id}/events", streams.stream_events)
    router.add_post("/v1/streams/{stream_id}/cancel", streams.cancel_stream)
