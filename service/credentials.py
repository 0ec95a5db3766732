"""The gateway's own provider credentials, kept out of everything a provider says back.

A provider may echo what it was sent (a careless proxy, a hostile one): the key, or the
``user:password@`` of ``OPENAI_BASE_URL`` (its password, and the Basic token made of it).
``ProviderSecrets`` removes them from a provider's words before a client, a log, a span,
a checkpoint or the cache sees them:

- ``data``: an event's or a body's bytes (a URL password only from 16 characters: a
  shorter one removed from every answer would break them). JSON may spell any character
  as ``\\u00XX``, and a client's parser would put the key back together: a payload with
  such an escape is decoded and checked (only those: an escape of printable ASCII is rare
  in real answers).
- ``text``: generated text (a checkpoint's, an answer assembled from the cache).
- ``message``: an error's words, which are also refused whole when the key is in them
  split by whitespace (an ``event: error``'s data lines are joined with line breaks).

Bytes the client has already been sent are not taken back: a key split across two chunks
reaches it in halves, and is removed only where the gateway joins them.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable
from urllib.parse import unquote, urlsplit

import orjson

from .settings import ProviderSettings

REDACTED = "[redacted]"
REDACTED_BYTES = REDACTED.encode()
MIN_PASSWORD_CHARS = 4  # a shorter one, removed wherever it occurs, would garble every message
LONG_SECRET_CHARS = 16  # a URL password this long is removed from answers too
_ESCAPE = b"\\u00"  # how JSON spells a Latin-1 character (printable ASCII among them)


class ProviderSecrets:
    """The credentials to remove; see the module docstring."""

    __slots__ = ("_bytes", "_long", "_texts")

    def __init__(self, secrets: Iterable[str], *, words_only: Iterable[str] = ()) -> None:
        """``secrets`` are removed from everything; ``words_only`` from error words alone (a
        short password, "1234" or "null", removed from every answer would break its JSON,
        and whitespace squeezed out of a message would find it across words)."""
        # Longest first, so a secret containing another is removed whole.
        self._long = _longest_first(secrets)
        self._texts = _longest_first([*self._long, *words_only])
        self._bytes = tuple(s.encode() for s in self._long)

    @classmethod
    def of(cls, settings: ProviderSettings) -> ProviderSecrets:
        """The key, and the Basic token of ``OPENAI_BASE_URL``'s ``user:password@`` (its
        password too: everywhere from 16 characters, in error words from 4)."""
        secrets = [settings.api_key.reveal()] if settings.api_key is not None else []
        token, password = url_secrets(settings.base_url)
        secrets += [token] if token else []
        if len(password) >= LONG_SECRET_CHARS:
            return cls([*secrets, password])
        short = [password] if len(password) >= MIN_PASSWORD_CHARS else []
        return cls(secrets, words_only=short)

    def __bool__(self) -> bool:
        return bool(self._texts)

    @property
    def in_answers(self) -> bool:
        """Whether ``data`` and ``text`` have anything to remove."""
        return bool(self._long)

    def data(self, data: bytes) -> bytes:
        """``data`` without the secrets, spelt plainly or with JSON's escapes."""
        for secret in self._bytes:
            if secret in data:
                data = data.replace(secret, REDACTED_BYTES)
        if self._bytes and _ESCAPE in data:
            data = self._unescaped(data)
        return data

    def text(self, text: str) -> str:
        """``text`` (an answer's) without the secrets long enough to look for in it."""
        for secret in self._long:
            if secret in text:
                text = text.replace(secret, REDACTED)
        return text

    def message(self, text: str) -> str:
        """``text`` (an error's words) without any secret; all of it, when whitespace
        splits a long one."""
        for secret in self._texts:
            if secret in text:
                text = text.replace(secret, REDACTED)
        squeezed = "".join(text.split())
        if squeezed != text and any(secret in squeezed for secret in self._long):
            return REDACTED
        return text

    def _unescaped(self, data: bytes) -> bytes:
        """JSON ``data`` as a client decodes it, written again plainly (orjson escapes no
        printable ASCII) and scrubbed, if a secret is in it; else ``data`` as it came."""
        try:
            plain = orjson.dumps(orjson.loads(data))
        except (orjson.JSONDecodeError, orjson.JSONEncodeError):
            return data  # not JSON: no client decodes its escapes either
        if not any(secret in plain for secret in self._bytes):
            return data
        for secret in self._bytes:
            plain = plain.replace(secret, REDACTED_BYTES)
        return plain


def url_secrets(url: str | None) -> tuple[str, str]:
    """The Basic token sent for ``url``'s ``user:password@``, and the password ("" each
    when there is none)."""
    parts = urlsplit(url) if url is not None else None
    if parts is None or parts.username is None:
        return "", ""
    password = unquote(parts.password or "")
    pair = f"{unquote(parts.username)}:{password}".encode()
    return base64.b64encode(pair).decode(), password


def _longest_first(secrets: Iterable[str]) -> tuple[str, ...]:
    return tuple(sorted({s for s in secrets if s}, key=len, reverse=True))
