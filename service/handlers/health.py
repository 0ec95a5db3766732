"""Kubernetes probes: ``/livez`` (the loop answers) and ``/readyz`` (send me traffic)."""

from __future__ import annotations

from aiohttp import web

from ..appkeys import LIFECYCLE

_OK = b'{"status":"ok"}'


async def livez(request: web.Request) -> web.Response:
    return web.Response(body=_OK, content_type="application/json")


async def readyz(request: web.Request) -> web.Response:
    lifecycle = request.app[LIFECYCLE]
    if lifecycle.ready:
        return web.Response(body=_OK, content_type="application/json")
    state = b"draining" if lifecycle.draining else b"starting"
    return web.Response(
        body=b'{"status":"%s"}' % state, status=503, content_type="application/json"
    )
