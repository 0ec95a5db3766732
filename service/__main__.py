"""``python -m service``: read settings from the environment and serve until SIGTERM."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import shlex
import signal
import socket
import sys
from collections.abc import Callable
from typing import NoReturn

from aiohttp import web

from .app import create_app
from .appkeys import SETTINGS, STREAMS
from .auth import KeyRing
from .resources import drain
from .settings import ConfigError, Settings
from .telemetry.logs import configure_logging
from .telemetry.redaction import Redactor

log = logging.getLogger("service")

# After the drain (streams), how long aiohttp waits for the handlers left: those writing a
# drained stream's last bytes, and any request still uploading its body (no stream yet).
DRAIN_MARGIN_S = 5.0
# A request allocates a few thousand short-lived containers; with CPython's default (700)
# the collector runs every few requests, scanning young objects that die a moment later
# anyway. Fewer, larger young collections cost ~15% less CPU per request (``make bench``).
GC_THRESHOLDS = (20_000, 50, 100)
MAX_HEADER_BYTES = 65_536


def _banner(settings: Settings, port: int) -> str:
    host = settings.server.host
    base = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"  # IPv6
    lines = [f"Sluice listening on {base} (provider: {settings.provider.kind})"]
    if settings.provider.kind == "simulated":
        lines.append("SIMULATED PROVIDER: responses are generated locally, not by a model.")
    if settings.auth.dev_key is not None:
        key = settings.auth.dev_key.reveal()
        authorization = shlex.quote(f"Authorization: Bearer {key}")
        lines += [
            f"Dev client key: {key}",
            "Try:",
            f"  curl -N {base}/v1/chat/completions -H {authorization} "
            "-H 'Content-Type: application/json' "
            '-d \'{"model":"gpt-4o-mini","stream":true,'
            '"messages":[{"role":"user","content":"Hello [sim chunks=20 delay_ms=50]"}]}\'',
        ]
    return "\n".join(lines)


def _bind(host: str, port: int) -> socket.socket:
    """Bind before the banner: it then names the port really bound (the OS's choice for 0),
    and a port already in use is one clear line, not a traceback after the banner."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as run_app would
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        reason = exc.strerror or str(exc)
        print(
            f"sluice: cannot listen on {host}:{port}: {reason} "
            "(SLUICE_HOST and SLUICE_PORT choose the address)",
            file=sys.stderr,
        )
        raise SystemExit(2) from None
    return sock


def _log_listening(text: str) -> None:
    """run_app's announcement, sent once every site is bound (names the port chosen for 0)."""
    log.info("%s", text.splitlines()[0].strip("= "))


def _drain_on_sigterm(app: web.Application) -> None:
    """SIGTERM drains while the port still listens, then lets aiohttp close.

    aiohttp's own handler closes the listening socket before ``on_shutdown`` runs, so a
    probe during the drain would see a refused connection, not ``/readyz`` 503, and a new
    request could not be told to go elsewhere. A second signal stops at once: the streams
    still running end as a shutdown (checkpointed, for a resume elsewhere). SIGINT (Ctrl-C)
    is the same signal here: aiohttp's own handler would raise again inside the cleanup
    it started, cutting the ledger's and telemetry's flush short. Once the cleanup has
    been asked for, further signals change nothing.
    """

    async def install(app: web.Application) -> None:
        loop = asyncio.get_running_loop()
        draining: list[asyncio.Task[None]] = []
        exiting = False  # run_app's cleanup has been asked for: once is all it takes

        def exit_once() -> None:
            nonlocal exiting
            if not exiting:
                exiting = True
                raise web.GracefulExit  # what run_app's own handler raises: then the cleanup

        def on_sigterm() -> None:
            if draining:
                if not exiting:  # no more waiting: what runs ends now, and is recorded
                    draining.append(loop.create_task(app[STREAMS].drain(0), name="stop"))
                exit_once()
                return
            window = app[SETTINGS].server.drain_s
            log.info(
                "shutdown signal: draining for up to %gs (a second one stops now); "
                "/readyz answers 503",
                window,
            )
            task = loop.create_task(drain(app), name="sigterm-drain")
            task.add_done_callback(lambda done: _exit_after_drain(done, exit_once))
            draining.append(task)

        for number in (signal.SIGTERM, signal.SIGINT):  # replaces run_app's handlers
            loop.add_signal_handler(number, on_sigterm)

    app.on_startup.append(install)  # after run_app installed its handlers


def _exit_after_drain(task: asyncio.Task[None], exit_once: Callable[[], None]) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error("drain failed", exc_info=exc)
    task.get_loop().call_soon(exit_once)  # a no-op if a second SIGTERM got there first


def main() -> None:
    try:
        settings = Settings.from_env(os.environ)
        KeyRing.from_settings(settings.auth)  # a bad keys file fails here, before the banner
    except ConfigError as exc:
        _refuse(exc)
    # One redacting handler for every logger: JSON or text (SLUICE_LOG_FORMAT).
    configure_logging(settings.telemetry, Redactor.from_settings(settings))
    _skip_unused_record_fields()
    try:
        import uvloop
    except ImportError:
        loop = None
    else:
        loop = uvloop.new_event_loop()
        asyncio.set_event_loop(loop)
    sock = _bind(settings.server.host, settings.server.port)
    print(_banner(settings, sock.getsockname()[1]), flush=True)
    try:
        app = create_app(settings)
        _drain_on_sigterm(app)
        _tune_gc()
        web.run_app(
            app,
            sock=sock,
            handler_cancellation=True,
            shutdown_timeout=DRAIN_MARGIN_S,  # counted after ``on_shutdown``: the drain
            access_log=None,
            print=_log_listening,
            loop=loop,
            # A header past aiohttp's 8 KiB default is refused in plain text, quoting its
            # start (a client's key, for an Authorization header): let long ones through
            # to the OpenAI-shaped answers (a 401 for a key that long).
            max_field_size=MAX_HEADER_BYTES,
        )
    except ConfigError as exc:  # raised by a cleanup context at startup
        _refuse(exc)


def _skip_unused_record_fields() -> None:
    """Our formatters print none of the caller's file and line, thread or process, so don't
    gather them for every record (the Logging HOWTO's "Optimization" section names these).
    Process-wide, so here, not in ``configure_logging`` (tests call it)."""
    logging._srcfile = None  # no stack walk to find the caller
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False


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
