"""Every object the application shares, behind typed keys, so the graph fits on one screen.

Pure objects are set in ``create_app``; those owning sockets or tasks are set by the
cleanup contexts in ``resources.py``.
"""

from __future__ import annotations

import weakref

from aiohttp import web

from .admission import Admission, Gate
from .auth import KeyRing, Principal
from .cache import ResponseCache
from .lifecycle import Lifecycle
from .redis_journal import JournalMirror, RemoteStreams
from .redisgate import RedisGate
from .registry import StreamRegistry
from .resilience import Resilience, ResilientProvider
from .serving import Responder
from .settings import Settings
from .telemetry import Telemetry
from .telemetry.records import RequestTrace
from .upstream import Upstream

SETTINGS: web.AppKey[Settings] = web.AppKey("settings")
KEYRING: web.AppKey[KeyRing] = web.AppKey("keyring")
LIFECYCLE: web.AppKey[Lifecycle] = web.AppKey("lifecycle")
STREAMS: web.AppKey[StreamRegistry] = web.AppKey("streams")
UPSTREAM: web.AppKey[Upstream] = web.AppKey("upstream")
SERVED_MODELS: web.AppKey[frozenset[str] | None] = web.AppKey("served_models")
WEBSOCKETS: web.AppKey[weakref.WeakSet[web.WebSocketResponse]] = web.AppKey("websockets")
RESILIENCE: web.AppKey[Resilience] = web.AppKey("resilience")
RESPONSE_CACHE: web.AppKey[ResponseCache | None] = web.AppKey("response_cache")
PROVIDER: web.AppKey[ResilientProvider] = web.AppKey("provider")
RESPONDER: web.AppKey[Responder] = web.AppKey("responder")

GATE: web.AppKey[Gate] = web.AppKey("gate")  # limits, budgets, prices, ledger

REDIS: web.AppKey[RedisGate | None] = web.AppKey("redis")  # None: no shared state
REMOTE_STREAMS: web.AppKey[RemoteStreams | None] = web.AppKey("remote_streams")
JOURNAL_MIRROR: web.AppKey[JournalMirror | None] = web.AppKey("journal_mirror")
TELEMETRY: web.AppKey[Telemetry] = web.AppKey("telemetry")  # tracer, metrics, access log

PRINCIPAL: web.RequestKey[Principal] = web.RequestKey("principal")
ADMITTED: web.RequestKey[Admission] = web.RequestKey("admitted")
REQUEST_TRACE: web.RequestKey[RequestTrace] = web.RequestKey("request_trace")
