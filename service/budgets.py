"""Budgets: USD per user and per tenant, per UTC day and month, that cannot be overspent.

A request reserves its maximum possible cost (prompt plus output ceiling, priced) before
the provider is called and settles with its real cost when it ends. The check and the
reservation happen together, with no ``await`` between them, so any number of concurrent
requests together can commit at most the limit. Past ``soft_fraction`` of a limit the
response carries a warning; at the limit the request is refused (429 ``budget_exceeded``).

State is per process and in memory; at startup it is rebuilt from the ledger's totals for
the current day and month, so a restart does not reset spend.
"""

from __future__ import annotations

import calendar
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal, localcontext
from typing import Any

from .errors import BudgetExceededError
from .ledger import SpendRow

ZERO = Decimal(0)
MICRO_USD = Decimal("0.000001")


@dataclass(frozen=True, slots=True)
class BudgetLimits:
    """USD limits; ``None`` means unlimited."""

    user_daily: Decimal | None = None
    user_monthly: Decimal | None = None
    tenant_daily: Decimal | None = None
    tenant_monthly: Decimal | None = None

    @property
    def has_limit(self) -> bool:
        """Some limit is set."""
        return not (
            self.user_daily is None
            and self.user_monthly is None
            and self.tenant_daily is None
            and self.tenant_monthly is None
        )


_Key = tuple[str, str, str, str]  # (scope, who, "day"|"month", period)


@dataclass(frozen=True, slots=True)
class Hold:
    """A reservation: settle it exactly once."""

    keys: tuple[_Key, ...]
    amount: Decimal
    warning: str | None
    shared_id: str | None = None  # its hold in Redis (``redis_budgets.py``); None: local only
    # What every replica had committed on each budget before it (Redis's reply), where this
    # process's view has its own holds only; None: that view is the whole story.
    committed: Mapping[_Key, Decimal] | None = None


