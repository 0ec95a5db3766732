"""The circuit breaker: opens at exactly fail_max, fails fast while open, recovers with one
probe, and never counts client cancellations or client errors. Unit tests drive a fake
clock; wire tests go through the gateway to the simulated provider.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pybreaker
import pytest

from service.appkeys import STREAMS
from service.breaker import CLOSED, HALF_OPEN, MAX_BREAKERS, OPEN, Breaker, Breakers, Verdict
from service.errors import CircuitOpenError, ProviderConnectionError, ProviderStatusError
from service.settings import Settings
from service.simulator import SimStats
from tests.conftest import AUTH, chat_body, with_streams
from tests.resilient import FakeClock, Rig, start, with_resilience

SERVER_ERROR = ProviderStatusError("boom", provider_status=503)


def fail(breaker: Breaker, error: BaseException = SERVER_ERROR) -> None:
    with pytest.raises(type(error)), breaker.attempt():
        raise error


def succeed(breaker: Breaker) -> None:
    with breaker.attempt():
        pass


def test_opens_at_exactly_fail_max() -> None:
    """fail_max - 1 consecutive failures leave it closed; the fail_max-th opens it."""
    breaker = Breaker("p", fail_max=5, reset_timeout_s=30, clock=FakeClock())
    for _ in range(4):
        fail(breaker)
    assert breaker.state == CLOSED
    fail(breaker)
    assert breaker.state == OPEN


def test_open_rejects_without_running_the_call() -> None:
    """While open, an attempt raises CircuitOpenError carrying the remaining reset time."""
    clock = FakeClock()
    breaker = Breaker("p", fail_max=1, reset_timeout_s=30, clock=clock)
    fail(breaker, ProviderConnectionError("refused"))
    clock.advance(12)
    ran = False
    with pytest.raises(CircuitOpenError) as caught, breaker.attempt():
        ran = True
    assert not ran
    assert caught.value.retry_after_s == 18
    assert caught.value.headers["Retry-After"] == "18"
    assert caught.value.http_status == 503


def test_success_resets_the_consecutive_count() -> None:
    """Failures must be consecutive: a success in between starts the count again."""
    breaker = Breaker("p", fail_max=3, clock=FakeClock())
    fail(breaker)
    fail(breaker)
    succeed(breaker)
    fail(breaker)
    fail(breaker)
    assert breaker.state == CLOSED
    assert breaker.fail_counter == 2


def test_recovers_with_a_single_probe() -> None:
    """After reset_timeout one attempt probes; concurrent ones fail fast; success closes."""
    clock = FakeClock()
    breaker = Breaker("p", fail_max=1, reset_timeout_s=30, clock=clock)
    fail(breaker)
    clock.advance(30)
    with breaker.attempt():
        assert breaker.state == HALF_OPEN
        with pytest.raises(CircuitOpenError), breaker.attempt():
            pytest.fail("a second probe ran")
    assert breaker.state == CLOSED
    succeed(breaker)


def test_failed_probe_reopens_for_a_fresh_timeout() -> None:
    """A failing probe opens the circuit again, counting the reset time from now."""
    clock = FakeClock()
    breaker = Breaker("p", fail_max=1, reset_timeout_s=30, clock=clock)
    fail(breaker)
    clock.advance(31)
    fail(breaker)
    assert breaker.state == OPEN
    assert breaker.remaining_s() == 30


def test_only_the_probe_decides_the_half_open_state() -> None:
    """Attempts let in before the circuit opened (slow calls from before the outage) end
    while the probe is out: neither their success closes it nor their failure reopens it."""
    for late_failure in (False, True):
        clock = FakeClock()
        breaker = Breaker("p", fail_max=1, reset_timeout_s=30, clock=clock)
        slow = breaker.attempt()
        slow.__enter__()  # admitted while closed, still waiting for the provider
        fail(breaker)  # another attempt opens the circuit
        clock.advance(30)
        probe = breaker.attempt()
        probe.__enter__()
        assert breaker.state == HALF_OPEN
        if late_failure:
            with contextlib.suppress(ProviderStatusError):
                slow.__exit__(ProviderStatusError, SERVER_ERROR, None)
        else:
            slow.__exit__(None, None, None)
        assert breaker.state == HALF_OPEN  # the old call's news did not count
        with pytest.raises(CircuitOpenError), breaker.attempt():
            pytest.fail("a second attempt ran during the probe")
        probe.__exit__(None, None, None)
        assert breaker.state == CLOSED


def test_per_model_breakers_are_bounded() -> None:
    """With every model its own breaker, client-chosen names stop making new ones past
    MAX_BREAKERS: the rest share the provider's."""
    breakers = Breakers("p", per_model=frozenset({"*"}), clock=FakeClock())
    for n in range(MAX_BREAKERS + 50):
        breakers.for_model(f"made-up-{n}")
    assert len(breakers.all()) == MAX_BREAKERS + 1
    assert breakers.for_model("one-more").name == "p"


