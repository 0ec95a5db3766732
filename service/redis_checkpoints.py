"""Checkpoints in Redis, so ``GET /v1/streams/{id}`` answers on every replica.

``SharedCheckpointStore`` implements ``CheckpointStore``: each checkpoint is one JSON
string under ``sluice:ckpt:<stream id>`` with the checkpoint TTL as its Redis expiry. It
also writes to an in-process store first, so a Redis outage loses nothing this replica
knows; reads try the local store, then Redis. Redis failures never raise from here.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, fields
from typing import Any

import orjson

from .checkpoint import Checkpoint, CheckpointStore
from .redisgate import KEY_PREFIX, RedisGate, RedisUnavailable
from .stream import StreamStatus

log = logging.getLogger(__name__)

_FIELDS = frozenset(f.name for f in fields(Checkpoint))


def checkpoint_key(stream_id: str) -> str:
    return f"{KEY_PREFIX}ckpt:{stream_id}"


def dump_checkpoint(checkpoint: Checkpoint) -> bytes:
    return orjson.dumps(asdict(checkpoint))


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
        await self._local.put(checkpoint, ttl_s)
        raw = dump_checkpoint(checkpoint)
        try:
            await self._gate.run(
                lambda r: r.set(checkpoint_key(checkpoint.stream_id), raw, px=int(ttl_s * 1000))
            )
        except RedisUnavailable as exc:
            log.warning("checkpoint of %s kept locally only: redis %s", checkpoint.stream_id, exc)

    async def get(self, stream_id: str) -> Checkpoint | None:
        found = await self._local.get(stream_id)
        if found is not None:
            return found
        try:
            raw = await self._gate.run(lambda r: r.get(checkpoint_key(stream_id)))
        except RedisUnavailable:
            return None
        return load_checkpoint(raw) if raw is not None else None
