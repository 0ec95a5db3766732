"""Rate limits: non-blocking leaky buckets per user, tenant and globally; stream caps."""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import replace
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest

from service import registry as registry_module
from service import tokens
from service.appkeys import GATE, STREAMS
from service.limits import (
    STREAM_CAP,
    Denial,
    Grant,
    MemoryLimiter,
    Quota,
    Tier,
    format_duration,
    ratelimit_headers,
)
from service.settings import AuthSettings, Settings
from service.simulator import SimStats
from tests.conftest import AUTH, DEV_KEY, GatewayFactory, chat_body, with_streams
from tests.streamwire import LoopClock, Observed, read_events
from tests.test_ledger import finished
from tests.wire import sse_data


@pytest.fixture
async def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The running loop's time, moved by the test (aiolimiter reads ``loop.time()``)."""
    now = [1000.0]
    monkeypatch.setattr(asyncio.get_running_loop(), "time", lambda: now[0])
    return now


def _granted(outcome: Grant | Denial) -> Grant:
    assert isinstance(outcome, Grant), outcome
    return outcome


async def test_requests_per_minute_deny_then_recover(clock: list[float]) -> None:
    """rpm=2: the third request is denied with the wait until one request has leaked out."""
    limiter = MemoryLimiter()
    tiers = [Tier("user", "alice", rpm=2, tpm=0)]
    first = _granted(await limiter.try_acquire(tiers, 10))
    assert first.requests is not None
    assert first.requests.remaining == 1
    _granted(await limiter.try_acquire(tiers, 10))
    denied = await limiter.try_acquire(tiers, 10)
    assert isinstance(denied, Denial)
    assert denied.unit == "requests"
    assert denied.retry_after_s == pytest.approx(30.0)
    assert denied.requests is not None
    assert denied.requests.remaining == 0
    assert denied.requests.reset_s == pytest.approx(60.0)
    clock[0] += 29.9
    assert isinstance(await limiter.try_acquire(tiers, 10), Denial)
    clock[0] += 0.1
    _granted(await limiter.try_acquire(tiers, 10))


async def test_unused_tokens_are_returned_on_settle(clock: list[float]) -> None:
    """A reservation settled with less usage frees the difference at once; more is a debt."""
    limiter = MemoryLimiter()
    tiers = [Tier("user", "alice", rpm=0, tpm=1000)]
    grant = _granted(await limiter.try_acquire(tiers, 800))
    assert isinstance(await limiter.try_acquire(tiers, 700), Denial)
    await limiter.settle(grant, 300)
    second = _granted(await limiter.try_acquire(tiers, 700))
    assert second.token_quota is not None
    assert second.token_quota.remaining == 0
    await limiter.settle(second, 900)  # used more than reserved: the bucket overflows
    denied = await limiter.try_acquire(tiers, 1)
    assert isinstance(denied, Denial)
    assert denied.retry_after_s == pytest.approx((1200 + 1 - 1000) / (1000 / 60))


async def test_a_denial_takes_nothing_from_any_tier(clock: list[float]) -> None:
    """Check-then-take: when the tenant tier is full, the user's buckets are left untouched."""
    limiter = MemoryLimiter()
    user = Tier("user", "alice", rpm=10, tpm=1000)
    tenant = Tier("tenant", "acme", rpm=1, tpm=0)
    _granted(await limiter.try_acquire([tenant], 0))
    denied = await limiter.try_acquire([user, tenant], 500)
    assert isinstance(denied, Denial)
    assert denied.tier == tenant
    alone = _granted(await limiter.try_acquire([user], 1000))
    assert alone.token_quota is not None
    assert alone.token_quota.remaining == 0


async def test_a_request_larger_than_the_minute_is_flagged(clock: list[float]) -> None:
    """Asking for more tokens than the tier allows per minute can never fit."""
    limiter = MemoryLimiter()
    denied = await limiter.try_acquire([Tier("user", "a", rpm=0, tpm=100)], 101)
    assert isinstance(denied, Denial)
    assert denied.too_large
    assert denied.unit == "tokens"


