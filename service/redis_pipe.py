"""The lean path to Redis for the round trips every request makes: the admission script,
the settlement script, the posted writes that ride with them and a stream's journal
appends (``RedisGate.evalsha`` and ``RedisGate.pipeline``).

redis-py's asyncio client spends ~130 µs of this process's CPU on one script call (the
connection pool and its lock, the retry wrapper, per-call timeouts, observability hooks)
and ~190 µs of wall time at concurrency 1; the same call here costs ~50 µs and ~125 µs
(``make bench-redis`` reports what the gateway gains). ``RedisPipe`` keeps one connection,
writes each call's commands at once with hiredis's packer and matches replies to calls in
order (Redis answers a connection's commands in the order it read them), so concurrent
requests share the socket without a pool. Everything else (blocking reads, pub/sub,
loading scripts) stays on redis-py, and so does the whole of a TLS or credential-provider
configuration (``RedisPipe.of`` returns None).

A call never waits on a blocking command here: only the gate's short commands use it. A
connection whose oldest unanswered call is older than the deadline is taken as stuck and
replaced at the next call; a reset fails the calls on it with redis-py's ``ConnectionError``
(like a timed-out call, such a call may or may not have run: what a script took there is
bounded by its key's expiry).
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Sequence
from typing import Any, cast

import hiredis
from redis.asyncio import Redis
from redis.asyncio.connection import Connection, UnixDomainSocketConnection
from redis.exceptions import AuthenticationError, DataError, NoScriptError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.typing import EncodableT

Command = tuple[EncodableT, ...]


class RedisPipe:
    """One multiplexed connection; see the module docstring."""

    def __init__(
        self,
        address: tuple[str, int] | str,  # (host, port), or a unix socket's path
        *,
        db: int = 0,
        username: str | None = None,
        password: str | None = None,
        timeout_s: float,
    ) -> None:
        self._address = address
        self._hello = _hello(db, username, password)
        self._timeout_s = timeout_s
        self._protocol: _Protocol | None = None
        self._connecting = asyncio.Lock()
        self._closed = False

    @classmethod
    def of(cls, client: Redis, timeout_s: float) -> RedisPipe | None:
        """A pipe to where ``client`` connects, or None when only redis-py can get there."""
        pool = client.connection_pool
        kwargs = pool.connection_kwargs
        address: tuple[str, int] | str
        if pool.connection_class is Connection:
            address = (str(kwargs.get("host", "localhost")), int(kwargs.get("port", 6379)))
        elif pool.connection_class is UnixDomainSocketConnection:
            address = str(kwargs["path"])
        else:
            return None  # TLS and anything else: redis-py's own connections
        if kwargs.get("credential_provider") is not None:
            return None
        return cls(
            address,
            db=int(kwargs.get("db") or 0),
            username=kwargs.get("username"),
            password=kwargs.get("password"),
            timeout_s=timeout_s,
        )

    async def execute(self, commands: Sequence[Command]) -> list[Any]:
        """Send ``commands`` in one write; their replies in order, an error reply as a
        ``ResponseError`` in its place (as a redis-py pipeline gives with
        ``raise_on_error=False``)."""
        if not commands:
            return []
        payload = _pack(commands)
        protocol = self._protocol
        loop = asyncio.get_running_loop()
        if protocol is None or not protocol.usable(loop.time() - self._timeout_s):
            protocol = await self._connect()
        return await protocol.send(payload, len(commands), loop.time())

    async def close(self) -> None:
        """Close the connection; calls from now on fail (a connect under way included)."""
        self._closed = True
        if self._protocol is not None:
            self._protocol.close()
            self._protocol = None

    def _check_open(self) -> None:
        if self._closed:
            raise RedisConnectionError("redis pipe closed")

    async def _connect(self) -> _Protocol:
        async with self._connecting:
            self._check_open()
            loop = asyncio.get_running_loop()
            current = self._protocol
            if current is not None and current.usable(loop.time() - self._timeout_s):
                return current  # another call connected while this one waited
            if current is not None:
                current.close()
                self._protocol = None
            try:
                if isinstance(self._address, str):
                    _, protocol = await loop.create_unix_connection(_Protocol, self._address)
                else:
                    _, protocol = await loop.create_connection(_Protocol, *self._address)
            except OSError as exc:  # named as redis-py names it, for the logs and metrics
                raise RedisConnectionError(f"redis connection failed: {exc}") from exc
            try:
                await self._greet(protocol, loop.time())
                self._check_open()  # closed while this connected: leave nothing open
            except BaseException:
                protocol.close()
                raise
            self._protocol = protocol
            return protocol

    async def _greet(self, protocol: _Protocol, now: float) -> None:
        """AUTH and SELECT on a new connection, as configured."""
        if self._hello:
            replies = await protocol.send(_pack(self._hello), len(self._hello), now)
            refused = [reply for reply in replies if isinstance(reply, ResponseError)]
            if refused:
                raise AuthenticationError(str(refused[0]))


class _Protocol(asyncio.Protocol):
    """Replies matched to calls in order: a call is (replies expected, replies, future)."""

    def __init__(self) -> None:
        self._reader = hiredis.Reader()
        self._calls: collections.deque[tuple[int, list[Any], asyncio.Future[list[Any]], float]]
        self._calls = collections.deque()
        self._transport: asyncio.Transport | None = None
        self._lost: Exception | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # (uvloop's is no subclass)

    def usable(self, stuck_before: float) -> bool:
        """Open, and not waiting since before ``stuck_before`` (loop time) for a reply."""
        return self._open() and not (self._calls and self._calls[0][3] < stuck_before)

    def _open(self) -> bool:
        # Closing, not yet lost: writes now would be dropped, each with an asyncio warning.
        transport = self._transport
        return self._lost is None and transport is not None and not transport.is_closing()

    def send(self, payload: bytes, replies: int, now: float) -> asyncio.Future[list[Any]]:
        """Write ``payload`` (``replies`` packed commands); the future gets their replies."""
        transport = self._transport
        if not self._open() or transport is None:
            raise RedisConnectionError("redis connection closed")
        future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self._calls.append((replies, [], future, now))
        transport.write(payload)
        return future

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        try:
            while (reply := self._reader.gets()) is not False:
                expected, replies, future, _ = self._calls[0]
                if isinstance(reply, hiredis.ReplyError):
                    reply = _error(str(reply))
                replies.append(reply)
                if len(replies) == expected:
                    self._calls.popleft()
                    if not future.done():  # its caller may have left (cancelled) meanwhile
                        future.set_result(replies)
        except (hiredis.ProtocolError, IndexError) as exc:  # garbage, or a reply nobody asked for
            self._fail(RedisConnectionError(f"redis protocol error: {type(exc).__name__}"))

    def eof_received(self) -> bool:
        """Redis closed the connection (a restart, ``CLIENT KILL``, its idle ``timeout``):
        fail the calls waiting now, not a loop pass later, and let new ones reconnect."""
        self._fail(RedisConnectionError("redis connection lost"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(RedisConnectionError("redis connection lost"))

    def close(self) -> None:
        self._fail(RedisConnectionError("redis connection reset"))

    def _fail(self, error: Exception) -> None:
        if self._lost is None:
            self._lost = error
        if self._transport is not None:
            # Not close(): writes still buffered here must not reach Redis after their calls
            # failed (a caller may send them again, on a new connection, meanwhile).
            self._transport.abort()
        while self._calls:
            future = self._calls.popleft()[2]
            if not future.done():
                future.set_exception(error)


def _pack(commands: Sequence[Command]) -> bytes:
    """The commands as RESP; an argument RESP cannot carry is redis-py's ``DataError``,
    raised before anything is queued or sent."""
    try:
        # (hiredis's stub takes a tuple of one argument for a tuple of any number)
        return b"".join([hiredis.pack_command(c) for c in commands])  # type: ignore[arg-type]
    except (TypeError, ValueError) as exc:  # UnicodeEncodeError is a ValueError
        raise DataError(f"a command redis cannot take: {exc}") from exc


def _error(message: str) -> ResponseError:
    if message.startswith("NOSCRIPT"):
        return NoScriptError(message)
    return ResponseError(message)


def _hello(db: int, username: str | None, password: str | None) -> list[Command]:
    """What a new connection sends first: AUTH and SELECT, as configured."""
    commands: list[Command] = []
    if password is not None:
        commands.append(("AUTH", username, password) if username else ("AUTH", password))
    if db:
        commands.append(("SELECT", db))
    return commands
