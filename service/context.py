"""Context windows and the ``max_tokens`` policy: how much a request may ask the model for.

Pure. ``plan_output`` decides, once per request, the output-token ceiling that is sent
upstream: the client's ``max_completion_tokens``/``max_tokens`` clamped to the configured
cap (or rejected, per policy), or the configured default when the client set none, and
never more than the model's context window leaves after the prompt. A request whose
prompt plus explicit ``max_tokens`` cannot fit is refused before the provider is called,
as OpenAI does: 400 ``context_length_exceeded``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from .errors import InvalidRequestError

# Total tokens (prompt + output) per model family; longest prefix wins.
BUILTIN_CONTEXT_WINDOWS: dict[str, int] = {
    "gpt-5": 400_000,
    "gpt-4.1": 1_047_576,
    "gpt-5-chat": 128_000,
    "gpt-4.5": 128_000,
    "gpt-4o": 128_000,
    "chatgpt-4o": 128_000,
    "o1": 200_000,
    "o1-mini": 128_000,
    "o1-preview": 128_000,
    "o3": 200_000,
    "o4-mini": 200_000,
    "gpt-4-turbo": 128_000,
    "gpt-4-0125-preview": 128_000,
    "gpt-4-1106-preview": 128_000,
    "gpt-4-32k": 32_768,
    "gpt-4": 8_192,
    "gpt-3.5-turbo": 16_385,
}

# Output ceilings of the model families, used as the cap when none is configured lower.
BUILTIN_MAX_OUTPUT: dict[str, int] = {
    "gpt-5": 128_000,
    "gpt-5-chat": 16_384,
    "gpt-4.5": 16_384,
    "gpt-4.1": 32_768,
    "gpt-4o": 16_384,
    "gpt-4o-2024-05-13": 4_096,
    "chatgpt-4o": 16_384,
    "o1": 100_000,
    "o1-mini": 65_536,
    "o1-preview": 32_768,
    "o3": 100_000,
    "o4-mini": 100_000,
    "gpt-4-turbo": 4_096,
    "gpt-4-0125-preview": 4_096,
    "gpt-4-1106-preview": 4_096,
    "gpt-4": 8_192,
    "gpt-3.5-turbo": 4_096,
}

MAX_REMEMBERED_MODELS = 4096  # model names come from clients: bound the lookup cache

# Reasoning models accept only ``max_completion_tokens``; others get ``max_tokens``.
_COMPLETION_TOKENS_ONLY = ("o1", "o3", "o4", "gpt-5")
_REASONING = re.compile(r"(o[134]|gpt-5(\.[0-9]+)?)(?!-chat)(-|:|$)")


@dataclass(frozen=True, slots=True)
class OutputPlan:
    max_tokens: int  # the ceiling the provider will honour, per choice
    field: str  # "max_tokens" or "max_completion_tokens"
    rewrite: bool  # the body must be rewritten to carry ``max_tokens`` in ``field``


class ContextPolicy:
    """Windows, caps and the default; built once from settings."""

    __slots__ = ("_cap", "_default", "_known", "_outputs", "_reject_over_cap", "_windows")

    def __init__(
        self,
        *,
        default_max_tokens: int,
        max_tokens_cap: int | None,
        reject_over_cap: bool = False,
        windows: Mapping[str, int] | None = None,
    ) -> None:
        self._default = default_max_tokens
        self._cap = max_tokens_cap
        self._reject_over_cap = reject_over_cap
        self._windows = _by_prefix({**BUILTIN_CONTEXT_WINDOWS, **(windows or {})})
        self._outputs = _by_prefix(BUILTIN_MAX_OUTPUT)
        self._known: dict[str, tuple[int | None, int | None]] = {}

    def window(self, model: str) -> int | None:
        return self._model(model)[0]

    def cap(self, model: str, override: int | None = None) -> int | None:
        """The tightest of: the per-key override, the configured cap, the model's ceiling."""
        limits = [c for c in (override, self._cap, self._model(model)[1]) if c]
        return min(limits) if limits else None

    def _model(self, model: str) -> tuple[int | None, int | None]:
        """(window, output ceiling), looked up once per model name."""
        found = self._known.get(model)
        if found is None:
            found = (_lookup(self._windows, model), _lookup(self._outputs, model))
            if len(self._known) < MAX_REMEMBERED_MODELS:
                self._known[model] = found
        return found

    def plan_output(
        self,
        model: str,
        body: Mapping[str, object],
        prompt_tokens: int,
        *,
        cap_override: int | None = None,
    ) -> OutputPlan:
        """Decide the output ceiling; raise 400 when the request cannot fit."""
        field = _field(model, body)
        requested = body.get(field)
        cap = self.cap(model, cap_override)
        window = self.window(model)
        room = window - prompt_tokens if window is not None else None
        if room is not None and room < 1:
            raise _too_long(window, prompt_tokens, requested if isinstance(requested, int) else 0)
        if not isinstance(requested, int):
            chosen = min(c for c in (self._default, cap, room) if c is not None)
            return OutputPlan(chosen, field, rewrite=True)
        chosen = requested
        if cap is not None and requested > cap:
            if self._reject_over_cap:
                raise InvalidRequestError(
                    f"'{field}' is too large: {requested}. This gateway allows at most {cap}.",
                    param=field,
                    code="invalid_value",
                )
            chosen = cap
        if room is not None and chosen > room:
            raise _too_long(window, prompt_tokens, chosen)
        return OutputPlan(chosen, field, rewrite=chosen != requested)


def reasons_unseen(model: str) -> bool:
    """Whether ``model`` (OpenAI's reasoning models: o1, o3, o4-mini, gpt-5, gpt-5.1 and
    their dated or sized variants, fine-tunes of them; not the ``-chat`` ones) thinks before its
    first token and streams none of its thinking (a server that streams its reasoning, as
    vLLM's and DeepSeek's do, shows output from the start)."""
    return _REASONING.match(model.removeprefix("ft:").lower()) is not None


def completion_tokens_only(model: str) -> bool:
    """Whether ``model`` (a reasoning model) refuses ``max_tokens`` for
    ``max_completion_tokens``."""
    return model.removeprefix("ft:").lower().startswith(_COMPLETION_TOKENS_ONLY)


def _field(model: str, body: Mapping[str, object]) -> str:
    """The output-limit field the client set (null is not set), else the one the model takes."""
    if body.get("max_completion_tokens") is not None:
        return "max_completion_tokens"
    if body.get("max_tokens") is not None:
        return "max_tokens"
    return "max_completion_tokens" if completion_tokens_only(model) else "max_tokens"


def _too_long(window: int | None, prompt: int, output: int) -> InvalidRequestError:
    return InvalidRequestError(
        f"This model's maximum context length is {window} tokens. However, you requested "
        f"{prompt + output} tokens ({prompt} in the messages, {output} in the completion). "
        "Please reduce the length of the messages or completion.",
        param="messages",
        code="context_length_exceeded",
    )


def _by_prefix(table: Mapping[str, int]) -> tuple[tuple[str, int], ...]:
    """Longest first, in lower case (as ``_lookup`` compares: configured names too)."""
    lowered = {prefix.lower(): value for prefix, value in table.items()}
    return tuple(sorted(lowered.items(), key=lambda item: -len(item[0])))


def _lookup(table: tuple[tuple[str, int], ...], model: str) -> int | None:
    base = model.removeprefix("ft:").lower()
    for prefix, value in table:
        if base.startswith(prefix):
            return value
    return None
