"""Two real gateway processes sharing one redis-server and one PostgreSQL: a rolling restart.

Replica A (``python -m service``) gets SIGTERM while a client streams from it; the client's
stream ends with a ``retry:`` hint, and replica B serves its checkpoint and replays its
journal byte for byte. Both processes bill into one PostgreSQL ledger: no row is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import asyncpg
import orjson
import pytest

from tests.conftest import AUTH, chat_body
from tests.servers import free_port
from tests.streamwire import events, read_events

REPO = Path(__file__).resolve().parent.parent
READY_LINE = "Running on"

Replica = tuple[str, asyncio.subprocess.Process]


async def _drain(stream: asyncio.StreamReader) -> None:
    while await stream.readline():
        pass


@pytest.fixture
async def replicas(
    tmp_path: Path, redis_url: str, postgres_url: str
) -> AsyncIterator[Callable[[], Awaitable[Replica]]]:
    """Start gateway processes sharing Redis and PostgreSQL; each is (base URL, process)."""
    started: list[asyncio.subprocess.Process] = []
    drains: list[asyncio.Task[None]] = []

    async def start() -> Replica:
        port = free_port()
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(tmp_path),
            "SLUICE_PORT": str(port),
            "SLUICE_REDIS_URL": redis_url,
            "SLUICE_REDIS_TIMEOUT_S": "2",
            "SLUICE_DATABASE_URL": postgres_url,
            "SLUICE_DRAIN_S": "0.2",
            "SLUICE_LEDGER": "memory",
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
        started.append(process)
        assert process.stderr is not None
        async with asyncio.timeout(30):  # a safety net only
            while READY_LINE not in (await process.stderr.readline()).decode():
                if process.returncode is not None:
                    raise AssertionError("the gateway exited during start-up")
        drains.append(asyncio.create_task(_drain(process.stderr)))
        return f"http://127.0.0.1:{port}", process

    yield start
    for process in started:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            await process.wait()
    for task in drains:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_sigterm_on_one_replica_leaves_the_stream_resumable_on_the_other(
    replicas: Callable[[], Awaitable[Replica]], postgres_url: str
) -> None:
    """SIGTERM A mid-stream: A's client gets a retry hint; B has the checkpoint and journal."""
    (a_url, a_process), (b_url, b_process) = await replicas(), await replicas()
    async with aiohttp.ClientSession() as session:
        for base in (a_url, b_url):  # one finished request on each replica
            async with session.post(
                f"{base}/v1/chat/completions",
                json=chat_body("hi [sim chunks=2]", stream=False),
                headers=AUTH,
            ) as done:
                assert done.status == 200
        async with session.post(
            f"{a_url}/v1/chat/completions",
            json=chat_body("long [sim chunks=5000 delay_ms=5]"),
            headers=AUTH,
        ) as streaming:
            stream_id = streaming.headers["X-Sluice-Stream-Id"]
            head = await read_events(streaming, 3)
            a_process.send_signal(signal.SIGTERM)
            seen = head + await streaming.read()
        assert await a_process.wait() == 0
        assert seen.endswith(b"retry: 1000\n\n")

        async with session.get(f"{b_url}/v1/streams/{stream_id}", headers=AUTH) as found:
            assert found.status == 200
            checkpoint = orjson.loads(await found.read())
        assert checkpoint["status"] == "shutdown"
        async with session.get(
            f"{b_url}/v1/streams/{stream_id}/events", headers={**AUTH, "Last-Event-ID": "0"}
        ) as replay:
            journal = await replay.read()
    assert journal == seen  # every byte A sent, then the same retry hint
    assert [s for s, _ in events(journal) if s is not None][-1] == checkpoint["last_seq"]

    b_process.send_signal(signal.SIGTERM)  # B flushes its ledger buffer on the way out
    assert await b_process.wait() == 0
    connection = await asyncpg.connect(postgres_url)
    try:
        statuses = [row["status"] for row in await connection.fetch("SELECT status FROM ledger")]
    finally:
        await connection.close()
    assert sorted(statuses) == ["cancelled", "completed", "completed"]  # one row per request
