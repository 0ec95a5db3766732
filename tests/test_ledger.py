"""The ledger: one durable row per request, with the tokens actually generated and their cost."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
import time
from concurrent.futures import Future
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestClient

from service import admission, tokens
from service import ledger as ledger_module
from service.admission import Gate
from service.appkeys import GATE, STREAMS
from service.auth import Principal
from service.handlers import chat as chat_handler
from service.ledger import LedgerEntry, MemoryLedger, SqliteLedger, utc_day
from service.limits import MemoryLimiter
from service.provider_client import ProviderClient
from service.request import parse_chat_request
from service.settings import LimitSettings, MoneySettings, Settings
from service.simulator import SimStats
from service.stream import Progress
from tests.conftest import AUTH, GatewayFactory, chat_body, with_provider, with_streams
from tests.resilient import Sleeps, start

Client = TestClient[web.Request, web.Application]


def entry(request_id: str, **changes: Any) -> LedgerEntry:
    now = time.time()
    base = LedgerEntry(
        request_id=request_id,
        ts=now,
        day=utc_day(now),
        user_id="alice",
        tenant="acme",
        key_id="k1",
        model_requested="gpt-4o-mini",
        model_served="gpt-4o-mini",
        status="completed",
        prompt_tokens=10,
        cached_tokens=0,
        completion_tokens=5,
        cost_usd=0.25,
        latency_ms=12.5,
        ttft_ms=3.0,
        stream_id=request_id,
        error_code=None,
        usage_reported=True,
    )
    return base._replace(**changes)


async def finished(client: Client, response: ClientResponse) -> None:
    """Wait until the response's stream has ended and its finish hooks (the ledger) ran."""
    stream = client.app[STREAMS].get(response.headers["X-Sluice-Stream-Id"])
    assert stream is not None
    await client.app[STREAMS].settled(stream)


async def test_sqlite_rows_survive_a_restart(tmp_path: Path) -> None:
    """Rows are written by the writer thread, flushed on close, and read back after reopening."""
    path = tmp_path / "ledger.sqlite3"
    ledger = SqliteLedger(path)
    for index in range(3):
        ledger.record(entry(f"strm_{index}", completion_tokens=index))
    ledger.record(entry("strm_0", completion_tokens=99))  # a duplicate id never adds a row
    await ledger.close()
    reopened = SqliteLedger(path)
    rows = await reopened.entries()
    assert [(r.request_id, r.completion_tokens) for r in rows] == [
        ("strm_0", 0),
        ("strm_1", 1),
        ("strm_2", 2),
    ]
    assert rows[0] == entry("strm_0", completion_tokens=0, ts=rows[0].ts, day=rows[0].day)
    await reopened.close()


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
async def test_usage_and_spend_group_by_day_and_model(kind: str, tmp_path: Path) -> None:
    """Both ledgers total requests, tokens and cost per (day, model) and spend per user/day."""
    ledger: Any = MemoryLedger() if kind == "memory" else SqliteLedger(tmp_path / "l.sqlite3")
    ledger.record(entry("a", day="2026-11-01"))
    ledger.record(entry("b", day="2026-11-01", model_requested="gpt-4o", cost_usd=1.0))
    ledger.record(entry("c", day="2026-11-02"))
    ledger.record(entry("d", day="2026-11-02", user_id="bob"))
    ledger.record(entry("e", day="2026-10-31"))
    rows = await ledger.usage(
        user="alice", tenant=None, since_day="2026-11-01", until_day="2026-11-30"
    )
    assert [(r.day, r.model, r.requests, r.prompt_tokens, r.cost_usd) for r in rows] == [
        ("2026-11-01", "gpt-4o", 1, 10, 1.0),
        ("2026-11-01", "gpt-4o-mini", 1, 10, 0.25),
        ("2026-11-02", "gpt-4o-mini", 1, 10, 0.25),
    ]
    tenant = await ledger.usage(
        user=None, tenant="acme", since_day="2026-11-02", until_day="2026-11-02"
    )
    assert [(r.requests, r.cost_usd) for r in tenant] == [(2, 0.5)]
    spend = await ledger.spend_since("2026-11-01")
    assert [(s.user_id, s.day, s.cost_usd) for s in spend] == [
        ("alice", "2026-11-01", 1.25),
        ("alice", "2026-11-02", 0.25),
        ("bob", "2026-11-02", 0.25),
    ]
    await ledger.close()


