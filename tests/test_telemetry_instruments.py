"""``service.telemetry.instruments``: the lean instruments expose exactly what
prometheus_client's own would for the same updates (``_created`` times aside)."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client import Counter as PromCounter
from prometheus_client import Gauge as PromGauge
from prometheus_client import Histogram as PromHistogram
from prometheus_client.parser import text_string_to_metric_families

from service.telemetry.instruments import Instruments

BUCKETS = (0.01, 0.1, 1.0, 10.0, 1e6)
OBSERVED = (0.0, 0.01, 0.010001, 0.5, 1.0, 7.0, 10.0, 2e6, float("inf"))


def exposition(registry: CollectorRegistry) -> dict[tuple[str, frozenset[Any]], float]:
    """Samples by name and labels, from the text a scrape returns; ``_created`` kept as
    present (its value is a time)."""
    text = generate_latest(registry).decode()
    return {
        (s.name, frozenset(s.labels.items())): 0.0 if s.name.endswith("_created") else s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_every_kind_exposes_what_prometheus_client_would() -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    new = Instruments(ours)
    counter = new.counter("demo_requests", "Requests.", ["route"])
    gauge = new.gauge("demo_open", "Open.", ["kind"])
    idle = new.gauge("demo_idle", "Never set.", ["kind"])
    single = new.gauge("demo_running", "Unlabelled.").labels()
    histogram = new.histogram("demo_seconds", "Durations.", ["route"], buckets=BUCKETS)
    p_counter = PromCounter("demo_requests", "Requests.", ["route"], registry=theirs)
    p_gauge = PromGauge("demo_open", "Open.", ["kind"], registry=theirs)
    PromGauge("demo_idle", "Never set.", ["kind"], registry=theirs)
    p_single = PromGauge("demo_running", "Unlabelled.", registry=theirs)
    p_histogram = PromHistogram(
        "demo_seconds", "Durations.", ["route"], buckets=BUCKETS, registry=theirs
    )
    for route in ("/a", "/b"):
        counter.labels(route).inc()
        counter.labels(route).inc(2.5)
        p_counter.labels(route).inc()
        p_counter.labels(route).inc(2.5)
        for amount in OBSERVED:
            histogram.labels(route).observe(amount)
            p_histogram.labels(route).observe(amount)
    gauge.labels("sse").inc(3)
    gauge.labels("sse").dec()
    gauge.labels("ws").set(7)
    p_gauge.labels("sse").inc(3)
    p_gauge.labels("sse").dec()
    p_gauge.labels("ws").set(7)
    single.inc()
    p_single.inc()
    assert idle.labelnames == ("kind",)
    assert exposition(ours) == exposition(theirs)
    assert generate_latest(ours).count(b"# TYPE") == generate_latest(theirs).count(b"# TYPE")


def test_label_values_must_match_the_label_names() -> None:
    counter = Instruments(CollectorRegistry()).counter("demo", "Demo.", ["a", "b"])
    with pytest.raises(ValueError, match="2 label values"):
        counter.labels("only one")
    assert counter.labels("x", "y") is counter.labels("x", "y")