def test_cancellation_never_counts() -> None:
    """A cancelled attempt neither fails nor succeeds: counts stay, a probe slot is freed."""
    clock = FakeClock()
    breaker = Breaker("p", fail_max=2, reset_timeout_s=30, clock=clock)
    fail(breaker)
    fail(breaker, asyncio.CancelledError())
    assert (breaker.state, breaker.fail_counter) == (CLOSED, 1)
    fail(breaker)
    clock.advance(30)
    fail(breaker, asyncio.CancelledError())  # the probe's client left
    assert breaker.state == HALF_OPEN  # not closed by the cancelled probe
    succeed(breaker)  # the next attempt probes
    assert breaker.state == CLOSED


def streamed(breaker: Breaker) -> Verdict:
    """An attempt that answered a stream: its verdict waits for the stream's end."""
    with breaker.attempt() as verdict:
        verdict.defer()
    return verdict


def test_a_stream_failing_after_its_2xx_counts_once() -> None:
    """A 2xx stream is not a success yet: a reset after it counts as a failure, and its
    verdict is given once."""
    breaker = Breaker("p", fail_max=2, reset_timeout_s=30, clock=FakeClock())
    fail(breaker)
    first = streamed(breaker)
    assert breaker.fail_counter == 1  # its 2xx did not reset the count
    first(ProviderConnectionError("reset mid-stream"))
    first(None)  # once only
    assert breaker.state == OPEN


def test_how_a_stream_ends_says_whether_the_provider_is_well() -> None:
    """A client leaving counts as nothing, a whole stream resets the count, a client's
    error is not the provider's fault."""
    breaker = Breaker("p", fail_max=2, reset_timeout_s=30, clock=FakeClock())
    fail(breaker)
    streamed(breaker)(asyncio.CancelledError())  # the client left: says nothing
    assert breaker.fail_counter == 1
    streamed(breaker)(None)
    assert breaker.fail_counter == 0
    streamed(breaker)(ProviderStatusError("bad", provider_status=400))  # not its fault
    assert breaker.fail_counter == 0


def test_a_long_stream_ending_well_does_not_wipe_out_newer_failures() -> None:
    """A stream let in before two 503s ends whole: the 503s still count (they are newer news
    of the provider), so the third opens the circuit."""
    breaker = Breaker("p", fail_max=3, reset_timeout_s=30, clock=FakeClock())
    long = streamed(breaker)
    fail(breaker)
    fail(breaker)
    long(None)
    assert (breaker.state, breaker.fail_counter) == (CLOSED, 2)
    fail(breaker)
    assert breaker.state == OPEN


