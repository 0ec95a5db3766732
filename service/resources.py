"""Cleanup contexts: everything that owns a socket or a task, opened in dependency order
and closed in reverse. Also the shutdown sequence: stop being ready, drain, then close.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from . import tokens
from .appkeys import (
    GATE,
    KEYRING,
    LIFECYCLE,
    PROVIDER,
    REMOTE_STREAMS,
    RESILIENCE,
    RESPONDER,
    RESPONSE_CACHE,
    SETTINGS,
    STREAMS,
    TELEMETRY,
    UPSTREAM,
    WEBSOCKETS,
)
from .auth import KeyRing
from .budgets import month_start
from .errors import ServiceUnavailableError
from .ledger import SqliteLedger
from .pg_ledger import LedgerMisconfigured
from .resilience import ResilientProvider
from .serving import Responder
from .settings import ConfigError
from .simulator import Simulator, create_simulator_app
from .upstream import Upstream, provider_client

log = logging.getLogger(__name__)

PROVIDER_URL: web.AppKey[str] = web.AppKey("provider_url")
SHUTDOWN_CLOSE_TIMEOUT_S = 5.0
SPEND_RETRY_S = 2.0  # how often a replica started without its ledger tries again


async def tokens_ctx(app: web.Application) -> AsyncIterator[None]:
    """Load tiktoken's encodings from the packaged data, in a thread (once per process)."""
    await asyncio.to_thread(tokens.warm)
    yield


async def ledger_ctx(app: web.Application) -> AsyncIterator[None]:
    """The durable ledger (SQLite under the data dir); budgets resume from its totals.

    Closed after the streams have drained, so every finish hook's record is flushed.
    """
    gate, money = app[GATE], app[SETTINGS].money
    if money.data_dir is not None and app[SETTINGS].shared.database_url is None:  # else shared.py
        path = money.data_dir / "ledger.sqlite3"
        try:
            gate.ledger = await asyncio.to_thread(SqliteLedger, path)
        except (OSError, sqlite3.Error) as exc:  # not a directory, read-only, ...
            reason = getattr(exc, "strerror", None) or str(exc)
            message = f"SLUICE_DATA_DIR: cannot keep the ledger in {path}: {reason}"
            raise ConfigError(message) from None

    loading: asyncio.Task[None] | None = None
    try:
        gate.budgets.load(await gate.ledger.spend_since(month_start(gate.clock())))
    except LedgerMisconfigured as exc:  # waiting will not fix the URL or the password
        raise ConfigError(f"SLUICE_DATABASE_URL: PostgreSQL refused it: {exc.reason}") from None
    except ServiceUnavailableError:  # PostgreSQL away at start: not ready until it is back
        log.warning("ledger unavailable at start; not ready until budgets have its spend")
        app[LIFECYCLE].waiting.add("ledger")
        gate.spend_loaded = False
        loading = asyncio.create_task(_load_spend_later(app), name="ledger-spend")
    yield
    if loading is not None:
        loading.cancel()
        await asyncio.gather(loading, return_exceptions=True)
    await gate.ledger.close()


async def _load_spend_later(app: web.Application) -> None:
    """Retry loading the month's spend until the ledger answers, then become ready."""
    gate = app[GATE]
    while True:
        await asyncio.sleep(SPEND_RETRY_S)
        try:
            rows = await gate.ledger.spend_since(month_start(gate.clock()))
        except ServiceUnavailableError:
            continue
        gate.budgets.load(rows)
        gate.spend_loaded = True
        app[LIFECYCLE].waiting.discard("ledger")
        log.info("ledger reachable: budgets loaded, ready")
        return


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
    simulator = create_simulator_app(Simulator(prompt_tokens=tokens.count_body))
    runner = web.AppRunner(simulator, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    app[PROVIDER_URL] = f"http://{host}:{port}/v1"
    log.info("simulated provider listening on %s", app[PROVIDER_URL])
    yield
    await runner.cleanup()


async def upstream_ctx(app: web.Application) -> AsyncIterator[None]:
    """One provider client, with keep-alive, shared by every provider call."""
    try:
        client = provider_client(app[SETTINGS].provider, app[PROVIDER_URL])
    except ValueError as exc:  # a line break in a credential, say: never sent, so say so
        raise ConfigError(f"the provider settings cannot be sent: {exc}") from None
    app[UPSTREAM] = Upstream(client, app[SETTINGS].provider)
    yield
    client.close()


async def responder_ctx(app: web.Application) -> AsyncIterator[None]:
    """Retries, breakers and fallbacks around the upstream; the cache in front of them."""
    settings = app[SETTINGS]
    app[PROVIDER] = ResilientProvider(app[UPSTREAM], app[RESILIENCE], app[TELEMETRY])
    responder = Responder(
        app[PROVIDER],
        app[RESPONSE_CACHE],
        ttl_s=settings.cache.ttl_s,
        degrade_to_cache=settings.resilience.degrade_to_cache,
    )
    responder.under_pressure = app[GATE].under_pressure  # past the budget warning: cheaper
    responder.settle_ended = app[STREAMS].retire_now  # a miss just ended may be the answer
    app[GATE].has_cached = responder.has_cached  # past the budget: a cached answer, if any
    app[RESPONDER] = responder
    app[STREAMS].finish_hooks.append(responder.fill)
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


async def drain(app: web.Application) -> None:
    """Refuse readiness and new streams; let running ones finish for the drain window."""
    app[LIFECYCLE].draining = True
    remote = app.get(REMOTE_STREAMS)
    if remote is not None:  # readers of other replicas' streams: nothing to wait for here
        remote.leaving = True
    await app[STREAMS].drain(app[SETTINGS].server.drain_s)


async def on_shutdown(app: web.Application) -> None:
    """Shutdown: drain (at once if SIGTERM already drained while listening), close sockets."""
    await drain(app)
    # All at once: a dead peer holds its close for the whole timeout.
    websockets = app[WEBSOCKETS]
    await asyncio.gather(*(_going_away(ws) for ws in list(websockets)))


async def _going_away(ws: web.WebSocketResponse) -> None:
    with contextlib.suppress(Exception):
        async with asyncio.timeout(SHUTDOWN_CLOSE_TIMEOUT_S):
            await ws.close(code=aiohttp.WSCloseCode.GOING_AWAY, message=b"server shutdown")
