"""The PostgreSQL ledger against a real PostgreSQL: schema, batching, restarts, overflow."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import pytest

from service import pg_ledger, resources
from service.appkeys import GATE
from service.ledger import LedgerEntry, utc_day
from service.pg_ledger import MIGRATIONS, PostgresLedger
from service.settings import Settings
from tests.conftest import AUTH, GatewayFactory, chat_body
from tests.processes import python_module
from tests.servers import FreezingProxy, PostgresServer, with_database, with_redis
from tests.streamwire import read_events, with_drain

URL = "/v1/chat/completions"


def entry(n: int, *, user: str = "alice", cost: float = 0.001) -> LedgerEntry:
    ts = time.time()
    return LedgerEntry(
        request_id=f"strm_{n}",
        ts=ts,
        day=utc_day(ts),
        user_id=user,
        tenant="acme",
        key_id="k1",
        model_requested="gpt-4o-mini",
        model_served="gpt-4o-mini",
        status="completed",
        prompt_tokens=10,
        cached_tokens=0,
        completion_tokens=5,
        cost_usd=cost,
        latency_ms=12.5,
        ttft_ms=3.0,
        stream_id=f"strm_{n}",
        error_code=None,
        usage_reported=True,
    )


async def count_rows(url: str) -> int:
    connection = await asyncpg.connect(url)
    try:
        return int(await connection.fetchval("SELECT count(*) FROM ledger"))
    finally:
        await connection.close()


async def test_schema_is_created_and_records_read_back(postgres_url: str) -> None:
    """The first use migrates the schema; entries, usage and spend come back as written."""
    ledger = PostgresLedger(postgres_url, batch=2)
    for n in range(5):
        ledger.record(entry(n, user="alice" if n < 3 else "bob"))
    alice = await ledger.entries(user="alice")
    assert [e.request_id for e in alice] == ["strm_0", "strm_1", "strm_2"]
    first = alice[0]
    assert (first.usage_reported, first.latency_ms, first.error_code) == (True, 12.5, None)
    day = utc_day(time.time())
    usage = await ledger.usage(user="bob", tenant=None, since_day=day, until_day=day)
    assert [(u.requests, u.prompt_tokens, u.completion_tokens) for u in usage] == [(2, 20, 10)]
    spend = await ledger.spend_since(day)
    assert {(s.user_id, round(s.cost_usd, 6)) for s in spend} == {("alice", 0.003), ("bob", 0.002)}
    await ledger.close()

    connection = await asyncpg.connect(postgres_url)
    try:
        version = await connection.fetchval("SELECT max(version) FROM sluice_schema")
    finally:
        await connection.close()
    assert version == len(MIGRATIONS)


async def test_callers_at_once_share_one_pool(postgres_url: str) -> None:
    """Queries that find no pool at the same moment (the writer, ``/v1/usage``, the spend
    loaded at start) make one between them: none is left open after ``close``."""
    ledger = PostgresLedger(postgres_url)
    day = utc_day(time.time())
    await asyncio.gather(*(ledger.spend_since(day) for _ in range(3)))
    await ledger.close()
    connection = await asyncpg.connect(postgres_url)
    try:
        others = await connection.fetchval(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
    finally:
        await connection.close()
    assert others == 0


async def test_a_second_replica_migrates_nothing_and_duplicates_nothing(postgres_url: str) -> None:
    """Two ledgers on one database share the schema; a re-sent record stays one row."""
    first, second = PostgresLedger(postgres_url), PostgresLedger(postgres_url)
    first.record(entry(1))
    await first.flush()
    second.record(entry(1))  # e.g. a retried batch after a lost commit acknowledgement
    second.record(entry(2))
    await second.flush()
    assert await count_rows(postgres_url) == 2
    await first.close()
    await second.close()


async def test_records_survive_a_postgres_restart(
    postgres_url: str, postgres_server: PostgresServer
) -> None:
    """Records made while PostgreSQL is down are held, retried, and all written once it is back."""
    ledger = PostgresLedger(postgres_url, batch=3)
    for n in range(4):
        ledger.record(entry(n))
    await ledger.flush()
    assert ledger.written == 4

    postgres_server.stop()
    try:
        for n in range(4, 10):
            ledger.record(entry(n))
        await ledger.flush(timeout_s=0.5)  # cannot finish: the database is away
        assert ledger.pending == 6
        assert not ledger.healthy
    finally:
        postgres_server.start()
    await ledger.flush()
    assert ledger.pending == 0
    assert ledger.healthy
    assert await count_rows(postgres_url) == 10
    await ledger.close()


async def test_a_full_buffer_drops_new_records_with_a_count_and_a_log_line(
    postgres_url: str, postgres_server: PostgresServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Bounded: past ``buffer`` records the newest are dropped, counted and logged once."""
    ledger = PostgresLedger(postgres_url, buffer=5)
    postgres_server.stop()
    try:
        with caplog.at_level(logging.ERROR, logger="service.pg_ledger"):
            for n in range(8):
                ledger.record(entry(n))
        assert ledger.dropped == 3
        assert ledger.pending == 5
        full = [r for r in caplog.records if "ledger buffer full" in r.getMessage()]
        assert len(full) == 1
    finally:
        postgres_server.start()
    await ledger.close()  # flushes what was held
    assert await count_rows(postgres_url) == 5
    assert ledger.health()["dropped"] == 3


