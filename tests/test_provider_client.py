"""``service.provider_client``: the provider's HTTP/1.1 client, against real sockets.

Bodies arrive byte for byte however they are framed (chunks, a length, the end of the
connection); a connection serves the next request only when its response was read whole
and the server keeps it; every way a server can fail is a ``ClientError`` (and a dropped
connection); reading pauses under back-pressure; idle connections close; TLS verifies.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import shutil
import socket
import ssl
import struct
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from service import provider_client as pc
from service.provider_client import ON_CONNECTED, ProviderClient, header_lines
from tests.servers import unavailable
from tests.wire import closed_port

EVENTS = [b'data: {"n": %d, "text": "%s"}\n\n' % (n, b"w" * (n % 7)) for n in range(200)]
Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class RawServer:
    """A loopback server that runs ``script`` on each connection it accepts."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.connections = 0
        self.closed = asyncio.Event()  # a connection was closed by the client (EOF seen)
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> RawServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        with contextlib.suppress(Exception):
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.script(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    def client(self, **kwargs: Any) -> ProviderClient:
        return ProviderClient(
            f"http://127.0.0.1:{self.port}/v1", headers={}, connect_timeout_s=5, **kwargs
        )


async def read_request(reader: asyncio.StreamReader) -> bytes:
    """One request's head and body (by its Content-Length)."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head + await reader.readexactly(length)


def answers(*responses: bytes, then_wait: bool = True) -> Script:
    """Answer each request on a connection with the next of ``responses``."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for response in responses:
            await read_request(reader)
            writer.write(response)
            await writer.drain()
        if then_wait:
            await reader.read()  # until the client closes the connection

    return script


def json_response(body: bytes, *extra: bytes) -> bytes:
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n" + b"".join(extra)
    return head + b"Content-Length: %d\r\n\r\n" % len(body) + body


def chunked(pieces: list[bytes]) -> bytes:
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
    return head + b"\r\n" + b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


async def test_a_stream_of_many_chunks_reads_whole_buffers_byte_for_byte(
    aiohttp_server: Any,
) -> None:
    """Events sent as an HTTP chunk each, read after they all arrived: joined into few
    reads, in order, nothing lost; the request carried our headers and body."""
    written = asyncio.Event()
    seen: list[tuple[str, bytes]] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        seen.append((request.headers["Authorization"], await request.read()))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        for event in EVENTS:
            await response.write(event)
        await response.write_eof()
        written.set()
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    server = await aiohttp_server(app)
    client = ProviderClient(
        str(server.make_url("/v1")), headers={"Authorization": "Bearer k"}, connect_timeout_s=5
    )
    response = await client.request("POST", "/v1/chat/completions", b'{"stream": true}')
    async with asyncio.timeout(10):
        await written.wait()
        reads = [data async for data in response.iter_any()]
    response.release()
    assert response.status == 200
    assert response.headers.get("content-type") == "text/event-stream"
    assert b"".join(reads) == b"".join(EVENTS)
    assert len(reads) < len(EVENTS) / 4
    assert seen == [("Bearer k", b'{"stream": true}')]
    assert client.idle == 1
    client.close()


async def test_a_connection_read_whole_serves_the_next_request() -> None:
    """Three requests one after another go out on one keep-alive connection."""
    async with RawServer(answers(*[json_response(b'{"n": %d}' % n) for n in range(3)])) as server:
        client = server.client()
        for n in range(3):
            async with await client.request("POST", "/v1/x", b"{}") as response:
                assert await response.read() == b'{"n": %d}' % n
        assert server.connections == 1
        client.close()


STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
)
DONE_CHUNK = b"%x\r\n%s\r\n" % (len(b"data: [DONE]\n\n"), b"data: [DONE]\n\n")


async def read_to_done(response: pc.Response) -> None:
    async for data in response.iter_any():
        if b"[DONE]" in data:
            return


def pooled_event(client: ProviderClient) -> asyncio.Event:
    """Set when ``client`` takes a connection back into its pool."""
    pooled, put = asyncio.Event(), client.put

    def put_and_tell(conn: Any) -> None:
        put(conn)
        pooled.set()

    client.put = put_and_tell  # type: ignore[method-assign]
    return pooled


