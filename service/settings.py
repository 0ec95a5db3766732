"""Configuration: frozen dataclasses read once from an injected environment mapping.

Nothing else in the service reads ``os.environ``. Each concern owns one group
(``ServerSettings``, ``ProviderSettings``, ``StreamSettings``); ``Settings`` holds
them all. Every parse error names the variable that caused it.
"""

from __future__ import annotations

import secrets as _secrets
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, TypeVar

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
DEFAULT_CONNECT_TIMEOUT_S = 10.0
DEFAULT_FIRST_TOKEN_TIMEOUT_S = 60.0
DEFAULT_IDLE_TIMEOUT_S = 30.0
DEFAULT_KEEPALIVE_S = 15.0
DEFAULT_DISCONNECT_GRACE_S = 10.0
DEFAULT_CHECKPOINT_TTL_S = 3600.0
DEFAULT_DRAIN_S = 25.0
DEFAULT_OPENAI_BASE_URL = "https://api.openai.com/v1"
DEFAULT_DEV_KEY = "sluice-dev-key"
DEFAULT_SIMULATED_MODELS = ("gpt-4o-mini", "gpt-4o", "gpt-4.1-mini")

ProviderKind = Literal["simulated", "openai"]


class ConfigError(ValueError):
    """A setting is missing or malformed; the message names the variable."""


