"""Per-channel token buckets. A provider's Retry-After pauses the whole channel, since every
message on it would meet the same limit."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

from ..ports import Clock


class RateLimit(Protocol):
    """What senders need of a rate limit: this instance's `TokenBucket`, or the cluster's
    `limits.budgets.SharedBudget`."""

    def take(self, n: int) -> int:
        """Take up to `n` tokens free now, without waiting; how many were taken."""
        ...

    def wait_s(self) -> float:
        """Seconds until `take` may return a token."""
        ...

    async def acquire(self) -> None:
        """Wait for one token."""
        ...

    def pause(self, seconds: float) -> None:
        """Hold every sender back for `seconds` (a provider's Retry-After)."""
        ...


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

    def _slot(self, now: float) -> float:
        """When the next token is free (at or before `now` if one is free already)."""
        interval = 1.0 / self._rate
        # A bucket full of `burst` tokens: the schedule may lag `now` by at most burst intervals.
        earliest = max(now - (self._burst - 1) * interval, self._paused_until)
        return max(self._next_free, earliest)

    def _reserve(self) -> float:
        now = self._monotonic()
        slot = self._slot(now)
        self._next_free = slot + 1.0 / self._rate
        return slot - now

    def take(self, n: int) -> int:
        """Take up to `n` tokens that are free now, without waiting; how many were taken."""
        if n <= 0:
            return 0
        now = self._monotonic()
        slot = self._slot(now)
        if slot > now:
            return 0
        interval = 1.0 / self._rate
        taken = min(n, int((now - slot) / interval) + 1)
        self._next_free = slot + taken * interval
        return taken

    def wait_s(self) -> float:
        """Seconds until `take` can return a token."""
        now = self._monotonic()
        return max(0.0, self._slot(now) - now)

    async def acquire(self) -> None:
        wait = self._reserve()
        if wait > 0:
            await self._clock.sleep(wait)

    def pause(self, seconds: float) -> None:
        """Hold every caller back for `seconds` (a 429 with Retry-After)."""
        until = self._monotonic() + seconds
        self._paused_until = max(self._paused_until, until)
        self._next_free = max(self._next_free, until)