async def test_a_stream_let_go_at_done_rejoins_the_pool_when_its_end_comes() -> None:
    """The terminating chunk read apart from ``[DONE]``, after the caller let go: the
    connection still serves the next request (no new connection, no new handshake)."""
    released = asyncio.Event()

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(STREAM_HEAD + DONE_CHUNK)
        await released.wait()
        writer.write(b"0\r\n\r\n")  # the end, after the client was done with the body
        await read_request(reader)
        writer.write(json_response(b"{}"))
        await reader.read()

    async with RawServer(script) as server:
        client = server.client()
        pooled = pooled_event(client)
        response = await client.request("POST", "/v1/x", b"{}")
        await read_to_done(response)
        response.release()
        assert client.idle == 0  # not yet: its end has not come
        released.set()
        async with asyncio.timeout(10):
            await pooled.wait()
        async with await client.request("POST", "/v1/x", b"{}") as again:
            assert await again.read() == b"{}"
        assert server.connections == 1
        client.close()


@pytest.mark.parametrize("then", [DONE_CHUNK, None], ids=["more body", "no end"])
async def test_a_stream_let_go_early_closes_on_more_body_or_no_end(
    then: bytes | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After the caller let go, more body (not just its end), or no end within
    ``FINISH_S``, and the connection is closed, not pooled."""
    monkeypatch.setattr(pc, "FINISH_S", 0.05)
    released, eof = asyncio.Event(), asyncio.Event()

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(STREAM_HEAD + DONE_CHUNK)
        await released.wait()
        if then is not None:
            writer.write(then + b"0\r\n\r\n")
        await reader.read()  # until the client closes the connection
        eof.set()

    async with RawServer(script) as server:
        client = server.client()
        response = await client.request("POST", "/v1/x", b"{}")
        await read_to_done(response)
        response.release()
        released.set()
        async with asyncio.timeout(10):
            await eof.wait()
        assert client.idle == 0
        client.close()


async def test_a_second_release_while_finishing_leaves_no_timer_behind() -> None:
    """Released twice before its end: one ``FINISH_S`` timer, cancelled when the end comes
    and the connection is pooled (a leftover one would cut off the connection's next
    request when it fired)."""
    released = asyncio.Event()

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(STREAM_HEAD + DONE_CHUNK)
        await released.wait()
        writer.write(b"0\r\n\r\n")
        await reader.read()

    async with RawServer(script) as server:
        client = server.client()
        pooled = pooled_event(client)
        response = await client.request("POST", "/v1/x", b"{}")
        await read_to_done(response)
        response.release()
        timer = response._conn._finishing
        response.release()
        assert timer is not None
        assert response._conn._finishing is timer
        released.set()
        async with asyncio.timeout(10):
            await pooled.wait()
        assert timer.cancelled()
        client.close()


async def test_a_response_left_mid_body_by_an_error_is_dropped_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``async with`` left by a cancellation before the body's end: the connection is
    closed then (the provider stops), not kept waiting for an end."""
    monkeypatch.setattr(pc, "FINISH_S", 1000.0)
    eof = asyncio.Event()

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(STREAM_HEAD + DONE_CHUNK)
        await reader.read()
        eof.set()

    async with RawServer(script) as server:
        client = server.client()
        response = await client.request("POST", "/v1/x", b"{}")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.05), response:
                await response.read()
        async with asyncio.timeout(10):
            await eof.wait()
        client.close()


async def test_a_body_until_the_connection_closes_is_whole_and_not_reused() -> None:
    """No length, not chunked (HTTP/1.0 style): the body is what came before the close."""
    async with RawServer(answers(b"HTTP/1.0 200 OK\r\n\r\nall of it", then_wait=False)) as server:
        client = server.client()
        response = await client.request("GET", "/v1/models")
        assert await response.read() == b"all of it"
        response.release()
        assert client.idle == 0
        client.close()


