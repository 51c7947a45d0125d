"""The system clock: aware UTC wall time and asyncio sleeps."""

from __future__ import annotations

import asyncio
import datetime as dt


class SystemClock:
    def now(self) -> dt.datetime:
        return dt.datetime.now(dt.UTC)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))