class Budgets:
    """Spent and reserved USD per scope and period; see the module docstring."""

    def __init__(
        self,
        limits: BudgetLimits,
        *,
        soft_fraction: float = 0.8,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.limits = limits
        self._soft = Decimal(str(soft_fraction))
        self._clock = clock
        self._spent: dict[_Key, Decimal] = {}
        self._reserved: dict[_Key, Decimal] = {}
        self._periods = ("", "")
        self._day_number = -1  # UTC days since the epoch that ``_periods`` names

    def load(self, rows: Iterable[SpendRow]) -> None:
        """Add the ledger's spend (rows from the first day of this month) into the totals."""
        day, month = self._current()
        for row in rows:
            cost = Decimal(str(row.cost_usd))
            for scope, who in (("user", row.user_id), ("tenant", row.tenant)):
                if row.day == day:
                    self._add(self._spent, (scope, who, "day", day), cost)
                if row.day.startswith(month):
                    self._add(self._spent, (scope, who, "month", month), cost)

    def enforced(self, overrides: BudgetLimits | None = None) -> bool:
        """Whether a budget limits a request with these overrides: if none does, it need
        reserve nothing (its spend is still counted when it settles)."""
        return self.limits.has_limit or (overrides is not None and overrides.has_limit)

    def reserve(
        self,
        user: str,
        tenant: str,
        amount: Decimal,
        overrides: BudgetLimits | None = None,
        *,
        at: float | None = None,
    ) -> Hold:
        """Reserve ``amount`` on every applicable budget, or raise ``BudgetExceededError``.

        ``at``: when the request arrived, which dates its spend (now if None): the ledger
        dates its row so, and a restart rebuilds the totals from the rows."""
        checks = self._checks(user, tenant, overrides, at)
        if not amount and not self.enforced(overrides):  # nothing to hold, nothing to warn of
            return Hold(tuple(key for key, _ in checks), amount, None)
        for key, limit in checks:
            if limit is not None and self._committed(key) + amount > limit:
                raise self._exceeded(key, limit, self._committed(key), amount)
        warning = self._warning(checks)  # what was committed before this request
        for key, _ in checks:
            self._add(self._reserved, key, amount)
        return Hold(tuple(key for key, _ in checks), amount, warning)

    def warning_for(
        self,
        hold: Hold,
        user: str,
        tenant: str,
        overrides: BudgetLimits | None = None,
        *,
        at: float | None = None,
    ) -> str | None:
        """``hold``'s warning as things stand now (others' holds settled since, say), in this
        process's view: what was committed besides the hold itself."""
        checks = self._checks(user, tenant, overrides, at)
        committed = {
            key: self._committed(key) - (hold.amount if key in hold.keys else ZERO)
            for key, _ in checks
        }
        return self._warning(checks, committed)

    def settle(self, hold: Hold, actual: Decimal) -> None:
        """Replace the reservation with the real cost (in the periods it was made in)."""
        for key in hold.keys:
            self._add(self._reserved, key, -hold.amount)
            self._add(self._spent, key, actual)

    def status(
        self,
        user: str,
        tenant: str,
        overrides: BudgetLimits | None = None,
        *,
        shared: Mapping[_Key, tuple[Decimal, Decimal]] | None = None,
    ) -> dict[str, Any]:
        """Limit, spent, reserved and remaining USD per scope and period (for /v1/usage);
        ``shared``: (spent, reserved) of every replica, per budget Redis has."""
        report: dict[str, Any] = {"user": {}, "tenant": {}}
        for key, limit in self._checks(user, tenant, overrides):
            scope, _, period, _ = key
            spent, reserved = self._spent.get(key, ZERO), self._reserved.get(key, ZERO)
            if shared is not None and key in shared:
                spent, reserved = shared[key]
            report[scope]["daily" if period == "day" else "monthly"] = {
                "limit_usd": float(limit) if limit is not None else None,
                "spent_usd": float(spent),
                "reserved_usd": float(reserved),
                "remaining_usd": (
                    float(max(limit - spent - reserved, ZERO)) if limit is not None else None
                ),
            }
        return report

    def pressure(
        self,
        user: str,
        tenant: str,
        overrides: BudgetLimits | None = None,
        *,
        excluding: Hold | None = None,
    ) -> float:
        """The highest fraction of any applicable limit already committed (0.0 without
        limits), ``excluding`` a request's own reservation: its worst case is not spent."""
        own, amount = (excluding.keys, excluding.amount) if excluding is not None else ((), ZERO)
        # Every replica's, as Redis answered the request's reservation (this view has its
        # own holds only); this view's for a budget it did not answer for (a new day).
        shared = (excluding.committed if excluding is not None else None) or {}
        fractions = []
        for key, limit in self._checks(user, tenant, overrides):
            if limit:
                committed = shared.get(key)
                if committed is None:
                    committed = self._committed(key) - (amount if key in own else ZERO)
                fractions.append(float(committed / limit))
        return max(fractions, default=0.0)

    def _checks(
        self, user: str, tenant: str, overrides: BudgetLimits | None, at: float | None = None
    ) -> list[tuple[_Key, Decimal | None]]:
        day, month = self._current() if at is None else self._periods_of(at)
        limits, own = self.limits, overrides or BudgetLimits()
        # Months first: a request refused by a day and a month budget both is told of the
        # month's (the first refusal is the one raised, here and in Redis), whose end, in
        # Retry-After, is the earliest it could go through.
        return [
            (("user", user, "month", month), _first(own.user_monthly, limits.user_monthly)),
            (("tenant", tenant, "month", month), limits.tenant_monthly),
            (("user", user, "day", day), _first(own.user_daily, limits.user_daily)),
            (("tenant", tenant, "day", day), limits.tenant_daily),
        ]

    def _current(self) -> tuple[str, str]:
        """Today's and this month's keys; recomputed (and old periods dropped) once a day."""
        now = self._clock()
        day_number = int(now // 86_400)
        if day_number != self._day_number:
            utc = time.gmtime(now)
            self._day_number = day_number
            self._periods = (time.strftime("%Y-%m-%d", utc), time.strftime("%Y-%m", utc))
            # Yesterday's day and month are kept a day more: a request that arrived before
            # midnight and is admitted after it still counts against them.
            before = time.gmtime(now - 86_400)
            yesterday = (time.strftime("%Y-%m-%d", before), time.strftime("%Y-%m", before))
            self._forget_except({*self._periods, *yesterday})
        return self._periods

    def _periods_of(self, at: float) -> tuple[str, str]:
        """The day's and month's keys of time ``at`` (today's, from ``_current``, nearly
        always: a request that arrived before midnight and reserves after it is the rest)."""
        current = self._current()
        if int(at // 86_400) == self._day_number:
            return current
        utc = time.gmtime(at)
        return time.strftime("%Y-%m-%d", utc), time.strftime("%Y-%m", utc)

    def _forget_except(self, periods: set[str]) -> None:
        """Drop finished periods that no reservation still points at."""
        for table in (self._spent, self._reserved):
            for key in [k for k in table if k[3] not in periods and not self._reserved.get(k)]:
                del table[key]

    def _committed(self, key: _Key) -> Decimal:
        return self._spent.get(key, ZERO) + self._reserved.get(key, ZERO)

    def _warning(
        self,
        checks: list[tuple[_Key, Decimal | None]],
        committed: Mapping[_Key, Decimal] | None = None,
    ) -> str | None:
        """The soft-limit warning for the most used budget (``committed``: what each key
        has committed, when known better than this view, e.g. from Redis)."""
        worst: tuple[Decimal, _Key, Decimal] | None = None
        for key, limit in checks:
            if limit:
                used = (committed[key] if committed else self._committed(key)) / limit
                if used >= self._soft and (worst is None or used > worst[0]):
                    worst = (used, key, limit)
        if worst is None:
            return None
        used, (scope, _, period, _), limit = worst
        label = "daily" if period == "day" else "monthly"
        return f"{scope} {label} budget {int(used * 100)}% used (limit ${limit})"

    def _exceeded(
        self, key: _Key, limit: Decimal, committed: Decimal, amount: Decimal
    ) -> BudgetExceededError:
        """The refusal: the budget is used up, or what is left of it is less than this
        request may cost (its output ceiling priced at the dearest model it may reach)."""
        scope, _, period, _ = key
        label = "daily" if period == "day" else "monthly"
        retry = max(1, int(self._period_end(period) - self._clock()) + 1)
        headers = {"Retry-After": str(retry)}
        if committed >= limit:
            return BudgetExceededError(
                f"The {scope} {label} budget of ${limit} is used up (spent, or held by "
                "requests in flight).",
                headers=headers,
            )
        left = _usd(limit - committed, ROUND_FLOOR)
        return BudgetExceededError(
            f"This request may cost up to ${_usd(amount)} (its prompt and output ceiling, "
            f"priced at the dearest model it may reach), more than the ${left} left of the "
            f"{scope} {label} budget of ${limit}.",
            headers=headers,
        )

    def _period_end(self, period: str) -> float:
        now = time.gmtime(self._clock())
        if period == "day":
            return calendar.timegm((now.tm_year, now.tm_mon, now.tm_mday, 0, 0, 0)) + 86_400
        year, month = (now.tm_year + 1, 1) if now.tm_mon == 12 else (now.tm_year, now.tm_mon + 1)
        return calendar.timegm((year, month, 1, 0, 0, 0))

    @staticmethod
    def _add(table: dict[_Key, Decimal], key: _Key, amount: Decimal) -> None:
        table[key] = table.get(key, ZERO) + amount


def _first(override: Decimal | None, default: Decimal | None) -> Decimal | None:
    return override if override is not None else default


def month_start(ts: float) -> str:
    """The first UTC day of ``ts``'s month, YYYY-MM-DD (where the ledger replay starts)."""
    return time.strftime("%Y-%m-01", time.gmtime(ts))


def _usd(amount: Decimal, rounding: str = ROUND_CEILING) -> str:
    """Dollars to the millionth, without trailing zeros: 0.0123, 2, 0.000001."""
    with localcontext() as context:  # a request's worst case may run to 30 digits and more
        context.prec = max(context.prec, amount.adjusted() + 8)
        text = f"{amount.quantize(MICRO_USD, rounding=rounding):f}"
    return text.rstrip("0").rstrip(".") if "." in text else text
