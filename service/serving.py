"""What answers a chat request: the cache, the provider (through the fallback chain), or,
when every model tier failed before answering or a budget had no room for the call, the
cache again as the last tier.

``Responder.answer`` is the work the registry runs for a stream. It decides the cache
status (``stream.cache_status``) before the stream is accepted, so the handler can put it
in the response headers (but for a stream whose 200 went out while the provider held its
answer, see ``handlers/chat.py``: a cache replay after that is in the body and the
ledger); a hit replays the entry into the journal exactly as a generation would have
written it, so relaying, resuming, checkpoints and finish hooks (the ledger:
``stream.cache_hit`` means no provider cost) see no difference. Completed misses are stored
by ``fill``, a finish hook, after the client already has its ``[DONE]``. An entry made
by a stream answers a JSON request and the reverse (``assemble.py``); the usage chunk is
stored once and re-sent only to clients that asked for ``include_usage``.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import orjson

from .assemble import assemble, chunks, convertible, is_usage_only, usage_chunk
from .cache import HIT, MISS, CachedResponse, ResponseCache, cache_key, cache_wanted, opted_out
from .checkpoint import Checkpoint
from .errors import SluiceError
from .generation import generate
from .request import ChatRequest
from .resilience import (
    BREAKER_OPEN,
    BUDGET_EXCEEDED,
    BUDGET_PRESSURE,
    ResilientProvider,
    degrade_reason,
)
from .stream import Stream, StreamStatus

log = logging.getLogger(__name__)


class Responder:
    """Runs generations; owns the cache policy and the cached-only degradation tier."""

    def __init__(
        self,
        provider: ResilientProvider,
        cache: ResponseCache | None,
        *,
        ttl_s: float,
        degrade_to_cache: bool,
    ) -> None:
        self.provider = provider
        self._cache = cache
        self._ttl_s = ttl_s
        self._degrade_to_cache = degrade_to_cache
        self._fills: dict[str, ChatRequest] = {}  # stream id -> request, until it ends
        # Set by the budget owner: True starts the stream on its first cheaper fallback.
        self.under_pressure: Callable[[Stream], Awaitable[bool]] | None = None
        # Set by the registry's owner: retire (and so store) the streams that have ended.
        self.settle_ended: Callable[[], Awaitable[bool]] | None = None

    async def answer(
        self,
        stream: Stream,
        chat: ChatRequest,
        cache_header: str | None,
        *,
        only_cached: SluiceError | None = None,
    ) -> None:
        """Serve ``stream`` from the cache or the provider; raises ``SluiceError``.

        ``only_cached``: a budget refused the provider call at admission, where a cached
        answer was found (``has_cached``); it serves, or, gone since, this refusal."""
        if only_cached is not None:
            if not await self._serve_cached(stream, chat, BUDGET_EXCEEDED):
                stream.cache_status = MISS  # looked, and found nothing: not a bypass
                raise only_cached.fresh()
            return
        if self.under_pressure is not None and await self.under_pressure(stream):
            self.provider.degrade(stream, BUDGET_PRESSURE)
        if self._cache is not None and cache_wanted(chat.body, cache_header):
            models = self.provider.first_models(stream)  # (a fallback's answer may serve)
            entry = await self._lookup(stream.owner.tenant, chat, models)
            if entry is None and await self._settled():  # one of them may have been the answer
                entry = await self._lookup(stream.owner.tenant, chat, models)
            if entry is not None:
                _replay(stream, entry, self.provider.scrub_data)
                if entry.model == stream.model:
                    stream.fallback_reason = None  # the answer of the model asked for
                elif stream.fallback_reason is None:  # past a model whose breaker is open
                    stream.fallback_reason = BREAKER_OPEN
                return
            stream.cache_status = MISS
            self._fills[stream.id] = chat
        try:
            await generate(stream, self.provider, chat.upstream_body())
        except SluiceError as exc:
            reason = degrade_reason(exc)
            if reason is None or stream.accepted.is_set() or not self._may_degrade(cache_header):
                raise
            if not await self._serve_cached(stream, chat, reason):
                raise

    async def _settled(self) -> bool:
        """Retire the streams that have ended (they fill the cache as they are retired, in
        batches: ``registry.py``); False when none was waiting."""
        return self.settle_ended is not None and await self.settle_ended()

    async def _serve_cached(self, stream: Stream, chat: ChatRequest, reason: str) -> bool:
        """The cached-only tier: replay an answer cached for any model of ``chat``'s chain,
        saying ``reason``; False when there is none."""
        await self._settled()
        entry = await self._lookup(stream.owner.tenant, chat, self.provider.chain(chat.model))
        if entry is None:
            return False
        stream.fallback_reason = reason
        _replay(stream, entry, self.provider.scrub_data)
        return True

    async def fill(self, stream: Stream, checkpoint: Checkpoint) -> None:
        """Finish hook: store a completed miss under the model that served it."""
        chat = self._fills.pop(stream.id, None)
        if chat is None or self._cache is None or stream.cache_hit:
            return
        if stream.status is not StreamStatus.COMPLETED:
            return  # only whole answers are worth replaying
        payloads = stream.chunk_payloads()
        if stream.streaming and stream.include_usage and payloads and is_usage_only(payloads[-1]):
            payloads.pop()  # stored once, in ``usage``; re-sent to clients that ask for it
        entry = CachedResponse(
            model=stream.served_model,
            streaming=stream.streaming,
            payloads=tuple(payloads),
            usage=stream.progress.usage,
        )
        key = cache_key(stream.owner.tenant, chat.body, stream.served_model)
        await self._cache.put(key, entry, self._ttl_s)

    async def has_cached(self, tenant: str, chat: ChatRequest, cache_header: str | None) -> bool:
        """Whether the cache, as the last degradation tier, holds an answer to ``chat``
        (asked by admission when a budget has no room for a provider call)."""
        if not self._may_degrade(cache_header):
            return False
        return await self._lookup(tenant, chat, self.provider.chain(chat.model)) is not None

    def _may_degrade(self, cache_header: str | None) -> bool:
        return self._degrade_to_cache and self._cache is not None and not opted_out(cache_header)

    async def _lookup(
        self, tenant: str, chat: ChatRequest, models: tuple[str, ...]
    ) -> CachedResponse | None:
        """The first entry for ``chat`` asked of one of ``models``; a store failure is a miss."""
        assert self._cache is not None
        for model in models:
            key = cache_key(tenant, chat.body, model)
            try:
                entry = await self._cache.get(key)
            except Exception:
                log.exception("cache lookup failed (%s)", model)
                return None
            if entry is None or not entry.payloads:
                continue
            if entry.streaming != chat.streaming and (
                chat.body.get("logprobs") or not convertible(entry.payloads, entry.streaming)
            ):
                continue  # conversion would lose part of the answer: only its own form serves
            return entry
        return None


def _replay(stream: Stream, entry: CachedResponse, scrub: Callable[[bytes], bytes]) -> None:
    """Write a cached generation into the journal, folding it into ``stream.progress``
    (an answer assembled from chunks is ``scrub``bed: a credential a provider split across
    two of them is whole in it)."""
    stream.cache_status = HIT
    stream.served_model = entry.model
    progress = stream.progress
    if stream.streaming:
        payloads = list(entry.payloads) if entry.streaming else chunks(entry.payloads[0])
        if stream.include_usage and entry.usage is not None:  # (an answer may have no choice)
            payloads.append(usage_chunk(entry.payloads[0], entry.usage))
        for raw in payloads:
            progress.add_chunk(orjson.loads(raw))
            stream.append(raw)
    else:
        body = (
            scrub(assemble(entry.payloads, entry.usage)) if entry.streaming else entry.payloads[0]
        )
        progress.add_completion(orjson.loads(body))
        stream.append(body)
    if progress.usage is None:
        progress.usage = entry.usage
    stream.accepted.set()
    stream.notify()
