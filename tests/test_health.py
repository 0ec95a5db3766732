"""Kubernetes probes (issue 2, point 8): ``/livez`` always, ``/readyz`` only when serving.

Both are public (no key). ``/readyz`` is 503 until the cleanup contexts are up and again
once draining begins; the draining case over a real shutdown is in ``test_shutdown.py``.
"""

from __future__ import annotations

import orjson
from aiohttp.test_utils import make_mocked_request

from service.app import create_app
from service.appkeys import LIFECYCLE
from service.handlers import health
from service.settings import Settings
from tests.conftest import AUTH, GatewayFactory, chat_body


async def test_livez(gateway: GatewayFactory) -> None:
    """/livez: 200 {"status": "ok"} without a key."""
    client = await gateway()
    response = await client.get("/livez")
    assert response.status == 200
    assert await response.json() == {"status": "ok"}


async def test_readyz_when_started(gateway: GatewayFactory) -> None:
    """/readyz: 200 once every cleanup context is up."""
    client = await gateway()
    response = await client.get("/readyz")
    assert response.status == 200
    assert (await response.json())["status"] == "ok"


async def test_readyz_before_startup(settings: Settings) -> None:
    """/readyz: 503 "starting" for an app whose resources are not up yet.

    aiohttp only listens after startup, so this is the state a probe sees if an app is ever
    served before its contexts finish; checked on the handler itself.
    """
    app = create_app(settings)
    response = await health.readyz(make_mocked_request("GET", "/readyz", app=app))
    assert response.status == 503
    assert response.body is not None
    assert orjson.loads(bytes(response.body)) == {"status": "starting"}  # type: ignore[arg-type]


async def test_readyz_while_draining_livez_still_ok(gateway: GatewayFactory) -> None:
    """Draining: /readyz 503 "draining" while /livez stays 200 (do not restart, do not route)."""
    client = await gateway()
    client.app[LIFECYCLE].draining = True
    try:
        ready = await client.get("/readyz")
        assert ready.status == 503
        assert await ready.json() == {"status": "draining"}
        assert (await client.get("/livez")).status == 200
        refused = await client.post("/v1/chat/completions", json=chat_body("hi"), headers=AUTH)
        assert refused.status == 503  # a new stream would outlive the drain: elsewhere, soon
        assert refused.headers["Retry-After"] == "1"
    finally:
        client.app[LIFECYCLE].draining = False
