"""Prices: USD per 1M input, cached-input and output tokens, and the cost of one request.

The built-in table holds OpenAI's list prices for current chat models (standard tier);
``SLUICE_PRICES_FILE`` / ``SLUICE_PRICES`` (JSON) add or replace entries. A model is
priced by its exact name, else, for a dated snapshot (``gpt-4o-2024-08-06``,
``gpt-4-0613``), by its model's name, else by the ``"*"`` entry, so an unknown model is
never free. Only a date is dropped: ``o1-pro`` is not ``o1`` (ten times dearer), and a
name the table does not know is not priced as one it does. Arithmetic is ``Decimal`` so
budgets add up exactly.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal

PER_MILLION = Decimal(1_000_000)
_SNAPSHOT = re.compile(r"-(?:\d{4}-\d{2}-\d{2}|\d{4})$")  # -2024-08-06, -0613
MAX_REMEMBERED_MODELS = 4096


@dataclass(frozen=True, slots=True)
class Price:
    """USD per 1M tokens; ``cached_input`` defaults to ``input`` when a model has no discount."""

    input: Decimal
    cached_input: Decimal
    output: Decimal

    @classmethod
    def of(
        cls, input: float | str, output: float | str, cached_input: float | str | None = None
    ) -> Price:
        cached = input if cached_input is None else cached_input
        return cls(Decimal(str(input)), Decimal(str(cached)), Decimal(str(output)))


# USD per 1M tokens: (input, output, cached input). OpenAI list prices, standard tier.
_BUILTIN: dict[str, tuple[str, str, str | None]] = {
    "gpt-5": ("1.25", "10.00", "0.125"),
    "gpt-5-mini": ("0.25", "2.00", "0.025"),
    "gpt-5-nano": ("0.05", "0.40", "0.005"),
    "gpt-4.1": ("2.00", "8.00", "0.50"),
    "gpt-4.1-mini": ("0.40", "1.60", "0.10"),
    "gpt-4.1-nano": ("0.10", "0.40", "0.025"),
    "gpt-4.5-preview": ("75.00", "150.00", "37.50"),
    "gpt-4o": ("2.50", "10.00", "1.25"),
    "gpt-4o-2024-05-13": ("5.00", "15.00", None),
    "gpt-4o-mini": ("0.15", "0.60", "0.075"),
    "chatgpt-4o-latest": ("5.00", "15.00", None),
    "gpt-5-pro": ("15.00", "120.00", None),
    "o1": ("15.00", "60.00", "7.50"),
    "o1-preview": ("15.00", "60.00", "7.50"),
    "o1-pro": ("150.00", "600.00", None),
    "o1-mini": ("1.10", "4.40", "0.55"),
    "o3": ("2.00", "8.00", "0.50"),
    "o3-pro": ("20.00", "80.00", None),
    "o3-deep-research": ("10.00", "40.00", "2.50"),
    "o3-mini": ("1.10", "4.40", "0.55"),
    "o4-mini": ("1.10", "4.40", "0.275"),
    "o4-mini-deep-research": ("2.00", "8.00", "0.50"),
    "gpt-4-turbo": ("10.00", "30.00", None),
    "gpt-4-turbo-preview": ("10.00", "30.00", None),
    "gpt-4-1106-preview": ("10.00", "30.00", None),
    "gpt-4-0125-preview": ("10.00", "30.00", None),
    "gpt-4-vision-preview": ("10.00", "30.00", None),
    "gpt-4-32k": ("60.00", "120.00", None),
    "gpt-4": ("30.00", "60.00", None),
    "gpt-3.5-turbo": ("0.50", "1.50", None),
    "gpt-3.5-turbo-16k": ("3.00", "4.00", None),
    # Fine-tuned models (``ft:<base>:<org>::<id>``) have rates of their own.
    "ft:gpt-4.1": ("3.00", "12.00", "0.75"),
    "ft:gpt-4.1-mini": ("0.80", "3.20", "0.20"),
    "ft:gpt-4.1-nano": ("0.20", "0.80", "0.05"),
    "ft:gpt-4o": ("3.75", "15.00", "1.875"),
    "ft:gpt-4o-mini": ("0.30", "1.20", "0.15"),
    "ft:gpt-3.5-turbo": ("3.00", "6.00", None),
    "*": ("2.50", "10.00", None),  # unknown models: priced like gpt-4o, never free
}


def builtin_prices() -> dict[str, Price]:
    return {model: Price.of(i, o, c) for model, (i, o, c) in _BUILTIN.items()}


class PriceTable:
    """Model -> ``Price``, dated snapshots as their model; see the module docstring."""

    __slots__ = ("_exact", "_resolved")

    def __init__(self, prices: Mapping[str, Price]) -> None:
        self._exact = dict(prices)
        self._resolved: dict[str, Price] = {}

    @classmethod
    def with_overrides(cls, overrides: Mapping[str, Mapping[str, float]]) -> PriceTable:
        """The built-in table plus ``{"model": {"input", "output", "cached_input"?}}``."""
        extra = {
            model: Price.of(p["input"], p["output"], p.get("cached_input"))
            for model, p in overrides.items()
        }
        return cls({**builtin_prices(), **extra})

    def price(self, model: str) -> Price:
        found = self._resolved.get(model)
        if found is None:
            found = self._lookup(model)
            if len(self._resolved) < MAX_REMEMBERED_MODELS:  # names come from clients
                self._resolved[model] = found
        return found

    def _lookup(self, model: str) -> Price:
        """The exact name, or its name without a snapshot's date; for a fine-tune
        (``ft:<base>:<org>::<id>``), its ``ft:`` rate, else its base model's; else ``"*"``."""
        names = [model]
        if model.startswith("ft:"):
            base = model[3:].split(":", 1)[0]
            names += [f"ft:{base}", base]
        for name in names:
            for candidate in (name, _SNAPSHOT.sub("", name)):
                if candidate != "*" and candidate in self._exact:
                    return self._exact[candidate]
        return self._exact.get("*") or Price.of(0, 0)

    def cheaper(self, model: str, than: str) -> bool:
        """True when ``model``'s input and output rates together are below ``than``'s."""
        a, b = self.price(model), self.price(than)
        return a.input + a.output < b.input + b.output

    def cost(
        self, model: str, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0
    ) -> Decimal:
        """USD for one request; ``cached_tokens`` is the part of the prompt served from cache."""
        price = self.price(model)
        cached = min(max(cached_tokens, 0), prompt_tokens)
        micro = (
            (prompt_tokens - cached) * price.input
            + cached * price.cached_input
            + completion_tokens * price.output
        )
        return micro / PER_MILLION
