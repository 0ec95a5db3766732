"""One generation: call the provider and write what it sends into the stream's journal.

Per chunk the hot path does one ``orjson.loads`` (to validate the chunk and fold its text,
usage and finish reason into ``Progress``) and appends the provider's own bytes; nothing is
re-serialised. The usage-only chunk is withheld from clients that did not ask for it,
because Sluice always asks the provider for usage so it can bill exactly.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import orjson

from .errors import ProviderEndedEarly, ProviderProtocolError
from .resilience import ResilientProvider
from .sse import DONE
from .stream import Kind, Stream
from .upstream import Scrubber, relayed_error

MIDSTREAM_ERROR = "The provider reported an error mid-stream."


async def generate(stream: Stream, upstream: ResilientProvider, body: bytes) -> None:
    """Run the provider call for ``stream``; raises ``SluiceError`` on provider failure.

    Retries and fallbacks happen only until the provider answers 2xx; from then on nothing
    is repeated (a non-streamed answer cut off mid-body is not retried: it was paid for).
    """
    if not stream.streaming:
        raw = await upstream.complete(body, route=stream)
        completion = _parse(raw)
        if "error" in completion and "choices" not in completion:  # a 200 that is an error
            raise relayed_error(completion["error"], upstream, "The provider answered an error.")
        stream.accepted.set()
        try:
            stream.progress.add_completion(completion)
        except (AttributeError, TypeError, KeyError):  # valid JSON of the wrong shape
            raise ProviderProtocolError(
                "The provider sent a completion of the wrong shape."
            ) from None
        stream.append(Kind.CHUNK, raw)
        stream.notify()
        return
    response = await upstream.post_chat(body, route=stream)
    completed = False
    try:
        stream.accepted.set()
        try:
            await upstream.pump(response, lambda payloads: _relay(stream, payloads, upstream))
        except ProviderEndedEarly:
            if stream.progress.finish_reason is None:
                raise
            # Finished, but no [DONE] (some servers omit it): complete the stream as it is.
        completed = True
    finally:
        if completed:
            response.release()
        else:
            response.close()  # drop the connection: the provider sees it and stops generating


def _relay(stream: Stream, payloads: list[bytes], upstream: Scrubber) -> bool:
    """Journal a batch of provider payloads (one read's worth); return True at [DONE].

    The batch is parsed as one JSON array, one orjson call for all its chunks; a batch that
    does not parse so is parsed chunk by chunk, so the chunks before a bad one still reach
    the client before its error does.
    """
    done = DONE in payloads
    if done:
        payloads = payloads[: payloads.index(DONE)]
    chunks: Iterable[Any] = _parse_batch(payloads)
    progress = stream.progress
    kept: list[bytes] = []
    try:
        for raw, chunk in zip(payloads, chunks, strict=True):
            if type(chunk) is not dict:
                raise ProviderProtocolError("The provider sent a chunk that is not an object.")
            if chunk.get("error"):
                raise relayed_error(chunk["error"], upstream, MIDSTREAM_ERROR)
            if progress.add_chunk(chunk) and not stream.include_usage:
                continue  # usage Sluice asked for on its own account: not the client's
            kept.append(raw)
    except (AttributeError, TypeError, KeyError):  # valid JSON of the wrong shape
        raise ProviderProtocolError("The provider sent a chunk of the wrong shape.") from None
    finally:
        stream.extend(kept)
    stream.notify()
    return done


def _parse_batch(payloads: list[bytes]) -> Iterable[Any]:
    if not payloads:
        return ()
    try:
        chunks = orjson.loads(b"[" + b",".join(payloads) + b"]")
    except orjson.JSONDecodeError:
        return map(_parse_chunk, payloads)
    # A payload holding two values ("{...},{...}") joins into more elements than payloads.
    return chunks if len(chunks) == len(payloads) else map(_parse_chunk, payloads)


def _parse_chunk(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise ProviderProtocolError("The provider sent a malformed chunk.") from None


def _parse(raw: bytes) -> dict[str, Any]:
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise ProviderProtocolError("The provider sent a malformed completion.") from None
    if not isinstance(value, dict):
        raise ProviderProtocolError("The provider sent a completion that is not an object.")
    return value
