"""Per-channel token buckets. A provider's Retry-After pauses the whole channel, since every
message on it would meet the same limit."""

from __future__ import annotations

import time
from collections.abc import Callable

from .ports import Clock


class TokenBucket:
    """`rate_per_s` tokens a second, bursts of up to `burst`. `acquire()` waits for a token.

    Tokens are reserved in arrival order (each caller computes its own slot), so concurrent
    waiters do not stampede and the long-run rate is exact."""

    def __init__(
        self,
        clock: Clock,
        rate_per_s: float,
        burst: float | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate_per_s <= 0:
            raise ValueError("rate must be positive")
        self._clock = clock
        self._rate = rate_per_s
        self._burst = burst if burst is not None else max(1.0, rate_per_s / 10)
        self._monotonic = monotonic
        self._next_free = monotonic()  # when the next token becomes available
        self._paused_until = 0.0

    def _reserve(self) -> float:
        now = self._monotonic()
        interval = 1.0 / self._rate
        # A bucket full of `burst` tokens: the schedule may lag `now` by at most burst intervals.
        earliest = max(now - (self._burst - 1) * interval, self._paused_until)
        slot = max(self._next_free, earliest)
        self._next_free = slot + interval
        return slot - now

    async def acquire(self) -> None:
        wait = self._reserve()
        if wait > 0:
            await self._clock.sleep(wait)

    def pause(self, seconds: float) -> None:
        """Hold every caller back for `seconds` (a 429 with Retry-After)."""
        until = self._monotonic() + seconds
        self._paused_until = max(self._paused_until, until)
        self._next_free = max(self._next_free, until)
