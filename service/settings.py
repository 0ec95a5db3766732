"""Configuration: frozen dataclasses read once from an injected environment mapping.

Nothing else in the service reads ``os.environ`` (only OpenTelemetry's exporter does, for
its compression and certificates: see the README). Each concern owns one group
(``ServerSettings``, ``ProviderSettings``, ``StreamSettings``); ``Settings`` holds
them all. Every parse error names the variable that caused it.
"""

from __future__ import annotations

import re
import secrets as _secrets
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import unquote, urlsplit

import orjson

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
MAX_BODY_BYTES = 1024 * 1024 * 1024  # (a WebSocket message's bound is a C integer)
DEFAULT_CONNECT_TIMEOUT_S = 10.0
DEFAULT_FIRST_TOKEN_TIMEOUT_S = 60.0
# OpenAI's reasoning models think before their first token and stream none of it: minutes,
# at high effort (the SDKs wait 600 s for any answer).
DEFAULT_REASONING_FIRST_TOKEN_TIMEOUT_S = 600.0
DEFAULT_IDLE_TIMEOUT_S = 30.0
DEFAULT_COMPLETION_TIMEOUT_S = 600.0  # the openai SDK's own default
DEFAULT_KEEPALIVE_S = 15.0
DEFAULT_DISCONNECT_GRACE_S = 10.0
DEFAULT_CHECKPOINT_TTL_S = 3600.0
DEFAULT_MAX_GENERATION_S = 1800.0
# A generation's whole time (retries and fallbacks included) stays under this, so that the
# Redis budget hold and stream slot it takes (an hour: redis_budgets.HOLD_TTL_S,
# redis_limits.STREAM_LEASE_S) outlast it: they expire on their own only when orphaned.
MAX_GENERATION_CAP_S = 3000.0
# The generation limit is checked on the keepalive tick, so a generation may run a tick
# past it; and a keepalive further apart than this keeps no proxy's idle timer alive.
MAX_KEEPALIVE_S = 300.0
DEFAULT_DRAIN_S = 25.0
DEFAULT_OPENAI_BASE_URL = "https://api.openai.com/v1"
DEFAULT_DEV_KEY = "sluice-dev-key"
DEFAULT_REDIS_TIMEOUT_S = 0.25
DEFAULT_LEDGER_BUFFER = 10_000
DEFAULT_REDIS_BREAKER_FAIL_MAX = 3
DEFAULT_REDIS_BREAKER_RESET_S = 5.0
DEFAULT_SIMULATED_MODELS = ("gpt-4o-mini", "gpt-4o", "gpt-4.1-mini")
DEFAULT_MAX_TOKENS = 4096
DEFAULT_MAX_STREAMS_PER_USER = 256
DEFAULT_DATA_DIR = "data"
DEFAULT_BUDGET_SOFT_FRACTION = 0.8
DEFAULT_RETRY_MAX_ATTEMPTS = 3
DEFAULT_RETRY_BASE_DELAY_S = 0.5
DEFAULT_RETRY_MAX_DELAY_S = 8.0
DEFAULT_RETRY_BUDGET_S = 15.0
DEFAULT_BREAKER_FAIL_MAX = 5
DEFAULT_BREAKER_RESET_S = 30.0
DEFAULT_CACHE_TTL_S = 3600.0
DEFAULT_CACHE_MAX_BYTES = 64 * 1024 * 1024
DEFAULT_SERVICE_NAME = "sluice"
EMAIL_PATTERN = (  # starts only at a word's start: one scan per run of characters
    r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9._%+-]++@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}"
)
# OpenAI-style secret keys, also right after an escaped character (``\n``, ``\x01``,
# ``\u2028``: how a log line writes a control character a client sent before one).
SECRET_KEY_PATTERN = (
    r"(?:\b|(?<=\\[a-z])|(?<=\\x[0-9a-fA-F]{2})|(?<=\\u[0-9a-fA-F]{4}))sk-[A-Za-z0-9_-]{6,}"
)
DEFAULT_REDACT_PATTERNS = (EMAIL_PATTERN, SECRET_KEY_PATTERN)
OTEL_SAMPLERS = frozenset(
    {
        "always_on",
        "always_off",
        "traceidratio",
        "parentbased_always_on",
        "parentbased_always_off",
        "parentbased_traceidratio",
    }
)

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
    reasoning_first_token_timeout_s: float = DEFAULT_REASONING_FIRST_TOKEN_TIMEOUT_S
    idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S
    completion_timeout_s: float = DEFAULT_COMPLETION_TIMEOUT_S  # a whole non-streamed answer
    organization: str | None = None  # OpenAI-Organization, as the openai SDK sends it
    project: str | None = None  # OpenAI-Project


