"""JSON for bytes that outlive the moment they were made (journals, cache entries, bodies held
for a whole stream).

``orjson.dumps`` returns its working buffer, at least 4 KiB, as the bytes object: harmless for
a response written and dropped at once, but 4 KiB for every small chunk or body that is kept.
``dumps_kept`` copies the result into an exactly sized object (about 100 ns).
"""

from __future__ import annotations

from typing import Any

import orjson


def dumps_kept(value: Any) -> bytes:
    """``orjson.dumps(value)`` in an allocation of its own length."""
    return bytes(memoryview(orjson.dumps(value)))