async def test_stream_cap_counts_open_streams() -> None:
    """open_stream refuses past the cap; close_stream frees a slot; 0 means no cap."""
    limiter = MemoryLimiter()
    assert await limiter.open_stream("alice", 2)
    assert await limiter.open_stream("alice", 2)
    assert not await limiter.open_stream("alice", 2)
    await limiter.close_stream("alice")
    assert await limiter.open_stream("alice", 2)
    assert all([await limiter.open_stream("bob", 0) for _ in range(50)])


async def test_admit_takes_the_stream_slot_and_the_buckets_together(clock: list[float]) -> None:
    """admit: a full stream cap is a ``streams`` denial that takes no bucket; a full bucket
    is a rate denial that leaves the slot free; finish settles and frees the slot."""
    limiter = MemoryLimiter()
    tiers = [Tier("user", "alice", rpm=2, tpm=1000)]
    grant = _granted(await limiter.admit("alice", 1, tiers, 600))
    assert (grant.user, grant.cap, grant.shared) == ("alice", 1, False)
    assert limiter.streams_of("alice") == 1
    full = await limiter.admit("alice", 1, tiers, 1)
    assert isinstance(full, Denial)
    assert full.unit == STREAM_CAP
    assert full.retry_after_s == 1.0
    await limiter.finish(grant, 100)  # 900 tokens are free again, and the slot
    assert limiter.streams_of("alice") == 0
    denied = await limiter.admit("alice", 1, tiers, 901)
    assert isinstance(denied, Denial)
    assert denied.unit == "tokens"
    assert limiter.streams_of("alice") == 0  # the refused request holds no slot
    second = _granted(await limiter.admit("alice", 1, tiers, 900))
    assert second.token_quota is not None
    assert second.token_quota.remaining == 0
    assert second.requests is not None
    assert second.requests.remaining == 0  # the stream-cap denial took no request


async def test_give_back_undoes_an_admission_entirely(clock: list[float]) -> None:
    """What the shared tier refused is returned to the local buckets, request included."""
    limiter = MemoryLimiter()
    tiers = [Tier("user", "alice", rpm=1, tpm=100)]
    limiter.give_back(_granted(await limiter.admit("alice", 1, tiers, 100)))
    assert limiter.streams_of("alice") == 0
    _granted(await limiter.admit("alice", 1, tiers, 100))


def test_headers_look_like_openai() -> None:
    """x-ratelimit-* for requests and tokens, with OpenAI's duration format."""
    assert format_duration(0.02) == "20ms"
    assert format_duration(1.5) == "1.5s"
    assert format_duration(360) == "6m0s"
    assert format_duration(119.6) == "2m0s"  # not "1m60s"
    headers = ratelimit_headers(Quota(60, 59, 1.0), Quota(1000, 10, 59.4))
    assert headers == {
        "x-ratelimit-limit-requests": "60",
        "x-ratelimit-remaining-requests": "59",
        "x-ratelimit-reset-requests": "1s",
        "x-ratelimit-limit-tokens": "1000",
        "x-ratelimit-remaining-tokens": "10",
        "x-ratelimit-reset-tokens": "59.4s",
    }


def with_limits(settings: Settings, **changes: Any) -> Settings:
    return replace(settings, limits=replace(settings.limits, **changes))


async def test_wire_rpm_429_with_openai_headers(
    gateway: GatewayFactory, settings: Settings
) -> None:
    """Over the per-user rpm: 429 rate_limit_exceeded, Retry-After, x-ratelimit-*; and a row."""
    client = await gateway(with_limits(settings, user_rpm=2))
    for remaining, streaming in (("1", True), ("0", False)):
        ok = await client.post(
            "/v1/chat/completions", json=chat_body("hi", stream=streaming), headers=AUTH
        )
        assert ok.status == 200
        await ok.read()
        assert ok.headers["x-ratelimit-limit-requests"] == "2"
        assert ok.headers["x-ratelimit-remaining-requests"] == remaining
    refused = await client.post("/v1/chat/completions", json=chat_body("hi"), headers=AUTH)
    assert refused.status == 429
    error = orjson.loads(await refused.read())["error"]
    assert error["type"] == "rate_limit_error"
    assert error["code"] == "rate_limit_exceeded"
    assert 1 <= int(refused.headers["Retry-After"]) <= 30
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert refused.headers["x-ratelimit-reset-requests"].endswith("s")
    entries = await client.app[GATE].ledger.entries()
    assert [e.status for e in entries].count("rejected") == 1
    assert next(e for e in entries if e.status == "rejected").error_code == "rate_limit_exceeded"


