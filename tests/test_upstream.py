"""``service.upstream``: what the provider connection asks for, against real sockets: a
provider that compresses whenever the client allows it, and the organization and project.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web
from aiohttp.test_utils import TestServer

from service.simulator import Simulator, create_simulator_app
from service.tokens import count_body
from tests.conftest import AUTH, GatewayFactory, chat_body, with_provider
from tests.wire import sse_data

URL = "/v1/chat/completions"


async def _compressing_provider(aiohttp_server: Any, seen: list[str]) -> TestServer:
    """The simulator, compressing every answer with whatever encoding the client accepts."""
    app = create_simulator_app(Simulator(prompt_tokens=count_body))

    async def compress(request: web.Request, response: web.StreamResponse) -> None:
        seen.append(request.headers.get("Accept-Encoding", ""))
        response.enable_compression()

    app.on_response_prepare.append(compress)
    server: TestServer = await aiohttp_server(app)
    return server


async def test_provider_answers_are_not_compressed(
    gateway: GatewayFactory, settings: Any, aiohttp_server: Any
) -> None:
    """The gateway parses and relays the provider's bytes: it asks for them uncompressed."""
    seen: list[str] = []
    provider = await _compressing_provider(aiohttp_server, seen)
    client = await gateway(with_provider(settings, base_url=str(provider.make_url("/v1"))))

    plain = await client.post(URL, json=chat_body("[sim chunks=5]", stream=False), headers=AUTH)
    assert plain.status == 200
    assert (await plain.json())["usage"]["completion_tokens"] == 5

    streamed = await client.post(URL, json=chat_body("[sim chunks=5]"), headers=AUTH)
    data = sse_data(await streamed.text())
    assert data[-1] == "[DONE]"
    assert sum(bool(orjson.loads(d)["choices"][0]["delta"].get("content")) for d in data[:-1]) == 5
    assert seen == ["identity", "identity"]


async def test_organization_and_project_reach_the_provider(
    gateway: GatewayFactory, settings: Any, aiohttp_server: Any
) -> None:
    """Configured, OpenAI-Organization and OpenAI-Project ride on every provider call."""
    seen: list[tuple[str | None, str | None]] = []
    app = create_simulator_app(Simulator(prompt_tokens=count_body))

    async def record(request: web.Request, response: web.StreamResponse) -> None:
        seen.append(
            (request.headers.get("OpenAI-Organization"), request.headers.get("OpenAI-Project"))
        )

    app.on_response_prepare.append(record)
    provider = await aiohttp_server(app)
    custom = with_provider(
        settings, base_url=str(provider.make_url("/v1")), organization="org-1", project="proj_2"
    )
    client = await gateway(custom)
    for stream in (False, True):
        response = await client.post(URL, json=chat_body("hi", stream=stream), headers=AUTH)
        assert response.status == 200
        await response.read()
    assert seen == [("org-1", "proj_2")] * 2