async def test_connection_close_and_unread_bodies_do_not_go_back_to_the_pool() -> None:
    """A server that says ``Connection: close``, and a body left unread, cost the connection;
    the next request gets a fresh one."""
    closing = json_response(b"{}", b"Connection: close\r\n")
    async with RawServer(answers(closing, then_wait=False)) as server:
        client = server.client()
        async with await client.request("POST", "/v1/x", b"{}") as response:
            assert await response.read() == b"{}"
        assert client.idle == 0
        client.close()
    async with RawServer(answers(chunked(EVENTS[:3]), chunked(EVENTS[:3]))) as server:
        client = server.client()
        async with await client.request("POST", "/v1/x", b"{}"):
            pass  # not read
        async with await client.request("POST", "/v1/x", b"{}") as response:
            assert await response.read() == b"".join(EVENTS[:3])
        assert server.connections == 2
        client.close()


async def test_a_reset_mid_body_is_a_body_error_and_the_data_before_it_arrives() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        whole = chunked(EVENTS[:5])
        writer.write(whole[: len(whole) - 40])
        await writer.drain()
        writer.transport.abort()

    async with RawServer(script) as server:
        client = server.client()
        response = await client.request("POST", "/v1/x", b"{}")
        got: list[bytes] = []
        with pytest.raises(pc.BodyError):
            await _read_into(response, got)
        assert got
        assert b"".join(EVENTS[:5]).startswith(b"".join(got))
        response.close()
        assert client.idle == 0
        client.close()


@pytest.mark.parametrize(
    "answer",
    [
        b"",  # closed before a byte of the head
        b"HTTP/1.1 200 OK\r\nContent-Le",  # closed inside the head
        b"NOT HTTP AT ALL\r\n\r\n",  # garbage
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
    ],
    ids=["nothing", "half-a-head", "garbage", "two-lengths"],
)
async def test_a_broken_answer_is_a_client_error_and_drops_the_connection(answer: bytes) -> None:
    async with RawServer(answers(answer, then_wait=False)) as server:
        client = server.client()
        with pytest.raises(pc.ClientError):
            await _request_and_read(client)
        assert client.idle == 0
        client.close()


@pytest.mark.parametrize("split", [False, True])
async def test_a_head_past_its_bound_is_refused_however_it_arrives(split: bool) -> None:
    """One header of 100 KB: refused whether the head comes in one read or in two."""
    head = b"HTTP/1.1 200 OK\r\nX-Big: " + b"x" * 100_000 + b"\r\nContent-Length: 2\r\n\r\n{}"

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        parts = [head[:70_000], head[70_000:]] if split else [head]
        for part in parts:
            writer.write(part)
            await writer.drain()
        await reader.read()

    async with RawServer(script) as server:
        client = server.client()
        with pytest.raises(pc.AnswerError, match="head too long"):
            await _request_and_read(client)
        client.close()


async def _request_and_read(client: ProviderClient) -> bytes:
    response = await client.request("POST", "/v1/x", b"{}")
    return await response.read()


async def test_bytes_nobody_asked_for_drop_an_idle_connection() -> None:
    """A server that sends after its response (on an idle connection) is not trusted with
    the next request: the connection is closed, the next request gets a fresh one."""
    eof = asyncio.Event()

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(json_response(b"{}") + b"HTTP/1.1 200 OK\r\n\r\n")
        await reader.read()
        eof.set()

    async with RawServer(script) as server:
        client = server.client()
        async with await client.request("POST", "/v1/x", b"{}") as response:
            assert await response.read() == b"{}"
        async with asyncio.timeout(10):
            await eof.wait()  # the server saw the client close it
        assert client.idle == 0
        client.close()


async def test_a_continue_head_is_skipped_for_the_real_one() -> None:
    interim = b"HTTP/1.1 100 Continue\r\n\r\n"
    async with RawServer(answers(interim + json_response(b'{"ok": 1}'))) as server:
        client = server.client()
        async with await client.request("POST", "/v1/x", b"{}") as response:
            assert (response.status, await response.read()) == (200, b'{"ok": 1}')
        client.close()


