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
import time
import uuid
from collections.abc import Mapping
from typing import Any

import anyio
from pymongo.errors import OperationFailure, PyMongoError

from .adapters.mongo_store import MongoCampaignStore
from .metrics import Metrics
from .ports import Clock
from .reconciler import Reconciler
from .scheduler import Scheduler

log = logging.getLogger(__name__)

HISTORY_LOST_CODES = {286, 260, 280, 136}  # history lost, invalid token, fatal, capped deleted

STATE_COLLECTION = "reactor_state"


def pipeline(campaigns: str, barrier_id: str) -> list[dict[str, Any]]:
    """The server-side filter for a stream on the campaigns database.

    Campaign changes pass only if they can alter a schedule. `execution` as a whole field appears
    when a lease is released (so another replica takes over at once); heartbeats and counters set
    dotted sub-fields (`execution.leaseUntil`, `performance.*`) and are dropped here, on the server.
    This instance's barrier document passes too: see `Watcher.barrier`.
    """
    return [
        {
            "$match": {
                "$or": [
                    {
                        "ns.coll": campaigns,
                        "$or": [
                            {
                                "operationType": {
                                    "$in": ["insert", "replace", "delete", "drop", "rename"]
                                }
                            },
                            {"updateDescription.updatedFields.status": {"$exists": True}},
                            {"updateDescription.updatedFields.startDate": {"$exists": True}},
                            {"updateDescription.updatedFields.endDate": {"$exists": True}},
                            {"updateDescription.updatedFields.execution": {"$exists": True}},
                            {
                                "updateDescription.removedFields": {
                                    "$in": ["status", "startDate", "endDate"]
                                }
                            },
                        ],
                    },
                    {"operationType": {"$in": ["dropDatabase", "invalidate"]}},
                    {"ns.coll": STATE_COLLECTION, "documentKey._id": barrier_id},
                ]
            }
        },
        {"$project": {"fullDocument.targetedCustomerIds": 0}},
    ]


class Watcher:
    def __init__(
        self,
        *,
        store: MongoCampaignStore,
        scheduler: Scheduler,
        reconciler: Reconciler,
        clock: Clock,
        metrics: Metrics,
        instance_id: str,
        max_await_ms: int = 1000,
    ) -> None:
        self._store = store
        self._scheduler = scheduler
        self._reconciler = reconciler
        self._clock = clock
        self._metrics = metrics
        self._instance = instance_id
        self._max_await_ms = max_await_ms
        self.token: Mapping[str, Any] | None = None
        self.up = False
        self.opened = anyio.Event()
        self._backoff = 0.5
        self._barrier_id = f"barrier:{instance_id}"
        self._barriers: dict[str, anyio.Event] = {}

    async def run(self) -> None:
        """Watch until cancelled; `opened` is set once the first sweep is done and the stream
        is open (the service is ready)."""
        self.token = await self._store.load_token(self._instance)
        need_sweep = True
        initial = True
        while True:
            try:
                start_at = await self._store.cluster_time()
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
        self._metrics.change_stream_up.set(1 if value else 0)

    async def _watch(self, start_at: Any) -> None:
        kwargs: dict[str, Any] = {
            "full_document": "updateLookup",
            "max_await_time_ms": self._max_await_ms,
        }
        if self.token:
            kwargs["resume_after"] = self.token
        else:
            kwargs["start_at_operation_time"] = start_at
        stream = await self._store.db.watch(
            pipeline(self._store.campaigns.name, self._barrier_id), **kwargs
        )
        async with stream:
            self._set_up(True)
            self.opened.set()
            last_save = time.monotonic()
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
                    and (unsaved >= 100 or time.monotonic() - last_save >= 5)
                ):
                    await self.save_token()
                    last_save, unsaved = time.monotonic(), 0
        raise _Reopen("invalidated")

    async def barrier(self, timeout_s: float = 5.0) -> bool:
        """Write a marker the stream will carry back, and wait for it: once it arrives, every
        change made before it has been applied. False if the stream did not deliver it in time."""
        if not self.up:
            return False
        nonce = uuid.uuid4().hex
        arrived = self._barriers[nonce] = anyio.Event()
        try:
            await self._store.db[STATE_COLLECTION].update_one(
                {"_id": self._barrier_id}, {"$set": {"nonce": nonce}}, upsert=True
            )
            with anyio.move_on_after(timeout_s):
                await arrived.wait()
        finally:
            self._barriers.pop(nonce, None)
        return arrived.is_set()

    async def _handle(self, event: Mapping[str, Any]) -> None:
        op = str(event.get("operationType"))
        ns = event.get("ns") or {}
        if ns.get("coll") == STATE_COLLECTION:
            nonce = (event.get("fullDocument") or {}).get("nonce")
            if nonce in self._barriers:
                self._barriers[nonce].set()
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
            await self._scheduler.sync(dict(doc), event_ts=event.get("clusterTime"))
        except Exception:  # one bad event must not stop the stream
            self._metrics.campaign_errors.labels("event_error").inc()
            log.exception(
                "could not apply change event for campaign %s", key, extra={"campaign_id": key}
            )

    async def save_token(self) -> None:
        if self.token:
            await self._store.save_token(self._instance, self.token, self._clock.now())


class _Reopen(Exception):
    """Raised when the change stream ended by itself (invalidate) and must be reopened."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
