"""``GET /v1/models`` and ``GET /v1/models/{model}``: the configured model list, or the
provider's passed through."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from ..appkeys import SERVED_MODELS, UPSTREAM
from ..errors import NotFoundError, translate


async def list_models(request: web.Request) -> web.Response:
    data = await _models(request)
    return web.Response(
        body=orjson.dumps({"object": "list", "data": data}), content_type="application/json"
    )


async def get_model(request: web.Request) -> web.Response:
    """One model, as the SDKs' ``models.retrieve`` asks for it."""
    name = request.match_info["model"]
    for model in await _models(request):
        if model.get("id") == name:
            return web.Response(body=orjson.dumps(model), content_type="application/json")
    raise NotFoundError(
        f"The model `{name}` does not exist or you do not have access to it.",
        param="model",
        code="model_not_found",
    )


async def _models(request: web.Request) -> list[dict[str, Any]]:
    served = request.app[SERVED_MODELS]
    if served is not None:
        return [
            {"id": m, "object": "model", "created": 0, "owned_by": "sluice"} for m in sorted(served)
        ]
    try:
        return await request.app[UPSTREAM].list_models()
    except Exception as exc:
        raise translate(exc) from exc
