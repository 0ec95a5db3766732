"""Ids of requests and streams: unguessable, and sorted by when they were made.

A stream id is a capability (with its owner's key it reads, resumes and cancels the
stream), so 128 random bits; the ms prefix makes ids sort by time, which keeps the
ledger's key (the request id) an index that new rows append to instead of land anywhere in.
"""

from __future__ import annotations

import secrets
import time


def new_id(prefix: str) -> str:
    """``prefix``, the time in ms (11 hex digits, good until the year 2527) and 22 URL-safe
    characters of randomness."""
    return f"{prefix}{time.time_ns() // 1_000_000:011x}{secrets.token_urlsafe(16)}"
