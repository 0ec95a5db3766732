"""``service.ids``: unique, unguessable, sorted by time."""

from __future__ import annotations

import re
import time

from service.ids import new_id


def test_ids_are_unique_well_formed_and_sorted_by_time() -> None:
    """No id repeats; each is ``strm_``, the time in ms as 11 hex digits (so ids made later
    sort later: the ledger's key index appends) and 22 URL-safe characters (128 random bits)."""
    before = time.time_ns() // 1_000_000
    ids = [new_id("strm_") for _ in range(1000)]
    after = time.time_ns() // 1_000_000
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"strm_[0-9a-f]{11}[A-Za-z0-9_-]{22}", i) for i in ids)
    stamps = [int(i[5:16], 16) for i in ids]
    assert stamps == sorted(stamps)
    assert before <= stamps[0]
    assert stamps[-1] <= after
