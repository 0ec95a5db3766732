"""Kubernetes probes: ``/livez`` (the loop answers) and ``/readyz`` (send me traffic)."""

from __future__ import annotations

import orjson
from aiohttp import web

from ..appkeys import LIFECYCLE
from ..shared import shared_health

_OK = b'{"status":"ok"}'


async def livez(request: web.Request) -> web.Response:
    return web.Response(body=_OK, content_type="application/json")


async def readyz(request: web.Request) -> web.Response:
    lifecycle = request.app[LIFECYCLE]
    shared = shared_health(request.app)  # reported, never fatal: every replica shares Redis
    if lifecycle.ready and shared is not None:
        body = orjson.dumps({"status": "ok", "redis": shared})
        return web.Response(body=body, content_type="application/json")
    if lifecycle.ready:
        return web.Response(body=_OK, content_type="application/json")
    state = "draining" if lifecycle.draining else "starting"
    report: dict[str, object] = {"status": state}
    if lifecycle.waiting and not lifecycle.draining:
        report["waiting_for"] = sorted(lifecycle.waiting)
    return web.Response(body=orjson.dumps(report), status=503, content_type="application/json")
