"""The gateway relays a streamed completion end to end over real sockets."""

from __future__ import annotations

from tests.conftest import AUTH, GatewayFactory, chat_body


async def test_streamed_completion_ends_with_done(gateway: GatewayFactory) -> None:
    """A streamed completion arrives as numbered SSE events ending in [DONE]."""
    client = await gateway()
    response = await client.post(
        "/v1/chat/completions", json=chat_body("hi [sim chunks=5]"), headers=AUTH
    )
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/event-stream")
    text = await response.text()
    assert text.endswith("data: [DONE]\n\n")
    assert text.count("\nid: ") + text.startswith("id: ") == 8  # role + 5 words + finish + DONE
