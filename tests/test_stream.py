"""``service.stream``'s ``Progress``: what it takes for output to have begun."""

from __future__ import annotations

from typing import Any

import pytest

from service.stream import Progress


@pytest.mark.parametrize(
    ("delta", "generating"),
    [
        ({"role": "assistant", "content": ""}, False),  # an opening role chunk
        ({"role": "assistant", "content": None, "refusal": None}, False),
        ({"content": "Hi"}, True),
        ({"tool_calls": [{"index": 0, "function": {"name": "f"}}]}, True),
        ({"function_call": {"name": "f", "arguments": ""}}, True),  # the legacy form
        ({"audio": {"data": "UklGR"}}, True),
        ({"reasoning_content": "hmm"}, True),
    ],
)
@pytest.mark.parametrize("index", [0, 1])
def test_output_begins_with_a_delta_that_says_something(
    delta: dict[str, Any], generating: bool, index: int
) -> None:
    """What ends the wait for the first token: a delta saying anything besides its role,
    of any choice; or a finish, or usage."""
    progress = Progress()
    progress.add_chunk({"choices": [{"index": index, "delta": delta}]})
    assert progress.generating() is generating
    progress.add_chunk({"choices": [{"index": index, "delta": {}, "finish_reason": "stop"}]})
    assert progress.generating()
