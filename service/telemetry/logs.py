"""Logging: one formatter for the whole process, JSON or text, redacted after formatting.

Redaction runs on the finished line (message, arguments, extra fields and tracebacks
alike), so nothing a caller logs can carry a secret out. Structured fields ride in
``extra={"fields": {...}}``: JSON puts them at the top level, text appends ``key=value``.
The access log (``sluice.access``) is one such line per request or stream.
"""

from __future__ import annotations

import functools
import logging
import sys
import time
from typing import Any, TextIO

import orjson

from ..settings import TelemetrySettings
from .redaction import Redactor

ACCESS_LOGGER = "sluice.access"
_HANDLER_NAME = "sluice"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, then the record's fields."""

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "ts": _iso(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            payload.update(fields)
        if record.exc_info:
            payload["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(payload, default=str).decode()


class TextFormatter(logging.Formatter):
    """``2026-01-01T00:00:00.000Z INFO logger message key=value ...`` for humans."""

    def format(self, record: logging.LogRecord) -> str:
        line = f"{_iso(record.created)} {record.levelname} {record.name} {record.getMessage()}"
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            line += "".join([f" {k}={v}" for k, v in fields.items() if v is not None])
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
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
    root.addHandler(handler)
    root.setLevel(settings.log_level)
    return handler


def _iso(created: float) -> str:
    return f"{_second(int(created))}.{int(created % 1 * 1000):03d}Z"


@functools.lru_cache(maxsize=4)  # lines come in order: strftime once a second, not once a line
def _second(seconds: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
