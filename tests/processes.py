"""Child processes for the tests that need a real entry point (``python -m service``,
``python -m service.auth``, ``python -m tests.replica``), run from the repository root."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Mapping
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PIPE = asyncio.subprocess.PIPE
DEVNULL = asyncio.subprocess.DEVNULL


async def python_module(
    module: str,
    *args: str,
    env: Mapping[str, str] | None = None,
    stdout: int = PIPE,
    stderr: int = PIPE,
) -> asyncio.subprocess.Process:
    """``python -m module *args`` with this interpreter; ``env`` None inherits ours."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        module,
        *args,
        cwd=REPO,
        env=dict(env) if env is not None else None,
        stdout=stdout,
        stderr=stderr,
    )
