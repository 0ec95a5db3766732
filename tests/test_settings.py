"""``Settings.from_env``: the core groups (server, provider, streams, auth) read from a mapping.

Only the injected mapping is read, never ``os.environ``; every error names its variable.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from service import settings as config
from service.redis_budgets import HOLD_TTL_S
from service.redis_limits import STREAM_LEASE_S
from service.settings import (
    MAX_GENERATION_CAP_S,
    MAX_KEEPALIVE_S,
    ConfigError,
    Secret,
    Settings,
)


def test_defaults_from_an_empty_environment() -> None:
    """With nothing set: loopback:8080, the simulated provider, the dev key, the timeouts."""
    settings = Settings.from_env({})
    assert (settings.server.host, settings.server.port) == ("127.0.0.1", 8080)
    assert settings.server.max_body_bytes == config.DEFAULT_MAX_BODY_BYTES
    provider = settings.provider
    assert provider.kind == "simulated"
    assert provider.base_url is None  # start the built-in simulator
    assert provider.api_key is None
    assert provider.models == config.DEFAULT_SIMULATED_MODELS
    assert (provider.connect_timeout_s, provider.first_token_timeout_s) == (10.0, 60.0)
    assert provider.idle_timeout_s == 30.0
    assert settings.streams.keepalive_s == 15.0
    streams = settings.streams  # the defaults: 10 s grace, 1 h checkpoints, 25 s drain
    assert (streams.disconnect_grace_s, streams.checkpoint_ttl_s) == (10.0, 3600.0)
    assert settings.server.drain_s == 25.0
    assert settings.auth.client_keys_file is None
    assert settings.auth.dev_key == Secret("sluice-dev-key")
    resilience = settings.resilience  # #4's defaults: 5 failures open it, a probe after 30 s
    assert (resilience.breaker_fail_max, resilience.breaker_reset_s) == (5, 30.0)


def test_from_env_ignores_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the mapping passed in is read."""
    monkeypatch.setenv("SLUICE_PORT", "9999")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-process")
    settings = Settings.from_env({})
    assert settings.server.port == 8080
    assert settings.provider.kind == "simulated"


@pytest.mark.parametrize(
    ("name", "value", "read"),
    [
        ("SLUICE_HOST", "0.0.0.0", lambda s: s.server.host),
        ("SLUICE_PORT", "9090", lambda s: s.server.port),
        ("SLUICE_PORT", "0", lambda s: s.server.port),
        ("SLUICE_MAX_BODY_BYTES", "1024", lambda s: s.server.max_body_bytes),
        ("SLUICE_DRAIN_S", "3.5", lambda s: s.server.drain_s),
        ("SLUICE_CONNECT_TIMEOUT_S", "2", lambda s: s.provider.connect_timeout_s),
        ("SLUICE_FIRST_TOKEN_TIMEOUT_S", "5", lambda s: s.provider.first_token_timeout_s),
        (
            "SLUICE_REASONING_FIRST_TOKEN_TIMEOUT_S",
            "900",
            lambda s: s.provider.reasoning_first_token_timeout_s,
        ),
        ("SLUICE_COMPLETION_TIMEOUT_S", "5", lambda s: s.provider.completion_timeout_s),
        ("SLUICE_IDLE_TIMEOUT_S", "7.5", lambda s: s.provider.idle_timeout_s),
        ("SLUICE_KEEPALIVE_S", "0.5", lambda s: s.streams.keepalive_s),
        ("SLUICE_DISCONNECT_GRACE_S", "0", lambda s: s.streams.disconnect_grace_s),
        ("SLUICE_CHECKPOINT_TTL_S", "60", lambda s: s.streams.checkpoint_ttl_s),
        ("SLUICE_MAX_GENERATION_S", "120", lambda s: s.streams.max_generation_s),
        ("SLUICE_MODELS", " a, b ,,c ", lambda s: ",".join(s.provider.models)),
        ("SLUICE_DEV_KEY", "my-dev-key", lambda s: s.auth.dev_key.reveal()),
    ],
)
def test_each_variable_is_read(name: str, value: str, read: object) -> None:
    """Every core variable lands in its field, parsed to the field's type."""
    assert callable(read)
    got = read(Settings.from_env({name: value}))
    expected: object = value
    if name == "SLUICE_MODELS":
        expected = "a,b,c"
    elif name.endswith(("_PORT", "_BYTES")):
        expected = int(value)
    elif name.endswith("_S"):
        expected = float(value)
    assert got == expected


