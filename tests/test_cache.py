"""The cache's keys, its opt-in rule, and the in-memory store's byte bound, LRU order and TTL."""

from __future__ import annotations

from service.cache import CachedResponse, MemoryResponseCache, cache_key, cache_wanted
from tests.resilient import FakeClock

BODY = {
    "model": "gpt-4o-mini",
    "messages": [{"role": "user", "content": "hi"}],
    "temperature": 0,
    "tools": [{"type": "function", "function": {"name": "f", "parameters": {"b": 1, "a": 2}}}],
}


def entry(size: int, model: str = "m") -> CachedResponse:
    """An entry whose ``size`` is exactly ``size`` bytes (overheads included)."""
    probe = CachedResponse(model, True, (b"",))
    return CachedResponse(model, True, (b"x" * (size - probe.size),))


def test_key_ignores_field_order_but_not_content() -> None:
    """Equal requests in any key order share a key; any answer-changing field splits it."""
    reordered = dict(reversed(BODY.items()))
    reordered["tools"] = [
        {"function": {"parameters": {"a": 2, "b": 1}, "name": "f"}, "type": "function"}
    ]
    assert cache_key("t", reordered, "gpt-4o-mini") == cache_key("t", BODY, "gpt-4o-mini")
    for change in ({"temperature": 0.5}, {"seed": 7}, {"max_tokens": 5}, {"stop": ["x"]}):
        assert cache_key("t", {**BODY, **change}, "gpt-4o-mini") != cache_key(
            "t", BODY, "gpt-4o-mini"
        )


def test_key_is_scoped_by_tenant_and_model() -> None:
    """Another tenant, or another model, never shares a key."""
    assert cache_key("acme", BODY, "gpt-4o-mini") != cache_key("globex", BODY, "gpt-4o-mini")
    assert cache_key("acme", BODY, "gpt-4o-mini") != cache_key("acme", BODY, "gpt-4o")


def test_key_ignores_fields_that_cannot_change_the_answer() -> None:
    """``user``, ``metadata``, ``store``, the caller's ids and the wire form do not split
    the cache; nor does a field sent as null or at its default, or ``0.0`` for ``0``."""
    noisy = {**BODY, "user": "u-123", "metadata": {"trace": "1"}, "store": True}
    noisy |= {"stream": True, "stream_options": {"include_usage": True}}
    noisy |= {"safety_identifier": "h-1", "prompt_cache_key": "p-1"}
    noisy |= {"temperature": 0.0, "top_p": None, "seed": None, "n": 1}
    assert cache_key("t", noisy, "gpt-4o-mini") == cache_key("t", BODY, "gpt-4o-mini")
    for change in ({"n": 2}, {"top_p": 0.5}, {"temperature": 0.5}):  # these still split it
        assert cache_key("t", {**BODY, **change}, "gpt-4o-mini") != cache_key(
            "t", BODY, "gpt-4o-mini"
        )


def test_cache_is_wanted_for_temperature_zero_or_opt_in() -> None:
    """Deterministic requests use the cache; others only with ``use``; ``bypass`` wins."""
    assert cache_wanted({"temperature": 0}, None)
    assert cache_wanted({"temperature": 0.0}, None)
    assert not cache_wanted({}, None)  # the provider's default temperature is 1
    assert not cache_wanted({"temperature": 0.7}, None)
    assert not cache_wanted({"temperature": False}, None)
    assert cache_wanted({"temperature": 0.7}, "use")
    assert cache_wanted({}, " USE ")
    assert not cache_wanted({"temperature": 0}, "bypass")


async def test_byte_bound_evicts_least_recently_used() -> None:
    """Past max_bytes the least recently *used* entry goes first, and the total stays bounded."""
    cache = MemoryResponseCache(max_bytes=3000)
    await cache.put("a", entry(1000), 60)
    await cache.put("b", entry(1000), 60)
    await cache.put("c", entry(1000), 60)
    assert await cache.get("a") is not None  # a is now more recent than b
    await cache.put("d", entry(1000), 60)
    assert await cache.get("b") is None
    assert all([await cache.get(k) for k in ("a", "c", "d")])
    assert cache.bytes == 3000
    await cache.put("big", entry(2500), 60)
    assert len(cache) == 1
    assert cache.bytes == 2500


