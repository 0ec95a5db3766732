"""Admission's own choices, over the wire: where a prompt is counted."""

from __future__ import annotations

import threading
from types import SimpleNamespace
from typing import Any

import pytest

from service import admission, tokens
from tests.conftest import AUTH, GatewayFactory, chat_body
from tests.test_ledger import finished


@pytest.mark.parametrize(
    "shape",
    [
        "parts",  # the text in content parts
        "tool_calls",  # in an assistant's tool calls' arguments
        "tools",  # in a tool's schema
    ],
)
async def test_a_large_body_is_counted_off_the_loop(
    gateway: GatewayFactory, monkeypatch: pytest.MonkeyPatch, shape: str
) -> None:
    """Counting a large prompt takes long (seconds for megabytes) and would stall every
    stream on the replica: a body past the threshold is counted in a thread, wherever its
    text is; a small one on the loop, where it is cheap."""
    threads: list[str] = []
    count = tokens.count_chat

    def spy(model: str, body: Any) -> int:
        threads.append(threading.current_thread().name)
        return count(model, body)

    # Admission's counting only (the simulator counts the prompt too, for its usage).
    monkeypatch.setattr(admission, "tokens", SimpleNamespace(**{**vars(tokens), "count_chat": spy}))
    client = await gateway()
    big = "word " * 10_000
    body = chat_body("hi [sim chunks=2]", stream=False)
    if shape == "parts":
        body["messages"] = [{"role": "user", "content": [{"type": "text", "text": big}]}]
    elif shape == "tool_calls":
        call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": big}}
        body["messages"] = [
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "c1", "content": "ok"},
            {"role": "user", "content": "hi [sim chunks=2]"},
        ]
    else:
        schema = {"type": "object", "description": big}
        body["tools"] = [{"type": "function", "function": {"name": "f", "parameters": schema}}]
    for request in (chat_body("small [sim chunks=2]", stream=False), body):
        response = await client.post("/v1/chat/completions", json=request, headers=AUTH)
        assert response.status == 200
        await finished(client, response)
    loop_thread = threading.current_thread().name
    assert len(threads) == 2
    assert threads[0] == loop_thread != threads[1]
