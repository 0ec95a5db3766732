"""Test helpers that read what the gateway actually put on the wire.

Deliberately independent of ``service.sse``, so the gateway's encoder is checked by a
second, naive reading of the SSE format rather than by itself.
"""

from __future__ import annotations

import socket
from typing import Any

import aiohttp
import orjson


def sse_blocks(text: str) -> list[str]:
    """The raw events (blank-line separated blocks) of an SSE body, in order."""
    return [block for block in text.split("\n\n") if block]


def sse_data(text: str) -> list[str]:
    """The ``data`` value of every event that has one (single-line data, as Sluice sends)."""
    values = []
    for block in sse_blocks(text):
        for line in block.split("\n"):
            if line.startswith("data: "):
                values.append(line[len("data: ") :])
    return values


def sse_json(text: str) -> list[Any]:
    """Every data payload except ``[DONE]``, parsed as JSON."""
    return [orjson.loads(d) for d in sse_data(text) if d != "[DONE]"]


async def read_until(response: aiohttp.ClientResponse, needle: bytes) -> bytes:
    """Read a streamed body until ``needle`` has arrived; fails (EOF) if it never does."""
    seen = b""
    while needle not in seen:
        data = await response.content.readany()
        if not data:
            raise AssertionError(f"stream ended before {needle!r}; got {seen!r}")
        seen += data
    return seen


def assert_openai_error(payload: Any, *, type_: str | None = None) -> dict[str, Any]:
    """``payload`` is exactly ``{"error": {"message", "type", "param", "code"}}``."""
    assert isinstance(payload, dict)
    assert set(payload) == {"error"}
    error = payload["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str)
    assert error["message"]
    assert isinstance(error["type"], str)
    if type_ is not None:
        assert error["type"] == type_
    assert "Traceback" not in error["message"]
    return error  # type: ignore[no-any-return]


def closed_port() -> int:
    """A loopback port with nothing listening on it (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port
