"""``python -m service`` as a real process: the two-command start (issue 2, points 1 and 4).

The process runs with a clean environment (no provider configured), binds port 0, and
prints the dev key and a curl line naming the port it really bound. A real-provider
configuration without a keys file exits non-zero with one clear line and no traceback.
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import signal
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import orjson
import pytest

import service.__main__ as entry
from service.settings import Settings
from tests.processes import python_module
from tests.wire import closed_port, sse_data

READY_LINE = "Running on"


def _clean_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "SLUICE_DATA_DIR": str(tmp_path / "data"),  # the ledger: not the checkout's ./data
        **extra,
    }


async def _spawn(env: dict[str, str]) -> asyncio.subprocess.Process:
    return await python_module(
        "service",
        env=env,
    )


async def _lines_until(stream: asyncio.StreamReader, needle: str) -> list[str]:
    """Read lines until one contains ``needle``; fails if the stream ends first."""
    lines: list[str] = []
    while not lines or needle not in lines[-1]:
        raw = await stream.readline()
        if not raw:
            raise AssertionError(f"output ended before {needle!r}: {lines}")
        lines.append(raw.decode().rstrip("\n"))
    return lines


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[list[str], asyncio.subprocess.Process]]:
    """The gateway process, started with SLUICE_PORT=0, once it has bound its port."""
    process = await _spawn(_clean_env(tmp_path, SLUICE_PORT="0"))
    assert process.stdout is not None
    assert process.stderr is not None
    try:
        async with asyncio.timeout(30):  # a safety net only
            banner = await _lines_until(process.stdout, "curl ")
            await _lines_until(process.stderr, READY_LINE)
        yield banner, process
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            await process.wait()


async def test_banner_prints_dev_key_and_working_curl(
    served: tuple[list[str], asyncio.subprocess.Process],
) -> None:
    """The banner names the real port, the dev key, and a curl line that streams a reply."""
    banner, _ = served
    text = "\n".join(banner)
    assert "SIMULATED PROVIDER" in text
    key = re.search(r"Dev client key: (\S+)", text)
    assert key is not None
    assert key.group(1) == "sluice-dev-key"
    curl = shlex.split(banner[-1])
    assert curl[:2] == ["curl", "-N"]
    url = curl[2]
    port = int(re.match(r"http://127\.0\.0\.1:(\d+)/v1/chat/completions$", url).group(1))  # type: ignore[union-attr]
    assert port != 0
    headers = dict(h.split(": ", 1) for h in (curl[i + 1] for i, a in enumerate(curl) if a == "-H"))
    body = curl[curl.index("-d") + 1]
    # Do what the curl line does, against the running process.
    async with aiohttp.ClientSession() as session:
        async with session.post(url, data=body, headers=headers) as response:
            assert response.status == 200
            data = sse_data(await response.text())
        assert data[-1] == "[DONE]"
        assert len(data) == 1 + 20 + 1 + 1  # role, 20 words, finish, [DONE]
        async with session.get(f"http://127.0.0.1:{port}/readyz") as ready:
            assert ready.status == 200


def test_the_banner_s_curl_line_quotes_the_dev_key() -> None:
    """A dev key with a quote in it broke the printed line (unbalanced quotes)."""
    banner = entry._banner(Settings.from_env({"SLUICE_DEV_KEY": "it's-mine"}), 8080)
    curl = shlex.split(banner.splitlines()[-1])
    assert curl[curl.index("-H") + 1] == "Authorization: Bearer it's-mine"


async def test_a_long_authorization_header_is_an_openai_401_not_an_echo(
    served: tuple[list[str], asyncio.subprocess.Process],
) -> None:
    """A 9,000-byte key: past aiohttp's default header limit it was a plain-text 400 that
    quoted the key's start back; the process takes headers up to 64 KiB, so it is the
    OpenAI-shaped 401 of any wrong key."""
    banner, _ = served
    port = re.search(r"127\.0\.0\.1:(\d+)", "\n".join(banner))
    assert port is not None
    key = "sk-SECRETPREFIX" + "a" * 9000
    url = f"http://127.0.0.1:{port.group(1)}/v1/models"
    headers = {"Authorization": f"Bearer {key}"}
    async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as response:
        assert response.status == 401
        body = await response.read()
    assert orjson.loads(body)["error"]["code"] == "invalid_api_key"
    assert b"SECRETPREFIX" not in body


async def test_sigterm_exits_cleanly(
    served: tuple[list[str], asyncio.subprocess.Process],
) -> None:
    """SIGTERM ends the process with status 0 and no traceback."""
    _, process = served
    process.send_signal(signal.SIGTERM)
    assert process.stderr is not None
    async with asyncio.timeout(30):
        rest = (await process.stderr.read()).decode()
        code = await process.wait()
    assert code == 0
    assert "Traceback" not in rest


async def test_configured_port_is_used(tmp_path: Path) -> None:
    """SLUICE_HOST and SLUICE_PORT choose where it listens, and the banner says so."""
    port = closed_port()
    process = await _spawn(_clean_env(tmp_path, SLUICE_HOST="127.0.0.1", SLUICE_PORT=str(port)))
    assert process.stdout is not None
    assert process.stderr is not None
    try:
        async with asyncio.timeout(30):
            banner = await _lines_until(process.stdout, "curl ")
            await _lines_until(process.stderr, READY_LINE)
        assert f"http://127.0.0.1:{port}/v1/chat/completions" in banner[-1]
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{port}/livez") as live,
        ):
            assert live.status == 200
    finally:
        process.send_signal(signal.SIGTERM)
        await process.wait()


@pytest.mark.parametrize(
    ("env", "mentions"),
    [
        ({"OPENAI_API_KEY": "sk-refused-0123456789"}, "SLUICE_CLIENT_KEYS_FILE"),
        ({"SLUICE_PROVIDER": "openai"}, "OPENAI_API_KEY"),
        ({"SLUICE_CLIENT_KEYS_FILE": "/nonexistent/keys.json"}, "SLUICE_CLIENT_KEYS_FILE"),
        ({"SLUICE_PORT": "http"}, "SLUICE_PORT"),
    ],
)
async def test_bad_config_exits_with_a_clear_message(
    tmp_path: Path, env: dict[str, str], mentions: str
) -> None:
    """A configuration the gateway refuses: exit 2, one line naming the variable, no traceback."""
    process = await _spawn(_clean_env(tmp_path, **{"SLUICE_PORT": "0", **env}))
    async with asyncio.timeout(30):
        out, err = await process.communicate()
    assert process.returncode == 2
    message = err.decode()
    assert message.startswith("sluice: configuration error:")
    assert mentions in message
    assert "Traceback" not in message
    assert "sk-refused-0123456789" not in message + out.decode()
    assert "listening" not in out.decode()  # refused before claiming to serve


@pytest.mark.parametrize("what", ["data-dir", "metrics-port"])
async def test_what_fails_as_the_gateway_starts_is_one_clear_line(
    tmp_path: Path, what: str
) -> None:
    """A data directory that cannot hold the ledger (here a file), a metrics port already
    taken: found while starting, after the banner; still exit 2 and one line naming the
    variable, not a traceback."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        if what == "data-dir":
            (tmp_path / "file").write_text("not a directory")
            env = _clean_env(tmp_path, SLUICE_PORT="0", SLUICE_DATA_DIR=str(tmp_path / "file"))
            variable = "SLUICE_DATA_DIR"
        else:
            port = str(taken.getsockname()[1])
            env = _clean_env(tmp_path, SLUICE_PORT="0", SLUICE_METRICS_PORT=port)
            variable = "SLUICE_METRICS_PORT"
        process = await _spawn(env)
        async with asyncio.timeout(30):
            _, err = await process.communicate()
    assert process.returncode == 2
    message = err.decode()
    assert f"sluice: configuration error: {variable}" in message
    assert "Traceback" not in message


async def test_port_in_use_is_one_clear_line(tmp_path: Path) -> None:
    """A port already taken: exit 2 before the banner, one line naming the variables."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        process = await _spawn(_clean_env(tmp_path, SLUICE_PORT=str(port)))
        async with asyncio.timeout(30):
            out, err = await process.communicate()
    assert process.returncode == 2
    message = err.decode()
    assert message.startswith(f"sluice: cannot listen on 127.0.0.1:{port}:")
    assert "SLUICE_PORT" in message
    assert "Traceback" not in message
    assert "listening" not in out.decode()  # no banner claiming to serve


def test_an_ipv6_host_is_bracketed_in_the_banner() -> None:
    """``SLUICE_HOST=::``: the URLs printed (and the curl line) are usable as they are."""
    settings = Settings.from_env({"SLUICE_HOST": "::"})
    banner = entry._banner(settings, 8080)
    assert "http://[::]:8080" in banner
    assert ":::" not in banner
