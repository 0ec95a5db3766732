"""``service.upstream``: what the provider connection asks for, against real sockets: a
provider that compresses whenever the client allows it, and the organization and project.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from service import upstream
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


async def _under_deadline(due_in_s: float, *, expire: bool, cancel: bool) -> None:
    """Wait under a ``_Deadline`` due in ``due_in_s``; ``expire``: it fires at once, by
    hand; ``cancel``: someone else cancels the task too."""
    loop = asyncio.get_running_loop()
    with upstream._Deadline(loop, loop.time() + due_in_s, 60.0) as deadline:
        if expire:
            deadline._due = loop.time() - 1
            deadline._check()
        if cancel:
            task = asyncio.current_task()
            assert task is not None
            task.cancel()
        await asyncio.Event().wait()


async def test_a_deadline_is_a_timeout_error_and_only_its_own_cancel_becomes_one() -> None:
    """As ``asyncio.timeout``: the deadline passing is a ``TimeoutError``; a cancellation
    from elsewhere stays one, even when the deadline passed at the same moment, and the
    task's count of cancellations is as it was."""
    with pytest.raises(TimeoutError):
        await _under_deadline(-1.0, expire=False, cancel=False)  # its own timer fires
    with pytest.raises(TimeoutError):
        await _under_deadline(60.0, expire=True, cancel=False)
    for expire in (False, True):
        task = asyncio.ensure_future(_under_deadline(60.0, expire=expire, cancel=True))
        with pytest.raises(asyncio.CancelledError):
            await task
        assert task.cancelled()
    current = asyncio.current_task()
    assert current is not None
    assert current.cancelling() == 0