async def test_reading_pauses_under_back_pressure_and_resumes_when_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    paused = asyncio.Event()
    pause = pc._Connection.pause

    def pause_and_tell(self: pc._Connection) -> None:
        pause(self)
        paused.set()

    monkeypatch.setattr(pc._Connection, "pause", pause_and_tell)
    piece = b"x" * 1000
    async with RawServer(answers(chunked([piece] * 1000))) as server:
        client = server.client()
        response = await client.request("POST", "/v1/x", b"{}")
        async with asyncio.timeout(10):  # a reader that never resumes fails, not hangs
            await paused.wait()  # unread, the body passed the high-water mark
            body = await response.read()
        assert body == piece * 1000
        response.release()
        assert client.idle == 1
        client.close()


async def test_an_idle_connection_is_closed_after_the_keepalive() -> None:
    eof = asyncio.Event()

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(json_response(b"{}"))
        await reader.read()
        eof.set()

    async with RawServer(script) as server:
        client = server.client(keepalive_s=0.0)
        async with await client.request("POST", "/v1/x", b"{}") as response:
            await response.read()
        async with asyncio.timeout(10):
            await eof.wait()  # the server saw the client close it
        assert client.idle == 0
        client.close()


async def test_a_request_cancelled_before_its_answer_drops_the_connection() -> None:
    asked, eof = asyncio.Event(), asyncio.Event()

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)  # and never answer
        asked.set()
        await reader.read()
        eof.set()

    async with RawServer(script) as server:
        client = server.client()
        pending = asyncio.create_task(client.request("POST", "/v1/x", b"{}"))
        async with asyncio.timeout(10):
            await asked.wait()
        pending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await pending
        async with asyncio.timeout(10):
            await eof.wait()
        client.close()


async def test_on_connected_is_told_when_a_request_goes_out_and_not_when_none_could() -> None:
    told: list[str] = []
    token = ON_CONNECTED.set(lambda: told.append("out"))
    try:
        async with RawServer(answers(json_response(b"{}"))) as server:
            client = server.client()
            async with await client.request("POST", "/v1/x", b"{}") as response:
                await response.read()
            client.close()
        assert told == ["out"]
        refused = ProviderClient(
            f"http://127.0.0.1:{closed_port()}/v1", headers={}, connect_timeout_s=5
        )
        with pytest.raises(pc.ConnectError):
            await refused.request("POST", "/v1/x", b"{}")
        assert told == ["out"]
    finally:
        ON_CONNECTED.reset(token)


async def test_no_connection_in_time_is_a_connect_timeout(unanswered_port: int) -> None:
    """A connection that does not come within the connect timeout (nothing was sent)."""
    port = unanswered_port
    client = ProviderClient(f"http://127.0.0.1:{port}/v1", headers={}, connect_timeout_s=0.3)
    with pytest.raises(pc.ConnectTimeout):
        await client.request("POST", "/v1/x", b"{}")


async def test_an_address_that_does_not_answer_does_not_cost_the_connection(
    monkeypatch: pytest.MonkeyPatch, unanswered_port: int
) -> None:
    """The host's first address hangs, its second answers: the request goes to the second
    well inside the connect timeout (happy eyeballs), as it did with aiohttp."""
    async with RawServer(answers(json_response(b"{}"))) as server:
        loop = asyncio.get_running_loop()
        stream = (socket.AF_INET, socket.SOCK_STREAM, 6, "")
        dead, alive = ("127.0.0.1", unanswered_port), ("127.0.0.1", server.port)

        async def two_addresses(*args: Any, **kwargs: Any) -> list[Any]:
            return [(*stream, dead), (*stream, alive)]

        monkeypatch.setattr(loop, "getaddrinfo", two_addresses)
        client = ProviderClient("http://provider.test/v1", headers={}, connect_timeout_s=30)
        async with asyncio.timeout(10), await client.request("POST", "/x", b"{}") as response:
            assert await response.read() == b"{}"
        client.close()


def test_a_header_with_a_line_break_is_refused() -> None:
    assert header_lines({"A": "b"}) == b"A: b\r\n"
    for bad in ({"A": "b\r\nEvil: 1"}, {"A\n": "b"}, {"A": "b\0"}, {"": "b"}):
        with pytest.raises(ValueError, match="line break"):
            header_lines(bad)
    with pytest.raises(ValueError, match="http"):
        ProviderClient("ftp://host/v1", headers={}, connect_timeout_s=1)


