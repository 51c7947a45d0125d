"""List-then-watch over the campaigns collection.

At start: read the cluster time, sweep, then open the change stream at that time (or at the
persisted resume token, which is older), so no write falls in the gap. The driver resumes by
itself after a resumable error; anything it cannot resume from — history lost, an invalid token,
an invalidate — means: sweep, then watch from now. The server-side pipeline lets through only
changes that can alter a schedule, so the reactor's own counter and heartbeat writes never come
back as work.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import anyio
from pymongo.errors import OperationFailure, PyMongoError

from ..domain.errors import HISTORY_LOST_CODES
from ..metrics import Metrics
from ..ports import ChangeFeed, Clock
from .barriers import Barriers
from .reconciler import Reconciler
from .scheduler import Scheduler

log = logging.getLogger(__name__)


class Watcher:
    def __init__(
        self,
        *,
        feed: ChangeFeed,
        barriers: Barriers,
        scheduler: Scheduler,
        reconciler: Reconciler,
        clock: Clock,
        metrics: Metrics,
        max_await_ms: int = 1000,
    ) -> None:
        self._feed = feed
        self._barriers = barriers
        self._scheduler = scheduler
        self._reconciler = reconciler
        self._clock = clock
        self._metrics = metrics
        self._max_await_ms = max_await_ms
        self.token: Mapping[str, Any] | None = None
        self.up = False
        self.opened = anyio.Event()
        self._backoff = 0.5
        # Called with every campaigns change event before it is applied (notifications).
        self.on_event: list[Callable[[Mapping[str, Any]], None]] = []

    async def run(self) -> None:
        """Watch until cancelled; `opened` is set once the first sweep is done and the stream
        is open (the service is ready)."""
        self.token = await self._feed.load_token()
        need_sweep = True
        initial = True
        while True:
            try:
                start_at = await self._feed.cluster_time()
                if need_sweep:
                    await self._reconciler.sweep(initial=initial)
                    need_sweep = False
                    initial = False
                await self._watch(start_at)
            except OperationFailure as exc:
                self._set_up(False)
                if exc.code in HISTORY_LOST_CODES:
                    self._metrics.change_stream_restarts.labels("history_lost").inc()
                    log.warning(
                        "change stream cannot resume (%s, code %s); sweeping and watching from now",
                        exc.details.get("codeName") if exc.details else "",
                        exc.code,
                    )
                    self.token = None
                    need_sweep = True
                    initial = True
                    continue
                self._metrics.change_stream_restarts.labels("error").inc()
                log.warning("change stream failed: %s; reopening in %.1fs", exc, self._backoff)
                need_sweep = True
            except PyMongoError as exc:
                self._set_up(False)
                self._metrics.change_stream_restarts.labels("connection").inc()
                log.warning(
                    "change stream connection failed: %s; reopening in %.1fs",
                    type(exc).__name__,
                    self._backoff,
                )
                need_sweep = True
            except _Reopen as exc:
                self._set_up(False)
                self._metrics.change_stream_restarts.labels(exc.reason).inc()
                log.warning("change stream ended (%s); sweeping and watching from now", exc.reason)
                self.token = None
                need_sweep = True
                initial = True
                continue
            await self._clock.sleep(self._backoff)
            self._backoff = min(self._backoff * 2, 10.0)

    def _backoff_reset(self) -> None:
        self._backoff = 0.5

    def _set_up(self, value: bool) -> None:
        self.up = value
        self._barriers.up = value
        self._metrics.change_stream_up.set(1 if value else 0)

    async def _watch(self, start_at: Any) -> None:
        stream = await self._feed.open(
            token=self.token, start_at=start_at, max_await_ms=self._max_await_ms
        )
        try:
            # Where the open left the stream (the driver never names a point past an event it
            # has not handed out): a replica stopped before its first getMore returns still
            # saves its place at shutdown, and resumes there instead of from now.
            if stream.resume_token is not None:
                self.token = stream.resume_token
            self._set_up(True)
            self.opened.set()
            last_save = self._clock.monotonic()
            unsaved = 0
            while stream.alive:
                event = await stream.try_next()
                if event is not None:
                    await self._handle(event)
                    unsaved += 1
                    self._backoff_reset()
                token = stream.resume_token
                if token is not None:
                    self.token = token
                if (
                    token is not None
                    and unsaved
                    and (unsaved >= 100 or self._clock.monotonic() - last_save >= 5)
                ):
                    await self.save_token()
                    last_save, unsaved = self._clock.monotonic(), 0
        finally:
            with anyio.CancelScope(shield=True):
                await stream.close()
        raise _Reopen("invalidated")

    async def _handle(self, event: Mapping[str, Any]) -> None:
        op = str(event.get("operationType"))
        if self._feed.is_barrier(event):
            self._barriers.arrived(event)
            return
        self._metrics.change_stream_events.labels(op).inc()
        if op in ("dropDatabase", "invalidate"):
            return  # the stream closes after these; run() sweeps and reopens
        if op in ("drop", "rename"):
            # The campaigns collection went away: a sweep forgets what no longer exists.
            await self._reconciler.sweep(initial=True)
            return
        key_doc = event.get("documentKey") or {}
        key = str(key_doc.get("_id"))
        try:
            if op == "delete":
                self._scheduler.forget(key)
                return
            doc = event.get("fullDocument")
            if doc is None:
                self._scheduler.forget(key)  # deleted before the lookup
                return
            for hook in self.on_event:
                hook(event)
            await self._scheduler.sync(dict(doc), event_ts=event.get("clusterTime"))
        except Exception:  # one bad event must not stop the stream
            self._metrics.campaign_errors.labels("event_error").inc()
            log.exception(
                "could not apply change event for campaign %s", key, extra={"campaign_id": key}
            )

    async def save_token(self) -> None:
        if self.token:
            await self._feed.save_token(self.token, self._clock.now())


class _Reopen(Exception):
    """Raised when the change stream ended by itself (invalidate) and must be reopened."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
