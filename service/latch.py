"""Two wake-up primitives for the stream journal, lighter than ``asyncio.Event``.

Every live stream has three of them, so their size and speed count: an ``asyncio.Event``
carries a deque (about 600 bytes) from birth and checks its loop on each wait. These keep a
plain list of waiting futures, made only when someone waits.

``Latch``: set once, never cleared (the provider answered; the stream ended).
``Pulse``: wakes whoever is waiting now and keeps no state (new journal events, a tick).
"""

from __future__ import annotations

import asyncio


class _Waiters:
    __slots__ = ("_waiters",)

    def __init__(self) -> None:
        self._waiters: list[asyncio.Future[None]] | None = None

    def _wake_all(self) -> None:
        waiters, self._waiters = self._waiters, None
        for future in waiters or ():
            if not future.done():
                future.set_result(None)

    async def _park(self) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self._waiters is None:
            self._waiters = []
        self._waiters.append(future)
        try:
            await future
        except asyncio.CancelledError:
            if self._waiters is not None and future in self._waiters:
                self._waiters.remove(future)
            raise


class Latch(_Waiters):
    """A one-way event: ``set`` wakes every waiter, and later ``wait`` calls return at once."""

    __slots__ = ("_set",)

    def __init__(self) -> None:
        super().__init__()
        self._set = False

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        if not self._set:
            self._set = True
            self._wake_all()

    async def wait(self) -> None:
        if not self._set:
            await self._park()

    async def wait_until(self, when: float, loop: asyncio.AbstractEventLoop) -> bool:
        """``wait``, but no later than ``when`` (``loop``'s time, the running loop's: asked
        of the caller, who has it, since on Python 3.11 each look-up is a system call); True
        if set by then. One timer handle, not an ``asyncio.timeout`` (which costs several
        times as much a wait)."""
        if self._set:
            return True
        future: asyncio.Future[None] = loop.create_future()
        if self._waiters is None:
            self._waiters = []
        self._waiters.append(future)
        timer = loop.call_at(when, _resolve, future)
        try:
            await future
        finally:
            timer.cancel()
            if not self._set and self._waiters is not None and future in self._waiters:
                self._waiters.remove(future)
        return self._set


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class Pulse(_Waiters):
    """``fire`` wakes the tasks waiting at that moment; ``wait`` always waits for the next."""

    __slots__ = ()

    def fire(self) -> None:
        self._wake_all()

    async def wait(self) -> None:
        await self._park()
