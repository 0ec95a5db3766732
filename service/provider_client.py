"""The provider's HTTP/1.1 client: keep-alive connections to one origin, responses parsed by
httptools (llhttp, the parser uvicorn uses), bodies read as whole buffers.

Only what a relay to one origin needs (aiohttp's client cost twice as much CPU a request, on
cookies, redirects, tracing hooks and per-chunk bookkeeping; see the README): a stack of
idle connections (the most recently used first, each closed after ``keepalive_s`` idle), a
request written in one piece, and a response whose head is parsed before it is returned and
whose body is read whole buffers at a time, reading paused while more than ``HIGH_WATER``
bytes wait unread. A head is bounded (``MAX_HEAD``, ``MAX_HEADERS``), and so is what
follows a body (trailers); a body's bound is its reader's (``Response.read``).

Deadlines are the caller's (``asyncio.timeout`` around a call), except the connect timeout.
Errors are ``ClientError``s; ``errors.translate`` says what a client of ours is told.
``ON_CONNECTED`` tells the task making a request when the request goes out on a connection:
from then on the provider may work on, and bill, it (``resilience.py``).
"""

from __future__ import annotations

import asyncio
import base64
import socket
import ssl
import sys
from collections import deque
from collections.abc import Callable, Coroutine, Mapping
from contextvars import ContextVar
from types import TracebackType
from typing import Any, cast
from urllib.parse import SplitResult, quote, unquote, urlsplit

import aiohappyeyeballs
import httptools

ON_CONNECTED: ContextVar[Callable[[], None] | None] = ContextVar("on_connected", default=None)

HIGH_WATER = 512 * 1024  # unread body bytes past which reading pauses (> a TLS read)
_TIMER_SLACK_S = 0.002  # loop timers may fire a little early: the sweep waits past due
MAX_HEAD = 64 * 1024  # a response head (or what follows a body: trailers) past this is no answer
MAX_HEADERS = 128  # header lines in a head, as aiohttp allowed
KEEPALIVE_S = 30.0  # how long an idle connection is kept (aiohttp's default too)
FINISH_S = 1.0  # how long a response let go before its end may take to end (then pooled)
HAPPY_EYEBALLS_DELAY_S = 0.25  # an address that has not connected by then gets company
_NO_BODY_STATUSES = (204, 304)


class ClientError(Exception):
    """A provider connection failed: refused, reset, closed early or garbled."""


class ConnectError(ClientError):
    """No connection to the provider could be made."""


class ConnectTimeout(ConnectError):
    """No connection to the provider within the connect timeout (nothing was sent)."""


class BodyError(ClientError):
    """The connection ended before the response's body did."""


class AnswerError(ClientError):
    """The provider had begun to answer when its answer broke, before its head was whole
    (cut off, garbled, too long): it may have generated it, so it is not asked again."""


class TooLarge(ClientError):
    """A body past the size its reader takes (the connection is dropped)."""


class _Stop(Exception):
    """Raised in a parser callback to stop the parser there (``_why`` says why)."""


class Headers:
    """A response's headers by case-insensitive name: ``get`` gives the first of a repeated
    one (as aiohttp's did), ``joined`` all of them as one list (HTTP's meaning)."""

    __slots__ = ("_count", "_values")

    def __init__(self) -> None:
        self._values: dict[str, list[str]] = {}
        self._count = 0

    def add(self, name: str, value: str) -> int:
        """Add a line; return how many there are now."""
        # httptools keeps the whitespace after a value; HTTP says it is not part of it.
        self._values.setdefault(name.lower(), []).append(value.rstrip(" \t"))
        self._count += 1
        return self._count

    def get(self, name: str, default: str = "") -> str:
        values = self._values.get(name.lower())
        return values[0] if values else default

    def joined(self, name: str) -> str:
        return ", ".join(self._values.get(name.lower(), ()))

    def __contains__(self, name: str) -> bool:
        return name.lower() in self._values


