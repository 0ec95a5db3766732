"""``GET /v1/usage``: spend by day and model from the ledger, and the budget that remains.

A key sees its own user's usage; an admin key may ask for ``?user=`` or ``?tenant=``.
``?start=`` and ``?end=`` (UTC dates, inclusive) default to this month so far.
"""

from __future__ import annotations

import datetime
import re
from typing import Any

import orjson
from aiohttp import web

from ..appkeys import GATE, PRINCIPAL
from ..budgets import month_start
from ..errors import InvalidRequestError, PermissionDeniedError
from ..ledger import utc_day
from ..redis_budgets import budget_status

_DAY = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


async def get_usage(request: web.Request) -> web.Response:
    principal = request[PRINCIPAL]
    gate = request.app[GATE]
    user, tenant = _scope(request, principal.user_id, principal.admin)
    own = user == principal.user_id and tenant is None
    now = gate.clock()
    start = _day(request, "start", month_start(now))
    end = _day(request, "end", utc_day(now))
    if start > end:
        raise InvalidRequestError("'start' must not be after 'end'.", param="start")
    if gate.settle_ended is not None:
        await gate.settle_ended()  # the streams just ended, whose rows wait for their batch
    # A key's own usage is its user's in its tenant: the same user id in another tenant is
    # someone else's (as for streams, whose owner is the pair).
    rows = await gate.ledger.usage(
        user=user, tenant=principal.tenant if own else tenant, since_day=start, until_day=end
    )
    data = [
        {
            "day": r.day,
            "model": r.model,
            "requests": r.requests,
            "prompt_tokens": r.prompt_tokens,
            "completion_tokens": r.completion_tokens,
            "cost_usd": round(r.cost_usd, 9),
        }
        for r in rows
    ]
    overrides = gate.policy(principal).budgets if own else None
    status = await budget_status(gate.budgets, user or "", tenant or principal.tenant, overrides)
    budget = {"user": status["user"]} if user is not None else {"tenant": status["tenant"]}
    if own:
        budget["tenant"] = status["tenant"]
    payload: dict[str, Any] = {
        "object": "sluice.usage",
        "user": user,
        "tenant": tenant if tenant is not None else (principal.tenant if own else None),
        "start": start,
        "end": end,
        "data": data,
        "totals": _totals(data),
        "budget": budget,
    }
    return web.Response(body=orjson.dumps(payload), content_type="application/json")


def _scope(request: web.Request, own_user: str, admin: bool) -> tuple[str | None, str | None]:
    """(user, tenant) to report on: exactly one of them is set."""
    user, tenant = request.query.get("user"), request.query.get("tenant")
    if user and tenant:
        raise InvalidRequestError("Pass either 'user' or 'tenant', not both.", param="tenant")
    if (user and user != own_user) or tenant:
        if not admin:
            raise PermissionDeniedError(
                "Only an admin key may read another user's or a tenant's usage.",
                param="tenant" if tenant else "user",
            )
        return (None, tenant) if tenant else (user, None)
    return own_user, None


def _day(request: web.Request, name: str, default: str) -> str:
    value = request.query.get(name)
    if value is None:
        return default
    try:
        valid = _DAY.fullmatch(value) is not None and bool(datetime.date.fromisoformat(value))
    except ValueError:
        valid = False
    if not valid:
        raise InvalidRequestError(f"'{name}' must be a date, YYYY-MM-DD.", param=name)
    return value


def _totals(data: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "requests": sum(d["requests"] for d in data),
        "prompt_tokens": sum(d["prompt_tokens"] for d in data),
        "completion_tokens": sum(d["completion_tokens"] for d in data),
        "cost_usd": round(sum(d["cost_usd"] for d in data), 9),
    }
