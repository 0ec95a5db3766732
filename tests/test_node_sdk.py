"""The official ``openai`` Node SDK streams through the gateway too (issue 2, point 2).

``tests/node/stream.mjs`` runs under node as a subprocess against the gateway test server.
``make test`` installs its one dependency with ``npm ci`` from the committed lockfile.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import pytest

from service.settings import Settings
from service.simulator import completion_words, prompt_text
from tests.conftest import DEV_KEY, GatewayFactory, chat_body
from tests.servers import unavailable

NODE_DIR = Path(__file__).resolve().parent / "node"
NODE = shutil.which("node")


async def _run_node(base_url: str, prompt: str) -> dict[str, Any]:
    if NODE is None:
        unavailable("node is not installed")
    if not (NODE_DIR / "node_modules" / "openai").is_dir():
        pytest.fail("tests/node has no node_modules: run `make test` (it runs npm ci there)")
    assert NODE is not None
    env = {**os.environ, "SLUICE_BASE_URL": base_url, "SLUICE_KEY": DEV_KEY}
    process = await asyncio.create_subprocess_exec(
        NODE,
        "stream.mjs",
        prompt,
        cwd=NODE_DIR,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(50):  # a safety net only
        out, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    result: dict[str, Any] = orjson.loads(out.decode().strip().splitlines()[-1])
    return result


async def test_node_sdk_streams_with_usage(gateway: GatewayFactory) -> None:
    """The Node SDK gets every word, the finish reason and the provider's usage."""
    client = await gateway()
    prompt = "From node [sim chunks=11]"
    result = await _run_node(str(client.make_url("/v1")), prompt)
    assert result["error"] is None
    assert result["text"] == "".join(completion_words(prompt_text(chat_body(prompt)), 11))
    assert result["finish"] == "stop"
    assert result["chunks"] == 1 + 11 + 1 + 1  # role, words, finish, usage
    assert result["usage"]["completion_tokens"] == 11


async def test_node_sdk_reads_past_keepalives(gateway: GatewayFactory, settings: Settings) -> None:
    """The provider holds its headers, so the 200 and a keepalive go out before any event,
    and keepalives come between slow chunks: the Node SDK still gets every word."""
    streams = replace(settings.streams, keepalive_s=0.02)
    client = await gateway(replace(settings, streams=streams))
    prompt = "Patient node [sim chunks=5 delay_ms=50 header_delay_ms=100]"
    result = await _run_node(str(client.make_url("/v1")), prompt)
    assert result["error"] is None
    assert result["text"] == "".join(completion_words(prompt_text(chat_body(prompt)), 5))
    assert result["finish"] == "stop"


async def test_node_sdk_sees_midstream_error(gateway: GatewayFactory, settings: Settings) -> None:
    """A provider reset after the first byte makes the Node SDK throw, after the chunks."""
    quick = replace(settings, streams=replace(settings.streams, disconnect_grace_s=0.0))
    client = await gateway(quick)
    result = await _run_node(str(client.make_url("/v1")), "[sim chunks=6 reset_after=2]")
    assert result["error"] is not None
    assert result["error"]["name"] == "APIError"
    assert "closed the stream" in result["error"]["message"]
    assert result["chunks"] == 1 + 2
