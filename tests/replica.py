"""``python -m tests.replica``: ``python -m service`` with the shared rate-limit clock frozen.

The multi-process tests count admissions across two gateway processes. The shared
buckets leak with Redis's clock (100 rpm frees one request every 0.6 s), so on a slow
machine "exactly 100" would depend on how long the burst took. Frozen here, through the
same ``RedisLimiter.clock`` seam the in-process tests set, the count is exact however
long the burst takes. Everything else is the real entry point, unchanged.
"""

from __future__ import annotations

from aiohttp import web

import service.__main__ as entry
from service.app import create_app
from service.appkeys import GATE
from service.redis_limits import RedisLimiter
from service.settings import Settings

FROZEN_AT = 1_000_000.0


def create_frozen_app(settings: Settings) -> web.Application:
    app = create_app(settings)
    limiter = app[GATE].limiter
    if not isinstance(limiter, RedisLimiter):
        raise SystemExit("tests.replica needs SLUICE_REDIS_URL")
    limiter.clock = lambda: FROZEN_AT
    return app


if __name__ == "__main__":
    entry.create_app = create_frozen_app  # type: ignore[assignment]
    entry.main()
