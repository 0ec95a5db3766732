"""Redaction alone: keys, Authorization values, e-mails and configured patterns disappear."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from service.settings import DEFAULT_REDACT_PATTERNS, ProviderSettings, Secret, Settings
from service.telemetry.metrics import Metrics
from service.telemetry.redaction import REDACTED, LabelGuard, Redactor

PROVIDER_KEY = "prov-key-without-a-known-shape-42"


@pytest.fixture
def redactor() -> Redactor:
    settings = Settings(provider=ProviderSettings(api_key=Secret(PROVIDER_KEY)))
    return Redactor.from_settings(settings)


@pytest.mark.parametrize(
    "text",
    [
        "Authorization: Bearer abc.def-ghi",
        '{"authorization": "Bearer abc.def-ghi"}',
        "[('Authorization', 'Basic abc.def-ghi')]",
        '{"message": "said {\\"Authorization\\": \\"Basic abc.def-ghi\\"}"}',  # a JSON line
        "sent bearer abc.def-ghi upstream",
        "key sk-proj-abc.def-ghi leaked",
        "mail abc.def-ghi@example.co.uk now",
    ],
)
def test_secrets_in_every_shape_are_removed(redactor: Redactor, text: str) -> None:
    """Header dumps, JSON, reprs, bare bearer tokens, sk- keys and e-mails."""
    out = redactor.redact(text)
    assert "abc.def-ghi" not in out
    assert REDACTED in out


def test_the_provider_key_is_removed_whatever_its_shape(redactor: Redactor) -> None:
    """Known secrets are matched literally, even when no pattern would catch them."""
    assert redactor.redact(f"upstream said {PROVIDER_KEY}!") == f"upstream said {REDACTED}!"


def test_the_dev_key_is_a_known_secret() -> None:
    """The dev client key (simulated mode) is redacted too."""
    redactor = Redactor.from_settings(Settings())
    assert "sluice-dev-key" not in redactor.redact("key=sluice-dev-key")


def test_passwords_in_the_redis_and_database_urls_are_known_secrets() -> None:
    """An error that quotes a connection URL (a driver's message) leaves no password."""
    settings = Settings.from_env(
        {
            "SLUICE_REDIS_URL": "redis://:r3dis-pw@redis:6379/0",
            "SLUICE_DATABASE_URL": "postgresql://sluice:pg-s3cret@db/sluice",
        }
    )
    line = Redactor.from_settings(settings).redact(
        "could not reach redis://:r3dis-pw@redis:6379/0 or postgresql://sluice:pg-s3cret@db"
    )
    assert "r3dis-pw" not in line
    assert "pg-s3cret" not in line


def test_plain_text_is_untouched(redactor: Redactor) -> None:
    """Ordinary log text survives, including words like 'bearer' at the end of a line."""
    text = "POST /v1/chat/completions 200 completed tokens=12"
    assert redactor.redact(text) == text


def test_configured_patterns_replace_the_defaults() -> None:
    """SLUICE_REDACT_PATTERNS replaces e-mail/sk- patterns; Bearer stays always on."""
    redactor = Redactor([r"acct-\d+"], secrets=())
    out = redactor.redact("acct-991 alice@example.com Bearer tok")
    assert out == f"{REDACTED} alice@example.com Bearer {REDACTED}"
    assert Redactor(DEFAULT_REDACT_PATTERNS).redact("alice@example.com") == REDACTED


def test_label_guard_redacts_and_bounds_cardinality(redactor: Redactor) -> None:
    """Label values are redacted, cached, and capped: past the cap new values are 'other'."""
    guard = LabelGuard(redactor, max_values=2)
    assert guard("carol@example.com") == REDACTED
    assert guard("gpt-4o") == "gpt-4o"
    assert guard("gpt-4o-mini") == "other"
    assert guard("gpt-4o") == "gpt-4o"
    assert guard(None) == ""


def test_operator_labels_keep_their_names_after_a_flood_of_client_values() -> None:
    """Client model names use up their label budget ("other" from then on); a breaker's
    provider name, set by the operator, still exports as itself."""
    redactor = Redactor(DEFAULT_REDACT_PATTERNS)
    metrics = Metrics(CollectorRegistry(), LabelGuard(redactor, max_values=3), LabelGuard(redactor))
    for n in range(10):
        metrics.label(f"client-model-{n}")
    assert metrics.label("client-model-99") == "other"
    metrics.breaker("openai", "open")
    exported = metrics.render().decode()
    assert 'sluice_breaker_state{provider="openai"}' in exported
