"""Cluster-wide rate budgets: one token bucket per channel, kept in MongoDB and shared by every
replica, so the provider sees the configured rate however many replicas send.

The bucket lives in one document (`rate_budgets`), refilled by the database's clock at `rate`
tokens a second up to `burst`. A replica does not touch the database per message: it leases a
slice (about SLICE_S worth of tokens) in one atomic update and hands those out locally, and
leases the next when it runs low. A replica that dies loses at most its unused slice; it never
takes more than the bucket held. One replica alone leases the whole rate. A provider's
Retry-After pauses the bucket itself (`pausedUntil`), so every replica holds back.

`SharedBudget` has `TokenBucket`'s interface (take, wait_s, acquire, pause): the send window and
the retry path use either without knowing which.
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import Protocol

from pymongo.errors import PyMongoError

from ..ports import Clock

log = logging.getLogger(__name__)

SLICE_S = 0.2  # a lease is about this much of the rate
TOKEN_TTL_S = 2 * SLICE_S  # leased tokens unused this long are dropped
EMPTY_POLL_S = 0.02  # how soon to ask again when the bucket had nothing
LEASE_POLL_S = 0.005  # how soon a sender looks again while a lease is on its way
ERROR_BACKOFF_S = 0.5


class BudgetStore(Protocol):
    async def lease(self, key: str, *, rate: float, burst: float, want: int) -> tuple[int, float]:
        """Take up to `want` tokens; (granted, seconds the bucket is still paused for)."""
        ...

    async def pause(self, key: str, seconds: float) -> None: ...


class SharedBudget:
    def __init__(self, store: BudgetStore, key: str, rate_per_s: float, clock: Clock) -> None:
        if rate_per_s <= 0:
            raise ValueError("rate must be positive")
        self._store = store
        self.key = key
        self._rate = rate_per_s
        self._clock = clock
        self._slice = max(1, math.ceil(rate_per_s * SLICE_S))
        # The bucket holds at most one slice, and a replica at most one slice it leased within
        # the last TOKEN_TTL_S: over any window, the cluster sends at most the rate plus about
        # three slices, however many replicas there are.
        self._burst = float(self._slice)
        self._tokens = 0
        self._leased_at_m = 0.0
        self._paused_until_m = 0.0
        self._wanted = False  # someone asked for tokens and found none
        self._refill: asyncio.Task[None] | None = None
        self._arrived = asyncio.Event()

    # ---- TokenBucket's interface --------------------------------------------------------------

    def take(self, n: int) -> int:
        if n <= 0:
            return 0
        now_m = self._clock.monotonic()
        if now_m < self._paused_until_m:
            return 0
        if self._tokens and now_m - self._leased_at_m > TOKEN_TTL_S:
            self._tokens = 0  # unused too long: spending them now would exceed the rate
        taken = min(n, self._tokens)
        self._tokens -= taken
        if self._tokens < self._slice // 2 + 1:
            self._wanted = True
            self._ensure_refill()
        return taken

    def wait_s(self) -> float:
        now = self._clock.monotonic()
        if now < self._paused_until_m:
            return self._paused_until_m - now
        if self._tokens:
            return 0.0
        leasing = self._refill is not None and not self._refill.done()
        return LEASE_POLL_S if leasing else EMPTY_POLL_S

    async def acquire(self) -> None:
        while not self.take(1):
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), timeout=max(self.wait_s(), 0.005))
            except TimeoutError:
                pass

    def pause(self, seconds: float) -> None:
        """A provider said Retry-After: hold this replica back now, and every other one
        through the shared bucket."""
        self._paused_until_m = max(self._paused_until_m, self._clock.monotonic() + seconds)
        self._tokens = 0
        task = asyncio.get_running_loop().create_task(self._pause_everywhere(seconds))
        _background.add(task)
        task.add_done_callback(_background.discard)

    # ---- leasing -----------------------------------------------------------------------------

    def _ensure_refill(self) -> None:
        if self._refill is None or self._refill.done():
            self._refill = asyncio.get_running_loop().create_task(self._lease_while_wanted())

    async def _lease_while_wanted(self) -> None:
        while self._wanted:
            self._wanted = False
            want = self._slice - self._tokens
            if want <= 0:
                continue
            try:
                granted, paused_s = await self._store.lease(
                    self.key, rate=self._rate, burst=self._burst, want=want
                )
            except PyMongoError as exc:
                # The next take asks again (after this back-off): no loop outlives demand.
                log.warning("could not lease %s rate tokens: %s", self.key, type(exc).__name__)
                await self._clock.sleep(ERROR_BACKOFF_S)
                continue
            if paused_s > 0:
                self._paused_until_m = max(self._paused_until_m, self._clock.monotonic() + paused_s)
            self._tokens += granted
            if granted:
                self._leased_at_m = self._clock.monotonic()
                self._arrived.set()
            if granted < want:
                # The bucket ran short: ask again once about half the shortfall has refilled
                # (or the pause is over), not in a tight loop.
                self._wanted = True
                refill_s = (want - granted) / 2 / self._rate
                await self._clock.sleep(max(EMPTY_POLL_S, min(max(refill_s, paused_s), 1.0)))

    async def aclose(self) -> None:
        """Stop leasing (the owner is shutting down); unused tokens are simply dropped."""
        self._wanted = False
        self._tokens = 0
        if self._refill is not None:
            self._refill.cancel()
            await asyncio.wait([self._refill])
            self._refill = None

    async def _pause_everywhere(self, seconds: float) -> None:
        try:
            await self._store.pause(self.key, seconds)
        except PyMongoError as exc:
            log.warning("could not pause the shared %s budget: %s", self.key, type(exc).__name__)


_background: set[asyncio.Task[None]] = set()