@dataclass(frozen=True, slots=True)
class StreamSettings:
    keepalive_s: float = DEFAULT_KEEPALIVE_S
    disconnect_grace_s: float = DEFAULT_DISCONNECT_GRACE_S
    checkpoint_ttl_s: float = DEFAULT_CHECKPOINT_TTL_S
    max_generation_s: float = DEFAULT_MAX_GENERATION_S


@dataclass(frozen=True, slots=True)
class AuthSettings:
    client_keys_file: Path | None = None
    dev_key: Secret | None = field(default_factory=lambda: Secret(DEFAULT_DEV_KEY))


@dataclass(frozen=True, slots=True)
class ResilienceSettings:
    """Retries, circuit breakers and the fallback chain (see ``resilience.py``)."""

    retry_max_attempts: int = DEFAULT_RETRY_MAX_ATTEMPTS
    retry_base_delay_s: float = DEFAULT_RETRY_BASE_DELAY_S
    retry_max_delay_s: float = DEFAULT_RETRY_MAX_DELAY_S
    retry_budget_s: float = DEFAULT_RETRY_BUDGET_S
    breaker_fail_max: int = DEFAULT_BREAKER_FAIL_MAX
    breaker_reset_s: float = DEFAULT_BREAKER_RESET_S
    breaker_per_model: frozenset[str] = frozenset()  # "*" gives every model its own breaker
    fallbacks: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    degrade_to_cache: bool = True  # last tier: serve a cached answer when nothing else can


@dataclass(frozen=True, slots=True)
class CacheSettings:
    enabled: bool = True
    ttl_s: float = DEFAULT_CACHE_TTL_S
    max_bytes: int = DEFAULT_CACHE_MAX_BYTES


@dataclass(frozen=True, slots=True)
class SharedStateSettings:
    """Scale-out: Redis for shared state, PostgreSQL for the ledger; both off by default."""

    redis_url: Secret | None = None  # may carry a password
    redis_failure: Literal["open", "closed"] = "closed"
    redis_timeout_s: float = DEFAULT_REDIS_TIMEOUT_S
    redis_breaker_fail_max: int = DEFAULT_REDIS_BREAKER_FAIL_MAX
    redis_breaker_reset_s: float = DEFAULT_REDIS_BREAKER_RESET_S
    database_url: Secret | None = None
    ledger_buffer: int = DEFAULT_LEDGER_BUFFER
    ledger_batch: int = 500


@dataclass(frozen=True, slots=True)
class LimitSettings:
    """Rate limits, stream caps, the max_tokens policy (``limits.py``, ``context.py``).

    Rates are per minute; 0 means unlimited. ``max_tokens_cap`` 0 means the model's own
    output ceiling. Per-key overrides come from the keys file (``admission.py``).
    """

    user_rpm: int = 0
    user_tpm: int = 0
    tenant_rpm: int = 0
    tenant_tpm: int = 0
    global_rpm: int = 0
    global_tpm: int = 0
    max_streams_per_user: int = DEFAULT_MAX_STREAMS_PER_USER
    default_max_tokens: int = DEFAULT_MAX_TOKENS
    max_tokens_cap: int = 0
    reject_over_cap: bool = False
    context_windows: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class MoneySettings:
    """Prices, the ledger and USD budgets (``pricing.py``, ``ledger.py``, ``budgets.py``).

    ``data_dir`` None keeps the ledger in memory (the dataclass default, for tests); from the
    environment it defaults to ``./data`` (SQLite). Budgets of None are unlimited.
    """

    data_dir: Path | None = None
    prices: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    user_daily_usd: float | None = None
    user_monthly_usd: float | None = None
    tenant_daily_usd: float | None = None
    tenant_monthly_usd: float | None = None
    soft_fraction: float = DEFAULT_BUDGET_SOFT_FRACTION


@dataclass(frozen=True, slots=True)
class TelemetrySettings:
    """Traces, metrics and logs (``service/telemetry/``); no exporter without an endpoint."""

    traces_endpoint: str | None = None  # the full OTLP/HTTP URL, ending in /v1/traces
    otlp_headers: Mapping[str, str] = field(default_factory=dict, repr=False)  # may hold tokens
    otlp_timeout_s: float = 10.0
    service_name: str = DEFAULT_SERVICE_NAME
    resource_attributes: Mapping[str, str] = field(default_factory=dict)
    sampler: str = "parentbased_always_on"
    sampler_arg: float = 1.0
    bsp_schedule_delay_ms: int = 5000
    bsp_max_queue_size: int = 2048
    bsp_max_export_batch_size: int = 512
    metrics_endpoint: str | None = None  # the full OTLP/HTTP URL, ending in /v1/metrics
    metrics_headers: Mapping[str, str] = field(default_factory=dict, repr=False)
    metrics_timeout_s: float = 10.0
    metric_export_interval_s: float = 60.0
    capture_content: bool = False  # prompt and completion text on spans: opt-in only
    metrics_port: int | None = None  # None: GET /metrics on the main port, admin key needed
    log_format: Literal["json", "text"] = "text"
    log_level: str = "INFO"
    access_log: bool = True
    redact_patterns: tuple[str, ...] = DEFAULT_REDACT_PATTERNS