async def _read_into(response: pc.Response, got: list[bytes]) -> None:
    async for data in response.iter_any():
        got.append(data)


async def test_close_drops_idle_and_busy_connections_alike() -> None:
    unfinished = chunked(EVENTS[:2])[:-5]  # the last chunk never comes
    async with RawServer(answers(json_response(b"{}"), unfinished)) as server:
        client = server.client()
        async with await client.request("POST", "/v1/x", b"{}") as response:
            await response.read()
        busy = await client.request("POST", "/v1/x", b"{}")
        client.close()
        with pytest.raises(pc.ClientError):
            await busy.read()
        with pytest.raises(pc.ClientError):
            await client.request("POST", "/v1/x", b"{}")


@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (``make test`` installs openssl if missing)."""
    if shutil.which("openssl") is None:
        unavailable("openssl is not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"),
            *("-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


@contextlib.asynccontextmanager
async def tls_server(cert: Path, key: Path) -> AsyncIterator[int]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    server = await asyncio.start_server(
        lambda r, w: answers(json_response(b'{"tls": true}'))(r, w), "127.0.0.1", 0, ssl=context
    )
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


async def test_https_verifies_the_certificate(tls_files: tuple[Path, Path]) -> None:
    """A trusted certificate: the answer; an untrusted one (the system's CAs): no connection."""
    cert, key = tls_files
    async with tls_server(cert, key) as port:
        trusting = ssl.create_default_context(cafile=str(cert))
        url = f"https://127.0.0.1:{port}/v1"
        client = ProviderClient(url, headers={}, connect_timeout_s=5, ssl_context=trusting)
        async with await client.request("POST", "/v1/x", b"{}") as response:
            assert await response.read() == b'{"tls": true}'
        client.close()
        default = ProviderClient(url, headers={}, connect_timeout_s=5)
        with pytest.raises(pc.ConnectError):
            await default.request("POST", "/v1/x", b"{}")
        default.close()


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\nContent-Length: 2\n\n{}",  # bare LF line ends
        b"HTTP/1.1 200 OK\r\nX-Req: a\x01b\r\nContent-Length: 2\r\n\r\n{}",  # a control char
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2 \r\n{}\r\n0\r\n\r\n",
    ],
    ids=["bare-lf", "control-char", "space-after-chunk-size"],
)
async def test_what_aiohttp_forgave_is_still_an_answer(answer: bytes) -> None:
    async with RawServer(answers(answer)) as server:
        client = server.client()
        async with await client.request("POST", "/v1/x", b"{}") as response:
            assert (response.status, await response.read()) == (200, b"{}")
        client.close()


async def test_a_second_response_in_the_same_read_never_reaches_the_first() -> None:
    stray = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Evil: 1\r\n\r\nhello"
    async with RawServer(answers(json_response(b"{}") + stray)) as server:
        client = server.client()
        response = await client.request("POST", "/v1/x", b"{}")
        assert await response.read() == b"{}"
        assert "x-evil" not in response.headers
        assert response.headers.get("content-length") == "2"
        response.release()
        assert client.idle == 0
        client.close()


async def test_an_endless_head_is_refused() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nX-Long: ")
        while not writer.is_closing():
            writer.write(b"a" * 65536)
            await writer.drain()

    async with RawServer(script) as server:
        client = server.client()
        with pytest.raises(pc.ClientError, match="too long"):
            await client.request("POST", "/v1/x", b"{}")
        client.close()


async def test_a_reset_ends_a_body_delimited_by_the_close_as_cut_short() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.0 200 OK\r\n\r\npart of it")
        await writer.drain()
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()  # RST, not FIN

    async with RawServer(script) as server:
        client = server.client()
        response = await client.request("GET", "/v1/models")
        with pytest.raises(pc.BodyError):
            await response.read()
        client.close()


