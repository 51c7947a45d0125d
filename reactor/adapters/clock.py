"""Clocks: the system's, and the database's as seen from this replica.

Timers fire from the local clock, but what "now" means is the database's: `DatabaseClock` is the
local clock corrected by the offset last measured against the server (`hello.localTime`, taken
at the midpoint of the fastest of a few round trips). A replica whose clock runs a minute ahead
then still arms its timers for the database's instants; the database's own `$$NOW` decides every
claim, so an offset that is briefly wrong can make a timer fire a little late, never a campaign
start early.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Awaitable, Callable

from ..ports import Clock


class SystemClock:
    def now(self) -> dt.datetime:
        return dt.datetime.now(dt.UTC)

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))


class DatabaseClock:
    """`local` corrected by the measured offset to the database's clock."""

    SAMPLES = 3

    def __init__(self, local: Clock) -> None:
        self.local = local
        self.offset_s = 0.0
        self.round_trip_s: float | None = None

    def now(self) -> dt.datetime:
        return self.local.now() + dt.timedelta(seconds=self.offset_s)

    def monotonic(self) -> float:
        return self.local.monotonic()

    async def sleep(self, seconds: float) -> None:
        await self.local.sleep(seconds)

    async def measure(self, server_time: Callable[[], Awaitable[dt.datetime]]) -> float:
        """Measure the offset (database minus local, in seconds) and use it from now on."""
        best: tuple[float, float] | None = None
        for _ in range(self.SAMPLES):
            sent_m, sent_at = self.local.monotonic(), self.local.now()
            server_at = await server_time()
            rtt = self.local.monotonic() - sent_m
            midpoint = sent_at + dt.timedelta(seconds=rtt / 2)
            offset = (server_at - midpoint).total_seconds()
            if best is None or rtt < best[0]:
                best = (rtt, offset)
        assert best is not None
        self.round_trip_s, self.offset_s = best
        return self.offset_s
