"""Redaction: what must never reach a log line, a span attribute or a metric label.

Always removed: the provider key and other known secrets (exact strings: the dev key, the
passwords in the Redis and PostgreSQL URLs), the value of any
``Authorization`` header, and anything after ``Bearer``. Then the configurable patterns
(``SLUICE_REDACT_PATTERNS``; by default e-mail addresses and ``sk-...`` keys). Pure: no
server objects, so logging, tracing and metrics share one instance.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import urlsplit

from ..credentials import url_secrets
from ..settings import EMAIL_PATTERN, SECRET_KEY_PATTERN, Settings

REDACTED = "[redacted]"
MAX_LABEL_VALUES = 200  # distinct values per label before the rest become "other"
MIN_PASSWORD_CHARS = 4  # a shorter one, removed wherever it occurs, would garble every line

# Header dumps, JSON, repr()s: `Authorization: x`, `"authorization": "x"`, `('Authorization', 'x')`;
# also inside a JSON string (a JSON log line), its quotes escaped: `\"Authorization\": \"x\"`.
_AUTHORIZATION = re.compile(r"""(?i)(authorization\\?['"]?\s*[:=,]\s*\\?['"]?)[^'"\\\r\n,}]+""")
_BEARER = re.compile(r"(?i)(\bbearer\s+)[^\s'\",;}]+")
# A literal each default pattern cannot match without: a regex scan costs ~25 ns a character,
# an `in` test almost nothing, and most lines hold neither.
_REQUIRED = {EMAIL_PATTERN: "@", SECRET_KEY_PATTERN: "sk-"}


class Redactor:
    """Scrubs secrets from text; ``redact`` is cheap when there is nothing to remove."""

    __slots__ = ("_known", "_literals", "_patterns")

    def __init__(self, patterns: Iterable[str], *, secrets: Iterable[str] = ()) -> None:
        # Longest first, so a secret containing another is removed whole.
        self._literals = tuple(sorted({s for s in secrets if s}, key=len, reverse=True))
        self._patterns = tuple((re.compile(p), _REQUIRED.get(p, "")) for p in patterns)
        self._known: dict[str, str] = {}  # low-cardinality values already redacted

    @classmethod
    def from_settings(cls, settings: Settings) -> Redactor:
        secrets = []
        if settings.provider.api_key is not None:
            secrets.append(settings.provider.api_key.reveal())
        token, password = url_secrets(settings.provider.base_url)
        secrets.append(token)  # (and its password, with the other URLs' below)
        if settings.auth.dev_key is not None:
            secrets.append(settings.auth.dev_key.reveal())
        passwords = [password]
        for url in (settings.shared.redis_url, settings.shared.database_url):
            passwords.append((urlsplit(url.reveal()).password or "") if url is not None else "")
        for password in passwords:
            if len(password) >= MIN_PASSWORD_CHARS:  # quoted in an error, maybe
                secrets.append(password)
        return cls(settings.telemetry.redact_patterns, secrets=secrets)

    def redact(self, text: str) -> str:
        """``text`` with every secret and matching pattern replaced by ``[redacted]``."""
        for literal in self._literals:
            if literal in text:
                text = text.replace(literal, REDACTED)
        lowered = text.lower()  # the same test as the patterns' (?i), without a regex scan
        if "authorization" in lowered:
            text = _AUTHORIZATION.sub(r"\1" + REDACTED, text)
        if "bearer" in lowered:
            text = _BEARER.sub(r"\1" + REDACTED, text)
        for pattern, required in self._patterns:
            if required in text:
                text = pattern.sub(REDACTED, text)
        return text

    def value(self, text: str) -> str:
        """``redact`` for values that repeat (tenants, models): remembered, up to a bound."""
        clean = self._known.get(text)
        if clean is None:
            clean = self.redact(text)
            if len(self._known) < MAX_LABEL_VALUES * 10:
                self._known[text] = clean
        return clean


class LabelGuard:
    """Metric label values: redacted, and bounded so client input cannot explode a series."""

    __slots__ = ("_max", "_redactor", "_seen")

    def __init__(self, redactor: Redactor, *, max_values: int = MAX_LABEL_VALUES) -> None:
        self._redactor = redactor
        self._max = max_values
        self._seen: dict[str, str] = {}

    def __call__(self, value: str | None) -> str:
        if not value:
            return ""
        clean = self._seen.get(value)
        if clean is None:
            clean = "other" if len(self._seen) >= self._max else self._redactor.redact(value)
            if len(self._seen) < self._max:
                self._seen[value] = clean
        return clean