async def hold_writer(ledger: SqliteLedger) -> tuple[threading.Event, asyncio.Future[None]]:
    """Busy the writer thread with a job until the returned event is set (and the job,
    the future, is done): what is queued meanwhile waits for it."""
    started, release = threading.Event(), threading.Event()

    def hold(_: Any) -> None:
        started.set()
        release.wait()

    held = asyncio.ensure_future(ledger._submit(hold))
    await asyncio.to_thread(started.wait)
    return release, held


async def test_record_never_blocks_when_the_writer_is_behind(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """With the queue full, a hand-off returns at once and counts the drop instead of
    waiting; the dropped record goes whole to the unwritten log, to be replayed."""
    ledger = SqliteLedger(tmp_path / "l.sqlite3", queue_size=1)
    release, held = await hold_writer(ledger)
    ledger.record(entry("fits"))
    ledger._hand_off()  # what the hand-off timer does: the one free place takes this batch
    ledger.record(entry("dropped"))
    ledger._hand_off()
    assert (ledger.dropped, ledger.unwritten) == (1, 1)
    (line,) = [r.getMessage() for r in caplog.records if r.name == "sluice.ledger.unwritten"]
    assert '"request_id":"dropped"' in line
    release.set()
    await held
    assert [e.request_id for e in await ledger.entries()] == ["fits"]
    await ledger.close()


async def test_a_batch_sqlite_refuses_is_written_later_not_lost(tmp_path: Path) -> None:
    """While the database refuses writes a record waits in the writer, then lands once
    SQLite accepts writes again: a failed transaction never loses a record."""
    ledger = SqliteLedger(tmp_path / "l.sqlite3")
    await ledger._submit(lambda c: c.execute("PRAGMA query_only=ON"))
    ledger.record(entry("kept"))
    await ledger.flush()  # the write was tried, and refused
    count = await ledger._submit(lambda c: c.execute("SELECT COUNT(*) FROM ledger").fetchone())
    assert count == (0,)
    await ledger._submit(lambda c: c.execute("PRAGMA query_only=OFF"))
    assert [e.request_id for e in await ledger.entries()] == ["kept"]
    await ledger.close()


async def test_a_query_its_caller_gave_up_on_leaves_the_writer_running(
    tmp_path: Path,
) -> None:
    """A ``/v1/usage`` whose client left (its await cancelled) while the query waited in the
    queue: the writer skips it and goes on; it once died there, and every later row with it."""
    ledger = SqliteLedger(tmp_path / "l.sqlite3")
    release, held = await hold_writer(ledger)
    ran: list[bool] = []
    abandoned: Future[None] = Future()
    ledger._queue.put((lambda c: ran.append(True), abandoned))
    abandoned.cancel()  # what cancelling the task awaiting it does (``asyncio.wrap_future``)
    release.set()
    await held
    ledger.record(entry("after"))
    assert [e.request_id for e in await ledger.entries()] == ["after"]
    assert ran == []
    await ledger.close()
    assert [e.request_id for e in await SqliteLedger(tmp_path / "l.sqlite3").entries()] == ["after"]


async def test_records_sqlite_refuses_for_long_are_bounded_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While SQLite refuses every write, the writer keeps at most ``MAX_HELD`` records for
    another try; older ones go to the unwritten log instead of growing without bound."""
    monkeypatch.setattr(ledger_module, "MAX_HELD", 3)
    ledger = SqliteLedger(tmp_path / "l.sqlite3")
    await ledger._submit(lambda c: c.execute("PRAGMA query_only=ON"))
    for index in range(5):
        ledger.record(entry(f"r{index}"))
        await ledger.flush()  # a batch a write attempt, each refused
    logged = [r.getMessage() for r in caplog.records if r.name == "sluice.ledger.unwritten"]
    assert [line.split('"request_id":"')[1][:2] for line in logged] == ["r0", "r1"]
    assert ledger.unwritten == 2  # what /metrics says (sluice_ledger_unwritten_total)
    await ledger._submit(lambda c: c.execute("PRAGMA query_only=OFF"))
    assert [e.request_id for e in await ledger.entries()] == ["r2", "r3", "r4"]
    await ledger.close()


async def test_a_locked_database_at_shutdown_costs_short_waits(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Another connection holds the write lock as the gateway stops with batches queued:
    the writer stops waiting the full busy timeout a batch (a minute's traffic would have
    taken hours, past any pod's grace); what stays refused goes to the unwritten log."""
    path = tmp_path / "l.sqlite3"
    ledger = SqliteLedger(path, busy_timeout_s=60)
    locker = sqlite3.connect(path, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    release, held = await hold_writer(ledger)
    for index in range(3):
        ledger.record(entry(f"r{index}"))
        ledger._hand_off()
    # The writer is released once ``close`` has marked the exit (its first step).
    asyncio.get_running_loop().call_soon(release.set)
    await ledger.close()  # with 60 s a wait, three batches would take minutes (the timeout)
    await held
    locker.execute("ROLLBACK")
    locker.close()
    logged = [r.getMessage() for r in caplog.records if r.name == "sluice.ledger.unwritten"]
    assert len(logged) == 3


async def test_wire_completed_stream_row(gateway: GatewayFactory) -> None:
    """A completed stream: the provider's usage, its cost, TTFT, latency, ids and models."""
    client = await gateway()
    body = chat_body("bill me [sim chunks=7]")
    response = await client.post("/v1/chat/completions", json=body, headers=AUTH)
    assert (await response.text()).endswith("data: [DONE]\n\n")
    await finished(client, response)
    gate = client.app[GATE]
    (row,) = await gate.ledger.entries()
    prompt = tokens.count_chat("gpt-4o-mini", body)
    assert row.status == "completed"
    assert (row.prompt_tokens, row.completion_tokens, row.usage_reported) == (prompt, 7, True)
    assert row.cost_usd == float(gate.prices.cost("gpt-4o-mini", prompt, 7))
    assert row.cost_usd > 0
    assert row.stream_id == row.request_id == response.headers["X-Sluice-Stream-Id"]
    assert (row.user_id, row.tenant, row.model_requested) == ("dev", "dev", "gpt-4o-mini")
    assert row.model_served == "gpt-4o-mini"
    assert row.ttft_ms is not None
    assert row.latency_ms is not None
    assert 0 <= row.ttft_ms <= row.latency_ms


async def test_wire_aborted_stream_is_billed_for_what_was_generated(
    gateway: GatewayFactory, settings: Settings, sim_stats: SimStats
) -> None:
    """Client drops after k chunks (grace 0): one client_gone row, billed k tokens, not max."""
    client = await gateway(with_streams(settings, disconnect_grace_s=0))
    k = 4
    body = chat_body(f"abort me [sim chunks=50 stall_after={k}]", max_tokens=500)
    response = await client.post("/v1/chat/completions", json=body, headers=AUTH)
    stream = client.app[STREAMS].get(response.headers["X-Sluice-Stream-Id"])
    assert stream is not None
    seen = 0
    async for line in response.content:
        if line.startswith(b"data: ") and b'"content":" ' in line:
            seen += 1
            if seen == k:
                break
    response.close()  # the client goes away mid-stream
    await finished(client, response)
    await sim_stats.wait_for(lambda s: s.aborted == 1)
    rows = await client.app[GATE].ledger.entries()
    assert len(rows) == 1
    (row,) = rows
    prompt = tokens.count_chat("gpt-4o-mini", body)
    assert row.status == "client_gone"
    assert (row.prompt_tokens, row.completion_tokens, row.usage_reported) == (prompt, k, False)
    assert row.cost_usd == float(client.app[GATE].prices.cost("gpt-4o-mini", prompt, k))
    assert sim_stats.chunks_sent == [k]


async def test_wire_aborted_stream_with_n_choices_is_billed_for_every_choice(
    gateway: GatewayFactory, settings: Settings, sim_stats: SimStats
) -> None:
    """``n`` = 3, the client drops after k positions: each choice generated k tokens, and the
    row bills all 3k (usage never came), not choice 0's k."""
    client = await gateway(with_streams(settings, disconnect_grace_s=0))
    k, n = 4, 3
    body = chat_body(f"abort us [sim chunks=50 stall_after={k}]", n=n, max_tokens=500)
    response = await client.post("/v1/chat/completions", json=body, headers=AUTH)
    seen = 0
    async for line in response.content:
        if line.startswith(b"data: ") and b'"content":" ' in line:
            seen += 1
            if seen == k * n:
                break
    response.close()
    await finished(client, response)
    await sim_stats.wait_for(lambda s: s.aborted == 1)
    (row,) = await client.app[GATE].ledger.entries()
    assert (row.status, row.completion_tokens, row.usage_reported) == ("client_gone", k * n, False)


async def test_wire_provider_errors_are_recorded(gateway: GatewayFactory) -> None:
    """Refused upstream: a provider_error row at zero cost; failed mid-stream: billed output."""
    client = await gateway()
    refused = await client.post(
        "/v1/chat/completions", json=chat_body("no [sim fail=400]", stream=False), headers=AUTH
    )
    assert refused.status == 400
    await finished(client, refused)
    broken = await client.post(
        "/v1/chat/completions",
        json=chat_body("half [sim chunks=9 malformed_after=3]"),
        headers=AUTH,
    )
    assert b'"error"' in await broken.read()
    await finished(client, broken)
    first, second = await client.app[GATE].ledger.entries()
    assert (first.status, first.prompt_tokens, first.completion_tokens) == ("provider_error", 0, 0)
    assert first.cost_usd == 0.0
    assert (second.status, second.completion_tokens) == ("provider_error", 3)
    assert second.error_code == "provider_protocol_error"
    assert second.cost_usd > 0


async def test_wire_every_request_leaves_exactly_one_row(
    gateway: GatewayFactory, settings: Settings, tmp_path: Path
) -> None:
    """Completed, failed and rejected requests: one SQLite row each, flushed on shutdown."""
    data = tmp_path / "data"
    money = replace(settings.money, data_dir=data)
    limits = replace(settings.limits, context_windows={"gpt-4o": 20})
    client = await gateway(replace(settings, money=money, limits=limits))
    statuses = []
    for text in ("one [sim chunks=2]", "two [sim fail=404]", "three [sim chunks=3]"):
        response = await client.post(
            "/v1/chat/completions", json=chat_body(text, stream=False), headers=AUTH
        )
        statuses.append(response.status)
        await finished(client, response)
    too_long = chat_body("word " * 30, stream=False, model="gpt-4o")
    rejected = await client.post("/v1/chat/completions", json=too_long, headers=AUTH)
    statuses.append(rejected.status)
    assert statuses == [200, 404, 200, 400]
    await client.close()  # cleanup contexts: the ledger flushes and closes
    ledger = SqliteLedger(data / "ledger.sqlite3")
    rows = await ledger.entries()
    await ledger.close()
    assert [r.status for r in rows] == ["completed", "provider_error", "completed", "rejected"]
    assert len({r.request_id for r in rows}) == 4
    assert rows[3].error_code == "context_length_exceeded"
    assert rows[3].request_id.startswith("rej_")


@pytest.mark.parametrize("streaming", [False, True])
async def test_wire_cache_hit_is_recorded_at_zero_cost(
    gateway: GatewayFactory, sim_stats: SimStats, streaming: bool
) -> None:
    """A deterministic request served from the cache (JSON, or replayed as a stream): its own
    row, completed, with the answer's tokens and no provider cost."""
    client = await gateway()
    body = chat_body("cache me [sim chunks=3]", stream=streaming, temperature=0)
    for expected in ("miss", "hit"):
        response = await client.post("/v1/chat/completions", json=body, headers=AUTH)
        assert response.status == 200
        assert response.headers["X-Sluice-Cache"] == expected
        await response.read()
        await finished(client, response)
    assert sim_stats.requests == 1
    miss, hit = await client.app[GATE].ledger.entries()
    assert (miss.status, hit.status) == ("completed", "completed")
    assert miss.cost_usd > 0
    assert hit.cost_usd == 0.0
    assert (hit.prompt_tokens, hit.completion_tokens) == (miss.prompt_tokens, 3)
    assert hit.model_served == miss.model_served == "gpt-4o-mini"
    assert hit.request_id != miss.request_id


async def test_records_reach_the_writer_in_one_batch(tmp_path: Path) -> None:
    """Entries recorded within a hand-off period travel to the writer as one queue item."""
    ledger = SqliteLedger(tmp_path / "l.sqlite3")
    for n in range(5):
        ledger.record(entry(f"r{n}"))
    assert ledger._queue.qsize() == 0  # still on the loop: no thread woken per record
    ledger._hand_off()
    assert [e.request_id for e in await ledger.entries()] == [f"r{n}" for n in range(5)]
    await ledger.close()


async def test_wire_invalid_requests_leave_a_rejected_row(
    gateway: GatewayFactory, settings: Settings
) -> None:
    """Bodies refused before admission (bad JSON, bad fields, too large): one row each."""
    client = await gateway(replace(settings, server=replace(settings.server, max_body_bytes=4096)))
    sent = [
        b"{not json",
        orjson.dumps({"model": "gpt-4o", "messages": []}),
        orjson.dumps(chat_body("hi", max_tokens=0, model="gpt-4.1-mini")),
        orjson.dumps(chat_body("x" * 8192)),
    ]
    statuses = []
    for raw in sent:
        response = await client.post(
            "/v1/chat/completions",
            data=raw,
            headers={**AUTH, "Content-Type": "application/json"},
        )
        assert orjson.loads(await response.read())["error"]["message"]
        statuses.append(response.status)
    assert statuses == [400, 400, 400, 413]
    rows = await client.app[GATE].ledger.entries()
    assert [(r.status, r.model_requested, r.error_code) for r in rows] == [
        ("rejected", "", "invalid_request_error"),
        ("rejected", "gpt-4o", "invalid_request_error"),
        ("rejected", "gpt-4.1-mini", "invalid_request_error"),
        ("rejected", "", "request_too_large"),
    ]
    assert all((r.prompt_tokens, r.completion_tokens, r.cost_usd) == (0, 0, 0.0) for r in rows)
    assert all((r.user_id, r.tenant) == ("dev", "dev") and r.key_id for r in rows)
    assert len({r.request_id for r in rows}) == 4


async def test_wire_websocket_refusals_and_aborts_are_recorded(
    gateway: GatewayFactory, settings: Settings, sim_stats: SimStats
) -> None:
    """Over the WebSocket too: an invalid body is a rejected row; a socket closed after k
    chunks is one client_gone row billed for the k tokens generated."""
    client = await gateway(with_streams(settings, disconnect_grace_s=0))
    ws = await client.ws_connect("/v1/ws", headers=AUTH)
    await ws.send_bytes(b"")  # binary frames are refused too, but are not requests: no row
    await ws.receive()
    await ws.send_str(
        orjson.dumps({"type": "chat.completion.create", "request_id": 1, "body": []}).decode()
    )
    assert orjson.loads((await ws.receive()).data)["type"] == "error"
    k = 3
    body = chat_body(f"abort me [sim chunks=40 stall_after={k}]", max_tokens=400)
    frame = {"type": "chat.completion.create", "request_id": 2, "body": body}
    await ws.send_str(orjson.dumps(frame).decode())
    stream_id = None
    while True:
        message = orjson.loads((await ws.receive()).data)
        stream_id = message["stream_id"]
        if message.get("seq") == k:
            break
    await ws.close()
    stream = client.app[STREAMS].get(stream_id)
    assert stream is not None
    await client.app[STREAMS].settled(stream)
    await sim_stats.wait_for(lambda s: s.aborted == 1)
    rejected, aborted = await client.app[GATE].ledger.entries()
    assert (rejected.status, rejected.error_code) == ("rejected", "invalid_request_error")
    prompt = tokens.count_chat("gpt-4o-mini", {**body, "stream": True})
    assert aborted.status == "client_gone"
    assert aborted.stream_id == stream_id
    assert (aborted.prompt_tokens, aborted.completion_tokens) == (prompt, k)
    assert aborted.cost_usd == float(client.app[GATE].prices.cost("gpt-4o-mini", prompt, k))


async def test_wire_cancelled_stream_is_billed_for_what_was_generated(
    gateway: GatewayFactory, sim_stats: SimStats
) -> None:
    """POST /v1/streams/{id}/cancel after k chunks: one cancelled row, billed k tokens."""
    client = await gateway()
    k = 5
    body = chat_body(f"cancel me [sim chunks=60 stall_after={k}]", max_tokens=600)
    response = await client.post("/v1/chat/completions", json=body, headers=AUTH)
    stream_id = response.headers["X-Sluice-Stream-Id"]
    seen = 0
    while seen < k:
        line = await response.content.readline()
        seen += line.startswith(b"data: ") and b'"content":" ' in line
    cancel = await client.post(f"/v1/streams/{stream_id}/cancel", headers=AUTH)
    assert cancel.status == 200
    assert b'"error"' in await response.read()  # the stream ends with an error event
    await finished(client, response)
    await sim_stats.wait_for(lambda s: s.aborted == 1)
    (row,) = await client.app[GATE].ledger.entries()
    prompt = tokens.count_chat("gpt-4o-mini", body)
    assert (row.status, row.stream_id) == ("cancelled", stream_id)
    assert (row.prompt_tokens, row.completion_tokens, row.usage_reported) == (prompt, k, False)
    assert row.cost_usd == float(client.app[GATE].prices.cost("gpt-4o-mini", prompt, k))


async def test_a_client_gone_while_its_prompt_is_counted_leaves_a_cancelled_row(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Cancelled inside admission (tiktoken still loading, off the loop): one cancelled row at
    zero cost, and nothing left held (stream slot, rate tokens)."""
    entered, release = threading.Event(), threading.Event()
    real_build = tokens._build

    def slow_build(name: str) -> Any:
        entered.set()
        release.wait()
        return real_build(name)

    monkeypatch.setattr(tokens, "_loaded", {})  # cold: the prompt is counted in a thread
    monkeypatch.setattr(tokens, "_build", slow_build)
    gate = Gate(LimitSettings(user_tpm=1000), MoneySettings(user_daily_usd=1.0))
    principal = Principal("alice", "acme", "k1")
    chat = parse_chat_request(orjson.dumps(chat_body("count me")))
    admitting = asyncio.ensure_future(gate.admit(principal, chat))
    await asyncio.to_thread(entered.wait)
    admitting.cancel()
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await admitting
    (row,) = await gate.ledger.entries()
    assert (row.status, row.user_id, row.model_requested) == ("cancelled", "alice", "gpt-4o-mini")
    assert (row.prompt_tokens, row.completion_tokens, row.cost_usd) == (0, 0, 0.0)
    assert isinstance(gate.limiter, MemoryLimiter)
    assert gate.limiter.streams_of("alice") == 0
    assert gate.budgets.status("alice", "acme")["user"]["daily"]["reserved_usd"] == 0.0


@pytest.fixture
def broken_budget_store(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settling or giving back a budget hold raises: a store failing as nobody foresaw."""

    async def broken_settle(*_: Any) -> None:
        raise RuntimeError("the budget store broke")

    monkeypatch.setattr(admission, "settle_budget", broken_settle)


@pytest.mark.usefixtures("broken_budget_store")
async def test_a_settlement_that_fails_still_frees_the_slot_and_writes_the_row(
    gateway: GatewayFactory, settings: Settings
) -> None:
    """Settling the budget raises: the stream's slot is freed and its row written all the
    same."""
    client = await gateway(replace(settings, money=replace(settings.money, user_daily_usd=5.0)))
    response = await client.post("/v1/chat/completions", json=chat_body("hi"), headers=AUTH)
    assert response.status == 200
    await response.read()
    row = await _row_when_ended(client, response.headers["X-Sluice-Stream-Id"])
    assert (row.status, row.completion_tokens > 0) == ("completed", True)
    limiter = client.app[GATE].limiter
    assert isinstance(limiter, MemoryLimiter)
    assert limiter.streams_of("dev") == 0


@pytest.mark.usefixtures("broken_budget_store")
async def test_a_release_whose_budget_fails_still_frees_the_slot() -> None:
    """An admission given back (its request never ran) frees the stream slot even when
    giving back the budget hold raises."""
    gate = Gate(LimitSettings(), MoneySettings(user_daily_usd=1.0))
    chat = parse_chat_request(orjson.dumps(chat_body("count me")))
    admitted = await gate.admit(Principal("alice", "acme", "k1"), chat)
    assert isinstance(gate.limiter, MemoryLimiter)
    assert gate.limiter.streams_of("alice") == 1
    with pytest.raises(RuntimeError):
        await admitted.release()
    assert gate.limiter.streams_of("alice") == 0


async def test_a_client_gone_while_its_body_arrives_leaves_a_cancelled_row(
    gateway: GatewayFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Headers and a tenth of the body, then the socket closes: the handler is cancelled
    while reading, and the request still has its one row (cancelled, zero cost)."""
    client = await gateway()
    reading, recorded = asyncio.Event(), asyncio.Event()
    read_body = chat_handler._read_body

    async def spy_read(request: web.Request) -> bytes:
        reading.set()
        return await read_body(request)

    monkeypatch.setattr(chat_handler, "_read_body", spy_read)
    ledger = client.app[GATE].ledger
    record = ledger.record

    def spy_record(entry: LedgerEntry) -> None:
        record(entry)
        recorded.set()

    monkeypatch.setattr(ledger, "record", spy_record)
    _, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Authorization: " + AUTH["Authorization"].encode() + b"\r\n"
        b"Content-Length: 100\r\n\r\n" + b'{"model": "'
    )
    await writer.drain()
    await reading.wait()
    writer.close()
    async with asyncio.timeout(10):  # a safety net: without the row this would wait forever
        await recorded.wait()
    (row,) = await ledger.entries()
    assert (row.status, row.user_id, row.cost_usd) == ("cancelled", "dev", 0.0)


async def _row_when_ended(client: Client, stream_id: str) -> LedgerEntry:
    stream = client.app[STREAMS].get(stream_id)
    assert stream is not None
    await client.app[STREAMS].settled(stream)
    (row,) = [r for r in await client.app[GATE].ledger.entries() if r.stream_id == stream_id]
    return row


async def test_wire_a_client_gone_while_the_gateway_waits_to_retry_costs_nothing(
    aiohttp_client: Any, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The provider refused (429); the client leaves while the gateway waits to retry: the
    provider has nothing to bill, so neither does the ledger (client_gone, $0)."""
    backing_off = asyncio.Event()

    async def held_sleep(self: Sleeps, delay: float) -> None:
        backing_off.set()
        await asyncio.Event().wait()  # the retry's delay, never over in this test

    monkeypatch.setattr(Sleeps, "__call__", held_sleep)
    rig = await start(aiohttp_client, settings)
    body = chat_body("later [sim fail=429 retry_after=1]", stream=False)
    pending = asyncio.ensure_future(
        rig.client.post("/v1/chat/completions", json=body, headers=AUTH)
    )
    await backing_off.wait()
    (stream,) = rig.client.app[STREAMS].live()
    pending.cancel()
    row = await _row_when_ended(rig.client, stream.id)
    assert (row.status, row.prompt_tokens, row.completion_tokens) == ("client_gone", 0, 0)
    assert row.cost_usd == 0.0


async def test_wire_a_client_gone_while_the_provider_works_is_billed_its_prompt(
    gateway: GatewayFactory, sim_stats: SimStats
) -> None:
    """The provider has the request and holds its answer; the client leaves: the provider
    may bill the prompt it read, so the ledger does (never zero)."""
    client = await gateway()
    body = chat_body("slow [sim first_delay_ms=60000]", stream=False)
    pending = asyncio.create_task(client.post("/v1/chat/completions", json=body, headers=AUTH))
    await sim_stats.wait_for(lambda s: s.requests == 1)
    (stream,) = client.app[STREAMS].live()
    pending.cancel()
    row = await _row_when_ended(client, stream.id)
    assert row.status == "client_gone"
    assert row.prompt_tokens == tokens.count_chat("gpt-4o-mini", body)
    assert row.cost_usd > 0


async def test_wire_an_answer_cut_off_mid_body_is_billed_its_prompt(
    gateway: GatewayFactory,
) -> None:
    """A non-streamed answer cut off half-way was answered (and is not retried): its prompt
    is billed, the text that never arrived is not."""
    client = await gateway()
    body = chat_body("cut [sim chunks=8 reset_after=0]", stream=False)
    response = await client.post("/v1/chat/completions", json=body, headers=AUTH)
    assert response.status == 502
    row = await _row_when_ended(client, response.headers["X-Sluice-Stream-Id"])
    assert (row.status, row.completion_tokens) == ("provider_error", 0)
    assert row.prompt_tokens == tokens.count_chat("gpt-4o-mini", body)
    assert row.cost_usd > 0


@pytest.mark.parametrize("streaming", [False, True])
async def test_wire_a_request_that_outlasts_its_deadline_is_billed_its_prompt(
    gateway: GatewayFactory, settings: Settings, sim_stats: SimStats, streaming: bool
) -> None:
    """The request went out and the provider held its answer past the deadline (504): it
    may be generating it still, and billing it, so the ledger bills the prompt (never zero)
    and the budget counts it."""
    deadlines = {"completion_timeout_s": 0.2, "first_token_timeout_s": 0.2}
    client = await gateway(with_provider(settings, **deadlines))
    body = chat_body("slow [sim header_delay_ms=60000]", stream=streaming)
    response = await client.post("/v1/chat/completions", json=body, headers=AUTH)
    assert response.status == 504
    assert sim_stats.requests == 1
    row = await _row_when_ended(client, response.headers["X-Sluice-Stream-Id"])
    assert (row.status, row.completion_tokens) == ("provider_error", 0)
    assert row.prompt_tokens == tokens.count_chat("gpt-4o-mini", body)
    assert row.cost_usd > 0


async def test_wire_a_client_gone_before_the_request_went_out_costs_nothing(
    gateway: GatewayFactory, sim_stats: SimStats, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client leaves while the gateway is still getting its connection to the provider:
    the request never went out, so nothing is billed."""
    connecting = asyncio.Event()

    async def held_connect(self: Any) -> Any:
        connecting.set()
        await asyncio.Event().wait()  # a connection to the provider that never comes

    monkeypatch.setattr(ProviderClient, "_connection", held_connect)
    client = await gateway()
    body = chat_body("never sent", stream=False)
    pending = asyncio.create_task(client.post("/v1/chat/completions", json=body, headers=AUTH))
    await connecting.wait()
    (stream,) = client.app[STREAMS].live()
    pending.cancel()
    row = await _row_when_ended(client, stream.id)
    assert (row.status, row.prompt_tokens, row.cost_usd) == ("client_gone", 0, 0.0)
    assert sim_stats.requests == 0


async def test_a_record_sqlite_cannot_store_goes_to_the_unwritten_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A value no column takes is logged whole; the rows of its batch that fit are stored,
    and the writer goes on with the rest."""
    ledger = SqliteLedger(tmp_path / "ledger.sqlite3")
    ledger.record(entry("strm_same_batch"))
    ledger.record(entry("strm_bad", completion_tokens=2**70))  # no SQLite integer holds it
    await ledger.flush()
    ledger.record(entry("strm_good"))
    stored = [e.request_id for e in await ledger.entries()]
    assert sorted(stored) == ["strm_good", "strm_same_batch"]
    (line,) = [r for r in caplog.records if r.name == "sluice.ledger.unwritten"]
    assert '"request_id":"strm_bad"' in line.getMessage()
    await ledger.close()


async def test_what_sqlite_refuses_until_shutdown_goes_to_the_unwritten_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Another connection holds the database locked through the shutdown: the records are
    tried a few more times, then logged whole; none is lost without a trace."""
    path = tmp_path / "ledger.sqlite3"
    ledger = SqliteLedger(path, busy_timeout_s=0.05)
    await ledger.flush()  # the schema exists
    with contextlib.closing(sqlite3.connect(path, isolation_level=None, timeout=0)) as lock:
        lock.execute("BEGIN EXCLUSIVE")
        for n in range(3):
            ledger.record(entry(f"strm_{n}"))
        await ledger.close()
        lock.execute("ROLLBACK")
    lines = [r.getMessage() for r in caplog.records if r.name == "sluice.ledger.unwritten"]
    assert sorted(line.split('"request_id":"')[1][:6] for line in lines) == [
        "strm_0",
        "strm_1",
        "strm_2",
    ]


async def test_a_row_keeps_only_what_every_store_can_take(gateway: GatewayFactory) -> None:
    """A client's model name with a NUL in it (PostgreSQL refuses NUL in text; the gateway
    refuses it too, a control character) is recorded without it; the row is there."""
    client = await gateway()
    body = {**chat_body("hi", stream=False), "model": "gpt\x00-nope"}
    response = await client.post("/v1/chat/completions", json=body, headers=AUTH)
    assert response.status == 400
    (row,) = await client.app[GATE].ledger.entries()
    assert (row.status, row.model_requested) == ("rejected", "gpt-nope")


def test_a_refusal_is_generated_text_and_billed_as_such() -> None:
    """A model's refusal streams in ``delta.refusal``, not ``content``: it is output too,
    counted (and billed) when no usage comes."""
    progress = Progress()
    opening = {"role": "assistant", "content": None, "refusal": ""}
    progress.add_chunk({"choices": [{"index": 0, "delta": opening}]})
    refusal = {"refusal": "I'm sorry, I cannot help with that."}
    progress.add_chunk({"choices": [{"index": 0, "delta": refusal}]})
    assert progress.text == "I'm sorry, I cannot help with that."
