"""Cleanup contexts: everything that owns a socket or a task, opened in dependency order
and closed in reverse. Also the shutdown sequence: stop being ready, drain, then close.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from .appkeys import KEYRING, LIFECYCLE, SETTINGS, STREAMS, UPSTREAM, WEBSOCKETS
from .auth import KeyRing
from .simulator import create_simulator_app
from .upstream import Upstream

log = logging.getLogger(__name__)

PROVIDER_URL: web.AppKey[str] = web.AppKey("provider_url")
SHUTDOWN_CLOSE_TIMEOUT_S = 5.0


async def keyring_ctx(app: web.Application) -> AsyncIterator[None]:
    app[KEYRING] = KeyRing.from_settings(app[SETTINGS].auth)
    yield


async def simulator_ctx(app: web.Application) -> AsyncIterator[None]:
    """In simulated mode with no URL, serve the built-in provider on a loopback port."""
    provider = app[SETTINGS].provider
    if provider.base_url is not None:
        app[PROVIDER_URL] = provider.base_url
        yield
        return
    runner = web.AppRunner(create_simulator_app(), handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    app[PROVIDER_URL] = f"http://{host}:{port}/v1"
    log.info("simulated provider listening on %s", app[PROVIDER_URL])
    yield
    await runner.cleanup()


async def upstream_ctx(app: web.Application) -> AsyncIterator[None]:
    """One client session, with keep-alive, shared by every provider call."""
    provider = app[SETTINGS].provider
    timeout = aiohttp.ClientTimeout(
        total=None, connect=provider.connect_timeout_s, sock_connect=provider.connect_timeout_s
    )
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=30)
    async with aiohttp.ClientSession(
        timeout=timeout, connector=connector, auto_decompress=False, raise_for_status=False
    ) as session:
        app[UPSTREAM] = Upstream(session, provider, app[PROVIDER_URL])
        yield


async def streams_ctx(app: web.Application) -> AsyncIterator[None]:
    """The keepalive/expiry tick; readiness turns on once everything before is up."""
    registry = app[STREAMS]
    interval = app[SETTINGS].streams.keepalive_s
    ticker = asyncio.create_task(_tick_forever(registry.tick, interval), name="stream-ticker")
    app[LIFECYCLE].started = True
    yield
    ticker.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await ticker


async def _tick_forever(tick: object, interval: float) -> None:
    assert callable(tick)
    while True:
        await asyncio.sleep(interval)
        tick()


async def on_shutdown(app: web.Application) -> None:
    """SIGTERM: refuse readiness, let streams finish for the drain window, end the rest."""
    app[LIFECYCLE].draining = True
    await app[STREAMS].drain(app[SETTINGS].server.drain_s)
    websockets = app[WEBSOCKETS]
    for ws in list(websockets):
        with contextlib.suppress(Exception):
            async with asyncio.timeout(SHUTDOWN_CLOSE_TIMEOUT_S):
                await ws.close(code=aiohttp.WSCloseCode.GOING_AWAY, message=b"server shutdown")
