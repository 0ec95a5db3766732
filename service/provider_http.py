"""The provider connection's aiohttp client parts, tuned for relaying streamed bodies.

A provider sends each SSE event of a stream as its own HTTP chunk, and aiohttp's client does
a little Python work per HTTP chunk that adds up over 50-odd chunks a stream. The two
subclasses here skip what the relay never needs; what they change is pinned by
``tests/test_provider_http.py`` against real sockets, so a new aiohttp that moves the ground
under them fails a test instead of a stream. ``ProviderConnector`` also tells the request's
task when its connection is made (``ON_CONNECTED``): from then on the provider may bill it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

import aiohttp
from aiohttp.client_proto import ResponseHandler
from aiohttp.client_reqrep import ClientRequest
from aiohttp.connector import Connection
from aiohttp.http_parser import RawResponseMessage
from aiohttp.streams import StreamReader
from aiohttp.tracing import Trace

# Called (in the task making the request) once a provider request has its connection and
# goes out: from then on the provider may work on, and bill, the request (resilience.py).
ON_CONNECTED: ContextVar[Callable[[], None] | None] = ContextVar("on_connected", default=None)


class ProviderConnector(aiohttp.TCPConnector):
    """A ``TCPConnector`` whose connections read bodies through ``ProviderBody`` and resume
    reading only when flow control paused it.

    aiohttp 3.14's ``StreamReader`` calls ``resume_reading()`` after every chunk it hands
    out, paused or not, and each call runs the parser on ``b""`` and pokes the transport:
    about a tenth of a 50-chunk stream's CPU in the gateway (``make bench``). Paused is the
    one case in which the parser can hold unread data, since the session never decompresses
    (``auto_decompress=False``).
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # partial[] is invariant; a partial making the subclass is what the connector needs.
        self._factory = functools.partial(_ResponseHandler, loop=self._loop)  # type: ignore[assignment]

    async def connect(
        self,
        req: ClientRequest,
        traces: list[Trace],
        timeout: aiohttp.ClientTimeout,  # noqa: ASYNC109 (aiohttp's signature)
    ) -> Connection:
        """A connection for ``req``, which goes out on it next: ``ON_CONNECTED`` is told."""
        connection = await super().connect(req, traces, timeout)
        connected = ON_CONNECTED.get()
        if connected is not None:
            connected()
        return connection


class ProviderBody(StreamReader):
    """A response body read whole buffers at a time, without HTTP chunk bounds.

    ``StreamReader`` records where every HTTP chunk ends (for ``readchunk``, which the relay
    never calls) and hands its buffer out chunk by chunk, so each event of a stream cost three
    method calls besides the one that feeds it: ~30 µs of a 50-chunk stream, a twentieth of
    the gateway's CPU for it. Here a read of everything buffered (``iter_any``, ``read``)
    joins the buffer at once. Flow control is by bytes alone: aiohttp's extra pause on many
    small chunks guards a per-chunk read cost this class does not have.
    """

    __slots__ = ()

    def begin_http_chunk_receiving(self) -> None:
        pass

    def end_http_chunk_receiving(self) -> None:
        pass

    def _read_nowait(self, n: int) -> bytes:
        buffer = self._buffer
        if n != -1 or self._buffer_offset or len(buffer) < 2:
            return super()._read_nowait(n)
        self._timer.assert_timeout()
        data = b"".join(buffer)
        buffer.clear()
        self._size -= len(data)
        self._cursor += len(data)
        self._protocol.resume_reading()  # a no-op unless flow control paused the connection
        return data


class _ResponseHandler(ResponseHandler):
    _head_due = False  # a request went out and its response's head has not been parsed

    def set_response_params(self, **kwargs: Any) -> None:
        self._head_due = True
        super().set_response_params(**kwargs)

    def data_received(self, data: bytes) -> None:
        """Parse a chunked response's head apart from the body bytes read with it, so that
        the body is a ``ProviderBody`` before its first chunks are fed (the parser is
        incremental: bytes split anywhere parse the same). A body of one piece (a
        Content-Length) gains nothing from the split, and is not split."""
        if self._head_due:
            end = data.find(b"\r\n\r\n") + 4
            if 3 < end < len(data) and data.find(b"chunked", 0, end) >= 0:
                super().data_received(data[:end])
                if self._exception is not None:  # a bad head: the connection is done
                    return
                data = data[end:]
        super().data_received(data)

    def feed_data(self, data: tuple[RawResponseMessage, StreamReader], size: int = 0) -> None:
        """A response's head, parsed: its body is read through ``ProviderBody`` from now on.

        (The parser makes a plain ``StreamReader``; the subclass adds no state, and what was
        fed before the switch reads the same either way.)"""
        self._head_due = False
        body = data[1]
        if type(body) is StreamReader:
            body.__class__ = ProviderBody
            body._http_chunk_splits = None
        super().feed_data(data, size)

    def resume_reading(self, resume_parser: bool = True) -> None:
        if self._reading_paused or self._buffer_paused:
            super().resume_reading(resume_parser)