async def test_a_request_no_minute_can_hold_is_not_retried_by_the_sdk(
    gateway: GatewayFactory, settings: Settings, sim_stats: SimStats
) -> None:
    """More tokens than the per-minute limit: waiting cannot help, so the 429 says
    ``x-should-retry: false`` and the openai SDK raises at once instead of resending."""
    client = await gateway(with_limits(settings, user_tpm=100))
    body = chat_body("hi", stream=False, max_tokens=500)
    refused = await client.post("/v1/chat/completions", json=body, headers=AUTH)
    assert refused.status == 429
    assert refused.headers["x-should-retry"] == "false"
    sdk = openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key=DEV_KEY, max_retries=2)
    async with sdk:
        with pytest.raises(openai.RateLimitError):
            await sdk.chat.completions.create(
                model="gpt-4o-mini", messages=body["messages"], max_tokens=500
            )
    rows = await client.app[GATE].ledger.entries()
    assert [row.status for row in rows] == ["rejected"] * 2  # ours, and the SDK's one try
    assert sim_stats.requests == 0


async def test_wire_tokens_reserved_then_refunded(
    gateway: GatewayFactory, settings: Settings
) -> None:
    """tpm: prompt + max_tokens is reserved; after the stream the unused part is returned."""
    body = chat_body("refund me [sim chunks=5]", stream=False, max_tokens=1000)
    prompt = tokens.count_chat("gpt-4o-mini", body)
    reserved, used = prompt + 1000, prompt + 5
    client = await gateway(with_limits(settings, user_tpm=reserved + used + 10))
    first = await client.post("/v1/chat/completions", json=body, headers=AUTH)
    assert first.status == 200
    assert int(first.headers["x-ratelimit-remaining-tokens"]) == used + 10
    await finished(client, first)  # settled: the unused 995 tokens are back
    second = await client.post("/v1/chat/completions", json=body, headers=AUTH)
    assert second.status == 200  # fits only because the first gave back 995 tokens
    await finished(client, second)
    third = await client.post("/v1/chat/completions", json=body, headers=AUTH)
    assert third.status == 429
    assert "tokens" in orjson.loads(await third.read())["error"]["message"]
    assert third.headers["x-ratelimit-limit-tokens"] == str(reserved + used + 10)


