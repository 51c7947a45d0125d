"""The safety net: every `reconcile_interval_s`, at a fixed rate, list every active campaign and
pass it through the scheduler's `sync`. Whatever that changes is something the change stream
should have done and did not — a repair, counted and logged."""

from __future__ import annotations

import datetime as dt
import logging
from collections import Counter
from typing import Any

import anyio

from ..domain.models import utc
from ..metrics import Metrics
from ..ports import CampaignStore, ChangeFeed, Clock
from .barriers import Barriers
from .scheduler import Scheduler

log = logging.getLogger(__name__)

# What a sweep can change that the stream should have: a timer armed or disarmed, a takeover of
# an expired lease. A retry of an execution that failed (its lease released with a back-off) is
# the sweep's own job, not a repair.
REPAIRS = frozenset({"armed", "disarmed", "takeover"})


class Reconciler:
    def __init__(
        self,
        *,
        store: CampaignStore,
        feed: ChangeFeed,
        barriers: Barriers,
        scheduler: Scheduler,
        clock: Clock,
        metrics: Metrics,
        interval_s: float,
    ) -> None:
        self._store = store
        self._feed = feed
        self._barriers = barriers
        self._scheduler = scheduler
        self._clock = clock
        self._metrics = metrics
        self._interval_s = interval_s
        self.first_sweep = anyio.Event()

    async def sweep(self, *, initial: bool = False) -> Counter[str]:
        """One pass. `initial` sweeps (start-up, after the stream lost history) arm everything
        they find as a matter of course; later ones count what they change as repairs."""
        seen_at = await self._feed.cluster_time()
        docs = await self._store.list_active()
        if not initial:
            # Let the stream deliver everything written up to this read first; what the sweep
            # still has to change after that, the stream really missed.
            await self._barriers.wait()
        repairs: Counter[str] = Counter()
        listed = set()
        self._count_overdue(docs)
        for doc in docs:
            key = str(doc["_id"])
            listed.add(key)
            try:
                changes = await self._scheduler.sync(doc, seen_at=seen_at)
            except Exception:  # one bad row must not end the sweep
                log.exception("sweep could not sync campaign %s", key, extra={"campaign_id": key})
                continue
            repairs.update(changes & REPAIRS)
        for key in self._scheduler.known_keys() - listed:
            repairs.update(self._scheduler.forget_if_stale(key, seen_at))
        self._scheduler.prune_event_times(seen_at)
        self._metrics.reconcile_runs.inc()
        if not initial and repairs:
            for kind, n in repairs.items():
                self._metrics.reconcile_repairs.labels(kind).inc(n)
            log.warning(
                "🔧 Sweep repaired what the change stream missed: %s",
                ", ".join(f"{k}={v}" for k, v in sorted(repairs.items())),
                extra={"repairs": dict(repairs)},
            )
        self.first_sweep.set()
        return repairs

    def _count_overdue(self, docs: list[dict[str, Any]]) -> None:
        limit = self._clock.now() - dt.timedelta(seconds=2 * self._interval_s + 30)
        overdue = 0
        for doc in docs:
            end = utc(doc.get("endDate"))
            if doc.get("status") in ("running", "paused") and end is not None and end < limit:
                overdue += 1
        self._metrics.campaigns_overdue.set(overdue)

    async def run(self) -> None:
        """Sweep at a fixed rate until cancelled (the first sweep is the watcher's)."""
        while True:
            await self._clock.sleep(self._interval_s)
            try:
                await self.sweep()
            except Exception:
                log.exception("reconciliation sweep failed; next one in %ss", self._interval_s)
