"""Helpers for the resilience and cache tests: a gateway whose clocks and sleeps are ours.

``start`` builds the app with ``create_app`` unchanged, then swaps the pure ``Resilience``
object for one with a fake breaker clock and a sleep that records the delay it was asked
for and returns at once, so retry waits and reset timeouts are asserted, never waited.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field, replace
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient

from service.app import create_app
from service.appkeys import RESILIENCE
from service.resilience import Resilience
from service.settings import ResilienceSettings, Settings

Client = TestClient[web.Request, web.Application]


class FakeClock:
    """A monotonic clock that moves only when the test says so."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Sleeps:
    """Records requested retry delays instead of sleeping."""

    delays: list[float] = field(default_factory=list)

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        await asyncio.sleep(0)


@dataclass
class Rig:
    client: Client
    clock: FakeClock
    sleeps: Sleeps

    @property
    def resilience(self) -> Resilience:
        return self.client.app[RESILIENCE]


def with_resilience(settings: Settings, **changes: Any) -> Settings:
    return replace(
        settings, resilience=replace(settings.resilience or ResilienceSettings(), **changes)
    )


async def start(aiohttp_client: Any, settings: Settings, *, jitter: float = 0.5) -> Rig:
    """A gateway for ``settings`` with a fake breaker clock, recorded sleeps, fixed jitter."""
    clock, sleeps = FakeClock(), Sleeps()
    app = create_app(settings)
    app[RESILIENCE] = replace(
        Resilience.from_settings(settings, clock=clock), sleep=sleeps, random=lambda: jitter
    )
    client: Client = await aiohttp_client(app)
    return Rig(client, clock, sleeps)
