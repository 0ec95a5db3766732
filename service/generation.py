"""One generation: call the provider and write what it sends into the stream's journal.

Per chunk the hot path validates the chunk and folds its text, usage and finish reason into
``Progress``, then appends the provider's own bytes; nothing is re-serialised. A chunk shaped
like the one before costs a decode of its text alone (``chunkshape.py``); others one
``orjson.loads``. The usage-only chunk is withheld from clients that did not ask for it,
because Sluice always asks the provider for usage so it can bill exactly.
"""

from __future__ import annotations

import functools
from typing import Any

import orjson

from .chunkshape import ChunkShape
from .errors import ProviderAnswerTooLargeError, ProviderEndedEarly, ProviderProtocolError
from .resilience import ResilientProvider
from .sse import DONE
from .stream import Stream
from .upstream import Scrubber, relayed_error

MIDSTREAM_ERROR = "The provider reported an error mid-stream."
# One stream's journal (kept for resume), its events' bytes and their keeping: ~8 times a
# 100k-token stream of plain chunks (~30 MiB), room for logprobs and n > 1. Past it the
# provider is broken, or hostile.
MAX_STREAM_BYTES = 256 * 1024 * 1024


async def generate(stream: Stream, upstream: ResilientProvider, body: bytes) -> None:
    """Run the provider call for ``stream``; raises ``SluiceError`` on provider failure.

    Retries and fallbacks happen only until the provider answers 2xx; from then on nothing
    is repeated (a non-streamed answer cut off mid-body is not retried: it was paid for).
    """
    if not stream.streaming:
        raw = await upstream.complete(body, route=stream)
        completion = _parse(raw)  # (a 200 that is an error was raised in the attempt)
        stream.accepted.set()
        try:
            stream.progress.add_completion(completion)
        except (AttributeError, TypeError, KeyError):  # valid JSON of the wrong shape
            raise ProviderProtocolError(
                "The provider sent a completion of the wrong shape."
            ) from None
        stream.append(raw)
        stream.notify()
        return
    answer = await upstream.post_chat(body, route=stream)
    del body  # answered: never sent again, so not kept for the stream's life
    response = answer.response
    failure: BaseException | None = None
    try:
        stream.accepted.set()
        try:
            shape = ChunkShape()
            # (A partial and a bound method: held by a stream's whole read, they are smaller
            # than closures.)
            relay = functools.partial(_relay, stream, upstream, shape)
            await upstream.pump(answer, relay, generating=stream.progress.generating)
        except ProviderEndedEarly:
            if not _every_choice_finished(stream):
                raise
            # Finished, but no [DONE] (some servers omit it): complete the stream as it is.
    except BaseException as exc:
        failure = exc
        raise
    finally:
        if failure is None:
            response.release()
        else:
            response.close()  # drop the connection: the provider sees it and stops generating
        answer.ended(failure)  # a reset, a stall, garbage: the provider's failure too


def _every_choice_finished(stream: Stream) -> bool:
    """Each of the ``n`` choices asked for has its finish reason."""
    n = stream.body.get("n")
    return stream.progress.finished_choices >= (n if type(n) is int and n > 1 else 1)


def _relay(stream: Stream, upstream: Scrubber, shape: ChunkShape, payloads: list[bytes]) -> bool:
    """Journal a batch of provider payloads (one read's worth); return True at [DONE].

    Runs of chunks with the stream's learnt shape cost a small string decode each; any
    other chunk is parsed in full. The chunks before a bad one reach the client before its
    error does.
    """
    done = DONE in payloads
    if done:
        payloads = payloads[: payloads.index(DONE)]
    progress = stream.progress
    kept: list[bytes] = []
    at, end = 0, len(payloads)
    try:
        while at < end:
            texts = shape.run(payloads, at)
            if texts:
                progress.add_texts(texts)
                kept += payloads[at : at + len(texts)]
                at += len(texts)
                if at == end:
                    break
            raw = payloads[at]
            at += 1
            if _fold(stream, raw, upstream, shape):
                kept.append(raw)
    finally:
        stream.extend(kept)
    stream.notify()
    if not done and stream.journal_bytes > MAX_STREAM_BYTES:  # what is kept has a bound
        raise ProviderAnswerTooLargeError
    return done


def _fold(stream: Stream, raw: bytes, upstream: Scrubber, shape: ChunkShape) -> bool:
    """Parse one chunk in full and fold it into the stream's progress; False when it is
    not the client's: usage Sluice asked for on its own account."""
    chunk = _parse_chunk(raw)
    try:
        if type(chunk) is not dict:
            raise ProviderProtocolError("The provider sent a chunk that is not an object.")
        if chunk.get("error"):
            raise relayed_error(chunk["error"], upstream, MIDSTREAM_ERROR)
        if chunk.get("object") == "error" and "choices" not in chunk:  # vLLM's, before 0.6
            raise relayed_error(chunk, upstream, MIDSTREAM_ERROR)
        if stream.progress.add_chunk(chunk) and not stream.include_usage:
            return False
    except (AttributeError, TypeError, KeyError):  # valid JSON of the wrong shape
        raise ProviderProtocolError("The provider sent a chunk of the wrong shape.") from None
    shape.learn(raw, chunk)
    return True


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