async def test_a_get_on_a_connection_closed_meanwhile_goes_again_a_post_does_not() -> None:
    """The server closes a kept connection as the next request reaches it, answering
    nothing: a GET is sent once more on a new connection; a POST is the caller's to retry."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(json_response(b"{}"))
        await read_request(reader)  # and close without a word

    for method, answered in (("GET", True), ("POST", False)):
        async with RawServer(script) as server:
            client = server.client()
            async with await client.request(method, "/v1/x", b"{}") as response:
                await response.read()
            if answered:
                async with await client.request(method, "/v1/x", b"{}") as response:
                    assert await response.read() == b"{}"
                assert server.connections == 2
            else:
                with pytest.raises(pc.ClientError):
                    await client.request(method, "/v1/x", b"{}")
            client.close()


async def test_an_upgrade_answer_is_an_error_and_logs_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    upgrade = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n"
    async with RawServer(answers(upgrade)) as server:
        client = server.client()
        with pytest.raises(pc.ClientError):
            await _request_and_read(client)
        client.close()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_client_closed_while_connecting_sends_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    connecting, go = asyncio.Event(), asyncio.Event()
    start = pc.aiohappyeyeballs.start_connection

    async def held(*args: Any, **kwargs: Any) -> Any:
        connecting.set()
        await go.wait()
        return await start(*args, **kwargs)

    monkeypatch.setattr(pc.aiohappyeyeballs, "start_connection", held)
    told: list[str] = []
    token = ON_CONNECTED.set(lambda: told.append("out"))
    try:
        async with RawServer(answers(json_response(b"{}"))) as server:
            client = server.client()
            pending = asyncio.create_task(client.request("POST", "/v1/x", b"{}"))
            async with asyncio.timeout(10):
                await connecting.wait()
            client.close()
            go.set()
            with pytest.raises(pc.ClientError, match="closed"):
                await pending
    finally:
        ON_CONNECTED.reset(token)
    assert told == []


async def test_an_international_host_and_url_credentials_go_as_aiohttp_sent_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[bytes] = []

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await read_request(reader))
        writer.write(json_response(b"{}"))
        await reader.read()

    async with RawServer(script) as server:
        loop = asyncio.get_running_loop()
        here = (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", server.port))

        async def resolve(host: str, *args: Any, **kwargs: Any) -> list[Any]:
            assert host == "xn--bcher-kva.example"
            return [here]

        monkeypatch.setattr(loop, "getaddrinfo", resolve)
        url = f"http://user:p%40ss@bücher.example:{server.port}/v1"
        client = ProviderClient(url, headers={}, connect_timeout_s=5)
        async with await client.request("POST", "/v1/x", b"{}") as response:
            await response.read()
        client.close()
    basic = base64.b64encode(b"user:p@ss")
    assert f"Host: xn--bcher-kva.example:{server.port}\r\n".encode() in seen[0]
    assert b"Authorization: Basic " + basic + b"\r\n" in seen[0]


def test_a_header_latin_1_cannot_carry_is_refused_without_its_value() -> None:
    with pytest.raises(ValueError, match="latin-1") as raised:
        header_lines({"Authorization": "Bearer sk-secret", "OpenAI-Organization": "Acme’s"})
    assert raised.value.__context__ is None
    assert "sk-secret" not in repr(raised.value)


async def test_a_garbled_answer_to_a_get_is_not_asked_again() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(json_response(b"{}"))
        await read_request(reader)
        writer.write(b"HTTP/1.1 abc garbage\r\n\r\n")
        await reader.read()

    async with RawServer(script) as server:
        client = server.client()
        async with await client.request("GET", "/v1/models") as response:
            await response.read()
        with pytest.raises(pc.ClientError):
            await client.request("GET", "/v1/models")
        assert server.connections == 1
        client.close()


async def test_a_tls_body_ended_by_the_close_is_whole_when_read_late(
    tls_files: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reader comes late: reading paused past the high-water mark when TLS delivered the
    last bytes with the server's close. Every byte arrived; the body is whole."""
    cert, key = tls_files
    body = b"y" * (pc.HIGH_WATER + 100_000)
    lost = asyncio.Event()
    connection_lost = pc._Connection.connection_lost

    def lost_and_tell(self: pc._Connection, exc: Exception | None) -> None:
        connection_lost(self, exc)
        lost.set()

    monkeypatch.setattr(pc._Connection, "connection_lost", lost_and_tell)

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.0 200 OK\r\n\r\n" + body)
        await writer.drain()

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    server = await asyncio.start_server(
        lambda r, w: RawServer(script)._serve(r, w), "127.0.0.1", 0, ssl=context
    )
    try:
        port = server.sockets[0].getsockname()[1]
        trusting = ssl.create_default_context(cafile=str(cert))
        client = ProviderClient(
            f"https://127.0.0.1:{port}/v1", headers={}, connect_timeout_s=5, ssl_context=trusting
        )
        response = await client.request("GET", "/v1/models")
        async with asyncio.timeout(10):
            await lost.wait()  # the close came while the body waited unread
            assert await response.read() == body
        client.close()
    finally:
        server.close()