@dataclass(frozen=True, slots=True)
class Settings:
    server: ServerSettings = field(default_factory=ServerSettings)
    provider: ProviderSettings = field(default_factory=ProviderSettings)
    streams: StreamSettings = field(default_factory=StreamSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    resilience: ResilienceSettings = field(default_factory=ResilienceSettings)
    cache: CacheSettings = field(default_factory=CacheSettings)
    shared: SharedStateSettings = field(default_factory=SharedStateSettings)
    limits: LimitSettings = field(default_factory=LimitSettings)
    money: MoneySettings = field(default_factory=MoneySettings)
    telemetry: TelemetrySettings = field(default_factory=TelemetrySettings)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        """Read every setting from ``env``; raise ``ConfigError`` naming a bad variable."""
        reader = _EnvReader(env)
        provider = _provider_from_env(reader)
        settings = cls(
            server=ServerSettings(
                host=reader.text("SLUICE_HOST", DEFAULT_HOST),
                port=reader.integer("SLUICE_PORT", DEFAULT_PORT, low=0, high=65535),
                max_body_bytes=reader.integer(
                    "SLUICE_MAX_BODY_BYTES", DEFAULT_MAX_BODY_BYTES, low=1, high=MAX_BODY_BYTES
                ),
                drain_s=reader.number("SLUICE_DRAIN_S", DEFAULT_DRAIN_S),
            ),
            provider=provider,
            streams=StreamSettings(
                keepalive_s=reader.number(
                    "SLUICE_KEEPALIVE_S", DEFAULT_KEEPALIVE_S, low=0.01, high=MAX_KEEPALIVE_S
                ),
                disconnect_grace_s=reader.number(
                    "SLUICE_DISCONNECT_GRACE_S", DEFAULT_DISCONNECT_GRACE_S
                ),
                checkpoint_ttl_s=reader.number(
                    "SLUICE_CHECKPOINT_TTL_S", DEFAULT_CHECKPOINT_TTL_S, low=1.0
                ),
                max_generation_s=reader.number(
                    "SLUICE_MAX_GENERATION_S",
                    DEFAULT_MAX_GENERATION_S,
                    low=1.0,
                    high=MAX_GENERATION_CAP_S,
                ),
            ),
            auth=_auth_from_env(reader, provider),
            shared=_shared_from_env(reader),
            limits=_limits_from_env(reader),
            money=_money_from_env(reader),
            resilience=_resilience_from_env(reader),
            cache=CacheSettings(
                enabled=_flag(reader, "SLUICE_CACHE", True),
                ttl_s=reader.number("SLUICE_CACHE_TTL_S", DEFAULT_CACHE_TTL_S, low=1.0),
                max_bytes=reader.integer("SLUICE_CACHE_MAX_BYTES", DEFAULT_CACHE_MAX_BYTES, low=0),
            ),
            telemetry=_telemetry_from_env(reader, provider),
        )
        metrics_port = settings.telemetry.metrics_port
        if metrics_port and metrics_port == settings.server.port:
            raise ConfigError(
                f"SLUICE_METRICS_PORT must differ from SLUICE_PORT (both {metrics_port}): "
                "the metrics listener would take the gateway's port"
            )
        return settings


# What any count or size here needs, and what any time or sum of dollars does (a billion
# seconds is 31 years; a timer or a Redis expiry in milliseconds still holds a thousand
# times it): past these, values meant as "no limit" overflowed C integers and clocks.
MAX_INTEGER = 2**53
MAX_NUMBER = 1e12
MAX_MILLISECONDS = 1e9  # OpenTelemetry's delays and timeouts (11 days)
_INTEGER = re.compile(r"[+-]?[0-9]+", re.ASCII)
_NUMBER = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?", re.ASCII)


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
        self, name: str, default: int, *, low: int | None = None, high: int = MAX_INTEGER
    ) -> int:
        raw = self.raw(name)
        if raw is None:
            return default
        if not _INTEGER.fullmatch(raw):  # (``int`` takes "1_000" and other scripts' digits)
            raise ConfigError(f"{name} must be an integer, got {raw!r}")
        return _bounded(name, int(raw), low, high, raw)

    def number(
        self, name: str, default: float, *, low: float = 0.0, high: float = MAX_NUMBER
    ) -> float:
        raw = self.raw(name)
        if raw is None:
            return default
        if not _NUMBER.fullmatch(raw):  # (``float`` takes "1_0", "inf", other scripts' digits)
            raise ConfigError(f"{name} must be a number, got {raw!r}")
        return _bounded(name, float(raw), low, high, raw)


