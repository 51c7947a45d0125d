"""The notifier: what the rest of the reactor calls when a campaign's state changes, and the
tasks that turn those changes into events and deliver them.

Callers never wait for a notification. `post(...)` queues the emission and returns; one of a few
emitter tasks (chosen by campaign, so one campaign's events are written in order) reads what the
event needs and writes it to the outbox under its key. The scheduler, the executor and the
watcher call it right after the conditional write that changed the state, and only the writer
that won that write does, so replicas racing produce one event (and the key makes a repeat a
no-op anyway).

It also runs the checks that no single write reports: the late-start scan (approved and due,
not running NOTIFY_START_LATE_SECONDS after startDate, judged by the database's `$$NOW`), and
the failure-spike watch over this instance's send counters.
"""

from __future__ import annotations

import collections
import datetime as dt
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import anyio
from bson import Timestamp
from pymongo import ReturnDocument
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError, PyMongoError

from ..domain.models import utc
from ..metrics import Metrics
from ..ports import Clock
from . import events as ev
from .config import NotifyConfig
from .delivery import Courier, HttpTransport, SmtpTransport, Transport
from .destinations import DestinationSet, Resolve
from .events import Event, base_data, event_key, iso, outcomes, scrub
from .outbox import MongoOutbox

log = logging.getLogger(__name__)

EMITTERS = 4
# The repair looks this far back for state changes whose events are missing, once the writer
# had this long to write them.
REPAIR_WINDOW_S = 15 * 60.0
REPAIR_AFTER_S = 15.0
REPAIR_EVERY = 3  # scans
QUEUE_MAX = 10_000
STATE = "reactor_state"