async def test_a_rolling_restart_loses_no_ledger_row(
    gateway: GatewayFactory, settings: Settings, postgres_url: str, redis_url: str
) -> None:
    """Two replicas, one PostgreSQL: A is shut down with a stream open; every request has a row."""
    shared = with_drain(with_database(with_redis(settings, redis_url), postgres_url), 0.05)
    a, b = await gateway(shared), await gateway(shared)
    for client in (a, b, a, b):
        response = await client.post(
            "/v1/chat/completions",
            json=chat_body("hi [sim chunks=2]", stream=False),
            headers=AUTH,
        )
        assert response.status == 200
        await response.read()
    held = await a.post(
        "/v1/chat/completions", json=chat_body("long [sim chunks=500 delay_ms=10]"), headers=AUTH
    )
    stream_id = held.headers["X-Sluice-Stream-Id"]
    await read_events(held, 2)

    await a.close()  # SIGTERM: drain, end the stream as shutdown, flush the ledger, close
    await b.app[GATE].ledger.flush()

    connection = await asyncpg.connect(postgres_url)
    try:
        rows = await connection.fetch("SELECT request_id, status, completion_tokens FROM ledger")
    finally:
        await connection.close()
    assert len(rows) == 5
    by_id = {row["request_id"]: row for row in rows}
    assert by_id[stream_id]["status"] in ("cancelled", "completed")
    assert by_id[stream_id]["completion_tokens"] >= 1  # billed for what was generated


async def test_a_database_that_stops_answering_holds_neither_a_batch_nor_the_shutdown(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """PostgreSQL accepts the connection, then answers nothing: the batch times out (the
    ledger says it is unavailable), and closing gives up within its bounds, logging what
    was not written, instead of outliving the pod's grace period."""
    monkeypatch.setattr(pg_ledger, "BATCH_TIMEOUT_S", 0.2)
    monkeypatch.setattr(pg_ledger, "CLOSE_FLUSH_S", 0.5)
    url = urlsplit(postgres_url)
    proxy = FreezingProxy(url.hostname or "127.0.0.1", url.port or 5432)
    port = await proxy.start()
    ledger = PostgresLedger(postgres_url.replace(f":{url.port}/", f":{port}/"))
    try:
        ledger.record(entry(1))
        await ledger.flush()
        assert ledger.written == 1
        proxy.freeze()
        ledger.record(entry(2))
        with caplog.at_level(logging.ERROR, logger="service.pg_ledger"):
            async with asyncio.timeout(10):  # a safety net: each step is bounded far below
                await ledger.close()
        assert ledger.failures >= 1
        assert "not written to PostgreSQL at shutdown" in caplog.text
    finally:
        await proxy.close()


async def test_a_replica_started_while_postgresql_is_away_waits_not_ready(
    gateway: GatewayFactory,
    settings: Settings,
    postgres_url: str,
    postgres_server: PostgresServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """PostgreSQL down at start: the replica starts (no crash loop) but stays not ready,
    and a completion that reaches it anyway is a 503 to retry (its budgets lack the month's
    spend: counted from zero, then that spend added, it would be counted twice); once
    PostgreSQL is back it loads the spend and serves."""
    monkeypatch.setattr(resources, "SPEND_RETRY_S", 0.05)
    postgres_server.stop()
    try:
        client = await gateway(with_database(settings, postgres_url))
        probe = await client.get("/readyz")
        assert probe.status == 503
        assert (await probe.json()) == {"status": "starting", "waiting_for": ["ledger"]}
        early = await client.post(URL, json=chat_body("hi", stream=False), headers=AUTH)
        assert early.status == 503
        assert early.headers["Retry-After"] == "1"
    finally:
        postgres_server.start()
    (loading,) = [t for t in asyncio.all_tasks() if t.get_name() == "ledger-spend"]
    async with asyncio.timeout(30):  # a safety net: retries every 0.05 s
        await loading
    assert (await client.get("/readyz")).status == 200
    served = await client.post(URL, json=chat_body("hi", stream=False), headers=AUTH)
    assert served.status == 200


async def test_a_record_postgresql_cannot_store_goes_to_the_unwritten_log(
    postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A value no column takes (a NUL in a text) is not retried forever ahead of every
    later record: it is logged whole, and the records after it are written."""
    ledger = PostgresLedger(postgres_url, batch=10)
    poisoned = entry(0)._replace(model_requested="gpt\x00-4o")
    ledger.record(entry(2))  # in the same batch: stored
    ledger.record(poisoned)
    ledger.record(entry(1))
    assert sorted(e.request_id for e in await ledger.entries()) == ["strm_1", "strm_2"]
    (line,) = [r for r in caplog.records if r.name == "sluice.ledger.unwritten"]
    assert '"request_id":"strm_0"' in line.getMessage()
    await ledger.close()


@pytest.mark.parametrize("wrong", ["database", "sslmode"])
async def test_a_database_url_postgresql_refuses_stops_the_start(
    postgres_url: str, tmp_path: Path, wrong: str
) -> None:
    """No such database, or a driver option that is no option: waiting will not fix it, so
    the gateway exits 2 with one line giving the reason (it had waited, not ready, forever,
    with no reason logged)."""
    parts = urlsplit(postgres_url)
    if wrong == "database":
        url = parts._replace(path="/no_such_database").geturl()
    else:
        url = parts._replace(query="sslmode=bogus").geturl()
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "SLUICE_PORT": "0",
        "SLUICE_DATABASE_URL": url,
        "SLUICE_DATA_DIR": str(tmp_path / "data"),
    }
    process = await python_module("service", env=env)
    async with asyncio.timeout(30):
        _, err = await process.communicate()
    assert process.returncode == 2
    message = err.decode()
    assert "sluice: configuration error: SLUICE_DATABASE_URL" in message
    assert ("no_such_database" if wrong == "database" else "sslmode") in message
    assert "Traceback" not in message
