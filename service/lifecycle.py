"""Readiness: whether this process should receive new traffic."""

from __future__ import annotations


class Lifecycle:
    """Not ready until the resources are up, nor while one of them is still awaited (for
    instance the ledger's spend, while PostgreSQL is away at start); not ready again once
    draining starts."""

    __slots__ = ("draining", "started", "waiting")

    def __init__(self) -> None:
        self.started = False
        self.draining = False
        self.waiting: set[str] = set()  # what readiness still waits for, by name

    @property
    def ready(self) -> bool:
        return self.started and not self.draining and not self.waiting
