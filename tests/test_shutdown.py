"""Graceful shutdown: not ready, drain, then end the rest with a resume hint and a checkpoint.

In-process tests drive the app's own shutdown (one with the loop clock in the test's hands,
to stand just before and after the drain window's end); one sends SIGTERM to
``python -m service``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from service.__main__ import DRAIN_MARGIN_S
from service.app import create_app
from service.appkeys import LIFECYCLE, STREAMS
from service.checkpoint import Checkpoint, MemoryCheckpointStore
from service.handlers import health
from service.resources import drain
from service.settings import Settings
from service.simulator import SimStats
from service.stream import Stream
from tests.conftest import AUTH, DEV_KEY, GatewayFactory, chat_body, with_streams
from tests.processes import DEVNULL, python_module
from tests.streamwire import LoopClock, events, read_events, with_drain

LISTENING = re.compile(rb"Running on http://127\.0\.0\.1:(\d+)")


async def test_shutdown_ends_stalled_streams_with_resume_hints_and_checkpoints(
    gateway: GatewayFactory, settings: Settings
) -> None:
    """Past the drain window, SSE readers get ``retry:``, sockets close with 1001, every
    stream is checkpointed as ``shutdown``, and readiness said 503 throughout."""
    client = await gateway(with_drain(settings, 0.05))
    registry = client.app[STREAMS]
    store = registry.store
    readiness: list[int] = []

    async def probe_readiness(stream: Stream, checkpoint: Checkpoint) -> None:
        response = await health.readyz(make_mocked_request("GET", "/readyz", app=client.app))
        readiness.append(response.status)

    registry.finish_hooks.append(probe_readiness)

    sse = await client.post(
        "/v1/chat/completions", json=chat_body("sse [sim stall_after=2]"), headers=AUTH
    )
    await read_events(sse, 3)
    ws = await client.ws_connect("/v1/ws", headers=AUTH)
    body = chat_body("ws [sim stall_after=2]")
    create = {"type": "chat.completion.create", "request_id": 1, "body": body}
    await ws.send_str(orjson.dumps(create).decode())
    started = orjson.loads((await ws.receive()).data)
    while orjson.loads((await ws.receive()).data)["seq"] < 3:
        pass

    sse_rest = asyncio.ensure_future(sse.read())
    ws_end = asyncio.ensure_future(ws.receive())
    await client.server.close()

    rest = await sse_rest
    assert rest.endswith(b"retry: 1000\n")
    assert b"event: error\ndata: " in rest  # with no id: Last-Event-ID stays the last chunk
    assert orjson.loads(events(rest)[-2][1])["error"]["code"] == "stream_interrupted"
    assert events(rest)[-1] == (None, b"")
    closing = await ws_end
    assert closing.type is aiohttp.WSMsgType.CLOSE
    assert closing.data == aiohttp.WSCloseCode.GOING_AWAY
    for stream_id in (sse.headers["X-Sluice-Stream-Id"], started["stream_id"]):
        checkpoint = await store.get(stream_id)
        assert checkpoint is not None
        assert checkpoint.status == "shutdown"
        assert checkpoint.chunks == 3
    assert readiness == [503, 503]


@pytest.mark.parametrize("streaming", [True, False], ids=["sse", "json"])
async def test_a_request_shutdown_ends_before_its_answer_is_told_to_retry_elsewhere(
    gateway: GatewayFactory, settings: Settings, sim_stats: SimStats, streaming: bool
) -> None:
    """The provider still holds its answer when the drain window ends: nothing has gone
    out, and there is nothing to resume, so the client gets a 503 with Retry-After."""
    client = await gateway(with_drain(settings, 0))
    body = chat_body("held [sim header_delay_ms=600000]", stream=streaming)
    pending = asyncio.ensure_future(client.post("/v1/chat/completions", json=body, headers=AUTH))
    await sim_stats.wait_for(lambda s: s.requests == 1)
    await drain(client.app)
    response = await pending
    assert response.status == 503
    assert response.headers["Retry-After"] == "1"
    error = (await response.json())["error"]
    assert "another replica" in error["message"]


async def test_a_stream_shutdown_ends_after_its_200_but_before_any_event_says_send_again(
    gateway: GatewayFactory, settings: Settings, sim_stats: SimStats
) -> None:
    """The 200 and a keepalive went out while the provider held its answer; then shutdown:
    there is nothing to resume, so the stream ends with an error event (no id, no retry
    hint), which the SDKs raise."""
    custom = with_streams(with_drain(settings, 0), keepalive_s=0.05)
    client = await gateway(custom)
    body = chat_body("held [sim header_delay_ms=600000]")
    response = await client.post("/v1/chat/completions", json=body, headers=AUTH)
    assert response.status == 200
    assert await response.content.readuntil(b"\n") == b": keepalive\n"
    await drain(client.app)
    rest = await response.content.read()
    assert b"retry:" not in rest
    assert b"id:" not in rest
    (payload,) = [line[6:] for line in rest.split(b"\n") if line.startswith(b"data: ")]
    assert "send the request again" in orjson.loads(payload)["error"]["message"]


async def test_the_drain_window_lets_streams_finish_then_ends_the_rest_at_its_end(
    aiohttp_client: Any, settings: Settings, sim_stats: SimStats, loop_clock: LoopClock
) -> None:
    """The shutdown sequence under the test's clock, with the default 25 s drain window: the
    listener is closed before draining starts; a stream that finishes within the window gets
    its [DONE]; a moment before the window's end the stalled one still runs; a moment after,
    it gets the ``retry:`` hint and a ``shutdown`` checkpoint."""
    assert settings.server.drain_s == 25
    app = create_app(settings)
    draining = asyncio.Event()

    async def began(app: web.Application) -> None:
        draining.set()

    app.on_shutdown.insert(0, began)  # runs just before the app's own drain
    client = await aiohttp_client(app)
    registry = app[STREAMS]
    url = client.make_url("/livez")
    quick = await client.post(
        "/v1/chat/completions", json=chat_body("quick [sim chunks=3 delay_ms=5000]"), headers=AUTH
    )
    stuck = await client.post(
        "/v1/chat/completions", json=chat_body("stuck [sim stall_after=1]"), headers=AUTH
    )
    await read_events(quick, 2)
    await read_events(stuck, 2)
    stuck_stream = registry.get(stuck.headers["X-Sluice-Stream-Id"])
    assert stuck_stream is not None

    closing = asyncio.ensure_future(client.server.close())
    await draining.wait()
    async with aiohttp.ClientSession() as fresh:
        with pytest.raises(aiohttp.ClientConnectionError):
            await fresh.get(url)
    await loop_clock.advance(5)
    await loop_clock.advance(5)  # the quick stream's last word: it completes
    quick_rest = await quick.read()
    assert events(quick_rest)[-1] == (6, b"[DONE]")
    await loop_clock.advance(25 - 10 - 0.1)
    assert stuck_stream.running
    assert stuck_stream.cancel_reason is None

    await loop_clock.advance(0.2)
    stuck_rest = await stuck.read()
    assert stuck_rest.endswith(b"retry: 1000\n")
    loop_clock.thaw()
    await closing
    checkpoints = {
        name: await registry.store.get(response.headers["X-Sluice-Stream-Id"])
        for name, response in (("quick", quick), ("stuck", stuck))
    }
    assert {name: c and c.status for name, c in checkpoints.items()} == {
        "quick": "completed",
        "stuck": "shutdown",
    }
    assert sim_stats.completed == 1


class _SlowStore(MemoryCheckpointStore):
    """Holds each write until shutdown has begun, recording when it lands."""

    def __init__(self, order: list[str], shutdown: asyncio.Event) -> None:
        super().__init__()
        self.writing = asyncio.Event()
        self._order = order
        self._shutdown = shutdown

    async def put(self, checkpoint: Checkpoint, ttl_s: float) -> None:
        self.writing.set()
        await self._shutdown.wait()
        await super().put(checkpoint, ttl_s)
        self._order.append(f"checkpoint {checkpoint.status}")


async def test_a_checkpoint_write_outlives_the_disconnect_and_holds_up_shutdown(
    aiohttp_client: Any, settings: Settings, sim_stats: SimStats
) -> None:
    """The write a disconnect triggers runs in the stream's task, not the cancelled handler,
    and the shutdown drain waits for it (and the finish hooks) before it returns."""
    order: list[str] = []
    shutdown = asyncio.Event()
    custom = with_streams(with_drain(settings, 0), disconnect_grace_s=0)
    app = create_app(custom)
    store = _SlowStore(order, shutdown)
    app[STREAMS].store = store

    async def began(app: web.Application) -> None:
        shutdown.set()

    async def drained(app: web.Application) -> None:
        order.append("drained")

    async def ledger_row(stream: Stream, checkpoint: Checkpoint) -> None:
        order.append("finish hooks")

    app.on_shutdown.insert(0, began)
    app.on_shutdown.append(drained)
    app[STREAMS].finish_hooks.append(ledger_row)
    client = await aiohttp_client(app)
    response = await client.post(
        "/v1/chat/completions", json=chat_body("gone [sim stall_after=2]"), headers=AUTH
    )
    await read_events(response, 3)
    response.close()
    await store.writing.wait()  # the handler is long gone; the write is still pending
    await sim_stats.wait_for(lambda s: s.aborted == 1)

    await client.server.close()
    assert order == ["checkpoint client_gone", "finish hooks", "drained"]
    assert await store.get(response.headers["X-Sluice-Stream-Id"]) is not None


async def test_readiness_and_new_streams_are_refused_while_draining(
    gateway: GatewayFactory,
) -> None:
    """Once draining, /readyz answers 503 and a new completion gets the OpenAI 503."""
    client = await gateway()
    assert (await client.get("/readyz")).status == 200
    client.app[LIFECYCLE].draining = True
    ready = await client.get("/readyz")
    assert ready.status == 503
    assert await ready.json() == {"status": "draining"}
    refused = await client.post("/v1/chat/completions", json=chat_body(), headers=AUTH)
    assert refused.status == 503
    assert (await refused.json())["error"]["code"] == "service_unavailable"
    client.app[LIFECYCLE].draining = False


async def _listening_port(stderr: asyncio.StreamReader, seen: list[bytes]) -> int:
    while True:
        line = await stderr.readline()
        if not line:
            raise AssertionError(b"".join(seen).decode(errors="replace"))
        seen.append(line)
        if found := LISTENING.search(line):
            return int(found.group(1))


async def _drain_output(stderr: asyncio.StreamReader, seen: list[bytes]) -> None:
    while line := await stderr.readline():
        seen.append(line)


async def _gateway(tmp_path: Path, **env: str) -> asyncio.subprocess.Process:
    """``python -m service`` on a free port, its ledger in ``tmp_path`` (not ./data)."""
    base = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(tmp_path),
        "SLUICE_DATA_DIR": str(tmp_path / "data"),
        "SLUICE_PORT": "0",
    }
    return await python_module("service", env={**base, **env}, stdout=DEVNULL)


async def _reap(process: asyncio.subprocess.Process) -> None:
    """Kill ``process`` if it still runs (a test that failed before it exited)."""
    if process.returncode is None:
        process.kill()
        await process.wait()


def _no_traceback(seen: list[bytes]) -> None:
    log = b"".join(seen).decode(errors="replace")
    assert "Traceback" not in log, log


@contextlib.asynccontextmanager
async def _serving(
    tmp_path: Path, **env: str
) -> AsyncIterator[tuple[asyncio.subprocess.Process, int]]:
    """``_gateway`` once it listens: (the process, its port). The block must see it exit;
    it is killed if it did not, and its log must hold no traceback."""
    process = await _gateway(tmp_path, **env)
    assert process.stderr is not None
    seen: list[bytes] = []
    try:
        port = await asyncio.wait_for(_listening_port(process.stderr, seen), 30)
        output = asyncio.ensure_future(_drain_output(process.stderr, seen))
        yield process, port
        await output
    finally:
        await _reap(process)
    _no_traceback(seen)


async def test_sigterm_with_streams_open(tmp_path: Path) -> None:
    """SIGTERM to ``python -m service`` with an SSE stream and a WebSocket stream open: the SSE
    reader gets ``retry:``, the socket closes with 1001, both streams are recorded (the ledger
    row is written after the checkpoint, in the same task), and the process exits 0 within the
    drain window without logging a traceback."""
    drain_s = 1.0
    env = {"SLUICE_PROVIDER": "simulated", "SLUICE_DRAIN_S": str(drain_s)}
    async with _serving(tmp_path, **env) as (process, port):
        base = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as session:
            response = await session.post(
                f"{base}/v1/chat/completions",
                json=chat_body("bye [sim stall_after=1]"),
                headers=AUTH,
            )
            await read_events(response, 2)
            ws = await session.ws_connect(f"{base}/v1/ws", headers=AUTH)
            create = {
                "type": "chat.completion.create",
                "request_id": 1,
                "body": chat_body("ws [sim stall_after=1]"),
            }
            await ws.send_str(orjson.dumps(create).decode())
            ws_stream = orjson.loads((await ws.receive()).data)["stream_id"]
            process.send_signal(signal.SIGTERM)
            rest = await response.read()
            closing = await ws.receive()
            while closing.type is aiohttp.WSMsgType.TEXT:  # chunks sent before the drain ended
                closing = await ws.receive()
        assert rest.endswith(b"retry: 1000\n")
        assert closing.type is aiohttp.WSMsgType.CLOSE
        assert closing.data == aiohttp.WSCloseCode.GOING_AWAY
        assert await asyncio.wait_for(process.wait(), drain_s + DRAIN_MARGIN_S) == 0
    with contextlib.closing(sqlite3.connect(tmp_path / "data" / "ledger.sqlite3")) as ledger:
        rows = dict(ledger.execute("SELECT stream_id, error_code FROM ledger").fetchall())
    assert rows == {response.headers["X-Sluice-Stream-Id"]: "shutdown", ws_stream: "shutdown"}


async def _line_containing(stderr: asyncio.StreamReader, needle: bytes, seen: list[bytes]) -> None:
    while needle not in (line := await stderr.readline()):
        if not line:
            raise AssertionError(b"".join(seen).decode(errors="replace"))
        seen.append(line)
    seen.append(line)


@dataclass
class _Draining:
    """A gateway process in its drain: one stream held open (the provider stalled)."""

    process: asyncio.subprocess.Process
    base: str
    held: aiohttp.ClientResponse


@contextlib.asynccontextmanager
async def _draining(tmp_path: Path) -> AsyncIterator[_Draining]:
    """Start ``python -m service`` (a drain far beyond the safety net, no grace), hold one
    stream, send SIGTERM and wait until it says it drains. On leaving, the process must
    have exited 0 without logging a traceback; it is killed if it still runs."""
    process = await _gateway(tmp_path, SLUICE_DRAIN_S="3600", SLUICE_DISCONNECT_GRACE_S="0")
    assert process.stderr is not None
    seen: list[bytes] = []
    try:
        async with asyncio.timeout(60):  # a safety net, not a clock
            port = await _listening_port(process.stderr, seen)
            base = f"http://127.0.0.1:{port}"
            async with aiohttp.ClientSession() as session:
                held = await session.post(
                    f"{base}/v1/chat/completions",
                    json=chat_body("hold [sim stall_after=1]"),
                    headers=AUTH,
                )
                await read_events(held, 2)
                process.send_signal(signal.SIGTERM)
                await _line_containing(process.stderr, b"shutdown signal: draining", seen)
                output = asyncio.ensure_future(_drain_output(process.stderr, seen))
                yield _Draining(process, base, held)
            assert await process.wait() == 0
            await output
    finally:
        await _reap(process)
    _no_traceback(seen)


async def test_readyz_is_503_over_the_wire_while_sigterm_drains(tmp_path: Path) -> None:
    """After SIGTERM the port keeps listening while streams drain: a probe gets /readyz 503
    "draining" (not a refused connection), /livez 200, a new completion an OpenAI 503. Once
    the last stream ends (its client left) the process exits 0 without waiting out the window.
    """
    async with _draining(tmp_path) as gateway:
        base = gateway.base
        async with aiohttp.ClientSession() as probe:  # a fresh connection, as a kubelet's
            ready = await probe.get(f"{base}/readyz")
            assert ready.status == 503
            assert await ready.json() == {"status": "draining"}
            assert (await probe.get(f"{base}/livez")).status == 200
            refused = await probe.post(
                f"{base}/v1/chat/completions", json=chat_body(), headers=AUTH
            )
            assert refused.status == 503
            assert (await refused.json())["error"]["code"] == "service_unavailable"
        gateway.held.close()  # the last stream's client leaves: nothing is left to drain


@pytest.mark.parametrize("second", [signal.SIGTERM, signal.SIGINT])
async def test_a_second_signal_during_the_drain_still_exits_cleanly(
    tmp_path: Path, second: signal.Signals
) -> None:
    """SIGTERM, then SIGTERM (or Ctrl-C's SIGINT) while a stream drains (an hour's window):
    the second stops now, without waiting for the stream; it ends as a shutdown (its client
    told to resume elsewhere), is recorded, and the process exits 0 (the signal does not cut
    the cleanup short)."""
    async with _draining(tmp_path) as gateway:
        stream_id = gateway.held.headers["X-Sluice-Stream-Id"]
        gateway.process.send_signal(second)
        rest = await gateway.held.read()  # it ends without the client leaving
        assert b"retry: " in rest
    with contextlib.closing(sqlite3.connect(tmp_path / "data" / "ledger.sqlite3")) as ledger:
        rows = ledger.execute("SELECT stream_id, status FROM ledger").fetchall()
    assert rows == [(stream_id, "cancelled")]


async def test_the_sdk_raises_on_a_stream_shutdown_cut_off(
    gateway: GatewayFactory, settings: Settings
) -> None:
    """Some chunks went out, then the gateway stopped: the openai SDK raises APIError
    instead of ending the stream as if it were complete (a short text, no finish_reason)."""
    client = await gateway(with_drain(settings, 0))
    sdk = openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key=DEV_KEY, max_retries=0)
    async with sdk:
        stream = await sdk.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "cut [sim stall_after=3]"}],
            stream=True,
        )
        received = [await anext(stream)]
        stopping = asyncio.ensure_future(drain(client.app))
        with pytest.raises(openai.APIError, match="cut off before it finished"):
            await _read_all(stream, received)  # to the stall, then the error event
        await stopping
    assert len(received) >= 3
    assert all(chunk.choices[0].finish_reason is None for chunk in received)


async def _read_all(stream: Any, into: list[Any]) -> None:
    async for chunk in stream:
        into.append(chunk)


async def test_a_request_still_uploading_holds_the_exit_for_the_margin_only(
    tmp_path: Path,
) -> None:
    """SIGTERM with no stream running but a request whose body is still coming (a slow
    upload): the drain has nothing to wait for, and the upload gets ``DRAIN_MARGIN_S`` to
    finish, not the whole drain window again. Its refusal still has its row."""
    env = {"SLUICE_PROVIDER": "simulated", "SLUICE_DRAIN_S": "60"}
    async with _serving(tmp_path, **env) as (process, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: sluice\r\n"
            b"Authorization: Bearer " + DEV_KEY.encode() + b"\r\n"
            b"Content-Type: application/json\r\nContent-Length: 1000\r\n"
            b"Expect: 100-continue\r\n\r\n"
        )
        await writer.drain()
        assert (await reader.readline()).startswith(b"HTTP/1.1 100")  # its handler runs
        writer.write(b'{"model": "gpt-4o-mini", ')  # and never the rest
        await writer.drain()
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), DRAIN_MARGIN_S + 5) == 0
        writer.close()
    with contextlib.closing(sqlite3.connect(tmp_path / "data" / "ledger.sqlite3")) as ledger:
        assert ledger.execute("SELECT status FROM ledger").fetchall() == [("cancelled",)]
