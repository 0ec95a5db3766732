"""Prometheus metrics of shared state and the ledger: the Redis gate, the PostgreSQL ledger
buffer, and the records any ledger logged instead of storing.

Collectors read at scrape time from the objects' own counters (nothing on the hot path),
registered on the app's telemetry registry by ``install_shared_state``:

    sluice_ledger_unwritten_total       records logged to ``sluice.ledger.unwritten``
                                        instead of stored (any ledger), to be replayed

    sluice_redis_up                     1 when the gate's breaker is closed
    sluice_redis_breaker_state          0 closed, 1 half-open, 2 open
    sluice_redis_errors_total           failed or timed-out Redis calls
    sluice_redis_rejected_total         calls refused by the open breaker
    sluice_redis_fallbacks_total        fail-open uses of in-process state
    sluice_ledger_pending               records buffered for PostgreSQL
    sluice_ledger_written_total         records committed
    sluice_ledger_dropped_total         records dropped because the buffer was full
    sluice_ledger_db_failures_total     failed write attempts (each retried)
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from .admission import Gate
from .pg_ledger import PostgresLedger
from .redisgate import RedisGate

_STATES = {"closed": 0, "half_open": 1, "open": 2}


class SharedStateCollector:
    """Reads the gate's and the ledger's counters when Prometheus scrapes."""

    def __init__(self, gate: RedisGate | None, ledger: PostgresLedger | None) -> None:
        self._gate = gate
        self._ledger = ledger

    def collect(self) -> Iterator[Metric]:
        gate = self._gate
        if gate is not None:
            state = gate.state
            yield _gauge(
                "sluice_redis_up",
                "1 when Redis answers (breaker closed).",
                1 if state == "closed" else 0,
            )
            yield _gauge(
                "sluice_redis_breaker_state", "0 closed, 1 half-open, 2 open.", _STATES[state]
            )
            yield _counter(
                "sluice_redis_errors", "Failed or timed-out Redis calls.", gate.errors_total
            )
            yield _counter(
                "sluice_redis_rejected",
                "Redis calls refused by the open breaker.",
                gate.rejected_total,
            )
            yield _counter(
                "sluice_redis_fallbacks",
                "Fail-open uses of in-process state.",
                gate.fallbacks_total,
            )
        ledger = self._ledger
        if ledger is not None:
            yield _gauge(
                "sluice_ledger_pending", "Ledger records buffered for PostgreSQL.", ledger.pending
            )
            yield _counter(
                "sluice_ledger_written", "Ledger records committed to PostgreSQL.", ledger.written
            )
            yield _counter(
                "sluice_ledger_dropped", "Ledger records dropped: buffer full.", ledger.dropped
            )
            yield _counter(
                "sluice_ledger_db_failures", "Failed ledger writes (retried).", ledger.failures
            )


class LedgerCollector:
    """Reads the ledger's count of unwritten records (whichever ledger the gate has)."""

    def __init__(self, gate: Gate) -> None:
        self._gate = gate

    def collect(self) -> Iterator[Metric]:
        yield _counter(
            "sluice_ledger_unwritten",
            "Ledger records logged to sluice.ledger.unwritten instead of stored.",
            self._gate.ledger.unwritten,
        )


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)
