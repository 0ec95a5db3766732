"""Lean Prometheus instruments: plain numbers updated on the event loop, read at collection.

prometheus_client's own instruments take a lock on every update and walk a histogram's
bounds in Python: ~7 µs of CPU for the twenty-odd updates a request makes, over 1% of what
the gateway spends on it. Sluice updates its metrics from the event loop only, so these keep
a float per series (a histogram: a count per bucket, found by bisection, and a sum) and
turn them into the families prometheus_client would have made, ``_created`` samples
included, when the registry is collected (a scrape, or the OTLP push, both on the loop).
``Instruments`` is the collector registered on the app's ``CollectorRegistry``.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Iterator, Sequence
from typing import Any, Generic, TypeVar

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

S = TypeVar("S", "Value", "Buckets")
F = TypeVar("F", bound="Family[Any]")


class Value:
    """One counter or gauge series."""

    __slots__ = ("created", "value")

    def __init__(self) -> None:
        self.value = 0.0
        self.created = time.time()

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def dec(self, amount: float = 1.0) -> None:
        self.value -= amount

    def set(self, value: float) -> None:
        self.value = float(value)  # as prometheus_client keeps it (OTLP sends a double)


class Buckets:
    """One histogram series: ``counts[i]`` observations fell in bucket ``i`` (not cumulative;
    the last is +Inf's)."""

    __slots__ = ("bounds", "counts", "created", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.created = time.time()

    def observe(self, amount: float) -> None:
        self.counts[bisect_left(self.bounds, amount)] += 1  # the first bound >= amount: le
        self.sum += amount


class Family(Generic[S]):
    """A named metric with labels; ``labels(*values)`` is its series for those values."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._series: dict[tuple[str, ...], S] = {}

    def labels(self, *values: str) -> S:
        series = self._series.get(values)
        if series is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name} takes {len(self.labelnames)} label values")
            series = self._series[values] = self._new()
        return series

    def _new(self) -> S:
        raise NotImplementedError

    def collect(self) -> Metric:
        """The family as prometheus_client's instrument of the same kind would show it."""
        raise NotImplementedError


class Counter(Family[Value]):
    def _new(self) -> Value:
        return Value()

    def collect(self) -> Metric:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, series in self._series.items():
            family.add_metric(values, series.value, created=series.created)
        return family


class Gauge(Family[Value]):
    def _new(self) -> Value:
        return Value()

    def collect(self) -> Metric:
        family = GaugeMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, series in self._series.items():
            family.add_metric(values, series.value)
        return family


class Histogram(Family[Buckets]):
    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        *,
        buckets: Sequence[float],
    ) -> None:
        super().__init__(name, documentation, labelnames)
        self.bounds = tuple(float(b) for b in buckets)
        self._les = [*map(floatToGoString, self.bounds), "+Inf"]

    def _new(self) -> Buckets:
        return Buckets(self.bounds)

    def collect(self) -> Metric:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, series in self._series.items():
            family.add_metric(values, self._cumulative(series), series.sum)
            labels = dict(zip(self.labelnames, values, strict=True))
            family.add_sample(self.name + "_created", labels, series.created)
        return family

    def _cumulative(self, series: Buckets) -> list[tuple[str, float]]:
        buckets, total = [], 0
        for le, count in zip(self._les, series.counts, strict=True):
            total += count
            buckets.append((le, float(total)))
        return buckets


class Instruments:
    """The families Sluice updates, collected as one (registered on ``registry``)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._families: list[Family[Any]] = []
        registry.register(self)

    def counter(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> Counter:
        return self._add(Counter(name, documentation, labelnames))

    def gauge(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> Gauge:
        return self._add(Gauge(name, documentation, labelnames))

    def histogram(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        *,
        buckets: Sequence[float],
    ) -> Histogram:
        return self._add(Histogram(name, documentation, labelnames, buckets=buckets))

    def _add(self, family: F) -> F:
        self._families.append(family)
        return family

    def collect(self) -> Iterator[Metric]:
        for family in self._families:
            yield family.collect()
