"""The OTEL_* environment, read through ``Settings.from_env``, and the provider built from it."""

from __future__ import annotations

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, ParentBased, TraceIdRatioBased

from service.settings import ConfigError, Settings, TelemetrySettings
from service.telemetry.tracing import build_sampler, build_tracer_provider


def telemetry(**env: str) -> TelemetrySettings:
    return Settings.from_env(env).telemetry


def test_nothing_configured_means_no_exporter_and_no_provider() -> None:
    """No endpoint: tracing off, so no provider (the no-op tracer stays)."""
    settings = telemetry()
    assert settings.traces_endpoint is None
    assert build_tracer_provider(settings) is None
    assert settings.capture_content is False


def test_base_endpoint_gets_the_signal_path_and_the_specific_one_is_kept() -> None:
    """OTEL_EXPORTER_OTLP_ENDPOINT + /v1/traces; the traces-specific variable wins, as given."""
    assert (
        telemetry(OTEL_EXPORTER_OTLP_ENDPOINT="http://collector:4318/").traces_endpoint
        == "http://collector:4318/v1/traces"
    )
    both = telemetry(
        OTEL_EXPORTER_OTLP_ENDPOINT="http://collector:4318",
        OTEL_EXPORTER_OTLP_TRACES_ENDPOINT="http://other:4318/custom",
    )
    assert both.traces_endpoint == "http://other:4318/custom"


@pytest.mark.parametrize(
    "env",
    [
        {"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"},
        {"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"},
    ],
)
def test_tracing_can_be_switched_off(env: dict[str, str]) -> None:
    """OTEL_SDK_DISABLED and OTEL_TRACES_EXPORTER=none win over an endpoint."""
    assert telemetry(**env).traces_endpoint is None


def test_standard_variables_are_read() -> None:
    """Headers (percent-decoded), timeout in ms, service name, resource, sampler, batching."""
    settings = telemetry(
        OTEL_EXPORTER_OTLP_ENDPOINT="https://c:4318",
        OTEL_EXPORTER_OTLP_HEADERS="api-key=a%3Db,x-team=ml",
        OTEL_EXPORTER_OTLP_TIMEOUT="2500",
        OTEL_SERVICE_NAME="gateway-eu",
        OTEL_RESOURCE_ATTRIBUTES="deployment.environment=prod,service.name=ignored",
        OTEL_TRACES_SAMPLER="parentbased_traceidratio",
        OTEL_TRACES_SAMPLER_ARG="0.25",
        OTEL_BSP_SCHEDULE_DELAY="200",
        SLUICE_OTEL_CAPTURE_CONTENT="true",
    )
    assert dict(settings.otlp_headers) == {"api-key": "a=b", "x-team": "ml"}
    assert "a=b" not in repr(settings)  # header values may be tokens
    assert settings.otlp_timeout_s == 2.5
    assert settings.service_name == "gateway-eu"
    assert settings.resource_attributes["deployment.environment"] == "prod"
    assert (settings.sampler, settings.sampler_arg) == ("parentbased_traceidratio", 0.25)
    assert settings.bsp_schedule_delay_ms == 200
    assert settings.capture_content is True


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, "OTEL_EXPORTER_OTLP_PROTOCOL"),
        ({"OTEL_TRACES_SAMPLER": "sometimes"}, "OTEL_TRACES_SAMPLER"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "collector:4318"}, "OTEL_EXPORTER_OTLP_ENDPOINT"),
        ({"OTEL_EXPORTER_OTLP_HEADERS": "novalue"}, "OTEL_EXPORTER_OTLP_HEADERS"),
        ({"SLUICE_LOG_FORMAT": "xml"}, "SLUICE_LOG_FORMAT"),
        ({"SLUICE_REDACT_PATTERNS": '["("]'}, "SLUICE_REDACT_PATTERNS"),
        ({"SLUICE_METRICS_PORT": "http"}, "SLUICE_METRICS_PORT"),
        ({"SLUICE_METRICS_PORT": "9000", "SLUICE_PORT": "9000"}, "SLUICE_METRICS_PORT"),
        (
            {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "1.5"},
            "OTEL_TRACES_SAMPLER_ARG",
        ),
    ],
)
def test_bad_values_name_their_variable(env: dict[str, str], variable: str) -> None:
    """Every telemetry parse error names the variable."""
    with pytest.raises(ConfigError, match=variable):
        Settings.from_env(env)


