"""Test doubles: a clock that tests drive by hand."""

from __future__ import annotations

import asyncio
import datetime as dt
import heapq
import itertools

import anyio


class FakeClock:
    """Wall time that only moves when a test calls `advance()`; sleepers wake in due order."""

    def __init__(self, start: dt.datetime | None = None) -> None:
        self._now = start or dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
        self._sleepers: list[tuple[dt.datetime, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def now(self) -> dt.datetime:
        return self._now

    def monotonic(self) -> float:
        return self._now.timestamp()

    async def sleep(self, seconds: float) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        deadline = self._now + dt.timedelta(seconds=max(0.0, seconds))
        heapq.heappush(self._sleepers, (deadline, next(self._seq), fut))
        await fut

    async def advance(self, seconds: float) -> None:
        """Move time forward, waking every sleeper due on the way, in order, and letting the
        woken tasks run until they block again."""
        target = self._now + dt.timedelta(seconds=seconds)
        while self._sleepers and self._sleepers[0][0] <= target:
            deadline, _, fut = heapq.heappop(self._sleepers)
            self._now = max(self._now, deadline)
            if not fut.done():
                fut.set_result(None)
            await anyio.wait_all_tasks_blocked()
        self._now = target
        await anyio.wait_all_tasks_blocked()

    def set(self, when: dt.datetime) -> None:
        """Step the wall clock (a clock correction); sleepers are not woken."""
        self._now = when