_N = TypeVar("_N", int, float)


def _bounded(name: str, value: _N, low: _N | None, high: _N, raw: str) -> _N:
    if (low is not None and value < low) or value > high:
        raise ConfigError(f"{name} must be between {low} and {high:g}, got {raw}")
    return value


def _provider_from_env(reader: _EnvReader) -> ProviderSettings:
    api_key = _api_key(reader)
    forced = reader.raw("SLUICE_PROVIDER")
    if forced not in (None, "simulated", "openai"):
        raise ConfigError(f"SLUICE_PROVIDER must be 'simulated' or 'openai', got {forced!r}")
    base_url = reader.raw("OPENAI_BASE_URL")
    if base_url is not None:
        _check_url("OPENAI_BASE_URL", base_url, ("http", "https"))
    # A key or an upstream named: a real provider (vLLM, llama.cpp and Ollama take no key).
    # The simulated provider is the default only with neither; an external simulator is
    # named with SLUICE_PROVIDER=simulated.
    real = forced == "openai" or (forced is None and (api_key or base_url))
    kind: ProviderKind = "openai" if real else "simulated"
    models_raw = reader.raw("SLUICE_MODELS")
    models = tuple(m.strip() for m in models_raw.split(",") if m.strip()) if models_raw else ()
    connect = reader.number("SLUICE_CONNECT_TIMEOUT_S", DEFAULT_CONNECT_TIMEOUT_S, low=0.001)
    first = reader.number("SLUICE_FIRST_TOKEN_TIMEOUT_S", DEFAULT_FIRST_TOKEN_TIMEOUT_S, low=0.001)
    thinking = reader.number(
        "SLUICE_REASONING_FIRST_TOKEN_TIMEOUT_S", DEFAULT_REASONING_FIRST_TOKEN_TIMEOUT_S, low=0.001
    )
    idle = reader.number("SLUICE_IDLE_TIMEOUT_S", DEFAULT_IDLE_TIMEOUT_S, low=0.001)
    whole = reader.number("SLUICE_COMPLETION_TIMEOUT_S", DEFAULT_COMPLETION_TIMEOUT_S, low=0.001)
    common = ProviderSettings(
        connect_timeout_s=connect,
        first_token_timeout_s=first,
        reasoning_first_token_timeout_s=thinking,
        idle_timeout_s=idle,
        completion_timeout_s=whole,
        organization=_header_value(reader, "OPENAI_ORG_ID"),
        project=_header_value(reader, "OPENAI_PROJECT_ID"),
    )
    if kind == "simulated":
        return replace(common, base_url=base_url, models=models or DEFAULT_SIMULATED_MODELS)
    if api_key is None and (base_url is None or _is_openai(base_url)):
        raise ConfigError(
            "SLUICE_PROVIDER=openai needs OPENAI_API_KEY or OPENAI_API_KEY_FILE (or the "
            "OPENAI_BASE_URL of a server that takes no key)"
        )
    return replace(
        common,
        kind="openai",
        name=reader.text("SLUICE_PROVIDER_NAME", "openai"),
        base_url=(base_url or DEFAULT_OPENAI_BASE_URL).rstrip("/"),
        api_key=api_key,
        models=models,
    )


def _is_openai(url: str) -> bool:
    """Whether ``url`` is OpenAI's own API, which never answers without a key."""
    host = urlsplit(url).hostname or ""
    return host == "api.openai.com" or host.endswith(".openai.com")


