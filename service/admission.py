"""Admission: every check before a provider call, in order, and the settlement after it.

    admit(request, chat)                         before the stream starts
    refuse(principal, source, code)              a body refused before admission: its row
      1. count the prompt (tiktoken), plan the output ceiling   400 context_length_exceeded
      2. the user's concurrent-stream cap                      429 concurrent_streams_exceeded
      3. requests/tokens per minute: user, tenant, global      429 rate_limit_exceeded
      4. USD budgets: user, tenant, per day and month          429 budget_exceeded
         (reserving the dearest model the fallback chain may serve; with no room left, a
         cached answer, if one is at hand, is served instead, at no cost)
    admission.launch(start_stream, app, owner)   binds the stream (or undoes 2-4 if it fails)
    add_admission_headers (middleware.py)        x-ratelimit-*, X-Sluice-Budget-Warning
    Gate.on_finish(stream, checkpoint)           registry finish hook: settle + ledger row

Reservations are made for the worst case (prompt + output ceiling, priced as the dearest
model of the request's fallback chain, since any of them may end up serving it; USD only
when a budget applies) and settled with the real tokens and cost when the stream ends, for
whatever reason. Every
authenticated request leaves exactly one ledger row: a refusal here (an invalid body
included), or the finish hook's row for a started stream.
Per-key overrides come from the keys file (``Principal.settings``): ``rpm``, ``tpm``,
``max_streams``, ``max_tokens``, ``daily_usd``, ``monthly_usd``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import orjson
from aiohttp import web

from . import tokens
from .auth import Principal
from .budgets import ZERO, BudgetLimits, Budgets, Hold
from .checkpoint import Checkpoint, billed_tokens, is_count
from .context import ContextPolicy
from .errors import (
    BudgetExceededError,
    RateLimitError,
    ServiceUnavailableError,
    SluiceError,
    TokenRateLimitError,
)
from .ids import new_id
from .ledger import (
    Ledger,
    LedgerEntry,
    MemoryLedger,
    storable,
    storable_count,
    utc_day,
)
from .limits import STREAM_CAP, Denial, Grant, Limiter, MemoryLimiter, Tier, ratelimit_headers
from .pricing import PriceTable
from .redis_budgets import reserve_budget, settle_budget  # shared across replicas (Redis)
from .request import ChatRequest
from .settings import LimitSettings, MoneySettings
from .stream import NO_LIMITS, Owner, Stream, StreamStatus

log = logging.getLogger(__name__)

BUDGET_WARNING_HEADER = "X-Sluice-Budget-Warning"
OFFLOAD_BYTES = 32_768  # bodies larger than this are counted in a thread, off the loop

_LEDGER_STATUS = {
    StreamStatus.COMPLETED: "completed",
    StreamStatus.CLIENT_GONE: "client_gone",
    StreamStatus.CANCELLED: "cancelled",
    StreamStatus.SHUTDOWN: "cancelled",
    StreamStatus.PROVIDER_ERROR: "provider_error",
    StreamStatus.TIMEOUT: "provider_error",
}


@dataclass(frozen=True, slots=True)
class KeyPolicy:
    """A client key's overrides of the configured defaults (None: use the default)."""

    rpm: int | None = None
    tpm: int | None = None
    max_streams: int | None = None
    max_tokens: int | None = None
    budgets: BudgetLimits | None = None

    @classmethod
    def of(cls, settings: Mapping[str, Any]) -> KeyPolicy:
        def whole(name: str) -> int | None:
            value = settings.get(name)
            return value if isinstance(value, int) and not isinstance(value, bool) else None

        def usd(name: str) -> Decimal | None:
            value = settings.get(name)
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            return Decimal(str(value)) if ok else None

        daily, monthly = usd("daily_usd"), usd("monthly_usd")
        budgets = BudgetLimits(user_daily=daily, user_monthly=monthly)
        return cls(
            rpm=whole("rpm"),
            tpm=whole("tpm"),
            max_streams=whole("max_streams"),
            max_tokens=whole("max_tokens"),
            budgets=budgets if daily is not None or monthly is not None else None,
        )