async def test_an_entry_larger_than_the_cache_is_not_stored() -> None:
    """One oversized answer does not flush everything else."""
    cache = MemoryResponseCache(max_bytes=2000)
    await cache.put("a", entry(1000), 60)
    await cache.put("huge", entry(2001), 60)
    assert await cache.get("huge") is None
    assert await cache.get("a") is not None


async def test_an_entry_s_usage_and_model_count_toward_the_bound() -> None:
    """The provider's usage object is kept with the entry, whatever its size, and so is a
    model name in any script: both count, as the bytes they are."""
    bare = CachedResponse("m", True, (b"x" * 100,))
    usage = {"prompt_tokens": 1, "details": "d" * 5000}
    assert CachedResponse("m", True, bare.payloads, usage).size >= bare.size + 5000
    assert CachedResponse("模型", True, bare.payloads).size == bare.size + len("模型".encode()) - 1
    cache = MemoryResponseCache(max_bytes=2000)
    await cache.put("k", CachedResponse("m", True, bare.payloads, usage), 60)
    assert await cache.get("k") is None


async def test_replacing_a_key_keeps_the_byte_count_exact() -> None:
    """Re-putting a key replaces its bytes instead of adding to them."""
    cache = MemoryResponseCache(max_bytes=10_000)
    await cache.put("a", entry(1000), 60)
    await cache.put("a", entry(1500), 60)
    assert (len(cache), cache.bytes) == (1, 1500)


async def test_entries_expire_after_their_ttl() -> None:
    """An entry is served until its TTL passes, then forgotten (and its bytes released)."""
    clock = FakeClock()
    cache = MemoryResponseCache(max_bytes=10_000, clock=clock)
    await cache.put("a", entry(1000), 60)
    clock.advance(59.9)
    assert await cache.get("a") is not None
    clock.advance(0.1)
    assert await cache.get("a") is None
    assert cache.bytes == 0


async def test_expired_entries_go_before_live_ones() -> None:
    """Making room, the cache drops what has expired before it evicts anything live, however
    recently the expired entry was read."""
    clock = FakeClock()
    cache = MemoryResponseCache(max_bytes=2000, clock=clock)
    await cache.put("old", entry(1000), 60)
    clock.advance(30)
    await cache.put("live", entry(1000), 60)
    clock.advance(29)
    assert await cache.get("old") is not None  # read last: first in the LRU order's favour
    clock.advance(2)  # old has expired, live has not
    await cache.put("new", entry(1000), 60)
    assert await cache.get("live") is not None
    assert await cache.get("new") is not None
    assert cache.bytes == 2000


async def test_a_put_releases_what_has_expired() -> None:
    """Expired entries give their bytes back at the next put, read or not (a cache that is
    written to but never read again stays bounded by what is live)."""
    clock = FakeClock()
    cache = MemoryResponseCache(max_bytes=100_000, clock=clock)
    for n in range(50):
        await cache.put(f"k{n}", entry(1000), 10)
    clock.advance(11)
    await cache.put("fresh", entry(1000), 10)
    assert (len(cache), cache.bytes) == (1, 1000)


async def test_the_expiry_heap_stays_within_the_byte_bound() -> None:
    """Entries evicted for room (or replaced) leave their expiry behind; it is cleared out
    once such leftovers outnumber the live entries, so a small cache written to all the
    time does not grow a heap of an hour's puts."""
    cache = MemoryResponseCache(max_bytes=10_000, clock=FakeClock())
    for n in range(5_000):
        await cache.put(f"k{n}", entry(1000), 3600)
    assert len(cache) == 10
    assert len(cache._expiry) <= 2 * len(cache) + 64 + 1
    assert await cache.get("k4999") is not None
    assert await cache.get("k4989") is None
