"""Every object the application shares, behind typed keys, so the graph fits on one screen.

Pure objects are set in ``create_app``; those owning sockets or tasks are set by the
cleanup contexts in ``resources.py``.
"""

from __future__ import annotations

import weakref

from aiohttp import web

from .auth import KeyRing, Principal
from .lifecycle import Lifecycle
from .registry import StreamRegistry
from .settings import Settings
from .upstream import Upstream

SETTINGS: web.AppKey[Settings] = web.AppKey("settings")
KEYRING: web.AppKey[KeyRing] = web.AppKey("keyring")
LIFECYCLE: web.AppKey[Lifecycle] = web.AppKey("lifecycle")
STREAMS: web.AppKey[StreamRegistry] = web.AppKey("streams")
UPSTREAM: web.AppKey[Upstream] = web.AppKey("upstream")
SERVED_MODELS: web.AppKey[frozenset[str] | None] = web.AppKey("served_models")
WEBSOCKETS: web.AppKey[weakref.WeakSet[web.WebSocketResponse]] = web.AppKey("websockets")

PRINCIPAL: web.RequestKey[Principal] = web.RequestKey("principal")