async def test_wire_streams_just_ended_are_settled_before_a_refusal(
    gateway: GatewayFactory, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ended streams are settled in batches (``registry.py``); a request that their slot or
    reserved tokens would refuse has them settled first and is asked again: back-to-back
    requests at a cap of one stream, and tokens for one reservation, all pass."""
    monkeypatch.setattr(registry_module, "RETIRE_BATCH_S", 3600.0)  # only when asked
    body = chat_body("hi [sim chunks=5]", max_tokens=1000)
    reserved = tokens.count_chat("gpt-4o-mini", body) + 1000
    client = await gateway(
        with_limits(settings, max_streams_per_user=1, user_tpm=reserved + reserved // 2)
    )
    for _ in range(3):
        response = await client.post("/v1/chat/completions", json=body, headers=AUTH)
        assert response.status == 200
        assert sse_data(await response.text())[-1] == "[DONE]"
    await client.app[STREAMS].retire_now()
    rows = await client.app[GATE].ledger.entries()
    assert [row.status for row in rows] == ["completed"] * 3


async def test_wire_concurrent_stream_cap(gateway: GatewayFactory, settings: Settings) -> None:
    """A user at the stream cap gets 429 until one of their streams ends."""
    client = await gateway(with_limits(settings, max_streams_per_user=1))
    held = await client.post(
        "/v1/chat/completions", json=chat_body("hold [sim chunks=5 stall_after=1]"), headers=AUTH
    )
    assert held.status == 200
    second = await client.post("/v1/chat/completions", json=chat_body("hi"), headers=AUTH)
    assert second.status == 429
    assert orjson.loads(await second.read())["error"]["code"] == "concurrent_streams_exceeded"
    stream_id = held.headers["X-Sluice-Stream-Id"]
    cancel = await client.post(f"/v1/streams/{stream_id}/cancel", headers=AUTH)
    assert cancel.status == 200
    stream = client.app[STREAMS].get(stream_id)
    assert stream is not None
    assert not stream.running  # settled (its slot freed) before the cancel answered
    third = await client.post("/v1/chat/completions", json=chat_body("hi"), headers=AUTH)
    assert third.status == 200
    await third.read()
    held.close()
    await finished(client, third)
    rows = await client.app[GATE].ledger.entries()
    assert sorted((r.status, r.error_code) for r in rows) == [
        ("cancelled", "stream_cancelled"),
        ("completed", None),
        ("rejected", "concurrent_streams_exceeded"),
    ]


async def test_a_cap_held_by_an_abandoned_stream_says_when_its_grace_ends(
    gateway: GatewayFactory, settings: Settings, loop_clock: LoopClock
) -> None:
    """The user's one slot is held by a stream whose client left (its grace window runs,
    10 s): the 429 says to come back when that window ends, not in a second (the SDKs'
    retries would all fail before it); with a reader on it, a second is all it can say."""
    client = await gateway(
        with_streams(with_limits(settings, max_streams_per_user=1), disconnect_grace_s=10)
    )
    observed = Observed(client.app[STREAMS])
    held = await client.post(
        "/v1/chat/completions", json=chat_body("hold [sim stall_after=1]"), headers=AUTH
    )
    await read_events(held, 2)
    busy = await client.post("/v1/chat/completions", json=chat_body("hi"), headers=AUTH)
    assert (busy.status, busy.headers["Retry-After"]) == (429, "1")  # it is being read
    stream_id = held.headers["X-Sluice-Stream-Id"]
    held.close()
    await observed.wait(stream_id, "client_disconnected")
    await loop_clock.advance(4)
    abandoned = await client.post("/v1/chat/completions", json=chat_body("hi"), headers=AUTH)
    assert abandoned.status == 429
    assert abandoned.headers["Retry-After"] == "7"  # the window's 6 s left, and a second
    assert (await client.post(f"/v1/streams/{stream_id}/cancel", headers=AUTH)).status == 200


def _keys_file(path: Path, entries: dict[str, dict[str, Any]]) -> Path:
    document = {"keys": {hashlib.sha256(k.encode()).hexdigest(): v for k, v in entries.items()}}
    path.write_bytes(orjson.dumps(document))
    return path


async def test_wire_per_key_overrides_and_shared_tenant_tier(
    gateway: GatewayFactory, settings: Settings, tmp_path: Path
) -> None:
    """A key's settings override the user rpm; the tenant tier is shared by its users."""
    keys = _keys_file(
        tmp_path / "keys.json",
        {
            "key-alice": {"user": "alice", "tenant": "acme", "settings": {"rpm": 1}},
            "key-bob": {"user": "bob", "tenant": "acme"},
            "key-carol": {"user": "carol", "tenant": "other"},
        },
    )
    custom = with_limits(
        replace(settings, auth=AuthSettings(client_keys_file=keys, dev_key=None)),
        user_rpm=100,
        tenant_rpm=3,
    )
    client = await gateway(custom)

    async def ask(key: str) -> int:
        response = await client.post(
            "/v1/chat/completions",
            json=chat_body("hi", stream=False),
            headers={"Authorization": f"Bearer {key}"},
        )
        await response.read()
        return response.status

    assert [await ask("key-alice"), await ask("key-alice")] == [200, 429]  # own rpm=1
    assert [await ask("key-bob"), await ask("key-bob"), await ask("key-bob")] == [200, 200, 429]
    assert await ask("key-carol") == 200  # another tenant is unaffected


