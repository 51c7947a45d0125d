"""A heap of due instants driven by one task.

The task sleeps until the earliest due instant, but never longer than `max_sleep_s`: it then
re-reads the wall clock, so a clock correction or a far-future timer cannot make it fire early or
late by more than that. Arming an earlier timer wakes it at once. Disarming is lazy (a generation
number per key), which keeps arm/disarm O(log n) and the memory per timer small.
"""

from __future__ import annotations

import datetime as dt
import heapq
import itertools
import logging
from collections import Counter
from collections.abc import Callable
from typing import Generic, TypeVar

import anyio
from anyio import TASK_STATUS_IGNORED
from anyio.abc import TaskStatus

from ..ports import Clock

log = logging.getLogger(__name__)

K = TypeVar("K")


class TimerHeap(Generic[K]):
    def __init__(
        self, clock: Clock, *, max_sleep_s: float = 2.0, classify: Callable[[K], str] | None = None
    ) -> None:
        self._clock = clock
        # Live timers per class (e.g. start/end), kept up to date in O(1) for gauges.
        self._classify = classify or (lambda key: "")
        self.counts: Counter[str] = Counter()
        self._max_sleep_s = max_sleep_s
        # (due timestamp, generation, key); stale entries are skipped when popped.
        self._heap: list[tuple[float, int, K]] = []
        self._live: dict[K, tuple[float, int]] = {}
        # Timers armed already overdue (a late approval) are late by the arming, not by us:
        # their lateness is measured from when they were armed.
        self._armed_late: dict[K, float] = {}
        # A timer re-armed to look again (the database said "not due yet") keeps the instant it
        # was first due: it fires with that instant, and its lateness counts from it.
        self._origin: dict[K, float] = {}
        self._gen = itertools.count()
        # Cancelled to cut the loop's sleep short when an earlier timer is armed.
        self._sleep_scope: anyio.CancelScope | None = None

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, key: object) -> bool:
        return key in self._live

    def due_at(self, key: K) -> dt.datetime | None:
        entry = self._live.get(key)
        return None if entry is None else dt.datetime.fromtimestamp(entry[0], dt.UTC)

    def keys(self) -> list[K]:
        return list(self._live)

    def arm(self, key: K, due_at: dt.datetime, *, origin: dt.datetime | None = None) -> bool:
        """Arm or move a timer; returns False when it was already armed for that instant.
        With `origin`, a retry of a timer first due then: it fires as due at `origin`, late
        by the time since `origin`."""
        due = due_at.timestamp()
        current = self._live.get(key)
        if origin is not None:
            self._origin[key] = origin.timestamp()
        else:
            self._origin.pop(key, None)
        if current is not None and current[0] == due:
            return False
        gen = next(self._gen)
        if current is None:
            self.counts[self._classify(key)] += 1
        self._live[key] = (due, gen)
        now_ts = self._clock.now().timestamp()
        if due < now_ts:
            self._armed_late[key] = now_ts
        else:
            self._armed_late.pop(key, None)
        heapq.heappush(self._heap, (due, gen, key))
        if self._heap[0][1] == gen and self._sleep_scope is not None:
            self._sleep_scope.cancel()  # the new timer is the earliest: re-plan the sleep
        self._compact()
        return True

    def disarm(self, key: K) -> bool:
        self._armed_late.pop(key, None)
        self._origin.pop(key, None)
        if self._live.pop(key, None) is None:
            return False
        self.counts[self._classify(key)] -= 1
        return True

    def _compact(self) -> None:
        # Lazy deletion leaves dead entries behind; rebuild once they dominate the heap.
        if len(self._heap) > 1024 and len(self._heap) > 2 * len(self._live):
            self._heap = [(d, g, k) for (d, g, k) in self._heap if self._live.get(k) == (d, g)]
            heapq.heapify(self._heap)

    def pop_due(self, now: dt.datetime) -> list[tuple[K, dt.datetime, float]]:
        """Due timers as (key, due instant, lateness in seconds attributable to the heap)."""
        now_ts = now.timestamp()
        due: list[tuple[K, dt.datetime, float]] = []
        heap = self._heap
        while heap and heap[0][0] <= now_ts:
            d, g, key = heapq.heappop(heap)
            if self._live.get(key) == (d, g):
                del self._live[key]
                self.counts[self._classify(key)] -= 1
                reference = max(d, self._armed_late.pop(key, d))
                origin = self._origin.pop(key, None)
                if origin is not None:
                    d = reference = origin
                due.append(
                    (key, dt.datetime.fromtimestamp(d, dt.UTC), max(0.0, now_ts - reference))
                )
        return due

    def next_due_ts(self) -> float | None:
        heap = self._heap
        while heap and self._live.get(heap[0][2]) != (heap[0][0], heap[0][1]):
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    async def run(
        self,
        fire: Callable[[K, dt.datetime, float], None],
        *,
        task_status: TaskStatus[None] = TASK_STATUS_IGNORED,
    ) -> None:
        """Call `fire(key, due_at, lateness_s)` for each timer as it comes due; never returns."""
        task_status.started()
        while True:
            now = self._clock.now()
            for key, due_at, lateness_s in self.pop_due(now):
                fire(key, due_at, lateness_s)
            next_ts = self.next_due_ts()
            delay = self._max_sleep_s
            if next_ts is not None:
                delay = min(delay, max(0.0, next_ts - self._clock.now().timestamp()))
            if delay <= 0:
                continue
            with anyio.CancelScope() as scope:
                self._sleep_scope = scope
                await self._clock.sleep(delay)
            self._sleep_scope = None
