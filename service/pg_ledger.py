"""The ledger in PostgreSQL (asyncpg), for many replicas: ``SLUICE_DATABASE_URL``.

``PostgresLedger`` implements ``ledger.Ledger``. ``record`` only appends to a bounded
in-memory buffer; one writer task drains it in batches (one ``INSERT ... ON CONFLICT DO
NOTHING`` transaction each, so a retried batch never duplicates a row). Records leave the
buffer only after their transaction committed: while PostgreSQL is down or restarting
the writer keeps them and retries with capped backoff, so a restart loses nothing. When
the buffer is full a new record is dropped and counted in ``dropped`` (a metric): the
bound protects the process. A dropped record, one PostgreSQL cannot store (a value no
column takes: no retry would help, and it would hold up every record after it) and what
is still buffered at shutdown go to the ``sluice.ledger.unwritten`` log, one JSON line
each, to be replayed.

The schema is created and migrated on the first connection, under an advisory lock so
replicas starting together do not race; ``sluice_schema`` holds the applied version.
Queries flush first, so a caller reads its own writes. ``close`` (the ledger cleanup
context, after the streams drained) flushes what it can and stops the writer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from typing import Any

import asyncpg

from .errors import ServiceUnavailableError
from .ledger import COLUMNS, LedgerEntry, SpendRow, UsageRow, log_unwritten

log = logging.getLogger(__name__)

MIGRATIONS: tuple[str, ...] = (
    # 1: the ledger, one row per request (see ledger.LedgerEntry)
    """
    CREATE TABLE IF NOT EXISTS ledger (
        request_id TEXT PRIMARY KEY,
        ts DOUBLE PRECISION NOT NULL,
        day TEXT NOT NULL,
        user_id TEXT NOT NULL,
        tenant TEXT NOT NULL,
        key_id TEXT NOT NULL,
        model_requested TEXT NOT NULL,
        model_served TEXT,
        status TEXT NOT NULL,
        prompt_tokens BIGINT NOT NULL,
        cached_tokens BIGINT NOT NULL,
        completion_tokens BIGINT NOT NULL,
        cost_usd DOUBLE PRECISION NOT NULL,
        latency_ms DOUBLE PRECISION,
        ttft_ms DOUBLE PRECISION,
        stream_id TEXT,
        error_code TEXT,
        usage_reported BOOLEAN NOT NULL
    );
    CREATE INDEX IF NOT EXISTS ledger_user_day ON ledger (user_id, day);
    CREATE INDEX IF NOT EXISTS ledger_tenant_day ON ledger (tenant, day);
    """,
)
_LOCK_ID = 0x511CE  # pg_advisory_xact_lock key for migrations
_INSERT = (
    f"INSERT INTO ledger ({', '.join(COLUMNS)}) "
    f"VALUES ({', '.join(f'${i}' for i in range(1, len(COLUMNS) + 1))}) "
    "ON CONFLICT (request_id) DO NOTHING"
)
RETRY_MIN_S = 0.05
RETRY_MAX_S = 2.0
QUERY_FLUSH_S = 5.0
CLOSE_FLUSH_S = 10.0
_DB_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)
# The URL or the credentials are wrong (a bad sslmode, password or database): no wait helps.
_SETUP_ERRORS = (
    asyncpg.ClientConfigurationError,
    asyncpg.InvalidAuthorizationSpecificationError,
    asyncpg.InvalidCatalogNameError,
)
COMPLAIN_EVERY_S = 60.0
# A database that accepts connections but stops answering must not hold a batch (or the
# shutdown) forever: each batch, and closing, is bounded.
BATCH_TIMEOUT_S = 10.0
CLOSE_TIMEOUT_S = 2.0


UNAVAILABLE = "The usage ledger is unavailable; try again shortly."


class LedgerMisconfigured(ServiceUnavailableError):
    """PostgreSQL refuses the gateway's URL or credentials: at start, a configuration error;
    later, a 503 like any outage (``reason`` is for the operator, not the client)."""

    def __init__(self, reason: str) -> None:
        super().__init__(UNAVAILABLE, code="ledger_unavailable")
        self.reason = reason


class PostgresLedger:
    """Buffered, batched, retried writes to PostgreSQL; see the module docstring."""

    def __init__(
        self,
        dsn: str,
        *,
        buffer: int = 10_000,
        batch: int = 500,
        connect_timeout_s: float = 5.0,
    ) -> None:
        self._dsn = dsn
        self._max = buffer
        self._batch = batch
        self._connect_timeout_s = connect_timeout_s
        self._buffer: deque[LedgerEntry] = deque()
        self._pool: asyncpg.Pool | None = None
        self._connecting = asyncio.Lock()
        self._writer: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._drained = asyncio.Event()
        self._drained.set()
        self._overflowing = False
        self.written = 0
        self.dropped = 0
        self.unwritten = 0  # records logged instead of stored (the dropped among them)
        self.failures = 0
        self.healthy = True
        self._complained_at = -COMPLAIN_EVERY_S

    def _log_unwritten(self, entries: list[LedgerEntry], reason: str) -> None:
        self.unwritten += len(entries)
        log_unwritten(entries, reason)

    @property
    def pending(self) -> int:
        return len(self._buffer)

    def record(self, entry: LedgerEntry) -> None:
        """Buffer one entry for the writer; never blocks, never raises."""
        if len(self._buffer) >= self._max:
            self.dropped += 1
            self._log_unwritten([entry], "the PostgreSQL buffer is full")
            if not self._overflowing:
                self._overflowing = True
                log.error(
                    "ledger buffer full (%d records waiting for PostgreSQL): dropping "
                    "new records, first %s",
                    self._max,
                    entry.request_id,
                )
            return
        self._buffer.append(entry)
        self._drained.clear()
        self._wake.set()
        self._start()

    def _start(self) -> None:
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(
                self._write_forever(), name="pg-ledger-writer"
            )

    async def _connect(self) -> asyncpg.Pool:
        async with self._connecting:  # one pool: callers at once (writer, /v1/usage) share it
            return self._pool or await self._new_pool()

    async def _new_pool(self) -> asyncpg.Pool:
        pool = await asyncpg.create_pool(
            self._dsn,
            min_size=0,
            max_size=4,
            timeout=self._connect_timeout_s,
            command_timeout=BATCH_TIMEOUT_S,
        )
        try:
            async with pool.acquire() as connection:
                await migrate(connection)
        except BaseException:
            await pool.close()
            raise
        self._pool = pool
        return pool

    async def _write_forever(self) -> None:
        delay = RETRY_MIN_S
        while True:
            if not self._buffer:
                self._drained.set()
                self._wake.clear()
                await self._wake.wait()
                continue
            batch = [self._buffer[i] for i in range(min(self._batch, len(self._buffer)))]
            try:
                async with asyncio.timeout(BATCH_TIMEOUT_S):
                    pool = await self._connect()
                    async with pool.acquire() as connection, connection.transaction():
                        await connection.executemany(_INSERT, batch)
            except asyncpg.DataError:  # a value no column takes: no retry would store it
                log.exception("ledger: a batch of %d records PostgreSQL cannot store", len(batch))
                await self._one_by_one(batch)
                for _ in batch:
                    self._buffer.popleft()
                continue
            except _DB_ERRORS as exc:
                self.failures += 1
                if self.healthy:
                    log.warning(
                        "ledger: PostgreSQL unavailable (%s: %s); %d records held, retrying",
                        type(exc).__name__,
                        exc,
                        len(self._buffer),
                    )
                self.healthy = False
                await asyncio.sleep(delay)  # backoff while the database is away
                delay = min(delay * 2, RETRY_MAX_S)
                continue
            for _ in batch:
                self._buffer.popleft()
            self.written += len(batch)
            delay = RETRY_MIN_S
            if not self.healthy:
                log.info("ledger: PostgreSQL is back; %d records still buffered", self.pending)
            self.healthy = True
            self._overflowing = False

    async def _one_by_one(self, batch: list[LedgerEntry]) -> None:
        """A refused batch's rows, each on its own: those that fit are stored, the others
        go to the unwritten log (a connection failure here leaves them to the log too)."""
        for entry in batch:
            try:
                async with asyncio.timeout(BATCH_TIMEOUT_S):
                    pool = await self._connect()
                    async with pool.acquire() as connection:
                        await connection.execute(_INSERT, *entry)
                self.written += 1
            except (asyncpg.DataError, *_DB_ERRORS):
                self._log_unwritten([entry], "PostgreSQL cannot store it")

    async def flush(self, timeout_s: float = QUERY_FLUSH_S) -> None:
        """Wait until every buffered record is committed (at most ``timeout_s``)."""
        if not self._buffer:
            return
        self._start()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._drained.wait()

    async def _fetch(self, sql: str, *args: Any) -> list[Any]:
        await self.flush()
        try:
            pool = await self._connect()
            async with pool.acquire() as connection:
                return list(await connection.fetch(sql, *args))
        except _SETUP_ERRORS as exc:
            raise LedgerMisconfigured(f"{type(exc).__name__}: {exc}") from None
        except _DB_ERRORS as exc:
            now = time.monotonic()
            if now - self._complained_at >= COMPLAIN_EVERY_S:  # the reason, now and then
                self._complained_at = now
                log.warning("ledger: PostgreSQL query failed: %s: %s", type(exc).__name__, exc)
            raise ServiceUnavailableError(UNAVAILABLE, code="ledger_unavailable") from None

    async def usage(
        self, *, user: str | None, tenant: str | None, since_day: str, until_day: str
    ) -> list[UsageRow]:
        where, args = _where(user, tenant, first=3)
        rows = await self._fetch(
            "SELECT day, model_requested, COUNT(*), SUM(prompt_tokens), SUM(completion_tokens), "
            f"SUM(cost_usd) FROM ledger WHERE day BETWEEN $1 AND $2 {where} "
            "GROUP BY day, model_requested ORDER BY day, model_requested",
            since_day,
            until_day,
            *args,
        )
        return [UsageRow(r[0], r[1], int(r[2]), int(r[3]), int(r[4]), float(r[5])) for r in rows]

    async def spend_since(self, since_day: str) -> list[SpendRow]:
        rows = await self._fetch(
            "SELECT user_id, tenant, day, SUM(cost_usd) FROM ledger WHERE day >= $1 "
            "AND cost_usd > 0 GROUP BY user_id, tenant, day ORDER BY user_id, tenant, day",
            since_day,
        )
        return [SpendRow(r[0], r[1], r[2], float(r[3])) for r in rows]

    async def entries(self, *, user: str | None = None) -> list[LedgerEntry]:
        where, args = _where(user, None, first=1)
        rows = await self._fetch(
            f"SELECT {', '.join(COLUMNS)} FROM ledger WHERE TRUE {where} ORDER BY ts", *args
        )
        return [LedgerEntry(*row) for row in rows]

    async def close(self) -> None:
        """Flush (bounded), then stop the writer and close the pool."""
        await self.flush(CLOSE_FLUSH_S)
        if self._buffer:
            log.error("ledger: %d records not written to PostgreSQL at shutdown", self.pending)
            self._log_unwritten(list(self._buffer), "PostgreSQL was unavailable at shutdown")
        if self._writer is not None:
            self._writer.cancel()
            await asyncio.wait({self._writer}, timeout=CLOSE_TIMEOUT_S)
        if self._pool is not None:
            try:
                async with asyncio.timeout(CLOSE_TIMEOUT_S):
                    await self._pool.close()
            except TimeoutError:
                self._pool.terminate()  # a database that stopped answering: just drop it

    def health(self) -> dict[str, object]:
        return {
            "state": "ok" if self.healthy else "down",
            "pending": self.pending,
            "written": self.written,
            "dropped": self.dropped,
        }


async def migrate(connection: asyncpg.Connection) -> int:
    """Apply the migrations this database has not seen; return the schema version."""
    async with connection.transaction():
        await connection.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_ID)
        await connection.execute(
            "CREATE TABLE IF NOT EXISTS sluice_schema (version INTEGER NOT NULL)"
        )
        version = await connection.fetchval("SELECT max(version) FROM sluice_schema") or 0
        for number, sql in enumerate(MIGRATIONS[version:], version + 1):
            await connection.execute(sql)
            await connection.execute("INSERT INTO sluice_schema (version) VALUES ($1)", number)
        return len(MIGRATIONS)


def _where(user: str | None, tenant: str | None, *, first: int) -> tuple[str, tuple[str, ...]]:
    clauses: list[str] = []
    args: list[str] = []
    for column, value in (("user_id", user), ("tenant", tenant)):
        if value is not None:
            clauses.append(f"AND {column} = ${first + len(args)}")
            args.append(value)
    return " ".join(clauses), tuple(args)