async def test_wire_global_tier_binds_every_tenant(
    gateway: GatewayFactory, settings: Settings, tmp_path: Path
) -> None:
    """The global tier is shared by all users of all tenants; its 429 names the global tier
    and reports the global bucket in x-ratelimit-*."""
    keys = _keys_file(
        tmp_path / "keys.json",
        {
            "key-alice": {"user": "alice", "tenant": "acme"},
            "key-carol": {"user": "carol", "tenant": "other"},
        },
    )
    custom = with_limits(
        replace(settings, auth=AuthSettings(client_keys_file=keys, dev_key=None)),
        user_rpm=100,
        tenant_rpm=100,
        global_rpm=2,
    )
    client = await gateway(custom)
    answers = []
    for key in ("key-alice", "key-carol", "key-carol", "key-alice"):
        response = await client.post(
            "/v1/chat/completions",
            json=chat_body("hi", stream=False),
            headers={"Authorization": f"Bearer {key}"},
        )
        answers.append((response.status, orjson.loads(await response.read())))
        last = response
    assert [status for status, _ in answers] == [200, 200, 429, 429]
    assert "global" in answers[2][1]["error"]["message"]
    assert last.headers["x-ratelimit-limit-requests"] == "2"
    assert last.headers["x-ratelimit-remaining-requests"] == "0"
    assert int(last.headers["Retry-After"]) >= 1


async def test_wire_every_per_key_override_applies(
    gateway: GatewayFactory, settings: Settings, tmp_path: Path
) -> None:
    """A key's tpm, max_tokens, max_streams and monthly_usd replace the configured defaults
    for that key only."""
    keys = _keys_file(
        tmp_path / "keys.json",
        {
            "key-alice": {
                "user": "alice",
                "tenant": "acme",
                "settings": {"tpm": 5000, "max_tokens": 7, "max_streams": 1},
            },
            "key-bob": {"user": "bob", "tenant": "acme"},
            "key-carol": {"user": "carol", "tenant": "acme", "settings": {"monthly_usd": 1e-9}},
        },
    )
    custom = with_limits(
        replace(settings, auth=AuthSettings(client_keys_file=keys, dev_key=None)),
        user_tpm=100_000,
        max_streams_per_user=5,
    )
    custom = with_streams(custom, disconnect_grace_s=0)
    client = await gateway(custom)

    def auth(key: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"}

    body = chat_body("hold [sim chunks=5 stall_after=1]", max_tokens=500)
    prompt = tokens.count_chat("gpt-4o-mini", body)
    held = await client.post("/v1/chat/completions", json=body, headers=auth("key-alice"))
    assert held.status == 200
    assert held.headers["x-ratelimit-limit-tokens"] == "5000"  # own tpm
    assert held.headers["x-ratelimit-remaining-tokens"] == str(5000 - prompt - 7)  # own cap
    second = await client.post("/v1/chat/completions", json=body, headers=auth("key-alice"))
    assert second.status == 429
    assert orjson.loads(await second.read())["error"]["code"] == "concurrent_streams_exceeded"

    bob = [
        await client.post("/v1/chat/completions", json=body, headers=auth("key-bob"))
        for _ in range(2)
    ]
    assert [r.status for r in bob] == [200, 200]  # the defaults: 5 streams, 100k tpm
    assert bob[0].headers["x-ratelimit-limit-tokens"] == "100000"
    assert bob[0].headers["x-ratelimit-remaining-tokens"] == str(100_000 - prompt - 500)

    carol = await client.post(
        "/v1/chat/completions", json=chat_body("hi", stream=False), headers=auth("key-carol")
    )
    assert carol.status == 429
    assert orjson.loads(await carol.read())["error"]["code"] == "budget_exceeded"
    for response in (held, *bob):
        response.close()  # the stalled streams end as client_gone
        await finished(client, response)