def _api_key(reader: _EnvReader) -> Secret | None:
    direct = reader.raw("OPENAI_API_KEY")
    if direct:
        return _checked_key("OPENAI_API_KEY", direct)
    path = reader.raw("OPENAI_API_KEY_FILE")
    if path is None:
        return None
    try:
        value = Path(path).read_text(encoding="utf-8-sig").strip()  # -sig: a BOM is not key
    except OSError as exc:
        raise ConfigError(f"OPENAI_API_KEY_FILE cannot be read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError("OPENAI_API_KEY_FILE must hold the key as UTF-8 text") from None
    if not value:
        raise ConfigError("OPENAI_API_KEY_FILE names an empty file")
    return _checked_key("OPENAI_API_KEY_FILE", value)


def _header_value(reader: _EnvReader, name: str) -> str | None:
    """A value sent as a header to the provider: printable Latin-1 (a control character
    was refused by the provider on every request; a character past Latin-1 by the client,
    in a message naming the header, not the variable)."""
    value = reader.raw(name)
    if value is not None and not (value.isprintable() and max(map(ord, value)) < 256):
        raise ConfigError(f"{name} must be printable Latin-1 text, got {value!r}")
    return value


def _checked_key(name: str, key: str) -> Secret:
    """A key that can go in a header: one token, no spaces or control characters (the
    message never shows it)."""
    if any(c.isspace() or not c.isprintable() for c in key):
        raise ConfigError(f"{name}: the key holds spaces, line breaks or control characters")
    return Secret(key)


def _auth_from_env(reader: _EnvReader, provider: ProviderSettings) -> AuthSettings:
    keys_file = reader.raw("SLUICE_CLIENT_KEYS_FILE")
    if keys_file is None and provider.kind != "simulated":
        raise ConfigError(
            "a real provider needs client keys: set SLUICE_CLIENT_KEYS_FILE "
            "(see README, 'Client keys'); the dev key is only accepted in simulated mode"
        )
    dev_key = None
    if keys_file is None:
        dev_key = _checked_key("SLUICE_DEV_KEY", reader.text("SLUICE_DEV_KEY", DEFAULT_DEV_KEY))
    return AuthSettings(client_keys_file=Path(keys_file) if keys_file else None, dev_key=dev_key)


def _resilience_from_env(reader: _EnvReader) -> ResilienceSettings:
    per_model = reader.raw("SLUICE_BREAKER_PER_MODEL") or ""
    return ResilienceSettings(
        retry_max_attempts=reader.integer(
            "SLUICE_RETRY_MAX_ATTEMPTS", DEFAULT_RETRY_MAX_ATTEMPTS, low=1, high=20
        ),
        retry_base_delay_s=reader.number("SLUICE_RETRY_BASE_DELAY_S", DEFAULT_RETRY_BASE_DELAY_S),
        retry_max_delay_s=reader.number("SLUICE_RETRY_MAX_DELAY_S", DEFAULT_RETRY_MAX_DELAY_S),
        retry_budget_s=reader.number("SLUICE_RETRY_BUDGET_S", DEFAULT_RETRY_BUDGET_S),
        breaker_fail_max=reader.integer("SLUICE_BREAKER_FAIL_MAX", DEFAULT_BREAKER_FAIL_MAX, low=1),
        breaker_reset_s=reader.number("SLUICE_BREAKER_RESET_S", DEFAULT_BREAKER_RESET_S, low=0.001),
        breaker_per_model=frozenset(m.strip() for m in per_model.split(",") if m.strip()),
        fallbacks=_fallbacks(reader.raw("SLUICE_FALLBACKS")),
        degrade_to_cache=_flag(reader, "SLUICE_DEGRADE_TO_CACHE", True),
    )


def _fallbacks(raw: str | None) -> dict[str, tuple[str, ...]]:
    """``{"gpt-4o": ["gpt-4o-mini"]}``: the models to try, in order, when one fails."""
    if raw is None:
        return {}
    try:
        value = orjson.loads(raw)
    except ValueError:
        raise ConfigError("SLUICE_FALLBACKS must be a JSON object") from None
    if not isinstance(value, dict) or not all(
        isinstance(chain, list) and all(isinstance(m, str) and m for m in chain)
        for chain in value.values()
    ):
        raise ConfigError('SLUICE_FALLBACKS must look like {"gpt-4o": ["gpt-4o-mini"]}')
    return {model: tuple(chain) for model, chain in value.items()}


def _flag(reader: _EnvReader, name: str, default: bool) -> bool:
    raw = reader.raw(name)
    if raw is None:
        return default
    lowered = raw.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be true or false, got {raw!r}")


def _shared_from_env(reader: _EnvReader) -> SharedStateSettings:
    failure = reader.text("SLUICE_REDIS_FAILURE", "closed")
    if failure not in ("open", "closed"):
        raise ConfigError(f"SLUICE_REDIS_FAILURE must be 'open' or 'closed', got {failure!r}")
    redis_url = reader.raw("SLUICE_REDIS_URL")
    database_url = reader.raw("SLUICE_DATABASE_URL")
    if redis_url:
        unix = redis_url.startswith("unix://")
        _check_url("SLUICE_REDIS_URL", redis_url, ("redis", "rediss", "unix"), host=not unix)
        if unix and not urlsplit(redis_url).path:
            raise ConfigError("SLUICE_REDIS_URL names no socket (unix:///path/to/redis.sock)")
    if database_url:  # (a socket directory may come as ?host=, so no host is needed)
        _check_url("SLUICE_DATABASE_URL", database_url, ("postgresql", "postgres"), host=False)
    return SharedStateSettings(
        redis_url=Secret(redis_url) if redis_url else None,
        redis_failure="open" if failure == "open" else "closed",
        redis_timeout_s=reader.number("SLUICE_REDIS_TIMEOUT_S", DEFAULT_REDIS_TIMEOUT_S, low=0.001),
        redis_breaker_fail_max=reader.integer(
            "SLUICE_REDIS_BREAKER_FAIL_MAX", DEFAULT_REDIS_BREAKER_FAIL_MAX, low=1
        ),
        redis_breaker_reset_s=reader.number(
            "SLUICE_REDIS_BREAKER_RESET_S", DEFAULT_REDIS_BREAKER_RESET_S
        ),
        database_url=Secret(database_url) if database_url else None,
        ledger_buffer=reader.integer("SLUICE_LEDGER_BUFFER", DEFAULT_LEDGER_BUFFER, low=1),
    )


def _limits_from_env(reader: _EnvReader) -> LimitSettings:
    policy = reader.text("SLUICE_MAX_TOKENS_POLICY", "clamp")
    if policy not in ("clamp", "reject"):
        raise ConfigError(f"SLUICE_MAX_TOKENS_POLICY must be 'clamp' or 'reject', got {policy!r}")
    rate = {
        f"{tier}_{unit}": reader.integer(f"SLUICE_{unit.upper()}_{suffix}", 0, low=0)
        for tier, suffix in (("user", "PER_USER"), ("tenant", "PER_TENANT"), ("global", "GLOBAL"))
        for unit in ("rpm", "tpm")
    }
    return LimitSettings(
        **rate,
        max_streams_per_user=reader.integer(
            "SLUICE_MAX_STREAMS_PER_USER", DEFAULT_MAX_STREAMS_PER_USER, low=0
        ),
        default_max_tokens=reader.integer("SLUICE_DEFAULT_MAX_TOKENS", DEFAULT_MAX_TOKENS, low=1),
        max_tokens_cap=reader.integer("SLUICE_MAX_TOKENS_CAP", 0, low=0),
        reject_over_cap=policy == "reject",
        context_windows=_context_windows(reader.raw("SLUICE_CONTEXT_WINDOWS")),
    )


def _context_windows(raw: str | None) -> dict[str, int]:
    """``{"my-model": 32768}``: context windows added to (or replacing) the built-in table."""
    document = _json_value("SLUICE_CONTEXT_WINDOWS", raw) if raw else {}
    if not isinstance(document, dict) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in document.values()
    ):
        raise ConfigError('SLUICE_CONTEXT_WINDOWS must be a JSON object {"model": tokens}')
    return document


