"""The gateway's provider credentials stay out of what a hostile provider says back.

``tests/test_secrets.py`` searches every output for the key a careless provider echoes as
it is; these are the echoes that got past that: spelt with JSON's escapes, split across two
chunks or two data lines, tucked after a date in ``Retry-After``, or the Basic credentials of
``OPENAI_BASE_URL`` (found by an adversarial review). A stand-in provider on a real port
answers each test's way; the gateway in front of it is the real one.
"""

from __future__ import annotations

import base64
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from service import upstream
from service.appkeys import STREAMS
from service.credentials import ProviderSecrets, url_secrets
from service.settings import DEFAULT_REDACT_PATTERNS, ProviderSettings, Secret, Settings
from service.telemetry.redaction import Redactor
from tests.conftest import AUTH, GatewayFactory, chat_body, with_provider
from tests.test_provider_quirks import _delta, _stream
from tests.wire import sse_data

URL = "/v1/chat/completions"
KEY = f"sk-proj-CANARY{secrets.token_hex(16)}"
Answer = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _escaped(text: str) -> str:
    """``text`` as JSON may spell it: every character a ``\\u00XX`` escape."""
    return "".join(f"\\u{ord(c):04x}" for c in text)


async def _gateway(
    aiohttp_server: Any,
    gateway: GatewayFactory,
    settings: Settings,
    answer: Answer,
    *,
    userinfo: str = "",
) -> TestClient[Any, Any]:
    app = web.Application()
    app.router.add_post("/v1/chat/completions", answer)
    provider = await aiohttp_server(app)
    base_url = str(provider.make_url("/v1")).replace("://", f"://{userinfo}", 1)
    custom = with_provider(settings, base_url=base_url, api_key=Secret(KEY), models=())
    client: TestClient[Any, Any] = await gateway(custom)
    return client


def test_secrets_spelt_with_escapes_or_split_by_whitespace_are_removed() -> None:
    """Plain bytes; JSON escapes (decoded and written again, only when a secret is in
    them); whitespace inside a message (all of it goes); non-JSON bytes left as they are."""
    scrub = ProviderSecrets([KEY])
    assert scrub.data(f'{{"a": "x{KEY}y"}}'.encode()) == b'{"a": "x[redacted]y"}'
    escaped = f'{{"a": "x{_escaped(KEY)}y", "b": "\\u00e9"}}'.encode()
    assert orjson.loads(scrub.data(escaped)) == {"a": "x[redacted]y", "b": "\u00e9"}
    innocent = b'{"a": "caf\\u00e9"}'
    assert scrub.data(innocent) is innocent  # (no secret in it: as it came)
    assert scrub.data(b"not json \\u0041") == b"not json \\u0041"
    half = len(KEY) // 2
    assert scrub.message(f"bad: {KEY[:half]}\n{KEY[half:]}") == "[redacted]"
    assert scrub.message("two words") == "two words"
    assert scrub.text(f"a {KEY} b") == "a [redacted] b"
    assert not ProviderSecrets([])


def test_a_short_password_is_removed_from_error_words_but_never_breaks_an_answer() -> None:
    """A password of "null" or "onto" (in ``OPENAI_BASE_URL``) was removed from every
    answer, breaking its JSON (``"created":17[redacted]78``), and, with whitespace squeezed
    out, found across words in error messages ("on tokens per min"). A key is removed
    everywhere however short (vLLM's example key is ``token-abc123``)."""
    scrub = ProviderSecrets([KEY], words_only=["null", "onto"])
    answer = b'{"created": 1700000000, "x": null, "content": "onto it"}'
    assert scrub.data(answer) == answer
    assert scrub.message("Rate limit reached on tokens per min") == (
        "Rate limit reached on tokens per min"
    )
    assert scrub.message("password null refused") == "password [redacted] refused"
    assert scrub.text(f"onto {KEY}") == "onto [redacted]"
    short = ProviderSettings(api_key=Secret("token-abc123"), base_url="http://u:null@vllm/v1")
    scrub = ProviderSecrets.of(short)
    assert scrub.data(b'{"content": "key=token-abc123", "x": null}') == (
        b'{"content": "key=[redacted]", "x": null}'
    )
    assert scrub.message("bad token-abc\n123") == "[redacted]"
    assert scrub.message("password null refused") == "password [redacted] refused"


def test_the_base_url_s_password_and_basic_token_are_secrets() -> None:
    token = base64.b64encode(b"user:hunter22").decode()
    assert url_secrets("https://user:hunter22@llm.example/v1") == (token, "hunter22")
    assert url_secrets("https://llm.example/v1") == ("", "")
    assert url_secrets(None) == ("", "")


def test_a_client_key_after_an_escaped_control_character_is_redacted_in_logs() -> None:
    """A path of ``/v1/x%0Ask-...`` is logged as ``/v1/x\\nsk-...``: the pattern's word
    boundary failed after the escape's ``n``, and the key was logged whole."""
    redactor = Redactor(DEFAULT_REDACT_PATTERNS)
    for escape in ("\\n", "\\x01", "\\u2028"):
        line = f"path=/v1/x{escape}sk-sluice-abcdefghijkl status=404"
        assert "abcdefghijkl" not in redactor.redact(line)
    assert redactor.redact("a task-abcdefghijkl") == "a task-abcdefghijkl"