class Gate:
    """Policy, limiter, budgets, prices and ledger: one per app (``appkeys.GATE``).

    ``limiter`` and ``ledger`` are swappable (Redis, PostgreSQL) before the app starts.
    """

    def __init__(
        self,
        limits: LimitSettings,
        money: MoneySettings,
        *,
        limiter: Limiter | None = None,
        ledger: Ledger | None = None,
        fallbacks: Mapping[str, tuple[str, ...]] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = limits
        self.context = ContextPolicy(
            default_max_tokens=limits.default_max_tokens,
            max_tokens_cap=limits.max_tokens_cap or None,
            reject_over_cap=limits.reject_over_cap,
            windows=limits.context_windows,
        )
        self.prices = PriceTable.with_overrides(money.prices)
        self.budgets = Budgets(
            _budget_limits(money), soft_fraction=money.soft_fraction, clock=clock
        )
        self.limiter: Limiter = limiter or MemoryLimiter()
        self.ledger: Ledger = ledger or MemoryLedger()
        self.fallbacks: Mapping[str, tuple[str, ...]] = fallbacks or {}
        self.soft_fraction = money.soft_fraction
        self.clock = clock
        self.spend_loaded = True  # False while the ledger's spend is still awaited at start
        self._policies: dict[str, KeyPolicy] = {}
        self._tiers: dict[str, tuple[Tier, ...]] = {}  # by key: its user, tenant and policy
        self._pending: dict[str, Admission] = {}
        # Set by the registry's owner: seconds until one of a user's streams nobody reads
        # leaves its grace window (its slot is then free), None when none is in one.
        self.grace_left: Callable[[str], float | None] | None = None
        # Set by the registry's owner: settle every stream that has ended now; False when
        # none was waiting (they are settled in batches, see ``registry.py``).
        self.settle_ended: Callable[[], Awaitable[bool]] | None = None
        # Set by the cache's owner: whether a cached answer to a tenant's request is at hand
        # (the last degradation tier, for a request its budget has no room for).
        self.has_cached: Callable[[str, ChatRequest, str | None], Awaitable[bool]] | None = None

    def policy(self, principal: Principal) -> KeyPolicy:
        policy = self._policies.get(principal.key_id)
        if policy is None:
            policy = self._policies[principal.key_id] = KeyPolicy.of(principal.settings)
        return policy

    def tiers(self, principal: Principal, policy: KeyPolicy) -> tuple[Tier, ...]:
        """The rate tiers of a key's requests (made once a key: its user, tenant and
        policy are the key's for good)."""
        found = self._tiers.get(principal.key_id)
        if found is None:
            s = self.settings
            found = self._tiers[principal.key_id] = (
                Tier(
                    "user",
                    principal.user_id,
                    _pick(policy.rpm, s.user_rpm),
                    _pick(policy.tpm, s.user_tpm),
                ),
                Tier("tenant", principal.tenant, s.tenant_rpm, s.tenant_tpm),
                Tier("global", "*", s.global_rpm, s.global_tpm),
            )
        return found

    def refuse(
        self, principal: Principal, source: object, *, code: str | None, status: str = "rejected"
    ) -> None:
        """Record a request refused before admission (its body invalid, or too large), or
        given up by its client before then (``status="cancelled"``).

        ``source`` is what the client sent (raw bytes or a decoded body), read only for
        the model it names.
        """
        model = _model_named(source)
        self.ledger.record(_rejection(principal, model, self.clock(), code=code, status=status))

    def reachable(self, model: str) -> list[str]:
        """``model`` and every model its request may end up on: its fallbacks, theirs..."""
        found = [model]
        for tried in found:  # grows while it is walked: a breadth-first walk
            found += [m for m in self.fallbacks.get(tried, ()) if m not in found]
        return found

    def worst_cost(
        self,
        model: str,
        prompt_tokens: int,
        output_tokens: int,
        images: int = 0,
        prompts: Mapping[str, int] | None = None,
    ) -> Decimal:
        """The most ``model``'s request can cost: priced as the dearest model it may reach,
        its fallbacks' own fallbacks included (a degraded start follows the fallback's chain),
        each with the prompt counted in its own encoding when ``prompts`` has it (by encoding
        name: a fallback with another tokenizer may see many more tokens). ``prompt_tokens``
        counts each of its ``images`` at the low-detail floor; here each costs the most an
        image can on that model (its size is not known before the call)."""
        cost = self.prices.cost
        if not prompts and not images:  # the usual request: one count, no images
            return max(cost(m, prompt_tokens, output_tokens) for m in self.reachable(model))
        counts = prompts or {}
        return max(
            cost(
                m,
                counts.get(tokens.encoding_name_for_model(m), prompt_tokens)
                + images * _image_extra(m),
                output_tokens,
            )
            for m in self.reachable(model)
        )

    async def _prompts(self, chat: ChatRequest, prompt: int) -> dict[str, int]:
        """The prompt counted in each encoding of the models its request may reach."""
        prompts = {tokens.encoding_name_for_model(chat.model): prompt}
        for model in self.reachable(chat.model)[1:]:
            encoding = tokens.encoding_name_for_model(model)
            if encoding not in prompts:
                prompts[encoding] = await _count_prompt(chat, model)
        return prompts

    def _by_model(self, model: str, prompts: Mapping[str, int]) -> dict[str, int]:
        """``prompts`` (by encoding) for ``model`` and every model its request may reach."""
        return {m: prompts[tokens.encoding_name_for_model(m)] for m in self.reachable(model)}

    def _output_limits(
        self, chat: ChatRequest, planned: int, counts: Mapping[str, int]
    ) -> dict[str, int | None]:
        """Per fallback model, the output ceiling it may be sent: the request's, lowered to
        that model's own ceiling and to what its window leaves after the prompt (``counts``,
        by model, in its tokenizer); None when the prompt alone does not fit it."""
        limits: dict[str, int | None] = {}
        for model in self.reachable(chat.model)[1:]:
            prompt = counts[model]
            window = self.context.window(model)
            room = None if window is None else window - prompt
            bounds = [b for b in (planned, self.context.cap(model), room) if b is not None]
            limits[model] = min(bounds) if room is None or room >= 1 else None
        return limits

    async def under_pressure(self, stream: Stream) -> bool:
        """Start ``stream`` on its first fallback: a budget (the key's own limits included)
        is past its soft fraction, and that fallback is the cheaper model."""
        fallbacks = self.fallbacks.get(stream.model, ())
        if not fallbacks or not self.prices.cheaper(fallbacks[0], stream.model):
            return False
        # Ended streams' holds (their worst cases) count until they are settled.
        return self._pressed(stream) and (not await self._settled() or self._pressed(stream))

    def _pressed(self, stream: Stream) -> bool:
        owner = stream.owner
        policy = self._policies.get(owner.key_id)
        overrides = policy.budgets if policy is not None else None
        if not self.budgets.enforced(overrides):  # (no budget: no pressure, at any fraction)
            return False
        admission = self._pending.get(stream.id)
        own = admission.hold if admission is not None else None  # its worst case: not spent
        pressure = self.budgets.pressure(owner.user_id, owner.tenant, overrides, excluding=own)
        return pressure >= self.soft_fraction

    async def admit(
        self, principal: Principal, chat: ChatRequest, *, cache_header: str | None = None
    ) -> Admission:
        """Run the checks in order; raise the first refusal (after recording it).

        ``cache_header`` is the client's ``X-Sluice-Cache`` choice, for the stream and for
        the cached-only tier."""
        arrived = self.clock()
        try:
            return await self._admit(principal, chat, arrived, cache_header)
        except SluiceError as exc:
            self.ledger.record(_rejection(principal, chat.model, arrived, code=exc.code))
            raise
        except asyncio.CancelledError:  # the client left while we were counting
            self.ledger.record(_rejection(principal, chat.model, arrived, status="cancelled"))
            raise
        except Exception:  # a bug (the middleware's 500): the request still has its row
            self.ledger.record(_rejection(principal, chat.model, arrived, code="server_error"))
            raise

    async def _admit(
        self, principal: Principal, chat: ChatRequest, arrived: float, cache_header: str | None
    ) -> Admission:
        if not self.spend_loaded:  # budgets would count from zero: refuse before reserving
            raise ServiceUnavailableError(
                "The gateway is starting (its ledger is not reachable yet); retry shortly "
                "or on another replica.",
                headers={"Retry-After": "1"},
            )
        policy = self.policy(principal)
        prompt = await _count_prompt(chat)
        plan = self.context.plan_output(
            chat.model, chat.body, prompt, cap_override=policy.max_tokens
        )
        if plan.rewrite:
            chat = chat.with_body({**chat.body, plan.field: plan.max_tokens})
        choices = chat.body.get("n")
        ceiling = plan.max_tokens * (choices if isinstance(choices, int) and choices > 1 else 1)
        user = principal.user_id
        cap = _pick(policy.max_streams, self.settings.max_streams_per_user)
        # The stream slot and the rate buckets together: one round trip when shared.
        outcome = await self._take(user, cap, self.tiers(principal, policy), prompt + ceiling)
        if isinstance(outcome, Denial):
            if outcome.unit == STREAM_CAP:
                raise RateLimitError(
                    f"Too many concurrent streams for this user (limit {cap}).",
                    code="concurrent_streams_exceeded",
                    headers={"Retry-After": str(self._slot_free_in(user))},
                )
            raise _rate_limited(outcome)
        admission = Admission(
            self,
            principal,
            chat,
            arrived,
            outcome,
            cache_header=cache_header,
            prompt_counts={chat.model: prompt},
        )
        try:
            admission.headers.update(ratelimit_headers(outcome.requests, outcome.token_quota))
            images = tokens.count_images(chat.body)
            prompts = await self._prompts(chat, prompt) if self.fallbacks else None
            if prompts is not None:
                admission.prompt_counts = counts = self._by_model(chat.model, prompts)
                admission.output_limits = self._output_limits(chat, plan.max_tokens, counts)
            worst = ZERO  # with no budget to hold it against, nothing is reserved
            if self.budgets.enforced(policy.budgets):
                worst = self.worst_cost(chat.model, prompt, ceiling, images, prompts)
            admission.hold = hold = await self._reserve(admission, worst, policy.budgets)
            warning = hold.warning if hold is not None else None
            if warning and await self._settled():  # ended streams' worst cases, it may be
                warning = self._warning_now(admission, policy.budgets)
        except BaseException:
            await admission.release()
            raise
        if warning:
            admission.headers[BUDGET_WARNING_HEADER] = warning
        return admission

    async def _take(
        self, user: str, cap: int, tiers: Sequence[Tier], tokens: int
    ) -> Grant | Denial:
        """``limiter.admit``, asked again once streams that ended a moment ago are settled
        when they might hold what it refused: a stream slot, or tokens reserved."""
        outcome = await self.limiter.admit(user, cap, tiers, tokens)
        if isinstance(outcome, Denial) and outcome.unit != "requests" and await self._settled():
            outcome = await self.limiter.admit(user, cap, tiers, tokens)
        return outcome

    async def _settled(self) -> bool:
        return self.settle_ended is not None and await self.settle_ended()

    async def _reserve(
        self, admission: Admission, worst: Decimal, overrides: BudgetLimits | None
    ) -> Hold | None:
        """The budget hold for ``worst``; None when the budget has no room and the request
        is to be answered from the cache instead (free), as ``admission.only_cached``."""
        principal = admission.principal
        try:
            try:
                return await self._hold(admission, worst, overrides)
            except BudgetExceededError:
                if not await self._settled():  # ended streams' holds may be what fills it
                    raise
            return await self._hold(admission, worst, overrides)
        except BudgetExceededError as refusal:
            cached = self.has_cached
            if cached is None or not await cached(
                principal.tenant, admission.chat, admission.cache_header
            ):
                raise
            admission.only_cached = refusal
            return None

    def _warning_now(self, admission: Admission, overrides: BudgetLimits | None) -> str | None:
        principal, hold = admission.principal, admission.hold
        assert hold is not None
        at = admission.arrived
        return self.budgets.warning_for(hold, principal.user_id, principal.tenant, overrides, at=at)

    async def _hold(
        self, admission: Admission, worst: Decimal, overrides: BudgetLimits | None
    ) -> Hold:
        principal = admission.principal
        return await reserve_budget(
            self.budgets,
            principal.user_id,
            principal.tenant,
            worst,
            overrides,
            at=admission.arrived,  # the ledger row's day and month
        )

    def _slot_free_in(self, user: str) -> int:
        """Whole seconds until a stream slot of ``user``'s is likely free: a second after
        the first stream of theirs that no client reads here leaves its grace window (its
        end, checkpoint and release take a moment), else a second."""
        left = self.grace_left(user) if self.grace_left is not None else None
        return math.ceil(left) + 1 if left is not None else 1

    async def on_finish(self, stream: Stream, checkpoint: Checkpoint) -> None:
        """The registry finish hook: settle the stream's admission and write its ledger row."""
        admission = self._pending.pop(stream.id, None)
        if admission is not None:
            await admission.settle(stream, checkpoint)


@dataclass(slots=True, eq=False)
class Admission:
    """One admitted request: what it reserved, the headers to send, and its settlement."""

    gate: Gate
    principal: Principal
    chat: ChatRequest  # as sent upstream: carries the output ceiling
    arrived: float
    grant: Grant  # the stream slot and rate buckets taken (``Limiter.admit``)
    hold: Hold | None = None
    headers: dict[str, str] = field(default_factory=dict)
    output_limits: Mapping[str, int | None] = field(default_factory=lambda: NO_LIMITS)
    cache_header: str | None = None  # the client's ``X-Sluice-Cache``
    prompt_counts: dict[str, int] = field(default_factory=dict)  # by model, in its tokenizer
    only_cached: BudgetExceededError | None = None  # no budget left: the cache answers
    _open: bool = True

    async def launch(
        self, start: Callable[..., Stream], app: web.Application, owner: Owner
    ) -> Stream:
        """``start(app, owner, self.chat, ...)`` with what admission decided for the stream,
        bound to this admission.

        If starting fails, the reservations are returned and a rejected row is recorded.
        """
        try:
            stream = start(
                app,
                owner,
                self.chat,
                cache_header=self.cache_header,
                output_limits=self.output_limits,
                only_cached=self.only_cached,
                prompt_counts=self.prompt_counts,
            )
        except SluiceError as exc:
            await self.release()
            rejected = _rejection(self.principal, self.chat.model, self.arrived, code=exc.code)
            self.gate.ledger.record(rejected)
            raise
        except BaseException:
            await self.release()
            raise
        self.gate._pending[stream.id] = self
        return stream

    async def release(self) -> None:
        """Give back the stream slot, the tokens and the budget hold; the request itself
        still counts against requests per minute (it was made, and refused)."""
        if not self._open:
            return
        self._open = False
        gate = self.gate
        try:
            if self.hold is not None:
                await settle_budget(gate.budgets, self.hold, ZERO)
        finally:
            await gate.limiter.finish(self.grant, 0)  # the slot, whatever the budget did

    async def settle(self, stream: Stream, checkpoint: Checkpoint) -> None:
        """Replace the reservations with what the stream really used; write its ledger row."""
        if not self._open:
            return
        self._open = False
        gate = self.gate
        entry = ledger_entry(gate.prices, self.principal, stream, checkpoint, self.arrived)
        stream.cost_usd = entry.cost_usd  # telemetry reports the billed cost, not a recount
        # Each step whatever the one before did: no failure may keep the stream slot or
        # lose the row.
        try:
            if self.hold is not None:
                await settle_budget(gate.budgets, self.hold, Decimal(str(entry.cost_usd)))
        finally:
            try:
                # A cache hit made the provider do nothing: no tokens of the minute's.
                used = 0 if stream.cache_hit else entry.prompt_tokens + entry.completion_tokens
                await gate.limiter.finish(self.grant, used)  # settle + free the slot: one trip
            finally:
                gate.ledger.record(entry)


def ledger_entry(
    prices: PriceTable,
    principal: Principal,
    stream: Stream,
    checkpoint: Checkpoint,
    arrived: float,
) -> LedgerEntry:
    """The row for an ended stream: the provider's usage if it came, else counted tokens.

    What is billed is ``billed_tokens``'s (nothing when the provider never worked on the
    request); a cache hit has no provider cost.
    """
    progress = stream.progress
    usage = progress.usage or {}
    prompt, completion = billed_tokens(stream, checkpoint)
    cached = 0
    if checkpoint.usage_reported:
        details = usage.get("prompt_tokens_details")
        found = details.get("cached_tokens") if isinstance(details, dict) else None
        cached = found if is_count(found) else 0
    served = stream.served_model or stream.model
    cost = ZERO if stream.cache_hit else prices.cost(served, prompt, completion, cached)
    # Its cached answer went before it ran: refused by the budget after all, nothing served.
    rejected = isinstance(stream.error, BudgetExceededError)
    error = checkpoint.error or {}
    return LedgerEntry(
        request_id=stream.id,
        ts=arrived,
        day=utc_day(arrived),
        user_id=principal.user_id,
        tenant=principal.tenant,
        key_id=principal.key_id,
        model_requested=storable(stream.model) or "",
        model_served=None if rejected else storable(checkpoint.response_model or served),
        status="rejected" if rejected else _LEDGER_STATUS.get(stream.status, "provider_error"),
        prompt_tokens=storable_count(prompt),
        cached_tokens=storable_count(cached),
        completion_tokens=storable_count(completion),
        cost_usd=float(cost),
        latency_ms=_ms(stream.ended_at, stream.created_at),
        ttft_ms=_ms(stream.first_token_at, stream.created_at),
        stream_id=stream.id,
        error_code=storable(error.get("code") if isinstance(error.get("code"), str) else None),
        usage_reported=checkpoint.usage_reported,
    )


def _rejection(
    principal: Principal,
    model: str,
    arrived: float,
    *,
    code: str | None = None,
    status: str = "rejected",
) -> LedgerEntry:
    return LedgerEntry(
        request_id=new_id("rej_"),
        ts=arrived,
        day=utc_day(arrived),
        user_id=principal.user_id,
        tenant=principal.tenant,
        key_id=principal.key_id,
        model_requested=storable(model) or "",
        model_served=None,
        status=status,
        prompt_tokens=0,
        cached_tokens=0,
        completion_tokens=0,
        cost_usd=0.0,
        latency_ms=0.0,
        ttft_ms=None,
        stream_id=None,
        error_code=code,
        usage_reported=False,
    )


MAX_MODEL_CHARS = 256  # a refused body's model name is the client's: bound what we keep


def _model_named(source: object) -> str:
    """The model a (possibly invalid) request names, or "" when it names none."""
    body = source
    if isinstance(source, bytes | bytearray):
        try:
            body = orjson.loads(source)
        except orjson.JSONDecodeError:
            return ""
    model = body.get("model") if isinstance(body, dict) else None
    return model[:MAX_MODEL_CHARS] if isinstance(model, str) else ""


def _rate_limited(denial: Denial) -> RateLimitError:
    tier = denial.tier
    headers = ratelimit_headers(denial.requests, denial.token_quota)
    headers["Retry-After"] = str(max(1, math.ceil(denial.retry_after_s)))
    if denial.too_large:
        message = (
            f"Request too large: it needs more {denial.unit} than the {tier.name} limit "
            "allows per minute. Reduce the prompt or max_tokens."
        )
    else:
        message = (
            f"Rate limit reached for {tier.name} on {denial.unit} per minute. "
            f"Please try again in {denial.retry_after_s:.3g}s."
        )
    error = (TokenRateLimitError if denial.unit == "tokens" else RateLimitError)(
        message, headers=headers
    )
    return error.futile() if denial.too_large else error  # it never fits: do not resend


async def _count_prompt(chat: ChatRequest, model: str | None = None) -> int:
    """``chat``'s prompt in ``model``'s encoding (its own by default): counted on the loop
    when cheap; in a thread when tiktoken is cold or the body is large (its size bounds the
    text to count, wherever it is: content parts, tool calls' arguments, tool schemas)."""
    model = model or chat.model
    if tokens.is_loaded(model) and chat.size < OFFLOAD_BYTES:
        return tokens.count_chat(model, chat.body)
    return await asyncio.to_thread(tokens.count_chat, model, chat.body)


def _image_extra(model: str) -> int:
    return tokens.image_max_tokens(model) - tokens.IMAGE_PART_TOKENS


def _budget_limits(money: MoneySettings) -> BudgetLimits:
    def usd(value: float | None) -> Decimal | None:
        return Decimal(str(value)) if value is not None else None

    return BudgetLimits(
        user_daily=usd(money.user_daily_usd),
        user_monthly=usd(money.user_monthly_usd),
        tenant_daily=usd(money.tenant_daily_usd),
        tenant_monthly=usd(money.tenant_monthly_usd),
    )


def _pick(override: int | None, default: int) -> int:
    return override if override is not None else default


def _ms(end: float | None, start: float) -> float | None:
    return round((end - start) * 1000, 3) if end is not None else None