def test_a_probe_stream_closes_the_circuit_at_its_2xx() -> None:
    """The half-open probe's 2xx closes the circuit at once (its stream may run for long);
    a failure later in that stream still counts."""
    clock = FakeClock()
    breaker = Breaker("p", fail_max=2, reset_timeout_s=30, clock=clock)
    fail(breaker)
    fail(breaker)
    clock.advance(30)
    probe = streamed(breaker)
    assert (breaker.state, breaker.fail_counter) == (CLOSED, 0)
    probe(ProviderConnectionError("reset mid-stream"))
    assert (breaker.state, breaker.fail_counter) == (CLOSED, 1)


@pytest.mark.parametrize("code", [400, 401, 403, 404, 409, 422])
def test_client_errors_never_count(code: int) -> None:
    """A 4xx that is the request's fault says the provider is healthy."""
    breaker = Breaker("p", fail_max=1, clock=FakeClock())
    fail(breaker, ProviderStatusError("bad", provider_status=code))
    assert breaker.state == CLOSED


def test_per_model_breakers_are_separate() -> None:
    """Configured models get their own circuit; the rest share the provider's."""
    breakers = Breakers("openai", fail_max=1, per_model=frozenset({"gpt-4o"}), clock=FakeClock())
    fail(breakers.for_model("gpt-4o"))
    assert breakers.for_model("gpt-4o").state == OPEN
    assert breakers.for_model("gpt-4o-mini").state == CLOSED
    assert breakers.for_model("gpt-4.1-mini") is breakers.for_model("gpt-4o-mini")
    assert {b.name for b in breakers.all()} == {"openai/gpt-4o", "openai"}


def test_why_pybreaker_needs_the_guards() -> None:
    """pybreaker alone admits every call in half-open, and counts an excluded exception (a
    cancellation) as a success that closes the circuit: the two things ``Breaker`` fixes."""
    cb = pybreaker.CircuitBreaker(fail_max=1)
    cb.half_open()
    entered = 0
    with cb.calling(), cb.calling():
        entered = 2
    assert entered == 2
    cb = pybreaker.CircuitBreaker(fail_max=1, exclude=[asyncio.CancelledError])
    cb.half_open()
    with contextlib.suppress(asyncio.CancelledError), cb.calling():
        raise asyncio.CancelledError
    assert cb.current_state == CLOSED


# Over the wire ---------------------------------------------------------------------------


def breaker_settings(settings: Settings, fail_max: int) -> Settings:
    settings = with_resilience(settings, breaker_fail_max=fail_max, retry_max_attempts=1)
    return with_streams(settings, disconnect_grace_s=0)


async def post(rig: Rig, text: str, **extra: Any) -> tuple[int, dict[str, str], Any]:
    response = await rig.client.post(
        "/v1/chat/completions", json=chat_body(text, stream=False, **extra), headers=AUTH
    )
    return response.status, dict(response.headers), await response.json()


async def test_wire_opens_at_fail_max_then_fails_fast(
    aiohttp_client: Any, settings: Settings, sim_stats: SimStats
) -> None:
    """Three 503s open a fail_max=3 breaker; the next request gets 503 + Retry-After and the
    provider never sees it."""
    rig = await start(aiohttp_client, breaker_settings(settings, 3))
    for n in range(3):
        status, _, _ = await post(rig, f"n{n} [sim fail=503]")
        assert status == 502
    assert sim_stats.requests == 3
    status, headers, body = await post(rig, "healthy now")
    assert status == 503
    assert body["error"]["code"] == "circuit_open"
    assert headers["Retry-After"] == "30"
    assert sim_stats.requests == 3


