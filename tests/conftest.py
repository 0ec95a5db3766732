"""Shared fixtures: a real simulated provider on a real port, and the gateway in front of it.

Both run as aiohttp test servers (real sockets, handler cancellation on). Tests reach the
provider's own counters through ``sim_stats`` and wait on them instead of sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import replace
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from service.app import create_app
from service.settings import ProviderSettings, Settings, StreamSettings
from service.simulator import SIM_STATS, SimStats, Simulator, create_simulator_app
from service.tokens import count_body
from tests.servers import postgres_server, postgres_url, redis_server, redis_url  # noqa: F401
from tests.streamwire import LoopClock

DEV_KEY = "sluice-dev-key"
AUTH = {"Authorization": f"Bearer {DEV_KEY}"}

GatewayFactory = Callable[..., Awaitable[TestClient[web.Request, web.Application]]]


@pytest.fixture
async def sim(aiohttp_server: Any) -> TestServer:
    """The simulated provider, alone on a loopback port."""
    simulator = Simulator(prompt_tokens=count_body)  # usage.prompt_tokens as tiktoken counts
    server: TestServer = await aiohttp_server(create_simulator_app(simulator))
    return server


@pytest.fixture
def sim_stats(sim: TestServer) -> SimStats:
    return sim.app[SIM_STATS]


@pytest.fixture
def sim_url(sim: TestServer) -> str:
    return str(sim.make_url("/v1"))


@pytest.fixture
def settings(sim_url: str) -> Settings:
    """Defaults, pointed at the test's simulator."""
    return Settings(provider=ProviderSettings(base_url=sim_url))


def with_streams(settings: Settings, **changes: Any) -> Settings:
    return replace(settings, streams=replace(settings.streams or StreamSettings(), **changes))


def with_provider(settings: Settings, **changes: Any) -> Settings:
    return replace(settings, provider=replace(settings.provider, **changes))


@pytest.fixture
async def gateway(settings: Settings, aiohttp_client: Any) -> GatewayFactory:
    """Start a gateway (``create_app`` unchanged) for the given settings, default ``settings``.

    ``settings`` comes first so the simulator starts before the gateway and stops after it:
    the gateway's shutdown drain still reaches a live provider.
    """

    async def start(custom: Settings | None = None) -> TestClient[web.Request, web.Application]:
        client: TestClient[web.Request, web.Application] = await aiohttp_client(
            create_app(custom or settings)
        )
        return client

    return start


def chat_body(text: str = "Hello", *, stream: bool = True, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": text}],
        "stream": stream,
    }
    body.update(extra)
    return body


@pytest.fixture
async def loop_clock() -> AsyncIterator[LoopClock]:
    """The test loop's clock, frozen until the test advances it; see ``LoopClock``.

    Request it after ``gateway`` so it thaws before the servers shut down.
    """
    clock = LoopClock(asyncio.get_running_loop())
    yield clock
    clock.thaw()


@pytest.fixture
def unanswered_port() -> Iterator[int]:
    """A listener whose accept queue is full: new connections hang in SYN_SENT."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(0)
        port: int = server.getsockname()[1]
        fillers = [socket.socket() for _ in range(8)]
        try:
            for filler in fillers:
                filler.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    filler.connect(("127.0.0.1", port))
            yield port
        finally:
            for filler in fillers:
                filler.close()
