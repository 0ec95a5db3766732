"""``python -m service``: read settings from the environment and serve until SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import os
import sys

from aiohttp import web

from .app import create_app
from .settings import ConfigError, Settings

log = logging.getLogger("service")

DRAIN_MARGIN_S = 5.0


def _banner(settings: Settings) -> str:
    base = f"http://{settings.server.host}:{settings.server.port}"
    lines = [f"Sluice listening on {base} (provider: {settings.provider.kind})"]
    if settings.provider.kind == "simulated":
        lines.append("SIMULATED PROVIDER: responses are generated locally, not by a model.")
    if settings.auth.dev_key is not None:
        key = settings.auth.dev_key.reveal()
        lines += [
            f"Dev client key: {key}",
            "Try:",
            f"  curl -N {base}/v1/chat/completions -H 'Authorization: Bearer {key}' "
            "-H 'Content-Type: application/json' "
            '-d \'{"model":"gpt-4o-mini","stream":true,'
            '"messages":[{"role":"user","content":"Hello [sim chunks=20 delay_ms=50]"}]}\'',
        ]
    return "\n".join(lines)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        settings = Settings.from_env(os.environ)
    except ConfigError as exc:
        print(f"sluice: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    try:
        import uvloop
    except ImportError:
        loop = None
    else:
        loop = uvloop.new_event_loop()
        asyncio.set_event_loop(loop)
    print(_banner(settings), flush=True)
    web.run_app(
        create_app(settings),
        host=settings.server.host,
        port=settings.server.port,
        handler_cancellation=True,
        shutdown_timeout=settings.server.drain_s + DRAIN_MARGIN_S,
        access_log=None,
        print=None,
        loop=loop,
    )


if __name__ == "__main__":
    main()
