"""Readiness: whether this process should receive new traffic."""

from __future__ import annotations


class Lifecycle:
    """Not ready until the resources are up; not ready again once draining starts."""

    __slots__ = ("draining", "started")

    def __init__(self) -> None:
        self.started = False
        self.draining = False

    @property
    def ready(self) -> bool:
        return self.started and not self.draining
