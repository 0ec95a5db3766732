"""The load generator: aiohttp clients in the bench process, one connection per worker.

Client work per request is kept minimal (no JSON parsing, one small tail buffer per stream) so
that the clock measures the server side as far as a shared 2-core machine allows.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from .procs import DEV_KEY

HEADERS = {"Authorization": f"Bearer {DEV_KEY}", "Content-Type": "application/json"}
_DONE_TAIL = b"data: [DONE]\n\n"


def chat_body(directive: str, *, stream: bool) -> bytes:
    """A chat request whose last user message steers the simulated provider."""
    body: dict[str, Any] = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": f"Benchmark prompt [sim {directive}]"}],
        "stream": stream,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    return orjson.dumps(body)


def new_session(*, limit: int = 0, timeout_s: float | None = 60.0) -> aiohttp.ClientSession:
    """A client session with keep-alive and no connection cap (``limit=0``)."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=limit, force_close=False),
        timeout=aiohttp.ClientTimeout(total=timeout_s),
        auto_decompress=False,
    )


@dataclass(slots=True)
class LoadResult:
    """What a closed-loop run measured; latencies and TTFTs in seconds."""

    requests: int = 0
    errors: int = 0
    elapsed_s: float = 0.0
    latencies_s: list[float] = field(default_factory=list)
    ttfts_s: list[float] = field(default_factory=list)

    @property
    def rps(self) -> float:
        return self.requests / self.elapsed_s if self.elapsed_s > 0 else 0.0


async def run_load(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    *,
    total: int,
    concurrency: int,
    time_limit_s: float,
    streaming: bool,
) -> LoadResult:
    """``concurrency`` workers send ``body`` until ``total`` requests or ``time_limit_s``."""
    result = LoadResult()
    remaining = [total]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + time_limit_s

    async def worker() -> None:
        while remaining[0] > 0 and loop.time() < deadline:
            remaining[0] -= 1
            try:
                latency, ttft = await _request(session, url, body, streaming)
            except (aiohttp.ClientError, TimeoutError):
                result.errors += 1
                continue
            if latency < 0:
                result.errors += 1
                continue
            result.requests += 1
            result.latencies_s.append(latency)
            result.ttfts_s.append(ttft)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    result.elapsed_s = time.perf_counter() - started
    return result


async def _request(
    session: aiohttp.ClientSession, url: str, body: bytes, streaming: bool
) -> tuple[float, float]:
    """One request: (latency, time to first body bytes); latency -1 when it did not succeed."""
    started = time.perf_counter()
    async with session.post(url, data=body, headers=HEADERS) as response:
        if not streaming:
            await response.read()
            first = time.perf_counter()
            ok = response.status == 200
        else:
            first = 0.0
            tail = b""
            async for data in response.content.iter_any():
                if not first:
                    first = time.perf_counter()
                tail = (tail + data)[-len(_DONE_TAIL) :]
            ok = response.status == 200 and tail == _DONE_TAIL
    ended = time.perf_counter()
    return (ended - started if ok else -1.0), first - started


async def hold_streams(
    session: aiohttp.ClientSession, url: str, body: bytes, *, count: int, batch: int
) -> list[aiohttp.ClientResponse]:
    """Open ``count`` streams, ``batch`` at a time, each read up to its first chunk; the caller
    closes the responses. Batches keep the listen backlogs from overflowing."""
    held: list[aiohttp.ClientResponse] = []
    try:
        for start in range(0, count, batch):
            size = min(batch, count - start)
            held.extend(
                await asyncio.gather(*(_first_chunk(session, url, body) for _ in range(size)))
            )
    except BaseException:
        release(held)
        raise
    return held


async def _first_chunk(
    session: aiohttp.ClientSession, url: str, body: bytes
) -> aiohttp.ClientResponse:
    response = await session.post(url, data=body, headers=HEADERS)
    if response.status != 200 or not await response.content.readany():
        response.close()
        raise RuntimeError(f"held stream failed with status {response.status}")
    return response


def release(responses: list[aiohttp.ClientResponse]) -> None:
    """Close each response's connection (the server sees a disconnect)."""
    for response in responses:
        response.close()


async def abort_after(session: aiohttp.ClientSession, url: str, body: bytes, *, events: int) -> int:
    """Read a stream until ``events`` SSE events arrived, then drop the connection; return the
    number of events actually seen (fewer if the stream ended first)."""
    seen = 0
    response = await session.post(url, data=body, headers=HEADERS)
    try:
        async for data in response.content.iter_any():
            seen += data.count(b"\n\n")
            if seen >= events:
                break
    finally:
        response.close()
    return seen


async def abort_many(
    session: aiohttp.ClientSession, url: str, body: bytes, *, count: int, events: int
) -> list[int]:
    """``count`` concurrent streams, each aborted by the client after ``events`` events."""
    return list(
        await asyncio.gather(
            *(abort_after(session, url, body, events=events) for _ in range(count))
        )
    )
