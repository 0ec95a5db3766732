"""The cost of an ended stream for telemetry, by the ledger's own rule (one source of truth)."""

from __future__ import annotations

from ..admission import Gate, ledger_entry
from ..auth import Principal
from ..checkpoint import Checkpoint
from ..stream import Stream
from .core import CostFunction


def ledger_cost(gate: Gate) -> CostFunction:
    """USD for a stream exactly as its ledger row will record it."""

    def cost(stream: Stream, checkpoint: Checkpoint) -> float:
        if stream.cost_usd is not None:  # the row is made: the same number, not computed twice
            return stream.cost_usd
        owner = stream.owner
        principal = Principal(owner.user_id, owner.tenant, owner.key_id)
        return ledger_entry(gate.prices, principal, stream, checkpoint, stream.created_at).cost_usd

    return cost