def test_a_generation_never_outlives_what_it_holds_in_redis() -> None:
    """The longest generation allowed ends well before its budget hold and stream slot in
    Redis expire on their own (they do only for requests nobody will finish)."""
    margin_s = 300  # the checkpoint write and the settlement after a generation ends
    assert MAX_GENERATION_CAP_S + MAX_KEEPALIVE_S + margin_s <= min(HOLD_TTL_S, STREAM_LEASE_S)
    assert Settings.from_env({}).streams.max_generation_s <= MAX_GENERATION_CAP_S


def test_blank_values_count_as_unset() -> None:
    """An empty or whitespace value falls back to the default rather than failing."""
    settings = Settings.from_env({"SLUICE_PORT": "  ", "OPENAI_API_KEY": "", "SLUICE_HOST": ""})
    assert settings.server.port == 8080
    assert settings.server.host == "127.0.0.1"
    assert settings.provider.kind == "simulated"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("SLUICE_PORT", "eighty"),
        ("SLUICE_PORT", "70000"),
        ("SLUICE_PORT", "-1"),
        ("SLUICE_MAX_BODY_BYTES", "0"),
        ("SLUICE_MAX_BODY_BYTES", "1.5"),
        ("SLUICE_CONNECT_TIMEOUT_S", "soon"),
        ("SLUICE_FIRST_TOKEN_TIMEOUT_S", "0"),
        ("SLUICE_IDLE_TIMEOUT_S", "-3"),
        ("SLUICE_KEEPALIVE_S", "0"),
        ("SLUICE_KEEPALIVE_S", "nan"),
        ("SLUICE_KEEPALIVE_S", "301"),
        ("SLUICE_DRAIN_S", "x"),
        ("SLUICE_DRAIN_S", "inf"),
        ("SLUICE_MAX_GENERATION_S", "3601"),
        ("SLUICE_PROVIDER", "anthropic"),
        ("SLUICE_BUDGET_SOFT_FRACTION", "1.5"),  # past 1: no warning would ever come
        # Digits of other scripts and underscores: int() and float() take them.
        ("SLUICE_PORT", "\u0663"),
        ("SLUICE_PORT", "1_000"),
        ("SLUICE_DRAIN_S", "1_0"),
        # Past what C integers, clocks and Redis expiries hold: a traceback at start, or a
        # gateway whose checkpoints, WebSockets or span exports all failed.
        ("SLUICE_CHECKPOINT_TTL_S", "1e308"),
        ("SLUICE_CACHE_TTL_S", "1e17"),
        ("SLUICE_MAX_BODY_BYTES", "1" + "0" * 22),
        ("OTEL_BSP_MAX_QUEUE_SIZE", "1" + "0" * 22),
        ("OTEL_BSP_SCHEDULE_DELAY", "1" + "0" * 22),
        ("OTEL_EXPORTER_OTLP_TIMEOUT", "1e300"),
    ],
)
def test_errors_name_the_variable(name: str, value: str) -> None:
    """A bad value raises ConfigError whose message names the variable and the value."""
    with pytest.raises(ConfigError, match=name) as caught:
        Settings.from_env({name: value})
    assert value in str(caught.value)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("OPENAI_BASE_URL", "api.example.com/v1"),
        ("OPENAI_BASE_URL", "http://"),
        ("OPENAI_BASE_URL", "http://user:secretpw@host:port/v1"),
        ("SLUICE_REDIS_URL", "redis://:secretpw@127.0.0.1:99999/0"),
        ("SLUICE_REDIS_URL", "http://127.0.0.1:6379"),
        ("SLUICE_REDIS_URL", "redis://:secretpw@[::1:6379/0"),  # an unclosed bracket
        ("SLUICE_DATABASE_URL", "postgresql://u:secretpw@127.0.0.1:notaport/db"),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://:4318"),
    ],
)
def test_a_url_that_cannot_work_names_its_variable_and_not_its_password(
    name: str, value: str
) -> None:
    """No scheme, no host, a port that is no port: refused at start (the gateway ran, and
    every call failed; a Redis or PostgreSQL port out of range was a traceback)."""
    with pytest.raises(ConfigError, match=name) as caught:
        Settings.from_env({name: value})
    assert "secretpw" not in str(caught.value)