class Secret:
    """A string that never shows itself in ``repr``/``str``, so it cannot leak into logs."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and _secrets.compare_digest(self._value, other._value)

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True, slots=True)
class ServerSettings:
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    drain_s: float = DEFAULT_DRAIN_S


@dataclass(frozen=True, slots=True)
class ProviderSettings:
    kind: ProviderKind = "simulated"
    name: str = "simulated"
    base_url: str | None = None  # None with "simulated": start the built-in simulator
    api_key: Secret | None = None
    models: tuple[str, ...] = DEFAULT_SIMULATED_MODELS
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S
    first_token_timeout_s: float = DEFAULT_FIRST_TOKEN_TIMEOUT_S
    idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S


@dataclass(frozen=True, slots=True)
class StreamSettings:
    keepalive_s: float = DEFAULT_KEEPALIVE_S
    disconnect_grace_s: float = DEFAULT_DISCONNECT_GRACE_S
    checkpoint_ttl_s: float = DEFAULT_CHECKPOINT_TTL_S


@dataclass(frozen=True, slots=True)
class AuthSettings:
    client_keys_file: Path | None = None
    dev_key: Secret | None = field(default_factory=lambda: Secret(DEFAULT_DEV_KEY))


@dataclass(frozen=True, slots=True)
class Settings:
    server: ServerSettings = field(default_factory=ServerSettings)
    provider: ProviderSettings = field(default_factory=ProviderSettings)
    streams: StreamSettings = field(default_factory=StreamSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        """Read every setting from ``env``; raise ``ConfigError`` naming a bad variable."""
        reader = _EnvReader(env)
        provider = _provider_from_env(reader)
        return cls(
            server=ServerSettings(
                host=reader.text("SLUICE_HOST", DEFAULT_HOST),
                port=reader.integer("SLUICE_PORT", DEFAULT_PORT, low=0, high=65535),
                max_body_bytes=reader.integer(
                    "SLUICE_MAX_BODY_BYTES", DEFAULT_MAX_BODY_BYTES, low=1
                ),
                drain_s=reader.number("SLUICE_DRAIN_S", DEFAULT_DRAIN_S),
            ),
            provider=provider,
            streams=StreamSettings(
                keepalive_s=reader.number("SLUICE_KEEPALIVE_S", DEFAULT_KEEPALIVE_S, low=0.01),
                disconnect_grace_s=reader.number(
                    "SLUICE_DISCONNECT_GRACE_S", DEFAULT_DISCONNECT_GRACE_S
                ),
                checkpoint_ttl_s=reader.number(
                    "SLUICE_CHECKPOINT_TTL_S", DEFAULT_CHECKPOINT_TTL_S, low=1.0
                ),
            ),
            auth=_auth_from_env(reader, provider),
        )


class _EnvReader:
    """Typed accessors over the environment mapping; errors name the variable."""

    __slots__ = ("_env",)

    def __init__(self, env: Mapping[str, str]) -> None:
        self._env = env

    def raw(self, name: str) -> str | None:
        value = self._env.get(name)
        return value.strip() if value is not None and value.strip() else None

    def text(self, name: str, default: str) -> str:
        return self.raw(name) or default

    def integer(
        self, name: str, default: int, *, low: int | None = None, high: int | None = None
    ) -> int:
        raw = self.raw(name)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
        return _bounded(name, value, low, high)

    def number(self, name: str, default: float, *, low: float = 0.0) -> float:
        raw = self.raw(name)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"{name} must be a number, got {raw!r}") from None
        return _bounded(name, value, low, None)


_N = TypeVar("_N", int, float)


def _bounded(name: str, value: _N, low: _N | None, high: _N | None) -> _N:
    if (low is not None and value < low) or (high is not None and value > high):
        raise ConfigError(f"{name} must be between {low} and {high}, got {value}")
    return value


def _provider_from_env(reader: _EnvReader) -> ProviderSettings:
    api_key = _api_key(reader)
    forced = reader.raw("SLUICE_PROVIDER")
    if forced not in (None, "simulated", "openai"):
        raise ConfigError(f"SLUICE_PROVIDER must be 'simulated' or 'openai', got {forced!r}")
    kind: ProviderKind = (
        "openai" if forced == "openai" or (forced is None and api_key) else "simulated"
    )
    base_url = reader.raw("OPENAI_BASE_URL")
    models_raw = reader.raw("SLUICE_MODELS")
    models = tuple(m.strip() for m in models_raw.split(",") if m.strip()) if models_raw else ()
    connect = reader.number("SLUICE_CONNECT_TIMEOUT_S", DEFAULT_CONNECT_TIMEOUT_S, low=0.001)
    first = reader.number("SLUICE_FIRST_TOKEN_TIMEOUT_S", DEFAULT_FIRST_TOKEN_TIMEOUT_S, low=0.001)
    idle = reader.number("SLUICE_IDLE_TIMEOUT_S", DEFAULT_IDLE_TIMEOUT_S, low=0.001)
    common = ProviderSettings(
        connect_timeout_s=connect, first_token_timeout_s=first, idle_timeout_s=idle
    )
    if kind == "simulated":
        return replace(common, base_url=base_url, models=models or DEFAULT_SIMULATED_MODELS)
    if api_key is None:
        raise ConfigError("SLUICE_PROVIDER=openai needs OPENAI_API_KEY or OPENAI_API_KEY_FILE")
    return replace(
        common,
        kind="openai",
        name=reader.text("SLUICE_PROVIDER_NAME", "openai"),
        base_url=(base_url or DEFAULT_OPENAI_BASE_URL).rstrip("/"),
        api_key=api_key,
        models=models,
    )


def _api_key(reader: _EnvReader) -> Secret | None:
    direct = reader.raw("OPENAI_API_KEY")
    if direct:
        return Secret(direct)
    path = reader.raw("OPENAI_API_KEY_FILE")
    if path is None:
        return None
    try:
        value = Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"OPENAI_API_KEY_FILE cannot be read: {exc.strerror}") from None
    if not value:
        raise ConfigError("OPENAI_API_KEY_FILE names an empty file")
    return Secret(value)


def _auth_from_env(reader: _EnvReader, provider: ProviderSettings) -> AuthSettings:
    keys_file = reader.raw("SLUICE_CLIENT_KEYS_FILE")
    if keys_file is None and provider.kind != "simulated":
        raise ConfigError(
            "a real provider needs client keys: set SLUICE_CLIENT_KEYS_FILE "
            "(see README, 'Client keys'); the dev key is only accepted in simulated mode"
        )
    dev_key = None
    if keys_file is None:
        dev_key = Secret(reader.text("SLUICE_DEV_KEY", DEFAULT_DEV_KEY))
    return AuthSettings(client_keys_file=Path(keys_file) if keys_file else None, dev_key=dev_key)