class Notifier:
    def __init__(
        self,
        db: AsyncDatabase[dict[str, Any]],
        *,
        campaigns_collection: str,
        clock: Clock,
        metrics: Metrics,
        config: NotifyConfig,
        instance_id: str,
        resolve: Resolve | None = None,
        transports: dict[str, Transport] | None = None,
    ) -> None:
        self._db = db
        self._campaigns = db[campaigns_collection]
        self._state = db[STATE]
        self._clock = clock
        self._metrics = metrics
        self.config = config
        self.instance_id = instance_id
        self.outbox = MongoOutbox(db)
        self.destinations = DestinationSet(db, config.defaults)
        self._transports = transports or {
            "http": HttpTransport(config, clock, resolve),
            "email": SmtpTransport(config.smtp),
        }
        self.courier = Courier(
            outbox=self.outbox,
            destinations=self.destinations,
            transports=self._transports,
            clock=clock,
            metrics=metrics,
            config=config,
            instance_id=instance_id,
        )
        self._queues: list[collections.deque[tuple[Any, Any, tuple[Any, ...]]]] = [
            collections.deque() for _ in range(EMITTERS)
        ]
        self._queued = [anyio.Event() for _ in range(EMITTERS)]
        self._closing = False
        self._emitters_live = 0
        self._emitters_done = anyio.Event()
        self._late_seen: set[str] = set()
        self._progress_sent: dict[str, int] = {}
        self._scans = 0
        self._spike_samples: collections.deque[tuple[float, dict[str, tuple[float, float]]]] = (
            collections.deque()
        )
        self.ready = anyio.Event()

    # ---- the public API ----------------------------------------------------------------------

    async def emit(
        self,
        event_type: str,
        campaign_id: Any,
        key: Any,
        data: Mapping[str, Any],
        *,
        at: dt.datetime | None = None,
    ) -> bool:
        """Write one event to the outbox under `type:campaign:key` (`key`: what makes this state
        change unique, e.g. the epoch). True if this call wrote it, False if it was there.
        `data` must hold no customer data; `schemaVersion` is added if absent."""
        if event_type not in ev.EVENT_TYPES:
            raise ValueError(f"unknown notification event type {event_type!r}")
        campaign = "" if campaign_id is None else str(campaign_id)
        payload = {"schemaVersion": ev.SCHEMA_VERSION, **data}
        event = Event(
            event_key(event_type, campaign, key),
            event_type,
            campaign,
            at or self._clock.now(),
            payload,
        )
        targets = [(d.id, d.kind) for d in self.destinations.matching(event_type)]
        written = await self.outbox.insert(event, targets)
        if written:
            self._metrics.notification_events.labels(event_type).inc()
            log.info(
                "notification %s for %s written (%d destinations)",
                event_type,
                campaign or "the cluster",
                len(targets),
                extra={"campaign_id": campaign, "event": event_type},
            )
            self.courier.wake()
        return written

    def post(self, fn: Callable[..., Awaitable[Any]], campaign: Any, *args: Any) -> None:
        """Queue `fn(campaign, *args)` for an emitter task; never blocks, never raises."""
        i = hash(str(campaign)) % EMITTERS
        if self._closing or len(self._queues[i]) >= QUEUE_MAX:
            self._metrics.notification_events.labels("dropped").inc()
            log.error("notification queue full or closed: an event for %s is dropped", campaign)
            return
        self._queues[i].append((fn, campaign, args))
        self._queued[i].set()

    # ---- hooks: what callers post ----------------------------------------------------------

    async def started(self, claimed: dict[str, Any]) -> None:
        cid = str(claimed["_id"])
        exe = claimed.get("execution") or {}
        epoch = int(exe.get("epoch") or 0)
        started_at = utc(exe.get("startedAt")) or self._clock.now()
        start = utc(claimed.get("startDate")) or started_at
        data = base_data(cid, claimed.get("name"))
        data.update(
            startDate=iso(start),
            startedAt=iso(started_at),
            latenessMs=int(exe.get("startLatenessMs") or 0),
            audienceSize=await self._audience_size(claimed["_id"]),
            owner=exe.get("owner"),
            epoch=epoch,
        )
        # Keyed by the claim's own time (the database's): unique per start, and derivable from
        # the document later (a takeover changes the epoch, never `startedAt`).
        await self.emit(ev.CAMPAIGN_STARTED, cid, _ms(started_at), data, at=started_at)

    async def completed(self, campaign_id: Any) -> None:
        doc = await self._campaigns.find_one({"_id": campaign_id}, {"targetedCustomerIds": 0})
        if doc is None:
            return
        cid = str(campaign_id)
        exe = doc.get("execution") or {}
        started_at, finished_at = utc(exe.get("startedAt")), utc(exe.get("finishedAt"))
        finished_at = finished_at or self._clock.now()
        data = base_data(cid, doc.get("name"))
        data.update(
            startedAt=iso(started_at) if started_at else None,
            finishedAt=iso(finished_at),
            durationSeconds=(finished_at - started_at).total_seconds() if started_at else None,
            outcomes=outcomes(doc.get("performance") or {}),
        )
        not_sent = await self._db["deliveries"].count_documents(
            {"campaign": cid, "state": "skipped", "reason": "window_closed"}
        )
        kind = ev.CAMPAIGN_COMPLETED
        if not_sent or not exe.get("sendsDone"):
            kind = ev.CAMPAIGN_COMPLETED_SHORT
            data.update(
                notSent=int(not_sent),
                reason="the window closed before every recipient was reached"
                if not_sent
                else "sending had not finished when the window closed",
            )
        # One key for both kinds: a campaign's epoch completes once.
        key = event_key(ev.CAMPAIGN_COMPLETED, cid, int(exe.get("epoch") or 0))
        await self._emit_keyed(kind, cid, key, data, finished_at)

    async def missed(self, campaign_id: Any, reason: str) -> None:
        doc = await self._campaigns.find_one(
            {"_id": campaign_id}, {"name": 1, "startDate": 1, "execution.finishedAt": 1}
        )
        if doc is None:
            return
        cid = str(campaign_id)
        start = utc(doc.get("startDate")) or self._clock.now()
        data = base_data(cid, doc.get("name"))
        data.update(startDate=iso(start), reason=scrub(reason))
        await self.emit(ev.CAMPAIGN_MISSED, cid, _ms(start), data)

    async def failed(self, campaign_id: Any, name: str, epoch: int, detail: str, n: int) -> None:
        cid = str(campaign_id)
        data = base_data(cid, name)
        data.update(error=scrub(detail)[:500], failures=int(n))
        await self.emit(ev.CAMPAIGN_FAILED, cid, epoch, data)

    async def _paused_or_resumed(self, campaign: str, kind: str, key: str, doc: Any) -> None:
        exe = doc.get("execution") if isinstance(doc.get("execution"), dict) else {}
        started_at = utc(exe.get("startedAt"))
        if started_at is not None and "_id" in doc:
            # The start's event is written by the claim's winner, perhaps a moment after the
            # pause: written here first if missing, it is the older of the two in their lane.
            key_started = event_key(ev.CAMPAIGN_STARTED, campaign, _ms(started_at))
            if not await self.outbox.has([key_started]):
                await self.started(doc)
        data = base_data(campaign, doc.get("name"))
        if kind == ev.CAMPAIGN_RESUMED:
            data["by"] = "operator"
        elif exe.get("pausedReason") == "complaint_rate":
            data.update(
                by="complaint_rate",
                reason=scrub(str((exe.get("lastError") or {}).get("detail", ""))),
            )
            if isinstance(exe.get("pausedRate"), int | float):
                data["rate"] = float(exe["pausedRate"])
        else:
            data.update(by="operator", reason="paused by an operator")
        await self.emit(kind, campaign, key, data)

    def observe_change(self, event: Mapping[str, Any]) -> None:
        """A campaigns change event (every replica sees the same, with the same cluster time):
        a status set to `paused`, or set back to `running` without a new claim, is reported."""
        if event.get("operationType") != "update":
            return
        fields = (event.get("updateDescription") or {}).get("updatedFields") or {}
        status = fields.get("status")
        doc = event.get("fullDocument")
        ts = event.get("clusterTime")
        if status not in ("paused", "running") or not isinstance(doc, dict):
            return
        if status == "running" and any(
            f == "execution" or f.startswith("execution.epoch") for f in fields
        ):
            return  # a start claim, not a resume
        key = f"{ts.time}.{ts.inc}" if isinstance(ts, Timestamp) else str(ts)
        kind = ev.CAMPAIGN_PAUSED if status == "paused" else ev.CAMPAIGN_RESUMED
        self.post(
            self._paused_or_resumed,
            str((event.get("documentKey") or {}).get("_id")),
            kind,
            key,
            doc,
        )

    def channel_changed(self, channel: str, paused: bool, kind: str, error: str) -> None:
        """A channel's breaker opened or closed on this instance (sync: called from sending)."""
        self.post(self._channel, "", channel, paused, kind, error)

    async def _channel(self, _: str, channel: str, paused: bool, kind: str, error: str) -> None:
        """Cluster-wide, one event per pause: the first instance to flip the channel's state
        reports it."""
        flip = await self._flip(f"notify:channel:{channel}", paused)
        if flip is None:
            return
        data: dict[str, Any] = {"channel": channel, "instance": self.instance_id}
        if paused:
            data.update(kind=kind, error=scrub(error)[:300])
        kind_name = ev.CHANNEL_PAUSED if paused else ev.CHANNEL_RESUMED
        await self.emit(kind_name, None, f"{channel}:{flip}", data)

    async def _flip(self, state_id: str, on: bool) -> int | None:
        """Set a cluster-wide flag; the flip's number if this call changed it, else None."""
        try:
            doc = await self._state.find_one_and_update(
                {"_id": state_id, "on": {"$ne": on}},
                {"$set": {"on": on, "at": self._clock.now()}, "$inc": {"flips": 1}},
                upsert=on,
                return_document=ReturnDocument.AFTER,
            )
        except DuplicateKeyError:
            return None  # already on: another instance flipped it
        return None if doc is None else int(doc.get("flips", 0))

    async def _emit_keyed(
        self, kind: str, campaign: str, key: str, data: dict[str, Any], at: dt.datetime
    ) -> None:
        payload = {"schemaVersion": ev.SCHEMA_VERSION, **data}
        event = Event(key, kind, campaign, at, payload)
        targets = [(d.id, d.kind) for d in self.destinations.matching(kind)]
        if await self.outbox.insert(event, targets):
            self._metrics.notification_events.labels(kind).inc()
            self.courier.wake()

    async def _audience_size(self, campaign_id: Any) -> int | None:
        cursor = await self._campaigns.aggregate(
            [
                {"$match": {"_id": campaign_id}},
                {
                    "$project": {
                        "n": {
                            "$cond": [
                                {"$isArray": "$targetedCustomerIds"},
                                {"$size": "$targetedCustomerIds"},
                                None,
                            ]
                        },
                        "segment": {"$ifNull": ["$segment", None]},
                    }
                },
            ]
        )
        rows = await cursor.to_list()
        if not rows or rows[0].get("segment") is not None:
            return None  # a segment's audience is frozen by the run, not known here
        n = rows[0].get("n")
        return int(n) if isinstance(n, int) else None

    # ---- running -----------------------------------------------------------------------------

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        await self.outbox.ensure_indexes()
        await self.destinations.reload()
        async with anyio.create_task_group() as tg:
            for i in range(EMITTERS):
                tg.start_soon(self._emitter, i)
            tg.start_soon(self.courier.run)
            tg.start_soon(self._every, self.config.reload_s, self._reload)
            tg.start_soon(self._every, self.config.stats_s, self._stats)
            tg.start_soon(self._every, self.config.scan_s, self.scan)
            self.ready.set()
            task_status.started()
            await anyio.sleep_forever()

    async def drain(self, grace_s: float) -> None:
        """At shutdown: let queued emissions be written (their state changes are committed)."""
        self._closing = True
        for event in self._queued:
            event.set()
        with anyio.move_on_after(grace_s, shield=True):
            if self._emitters_live:
                await self._emitters_done.wait()
            try:
                await self.outbox.release(self.instance_id, sorted(self.courier.inflight))
            except PyMongoError:
                log.warning("could not give back the notifications in flight at shutdown")

    async def _emitter(self, i: int) -> None:
        """Write queue `i`'s events in order, until drained at shutdown."""
        queue = self._queues[i]
        self._emitters_live += 1
        try:
            while True:
                while queue:
                    fn, campaign, args = queue.popleft()
                    try:
                        await fn(campaign, *args)
                    except Exception:  # one event's failure must not stop the others
                        self._metrics.notification_events.labels("error").inc()
                        log.exception("could not write a notification for %s", campaign)
                if self._closing:
                    return
                await self._queued[i].wait()
                self._queued[i] = anyio.Event()
        finally:
            self._emitters_live -= 1
            if not self._emitters_live:
                self._emitters_done.set()

    async def _every(self, interval_s: float, fn: Callable[[], Awaitable[Any]]) -> None:
        while True:
            try:
                await fn()
            except PyMongoError as exc:
                log.warning("notifications: %s failed (%s)", fn.__name__, type(exc).__name__)
            except Exception:
                log.exception("notifications: %s failed", fn.__name__)
            await self._clock.sleep(interval_s)

    async def _reload(self) -> None:
        await self.destinations.reload()
        for event in await self.outbox.unfanned(self._clock.now() - dt.timedelta(seconds=5)):
            targets = [(d.id, d.kind) for d in self.destinations.matching(str(event["type"]))]
            await self.outbox.fan_out(event, targets)

    async def _stats(self) -> None:
        # Removed or disabled destinations' rows wait, but are not what the alert is about.
        enabled = [d for d, dest in self.destinations.current.items() if not dest.disabled]
        stats: dict[str, Any] = {"backlog": 0, "dead": 0, "oldest": None}
        if enabled:
            stats = await self.outbox.stats(enabled)
        self._metrics.notification_backlog.set(stats["backlog"])
        self._metrics.notification_dead.set(stats["dead"])
        oldest = utc(stats["oldest"])
        age = (self._clock.now() - oldest).total_seconds() if oldest else 0.0
        self._metrics.notification_oldest_age.set(max(0.0, age))

    async def scan(self) -> None:
        """The checks no single write reports: late starts and failure spikes; and the events
        a replica that died right after a state change did not write."""
        await self._scan_late()
        await self._check_spike()
        self._scans += 1
        if self._scans % REPAIR_EVERY == 1:
            await self.repair()  # a scan of recent campaigns: not every time
        await self._scan_progress()

    async def _scan_progress(self) -> None:
        """`campaign.progress` each time a running campaign crosses another
        NOTIFY_PROGRESS_PERCENT of its audience (every channel's sent, failed and skipped);
        off when 0. A jump over several steps reports the last one."""
        step = self.config.progress_every_percent
        if step <= 0:
            return
        cursor = await self._campaigns.aggregate(
            [
                {"$match": {"status": "running"}},
                {
                    "$project": {
                        "name": 1,
                        "channels": 1,
                        "performance": 1,
                        "startedAt": "$execution.startedAt",
                        "email": {"$ne": [{"$type": "$email"}, "missing"]},
                        "sms": {"$ne": [{"$type": "$sms"}, "missing"]},
                        "audience": {
                            "$cond": [
                                {"$isArray": "$targetedCustomerIds"},
                                {"$size": "$targetedCustomerIds"},
                                None,
                            ]
                        },
                    }
                },
            ]
        )
        async for doc in cursor:
            await self._progress(doc, step)

    async def _progress(self, doc: dict[str, Any], step: int) -> None:
        audience, started_at = doc.get("audience"), utc(doc.get("startedAt"))
        if not isinstance(audience, int) or audience <= 0 or started_at is None:
            return
        counts = outcomes(doc.get("performance") or {})
        listed = doc.get("channels") if isinstance(doc.get("channels"), list) else None
        channels = [c for c in ("email", "sms") if (c in listed if listed else doc.get(c))]
        if not channels:
            return
        processed = min(sum(counts[c].values()) for c in channels)
        percent = min(100, processed * 100 // audience) // step * step
        cid = str(doc["_id"])
        if percent <= 0 or percent >= 100 or self._progress_sent.get(cid, 0) >= percent:
            return
        self._progress_sent[cid] = percent
        data = base_data(cid, doc.get("name"))
        data.update(percent=percent, processed=processed, audienceSize=audience)
        await self.emit(ev.CAMPAIGN_PROGRESS, cid, f"{_ms(started_at)}:{percent}", data)

    async def repair(self) -> int:
        """Write the events of recent state changes (the last REPAIR_WINDOW_S) that are not in
        the outbox REPAIR_AFTER_S after the change: their writer died in between. Each key is
        derived from the document exactly as the writer would have; returns how many."""
        now = self._clock.now()
        since = now - dt.timedelta(seconds=REPAIR_WINDOW_S)
        settled = now - dt.timedelta(seconds=REPAIR_AFTER_S)
        wanted: dict[str, tuple[Callable[..., Awaitable[Any]], tuple[Any, ...]]] = {}
        async for doc in self._campaigns.find(
            {
                "$or": [
                    {"execution.startedAt": {"$gte": since}},
                    {"execution.finishedAt": {"$gte": since}},
                ]
            },
            {"targetedCustomerIds": 0},
        ):
            wanted.update(self._expected(doc, settled))
        if not wanted:
            return 0
        missing = set(wanted) - await self.outbox.has(list(wanted))
        for key in sorted(missing):
            fn, args = wanted[key]
            log.warning("notification %s was not written by its replica; writing it now", key)
            await fn(*args)
        return len(missing)

    def _expected(
        self, doc: dict[str, Any], settled: dt.datetime
    ) -> dict[str, tuple[Callable[..., Awaitable[Any]], tuple[Any, ...]]]:
        """The events a campaign's document says were due, by key."""
        cid, status = str(doc["_id"]), doc.get("status")
        exe: dict[str, Any] = doc["execution"] if isinstance(doc.get("execution"), dict) else {}
        started_at, finished_at = utc(exe.get("startedAt")), utc(exe.get("finishedAt"))
        epoch = int(exe.get("epoch") or 0)
        out: dict[str, tuple[Callable[..., Awaitable[Any]], tuple[Any, ...]]] = {}
        if started_at is not None and started_at <= settled and epoch:
            out[event_key(ev.CAMPAIGN_STARTED, cid, _ms(started_at))] = (self.started, (doc,))
        if finished_at is None or finished_at > settled:
            return out
        if status == "completed":
            out[event_key(ev.CAMPAIGN_COMPLETED, cid, epoch)] = (self.completed, (doc["_id"],))
        elif status == "missed" and (start := utc(doc.get("startDate"))) is not None:
            reason = str(exe.get("reason") or "the start passed the misfire grace")
            out[event_key(ev.CAMPAIGN_MISSED, cid, _ms(start))] = (
                self.missed,
                (doc["_id"], reason),
            )
        elif status == "failed":
            detail = str((exe.get("lastError") or {}).get("detail") or exe.get("reason") or "")
            args = (doc["_id"], doc.get("name"), epoch, detail, int(exe.get("failures") or 0))
            out[event_key(ev.CAMPAIGN_FAILED, cid, epoch)] = (self.failed, args)
        return out

    async def _scan_late(self) -> None:
        """Approved campaigns due more than NOTIFY_START_LATE_SECONDS ago by the database's clock
        and still not running. Reported when two scans in a row find them, so a campaign
        approved late and claimed a moment after a scan is not reported."""
        late_ms = int(self.config.start_late_s * 1000)
        cursor = await self._campaigns.aggregate(
            [
                {
                    "$match": {
                        "status": "approved",
                        "$expr": {"$lte": ["$startDate", {"$subtract": ["$$NOW", late_ms]}]},
                    }
                },
                {
                    "$project": {
                        "name": 1,
                        "startDate": 1,
                        "lateMs": {"$subtract": ["$$NOW", "$startDate"]},
                    }
                },
                {"$limit": 500},
            ]
        )
        seen: set[str] = set()
        async for doc in cursor:
            start = utc(doc.get("startDate"))
            if start is None:
                continue
            cid = str(doc["_id"])
            key = f"{cid}:{int(start.timestamp() * 1000)}"
            seen.add(key)
            if key not in self._late_seen:
                continue
            data = base_data(cid, doc.get("name"))
            late_s = float(doc.get("lateMs") or 0) / 1000
            data.update(
                startDate=iso(start),
                lateBySeconds=round(late_s, 1),
                reason=f"approved and due, but not running {late_s:.0f}s after its start date",
            )
            await self.emit(ev.CAMPAIGN_START_LATE, cid, _ms(start), data)
        self._late_seen = seen

    async def _check_spike(self) -> None:
        """Failure share of this instance's sends over the last window, per channel: over the
        threshold (with enough sends), one `delivery.failure_spike` per spike cluster-wide."""
        now_m = self._clock.monotonic()
        registry = self._metrics.registry
        sample: dict[str, tuple[float, float]] = {}
        for channel in ("email", "sms"):
            sent = (
                registry.get_sample_value(
                    "reactor_sends_total", {"channel": channel, "outcome": "sent"}
                )
                or 0.0
            )
            failed = (
                registry.get_sample_value(
                    "reactor_sends_total", {"channel": channel, "outcome": "failed"}
                )
                or 0.0
            )
            sample[channel] = (sent, failed)
        self._spike_samples.append((now_m, sample))
        window = self.config.failure_spike_window_s
        while len(self._spike_samples) > 1 and self._spike_samples[1][0] <= now_m - window:
            self._spike_samples.popleft()
        first = self._spike_samples[0][1]
        for channel, (sent, failed) in sample.items():
            d_sent, d_failed = sent - first[channel][0], failed - first[channel][1]
            attempted = d_sent + d_failed
            spiking = (
                attempted >= self.config.failure_spike_min
                and d_failed / attempted > self.config.failure_spike_share
            )
            flip = await self._flip(f"notify:spike:{channel}", spiking)
            if flip is None or not spiking:
                continue
            await self.emit(
                ev.FAILURE_SPIKE,
                None,
                f"{channel}:{flip}",
                {
                    "channel": channel,
                    "failed": int(d_failed),
                    "attempted": int(attempted),
                    "share": round(d_failed / attempted, 4),
                    "threshold": self.config.failure_spike_share,
                    "windowSeconds": int(window),
                },
            )

    async def aclose(self) -> None:
        for transport in self._transports.values():
            await transport.aclose()


def _ms(at: dt.datetime) -> int:
    return int(at.timestamp() * 1000)
