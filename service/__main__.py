"""``python -m service``: read settings from the environment and serve until SIGTERM."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import socket
import sys
from typing import NoReturn

from aiohttp import web

from .app import create_app
from .auth import KeyRing
from .settings import ConfigError, Settings
from .telemetry.logs import configure_logging
from .telemetry.redaction import Redactor

log = logging.getLogger("service")

DRAIN_MARGIN_S = 5.0
# A request allocates a few thousand short-lived containers; with CPython's default (700)
# the collector runs every few requests, scanning young objects that die a moment later
# anyway. Fewer, larger young collections cost ~15% less CPU per request (``make bench``).
GC_THRESHOLDS = (20_000, 50, 100)


def _banner(settings: Settings, port: int) -> str:
    base = f"http://{settings.server.host}:{port}"
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


def _bind_any_port(host: str) -> socket.socket:
    """SLUICE_PORT=0: bind here, so the banner names the port the OS chose."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((host, 0))
    return sock


def _log_listening(text: str) -> None:
    """run_app's announcement, sent once every site is bound (names the port chosen for 0)."""
    log.info("%s", text.splitlines()[0].strip("= "))


def main() -> None:
    try:
        settings = Settings.from_env(os.environ)
        KeyRing.from_settings(settings.auth)  # a bad keys file fails here, before the banner
    except ConfigError as exc:
        _refuse(exc)
    # One redacting handler for every logger: JSON or text (SLUICE_LOG_FORMAT).
    configure_logging(settings.telemetry, Redactor.from_settings(settings))
    try:
        import uvloop
    except ImportError:
        loop = None
    else:
        loop = uvloop.new_event_loop()
        asyncio.set_event_loop(loop)
    sock = _bind_any_port(settings.server.host) if settings.server.port == 0 else None
    port = sock.getsockname()[1] if sock is not None else settings.server.port
    print(_banner(settings, port), flush=True)
    app = create_app(settings)
    _tune_gc()
    try:
        web.run_app(
            app,
            host=None if sock is not None else settings.server.host,
            port=None if sock is not None else settings.server.port,
            sock=sock,
            handler_cancellation=True,
            shutdown_timeout=settings.server.drain_s + DRAIN_MARGIN_S,
            access_log=None,
            print=_log_listening,
            loop=loop,
        )
    except ConfigError as exc:  # raised by a cleanup context at startup
        _refuse(exc)


def _tune_gc() -> None:
    """Move everything made so far (modules, the app) out of the collector's sight; then
    collect less often. Process-wide, so here and not in ``create_app`` (tests build many)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def _refuse(exc: ConfigError) -> NoReturn:
    print(f"sluice: configuration error: {exc}", file=sys.stderr)
    raise SystemExit(2) from None


if __name__ == "__main__":
    main()