async def test_a_repeated_header_reads_as_its_first_and_frames_as_all() -> None:
    """``get`` gives the first of a repeated header (a doubled ``Retry-After`` or
    ``Content-Type`` still reads as one); transfer codings are read together, as the parser
    frames the body by them: the body here is chunked."""
    answer = (
        b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 2\r\nRetry-After: 7\r\n"
        b"Content-Type: application/json\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\n{}\r\n0\r\n\r\n"
    )
    async with RawServer(answers(answer)) as server:
        client = server.client()
        async with await client.request("POST", "/v1/x", b"{}") as response:
            assert response.headers.get("retry-after") == "2"
            assert response.headers.get("Content-Type") == "application/json"
            assert response.headers.joined("transfer-encoding") == "gzip, chunked"
            assert await response.read() == b"{}"
        assert client.idle == 1
        client.close()


async def test_the_whitespace_after_a_header_value_is_not_part_of_it() -> None:
    answer = json_response(b"{}", b"Retry-After: 120 \t\r\n")
    async with RawServer(answers(answer)) as server:
        client = server.client()
        async with await client.request("POST", "/v1/x", b"{}") as response:
            assert response.headers.get("retry-after") == "120"
        client.close()


def test_a_base_path_is_percent_encoded_as_yarl_sent_it() -> None:
    client = ProviderClient("http://host/my path/ü/v1/", headers={}, connect_timeout_s=1)
    assert client.base_path == "/my%20path/%C3%BC/v1"
    kept = ProviderClient("http://host/already%20encoded/v1", headers={}, connect_timeout_s=1)
    assert kept.base_path == "/already%20encoded/v1"


async def test_endless_trailers_are_refused() -> None:
    """A body's last chunk, then trailers that never end: refused past ``MAX_HEAD``, and
    none of them is kept with the headers."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(chunked([b"{}"])[:-2])  # the last chunk, not the blank line after it
        while not writer.is_closing():
            writer.write(b"x-t: v\r\n" * 4096)
            await writer.drain()

    async with RawServer(script) as server:
        client = server.client()
        response = await client.request("POST", "/v1/x", b"{}")
        with pytest.raises(pc.ClientError, match="not its body"):
            await response.read()
        assert "x-t" not in response.headers
        client.close()


async def test_more_headers_than_aiohttp_allowed_are_refused() -> None:
    many = (
        b"HTTP/1.1 200 OK\r\n" + b"X-A: 1\r\n" * (pc.MAX_HEADERS + 1) + b"Content-Length: 0\r\n\r\n"
    )
    async with RawServer(answers(many)) as server:
        client = server.client()
        with pytest.raises(pc.ClientError, match="too many headers"):
            await client.request("POST", "/v1/x", b"{}")
        client.close()


async def test_a_read_has_a_limit_and_an_error_body_is_read_only_so_far() -> None:
    big = json_response(b"x" * 5000)
    async with RawServer(answers(big, big)) as server:
        client = server.client()
        response = await client.request("POST", "/v1/x", b"{}")
        with pytest.raises(pc.TooLarge):
            await response.read(4096)
        response = await client.request("POST", "/v1/x", b"{}")
        assert await response.read_upto(100) == b"x" * 100
        response.release()
        assert server.connections == 2  # the rest was not read: neither connection was kept
        assert client.idle == 0
        client.close()