def test_header_values_and_socket_urls_that_cannot_work_are_refused() -> None:
    """A control character in the organization or project (every call was the provider's
    400), a character past Latin-1 (refused naming the header), a Redis socket URL with no
    socket (a traceback), a dev key no client could send."""
    for name in ("OPENAI_ORG_ID", "OPENAI_PROJECT_ID"):
        for value in ("org\x01", "proj\u0100x"):
            with pytest.raises(ConfigError, match=name):
                Settings.from_env({name: value})
    assert Settings.from_env({"OPENAI_ORG_ID": "org-caf\u00e9"}).provider.organization
    with pytest.raises(ConfigError, match="SLUICE_REDIS_URL names no socket"):
        Settings.from_env({"SLUICE_REDIS_URL": "unix://"})
    with pytest.raises(ConfigError, match="SLUICE_DEV_KEY"):
        Settings.from_env({"SLUICE_DEV_KEY": "dev\x01key"})


def test_a_provider_key_that_cannot_be_a_header_is_refused(tmp_path: Path) -> None:
    """A key file with a second line (or a key with a space) would make every request fail
    as the provider's fault; the message names the variable, never the key."""
    key_file = tmp_path / "key"
    key_file.write_text("sk-first-line\nsecond line\n")
    env = {"OPENAI_API_KEY_FILE": str(key_file), "SLUICE_PROVIDER": "openai"}
    with pytest.raises(ConfigError, match="OPENAI_API_KEY_FILE") as caught:
        Settings.from_env(env)
    assert "sk-first-line" not in str(caught.value)
    with pytest.raises(ConfigError, match="OPENAI_API_KEY"):
        Settings.from_env({"OPENAI_API_KEY": "sk-a b"})


def test_a_prices_file_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    prices = tmp_path / "prices.json"
    prices.write_bytes(b'{"m": {"input": 1, "output": 2}}\xff')
    with pytest.raises(ConfigError, match="SLUICE_PRICES_FILE"):
        Settings.from_env({"SLUICE_PRICES_FILE": str(prices)})


def test_openai_key_selects_the_real_provider(tmp_path: Path) -> None:
    """OPENAI_API_KEY alone selects the openai provider at api.openai.com."""
    keys = tmp_path / "keys.json"
    settings = Settings.from_env(
        {"OPENAI_API_KEY": "sk-test", "SLUICE_CLIENT_KEYS_FILE": str(keys)}
    )
    assert settings.provider.kind == "openai"
    assert settings.provider.base_url == "https://api.openai.com/v1"
    assert settings.provider.api_key == Secret("sk-test")
    assert settings.provider.models == ()  # passthrough of the provider's list
    assert settings.auth.client_keys_file == keys
    assert settings.auth.dev_key is None
    assert (settings.provider.organization, settings.provider.project) == (None, None)


def test_openai_organization_and_project(tmp_path: Path) -> None:
    """The openai SDK's OPENAI_ORG_ID and OPENAI_PROJECT_ID are read the same way."""
    env = {
        "OPENAI_API_KEY": "sk-test",
        "SLUICE_CLIENT_KEYS_FILE": str(tmp_path / "keys.json"),
        "OPENAI_ORG_ID": "org-123",
        "OPENAI_PROJECT_ID": "proj_456",
    }
    provider = Settings.from_env(env).provider
    assert (provider.organization, provider.project) == ("org-123", "proj_456")


def test_base_url_and_forced_kinds(tmp_path: Path) -> None:
    """OPENAI_BASE_URL is used (trailing slash dropped); SLUICE_PROVIDER forces the kind."""
    keys = str(tmp_path / "keys.json")
    env = {
        "OPENAI_API_KEY": "sk-test",
        "OPENAI_BASE_URL": "http://llm.internal:8000/v1/",
        "SLUICE_CLIENT_KEYS_FILE": keys,
    }
    assert Settings.from_env(env).provider.base_url == "http://llm.internal:8000/v1"
    simulated = Settings.from_env({**env, "SLUICE_PROVIDER": "simulated"})
    assert simulated.provider.kind == "simulated"
    assert simulated.provider.api_key is None
    with pytest.raises(ConfigError, match="OPENAI_API_KEY"):
        Settings.from_env({"SLUICE_PROVIDER": "openai", "SLUICE_CLIENT_KEYS_FILE": keys})


