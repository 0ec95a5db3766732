"""The provider key never leaves the gateway (issue 2, point 3).

The gateway runs in ``openai`` provider mode with a distinctive fake key, in front of the
simulator, and is made to fail in every way it supports. Every response status line,
header and body (SSE included), every log record at DEBUG from every logger, and all of
stdout/stderr are searched for the key. The simulator's ``echo_key=1`` directive makes it
quote the Authorization header it received in its error messages, as careless providers
do, so the gateway's scrubbing is exercised rather than assumed.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from service.auth import add_key
from service.settings import AuthSettings, ProviderSettings, Secret, Settings
from service.simulator import SimStats
from tests.conftest import GatewayFactory, chat_body
from tests.wire import closed_port

URL = "/v1/chat/completions"
CORE = secrets.token_hex(16)
PROVIDER_KEY = f"sk-proj-LEAKCANARY{CORE}"

# Each: (last user message, stream?). Between them every failure the gateway supports.
FAILING_REQUESTS = [
    ("[sim fail=401 echo_key=1]", True),
    ("[sim fail=403 echo_key=1]", False),
    ("[sim fail=400 echo_key=1]", True),
    ("[sim fail=400 echo_key=1]", False),
    ("[sim fail=404 echo_key=1]", False),
    ("[sim fail=422 echo_key=1]", True),
    ("[sim fail=429 echo_key=1]", True),
    ("[sim fail=500 echo_key=1]", True),
    ("[sim fail=503 echo_key=1]", False),
    ("[sim chunks=6 error_after=2 echo_key=1]", True),
    ("[sim chunks=6 reset_after=2 echo_key=1]", True),
    ("[sim chunks=6 malformed_after=1 echo_key=1]", True),
    ("[sim chunks=6 stall_after=2 echo_key=1]", True),
    ("[sim header_delay_ms=600000 echo_key=1]", True),
    ("[sim first_delay_ms=600000 echo_key=1]", True),
    ("[sim first_delay_ms=600000 echo_key=1]", False),
    ("[sim bogus=1]", True),  # the provider rejects an unknown directive: a 400 of its own
    ("fine [sim chunks=3]", True),
    ("fine [sim chunks=3]", False),
]


def _openai_mode(sim_url: str, keys_file: Path) -> Settings:
    """SLUICE_PROVIDER=openai semantics: a real key, a keys file, no dev key."""
    settings = Settings(
        provider=ProviderSettings(
            kind="openai",
            name="openai",
            base_url=sim_url,
            api_key=Secret(PROVIDER_KEY),
            models=(),
            first_token_timeout_s=0.1,
            idle_timeout_s=0.1,
        ),
        auth=AuthSettings(client_keys_file=keys_file, dev_key=None),
    )
    settings = replace(
        settings,
        resilience=replace(
            settings.resilience,
            retry_max_attempts=2,  # a retry, so the retry path's logs are searched too
            retry_base_delay_s=0.001,
            retry_max_delay_s=0.001,
            breaker_fail_max=1000,  # every request must reach the provider
        ),
        server=replace(settings.server, drain_s=0.0),
    )
    return replace(settings, streams=replace(settings.streams, disconnect_grace_s=0.0))


class Transcript:
    """Everything a client could see, as text."""

    def __init__(self) -> None:
        self.parts: list[str] = []

    async def record(self, response: aiohttp.ClientResponse) -> str:
        body = await response.text(errors="replace")
        self.parts.append(f"{response.status} {response.reason}")
        self.parts.extend(f"{name}: {value}" for name, value in response.headers.items())
        self.parts.append(body)
        return body


@pytest.fixture
def keys_file(tmp_path: Path) -> tuple[Path, str]:
    path = tmp_path / "keys.json"
    client_key = add_key(path, user="alice", tenant="acme", admin=True)
    return path, client_key


async def test_provider_key_never_leaks(
    gateway: GatewayFactory,
    sim: TestServer,
    sim_url: str,
    sim_stats: SimStats,
    keys_file: tuple[Path, str],
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """No failure mode puts the provider key in a response, a header, a log line or stderr."""
    caplog.set_level(logging.DEBUG)  # the root logger: every logger propagates here
    path, client_key = keys_file
    auth = {"Authorization": f"Bearer {client_key}"}
    transcript = Transcript()
    client = await gateway(_openai_mode(sim_url, path))

    statuses = []
    stream_ids = []
    for text, stream in FAILING_REQUESTS:
        response = await client.post(URL, json=chat_body(text, stream=stream), headers=auth)
        statuses.append(response.status)
        stream_ids.append(response.headers.get("X-Sluice-Stream-Id"))
        await transcript.record(response)
    # Bad client input, including a client that presents the provider key as its own.
    for headers, data in [
        (auth, b"{not json"),
        (auth, b'{"model": "gpt-4o-mini"}'),
        ({"Authorization": f"Bearer {PROVIDER_KEY}"}, b"{}"),
        ({"Authorization": PROVIDER_KEY}, b"{}"),
        ({}, b"{}"),
    ]:
        await transcript.record(await client.post(URL, data=data, headers=headers))
    # What else a client can read back: checkpoints (with their errors), models, metrics.
    for stream_id in filter(None, stream_ids):
        await transcript.record(await client.get(f"/v1/streams/{stream_id}", headers=auth))
    await transcript.record(await client.get("/v1/models", headers=auth))
    await transcript.record(await client.get("/metrics", headers=auth))

    # The provider was really asked, with the key, so the searches below could have failed.
    assert sim_stats.requests >= len(FAILING_REQUESTS)
    assert f"Bearer {PROVIDER_KEY}" in sim_stats.authorizations
    assert set(sim_stats.authorizations) == {f"Bearer {PROVIDER_KEY}"}
    assert statuses[:9] == [502, 502, 400, 400, 404, 422, 429, 502, 502]
    assert statuses[-2:] == [200, 200]

    # A provider that is not there at all (connect refused), same key.
    settings = _openai_mode(sim_url, path)
    dead = f"http://127.0.0.1:{closed_port()}/v1"
    broken = await gateway(replace(settings, provider=replace(settings.provider, base_url=dead)))
    for stream in (True, False):
        response = await broken.post(URL, json=chat_body(stream=stream), headers=auth)
        assert response.status == 502
        await transcript.record(response)
    await transcript.record(await broken.get("/v1/models", headers=auth))

    out, err = capfd.readouterr()
    logs = "\n".join(
        f"{r.name} {r.levelname} {r.getMessage()} {r.exc_text or ''}" for r in caplog.records
    )
    everything = {"responses": "\n".join(transcript.parts), "logs": logs, "out": out, "err": err}
    for where, text in everything.items():
        assert PROVIDER_KEY not in text, f"provider key leaked in {where}"
        assert CORE not in text, f"part of the provider key leaked in {where}"
    assert "[redacted]" in everything["responses"]  # the echoing provider was scrubbed
    assert caplog.records  # logging was on, so "no key in the logs" means something


async def test_echoing_provider_really_echoes(
    sim: TestServer, sim_url: str, aiohttp_client: Any
) -> None:
    """Control: the simulator's echo_key=1 error does contain the key it was sent."""
    async with aiohttp.ClientSession() as session:
        response = await session.post(
            f"{sim_url}/chat/completions",
            json=chat_body("[sim fail=400 echo_key=1]", stream=False),
            headers={"Authorization": f"Bearer {PROVIDER_KEY}"},
        )
        assert response.status == 400
        assert PROVIDER_KEY in await response.text()
        streamed = await session.post(
            f"{sim_url}/chat/completions",
            json=chat_body("[sim chunks=4 error_after=1 echo_key=1]"),
            headers={"Authorization": f"Bearer {PROVIDER_KEY}"},
        )
        assert PROVIDER_KEY in await streamed.text()


def test_secret_repr_hides_the_key() -> None:
    """The settings objects print without the key, so a logged config cannot leak it."""
    provider = ProviderSettings(kind="openai", api_key=Secret(PROVIDER_KEY))
    for text in (repr(provider), str(provider), repr(Settings(provider=provider))):
        assert PROVIDER_KEY not in text
    assert Secret(PROVIDER_KEY).reveal() == PROVIDER_KEY