def test_log_format_defaults_to_text_when_simulated_and_patterns_are_configurable() -> None:
    """Dev (simulated) logs are text; patterns are a JSON list or one regex."""
    assert telemetry().log_format == "text"
    assert telemetry(SLUICE_REDACT_PATTERNS='["a+", "b+"]').redact_patterns == ("a+", "b+")
    assert telemetry(SLUICE_REDACT_PATTERNS="acct-\\d+").redact_patterns == ("acct-\\d+",)
    assert telemetry(SLUICE_REDACT_PATTERNS="[0-9]{16}").redact_patterns == ("[0-9]{16}",)
    assert telemetry(SLUICE_METRICS_PORT="9464").metrics_port == 9464


@pytest.mark.parametrize(
    ("name", "root", "parent_based"),
    [
        ("always_on", ALWAYS_ON, False),
        ("always_off", ALWAYS_OFF, False),
        ("parentbased_always_on", ALWAYS_ON, True),
        ("parentbased_always_off", ALWAYS_OFF, True),
    ],
)
def test_sampler_names_map_to_sdk_samplers(name: str, root: object, parent_based: bool) -> None:
    """OTEL_TRACES_SAMPLER as the SDK spec names them."""
    sampler = build_sampler(TelemetrySettings(sampler=name))
    assert isinstance(sampler, ParentBased) is parent_based
    if not parent_based:
        assert sampler is root


def test_ratio_sampler_uses_the_argument() -> None:
    """traceidratio reads OTEL_TRACES_SAMPLER_ARG."""
    sampler = build_sampler(TelemetrySettings(sampler="traceidratio", sampler_arg=0.5))
    assert isinstance(sampler, TraceIdRatioBased)
    assert sampler.rate == 0.5


def test_provider_carries_the_resource_and_never_becomes_global() -> None:
    """The built provider has our resource; OpenTelemetry's global provider is untouched."""
    before = trace.get_tracer_provider()
    provider = build_tracer_provider(
        TelemetrySettings(traces_endpoint="http://127.0.0.1:9/v1/traces", service_name="s1")
    )
    assert provider is not None
    try:
        assert provider.resource.attributes["service.name"] == "s1"
        assert trace.get_tracer_provider() is before
    finally:
        provider.shutdown()


def test_metrics_push_reads_the_standard_variables() -> None:
    """OTEL_EXPORTER_OTLP_ENDPOINT + /v1/metrics (the metrics-specific one wins, as given),
    metrics headers over the shared ones, the export interval in ms; none/prometheus and
    OTEL_SDK_DISABLED turn the push off; nothing configured, no push."""
    assert telemetry().metrics_endpoint is None
    base = telemetry(
        OTEL_EXPORTER_OTLP_ENDPOINT="http://c:4318/",
        OTEL_EXPORTER_OTLP_HEADERS="a=1",
        OTEL_EXPORTER_OTLP_METRICS_HEADERS="m=2",
        OTEL_EXPORTER_OTLP_METRICS_TIMEOUT="1500",
        OTEL_METRIC_EXPORT_INTERVAL="15000",
    )
    assert base.metrics_endpoint == "http://c:4318/v1/metrics"
    assert (dict(base.metrics_headers), dict(base.otlp_headers)) == ({"m": "2"}, {"a": "1"})
    assert (base.metrics_timeout_s, base.otlp_timeout_s) == (1.5, 10.0)
    assert base.metric_export_interval_s == 15.0
    specific = telemetry(
        OTEL_EXPORTER_OTLP_ENDPOINT="http://c:4318",
        OTEL_EXPORTER_OTLP_METRICS_ENDPOINT="http://m:9/custom",
    )
    assert specific.metrics_endpoint == "http://m:9/custom"
    for off in ({"OTEL_METRICS_EXPORTER": "none"}, {"OTEL_METRICS_EXPORTER": "prometheus"}):
        settings = telemetry(OTEL_EXPORTER_OTLP_ENDPOINT="http://c:4318", **off)
        assert settings.metrics_endpoint is None
        assert settings.traces_endpoint == "http://c:4318/v1/traces"
    disabled = telemetry(OTEL_EXPORTER_OTLP_ENDPOINT="http://c:4318", OTEL_SDK_DISABLED="true")
    assert disabled.metrics_endpoint is None


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"OTEL_METRICS_EXPORTER": "console"}, "OTEL_METRICS_EXPORTER"),
        ({"OTEL_EXPORTER_OTLP_METRICS_PROTOCOL": "grpc"}, "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL"),
        ({"OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "m:9"}, "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"),
        ({"OTEL_METRIC_EXPORT_INTERVAL": "soon"}, "OTEL_METRIC_EXPORT_INTERVAL"),
    ],
)
def test_bad_metrics_values_name_their_variable(env: dict[str, str], variable: str) -> None:
    """Metrics export parse errors name the variable too."""
    with pytest.raises(ConfigError, match=variable):
        Settings.from_env(env)
