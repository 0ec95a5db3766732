"""Scale-out settings and wiring: Redis/PostgreSQL only when configured, else in-process."""

from __future__ import annotations

import pytest

from service.appkeys import GATE, REDIS, REMOTE_STREAMS, STREAMS
from service.checkpoint import MemoryCheckpointStore
from service.limits import MemoryLimiter
from service.pg_ledger import PostgresLedger
from service.redis_checkpoints import SharedCheckpointStore
from service.redis_limits import RedisLimiter
from service.settings import ConfigError, Settings
from tests.conftest import AUTH, GatewayFactory
from tests.servers import with_database, with_redis


def test_shared_state_is_off_by_default_and_read_from_the_environment() -> None:
    """No variables: nothing shared. Set: the URLs are secrets and the policy is parsed."""
    assert Settings.from_env({}).shared.redis_url is None
    shared = Settings.from_env(
        {
            "SLUICE_REDIS_URL": "redis://:hunter2@redis:6379/0",
            "SLUICE_REDIS_FAILURE": "open",
            "SLUICE_REDIS_TIMEOUT_S": "0.1",
            "SLUICE_DATABASE_URL": "postgresql://sluice:pw@db/sluice",
            "SLUICE_LEDGER_BUFFER": "50",
            "SLUICE_REDIS_BREAKER_FAIL_MAX": "5",
            "SLUICE_REDIS_BREAKER_RESET_S": "0.5",
        }
    ).shared
    assert shared.redis_url is not None
    assert shared.redis_url.reveal() == "redis://:hunter2@redis:6379/0"
    assert "hunter2" not in repr(shared)
    assert (shared.redis_failure, shared.redis_timeout_s, shared.ledger_buffer) == ("open", 0.1, 50)
    assert (shared.redis_breaker_fail_max, shared.redis_breaker_reset_s) == (5, 0.5)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("SLUICE_REDIS_FAILURE", "maybe"),
        ("SLUICE_REDIS_URL", "http://redis"),
        ("SLUICE_DATABASE_URL", "mysql://db"),
        ("SLUICE_REDIS_TIMEOUT_S", "soon"),
        ("SLUICE_REDIS_BREAKER_FAIL_MAX", "0"),
        ("SLUICE_REDIS_BREAKER_RESET_S", "-1"),
    ],
)
def test_a_bad_shared_state_setting_names_its_variable(name: str, value: str) -> None:
    """Each malformed value stops start-up with a message naming the variable."""
    with pytest.raises(ConfigError, match=name):
        Settings.from_env({name: value})


async def test_without_redis_everything_stays_in_process(gateway: GatewayFactory) -> None:
    """The default app has no shared state and /readyz says only that it is ready."""
    client = await gateway()
    assert client.app[REDIS] is None
    assert client.app[REMOTE_STREAMS] is None
    assert isinstance(client.app[STREAMS].store, MemoryCheckpointStore)
    assert isinstance(client.app[GATE].limiter, MemoryLimiter)
    response = await client.get("/readyz")
    assert await response.json() == {"status": "ok"}


async def test_with_redis_and_postgres_the_shared_implementations_are_in_place(
    gateway: GatewayFactory, settings: Settings, redis_url: str, postgres_url: str
) -> None:
    """SLUICE_REDIS_URL and SLUICE_DATABASE_URL swap in the shared stores and the ledger."""
    client = await gateway(with_database(with_redis(settings, redis_url), postgres_url))
    assert isinstance(client.app[STREAMS].store, SharedCheckpointStore)
    limiter = client.app[GATE].limiter
    assert isinstance(limiter, RedisLimiter)
    assert isinstance(limiter.local, MemoryLimiter)  # aiolimiter stays in front
    assert isinstance(client.app[GATE].ledger, PostgresLedger)
    ready = await (await client.get("/readyz")).json()
    assert ready["redis"]["state"] == "ok"
    metrics = await (await client.get("/metrics", headers=AUTH)).text()
    assert "sluice_redis_up 1.0" in metrics
    assert "sluice_ledger_dropped_total 0.0" in metrics
