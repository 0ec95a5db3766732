"""The ledger: exactly one durable record per request, what it cost, and the totals from it.

``Ledger`` is the storage seam (PostgreSQL: ``pg_ledger.py``); ``MemoryLedger`` is the test double
and the default when no data dir is configured; ``SqliteLedger`` is the embedded default
under ``SLUICE_DATA_DIR``. ``record`` never blocks the caller: it collects entries on the
event loop and hands them, one batch per ``HAND_OFF_S`` (or per ``BATCH`` entries), to a
bounded queue that one writer thread drains, one transaction a batch. Handing off batches
rather than entries keeps the writer from waking (and taking the GIL) once per request.
A batch SQLite refuses (disk full, database locked) is kept and written again (up to
``MAX_HELD`` records; older ones past that, what it still refuses at shutdown after a few
more short tries, and a record no column can take go to the ``sluice.ledger.unwritten``
log, one JSON line each, to be replayed). Queries go
through the same thread and queue, after every record submitted before them, so a reader
always sees its own writes. ``close`` (a cleanup context) flushes on shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import queue
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol, TypeVar

log = logging.getLogger(__name__)

DEFAULT_QUEUE_SIZE = 10_000  # batches waiting for the writer thread
BATCH = 512
HAND_OFF_S = 0.25  # the longest an entry waits on the loop before the writer has it
RETRY_S = 1.0  # after a failed write, the writer tries again this soon (or on new work)
LAST_TRIES = 4  # at shutdown, over ~4 s at most; then the records go to the unwritten log
BUSY_TIMEOUT_S = 5.0  # how long a write waits for another connection's lock (sqlite3's own)
EXIT_BUSY_MS = 500  # that wait once the gateway is closing: the exit stays prompt
COMPLAIN_EVERY_S = 10.0  # one error line per this many seconds while SQLite refuses
MAX_HELD = 16 * BATCH  # refused records kept for another try; past it, the oldest are logged
_T = TypeVar("_T")


class LedgerEntry(NamedTuple):
    """One request. ``status``: completed, client_gone, cancelled, provider_error, rejected.

    A row as it is stored, column by column: a tuple, immutable, and made in a third of
    a frozen dataclass's time (one a request)."""

    request_id: str  # the stream id, or ``rej_...`` for a request refused before it started
    ts: float  # unix seconds when the request arrived
    day: str  # UTC date of ``ts``, YYYY-MM-DD (budgets and /v1/usage group by it)
    user_id: str
    tenant: str
    key_id: str
    model_requested: str
    model_served: str | None
    status: str
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    cost_usd: float
    latency_ms: float | None
    ttft_ms: float | None
    stream_id: str | None
    error_code: str | None
    usage_reported: bool  # tokens are the provider's own count (else counted by Sluice)


MAX_TEXT = 256  # a model name or error code: what a row keeps of it
MAX_COUNT = 2**53  # tokens: more than any real request, less than any column's integer limit


def storable(text: str | None) -> str | None:
    """A client's or provider's string fit for every store: no NUL (PostgreSQL refuses it),
    at most ``MAX_TEXT`` characters. (A row a store refuses would hold up every row after.)"""
    if text is None:
        return None
    return text.replace("\x00", "")[:MAX_TEXT]


def storable_count(count: int) -> int:
    """A provider's token count fit for every store (a 64-bit column, a float for cost)."""
    return min(count, MAX_COUNT)


COLUMNS = LedgerEntry._fields
# The last place a record can go when no store will take it: one line each on this logger,
# its fields as JSON, for an operator to replay. A record is never lost without a trace.
unwritten_log = logging.getLogger("sluice.ledger.unwritten")


def log_unwritten(entries: Iterable[LedgerEntry], reason: str) -> None:
    for entry in entries:
        # (json, not orjson: a value no store took may be one orjson refuses too)
        row = json.dumps(entry._asdict(), separators=(",", ":"))
        unwritten_log.error("ledger record not stored (%s): %s", reason, row)


@dataclass(frozen=True, slots=True)
class UsageRow:
    day: str
    model: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float


@dataclass(frozen=True, slots=True)
class SpendRow:
    user_id: str
    tenant: str
    day: str
    cost_usd: float


class Ledger(Protocol):
    unwritten: int  # records that went to the unwritten log instead of the store

    def record(self, entry: LedgerEntry) -> None:
        """Queue one entry; never blocks, never raises."""

    async def usage(
        self, *, user: str | None, tenant: str | None, since_day: str, until_day: str
    ) -> list[UsageRow]: ...

    async def spend_since(self, since_day: str) -> list[SpendRow]: ...

    async def entries(self, *, user: str | None = None) -> list[LedgerEntry]: ...

    async def flush(self) -> None: ...

    async def close(self) -> None: ...