class Response:
    """A response whose head has arrived. Read its body with ``read`` or ``iter_any``; then
    ``release`` it (its connection serves another request when the body was read whole) or
    ``close`` it (the connection is dropped: the provider sees it and stops)."""

    __slots__ = (
        "_buffer",
        "_conn",
        "_done",
        "_error",
        "_informational",
        "_size",
        "_until_close",
        "_waiter",
        "headers",
        "keep_alive",
        "status",
    )

    def __init__(self, conn: _Connection) -> None:
        self._conn = conn
        self.status = 0  # until the head is parsed
        self.headers = Headers()
        self.keep_alive = False
        self._buffer = conn.body  # the connection's parser appends to it
        self._size = 0  # (about: counted by reads, framing included)
        self._done = False
        self._error: ClientError | None = None
        self._informational = False  # a 1xx head: the real one follows
        self._until_close = False  # no length, not chunked: the body ends with the connection
        self._waiter: asyncio.Future[None] | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The loop its client runs on (for timers, without a ``get_running_loop``)."""
        return self._conn.client.loop

    async def read(self, limit: int = sys.maxsize) -> bytes:
        """The whole body; past ``limit`` bytes, ``TooLarge`` (and the connection dropped)."""
        body, whole = await self._upto(limit)
        if not whole:
            raise TooLarge("The provider's answer is larger than the gateway takes.")
        return body

    async def read_upto(self, limit: int) -> bytes:
        """The body's first ``limit`` bytes (an error's, say); the rest is not read (the
        connection is dropped if there was more)."""
        return (await self._upto(limit))[0]

    async def _upto(self, limit: int) -> tuple[bytes, bool]:
        """Up to ``limit`` bytes of the body, and whether that is all of it (if not, the
        connection is dropped)."""
        parts, size = [], 0
        async for data in self.iter_any():
            parts.append(data)
            size += len(data)
            if size > limit:
                self.close()
                return b"".join(parts)[:limit], False
        return parts[0] if len(parts) == 1 else b"".join(parts), True

    def iter_any(self) -> _Pieces:
        """The body as it comes: whatever is buffered at each step, joined."""
        return _Pieces(self)

    async def _next(self) -> bytes:
        while True:
            if self._buffer:
                return self._take()
            if self._error is not None:
                raise self._error
            if self._done:
                raise StopAsyncIteration
            await self._wait()

    def release(self) -> None:
        """Done with the response: its connection goes back to the pool if it can. One let
        go just before its end (a stream's last chunk of framing, after ``[DONE]``) gets
        there once the end comes (``_Connection.finish_then_pool``)."""
        conn = self._conn
        if conn.response is not self:  # released before: the connection may serve another
            return
        if self.keep_alive and not self._buffer and self._error is None:
            if self._done:
                conn.pool()
                return
            if self.status and not self._until_close:  # only the body's framed end to come
                conn.finish_then_pool()
                return
        conn.close()  # unread body bytes, an answer that ends the connection, or no end

    def close(self) -> None:
        """Drop the connection at once (what was not read is lost)."""
        if self._conn.response is self:
            self._conn.close()

    async def __aenter__(self) -> Response:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is not None and not self._done:
            self.close()  # left mid-body by an error (a cancellation, a timeout): drop it now
        else:
            self.release()

    def _take(self) -> bytes:
        buffer = self._buffer
        data = buffer[0] if len(buffer) == 1 else b"".join(buffer)
        buffer.clear()
        self._size = 0
        self._conn.resume()
        return data

    async def _wait(self) -> None:
        self._waiter = waiter = self.loop.create_future()
        try:
            await waiter
        finally:
            self._waiter = None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _finish(self) -> None:
        self._done = True
        self._wake()

    def _fail(self, error: ClientError) -> None:
        if not self._done and self._error is None:
            self._error = error
            self._wake()


class _Pieces:
    """``Response.iter_any``'s iterator. (Not an async generator: one left at [DONE] would
    cost a task to close it.)"""

    __slots__ = ("_response",)

    def __init__(self, response: Response) -> None:
        self._response = response

    def __aiter__(self) -> _Pieces:
        return self

    def __anext__(self) -> Coroutine[Any, Any, bytes]:
        return self._response._next()


class _Connection(asyncio.Protocol):
    """One connection: parses what arrives into its current response (httptools callbacks)."""

    def __init__(self, client: ProviderClient) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.response: Response | None = None
        self.closed = False
        self.idle_since = 0.0
        self._paused = False
        self._eof = False  # the peer ended its side cleanly
        self.received = 0  # bytes of the current response's head seen so far (capped)
        self.head_bytes = 0  # its header lines' (capped, however the reads split it)
        self.idle_bytes = 0  # bytes read since the body last grew (trailers, say: capped)
        self._finishing: asyncio.TimerHandle | None = None  # see ``finish_then_pool``
        self._why: str | None = None  # why a callback stopped the parser
        # The parser calls ``on_body`` once per HTTP chunk (an event, from most providers):
        # as a list's own ``append`` it runs no Python at all. httptools looks it up once,
        # here, so the list is the connection's for life; its response reads from it.
        self.body: list[bytes] = []
        self.on_body: Callable[[bytes], None] = self.body.append
        self._parser = httptools.HttpResponseParser(self)
        # What aiohttp's own parser forgives outside its dev mode (bare LF line ends, a
        # control character in a header value, spaces after a chunk size): servers and
        # proxies that a relay met before should not turn into failed requests now.
        self._parser.set_dangerous_leniencies(
            lenient_headers=True,
            lenient_optional_cr_before_lf=True,
            lenient_spaces_after_chunk_size=True,
        )

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # (uvloop's is not a subclass)

    def eof_received(self) -> None:
        self._eof = True  # (None: the transport closes itself)

    def data_received(self, data: bytes) -> None:
        response = self.response
        headed = response is not None and response.status != 0
        if not headed:
            self.received += len(data)  # before parsing: a garbled answer is an answer too
        pieces = len(self.body)
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            self._broken(ClientError(self._why or "The provider sent a malformed response."))
            return
        response = self.response
        if response is None:
            return
        if not response.status:
            if self.received > MAX_HEAD:  # an endless head: httptools would keep it all
                self._broken(ClientError("The provider sent a response head too long."))
            return
        if headed and len(self.body) == pieces and not response._done:
            self.idle_bytes += len(data)  # framing only, or trailers: no body for them
            if self.idle_bytes > MAX_HEAD:
                self._broken(ClientError("The provider sent too much that is not its body."))
                return
        else:
            self.idle_bytes = 0
        if self._finishing is not None:  # let go before its end: only the end may come
            if len(self.body) != pieces:
                self.close()  # more body after the caller was done: not worth reading on
            elif response._done:
                self.pool()
            return
        if response._buffer:  # one wake-up for all it fed
            response._size += len(data)
            if response._size > HIGH_WATER:
                self.pause()
            response._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_finishing()
        self.closed = True
        self.client.forget(self)
        response = self.response
        if response is None or response._done:
            return
        if response.status and response._until_close and self._eof:
            response._finish()  # the peer's clean end: all before it was delivered (a
            # reset, or a close uvloop's TLS cut short, never says so)
        elif response.status:
            response._fail(BodyError("The provider closed the connection mid-response."))
        else:
            response._fail(ClientError("The provider closed the connection."))

    # httptools callbacks
    def on_message_begin(self) -> None:
        response = self.response
        if response is None or response._done:
            # Stopped here: nothing of it reaches the finished response.
            self._why = "The provider sent a response nobody asked for."
            raise _Stop

    def on_header(self, name: bytes, value: bytes) -> None:
        response = self.response
        if response is None or response.status:  # a trailer: nothing here reads them
            return
        if response.headers.add(name.decode("latin-1"), value.decode("latin-1")) > MAX_HEADERS:
            self._why = "The provider sent too many headers."
            raise _Stop
        self.head_bytes += len(name) + len(value)
        if self.head_bytes > MAX_HEAD:
            self._why = "The provider sent a response head too long."
            raise _Stop

    def on_headers_complete(self) -> None:
        response = self.response
        if response is None:
            return
        status = self._parser.get_status_code()
        if status < 200:  # 100 Continue and friends: the real head follows
            response._informational = True
            response.headers = Headers()
            return
        response._informational = False
        response.status = status
        response.keep_alive = self._parser.should_keep_alive()
        headers = response.headers
        # As llhttp frames it: no length and not chunked last, the body ends with the close.
        response._until_close = (
            "content-length" not in headers
            and not headers.joined("transfer-encoding").rstrip().lower().endswith("chunked")
            and status not in _NO_BODY_STATUSES
        )
        response._wake()

    def on_message_complete(self) -> None:
        response = self.response
        if response is not None and not response._informational:
            response._finish()

    # control
    def pause(self) -> None:
        if not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()

    def pool(self) -> None:
        """Its response was read whole: the connection waits for the next request."""
        self._stop_finishing()
        if self.response is not None:
            self.response._buffer = []  # the connection's list serves its next response now
            self.response = None
        self.client.put(self)

    def finish_then_pool(self) -> None:
        """The response was let go with only its end still to come (a chunked stream's
        terminating chunk, sent after ``[DONE]`` and often read apart from it): read on, and
        pool the connection when the end comes, within ``FINISH_S`` and with no more body
        before it; else close it. Closing it at once cost a new connection (a TLS handshake,
        with a real provider) whenever the two were read apart."""
        if self._finishing is None:  # (a second release changes nothing)
            self._finishing = asyncio.get_running_loop().call_later(FINISH_S, self.close)

    def _stop_finishing(self) -> None:
        if self._finishing is not None:
            self._finishing.cancel()
            self._finishing = None

    def close(self) -> None:
        self._stop_finishing()
        if not self.closed:
            self.closed = True
            self.client.forget(self)
            if self.transport is not None:
                self.transport.abort()
        if self.response is not None:
            self.response._fail(ClientError("The connection was closed."))

    def _broken(self, error: ClientError) -> None:
        if self.response is not None:
            self.response._fail(error)
        self.close()


class ProviderClient:
    """Requests to one origin (``base_url``'s scheme, host and port) over pooled connections."""

    def __init__(
        self,
        base_url: str,
        *,
        headers: Mapping[str, str],
        connect_timeout_s: float,
        keepalive_s: float = KEEPALIVE_S,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("the provider URL must be http:// or https:// with a host")
        try:  # an international name, as DNS and the Host header spell it
            self._host = parts.hostname.encode("idna").decode("ascii")
        except UnicodeError:
            raise ValueError("the provider URL's host is not a valid name") from None
        secure = parts.scheme == "https"
        self._port = parts.port or (443 if secure else 80)
        self._ssl = (ssl_context or ssl.create_default_context()) if secure else None
        self._tls_name = self._host.rstrip(".") if secure else None  # as certificates say it
        # As yarl sent it: a space or a non-ASCII letter in the path, percent-encoded.
        self.base_path = quote(parts.path, safe="/%:@!$&'()*+,;=~").rstrip("/")
        host = f"[{self._host}]" if ":" in self._host else self._host  # an IPv6 literal
        if self._port != (443 if secure else 80):
            host = f"{host}:{self._port}"
        self._head = header_lines(
            {"Host": host, "User-Agent": "sluice", **_url_credentials(parts), **headers}
        )
        self._connect_timeout_s = connect_timeout_s
        self._keepalive_s = keepalive_s
        self._idle: deque[_Connection] = deque()  # oldest first; closed ones skipped
        self._open: set[_Connection] = set()
        self._sweep: asyncio.TimerHandle | None = None
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The loop the client runs on, looked up once: ``asyncio.get_running_loop`` is a
        system call (the process id) each time on Python 3.11, and requests need the time."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        return loop

    async def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: bytes = b"",
    ) -> Response:
        """Send a request on a pooled or new connection; return once the response's head
        has arrived (its body unread). ``headers``: more lines, from ``header_lines``.

        A GET that went out on a kept connection the server had closed meanwhile, which
        says nothing back, is sent once more on a new connection (as aiohttp did); a POST
        is not: the caller's retry policy decides (the provider may have begun on it)."""
        head = b"%s %s HTTP/1.1\r\n%s%s" % (method.encode(), path.encode(), self._head, headers)
        if body is not None:
            head += b"Content-Length: %d\r\n" % len(body)
        message = head + b"\r\n" + body if body else head + b"\r\n"
        conn, reused = await self._connection()
        try:
            return await self._exchange(conn, message)
        except ClientError:
            if not (reused and method == "GET" and not conn.received):
                raise
        conn, _ = await self._connection(fresh=True)
        return await self._exchange(conn, message)

    async def _exchange(self, conn: _Connection, message: bytes) -> Response:
        connected = ON_CONNECTED.get()
        if connected is not None:
            connected()
        conn.body.clear()  # (empty already: a connection is kept only after a whole body)
        response = conn.response = Response(conn)
        conn.received = conn.idle_bytes = conn.head_bytes = 0
        try:
            assert conn.transport is not None
            conn.transport.write(message)
            while not response.status:
                if response._error is not None:
                    raise response._error
                await response._wait()
        except ClientError as exc:
            conn.close()
            if conn.received and not isinstance(exc, AnswerError):
                raise AnswerError(str(exc)) from exc  # ours, not the peer's, words
            raise
        except BaseException:
            conn.close()
            raise
        return response

    def put(self, conn: _Connection) -> None:
        """A connection whose response was read whole: idle until the next request."""
        if self._closed or conn.closed:
            conn.close()
            return
        loop = self.loop
        conn.idle_since = loop.time()
        self._idle.append(conn)
        if self._sweep is None:
            self._sweep = loop.call_later(self._keepalive_s, self._close_stale)

    def forget(self, conn: _Connection) -> None:
        """A closed connection (still on the idle stack, if it was there, until it is
        reached: taking it off now would cost a search of the stack)."""
        self._open.discard(conn)

    def close(self) -> None:
        """Close every connection (shutdown)."""
        self._closed = True
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for conn in list(self._open):
            conn.close()

    def is_closed(self) -> bool:
        return self._closed

    @property
    def idle(self) -> int:
        """Connections waiting for a request."""
        return sum(not conn.closed for conn in self._idle)

    async def _connection(self, *, fresh: bool = False) -> tuple[_Connection, bool]:
        """A connection to send on, and whether it was kept from an earlier request."""
        if self._closed:
            raise ClientError("The provider client is closed.")
        while self._idle and not fresh:
            conn = self._idle.pop()
            if not conn.closed and conn.transport is not None and not conn.transport.is_closing():
                return conn, True
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                conn = await self._connect()
        except TimeoutError:
            raise ConnectTimeout("No connection to the provider in time.") from None
        except OSError as exc:  # refused, unreachable, no such host, a bad certificate
            raise ConnectError("No connection to the provider.") from exc
        if self.is_closed():  # closed while connecting: nothing goes out any more
            conn.close()
            raise ClientError("The provider client is closed.")
        self._open.add(conn)
        return conn, False

    async def _connect(self) -> _Connection:
        """A new connection: every address of the host raced (happy eyeballs, RFC 8305),
        so one that drops packets, a broken IPv6 route, say, costs a quarter second."""
        loop = asyncio.get_running_loop()
        addresses = await loop.getaddrinfo(self._host, self._port, type=socket.SOCK_STREAM)
        sock = await aiohappyeyeballs.start_connection(
            addresses, happy_eyeballs_delay=HAPPY_EYEBALLS_DELAY_S, interleave=1
        )
        try:
            _, conn = await loop.create_connection(
                lambda: _Connection(self), sock=sock, ssl=self._ssl, server_hostname=self._tls_name
            )
        except BaseException:
            sock.close()
            raise
        return conn

    def _close_stale(self) -> None:
        self._sweep = None
        loop = asyncio.get_running_loop()
        stale_before = loop.time() - self._keepalive_s
        idle = self._idle
        while idle and (idle[0].closed or idle[0].idle_since <= stale_before):
            idle.popleft().close()
        if self._idle:
            due = self._idle[0].idle_since + self._keepalive_s
            self._sweep = loop.call_at(due + _TIMER_SLACK_S, self._close_stale)


def header_lines(headers: Mapping[str, str]) -> bytes:
    """``Name: value\r\n`` lines; a line break in either would split the request, and a
    character latin-1 has no byte for has no place in a header."""
    lines = []
    for name, value in headers.items():
        if any(c in name or c in value for c in "\r\n\0") or not name:
            raise ValueError(f"the header {name!r} has a line break or NUL in it")
        if max(map(ord, name + value)) > 0xFF:  # (checked, not caught: the error holds it)
            raise ValueError(f"the header {name!r} has a character latin-1 has no byte for")
        lines.append(f"{name}: {value}\r\n".encode("latin-1"))
    return b"".join(lines)


def _url_credentials(parts: SplitResult) -> dict[str, str]:
    """``user:password@`` in the provider's URL, as aiohttp sent it: Basic authorization."""
    if parts.username is None:
        return {}
    pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
    return {"Authorization": f"Basic {base64.b64encode(pair).decode()}"}
