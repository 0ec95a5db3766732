"""Real Redis and PostgreSQL servers for the tests that need them, started per session.

Each server is a private instance on a loopback port, in its own temporary directory, with
nothing persisted; tests can stop and start it again (Redis outage, PostgreSQL restart).
``make test`` installs the binaries first (``scripts/ensure-services.sh``). When a binary
is missing the tests that need it skip with the reason, except under ``CI=true``, where a
missing server fails them: CI skips nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import itertools
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Coroutine, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from redis.asyncio import Redis

from service.settings import Secret, Settings

START_TIMEOUT_S = 30.0
TEST_REDIS_TIMEOUT_S = 2.0
_DATABASES = itertools.count(1)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def unavailable(reason: str) -> None:
    """Skip locally; fail under CI, which must run every test."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{reason} (CI=true: run `make test`, which installs it)")
    pytest.skip(reason)


def _wait_for_port(port: int, process: subprocess.Popen[bytes] | None, what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.02)  # polling a child's port at start-up, not test synchronisation
    raise RuntimeError(f"{what} did not listen on {port} in {START_TIMEOUT_S} s")


class RedisServer:
    """A private ``redis-server`` without persistence; ``stop``/``start`` keep its port."""

    def __init__(self, binary: str) -> None:
        self.binary = binary
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="sluice-redis-"))
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.dir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait_for_port(self.port, self.process, "redis-server")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()  # an outage, not a shutdown: nothing is saved anyway
            self.process.wait()
        self.process = None

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): connections stay open and nothing answers."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def flush(self) -> None:
        with socket.create_connection(("127.0.0.1", self.port), 2) as sock:
            sock.sendall(b"FLUSHALL\r\n")
            assert sock.recv(16).startswith(b"+OK")

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class PostgresServer:
    """A private PostgreSQL cluster (``initdb`` + ``pg_ctl``) on a loopback port.

    initdb refuses to run as root, so as root the cluster belongs to the ``postgres``
    account and every command runs through ``runuser``.
    """

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="sluice-pg-"))
        self.data = self.dir / "data"
        self._as: list[str] = []
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
            self._as = ["runuser", "-u", "postgres", "--"]

    @property
    def dsn(self) -> str:
        return f"postgresql://sluice@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        subprocess.run(
            [*self._as, *args], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )

    def init(self) -> None:
        self._run(
            str(self.bindir / "initdb"),
            "-D",
            str(self.data),
            "-U",
            "sluice",
            "--auth=trust",
            "--no-sync",
            "-E",
            "UTF8",
            "--no-locale",  # the environment's locale may not be generated (CI images)
        )

    @property
    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -F "
            "-c fsync=off -c full_page_writes=off"
        )
        self._run(
            str(self.bindir / "pg_ctl"),
            "-D",
            str(self.data),
            "-o",
            options,
            "-l",
            str(self.dir / "log"),
            "-w",
            "start",
        )
        _wait_for_port(self.port, None, "postgres")

    def stop(self, mode: str = "fast") -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def close(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)


def _postgres_bindir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).resolve().parent if initdb else None


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One redis-server for the session; tests that stop it must start it again."""
    binary = shutil.which("redis-server")
    if binary is None:
        unavailable("redis-server is not installed")
        return
    server = RedisServer(binary)
    server.start()
    yield server
    server.close()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The session's Redis, running and empty."""
    if redis_server.process is None:
        redis_server.start()
    redis_server.flush()
    return redis_server.url


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One PostgreSQL cluster for the session; tests that stop it must start it again."""
    bindir = _postgres_bindir()
    if bindir is None or (os.geteuid() == 0 and shutil.which("runuser") is None):
        unavailable("PostgreSQL (initdb/pg_ctl) is not installed")
        return
    server = PostgresServer(bindir)
    server.init()
    server.start()
    yield server
    server.close()


def with_redis(settings: Settings, url: str, **changes: Any) -> Settings:
    """``settings`` with shared state in the Redis at ``url``.

    The deadline is 2 s unless given: a loaded CI machine can take longer than the
    production default for a first connection, and only the outage tests want it short.
    """
    changes.setdefault("redis_timeout_s", TEST_REDIS_TIMEOUT_S)
    shared = replace(settings.shared, redis_url=Secret(url), **changes)
    return replace(settings, shared=shared)


@pytest.fixture
async def postgres_url(postgres_server: PostgresServer) -> str:
    """A fresh, empty database on the session's PostgreSQL (started if a test stopped it)."""
    if not postgres_server.running:
        postgres_server.start()
    name = f"t_{next(_DATABASES)}"
    admin = await asyncpg.connect(postgres_server.dsn)
    try:
        await admin.execute(f"CREATE DATABASE {name}")
    finally:
        await admin.close()
    return postgres_server.dsn.rsplit("/", 1)[0] + f"/{name}"


def with_database(settings: Settings, url: str) -> Settings:
    """``settings`` with the ledger in the PostgreSQL database at ``url``."""
    return replace(settings, shared=replace(settings.shared, database_url=Secret(url)))


async def cancelled_in_flight(redis_server: RedisServer, call: Coroutine[Any, Any, Any]) -> None:
    """Send ``call`` (one Redis script) to a frozen Redis and cancel its caller before the
    reply: Redis runs the script once unfrozen, and its reply comes back to nobody."""
    redis_server.pause()
    try:
        caller = asyncio.ensure_future(call)
        await asyncio.sleep(0)  # one loop step: the script is sent (not a wait for time)
        caller.cancel()
    finally:
        redis_server.resume()
    with pytest.raises(asyncio.CancelledError):
        await caller


def fail_closed_fast(settings: Settings, redis_url: str) -> Settings:
    """Redis at ``redis_url``, fail-closed, with a 0.25 s deadline and a breaker that tries
    again at once: a paused Redis (``RedisServer.pause``) fails each call in 0.25 s."""
    return with_redis(
        settings,
        redis_url,
        redis_failure="closed",
        redis_breaker_reset_s=0.0,
        redis_timeout_s=0.25,
    )


async def reserved_nanos(redis_url: str, user: str = "dev") -> int:
    """What ``user``'s daily budget holds reserved in Redis right now, in nano-dollars."""
    redis = Redis.from_url(redis_url)
    try:
        day = time.strftime("%Y-%m-%d", time.gmtime())
        return int(await redis.hget(f"sluice:budget-nano:user:{user}:day:{day}", "reserved") or 0)
    finally:
        await redis.aclose()


class FreezingProxy:
    """A TCP proxy that can stop forwarding without closing anything: a server that hangs,
    or (``existing_only``) a connection gone half-open while new ones still get through."""

    def __init__(self, host: str, port: int) -> None:
        self._target = (host, port)
        self._frozen_before = -1  # connections numbered below this forward nothing
        self._count = 0
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    def freeze(self, *, existing_only: bool = False) -> None:
        self._frozen_before = self._count if existing_only else 1 << 62

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        number, self._count = self._count, self._count + 1
        up_reader, up_writer = await asyncio.open_connection(*self._target)
        self._writers += [writer, up_writer]
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(number, source, sink))
            self._pipes.add(task)

    async def _pipe(
        self, number: int, source: asyncio.StreamReader, sink: asyncio.StreamWriter
    ) -> None:
        while data := await source.read(65536):
            if number < self._frozen_before:
                await asyncio.Event().wait()  # swallow everything from now on
            sink.write(data)
            await sink.drain()

    async def close(self) -> None:
        for task in self._pipes:
            task.cancel()
        for writer in self._writers:
            writer.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
