"""The PostgreSQL ledger against a real PostgreSQL: schema, batching, restarts, overflow."""

from __future__ import annotations

import logging
import time

import asyncpg
import pytest

from service.appkeys import GATE
from service.ledger import LedgerEntry, utc_day
from service.pg_ledger import MIGRATIONS, PostgresLedger
from service.settings import Settings
from tests.conftest import AUTH, GatewayFactory, chat_body
from tests.servers import PostgresServer, with_database, with_redis
from tests.streamwire import read_events, with_drain


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
