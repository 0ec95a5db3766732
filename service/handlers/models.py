"""``GET /v1/models``: the configured model list, or the provider's passed through."""

from __future__ import annotations

import orjson
from aiohttp import web

from ..appkeys import SERVED_MODELS, UPSTREAM
from ..errors import translate


async def list_models(request: web.Request) -> web.Response:
    served = request.app[SERVED_MODELS]
    if served is not None:
        data = [
            {"id": m, "object": "model", "created": 0, "owned_by": "sluice"} for m in sorted(served)
        ]
    else:
        try:
            data = await request.app[UPSTREAM].list_models()
        except Exception as exc:
            raise translate(exc) from exc
    return web.Response(
        body=orjson.dumps({"object": "list", "data": data}), content_type="application/json"
    )
