"""Logging: one formatter for the whole process, JSON or text, redacted after formatting.

Redaction runs on the finished line (message, arguments, extra fields and tracebacks
alike), so nothing a caller logs can carry a secret out. Structured fields ride in
``extra={"fields": {...}}``: JSON puts them at the top level, text appends ``key=value``.
The access log (``sluice.access``) is one such line per request or stream. Access lines
travel in batches (``telemetry/batch.py``): one record carries ``lines``, a list of
``(time, message, fields)``, and these formatters write one line for each, with its own
time; a formatter that does not know ``lines`` prints the record's message instead.
"""

from __future__ import annotations

import functools
import logging
import sys
import time
from typing import Any, TextIO

import orjson
from aiohttp.http_exceptions import HttpProcessingError

from ..settings import TelemetrySettings
from .redaction import Redactor

ACCESS_LOGGER = "sluice.access"
# What a text line escapes, as a Python string literal writes it (``\n``, ``\x1b``,
# ``\u2028``): the C0 and C1 controls, DEL and the Unicode line and paragraph separators.
_ESCAPED = {c: repr(chr(c))[1:-1] for c in (*range(32), *range(0x7F, 0xA0), 0x2028, 0x2029)}
_HANDLER_NAME = "sluice"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, then the record's fields."""

    def format(self, record: logging.LogRecord) -> str:
        batch = getattr(record, "lines", None)
        if isinstance(batch, list):
            return "\n".join([_json(t, record, m, f) for t, m, f in batch])
        exc = self.formatException(record.exc_info) if record.exc_info else None
        return _json(record.created, record, record.getMessage(), _fields(record), exc)


class TextFormatter(logging.Formatter):
    """``2026-01-01T00:00:00.000Z INFO logger message key=value ...`` for humans."""

    def format(self, record: logging.LogRecord) -> str:
        batch = getattr(record, "lines", None)
        if isinstance(batch, list):
            return "\n".join([_text(t, record, m, f) for t, m, f in batch])
        line = _text(record.created, record, record.getMessage(), _fields(record))
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def _fields(record: logging.LogRecord) -> dict[str, Any] | None:
    fields = getattr(record, "fields", None)
    return fields if isinstance(fields, dict) else None


def _json(
    created: float,
    record: logging.LogRecord,
    message: str,
    fields: dict[str, Any] | None,
    exc: str | None = None,
) -> str:
    payload: dict[str, Any] = {
        "ts": _iso(created),
        "level": record.levelname,
        "logger": record.name,
        "message": message,
    }
    if fields:
        payload.update(fields)
    if exc is not None:
        payload["exc"] = exc
    return orjson.dumps(payload, default=str).decode()


def _text(
    created: float, record: logging.LogRecord, message: str, fields: dict[str, Any] | None
) -> str:
    line = f"{_iso(created)} {record.levelname} {record.name} {message}"
    if fields:
        line += "".join([f" {k}={v}" for k, v in fields.items() if v is not None])
    if not line.isprintable():  # a client's path or value may carry newlines, escapes:
        line = line.translate(_ESCAPED)  # one record stays one line, and prints as text
    return line


class RedactingFormatter(logging.Formatter):
    """Formats with ``inner``, then removes every secret from the result."""

    def __init__(self, inner: logging.Formatter, redactor: Redactor) -> None:
        super().__init__()
        self._inner = inner
        self._redactor = redactor

    def format(self, record: logging.LogRecord) -> str:
        return self._redactor.redact(self._inner.format(record))


def formatter_for(settings: TelemetrySettings, redactor: Redactor) -> logging.Formatter:
    inner = JsonFormatter() if settings.log_format == "json" else TextFormatter()
    return RedactingFormatter(inner, redactor)


def configure_logging(
    settings: TelemetrySettings, redactor: Redactor, *, stream: TextIO | None = None
) -> logging.Handler:
    """Route every logger through one redacting handler on stderr (``stream`` in tests)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if handler.get_name() == _HANDLER_NAME:
            root.removeHandler(handler)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(formatter_for(settings, redactor))
    handler.addFilter(_quiet_bad_http)
    root.addHandler(handler)
    root.setLevel(settings.log_level)
    return handler


def _quiet_bad_http(record: logging.LogRecord) -> bool:
    """aiohttp logs a client's malformed HTTP (a bad request line or header) as an ERROR
    with a traceback: the client's mistake, not ours, and a flood of stack traces for
    anyone sending garbage. One WARNING line instead, naming what was wrong."""
    exc = record.exc_info[1] if record.exc_info else None
    if isinstance(exc, HttpProcessingError) and record.name == "aiohttp.server":
        reason = str(exc.message).splitlines()[0] if exc.message else type(exc).__name__
        record.msg, record.args = "%s: %s", (record.getMessage(), reason)
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.exc_info = record.exc_text = None
    return True


def _iso(created: float) -> str:
    return f"{_second(int(created))}.{int(created % 1 * 1000):03d}Z"


@functools.lru_cache(maxsize=4)  # lines come in order: strftime once a second, not once a line
def _second(seconds: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