def test_a_retry_after_date_without_a_zone_is_utc(monkeypatch: pytest.MonkeyPatch) -> None:
    """``-0000`` (or no zone) parses as a naive time, which ``astimezone`` took for the
    server's local time: in New York, 07:28 went on as 11:28 GMT."""
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        hint = upstream._retry_hint("Retry-After", "Tue, 15 Nov 2094 07:28:31 -0000")
    finally:
        monkeypatch.undo()
        time.tzset()
    assert hint == "Mon, 15 Nov 2094 07:28:31 GMT"
    assert upstream._retry_hint("retry-after-ms", " 250 ") == "250"
    assert upstream._retry_hint("retry-after-ms", "Tue, 15 Nov 2094 07:28:31 GMT") is None


async def test_a_retry_after_carrying_the_key_is_not_passed_on(
    aiohttp_server: Any, gateway: GatewayFactory, settings: Settings
) -> None:
    """The date parser took ``<date> <key>`` (extra words ignored) and the header went to
    the client word for word: the gateway writes the hint itself now."""

    async def answer(request: web.Request) -> web.StreamResponse:
        headers = {
            "Retry-After": f"Tue, 15 Nov 2094 08:12:31 GMT {KEY}",
            "retry-after-ms": f"250 {KEY}",
        }
        return web.json_response({"error": {"message": "slow down"}}, status=429, headers=headers)

    client = await _gateway(aiohttp_server, gateway, settings, answer)
    response = await client.post(URL, json=chat_body("x", stream=False), headers=AUTH)
    assert response.status == 429
    assert response.headers["Retry-After"] == "Mon, 15 Nov 2094 08:12:31 GMT"
    assert "retry-after-ms" not in response.headers
    assert KEY not in str(response.headers)


async def test_a_key_spelt_with_escapes_or_split_across_chunks_is_kept_out(
    aiohttp_server: Any, gateway: GatewayFactory, settings: Settings
) -> None:
    """Escaped, the key reached the client (its JSON parser spells it out) and the stream's
    checkpoint; split across two chunks, each half reaches the client as it streams (taking
    them back would mean holding every stream back), but the checkpoint joined it whole."""
    half = len(KEY) // 2

    async def answer(request: web.Request) -> web.StreamResponse:
        escaped = b'data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"m",'
        escaped += b'"choices":[{"index":0,"delta":{"content":"' + _escaped(KEY).encode()
        escaped += b'"},"finish_reason":null}]}\n\n'
        events = (_delta(" a " + KEY[:half]), _delta(KEY[half:] + " b "), escaped)
        return await _stream(request, *events, _delta("", "stop"), b"data: [DONE]\n\n")

    client = await _gateway(aiohttp_server, gateway, settings, answer)
    response = await client.post(URL, json=chat_body("x"), headers=AUTH)
    contents = [
        choice["delta"].get("content") or ""
        for data in sse_data(await response.text())
        if data != "[DONE]"
        for choice in orjson.loads(data)["choices"]
    ]
    assert KEY not in contents  # no event carries it whole, decoded
    await client.app[STREAMS].retire_now()
    checkpoint = await client.get(
        f"/v1/streams/{response.headers['X-Sluice-Stream-Id']}", headers=AUTH
    )
    text = (await checkpoint.json())["text"]
    assert KEY not in text
    assert text.count("[redacted]") == 2


@pytest.mark.parametrize("where", ["error event", "basic credentials"])
async def test_error_words_that_carry_credentials_in_pieces_or_as_basic_are_kept_out(
    aiohttp_server: Any, gateway: GatewayFactory, settings: Settings, where: str
) -> None:
    """An ``event: error`` whose data lines split the key (joined with a line break), and
    a provider that quotes the Basic authorization ``user:password@`` in the URL made."""
    half = len(KEY) // 2
    password = "hunter2-" + secrets.token_hex(8)

    async def answer(request: web.Request) -> web.StreamResponse:
        if where == "basic credentials":
            message = f"bad credentials: {request.headers['Authorization']}"
            return web.json_response({"error": {"message": message}}, status=400)
        lines = f"event: error\ndata: {KEY[:half]}\ndata: {KEY[half:]}\n\n".encode()
        return await _stream(request, _delta("hi"), lines)

    userinfo = f"user:{password}@" if where == "basic credentials" else ""
    client = await _gateway(aiohttp_server, gateway, settings, answer, userinfo=userinfo)
    response = await client.post(URL, json=chat_body("x"), headers=AUTH)
    body = await response.text()
    token = base64.b64encode(f"user:{password}".encode()).decode()
    for secret in (KEY, KEY[:half], KEY[half:], password, token):
        assert secret not in body