def _money_from_env(reader: _EnvReader) -> MoneySettings:
    ledger = reader.text("SLUICE_LEDGER", "sqlite")
    if ledger not in ("sqlite", "memory"):
        raise ConfigError(f"SLUICE_LEDGER must be 'sqlite' or 'memory', got {ledger!r}")
    data_dir = Path(reader.text("SLUICE_DATA_DIR", DEFAULT_DATA_DIR))

    def usd(name: str) -> float | None:
        return reader.number(name, 0.0) if reader.raw(name) is not None else None

    return MoneySettings(
        data_dir=data_dir if ledger == "sqlite" else None,
        prices=_prices(reader),
        user_daily_usd=usd("SLUICE_BUDGET_USER_DAILY_USD"),
        user_monthly_usd=usd("SLUICE_BUDGET_USER_MONTHLY_USD"),
        tenant_daily_usd=usd("SLUICE_BUDGET_TENANT_DAILY_USD"),
        tenant_monthly_usd=usd("SLUICE_BUDGET_TENANT_MONTHLY_USD"),
        soft_fraction=reader.number(
            "SLUICE_BUDGET_SOFT_FRACTION", DEFAULT_BUDGET_SOFT_FRACTION, low=0.0, high=1.0
        ),
    )


def _prices(reader: _EnvReader) -> dict[str, dict[str, float]]:
    """Price overrides, the file first, then ``SLUICE_PRICES`` on top.

    ``{"gpt-4o": {"input": 2.5, "cached_input": 1.25, "output": 10}}``, USD per 1M tokens.
    """
    prices: dict[str, dict[str, float]] = {}
    path = reader.raw("SLUICE_PRICES_FILE")
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"SLUICE_PRICES_FILE cannot be read: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError("SLUICE_PRICES_FILE must be UTF-8 JSON") from None
        prices.update(_price_table("SLUICE_PRICES_FILE", text))
    raw = reader.raw("SLUICE_PRICES")
    if raw is not None:
        prices.update(_price_table("SLUICE_PRICES", raw))
    return prices