async def test_wire_recovers_with_one_probe(
    aiohttp_client: Any, settings: Settings, sim_stats: SimStats
) -> None:
    """After the reset timeout exactly one request probes; others fail fast meanwhile; a
    cancelled probe frees the slot without closing; the next successful probe closes it."""
    rig = await start(aiohttp_client, breaker_settings(settings, 2))
    breaker = rig.resilience.breakers.for_model("gpt-4o-mini")
    for n in range(2):
        await post(rig, f"n{n} [sim fail=500]")
    assert breaker.state == OPEN
    rig.clock.advance(30)

    probe = asyncio.create_task(post(rig, "slow [sim header_delay_ms=60000]"))
    await sim_stats.wait_for(lambda s: s.requests == 3)
    status, headers, body = await post(rig, "concurrent")
    assert (status, body["error"]["code"], headers["Retry-After"]) == (503, "circuit_open", "1")
    assert sim_stats.requests == 3

    stream = next(iter(rig.client.app[STREAMS].live()))
    probe.cancel()
    await stream.ended.wait()
    assert breaker.state == HALF_OPEN

    status, _, _ = await post(rig, "probe again")
    assert status == 200
    assert breaker.state == CLOSED
    assert sim_stats.requests == 4


async def test_wire_client_cancellations_do_not_trip(
    aiohttp_client: Any, settings: Settings, sim_stats: SimStats
) -> None:
    """Clients that abandon stalled requests (before headers, and mid-stream) never count."""
    rig = await start(aiohttp_client, breaker_settings(settings, 1))
    breaker = rig.resilience.breakers.for_model("gpt-4o-mini")

    pending = asyncio.create_task(post(rig, "a [sim header_delay_ms=60000]"))
    await sim_stats.wait_for(lambda s: s.requests == 1)
    live = next(iter(rig.client.app[STREAMS].live()))
    pending.cancel()  # the client gives up before the provider answered
    await live.ended.wait()

    response = await rig.client.post(
        "/v1/chat/completions", json=chat_body("b [sim stall_after=2]"), headers=AUTH
    )
    await response.content.readuntil(b"\n\n")
    live = next(iter(rig.client.app[STREAMS].live()))
    response.close()  # the client leaves a stream the provider stalled
    await live.ended.wait()

    assert (breaker.state, breaker.fail_counter) == (CLOSED, 0)
    status, _, _ = await post(rig, "fine")
    assert status == 200


@pytest.mark.parametrize("misbehaving", ["reset_after=1", "error_after=1", "malformed_after=1"])
async def test_wire_streams_failing_after_their_2xx_trip_it(
    aiohttp_client: Any, settings: Settings, sim_stats: SimStats, misbehaving: str
) -> None:
    """A provider that answers 2xx and then fails mid-stream is failing: two such streams
    open a fail_max=2 breaker (a whole stream in between resets the count)."""
    rig = await start(aiohttp_client, breaker_settings(settings, 2))
    breaker = rig.resilience.breakers.for_model("gpt-4o-mini")

    async def stream(text: str) -> bytes:
        body = chat_body(text)
        response = await rig.client.post("/v1/chat/completions", json=body, headers=AUTH)
        assert response.status == 200
        return await response.read()

    assert b'"error"' in await stream(f"a [sim chunks=5 {misbehaving}]")
    assert breaker.fail_counter == 1
    assert (await stream("b [sim chunks=5]")).endswith(b"data: [DONE]\n\n")
    assert breaker.fail_counter == 0
    for n in range(2):
        assert b'"error"' in await stream(f"c{n} [sim chunks=5 {misbehaving}]")
    assert breaker.state == OPEN
    status, _, body = await post(rig, "healthy now")
    assert (status, body["error"]["code"]) == (503, "circuit_open")
    assert sim_stats.requests == 4


async def test_wire_client_errors_do_not_trip(
    aiohttp_client: Any, settings: Settings, sim_stats: SimStats
) -> None:
    """400s and 404s from the provider pass through and leave the breaker closed."""
    rig = await start(aiohttp_client, breaker_settings(settings, 2))
    for n, code in enumerate((400, 404, 400)):
        status, _, _ = await post(rig, f"n{n} [sim fail={code}]")
        assert status == code
    assert sim_stats.requests == 3
    assert rig.resilience.breakers.for_model("gpt-4o-mini").state == CLOSED
