"""Helpers for the disconnect/resume tests: read SSE events one at a time, look up
checkpoints, and make gateways whose registry uses an injected clock or keys file."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from service.auth import add_key
from service.checkpoint import Checkpoint
from service.registry import StreamRegistry
from service.settings import AuthSettings, Settings
from service.stream import Stream

FIXED_CREATED = 1_700_000_000  # [sim created=...]: chunks compare byte for byte across runs


async def read_events(response: aiohttp.ClientResponse, count: int) -> bytes:
    """Read exactly ``count`` SSE events (blank-line terminated) and return their bytes."""
    raw = b""
    for _ in range(count):
        raw += await response.content.readuntil(b"\n\n")
    return raw


def events(raw: bytes) -> list[tuple[int | None, bytes]]:
    """``(id, data)`` of each event in an SSE body; ``id`` is None for data-less hints."""
    parsed: list[tuple[int | None, bytes]] = []
    for block in raw.split(b"\n\n"):
        if not block:
            continue
        seq: int | None = None
        data = b""
        for line in block.split(b"\n"):
            if line.startswith(b"id: "):
                seq = int(line[4:])
            elif line.startswith(b"data: "):
                data = line[6:]
        parsed.append((seq, data))
    return parsed


def raw_chunk(raw: str) -> bytes:
    """The chunk object inside a WebSocket chunk frame, exactly as the server wrote it."""
    start = raw.index('"chunk":') + len('"chunk":')
    return raw[start:-1].encode()


def last_error(raw: bytes) -> dict[str, Any]:
    """The ``error`` object of the last event of an SSE body."""
    payload = orjson.loads(events(raw)[-1][1])
    error: dict[str, Any] = payload["error"]
    return error


def with_drain(settings: Settings, drain_s: float) -> Settings:
    return replace(settings, server=replace(settings.server, drain_s=drain_s))


def two_user_settings(settings: Settings, tmp_path: Path) -> tuple[Settings, str, str]:
    """Settings with a keys file for alice and bob; returns their bearer keys."""
    keys = tmp_path / "keys.json"
    alice = add_key(keys, user="alice", tenant="acme")
    bob = add_key(keys, user="bob", tenant="acme")
    auth = AuthSettings(client_keys_file=keys, dev_key=None)
    return replace(settings, auth=auth), alice, bob


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def only(streams: list[Stream]) -> Stream:
    assert len(streams) == 1, streams
    return streams[0]


class Finished:
    """Collects checkpoints as streams end (a registry finish hook); wait on it, never sleep."""

    def __init__(self, registry: StreamRegistry) -> None:
        self.checkpoints: list[Checkpoint] = []
        self._changed = asyncio.Event()
        registry.finish_hooks.append(self._hook)

    async def _hook(self, stream: Stream, checkpoint: Checkpoint) -> None:
        self.checkpoints.append(checkpoint)
        self._changed.set()

    async def wait(self, count: int = 1, limit_s: float = 10.0) -> list[Checkpoint]:
        async with asyncio.timeout(limit_s):
            while len(self.checkpoints) < count:
                self._changed.clear()
                await self._changed.wait()
        return self.checkpoints


class LoopClock:
    """The running loop's clock, frozen and moved only by the test (aiolimiter's trick).

    Every ``call_later`` deadline (grace windows, the drain window, the simulator's delays)
    is then reached only by ``advance``, so a test can stand just before or just after one
    and look; I/O still flows. ``thaw`` hands the loop back a running clock, no earlier than
    the frozen one, so timers set meanwhile keep their order.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._real = loop.time
        self._start = loop.time()
        self.elapsed = 0.0
        self._thawed = False
        loop.time = self._frozen  # type: ignore[method-assign]

    def _frozen(self) -> float:
        return self._start + self.elapsed

    async def advance(self, seconds: float) -> None:
        """Move the clock on and return once every timer now due has run."""
        self.elapsed += seconds
        # A probe due at the new time: timers due by then run in the same loop pass, before
        # the probe's waiter is woken.
        fired = self._loop.create_future()
        self._loop.call_at(self._frozen(), fired.set_result, None)
        await fired

    def thaw(self) -> None:
        if self._thawed:
            return
        self._thawed = True
        offset = self._frozen() - self._real()
        real = self._real
        self._loop.time = lambda: real() + max(offset, 0.0)  # type: ignore[method-assign]


async def journaled(stream: Stream, count: int) -> None:
    """Return once ``stream`` has journaled ``count`` events (or ended short of them)."""
    async for _ in stream.follow(0):
        if stream.last_seq >= count:
            return


class Observed:
    """Registry observer events ("client_disconnected", "grace_expired") to wait on."""

    def __init__(self, registry: StreamRegistry) -> None:
        self.seen: list[tuple[str, str]] = []
        self._changed = asyncio.Event()
        registry.observers.append(self._observe)

    def _observe(self, stream: Stream, event: str) -> None:
        self.seen.append((stream.id, event))
        self._changed.set()
        self._changed.clear()

    async def wait(self, stream_id: str, event: str) -> None:
        while (stream_id, event) not in self.seen:
            await self._changed.wait()
