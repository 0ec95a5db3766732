"""Graceful shutdown: not ready, drain, then end the rest with a resume hint and a checkpoint.

One test drives the app's own shutdown in process; one sends SIGTERM to ``python -m service``.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp.test_utils import make_mocked_request

from service.__main__ import DRAIN_MARGIN_S
from service.appkeys import LIFECYCLE, STREAMS
from service.checkpoint import Checkpoint
from service.handlers import health
from service.settings import Settings
from service.stream import Stream
from tests.conftest import AUTH, GatewayFactory, chat_body
from tests.streamwire import events, read_events, with_drain

REPO = Path(__file__).resolve().parent.parent
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
    assert rest.endswith(b"retry: 1000\n\n")
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


async def test_sigterm_with_a_stream_open(tmp_path: Path) -> None:
    """SIGTERM to ``python -m service``: the open stream gets ``retry:``, the process exits 0
    within the drain window, and it logged no traceback."""
    drain_s = 1.0
    env: dict[str, Any] = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(tmp_path),
        "SLUICE_DATA_DIR": str(tmp_path / "data"),  # the ledger: not the checkout's ./data
        "SLUICE_PORT": "0",
        "SLUICE_PROVIDER": "simulated",
        "SLUICE_DRAIN_S": str(drain_s),
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "service",
        cwd=REPO,
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stderr is not None
    seen: list[bytes] = []
    try:
        port = await asyncio.wait_for(_listening_port(process.stderr, seen), 30)
        output = asyncio.ensure_future(_drain_output(process.stderr, seen))
        async with aiohttp.ClientSession() as session:
            response = await session.post(
                f"http://127.0.0.1:{port}/v1/chat/completions",
                json=chat_body("bye [sim stall_after=1]"),
                headers=AUTH,
            )
            await read_events(response, 2)
            process.send_signal(signal.SIGTERM)
            rest = await response.read()
        assert rest.endswith(b"retry: 1000\n\n")
        assert await asyncio.wait_for(process.wait(), drain_s + DRAIN_MARGIN_S) == 0
        await output
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    log = b"".join(seen).decode(errors="replace")
    assert "Traceback" not in log, log


async def _line_containing(stderr: asyncio.StreamReader, needle: bytes, seen: list[bytes]) -> None:
    while needle not in (line := await stderr.readline()):
        if not line:
            raise AssertionError(b"".join(seen).decode(errors="replace"))
        seen.append(line)
    seen.append(line)


async def test_readyz_is_503_over_the_wire_while_sigterm_drains(tmp_path: Path) -> None:
    """After SIGTERM the port keeps listening while streams drain: a probe gets /readyz 503
    "draining" (not a refused connection), /livez 200, a new completion an OpenAI 503. Once
    the last stream ends (its client left) the process exits 0 without waiting out the window.
    """
    env: dict[str, Any] = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(tmp_path),
        "SLUICE_DATA_DIR": str(tmp_path / "data"),  # the ledger: not the checkout's ./data
        "SLUICE_PORT": "0",
        "SLUICE_DRAIN_S": "3600",  # far beyond the safety net below: only the stream ends it
        "SLUICE_DISCONNECT_GRACE_S": "0",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "service",
        cwd=REPO,
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
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
                await _line_containing(process.stderr, b"SIGTERM: draining", seen)
                output = asyncio.ensure_future(_drain_output(process.stderr, seen))
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
                held.close()  # the last stream's client leaves: nothing is left to drain
            assert await process.wait() == 0
            await output
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    log = b"".join(seen).decode(errors="replace")
    assert "Traceback" not in log, log
