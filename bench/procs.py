"""The processes under test: the simulated provider and the gateway, each its own interpreter on
a free loopback port, plus what ``/proc`` says about them (CPU time, resident memory).

``Stack`` is an async context manager: both processes are always terminated on exit, whether
the bench finished or failed, and their output goes to log files next to the report.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp

DEV_KEY = "sluice-dev-key"
READY_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 15.0
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
ROOT = Path(__file__).resolve().parent.parent  # children run ``-m service`` from here


def free_port() -> int:
    """A loopback port nobody listens on right now (the child binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` (all its threads) from ``/proc/<pid>/stat``."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    fields = raw[raw.rindex(")") + 2 :].split()
    # After "pid (comm) ", field 3 (state) is index 0, so utime (14) and stime (15) are 11, 12.
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def rss_kb(pid: int) -> int:
    """Resident set size of ``pid`` in KiB, from ``/proc/<pid>/status``."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def child_env(extra: dict[str, str]) -> dict[str, str]:
    """The bench's environment minus anything that could point a child at a real provider."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("SLUICE_", "OPENAI_", "OTEL_", "REDIS_"))
    }
    env.update(extra)
    return env


class Stack:
    """Simulator + gateway processes for one group of phases."""

    def __init__(
        self,
        log_dir: Path,
        name: str,
        *,
        gateway_env: dict[str, str] | None = None,
        profile_to: Path | None = None,
        bare: bool = False,
    ) -> None:
        self.name = name
        self.sim_port = free_port()
        self.gateway_port = free_port()
        self.sim_url = f"http://127.0.0.1:{self.sim_port}"
        self.gateway_url = f"http://127.0.0.1:{self.gateway_port}"
        # The reference relay (bench/bare.py), when asked for: the same workload's floor.
        self.bare_port = free_port() if bare else None
        self.bare_url = f"http://127.0.0.1:{self.bare_port}" if bare else None
        self._log_dir = log_dir
        self._gateway_env = gateway_env or {}
        self._profile_to = profile_to
        self._procs: list[subprocess.Popen[bytes]] = []
        self._logs: list[Any] = []
        self._data_dir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def sim_pid(self) -> int:
        return self._procs[0].pid

    @property
    def gateway_pid(self) -> int:
        return self._procs[1].pid

    @property
    def bare_pid(self) -> int:
        return self._procs[2].pid

    async def __aenter__(self) -> Stack:
        self._data_dir = tempfile.TemporaryDirectory(prefix=f"sluice-bench-{self.name}-")
        try:
            self._spawn("sim", ["-m", "service.simulator", "--port", str(self.sim_port)], {})
            await _wait_ready(f"{self.sim_url}/stats", self._procs[0], self._log_path("sim"))
            env = {
                "SLUICE_PROVIDER": "simulated",
                "OPENAI_BASE_URL": f"{self.sim_url}/v1",
                "SLUICE_HOST": "127.0.0.1",
                "SLUICE_PORT": str(self.gateway_port),
                "SLUICE_DEV_KEY": DEV_KEY,
                "SLUICE_DRAIN_S": "0",
                # The ledger's files go to a temporary directory, not the repository's data/.
                "SLUICE_DATA_DIR": self._data_dir.name,
                **self._gateway_env,
            }
            args = ["-m", "service"]
            if self._profile_to is not None:
                args = ["-m", "bench.profiled", str(self._profile_to)]
            self._spawn("gateway", args, env)
            await _wait_ready(
                f"{self.gateway_url}/readyz", self._procs[1], self._log_path("gateway")
            )
            if self.bare_port is not None:
                upstream = f"{self.sim_url}/v1"
                bare = ["-m", "bench.bare", "--port", str(self.bare_port), "--upstream", upstream]
                self._spawn("bare", bare, {})
                await _wait_ready(f"{self.bare_url}/ready", self._procs[2], self._log_path("bare"))
        except BaseException:
            self.stop()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.stop)

    def _log_path(self, role: str) -> Path:
        return self._log_dir / f"{self.name}-{role}.log"

    def _spawn(self, role: str, args: list[str], env: dict[str, str]) -> None:
        log = self._log_path(role).open("wb")
        self._logs.append(log)
        self._procs.append(
            subprocess.Popen(
                [sys.executable, *args],
                env=child_env(env),
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )

    def stop(self) -> None:
        """SIGTERM the gateway, then the provider; SIGKILL whatever has not exited in time."""
        for proc in reversed(self._procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for log in self._logs:
            log.close()
        self._logs.clear()
        if self._data_dir is not None:
            self._data_dir.cleanup()
            self._data_dir = None


async def _wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"{proc.args!r} exited with {proc.returncode} before it was ready; see {log}"
                )
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(url) as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(0.05)
    raise RuntimeError(f"{url} was not ready within {READY_TIMEOUT_S} s; see {log}")