def test_an_upstream_named_without_a_key_is_a_real_provider(tmp_path: Path) -> None:
    """OPENAI_BASE_URL alone names a real upstream (vLLM, llama.cpp and Ollama take no key):
    not the simulated provider, its model names and its dev key. It needs client keys like
    any real provider; without a base URL or a key there is nothing real to call."""
    keys = str(tmp_path / "keys.json")
    ollama = {"OPENAI_BASE_URL": "http://127.0.0.1:11434/v1", "SLUICE_CLIENT_KEYS_FILE": keys}
    provider = Settings.from_env(ollama).provider
    assert (provider.kind, provider.api_key) == ("openai", None)
    assert (provider.base_url, provider.models) == ("http://127.0.0.1:11434/v1", ())
    with pytest.raises(ConfigError, match="SLUICE_CLIENT_KEYS_FILE"):
        Settings.from_env({"OPENAI_BASE_URL": "http://127.0.0.1:11434/v1"})
    external = Settings.from_env({**ollama, "SLUICE_PROVIDER": "simulated"})
    assert external.provider.kind == "simulated"  # an external simulator, named so
    assert external.provider.base_url == "http://127.0.0.1:11434/v1"
    with pytest.raises(ConfigError, match="OPENAI_BASE_URL"):
        Settings.from_env({"SLUICE_PROVIDER": "openai", "SLUICE_CLIENT_KEYS_FILE": keys})
    with pytest.raises(ConfigError, match="OPENAI_API_KEY"):  # OpenAI's own: never keyless
        Settings.from_env(
            {
                "OPENAI_BASE_URL": "https://api.openai.com/v1",
                "OPENAI_API_KEY": "",
                "SLUICE_CLIENT_KEYS_FILE": keys,
            }
        )


def test_api_key_from_file(tmp_path: Path) -> None:
    """OPENAI_API_KEY_FILE is read (a Kubernetes secret mount), surrounding whitespace dropped."""
    secret = tmp_path / "openai-key"
    secret.write_text("sk-from-file\n", encoding="utf-8")
    env = {"OPENAI_API_KEY_FILE": str(secret), "SLUICE_CLIENT_KEYS_FILE": str(tmp_path / "k")}
    settings = Settings.from_env(env)
    assert settings.provider.kind == "openai"
    assert settings.provider.api_key == Secret("sk-from-file")
    both = Settings.from_env({**env, "OPENAI_API_KEY": "sk-direct"})
    assert both.provider.api_key == Secret("sk-direct")  # the variable wins over the file
    secret.write_bytes(b"\xef\xbb\xbfsk-with-bom\n")  # a Windows editor's byte-order mark
    assert Settings.from_env(env).provider.api_key == Secret("sk-with-bom")


@pytest.mark.parametrize("content", [None, b"", b"   \n", b"\xff\xfe\x00sk"])
def test_api_key_file_errors_name_the_variable(tmp_path: Path, content: bytes | None) -> None:
    """A missing, empty or non-UTF-8 key file is a ConfigError naming OPENAI_API_KEY_FILE."""
    secret = tmp_path / "openai-key"
    if content is not None:
        secret.write_bytes(content)
    with pytest.raises(ConfigError, match="OPENAI_API_KEY_FILE"):
        Settings.from_env({"OPENAI_API_KEY_FILE": str(secret)})


def test_real_provider_without_keys_file_refuses() -> None:
    """A real provider without SLUICE_CLIENT_KEYS_FILE: the dev key must not be accepted."""
    with pytest.raises(ConfigError, match="SLUICE_CLIENT_KEYS_FILE") as caught:
        Settings.from_env({"OPENAI_API_KEY": "sk-test-refuse"})
    assert "sk-test-refuse" not in str(caught.value)


def test_keys_file_disables_the_dev_key(tmp_path: Path) -> None:
    """In simulated mode a keys file replaces the dev key."""
    settings = Settings.from_env({"SLUICE_CLIENT_KEYS_FILE": str(tmp_path / "keys.json")})
    assert settings.provider.kind == "simulated"
    assert settings.auth.dev_key is None


def test_secret_hides_its_value() -> None:
    """repr/str of a Secret, and of settings holding one, never show the value."""
    secret = Secret("sk-very-secret-value")
    assert "sk-very-secret-value" not in repr(secret)
    assert "sk-very-secret-value" not in str(secret)
    assert "sk-very-secret-value" not in f"{secret}"
    env = {"OPENAI_API_KEY": "sk-very-secret-value", "SLUICE_CLIENT_KEYS_FILE": "k.json"}
    assert "sk-very-secret-value" not in repr(Settings.from_env(env))
    assert secret == Secret("sk-very-secret-value")
    assert secret != Secret("other")
