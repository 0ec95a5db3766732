"""Checkpoints in Redis, so ``GET /v1/streams/{id}`` answers on every replica.

``SharedCheckpointStore`` implements ``CheckpointStore``: each checkpoint is one JSON
string under ``sluice:ckpt:<stream id>`` with the checkpoint TTL as its Redis expiry. It
also writes to an in-process store first, so a Redis outage loses nothing this replica
knows; reads try the local store, then Redis. Redis failures never raise from here. The
Redis write rides with the stream's next round trip (usually its limits' settlement);
``shared.py`` makes ``RedisGate.flush`` a finish hook, so it is stored before the journal
closes and before ``StreamRegistry.settled`` returns.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import orjson

from .checkpoint import Checkpoint, CheckpointStore
from .redisgate import KEY_PREFIX, RedisGate, RedisUnavailable
from .stream import StreamStatus

_FIELDS = frozenset(f.name for f in fields(Checkpoint))


def checkpoint_key(stream_id: str) -> str:
    return f"{KEY_PREFIX}ckpt:{stream_id}"


def dump_checkpoint(checkpoint: Checkpoint) -> bytes:
    return orjson.dumps(checkpoint)  # a dataclass, natively: no ``asdict`` deep copy


def load_checkpoint(raw: bytes | str) -> Checkpoint:
    data: dict[str, Any] = orjson.loads(raw)
    data["status"] = StreamStatus(data["status"])
    return Checkpoint(**{name: value for name, value in data.items() if name in _FIELDS})


class SharedCheckpointStore:
    """Local store plus Redis; see the module docstring."""

    def __init__(self, gate: RedisGate, local: CheckpointStore) -> None:
        self._gate = gate
        self._local = local

    async def put(self, checkpoint: Checkpoint, ttl_s: float) -> None:
        """Store locally now; the Redis copy is posted (``RedisGate.post``) and is stored
        by the time the stream's finish hooks have run (``RedisGate.flush``)."""
        await self._local.put(checkpoint, ttl_s)
        stream_id = checkpoint.stream_id
        self._gate.post(
            f"checkpoint of {stream_id}",
            "SET",
            checkpoint_key(stream_id),
            dump_checkpoint(checkpoint),
            "PX",
            int(ttl_s * 1000),
        )

    async def get(self, stream_id: str) -> Checkpoint | None:
        found = await self._local.get(stream_id)
        if found is not None:
            return found
        try:
            raw = await self._gate.run(lambda r: r.get(checkpoint_key(stream_id)))
        except RedisUnavailable:
            return None
        return load_checkpoint(raw) if raw is not None else None
