"""The exact-match response cache: keys, entries, and where entries are kept.

A key is the SHA-256 of the tenant and the normalised request (every body field except
those that cannot change the answer, with sorted keys), so tenants never share entries
and a new provider parameter can never produce a wrong hit. ``stream`` and
``stream_options`` are not part of it: an entry is the journal of a *completed*
generation in the form it was made (the provider's raw chunk payloads, or its one JSON
body) and serves both forms, converted by ``assemble.py`` when they differ.

The cache is used only for deterministic requests (``temperature`` 0) or when the client
opts in with ``X-Sluice-Cache: use``; ``X-Sluice-Cache: bypass`` opts out, also from the
cached-only degradation tier. ``ResponseCache`` is the storage seam: ``MemoryResponseCache``
(an LRU bounded in bytes, with TTL) is the default and the test double; a Redis store
implements the same protocol for many replicas.
"""

from __future__ import annotations

import hashlib
import heapq
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

CACHE_HEADER = "X-Sluice-Cache"
HIT = "hit"
MISS = "miss"
BYPASS = "bypass"
OPT_IN = "use"
OPT_OUT = "bypass"

# Cannot change the answer (the wire form is converted on a hit, see ``assemble.py``).
# Fields that do not change the answer (who asks, what is logged or stored, how it travels).
_IGNORED_FIELDS = frozenset(
    {
        "user",
        "metadata",
        "store",
        "stream",
        "stream_options",
        "safety_identifier",
        "prompt_cache_key",
    }
)
_ENTRY_OVERHEAD = 64  # bytes per payload, roughly what a bytes object costs beyond its data


@dataclass(frozen=True, slots=True)
class CachedResponse:
    """A completed generation: chunk payloads (no usage-only chunk) when ``streaming``,
    else one JSON body; ``usage`` as the provider reported it."""

    model: str
    streaming: bool
    payloads: tuple[bytes, ...]
    usage: dict[str, Any] | None = None

    @property
    def size(self) -> int:
        """About what keeping it costs: its payloads, its model and its usage (a provider's
        own object, of any size), and the entry's bookkeeping."""
        usage = len(orjson.dumps(self.usage)) if self.usage else 0
        payloads = sum(len(p) + _ENTRY_OVERHEAD for p in self.payloads)
        return payloads + len(self.model.encode()) + usage + 256


class ResponseCache(Protocol):
    """Where cached responses live until their TTL passes or space runs out."""

    async def get(self, key: str) -> CachedResponse | None: ...

    async def put(self, key: str, entry: CachedResponse, ttl_s: float) -> None: ...

    def fits(self, entry: CachedResponse) -> bool:
        """Whether ``entry`` may be kept at all (no larger than the whole cache)."""
        ...


def cache_key(tenant: str, body: Mapping[str, Any], model: str) -> str:
    """The key of ``body`` asked of ``model`` by ``tenant``: requests that must get the same
    answer share it (a field left out, null or at its default, ``0`` or ``0.0``)."""
    normalised = {
        name: _canonical(value)
        for name, value in body.items()
        if name not in _IGNORED_FIELDS and value is not None and not _default(name, value)
    }
    normalised["model"] = model
    document = orjson.dumps([tenant, normalised], option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(document).hexdigest()


def _default(name: str, value: Any) -> bool:
    return name == "n" and type(value) is int and value == 1


def _canonical(value: Any) -> Any:
    """A whole-number float as the integer it equals (``temperature: 0.0`` is ``0``), if
    JSON can carry it as one here (orjson's integers are 64-bit)."""
    if type(value) is float and value.is_integer() and -(2**63) <= value < 2**64:
        return int(value)
    return value


def cache_wanted(body: Mapping[str, Any], header: str | None) -> bool:
    """The client's opt-in or opt-out, else whether the request is deterministic."""
    choice = (header or "").strip().lower()
    if choice == OPT_IN:
        return True
    if choice == OPT_OUT:
        return False
    temperature = body.get("temperature")
    return temperature == 0 and not isinstance(temperature, bool)


def opted_out(header: str | None) -> bool:
    return (header or "").strip().lower() == OPT_OUT


class MemoryResponseCache:
    """Process-local LRU with TTL, bounded by the bytes of its entries; the expired go
    first (found by a heap of expiry times, not a scan), then the least recently used."""

    def __init__(self, *, max_bytes: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._entries: OrderedDict[str, tuple[float, CachedResponse]] = OrderedDict()
        # A heap of (expiry, key); pairs of entries replaced or dropped linger until it is
        # rebuilt, when they outnumber the live ones (so it stays within twice the entries).
        self._expiry: list[tuple[float, str]] = []
        self._max_bytes = max_bytes
        self._clock = clock
        self.bytes = 0  # invariant: the sum of ``size`` over ``_entries``

    def __len__(self) -> int:
        return len(self._entries)

    async def get(self, key: str) -> CachedResponse | None:
        found = self._entries.get(key)
        if found is None:
            return None
        expires, entry = found
        if expires <= self._clock():
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return entry

    def fits(self, entry: CachedResponse) -> bool:
        return entry.size <= self._max_bytes

    async def put(self, key: str, entry: CachedResponse, ttl_s: float) -> None:
        size = entry.size
        if size > self._max_bytes:
            return  # larger than the whole cache: it would only evict everything else
        if key in self._entries:
            self._drop(key)
        now = self._clock()
        self._entries[key] = (now + ttl_s, entry)
        heapq.heappush(self._expiry, (now + ttl_s, key))
        self.bytes += size
        while self._expiry and self._expiry[0][0] <= now:  # wherever they are in LRU order
            expires, stale = heapq.heappop(self._expiry)
            found = self._entries.get(stale)
            if found is not None and found[0] == expires:  # (not since replaced)
                self._drop(stale)
        while self.bytes > self._max_bytes:
            self._drop(next(iter(self._entries)))
        if len(self._expiry) > 2 * len(self._entries) + 64:  # mostly pairs of entries gone
            self._expiry = [(expires, k) for k, (expires, _) in self._entries.items()]
            heapq.heapify(self._expiry)

    def _drop(self, key: str) -> None:
        _, entry = self._entries.pop(key)
        self.bytes -= entry.size