def _price_table(name: str, raw: str) -> dict[str, dict[str, float]]:
    document = _json_value(name, raw)
    if not isinstance(document, dict):
        raise ConfigError(f'{name} must be a JSON object {{"model": {{"input": ..}}}}')
    table: dict[str, dict[str, float]] = {}
    for model, entry in document.items():
        fields_ok = isinstance(entry, dict) and {"input", "output"} <= entry.keys()
        values = entry.values() if isinstance(entry, dict) else ()
        numbers = all(_usd_rate(v) for v in values)
        if not fields_ok or not numbers or not set(entry) <= {"input", "cached_input", "output"}:
            raise ConfigError(
                f"{name}: {model!r} needs non-negative numbers 'input', 'output' "
                "(and optionally 'cached_input'), USD per 1M tokens"
            )
        table[model] = {k: float(v) for k, v in entry.items()}
    return table


def _usd_rate(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value >= 0


def _json_value(name: str, raw: str) -> object:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ConfigError(f"{name} is not valid JSON: {exc}") from None


def _telemetry_from_env(reader: _EnvReader, provider: ProviderSettings) -> TelemetrySettings:
    """The standard ``OTEL_*`` variables (OTLP over HTTP/protobuf only) and Sluice's own."""
    for name in (
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
    ):
        protocol = reader.raw(name)
        if protocol not in (None, "http/protobuf"):
            raise ConfigError(f"{name}: only 'http/protobuf' is supported, got {protocol!r}")
    sampler = reader.text("OTEL_TRACES_SAMPLER", "parentbased_always_on").lower()
    if sampler not in OTEL_SAMPLERS:
        raise ConfigError(f"OTEL_TRACES_SAMPLER must be one of {sorted(OTEL_SAMPLERS)}")
    resource = _otel_pairs("OTEL_RESOURCE_ATTRIBUTES", reader.raw("OTEL_RESOURCE_ATTRIBUTES"))
    header_var = _signal_var(reader, "TRACES", "HEADERS")
    metrics_header_var = _signal_var(reader, "METRICS", "HEADERS")
    timeout_ms = reader.number(
        "OTEL_EXPORTER_OTLP_TIMEOUT", 10_000.0, low=1.0, high=MAX_MILLISECONDS
    )
    log_format = reader.text(
        "SLUICE_LOG_FORMAT", "text" if provider.kind == "simulated" else "json"
    ).lower()
    if log_format not in ("json", "text"):
        raise ConfigError(f"SLUICE_LOG_FORMAT must be 'json' or 'text', got {log_format!r}")
    metrics_port = reader.raw("SLUICE_METRICS_PORT")
    return TelemetrySettings(
        traces_endpoint=_signal_endpoint(reader, "TRACES"),
        otlp_headers=_otel_pairs(header_var, reader.raw(header_var)),
        otlp_timeout_s=reader.number(
            "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", timeout_ms, low=1.0, high=MAX_MILLISECONDS
        )
        / 1000,
        metrics_endpoint=_signal_endpoint(reader, "METRICS"),
        metrics_headers=_otel_pairs(metrics_header_var, reader.raw(metrics_header_var)),
        metrics_timeout_s=reader.number(
            "OTEL_EXPORTER_OTLP_METRICS_TIMEOUT", timeout_ms, low=1.0, high=MAX_MILLISECONDS
        )
        / 1000,
        metric_export_interval_s=reader.number(
            "OTEL_METRIC_EXPORT_INTERVAL", 60_000.0, low=1.0, high=MAX_MILLISECONDS
        )
        / 1000,
        service_name=reader.raw("OTEL_SERVICE_NAME")
        or resource.get("service.name", DEFAULT_SERVICE_NAME),
        resource_attributes=resource,
        sampler=sampler,
        sampler_arg=reader.number("OTEL_TRACES_SAMPLER_ARG", 1.0, high=1.0),  # a ratio
        bsp_schedule_delay_ms=reader.integer(
            "OTEL_BSP_SCHEDULE_DELAY", 5000, low=1, high=int(MAX_MILLISECONDS)
        ),
        bsp_max_queue_size=reader.integer("OTEL_BSP_MAX_QUEUE_SIZE", 2048, low=1),
        bsp_max_export_batch_size=reader.integer("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512, low=1),
        capture_content=_flag(reader, "SLUICE_OTEL_CAPTURE_CONTENT", False),
        metrics_port=(
            reader.integer("SLUICE_METRICS_PORT", 0, low=0, high=65535)
            if metrics_port is not None
            else None
        ),
        log_format="json" if log_format == "json" else "text",
        log_level=_log_level(reader.text("SLUICE_LOG_LEVEL", "INFO")),
        access_log=_flag(reader, "SLUICE_ACCESS_LOG", True),
        redact_patterns=_redact_patterns(reader.raw("SLUICE_REDACT_PATTERNS")),
    )


def _signal_var(reader: _EnvReader, signal: str, suffix: str) -> str:
    """``OTEL_EXPORTER_OTLP_<SIGNAL>_<SUFFIX>`` when set, else the shared variable."""
    specific = f"OTEL_EXPORTER_OTLP_{signal}_{suffix}"
    return specific if reader.raw(specific) else f"OTEL_EXPORTER_OTLP_{suffix}"


def _signal_endpoint(reader: _EnvReader, signal: str) -> str | None:
    """A signal's URL as the OTLP exporter spec builds it; None turns its export off.

    ``OTEL_TRACES_EXPORTER`` is ``otlp`` or ``none``; ``OTEL_METRICS_EXPORTER`` may also be
    ``prometheus`` (served at ``/metrics`` either way), which means no OTLP push.
    """
    if _flag(reader, "OTEL_SDK_DISABLED", False):
        return None
    exporter_var = f"OTEL_{signal}_EXPORTER"
    allowed = ("otlp", "none", "prometheus") if signal == "METRICS" else ("otlp", "none")
    exporter = reader.text(exporter_var, "otlp").lower()
    if exporter not in allowed:
        raise ConfigError(f"{exporter_var} must be one of {list(allowed)}, got {exporter!r}")
    if exporter != "otlp":
        return None
    specific_var = f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT"
    specific = reader.raw(specific_var)
    base = reader.raw("OTEL_EXPORTER_OTLP_ENDPOINT")
    for name, url in ((specific_var, specific), ("OTEL_EXPORTER_OTLP_ENDPOINT", base)):
        if url is not None:
            _check_url(name, url, ("http", "https"))
    if specific is not None:
        return specific  # used as given, per the spec
    return f"{base.rstrip('/')}/v1/{signal.lower()}" if base is not None else None


def _check_url(name: str, url: str, schemes: tuple[str, ...], *, host: bool = True) -> None:
    """``url`` has one of ``schemes``, a host when ``host``, and a port that is a port (the
    message never shows the URL: it may hold a password)."""
    try:
        parts = urlsplit(url)
    except ValueError:  # an unclosed IPv6 bracket, ...
        raise ConfigError(f"{name} is not a URL") from None
    if parts.scheme not in schemes:
        raise ConfigError(f"{name} must be a {' or '.join(s + '://' for s in schemes)} URL")
    if host and not parts.hostname:
        raise ConfigError(f"{name} names no host")
    if "," in parts.netloc:
        return  # PostgreSQL's several hosts: the driver reads them
    try:
        parts.port  # noqa: B018 (parsing it is the check)
    except ValueError:
        raise ConfigError(f"{name} has a port that is not a number from 0 to 65535") from None


def _otel_pairs(name: str, raw: str | None) -> dict[str, str]:
    """``key1=value1,key2=value2`` with percent-encoded values (W3C Baggage style)."""
    pairs: dict[str, str] = {}
    for item in (raw or "").split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{name} must look like key1=value1,key2=value2")
        pairs[unquote(key.strip())] = unquote(value.strip())
    return pairs


def _log_level(raw: str) -> str:
    level = raw.upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ConfigError(
            f"SLUICE_LOG_LEVEL must be DEBUG, INFO, WARNING, ERROR or CRITICAL, got {raw!r}"
        )
    return level


def _json_list(raw: str) -> list[Any] | None:
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, list) else None


def _redact_patterns(raw: str | None) -> tuple[str, ...]:
    """A JSON array of regexes (``[]`` for none), or one regex; replaces the defaults."""
    if raw is None:
        return DEFAULT_REDACT_PATTERNS
    patterns = _json_list(raw) if raw.startswith("[") else None
    if patterns is None:  # not a JSON array: one regex (``[0-9]{16}`` starts like one)
        patterns = [raw]
    if not isinstance(patterns, list) or not all(isinstance(p, str) and p for p in patterns):
        raise ConfigError("SLUICE_REDACT_PATTERNS must be a regex or a JSON array of regexes")
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ConfigError(f"SLUICE_REDACT_PATTERNS: bad regex {pattern!r}: {exc}") from None
    return tuple(patterns)
