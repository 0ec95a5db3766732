"""Scale-out wiring: shared state in Redis, the ledger in PostgreSQL, both opt-in.

``install_shared_state(app)`` runs at the end of ``create_app`` (no I/O). With
``SLUICE_DATABASE_URL`` the ledger is ``PostgresLedger``. With ``SLUICE_REDIS_URL`` each
in-process store is wrapped by its Redis implementation, the in-process one staying in
front as the local tier and the fail-open fallback: checkpoints, the response cache, rate
limits and stream caps, budgets, and the stream journals (mirrored, so any replica can
resume or cancel a stream). Without either, nothing changes: one process, no
infrastructure. The shared-state metrics are registered on the telemetry registry.

``shared_ctx`` pings Redis at start (logged, never fatal), runs the control-channel
listener, and at the very end waits for the journal mirrors and closes the connections.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable

from aiohttp import web
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from .appkeys import (
    GATE,
    JOURNAL_MIRROR,
    PRINCIPAL,
    REDIS,
    REMOTE_STREAMS,
    RESPONSE_CACHE,
    SETTINGS,
    STREAMS,
    TELEMETRY,
)
from .checkpoint import Checkpoint
from .limits import MemoryLimiter
from .pg_ledger import PostgresLedger
from .redis_budgets import RedisBudgets
from .redis_cache import RedisResponseCache
from .redis_checkpoints import SharedCheckpointStore
from .redis_journal import FOLLOWER_CONNECTIONS, LISTEN_POLL_S, JournalMirror, RemoteStreams
from .redis_limits import RedisLimiter
from .redisgate import RedisGate, RedisUnavailable
from .settings import Settings
from .shared_metrics import LedgerCollector, SharedStateCollector
from .stream import Stream, check_resume_point

log = logging.getLogger(__name__)


def install_shared_state(app: web.Application) -> None:
    """Put the shared stores in place of the in-process ones when Redis is configured."""
    settings = app[SETTINGS]
    database_url = settings.shared.database_url
    ledger = None
    if database_url is not None:  # ledger_ctx then leaves it in place and closes it last
        ledger = PostgresLedger(
            database_url.reveal(),
            buffer=settings.shared.ledger_buffer,
            batch=settings.shared.ledger_batch,
        )
        app[GATE].ledger = ledger
    gate = RedisGate.from_settings(settings.shared)
    app[REDIS] = gate
    app[REMOTE_STREAMS] = None
    app[JOURNAL_MIRROR] = None
    metrics = app[TELEMETRY].metrics.registry
    metrics.register(LedgerCollector(app[GATE]))
    if gate is not None or ledger is not None:
        metrics.register(SharedStateCollector(gate, ledger))
    if gate is None:
        return
    registry = app[STREAMS]
    registry.store = SharedCheckpointStore(gate, registry.store)
    registry.batch_s = 0.0  # other replicas cannot ask for a settlement (``registry.py``)
    admission = app[GATE]
    limiter = admission.limiter
    if isinstance(limiter, MemoryLimiter):
        limiter = admission.limiter = RedisLimiter(gate, limiter)
    budgets = admission.budgets = RedisBudgets(
        gate,
        admission.budgets.limits,
        soft_fraction=settings.money.soft_fraction,
        clock=admission.clock,  # periods; holds expire by Redis's own clock
    )
    cache = app[RESPONSE_CACHE]
    if cache is not None:
        app[RESPONSE_CACHE] = RedisResponseCache(gate, cache)
    mirror = JournalMirror(
        gate, registry, settings.streams.checkpoint_ttl_s, settings.streams.keepalive_s
    )
    registry.launch_hooks.append(mirror.launched)
    app[JOURNAL_MIRROR] = mirror

    async def store_posted(stream: Stream, checkpoint: Checkpoint) -> None:
        await gate.flush()  # the checkpoint, unless the settlement's round trip took it

    registry.finish_hooks.append(store_posted)  # before the journal closes: readers then
    registry.finish_hooks.append(mirror.finished)  # find the checkpoint in Redis
    follower = _blocking_client(settings, FOLLOWER_CONNECTIONS)  # remote readers' XREADs
    control = _blocking_client(settings, 2)  # the control channel's, never short of one
    app[REMOTE_STREAMS] = RemoteStreams(
        gate, follower, registry.store, settings.streams.keepalive_s
    )

    async def shared_ctx(app: web.Application) -> AsyncIterator[None]:
        try:
            await gate.run(lambda r: r.ping())
        except RedisUnavailable as exc:
            log.warning("redis not reachable at start (%s); policy: fail-%s", exc, gate.failure)
        listener = asyncio.create_task(mirror.listen(control), name="redis-control")
        yield
        mirror.stop_listening()
        listener.cancel()  # at once, usually; else the stop flag within one poll
        await asyncio.wait({listener}, timeout=2 * LISTEN_POLL_S)
        await mirror.close()
        await gate.undone()
        await budgets.flush()  # settlements Redis missed, if it answers now
        if isinstance(limiter, RedisLimiter):
            await limiter.free_missed()  # and the stream slots it missed
        await follower.aclose()
        await control.aclose()
        await gate.aclose()

    app.cleanup_ctx.append(shared_ctx)


def _blocking_client(settings: Settings, connections: int) -> Redis:
    """A client for blocking reads and pub/sub: no socket read timeout."""
    assert settings.shared.redis_url is not None
    return Redis.from_url(
        settings.shared.redis_url.reveal(),
        socket_timeout=None,  # said outright: redis-py 8 would cut an XREAD BLOCK at 5 s
        socket_connect_timeout=settings.shared.redis_timeout_s,
        retry=Retry(NoBackoff(), 0),
        max_connections=connections,
    )


async def remote_events(
    request: web.Request, stream_id: str, last_event_id: Callable[[], int]
) -> web.StreamResponse | None:
    """Serve a stream another replica generates, if Redis knows it and the caller owns it
    (``last_event_id`` is read only then: the answer for a stream that is not the caller's
    is the same 404 whatever else the request gets wrong)."""
    remote = request.app[REMOTE_STREAMS]
    if remote is None or not await _owns(request, remote, stream_id):
        return None
    after = check_resume_point(await remote.last_seq(stream_id), last_event_id())
    owner = (request[PRINCIPAL].user_id, request[PRINCIPAL].tenant)
    remote.take_reader(owner)  # (a refusal is no resume)
    request.app[TELEMETRY].stream_resumed(stream_id, after)
    try:
        return await remote.serve(request, stream_id, after)
    finally:
        remote.release_reader(owner)


async def remote_running(request: web.Request, stream_id: str) -> Stream | None:
    """A stream another replica is generating (no checkpoint is stored until it ends), as
    far as its journal goes, to take a checkpoint of here; None when Redis does not have it
    running."""
    remote = request.app[REMOTE_STREAMS]
    owner = (request[PRINCIPAL].user_id, request[PRINCIPAL].tenant)
    return await remote.running(stream_id, owner) if remote is not None else None


async def remote_cancel(request: web.Request, stream_id: str) -> Checkpoint | None:
    """Cancel a stream another replica generates; its checkpoint, or None when unknown."""
    remote = request.app[REMOTE_STREAMS]
    if remote is None or not await _owns(request, remote, stream_id):
        return None
    return await remote.cancel(stream_id)


async def _owns(request: web.Request, remote: RemoteStreams, stream_id: str) -> bool:
    principal = request[PRINCIPAL]
    return await remote.owner_of(stream_id) == (principal.user_id, principal.tenant)


def shared_health(app: web.Application) -> dict[str, object] | None:
    """What ``/readyz`` reports about Redis (None when shared state is off)."""
    gate = app[REDIS]
    return None if gate is None else gate.health()