def utc_day(ts: float) -> str:
    return _day_of(int(ts // 86_400))


@functools.lru_cache(maxsize=64)
def _day_of(days_since_epoch: int) -> str:  # strftime is slow, and a day is 86,400 seconds
    return time.strftime("%Y-%m-%d", time.gmtime(days_since_epoch * 86_400))


class MemoryLedger:
    """The newest ``max_entries`` entries, in memory: the test double, and the ledger
    when no data dir is configured (not durable: for tests and development only).
    """

    def __init__(self, *, max_entries: int = 1_000_000) -> None:
        self._entries: deque[LedgerEntry] = deque(maxlen=max_entries)
        self.unwritten = 0

    def record(self, entry: LedgerEntry) -> None:
        self._entries.append(entry)

    async def usage(
        self, *, user: str | None, tenant: str | None, since_day: str, until_day: str
    ) -> list[UsageRow]:
        groups: dict[tuple[str, str], list[LedgerEntry]] = {}
        for e in self._entries:
            if _matches(e, user, tenant) and since_day <= e.day <= until_day:
                groups.setdefault((e.day, e.model_requested), []).append(e)
        return [
            UsageRow(
                day,
                model,
                len(group),
                sum(e.prompt_tokens for e in group),
                sum(e.completion_tokens for e in group),
                sum(e.cost_usd for e in group),
            )
            for (day, model), group in sorted(groups.items())
        ]

    async def spend_since(self, since_day: str) -> list[SpendRow]:
        totals: dict[tuple[str, str, str], float] = {}
        for e in self._entries:
            if e.day >= since_day and e.cost_usd:
                key = (e.user_id, e.tenant, e.day)
                totals[key] = totals.get(key, 0.0) + e.cost_usd
        return [SpendRow(u, t, d, c) for (u, t, d), c in sorted(totals.items())]

    async def entries(self, *, user: str | None = None) -> list[LedgerEntry]:
        return [e for e in self._entries if user is None or e.user_id == user]

    async def flush(self) -> None:
        return None

    async def close(self) -> None:
        return None


def _matches(entry: LedgerEntry, user: str | None, tenant: str | None) -> bool:
    return (user is None or entry.user_id == user) and (tenant is None or entry.tenant == tenant)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS ledger (
    request_id TEXT PRIMARY KEY,
    ts REAL NOT NULL,
    day TEXT NOT NULL,
    user_id TEXT NOT NULL,
    tenant TEXT NOT NULL,
    key_id TEXT NOT NULL,
    model_requested TEXT NOT NULL,
    model_served TEXT,
    status TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    cached_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    cost_usd REAL NOT NULL,
    latency_ms REAL,
    ttft_ms REAL,
    stream_id TEXT,
    error_code TEXT,
    usage_reported INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS ledger_user_day ON ledger (user_id, day);
CREATE INDEX IF NOT EXISTS ledger_tenant_day ON ledger (tenant, day);
"""
_ROWS_PER_STATEMENT = 256  # x 18 columns: well under SQLite's 32,766 variables


@functools.lru_cache(maxsize=16)
def _insert(rows: int) -> str:
    """One INSERT for ``rows`` rows. Each statement step drops and retakes the GIL, which
    costs a thread switch while the event loop is busy: a row a step made the writer cost
    the gateway ~0.08 ms a request; a statement per batch costs next to nothing."""
    values = f"({', '.join('?' for _ in COLUMNS)})"
    return (
        f"INSERT OR IGNORE INTO ledger ({', '.join(COLUMNS)}) "
        f"VALUES {', '.join(values for _ in range(rows))}"
    )


def _statement_sizes(n: int) -> list[int]:
    """``n`` as a sum of powers of two, largest first: few statements, few distinct texts."""
    sizes = []
    while n:
        size = min(_ROWS_PER_STATEMENT, 1 << (n.bit_length() - 1))
        sizes.append(size)
        n -= size
    return sizes


_Job = Callable[[sqlite3.Connection], Any]
_STOP = object()


class SqliteLedger:
    """SQLite in WAL mode, written by one thread; see the module docstring."""

    def __init__(
        self,
        path: Path,
        *,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        busy_timeout_s: float = BUSY_TIMEOUT_S,
    ) -> None:
        self.path = path
        self.dropped = 0  # records the full queue turned away
        self.unwritten = 0  # records logged instead of stored, those included
        self._counting = threading.Lock()
        self._queue: queue.Queue[object] = queue.Queue(maxsize=queue_size)
        self._pending: list[LedgerEntry] = []
        self._hand_off_timer: asyncio.TimerHandle | None = None
        self._complained_at = -COMPLAIN_EVERY_S
        self._busy_ms = busy_timeout_s * 1000
        self._closing = False  # set on the loop by ``close``, read by the writer
        self._short_waits = False  # the writer's lock waits are cut short for the exit
        path.parent.mkdir(parents=True, exist_ok=True)
        connection = sqlite3.connect(
            path, check_same_thread=False, isolation_level=None, timeout=busy_timeout_s
        )
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=NORMAL")
        connection.executescript(_SCHEMA)
        self._thread = threading.Thread(
            target=self._run, args=(connection,), name="ledger-writer", daemon=True
        )
        self._thread.start()

    def record(self, entry: LedgerEntry) -> None:
        self._pending.append(entry)
        if len(self._pending) >= BATCH:
            self._hand_off()
        elif self._hand_off_timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no loop (a script): nothing would fire the timer
                self._hand_off()
                return
            self._hand_off_timer = loop.call_later(HAND_OFF_S, self._hand_off)

    def _hand_off(self) -> None:
        """Give the collected entries to the writer thread as one batch."""
        if self._hand_off_timer is not None:
            self._hand_off_timer.cancel()
            self._hand_off_timer = None
        batch, self._pending = self._pending, []
        if not batch:
            return
        try:
            self._queue.put_nowait(batch)
        except queue.Full:  # the writer is hopelessly behind: never wait on the loop for it
            self.dropped += len(batch)
            self._log_unwritten(batch, "the ledger's queue was full")

    async def _submit(self, job: Callable[[sqlite3.Connection], _T]) -> _T:
        self._hand_off()  # queued before the job: a reader sees every record made before it
        future: Future[_T] = Future()
        await asyncio.to_thread(self._queue.put, (job, future))
        return await asyncio.wrap_future(future)

    async def usage(
        self, *, user: str | None, tenant: str | None, since_day: str, until_day: str
    ) -> list[UsageRow]:
        where, args = _where(user, tenant)
        sql = (
            "SELECT day, model_requested, COUNT(*), SUM(prompt_tokens), SUM(completion_tokens), "
            f"SUM(cost_usd) FROM ledger WHERE day BETWEEN ? AND ? {where} "
            "GROUP BY day, model_requested ORDER BY day, model_requested"
        )
        rows = await self._submit(
            lambda c: c.execute(sql, (since_day, until_day, *args)).fetchall()
        )
        return [UsageRow(*row) for row in rows]

    async def spend_since(self, since_day: str) -> list[SpendRow]:
        sql = (
            "SELECT user_id, tenant, day, SUM(cost_usd) FROM ledger WHERE day >= ? "
            "AND cost_usd > 0 GROUP BY user_id, tenant, day ORDER BY user_id, tenant, day"
        )
        rows = await self._submit(lambda c: c.execute(sql, (since_day,)).fetchall())
        return [SpendRow(*row) for row in rows]

    async def entries(self, *, user: str | None = None) -> list[LedgerEntry]:
        where, args = _where(user, None)
        sql = f"SELECT {', '.join(COLUMNS)} FROM ledger WHERE 1=1 {where} ORDER BY ts"
        rows = await self._submit(lambda c: c.execute(sql, args).fetchall())
        return [_entry(row) for row in rows]

    async def flush(self) -> None:
        await self._submit(lambda c: None)

    async def close(self) -> None:
        """Write everything collected and queued, then stop the writer thread."""
        self._hand_off()
        self._closing = True  # the writer stops waiting long for locks: the exit is near
        if self._thread.is_alive():
            await asyncio.to_thread(self._queue.put, _STOP)
            await asyncio.to_thread(self._thread.join)
        self._log_left()

    def _log_unwritten(self, entries: list[LedgerEntry], reason: str) -> None:
        with self._counting:  # the writer thread's and the loop's: += is no atomic step
            self.unwritten += len(entries)
        log_unwritten(entries, reason)

    def _log_left(self) -> None:
        """What a writer that died left queued goes to the unwritten log (never silently)."""
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, list):
                self._log_unwritten(item, "the ledger's writer had stopped")

    def _run(self, connection: sqlite3.Connection) -> None:
        with contextlib.closing(connection):
            held: list[LedgerEntry] = []  # what SQLite refused: kept, tried again
            while True:
                try:
                    item = self._queue.get(timeout=RETRY_S if held else None)
                except queue.Empty:
                    item = None
                if self._closing and not self._short_waits:
                    self._shorten_waits(connection)  # a lock held at exit: not a wait a batch
                batch, item = self._gather(held, item)
                try:
                    held = self._store(connection, batch)
                except Exception:  # the one writer must outlive anything: every row needs it
                    log.exception("ledger: the writer failed a batch")
                    self._log_unwritten(batch, "the ledger's writer failed it")
                    held = []
                if isinstance(item, tuple):
                    _run_job(connection, *item)
                elif item is _STOP:
                    if held and not self._last_tries(connection, held):
                        self._log_unwritten(held, "SQLite refused it until shutdown")
                    return

    def _gather(self, held: list[LedgerEntry], item: object) -> tuple[list[LedgerEntry], object]:
        """``held`` with ``item`` and the batches queued behind it (consecutive batches
        share one transaction), and the item that stopped the gathering (a job, the stop)."""
        batch = held
        while isinstance(item, list):
            batch = batch + item
            try:
                more = len(batch) < BATCH or self._closing
                item = self._queue.get_nowait() if more else None
            except queue.Empty:
                item = None
        return batch, item

    def _store(self, connection: sqlite3.Connection, batch: list[LedgerEntry]) -> list[LedgerEntry]:
        """Write ``batch``; return what SQLite refused, bounded by ``MAX_HELD`` (the oldest
        past that go to the unwritten log)."""
        refused = batch if batch and not self._write(connection, batch) else []
        if len(refused) > MAX_HELD:
            self._log_unwritten(refused[:-MAX_HELD], "SQLite refused it for too long")
            refused = refused[-MAX_HELD:]
        return refused

    def _shorten_waits(self, connection: sqlite3.Connection) -> None:
        self._short_waits = True
        with contextlib.suppress(sqlite3.Error):  # (then the waits stay long: no worse)
            connection.execute(f"PRAGMA busy_timeout = {int(min(self._busy_ms, EXIT_BUSY_MS))}")

    def _write(self, connection: sqlite3.Connection, batch: Sequence[LedgerEntry]) -> bool:
        """One transaction for ``batch``; False (nothing written) when SQLite refused it
        (locked, full, unwritable: it may pass). A batch that no retry could store (a value
        no column takes) is written row by row: the rows that fit are stored, the others go
        to the unwritten log, and none holds up every later batch."""
        try:
            _insert_all(connection, batch)
        except sqlite3.OperationalError as exc:
            now = time.monotonic()
            if now - self._complained_at >= COMPLAIN_EVERY_S:  # not a traceback a batch
                self._complained_at = now
                log.error("ledger: SQLite refused %d records (%s); retrying", len(batch), exc)
            return False
        except Exception:
            log.exception("ledger: a batch of %d records SQLite cannot store", len(batch))
            for entry in batch:
                try:
                    _insert_all(connection, [entry])
                except sqlite3.OperationalError:
                    return False  # the database itself refuses now: the batch is kept
                except Exception:
                    self._log_unwritten([entry], "SQLite cannot store it")
        return True

    def _last_tries(self, connection: sqlite3.Connection, batch: list[LedgerEntry]) -> bool:
        """At shutdown: a few more tries of what SQLite refused (a lock may clear), each
        waiting for a lock no more than half a second, so the exit stays prompt."""
        self._shorten_waits(connection)
        for _ in range(LAST_TRIES):
            time.sleep(RETRY_S / 2)  # the writer thread's own wait, not the loop's
            if self._write(connection, batch):
                return True
        return False


def _insert_all(connection: sqlite3.Connection, batch: Sequence[LedgerEntry]) -> None:
    """``batch`` in one transaction, a statement per power-of-two slice of it."""
    with connection:
        connection.execute("BEGIN")
        done = 0
        for size in _statement_sizes(len(batch)):
            rows = batch[done : done + size]
            connection.execute(_insert(size), [v for e in rows for v in e])
            done += size


def _run_job(connection: sqlite3.Connection, job: _Job, future: Future[Any]) -> None:
    if not future.set_running_or_notify_cancel():
        return  # its caller stopped waiting (a client that left): nobody reads the answer
    try:
        result = job(connection)
    except Exception as exc:
        future.set_exception(exc)
    else:
        future.set_result(result)


def _where(user: str | None, tenant: str | None) -> tuple[str, tuple[str, ...]]:
    clauses, args = [], []
    if user is not None:
        clauses.append("AND user_id = ?")
        args.append(user)
    if tenant is not None:
        clauses.append("AND tenant = ?")
        args.append(tenant)
    return " ".join(clauses), tuple(args)


def _entry(row: Sequence[Any]) -> LedgerEntry:
    return LedgerEntry._make((*row[:-1], bool(row[-1])))  # SQLite has no bool: 0 or 1
